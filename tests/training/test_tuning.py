"""KerasTuner over the zoo: the search space, `kode tune` end to end (trials run by
kode train's pipeline: strategy, precision, guard, resume after a kill), and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras_tuner as kt
import numpy as np
import pytest

from kode.cli import main
from kode.training.search_space import ZooHyperModel
from kode.training.tuning import tune

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    ks = np.concatenate([v.numpy() for v in model.variables if "lm_k" in v.path])
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


def test_family_knowledge_comes_from_the_registrys_integrators():
    from kode.training.search_space import LM_FAMILIES, REVERSIBLE_FAMILIES, TUNABLE_FAMILIES

    assert set(TUNABLE_FAMILIES) == {"resnet", "lm_resnet", "heun_resnet", "momentum_resnet",
                                     "revheun_resnet", "polynet", "fractalnet", "revnet"}
    assert LM_FAMILIES == ("lm_resnet",)  # uses_history
    assert set(REVERSIBLE_FAMILIES) == {"momentum_resnet", "revheun_resnet", "revnet"}  # exact


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
    (["--strategy", "multiworker"], "strategy 'multiworker' is for kode train"),
    (["--strategy", "mirrored", "--devices", "0"], "devices must be a positive integer"),
    (["--guard-tolerance", "-1"], "tolerance"),
    (["--precision", "float8"], "invalid choice: 'float8'"),
])
def test_bad_tune_input_is_a_one_line_error(capsys, tmp_path, args, words):
    assert main(["tune", "resnet", "--logdir", str(tmp_path / "run"), "--export",
                 str(tmp_path / "saved"), *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kode: error:") and words in lines[0]
    assert not os.listdir(tmp_path)  # nothing written


def test_the_python_api_raises_kode_errors_with_the_same_words(tmp_path):
    from kode.errors import KodeError

    with pytest.raises(KodeError, match="strategy 'multiworker' is for kode train"):
        tune("resnet", strategy="multiworker", directory=str(tmp_path / "run"), export_dir=None)
    with pytest.raises(KodeError, match="unknown precision 'float8'"):
        tune("resnet", precision="float8", directory=str(tmp_path / "run"), export_dir=None)
    assert not os.listdir(tmp_path)


TUNE = [sys.executable, "-m", "kode.cli", "tune", "resnet", "--depths", "8"]


def test_kode_tune_trains_under_mirrored_strategy_over_two_devices(tmp_path):
    # Its own process: logical devices must be configured before TensorFlow starts.
    out = subprocess.run([*TUNE, "--max-trials", "1", "--epochs", "1", "--strategy", "mirrored",
                          "--devices", "2", "--logdir", str(tmp_path / "tune"), "--export",
                          str(tmp_path / "saved")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training on 2 device(s): CPU:0, CPU:1" in out.stdout
    trial = json.loads((tmp_path / "tune" / "search" / "trial_0" / "metrics.json").read_text())
    assert trial["config"]["replicas"] == 2 and trial["config"]["strategy"] == "MirroredStrategy"
    assert (tmp_path / "tune" / "search" / "trial_0" / "checkpoints" / "progress.json").is_file()
    assert (tmp_path / "tune" / "best.keras").is_file()
    meta = json.loads((tmp_path / "tune" / "kode.json").read_text())
    assert meta["training"]["replicas"] == 2
    assert (tmp_path / "saved" / "resnet8-tuned" / "1" / "saved_model.pb").is_file()


def _epochs_done(trial_dir) -> int:
    try:
        with open(os.path.join(trial_dir, "checkpoints", "progress.json")) as fh:
            return json.load(fh)["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_a_killed_search_resumes_finished_trials_kept_the_interrupted_one_from_its_epoch(
        tmp_path):
    epochs = 2
    # Batch 16: ~90 steps per epoch, long enough to be killed in the middle of the second.
    command = [*TUNE, "--max-trials", "2", "--epochs", str(epochs), "--batch-size", "16",
               "--no-diagnostics", "--logdir", str(tmp_path / "tune"), "--export",
               str(tmp_path / "saved")]
    first, second = tmp_path / "tune" / "search" / "trial_0", tmp_path / "tune" / "search" / \
        "trial_1"
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=ROOT)
    deadline = time.monotonic() + 240
    while _epochs_done(second) < 1 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim.poll() is None, "the search finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    done = _epochs_done(second)
    assert done == 1 and not (second / "metrics.json").exists()
    finished = (first / "metrics.json").stat().st_mtime_ns
    assert json.loads((first / "trial.json").read_text())["status"] == "COMPLETED"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resuming the search in {tmp_path / 'tune'}: 1 of 2 trials done; interrupted "
            f"trial 1 continues from its checkpoint (1 epochs done)") in resumed.stdout
    assert f"resuming from {second / 'checkpoints'}: 1 of {epochs} epochs done" \
        in resumed.stdout
    assert (first / "metrics.json").stat().st_mtime_ns == finished  # not run again
    assert resumed.stdout.count("Epoch 1/") == 0  # only the interrupted trial's epoch 2 ran
    trial = json.loads((second / "metrics.json").read_text())
    assert trial["config"]["resumed_from_epoch"] == 1
    assert len(trial["history"]["val_accuracy"]) == epochs
    best = json.loads((tmp_path / "tune" / "best_hyperparameters.json").read_text())
    assert best["trial_id"] in ("0", "1")


def test_precision_and_guard_options_reach_the_trial(tmp_path, monkeypatch):
    import keras

    from kode.tools.guard import GradientGuard
    from kode.training.search_space import TrialPipeline, ZooHyperModel

    drawn = ZooHyperModel.hyperparameters

    def adjoint(self, hp):  # the trial draws the adjoint (so the guard runs)
        values = drawn(self, hp)
        values["options"]["gradient"] = "adjoint"
        return values

    guards = []
    callbacks = TrialPipeline.callbacks

    def recorded(self, *args):
        result = callbacks(self, *args)
        guards.extend(c for c in result if isinstance(c, GradientGuard))
        return result

    monkeypatch.setattr(ZooHyperModel, "hyperparameters", adjoint)
    monkeypatch.setattr(TrialPipeline, "callbacks", recorded)
    result = tune("revheun_resnet", max_trials=1, epochs=1, depths=[8],
                  directory=str(tmp_path), export_dir=None, verbose=0,
                  precision="mixed_bfloat16", guard_tolerance=0.5, guard_every=3,
                  on_inaccurate="fallback", diagnostics=False)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    conv = result.model.get_layer("stem_conv")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    assert len(guards) == 1 and guards[0].tolerance == 0.5 and guards[0].every == 3
    trial = json.loads((tmp_path / "search" / "trial_0" / "metrics.json").read_text())
    config = trial["config"]
    assert config["precision"] == "mixed_bfloat16" and config["gradient"] == "adjoint"
    assert config["on_inaccurate"] == "fallback" and config["gradient_guard"]
    assert not (tmp_path / "search" / "trial_0" / "diagnostics").exists()


def test_unknown_family_and_unwritable_logdir(capsys, tmp_path):
    assert main(["tune", "lm_resnext", "--logdir", str(tmp_path)]) == 2
    assert "ImageNet-only" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["tune", "resnet", "--logdir", str(blocker / "x")]) == 2
    assert "not writable" in capsys.readouterr().err
