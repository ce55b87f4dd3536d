"""Tests for kode.export: Serving layout, versioning, verification, metadata, prediction."""

from __future__ import annotations

import hashlib
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kode.errors import KodeError
from kode.serving import export as kx
from kode.serving import publish
from kode.serving.export import ExportResult, export_model, verify_export
from kode.serving.predict import predict_files
from kode.serving.publish import load_metadata

GRAY_CLASSES = [f"class_{i}" for i in range(10)]


def _tiny_model(
    shape: tuple[int, int, int] = (8, 8, 1),
    classes: int = 10,
    activation: str | None = "softmax",
    name: str = "tiny",
) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # Large weights so that different images give clearly different outputs.
    init = keras.initializers.RandomNormal(stddev=3.0)
    outputs = keras.layers.Dense(classes, activation=activation, kernel_initializer=init)(x)
    return keras.Model(inputs, outputs, name=name)


def _snapshot(root: str) -> dict[str, tuple[int, str]]:
    """Relative path -> (mtime_ns, sha256) for every file and folder below ``root``."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            snap[os.path.relpath(p, root) + "/"] = (os.stat(p).st_mtime_ns, "")
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            snap[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, digest)
    return snap


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return _tiny_model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> tuple[ExportResult, str]:
    """One export shared by the read-only tests: (result, export_dir)."""
    export_dir = str(tmp_path_factory.mktemp("shared") / "saved_models")
    meta = {"class_names": GRAY_CLASSES, "mean": 0.5, "std": 0.25, "dataset": "toy"}
    return export_model(model, export_dir, metadata=meta), export_dir


# ----------------------------------------------------------------------------------------------
# Layout, signatures, verification
# ----------------------------------------------------------------------------------------------


def test_export_layout_signature_and_diff(exported):
    result, export_dir = exported
    assert result.version == 1
    assert result.path == os.path.join(export_dir, "tiny", "1")
    assert os.path.isfile(os.path.join(export_dir, "tiny", "1", "saved_model.pb"))
    assert os.path.isdir(os.path.join(export_dir, "tiny", "1", "variables"))
    # Nothing else in the model folder: no leftover temporary folder.
    assert os.listdir(os.path.join(export_dir, "tiny")) == ["1"]
    loaded = tf.saved_model.load(result.path)
    assert "serving_default" in loaded.signatures
    assert 0.0 <= result.max_abs_diff <= 1e-5
    # Readable by a Serving process running as another user (not the 0700 of mkdtemp).
    assert os.stat(result.path).st_mode & 0o055 == 0o055


def test_serving_signatures_match_keras(exported, model):
    """serving_default/uint8 take pixels 0-255 and normalize in the graph; preprocessed doesn't."""
    result, _ = exported
    meta = load_metadata(result.path)
    assert meta["preprocessing"] == {"kind": "mean_std", "pixel_max": 255.0, "mean": [0.5],
                                     "std": [0.25]}
    assert meta["serving"]["input_key"] == "images"
    signatures = tf.saved_model.load(result.path).signatures
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 8, 8, 1)).astype(np.uint8)
    keras_probs = model((pixels / np.float32(255) - 0.5) / 0.25, training=False).numpy()
    for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8)):
        out = signatures[name](images=tf.constant(pixels, dtype))
        np.testing.assert_allclose(out["probabilities"].numpy(), keras_probs, atol=1e-6)
        assert out["class_ids"].numpy().tolist() == keras_probs.argmax(axis=1).tolist()
    x = np.random.default_rng(2).normal(size=(3, 8, 8, 1)).astype(np.float32)
    out = signatures["serving_preprocessed"](images=tf.constant(x))
    np.testing.assert_allclose(out["probabilities"].numpy(), model(x, training=False).numpy(),
                               atol=1e-6)


def test_verify_export_detects_changed_weights(tmp_path):
    m = _tiny_model()
    result = export_model(m, str(tmp_path))
    x = np.random.default_rng(2).normal(size=(5, 8, 8, 1)).astype(np.float32)
    assert verify_export(result.path, m, x) <= 1e-5
    m.set_weights([w + 0.5 for w in m.get_weights()])
    assert verify_export(result.path, m, x) > 1e-3


