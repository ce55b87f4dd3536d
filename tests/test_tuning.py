"""KerasTuner over the zoo: the search space, `kode tune` end to end, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import keras_tuner as kt
import numpy as np
import pytest

from kode.cli import main
from kode.training.tuning import ZooHyperModel, tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hypermodel(families):
    return ZooHyperModel(families, (8, 8, 1), 10, steps_per_epoch=5, epochs=1, depths=[8, 14])


def test_search_space_reaches_the_builder():
    hp = kt.HyperParameters()
    hp.Fixed("depth", 14)
    hp.Fixed("lm_k_init", "0,0.5")
    hp.Fixed("final_survival_probability", 0.5)
    hp.Fixed("step_size", "ode")
    hp.Fixed("width_multiplier", 0.5)
    model = _hypermodel("lm_resnet").build(hp)
    ks = [float(v.numpy()) for v in model.variables if "lm_k" in v.path]
    assert len(ks) == 3 and all(0.0 <= k <= 0.5 for k in ks)  # k_init_range (0, 0.5)
    assert any(type(la).__name__ == "StochasticDepth" for la in model._flatten_layers())
    stages = [la for la in model._flatten_layers() if hasattr(la, "dynamics")]
    assert stages[0].h == pytest.approx(1 / stages[0].num_steps)  # "ode": h = 1/N
    assert model.get_layer("stem_conv").filters == 8  # width 16 × 0.5


def test_adjoint_is_offered_to_exactly_reversible_families_only():
    hp = kt.HyperParameters()
    _hypermodel(["resnet", "revheun_resnet"]).hyperparameters(hp)
    assert hp.get("family") in ("resnet", "revheun_resnet")
    names = {p.name: p for p in hp.space}
    assert "adjoint" not in names["gradient"].values
    assert "adjoint" in names["gradient_reversible"].values
    assert "lm_k_init" not in names  # no LM family searched


def test_kode_tune_writes_trials_per_trial_tensorboard_and_an_export(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kode.cli", "tune", "resnet,revheun_resnet", "--max-trials", "2",
         "--epochs", "1", "--depths", "8", "--logdir", str(tmp_path / "tune"),
         "--export", str(tmp_path / "saved")],
        capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best hyper-parameters:" in out.stdout
    best = json.loads((tmp_path / "tune" / "best_hyperparameters.json").read_text())
    assert best["hyperparameters"]["depth"] == 8 and 0 <= best["val_accuracy"] <= 1
    trials = sorted(os.listdir(tmp_path / "tune" / "tensorboard"))
    assert len(trials) == 2
    for trial in trials:
        events = [f for _, _, fs in os.walk(tmp_path / "tune" / "tensorboard" / trial)
                  for f in fs if "tfevents" in f]
        assert events, f"trial {trial} has no TensorBoard events"
    name = f"{best['hyperparameters']['family']}8-tuned"
    version = tmp_path / "saved" / name / "1"
    assert (version / "saved_model.pb").is_file()
    meta = json.loads((version / "assets.extra" / "kode.json").read_text())
    assert meta["hyperparameters"] == best["hyperparameters"]
    assert meta["num_classes"] == 10 and meta["input_shape"] == [8, 8, 1]


@pytest.mark.parametrize("kind", ["bayesian", "hyperband"])
def test_bayesian_and_hyperband_run_a_tiny_search(tmp_path, kind):
    result = tune("resnet", tuner=kind, max_trials=2, epochs=2 if kind == "hyperband" else 1,
                  depths=[8], directory=str(tmp_path), export_dir=None, verbose=0)
    assert 0 <= result.best_score <= 1 and np.isfinite(result.test_metrics["loss"])
    assert os.path.isfile(result.model_path)


@pytest.mark.parametrize("args, words", [
    (["--max-trials", "0"], "max_trials must be a positive integer"),
    (["--tuner", "hyperband", "--epochs", "1"], "epochs >= 2"),
    (["--depths", "9"], "6n+2"),
])
def test_bad_tune_input_is_a_one_line_error(capsys, tmp_path, args, words):
    assert main(["tune", "resnet", "--logdir", str(tmp_path), *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kode: error:") and words in lines[0]


def test_unknown_family_and_unwritable_logdir(capsys, tmp_path):
    assert main(["tune", "lm_resnext", "--logdir", str(tmp_path)]) == 2
    assert "ImageNet-only" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["tune", "resnet", "--logdir", str(blocker / "x")]) == 2
    assert "not writable" in capsys.readouterr().err
