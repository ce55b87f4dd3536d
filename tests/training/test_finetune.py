"""kode finetune / kode.finetune: a pretrained source through kode train's pipeline."""

import json
import os

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

import zoo
from kode.cli import main
from kode.compat import all_layers
from kode.errors import KodeError
from kode.layers.stage import IntegratorStage, recomputable_layers
from kode.testing.applications import stand_in_for
from kode.tools.port import _Graph
from kode.training.finetune import FinetunePipeline, FinetuneSettings, finetune, freeze_layers


@pytest.fixture
def tiny_resnet50v2(monkeypatch):
    """keras.applications.ResNet50V2 builds a tiny ResNet50V2-shaped network for the test
    (kode.testing.applications): the same layers, names and four ported stages (one step
    each), so `kode finetune ResNet50V2` runs its keras.applications path in seconds."""
    return stand_in_for(monkeypatch, "ResNet50V2")


def _layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer ``name`` anywhere in ``model`` (segments hold the layers outside stages)."""
    return next(layer for layer in all_layers(model) if layer.name == name)


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    """A small kode model for digits saved as .keras (its kode.json beside it)."""
    directory = tmp_path_factory.mktemp("source")
    model = zoo.create_model("resnet20", depth=8, input_shape=(8, 8, 1), classes=10,
                             width_multiplier=0.5)
    path = os.path.join(directory, "model.keras")
    model.save(path)
    with open(os.path.join(directory, "kode.json"), "w") as fh:
        json.dump({"model": "resnet8", "num_classes": 10}, fh)
    return path


def test_finetune_a_keras_file_with_the_adjoint_refined_and_frozen(source_file, tmp_path):
    """End to end on digits: refine ×2, adjoint (guard reports, falls back), stem frozen,
    new head, model.keras + kode.json + metrics.json, verified SavedModel."""
    logdir, export = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "export")
    source = keras.saving.load_model(source_file)
    result = finetune(source_file, "digits", epochs=1, refine=2, freeze="stem",
                      gradient="adjoint", on_inaccurate="fallback", logdir=logdir,
                      export_dir=export, verbose=0, diagnostics=False)
    model = result.model
    stage = next(lay for lay in model.layers if isinstance(lay, IntegratorStage))
    old = next(lay for lay in source.layers if isinstance(lay, IntegratorStage))
    assert stage.num_steps == 2 * old.num_steps and stage.h == old.h / 2
    # The layers outside the stages are cut into segments the adjoint recomputes (resnet8
    # has one stage: the shape-changing blocks of stages 2 and 3 and the head follow it).
    assert {(lay.name, lay.gradient) for lay in recomputable_layers(model)} == {
        ("stem", "adjoint"), ("head", "adjoint"), ("stage2_transition", "adjoint"),
        ("stage3_transition", "adjoint")}
    assert not _layer(model, "stem_conv").trainable and stage.trainable
    assert _layer(model, "head").body.layers[-1].name == "finetune_predictions"
    np.testing.assert_array_equal(_layer(model, "stem_conv").get_weights()[0],
                                  source.get_layer("stem_conv").get_weights()[0])
    report = result.config["gradient_guard"][0]
    assert report["action"] in ("none", "fallback") and report["max_error"] > 0
    assert result.export is not None and result.export.max_abs_diff <= 1e-5
    with open(os.path.join(logdir, "kode.json")) as fh:
        meta = json.load(fh)
    assert meta["finetune"]["refine"] == 2 and meta["finetune"]["kind"] == "keras_file"
    assert 0.0 <= result.test_metrics["accuracy"] <= 1.0
    # Resume: the same call finds the finished run's checkpoint and trains no further epoch.
    again = finetune(source_file, "digits", epochs=1, refine=2, freeze="stem",
                     gradient="adjoint", on_inaccurate="fallback", logdir=logdir,
                     verbose=0, diagnostics=False)
    assert again.config["resumed_from_epoch"] == 1


def test_keras_applications_source_gets_its_size_channels_and_preprocessing(
        tiny_resnet50v2, tmp_path):
    """ResNet50V2 (tiny, same graph) from an ImageNet-format weights file at 32×32: digits
    images are resized, made RGB and scaled to [−1, 1]; the model is the ported network (same
    features) with a new head; kode.json carries the preprocessing for the SavedModel."""
    original = keras.applications.ResNet50V2(weights=None, include_top=False, pooling="avg",
                                             input_shape=(32, 32, 3))
    path = os.path.join(tmp_path, "resnet50v2_notop.h5")
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, original)
    pipeline = FinetunePipeline(FinetuneSettings(
        "ft", "digits", source="ResNet50V2", weights=path, input_size=32, freeze=1,
        gradient="adjoint", batch_size=8, logdir=os.path.join(tmp_path, "run"), verbose=0))
    pipeline.prepare()
    pipeline.load_data()
    x, _ = next(iter(pipeline.test_ds))
    assert x.shape[1:] == (32, 32, 3) and -1.0 <= float(np.min(x)) < float(np.max(x)) <= 1.0
    model = pipeline.build_model(pipeline.info)
    head = model.get_layer("head")  # the segment after the last stage, the new head in it
    before_head = keras.Model(model.inputs, head.input)
    # The body's own node of its last layer: the layer also belongs to the uncut model.
    _, last = _Graph(head.body).nodes[-1]
    in_head = keras.Model(head.body.inputs, last.input_tensors[0])
    np.testing.assert_allclose(in_head(before_head(x, training=False), training=False),
                               original(x, training=False), atol=1e-5)
    assert model.output_shape == (None, 10)
    assert {s.gradient for s in model.layers if isinstance(s, IntegratorStage)} == {"adjoint"}
    assert not model.get_layer("conv2_stage").trainable
    assert model.get_layer("conv3_stage").trainable
    pipeline.model, pipeline.frozen = model, pipeline.frozen
    pipeline.guard, pipeline.initial_epoch = None, 0
    meta = pipeline.metadata()
    assert meta["preprocessing"] == {"kind": "scale", "scale": 1 / 127.5, "offset": -1.0}
    assert meta["input_shape"] == [32, 32, 3] and "mean" not in meta


@pytest.mark.parametrize("argv, message", [
    (["nosuchnet"], "unknown source 'nosuchnet'"),
    (["ResNet50", "--weights", "imagenet", "--gradient", "adjoint"],
     "post-activation ResNet, relu\\(x \\+ f\\(x\\)\\) is not invertible"),
    (["ResNet50V2", "--refine", "0"], "refinement factor must be a positive integer"),
    (["ResNet50V2", "--refine", "1.5"], "argument --refine"),
    (["ResNet50V2", "--refine", "autox"],
     "argument --refine: refinement factor must be a positive integer or 'auto', got 'autox'"),
    (["ResNet50V2", "--refine", "auto"], "--refine auto chooses m by the adjoint's gradient "
     "error; it needs --gradient adjoint \\(got 'backprop'\\)"),
    (["ResNet50V2", "--weights", "missing.h5"], "weights file 'missing.h5' does not exist"),
    (["resnet20"], "zoo source 'resnet20' needs --weights FILE"),
    (["ResNet50V2", "--freeze", "early"], "freeze must be 'stem' or a number"),
    (["ResNet50V2", "--steps-per-epoch", "0"], "steps_per_epoch must be a positive integer"),
])
def test_bad_inputs_are_one_line_errors(argv, message, capsys, tmp_path):
    code = main(["finetune", *argv, "--epochs", "1", "--logdir", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert out == "", out  # refused before anything is printed
    assert code == 2 and err.count("\n") == 1 and err.startswith("kode: error:"), err
    assert __import__("re").search(message, err), err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("settings, words", [
    ({"refine": "2"}, "refinement factor must be a positive integer or 'auto', got '2'"),
    ({"input_size": "32"}, "input_size must be an integer or None, got '32'"),
    ({"input_size": 16}, "input_shape (16, 16, 3) is invalid for ResNet50V2"),
    ({"freeze": 1.5}, "freeze must be 'stem' or a number of stages >= 0, got 1.5"),
    ({"weights": 3}, "weights must be a string or None, got 3"),
    ({"epochs": "3"}, "epochs must be a positive integer, got '3'"),
    ({"lr": "0.1"}, "lr must be a positive finite number, got '0.1'"),
    ({"batch_size": 1.5}, "batch_size must be a positive integer, got 1.5"),
])
def test_wrong_types_name_the_argument_and_what_it_takes(settings, words, tmp_path):
    with pytest.raises(KodeError) as refused:
        finetune("ResNet50V2", "digits", logdir=str(tmp_path / "run"), verbose=0, **settings)
    assert str(refused.value).startswith(words), refused.value
    assert not os.path.exists(tmp_path / "run")


def test_weights_of_another_architecture_are_refused(source_file, tmp_path):
    other = zoo.create_model("heun_resnet20", depth=14, input_shape=(8, 8, 1), classes=10)
    path = os.path.join(tmp_path, "other.weights.h5")
    other.save_weights(path)
    with pytest.raises(KodeError, match="does not fit zoo model 'resnet20'.*another arch"):
        finetune("resnet20", "digits", weights=path, epochs=1, verbose=0,
                 logdir=os.path.join(tmp_path, "run"))
    with pytest.raises(KodeError, match="a .keras file holds its weights"):
        finetune(source_file, weights=path, logdir=os.path.join(tmp_path, "run"))


def test_freeze_counts_stages_from_the_stem():
    model = zoo.create_model("resnet20", depth=14, input_shape=(8, 8, 1))
    assert freeze_layers(model, 0) == []
    stem = freeze_layers(model, "stem")
    assert stem == ["stem_conv"]
    frozen = freeze_layers(model, 2)
    assert frozen[-1] == "stage2" and "stage3" not in frozen
    with pytest.raises(KodeError, match="only 3 stages"):
        freeze_layers(model, 4)


def test_kode_finetune_a_keras_applications_resnet_v2_end_to_end_with_the_adjoint(
        tiny_resnet50v2, tmp_path, capsys):
    """`kode finetune ResNet50V2 --weights FILE` at 32×32 on digits, two adjoint steps: the
    guard's error is printed with what it decided (random weights at h = 1: far above the
    tolerance, so the stage falls back to checkpoint), kode.json carries the source's
    [−1, 1] scaling, and the verified SavedModel answers raw 0–255 pixels as the Keras model
    answers the scaled ones. ResNet50V2 is a tiny one (``tiny_resnet50v2``): the same path,
    graph and stages, one step each.

    Kept short: 2 steps (--steps-per-epoch), and --freeze 3 (stem and the first three stages)
    so that only conv5's stage and the head train: the smallest backward graph that still
    runs the adjoint through a ported stage (measured about half the time of --freeze stem)."""
    import tensorflow as tf

    from kode.serving.publish import load_metadata
    from kode.testing.models import image_serving_contract, serving_contract

    keras.utils.set_random_seed(0)
    original = keras.applications.ResNet50V2(weights=None, include_top=False, pooling="avg",
                                             input_shape=(32, 32, 3))
    weights = os.path.join(tmp_path, "resnet50v2_notop.weights.h5")
    original.save_weights(weights)
    logdir, export = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "export")
    code = main(["finetune", "ResNet50V2", "--weights", weights, "--input-size", "32",
                 "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                 "--gradient", "adjoint", "--on-inaccurate", "fallback", "--freeze", "3",
                 "--no-diagnostics", "--logdir", logdir, "--export", export])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]

    # The guard's numbers, per stage, as recorded, and its decision.
    metrics = json.loads(open(os.path.join(logdir, "metrics.json")).read())
    (report,) = metrics["config"]["gradient_guard"]
    table = out.split("gradient guard (epoch 0):\n", 1)[1].splitlines()
    for stage in report["stages"]:  # a frozen stage has no gradient to compare: nan (null)
        error = stage["gradient_error"]
        row = next(ln for ln in table if ln.startswith(stage["name"] + " "))
        assert row.split()[-2] == ("nan" if error is None else f"{error:.3e}"), row
    assert report["max_error"] > 0.05 and report["action"] == "fallback"
    switched = sorted(s["name"] for s in report["stages"] if (s["gradient_error"] or 0) > 0.05)
    assert switched == ["conv5_stage"]
    assert (f"relative error {report['max_error']:.3g} > tolerance 0.05; switched "
            f"{', '.join(switched)} to 'checkpoint'") in out
    assert metrics["config"]["steps_per_epoch"] == 2 and len(metrics["history"]["loss"]) == 1

    trained = keras.saving.load_model(os.path.join(logdir, "model.keras"))
    assert int(trained.optimizer.iterations) == 2  # --steps-per-epoch 2
    modes = {s.name: s.gradient for s in trained.layers if isinstance(s, IntegratorStage)}
    assert {modes[name] for name in switched} == {"checkpoint"}
    assert not trained.get_layer("conv4_stage").trainable  # --freeze 3
    assert trained.get_layer("conv5_stage").trainable

    meta = json.loads(open(os.path.join(logdir, "kode.json")).read())
    assert meta["preprocessing"] == {"kind": "scale", "scale": 1 / 127.5, "offset": -1.0}
    assert meta["input_shape"] == [32, 32, 3] and meta["finetune"]["kind"] == \
        "keras_applications"

    # The export: verified when written (all three signatures within 1e-5 of Keras), printed.
    path = os.path.join(export, "finetune_resnet50v2", "1")
    line = next(ln for ln in out.splitlines() if ln.startswith("exported SavedModel"))
    assert line.startswith(f"exported SavedModel to {path} (version 1)")
    assert float(line.rsplit("= ", 1)[1]) <= 1e-5
    assert serving_contract(path) == image_serving_contract((32, 32, 3))
    assert load_metadata(path)["preprocessing"] == meta["preprocessing"]
    # …and checked here again: raw pixels in, the source's preprocessing in the graph.
    pixels = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    expected = trained(pixels / 127.5 - 1.0, training=False).numpy()
    signatures = tf.saved_model.load(path).signatures
    for name, images in (("serving_default", pixels), ("serving_uint8", pixels.astype(np.uint8)),
                         ("serving_preprocessed", pixels / 127.5 - 1.0)):
        served = signatures[name](images=tf.constant(images))
        np.testing.assert_allclose(served["probabilities"], expected, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(served["class_ids"], expected.argmax(-1))


@pytest.fixture(scope="module")
def seeded_source(tmp_path_factory):
    """resnet8 (one stage of one step, h = 1) at seed 0, saved as .keras: its adjoint error
    falls slowly with m (measured 1.2, 0.92, 0.63 at m = 1, 2, 4)."""
    directory = tmp_path_factory.mktemp("seeded")
    keras.utils.set_random_seed(0)
    model = zoo.create_model("resnet20", depth=8, input_shape=(8, 8, 1), classes=10,
                             width_multiplier=0.5)
    path = os.path.join(directory, "model.keras")
    model.save(path)
    return path


def test_kode_finetune_refine_auto_prints_its_table_and_records_the_choice(
        seeded_source, tmp_path, capsys):
    """`--refine auto --gradient adjoint`: the search on the guard's batch with the guard's
    tolerance, stopping at the first m that passes; the table printed, the choice trained
    (N·m steps) and recorded; the guard at epoch 0 measures what the search measured."""
    logdir = os.path.join(tmp_path, "run")
    code = main(["finetune", seeded_source, "--refine", "auto", "--gradient", "adjoint",
                 "--guard-tolerance", "0.78", "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "32", "--no-diagnostics", "--logdir", logdir])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    metrics = json.loads(open(os.path.join(logdir, "metrics.json")).read())
    choice = metrics["config"]["refine_choice"]
    rows, m = choice["candidates"], choice["chosen"]
    assert metrics["config"]["refine"] == "auto" and choice["tolerance"] == 0.78
    assert [r["m"] for r in rows] == [1, 2, 4, 8, 16][:len(rows)] and rows[-1]["m"] == m > 1
    assert [r["passed"] for r in rows] == [False] * (len(rows) - 1) + [True]
    assert all(r["gradient_error"] > 0.78 for r in rows[:-1])
    assert rows[-1]["gradient_error"] <= 0.78
    table = out.split("refine auto (adjoint gradient error, gradient guard, tolerance 0.78):\n",
                      1)[1].splitlines()
    for row, line in zip(rows, table[1:], strict=False):
        assert line.split()[:4] == [str(row["m"]), "+".join(map(str, row["stage_steps"])),
                                    f"{row['parameters']:,}", f"{row['gradient_error']:.3e}"]
    assert table[len(rows) + 2] == f"refine auto: chose m = {m}"
    (guard,) = metrics["config"]["gradient_guard"]
    assert guard["action"] == "none"
    assert guard["max_error"] == pytest.approx(rows[-1]["gradient_error"], rel=1e-4)
    source = keras.saving.load_model(seeded_source)
    trained = keras.saving.load_model(os.path.join(logdir, "model.keras"))
    steps = [s.num_steps for s in source.layers if isinstance(s, IntegratorStage)]
    assert [s.num_steps for s in trained.layers if isinstance(s, IntegratorStage)] == [
        m * n for n in steps]
    meta = json.loads(open(os.path.join(logdir, "kode.json")).read())
    assert meta["finetune"]["refine"] == m and meta["finetune"]["refine_requested"] == "auto"


def test_refine_auto_without_a_passing_m_is_one_line_and_writes_nothing(
        seeded_source, tmp_path, capsys):
    logdir = os.path.join(tmp_path, "run")
    code = main(["finetune", seeded_source, "--refine", "auto", "--gradient", "adjoint",
                 "--guard-tolerance", "0.01", "--epochs", "1", "--logdir", logdir])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1, err
    assert __import__("re").fullmatch(
        r"kode: error: no refinement factor up to 16 brings the adjoint's gradient error "
        r"under the tolerance 0.01 \(smallest: \S+ at m = \d+\); train with --gradient "
        r"checkpoint\n", err), err
    assert " 16 16 " in out  # the table was printed, every factor tried
    assert not os.path.exists(logdir)


@pytest.mark.parametrize("refine", ["autox", 0, 1.5])
def test_bad_refine_settings_are_refused_before_anything_is_written(refine, source_file,
                                                                    tmp_path):
    logdir = os.path.join(tmp_path, "run")
    with pytest.raises(KodeError, match="^refinement factor must be a positive integer or "
                                        "'auto', got") as info:
        finetune(source_file, "digits", refine=refine, gradient="adjoint", logdir=logdir)
    assert "\n" not in str(info.value)
    assert not os.path.exists(logdir)


def test_refine_auto_needs_the_adjoint(source_file, tmp_path):
    """auto measures the adjoint's error: with backprop or checkpoint there is none."""
    logdir = os.path.join(tmp_path, "run")
    with pytest.raises(KodeError, match="^--refine auto chooses m by the adjoint's gradient "
                                        "error; it needs --gradient adjoint \\(got 'checkpoint'"):
        finetune(source_file, "digits", refine="auto", gradient="checkpoint", epochs=1,
                 logdir=logdir, verbose=0, diagnostics=False)
    assert not os.path.exists(logdir)


