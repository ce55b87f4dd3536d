"""The training pipeline: settings (validated up front), its steps and their extension point,
divergence stop, atomic outputs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re

import keras
import numpy as np
import pytest

from kode.errors import KodeError
from kode.training.pipeline import TrainingPipeline, train
from kode.training.settings import TrainSettings

FAST = {"epochs": 1, "verbose": 0, "diagnostics": False}


@pytest.mark.parametrize("settings, words", [
    ({"lr": math.nan}, "lr must be a positive finite number"),
    ({"lr": math.inf}, "lr must be a positive finite number"),
    ({"lr": -0.1}, "lr must be a positive finite number"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0"),
    ({"momentum": math.inf}, "momentum must be a finite number >= 0"),
    ({"epochs": 1.5}, "epochs must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be a positive integer"),
    ({"steps_per_epoch": 2.5}, "steps_per_epoch must be a positive integer"),
    ({"model_options": {"step_size": math.inf}}, "step_size must be a finite positive"),
    ({"model_options": {"step_size": 0}}, "step_size must be a finite positive"),
    ({"model_options": {"step_size": "ode", "horizon": 0}}, "horizon must be a finite positive"),
    ({"model_options": {"horizon": -1.0}}, "horizon must be a finite positive"),
    ({"model_options": {"classes": 3}}, "option classes is set by the training pipeline"),
    ({"model_options": {"input_shape": [8, 8, 1]}}, "option input_shape is set by"),
    ({"model_options": {"width_multiplier": "abc"}}, "option width_multiplier takes a finite"),
    ({"model_options": {"widht_multiplier": 2}}, "unknown option 'widht_multiplier'"),
    ({"gradient": "magic"}, "unknown gradient 'magic'"),
    ({"guard_tolerance": math.nan}, "tolerance must be a positive number"),
    ({"jit_compile": "maybe"}, "jit_compile must be one of auto, on, off"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, settings, words):
    logdir = tmp_path / "run"
    with pytest.raises(KodeError, match=words.replace("(", r"\(")):
        train("resnet20", logdir=str(logdir), **{**FAST, **settings})
    assert not logdir.exists()


@pytest.mark.parametrize("settings, words", [
    ({"epochs": "3"}, "epochs must be a positive integer, got '3'"),
    ({"lr": "0.1"}, "lr must be a positive finite number, got '0.1'"),
    ({"batch_size": 1.5}, "batch_size must be a positive integer, got 1.5"),
    ({"seed": "1"}, "seed must be an integer, got '1'"),
    ({"guard_tolerance": "0.1"}, "guard_tolerance must be a number, got '0.1'"),
    ({"resume": "no"}, "resume must be True or False, got 'no'"),
    ({"augment": "yes"}, "augment must be True or False or None, got 'yes'"),
    ({"logdir": 3}, "logdir must be a string or None, got 3"),
    ({"gradient": 1}, "gradient must be a string, got 1"),
    ({"verbose": "x"}, "verbose must be 'auto', 0, 1 or 2, got 'x'"),
    ({"strategy": 3}, "strategy must be a name (default, mirrored, multiworker, tpu) or a "
                      "tf.distribute.Strategy, got 3"),
    ({"model_options": [1]}, "model_options must be a dict of builder arguments, got [1]"),
    ({"model_options": {"step_size": [1]}},
     "step_size must be a finite positive number or 'ode', got [1]"),
    ({"model_options": {"depth": "20"}}, "option depth takes a finite number, got '20'"),
])
def test_wrong_types_name_the_argument_and_what_it_takes(tmp_path, settings, words):
    logdir = settings.get("logdir", str(tmp_path / "run"))
    with pytest.raises(KodeError) as refused:
        train("resnet20", **{**FAST, "logdir": logdir, **settings})
    assert str(refused.value) == words
    assert not (tmp_path / "run").exists()
    if not isinstance(settings.get("model_options"), dict):  # (options: the builder's check)
        with pytest.raises(KodeError, match=re.escape(words)):
            TrainSettings("resnet20", **settings).resolve()


def test_dataset_names_are_case_insensitive():
    assert TrainSettings("resnet20", " Digits").resolve().dataset == "digits"


def test_settings_fill_the_recipe_and_round_trip_as_json():
    settings = TrainSettings("resnet20", "digits", lr=0.01).resolve()
    assert settings.epochs == 30 and settings.lr == 0.01 and settings.batch_size == 64
    again = TrainSettings(**json.loads(json.dumps(settings.to_dict())))
    assert again == settings


def test_the_model_building_step_can_be_replaced_and_everything_else_is_reused(tmp_path):
    built = []

    def small_dense(pipeline, info):  # e.g. a fine-tuning source model with a new head
        assert pipeline.settings.dataset == "digits"
        model = keras.Sequential([keras.Input(info.input_shape), keras.layers.Flatten(),
                                  keras.layers.Dense(info.num_classes, activation="softmax")],
                                 name="small_dense")
        built.append(model)
        return model

    settings = TrainSettings("small_dense", logdir=str(tmp_path), epochs=2, verbose=0,
                             diagnostics=False)
    pipeline = TrainingPipeline(settings, build_model=small_dense)
    pipeline.check_model = lambda: None  # not a zoo name
    result = pipeline.run()
    assert result.model is built[0] and len(result.history["loss"]) == 2
    assert result.test_metrics["accuracy"] > 0.5
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["model"] == "small_dense" and metrics["config"]["lr"] == 0.05
    assert json.loads((tmp_path / "kode.json").read_text())["training"]["epochs"] == 2
    assert os.path.isfile(tmp_path / "checkpoints" / "progress.json")
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_nothing(tmp_path):
    with pytest.raises(KodeError, match=r"training diverged: loss is (nan|inf) at epoch 1, "
                                        r"step \d+; no model was saved or exported"):
        train("resnet20", logdir=str(tmp_path), lr=1e9, model_options={"depth": 8},
              export_dir=str(tmp_path / "exports"), **FAST)
    assert not (tmp_path / "model.keras").exists()
    assert not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").rglob("*.pb"))


def test_metrics_files_are_strict_json_even_with_non_finite_numbers(tmp_path):
    from kode.io import write_json

    write_json(str(tmp_path / "m.json"), {"loss": [1.0, math.nan], "x": math.inf})
    assert json.loads((tmp_path / "m.json").read_text(),
                      parse_constant=lambda c: pytest.fail(c)) == {"loss": [1.0, None],
                                                                    "x": None}
    assert os.listdir(tmp_path) == ["m.json"]


@pytest.mark.parametrize("options", [{"step_size": math.inf}, {"step_size": math.nan},
                                     {"step_size": "ode", "horizon": 0.0},
                                     {"horizon": -1.0}])
def test_the_python_api_refuses_non_finite_step_sizes_and_horizons(options):
    import zoo

    with pytest.raises(KodeError, match="(step_size|horizon) must be a finite positive"):
        zoo.create_model("resnet20", depth=8, input_shape=(8, 8, 1), **options)


def _small_dense(pipeline, info):
    keras.utils.set_random_seed(pipeline.settings.seed)
    return keras.Sequential([keras.Input(info.input_shape), keras.layers.Flatten(),
                             keras.layers.Dense(info.num_classes, activation="softmax")],
                            name="small_dense")


class _Interrupted(Exception):
    pass


class _StopBeforeEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Interrupted  # as a kill after the previous epoch's checkpoint


def _pipeline(settings, stop_before=None):
    pipeline = TrainingPipeline(settings, build_model=_small_dense)
    pipeline.check_model = lambda: None  # not a zoo name
    if stop_before is not None:
        callbacks = pipeline.callbacks
        pipeline.callbacks = lambda: [*callbacks(), _StopBeforeEpoch(stop_before)]
    return pipeline


def test_steps_per_epoch_sets_the_optimizer_steps_the_schedule_and_survives_a_resume(tmp_path):
    """digits, batch 64: a pass is 23 batches. 15 steps per epoch: epoch 2 crosses into the
    second pass, epoch 3 starts at its 8th batch. The learning-rate schedule spans 3·15 steps
    (÷10 at step 22 and 33), and an interrupted run resumed at epoch 3 trains on the same
    batches: it ends with the uninterrupted run's weights."""
    def settings(logdir):
        return TrainSettings("small_dense", epochs=3, batch_size=64, steps_per_epoch=15,
                             lr=0.05, logdir=str(logdir), verbose=0, diagnostics=False)

    whole = _pipeline(settings(tmp_path / "whole")).run()
    assert int(whole.model.optimizer.iterations) == 45
    np.testing.assert_allclose(whole.history["learning_rate"], [0.05, 0.005, 0.0005],
                               rtol=1e-6)
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["config"]["steps_per_epoch"] == 15
    kode_json = json.loads((tmp_path / "whole" / "kode.json").read_text())
    assert kode_json["training"]["steps_per_epoch"] == 15

    with pytest.raises(_Interrupted):
        _pipeline(settings(tmp_path / "cut"), stop_before=2).run()
    progress = json.loads((tmp_path / "cut" / "checkpoints" / "progress.json").read_text())
    assert progress["epoch"] == 2 and progress["fingerprint"]["steps_per_epoch"] == 15
    resumed = _pipeline(settings(tmp_path / "cut")).run()
    assert resumed.config["resumed_from_epoch"] == 2
    assert int(resumed.model.optimizer.iterations) == 45
    assert len(resumed.history["loss"]) == 3
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=1e-6)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Another steps_per_epoch is another run: its checkpoints are not mixed in.
    other = dataclasses.replace(settings(tmp_path / "cut"), steps_per_epoch=16)
    with pytest.raises(KodeError, match="different run.*steps_per_epoch"):
        _pipeline(other).run()