def test_second_export_is_version_2_and_leaves_version_1_alone(tmp_path):
    m = _tiny_model()
    first = export_model(m, str(tmp_path))
    before = _snapshot(first.path)
    second = export_model(m, str(tmp_path))
    assert (first.version, second.version) == (1, 2)
    assert second.path == os.path.join(str(tmp_path), "tiny", "2")
    assert _snapshot(first.path) == before
    assert sorted(os.listdir(tmp_path / "tiny")) == ["1", "2"]


def test_explicit_version_and_next_free(tmp_path):
    m = _tiny_model()
    assert export_model(m, str(tmp_path), version=7).version == 7
    assert export_model(m, str(tmp_path)).version == 8


def test_existing_version_is_refused_and_nothing_changes(tmp_path, monkeypatch):
    m = _tiny_model()
    first = export_model(m, str(tmp_path), name="net")
    before = _snapshot(str(tmp_path))

    def boom(*args, **kwargs):
        raise AssertionError("the SavedModel must not be written when the version already exists")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(KodeError, match="already exists; refusing to overwrite"):
        export_model(m, str(tmp_path), name="net", version=first.version)
    assert _snapshot(str(tmp_path)) == before


def test_export_dir_is_a_file(tmp_path, monkeypatch):
    m = _tiny_model()
    blocker = tmp_path / "saved_models"
    blocker.write_text("not a folder")

    def boom(*args, **kwargs):
        raise AssertionError("the export dir must be checked before exporting")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(KodeError, match="saved_models"):
        export_model(m, str(blocker))
    # A file where the model-name folder should be.
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "tiny").write_text("in the way")
    with pytest.raises(KodeError, match="tiny"):
        export_model(m, str(tmp_path / "ok"))
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits"
)
def test_export_dir_unwritable(tmp_path):
    m = _tiny_model()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(KodeError, match="locked"):
            export_model(m, str(locked / "saved_models"))
        (locked.parent / "locked2").mkdir()
        (locked.parent / "locked2" / "tiny").mkdir()
        (locked.parent / "locked2" / "tiny").chmod(0o500)
        with pytest.raises(KodeError, match="not writable"):
            export_model(m, str(locked.parent / "locked2"))
    finally:
        for folder in (locked, locked.parent / "locked2" / "tiny"):
            if folder.exists():
                folder.chmod(0o700)


