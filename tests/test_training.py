"""The training pipeline: settings (validated up front), its steps and their extension point,
divergence stop, atomic outputs."""

from __future__ import annotations

import json
import math
import os

import keras
import pytest

from kode.errors import KodeError
from kode.training import TrainingPipeline, TrainSettings, train

FAST = {"epochs": 1, "verbose": 0, "diagnostics": False}


@pytest.mark.parametrize("settings, words", [
    ({"lr": math.nan}, "lr must be a positive finite number"),
    ({"lr": math.inf}, "lr must be a positive finite number"),
    ({"lr": -0.1}, "lr must be a positive finite number"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0"),
    ({"momentum": math.inf}, "momentum must be a finite number >= 0"),
    ({"epochs": 1.5}, "epochs must be a positive integer"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
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
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, settings, words):
    logdir = tmp_path / "run"
    with pytest.raises(KodeError, match=words.replace("(", r"\(")):
        train("resnet20", logdir=str(logdir), **{**FAST, **settings})
    assert not logdir.exists()


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
    from kode.files import write_json

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