def test_the_stream_resumed_at_epoch_k_is_the_uninterrupted_stream_from_batch_k_times_n(
        tmp_path):
    """What the resume above relies on, batch by batch: the passes already trained through are
    skipped (each reshuffled), then the batches of the current pass."""
    def labels(initial_epoch, count):
        pipeline = _pipeline(TrainSettings("small_dense", batch_size=64, steps_per_epoch=15,
                                           logdir=str(tmp_path), verbose=0))
        pipeline.prepare()
        pipeline.load_data()
        pipeline.initial_epoch = initial_epoch
        return [y.numpy().tolist() for _, y in pipeline.train_stream().take(count)]

    whole = labels(0, 60)
    assert whole[:23] != whole[23:46]  # each pass is shuffled anew
    for epoch in (1, 2, 3):
        assert labels(epoch, 15) == whole[15 * epoch:15 * (epoch + 1)], epoch


def test_the_custom_loop_takes_steps_per_epoch_from_the_stream_of_passes():
    """fit_distributed (the multi-worker loop), default strategy: N optimizer steps per epoch,
    epochs continue the stream, and a resumed loop starts where the stream left off."""
    import tensorflow as tf

    from kode.training.custom_loop import _stream, fit_distributed

    def batches():  # a new dataset (its own shuffle seed generator), as in a new process
        data = tf.data.Dataset.range(10).shuffle(10, seed=1, reshuffle_each_iteration=True)
        return data.map(lambda i: (tf.fill([4], tf.cast(i, tf.float32)), i % 3)).batch(4)

    def labels(start, count):
        dataset = batches()
        stream = _stream(strategy.experimental_distribute_dataset(dataset), dataset, start)
        return [y.numpy().tolist() for _, y in itertools.islice(stream, count)]

    strategy = tf.distribute.get_strategy()
    whole = labels(0, 9)  # passes of 3 batches (4, 4, 2 examples)
    assert whole[:3] != whole[3:6]
    for start in (2, 3, 4, 7):
        assert labels(start, 2) == whole[start:start + 2], start
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    history = fit_distributed(model, batches(), epochs=3, strategy=strategy, initial_epoch=1,
                              steps_per_epoch=4)
    assert int(model.optimizer.iterations) == 8 and len(history["loss"]) == 2