def test_export_dir_permission_errors_simulated(tmp_path, monkeypatch):
    """Runs as root too: the OS calls fail the way they do for a read-only folder."""
    m = _tiny_model()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as mp:
        mp.setattr(publish.os, "makedirs", denied)
        with pytest.raises(KodeError, match="cannot create export directory"):
            export_model(m, str(tmp_path / "new"))
    with monkeypatch.context() as mp:
        mp.setattr(publish.tempfile, "mkdtemp", denied)
        mp.setattr(tf.saved_model, "save", denied)  # must not be reached
        with pytest.raises(KodeError, match="not writable"):
            export_model(m, str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new" / "tiny") == []


def test_failed_verification_raises_and_publishes_nothing(tmp_path, monkeypatch):
    m = _tiny_model()
    monkeypatch.setattr(kx, "_compare_outputs", lambda *a, **k: 0.5)
    with pytest.raises(KodeError, match=r"0\.5 > atol.*kept for inspection") as info:
        export_model(m, str(tmp_path))
    kept = str(info.value).rsplit(" ", 1)[-1]
    assert os.path.isfile(os.path.join(kept, "saved_model.pb"))
    # No integer version folder: Serving must not pick up the unverified export.
    assert not [e for e in os.listdir(tmp_path / "tiny") if e.isdigit()]
    monkeypatch.setattr(kx, "_compare_outputs", lambda *a, **k: float("nan"))
    with pytest.raises(KodeError, match="nan"):
        export_model(m, str(tmp_path))


def test_export_failure_cleans_up(tmp_path, monkeypatch):
    m = _tiny_model()

    def boom(*args, **kwargs):
        raise ValueError("simulated crash")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(KodeError, match="simulated crash"):
        export_model(m, str(tmp_path))
    assert os.listdir(tmp_path / "tiny") == []


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": "../escape"}, "invalid export name"),
        ({"name": ""}, "invalid export name"),
        ({"version": -1}, "non-negative integer"),
        ({"version": "3"}, "non-negative integer"),
        ({"atol": -1.0}, "atol"),
        ({"check_inputs": np.zeros((2, 4, 4, 1))}, "check_inputs has shape"),
        ({"metadata": {"bad": object()}}, "not JSON-serializable"),
        ({"metadata": {"input_shape": [28, 28, 1]}}, "contradicts"),
        ({"metadata": {"class_names": ["a", "b"]}}, "2 class_names"),
        ({"metadata": {"mean": [0.1, 0.2, 0.3]}}, "mean"),
        ({"metadata": {"std": 0}}, "std"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(KodeError, match=pattern):
        export_model(_tiny_model(), str(tmp_path), **kwargs)
    leftovers = [] if not (tmp_path / "tiny").exists() else os.listdir(tmp_path / "tiny")
    assert leftovers == []


def test_unbuilt_model_is_refused(tmp_path):
    seq = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(KodeError, match="not built"):
        export_model(seq, str(tmp_path))


def test_subclassed_model_uses_signature_shape(tmp_path):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    sub = Sub()
    sub(np.zeros((1, 5), np.float32))
    result = export_model(sub, str(tmp_path))
    assert result.max_abs_diff <= 1e-5
    assert load_metadata(result.path)["input_shape"] == [5]


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


def test_metadata_round_trip(tmp_path):
    m = _tiny_model()
    meta = {
        "class_names": GRAY_CLASSES,
        "mean": np.float32(0.5),
        "std": [0.25],
        "dataset": "toy",
        "extra": {"epochs": 3, "tags": ("a", "b")},
    }
    result = export_model(m, str(tmp_path), metadata=meta)
    path = os.path.join(result.path, "assets.extra", "kode.json")
    with open(path, encoding="utf-8") as fh:
        on_disk = json.load(fh)
    got = load_metadata(result.path)
    assert got == on_disk
    assert got["class_names"] == GRAY_CLASSES
    assert got["mean"] == 0.5 and got["std"] == [0.25]
    assert got["dataset"] == "toy"
    assert got["extra"] == {"epochs": 3, "tags": ["a", "b"]}
    assert got["input_shape"] == [8, 8, 1]
    assert got["name"] == "tiny" and got["model_name"] == "tiny"
    assert got["classifier_activation"] == "softmax"
    assert got["serving"]["signature"] == "serving_default"
    # The model folder resolves to its latest version.
    assert load_metadata(str(tmp_path / "tiny")) == got


def test_load_metadata_errors(tmp_path):
    with pytest.raises(KodeError, match="not a SavedModel"):
        load_metadata(str(tmp_path))
    with pytest.raises(KodeError, match="not a SavedModel"):
        load_metadata(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def _write_images(folder, sizes_modes) -> list[str]:
    rng = np.random.default_rng(3)
    files = []
    for i, ((w, h), mode) in enumerate(sizes_modes):
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        # A bright blob at a random place makes images differ beyond noise.
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        pixels[y : y + 3, x : x + 3] = 255
        img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
        path = os.path.join(folder, f"img{i}.png")
        img.save(path)
        files.append(path)
    return files


def _reference_preprocess(path, h, w, c, mean, std) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        x = np.asarray(img, dtype=np.float32).reshape(h, w, c) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_predict_files_gray_softmax(exported, model, tmp_path):
    result, _ = exported
    files = _write_images(
        str(tmp_path), [((8, 8), "L"), ((16, 12), "RGB"), ((5, 9), "RGBA"), ((8, 8), "L")]
    )
    preds = predict_files(result.path, files)
    x = np.stack([_reference_preprocess(f, 8, 8, 1, 0.5, 0.25) for f in files])
    probs = model(x, training=False).numpy()
    assert [p.file for p in preds] == files
    assert [p.class_index for p in preds] == list(np.argmax(probs, axis=1))
    assert [p.class_name for p in preds] == [GRAY_CLASSES[i] for i in np.argmax(probs, axis=1)]
    np.testing.assert_allclose([p.probability for p in preds], probs.max(axis=1), atol=1e-5)


def test_predict_files_rgb_logits_get_softmax(tmp_path):
    rgb = _tiny_model(shape=(10, 12, 3), classes=4, activation=None, name="rgb")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    export_model(rgb, str(tmp_path / "sm"), metadata={"mean": mean, "std": std})
    files = _write_images(str(tmp_path), [((12, 10), "RGB"), ((30, 20), "L"), ((7, 7), "RGBA")])
    # The model folder (not a version folder) resolves to the latest version.
    preds = predict_files(str(tmp_path / "sm" / "rgb"), files)
    x = np.stack([_reference_preprocess(f, 10, 12, 3, mean, std) for f in files])
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(rgb(x, training=False)))
    assert [p.class_index for p in preds] == list(np.argmax(probs, axis=1))
    assert [p.class_name for p in preds] == [str(i) for i in np.argmax(probs, axis=1)]
    np.testing.assert_allclose([p.probability for p in preds], probs.max(axis=1), atol=1e-5)
    assert all(0.0 < p.probability <= 1.0 for p in preds)


def test_predict_files_bad_inputs(exported, tmp_path):
    result, _ = exported
    good = _write_images(str(tmp_path), [((8, 8), "L")])
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with pytest.raises(KodeError, match="notes.txt"):
        predict_files(result.path, [*good, str(text)])
    with pytest.raises(KodeError, match="nope.png"):
        predict_files(result.path, [str(tmp_path / "nope.png")])
    with pytest.raises(KodeError, match="not a SavedModel"):
        predict_files(str(tmp_path), good)
    with pytest.raises(KodeError, match="not a SavedModel"):
        predict_files(str(text), good)
    assert predict_files(result.path, []) == []


# ----------------------------------------------------------------------------------------------
# In-graph preprocessing
# ----------------------------------------------------------------------------------------------


def test_no_preprocessing_information_means_identity(tmp_path):
    """export_model(model) alone: serving_default computes model(images), as model.export."""
    m = _tiny_model()
    result = export_model(m, str(tmp_path))
    assert load_metadata(result.path)["preprocessing"] == {"kind": "identity"}
    x = np.random.default_rng(4).uniform(0, 255, size=(2, 8, 8, 1)).astype(np.float32)
    out = tf.saved_model.load(result.path).signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["probabilities"].numpy(), m(x, training=False).numpy(),
                               atol=1e-6)


@pytest.mark.parametrize(
    ("preprocessing", "by_hand"),
    [
        # keras.applications ResNetV2 ("tf" mode): [0, 255] -> [-1, 1].
        ({"kind": "scale", "scale": 1 / 127.5, "offset": -1.0}, lambda x: x / 127.5 - 1.0),
        # keras.applications ResNet50 V1 ("caffe" mode): RGB -> BGR, minus the BGR means.
        ({"kind": "caffe"}, lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ],
)
def test_source_network_preprocessing_kinds(tmp_path, preprocessing, by_hand):
    rgb = _tiny_model(shape=(6, 6, 3), classes=4, activation=None, name="rgb")
    result = export_model(rgb, str(tmp_path), metadata={"preprocessing": preprocessing})
    meta = load_metadata(result.path)
    assert meta["preprocessing"]["kind"] == preprocessing["kind"]
    assert meta["serving"]["head"] == "logits"  # a linear last layer: softmax in the graph
    pixels = np.random.default_rng(5).integers(0, 256, size=(3, 6, 6, 3)).astype(np.uint8)
    expected = keras.ops.convert_to_numpy(
        keras.ops.softmax(rgb(by_hand(pixels.astype(np.float64)).astype(np.float32))))
    out = tf.saved_model.load(result.path).signatures["serving_uint8"](images=pixels)
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-5)


def test_mean_std_preprocessing_is_the_training_normalization():
    from kode.data.datasets import dataset_info
    from kode.data.pipelines import _normalizer
    from kode.serving.preprocessing import apply_preprocessing, check_preprocessing, mean_std

    info = dataset_info("digits")
    sixteenths = np.arange(17, dtype=np.uint8).reshape(1, 17, 1, 1)  # digits' pixel values
    training = _normalizer(16.0, info.mean, info.std)(sixteenths)
    served = apply_preprocessing(check_preprocessing(mean_std(info.mean, info.std), 1),
                                 sixteenths.astype(np.float32) * 255 / 16)
    np.testing.assert_allclose(served.numpy(), training.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("metadata", "pattern"),
    [
        ({"preprocessing": {"kind": "bogus"}}, "unknown preprocessing kind 'bogus'"),
        ({"preprocessing": "mean_std"}, "must be an object"),
        ({"preprocessing": {"kind": "scale", "scale": 0}}, "must not be 0"),
        ({"preprocessing": {"kind": "scale", "scale": float("nan")}}, "not JSON-serializable"),
        ({"preprocessing": {"kind": "caffe"}}, "3 channels"),
        ({"preprocessing": {"kind": "identity", "mean": 1}}, "identity"),
        ({"preprocessing": {"kind": "identity"}, "mean": 0.5, "std": 0.2}, "contradicts"),
    ],
)
def test_bad_preprocessing_is_refused_before_writing(tmp_path, metadata, pattern):
    with pytest.raises(KodeError, match=pattern):
        export_model(_tiny_model(), str(tmp_path), metadata=metadata)
    assert not (tmp_path / "tiny").exists() or os.listdir(tmp_path / "tiny") == []


def test_feature_extractor_returns_raw_outputs(tmp_path):
    inputs = keras.Input((4, 4, 2))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(3, 1)(inputs))
    model = keras.Model(inputs, features, name="features")
    result = export_model(model, str(tmp_path))
    meta = load_metadata(result.path)
    assert meta["serving"]["head"] == "outputs" and meta["serving"]["output_keys"] == ["outputs"]