def test_kode_finetune_refine_auto_from_a_keras_applications_resnet(tiny_resnet50v2, tmp_path,
                                                                   capsys):
    """`kode finetune ResNet50V2 --refine auto --gradient adjoint` end to end at 32×32 (a
    tiny ResNet50V2: the same graph and stages): the search runs on the ported model (random
    weights: a tolerance every m passes, so m = 1), the stem, shape-changing segments and head
    recompute in the backward (the guard says so) and the trained model keeps them."""
    keras.utils.set_random_seed(0)
    original = keras.applications.ResNet50V2(weights=None, include_top=False, pooling="avg",
                                             input_shape=(32, 32, 3))
    weights = os.path.join(tmp_path, "resnet50v2_notop.weights.h5")
    original.save_weights(weights)
    logdir = os.path.join(tmp_path, "run")
    code = main(["finetune", "ResNet50V2", "--weights", weights, "--input-size", "32",
                 "--refine", "auto", "--guard-tolerance", "1e6", "--gradient", "adjoint",
                 "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
                 "--freeze", "3", "--no-diagnostics", "--logdir", logdir])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "refine auto: chose m = 1" in out
    assert ("outside the stages: 5 of 5 layers (stem, transitions, head) recomputed in the "
            "backward (stem, transition1, transition2, transition3, head)") in out
    trained = keras.saving.load_model(os.path.join(logdir, "model.keras"))
    assert {(layer.name, layer.gradient) for layer in recomputable_layers(trained)} == {
        (name, "adjoint") for name in ("stem", "transition1", "transition2", "transition3",
                                       "head")}