@pytest.mark.parametrize("argv, modes", [
    ([], {"adjoint"}),
    (["--no-recompute"], {"backprop"}),
])
def test_no_recompute_leaves_the_transitions_backpropagating(argv, modes, tmp_path):
    """`kode train … --gradient adjoint [--no-recompute]`: the setting reaches the model the
    pipeline builds (the stages stay adjoint) and the resume fingerprint."""
    from kode.cli import build_parser, train_settings
    from kode.data.datasets import dataset_info
    from kode.layers import integrator_stages, recomputable_layers

    args = build_parser().parse_args(["train", "revheun_resnet20", "--gradient", "adjoint",
                                      "--logdir", str(tmp_path), *argv])
    pipeline = TrainingPipeline(train_settings(args))
    pipeline.settings = settings = pipeline.requested.resolve()
    assert settings.recompute == (not argv)
    assert ("recompute" in settings.fingerprint()) == bool(argv)
    model = pipeline.build_model(dataset_info("digits"))
    assert {layer.gradient for layer in recomputable_layers(model)} == modes
    assert {stage.gradient for stage in integrator_stages(model)} == {"adjoint"}


@pytest.mark.parametrize("decay_lm_k", [False, True])
def test_weight_decay_skips_lm_k_unless_asked(decay_lm_k):
    # Zero gradients, no momentum: a step moves a variable only by decoupled weight decay,
    # v ← v − lr·wd·v. The stage's (K,) k vector is spared by default (decay_lm_k=False), as
    # the per-step scalars were; the convolution kernels always decay.
    import zoo
    from kode.training.pipeline import make_optimizer

    model = zoo.create_model("lm_resnet20", depth=20, input_shape=(8, 8, 1), classes=10)
    optimizer = make_optimizer(0.5, 0.0, 0.1, decay_lm_k=decay_lm_k)
    variables = model.trainable_variables
    before = {v.path: v.numpy().copy() for v in variables}
    optimizer.apply_gradients([(np.zeros(v.shape, "float32"), v) for v in variables])
    ks = [v for v in variables if "lm_k" in v.path]
    assert [v.shape for v in ks] == [(2,)] * 3
    for v in ks:
        want = before[v.path] * (1 - 0.5 * 0.1) if decay_lm_k else before[v.path]
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-6, err_msg=v.path)
    kernel = next(v for v in variables if "kernel" in v.path)
    np.testing.assert_allclose(kernel.numpy(), before[kernel.path] * 0.95, rtol=1e-6)