# ----------------------------------------------------------------------------------------------
# Temporary folders of killed exports
# ----------------------------------------------------------------------------------------------


def _fake_tmp(model_dir, suffix, owner: bool = True):
    folder = model_dir / f".tmp-export-next-{suffix}"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "saved_model.pb").write_bytes(b"partial")
    if owner:
        (folder / "owner").write_text("pid 1\n")
    return folder


def test_stale_temp_folders_are_removed_and_in_flight_ones_kept(tmp_path):
    import fcntl

    model_dir = tmp_path / "tiny"
    dead = _fake_tmp(model_dir, "dead")  # owner file, nobody holds its lock
    alive = _fake_tmp(model_dir, "alive")  # an export in flight holds the lock
    old = _fake_tmp(model_dir, "old", owner=False)  # older kode: no owner file, untouched 2 h
    for path in [old, *old.rglob("*")]:
        os.utime(path, (os.path.getmtime(path) - 7200,) * 2)
    fresh = _fake_tmp(model_dir, "fresh", owner=False)  # no owner file yet, just created
    with open(alive / "owner", "rb") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        result = export_model(_tiny_model(), str(tmp_path))
        assert result.version == 1
        assert sorted(os.listdir(model_dir)) == sorted(["1", alive.name, fresh.name])
    assert kx.remove_stale_exports(str(model_dir)) == [str(alive)]  # its owner is gone now
    assert sorted(os.listdir(model_dir)) == sorted(["1", fresh.name])
    assert not dead.exists() and not old.exists()


