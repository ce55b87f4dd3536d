"""Fault tolerance: atomic epoch checkpoints and automatic, bit-exact resumption.

The end-to-end test kills ``kode train`` with SIGKILL in the middle of its second epoch, runs the
same command again, and requires the resumed run to end with the same weights as a run that was
never interrupted (deterministic ops on), i.e. model, optimizer, random-generator states *and*
the data pipeline's per-epoch shuffle were all restored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import zoo
from kode.distribute import EpochCheckpoint
from kode.errors import KodeError

KODE = [sys.executable, "-m", "kode.cli"]
EPOCHS = 3
# Batch 16: ~90 steps per epoch, so an epoch lasts long enough to be killed in the middle.
TRAIN = ["train", "resnet20", "--option", "depth=8", "--epochs", str(EPOCHS), "--batch-size",
         "16", "--deterministic", "--no-diagnostics", "--seed", "3"]


def _progress(logdir) -> int:
    try:
        with open(os.path.join(logdir, "checkpoints", "progress.json")) as fh:
            return json.load(fh)["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _weights(logdir) -> list[np.ndarray]:
    import kode  # noqa: F401  (registers kode's layers for loading)

    return keras.saving.load_model(os.path.join(logdir, "model.keras"), compile=False)\
        .get_weights()


def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_uninterrupted_run(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    reference = subprocess.Popen([*KODE, *TRAIN, "--logdir", str(whole)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*KODE, *TRAIN, "--logdir", str(crashed)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _progress(crashed) < 1 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    done = _progress(crashed)
    assert 1 <= done < EPOCHS, done
    assert not (crashed / "metrics.json").exists()

    resumed = subprocess.run([*KODE, *TRAIN, "--logdir", str(crashed)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {crashed / 'checkpoints'}: {done} of {EPOCHS} epochs done" \
        in resumed.stdout
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    metrics = json.loads((crashed / "metrics.json").read_text())
    assert metrics["config"]["resumed_from_epoch"] == done
    assert len(metrics["history"]["loss"]) == EPOCHS  # restored epochs + resumed ones
    whole_metrics = json.loads((whole / "metrics.json").read_text())
    np.testing.assert_array_equal(metrics["history"]["loss"], whole_metrics["history"]["loss"])
    for a, b in zip(_weights(whole), _weights(crashed), strict=True):
        np.testing.assert_array_equal(a, b)


def _model():
    model = zoo.create_model("lm_resnet20", depth=8, input_shape=(8, 8, 1))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=False)
    return model


def _step(model, seed):
    rng = np.random.default_rng(seed)
    model.train_on_batch(rng.standard_normal((8, 8, 8, 1)).astype("float32"), np.arange(8))


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    model = _model()
    _step(model, 0)
    checkpoint = EpochCheckpoint(str(tmp_path), model, {"run": 1})
    checkpoint.save(1, {"loss": 1.0})
    saved = [np.array(v) for v in model.variables + model.optimizer.variables]
    _step(model, 1)
    # A crash after the manager wrote (part of) ckpt-2 but before progress.json was replaced:
    (tmp_path / "ckpt-2.index").write_bytes(b"torn")
    (tmp_path / "ckpt-2.data-00000-of-00001").write_bytes(b"")
    assert not any(p.name.startswith(".progress-") for p in tmp_path.iterdir())

    fresh = _model()
    restored = EpochCheckpoint(str(tmp_path), fresh, {"run": 1})
    assert restored.restore() == 1
    assert restored.history == {"loss": [1.0]}
    now = [np.array(v) for v in fresh.variables + fresh.optimizer.variables]
    assert len(now) == len(saved)
    for a, b in zip(saved, now, strict=True):
        np.testing.assert_array_equal(a, b)  # includes lm_k, BN statistics, optimizer slots


def test_checkpoints_of_another_run_are_refused(tmp_path):
    model = _model()
    EpochCheckpoint(str(tmp_path), model, {"epochs": 3}).save(1)
    with pytest.raises(KodeError, match="different run.*epochs"):
        EpochCheckpoint(str(tmp_path), _model(), {"epochs": 5}).restore()