@pytest.mark.parametrize("choice, gradient, accelerator, distributed, want", [
    ("auto", "backprop", True, False, True),      # Keras' auto: XLA on a GPU/TPU
    ("auto", "backprop", False, False, False),    # not on a CPU-only machine
    ("auto", "backprop", True, True, False),      # nor under a tf.distribute strategy
    ("auto", "adjoint", True, False, False),      # XLA undoes the memory saving
    ("auto", "checkpoint", True, False, False),
    ("on", "adjoint", False, True, True), (True, "backprop", False, False, True),
    ("off", "backprop", True, False, False), (False, "backprop", True, False, False),
])
def test_jit_compile_auto_is_keras_rule_but_keeps_memory_saving_modes_off_xla(
        choice, gradient, accelerator, distributed, want):
    from kode.training.settings import use_xla

    assert use_xla(choice, gradient, accelerator, distributed) is want


def test_jit_compile_reaches_the_compiled_model_and_the_run_record(tmp_path):
    """`--jit-compile on` on this CPU: the train step is compiled with XLA (the model's
    jit_compile) and metrics.json records the choice; the default "auto" is off here."""
    from kode.cli import main

    result = train("resnet20", "digits", steps_per_epoch=1, batch_size=8,
                   model_options={"depth": 8}, logdir=str(tmp_path / "on"), jit_compile="on",
                   **FAST)
    assert result.model.jit_compile is True and result.config["jit_compile"] == "on"
    assert main(["train", "resnet20", "--option", "depth=8", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--no-diagnostics",
                 "--logdir", str(tmp_path / "auto")]) == 0
    record = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert record["config"]["jit_compile"] == "auto"