def test_killed_export_leaves_a_folder_the_next_export_removes(tmp_path):
    """A real export process killed mid-write: its folder is kept while it runs, removed after."""
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", f"""
import time, keras
from kode.serving import export as kx
from kode.serving import publish
def hang(model, path, *args):
    import os; os.makedirs(path); open(os.path.join(path, "saved_model.pb"), "wb").close()
    time.sleep(600)
kx._write_savedmodel = hang
i = keras.Input((3,)); m = keras.Model(i, keras.layers.Dense(2, activation="softmax")(i))
kx.export_model(m, {str(tmp_path)!r}, name="net")
"""])
    model_dir = tmp_path / "net"
    try:
        deadline = time.time() + 300
        while not list(model_dir.glob(".tmp-export-*/model/saved_model.pb")):
            assert child.poll() is None and time.time() < deadline, "child export did not start"
            time.sleep(0.2)
        assert kx.remove_stale_exports(str(model_dir)) == []  # in flight: untouched
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        (leftover,) = model_dir.glob(".tmp-export-*")
        assert kx.remove_stale_exports(str(model_dir)) == [str(leftover)]
        assert os.listdir(model_dir) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_refused_export_is_kept_outside_the_temp_folders(tmp_path, monkeypatch):
    m = _tiny_model()
    with monkeypatch.context() as mp:
        mp.setattr(kx, "_compare_outputs", lambda *a, **k: 0.5)
        with pytest.raises(KodeError, match="kept for inspection at") as info:
            export_model(m, str(tmp_path))
    kept = str(info.value).rsplit(" ", 1)[-1]
    assert os.path.basename(kept).startswith(".refused-")
    assert os.listdir(tmp_path / "tiny") == [os.path.basename(kept)]  # no temp folder left
    export_model(m, str(tmp_path))  # a later export does not take the kept copy away
    assert os.path.isfile(os.path.join(kept, "saved_model.pb"))
