"""Fault tolerance: atomic epoch checkpoints and automatic, bit-exact resumption.

The end-to-end test kills ``kode train`` with SIGKILL in the middle of its second epoch, runs the
same command again, and requires the resumed run to end with the same weights as a run that was
never interrupted (deterministic ops on), i.e. model, optimizer, random-generator states *and*
the data pipeline's per-epoch shuffle were all restored.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import keras
import numpy as np
import pytest

import zoo
from kode.errors import KodeError
from kode.testing.processes import KODE, run_and_kill_in_epoch_two
from kode.training.resume import EpochSnapshots

EPOCHS = 3
# Batch 16: ~90 steps per epoch, so an epoch lasts long enough to be killed in the middle.
TRAIN = ["train", "resnet20", "--option", "depth=8", "--epochs", str(EPOCHS), "--batch-size",
         "16", "--deterministic", "--no-diagnostics", "--seed", "3"]


def _weights(logdir) -> list[np.ndarray]:
    import kode  # noqa: F401  (registers kode's layers for loading)

    return keras.saving.load_model(os.path.join(logdir, "model.keras"), compile=False)\
        .get_weights()


def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_uninterrupted_run(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    reference, done = run_and_kill_in_epoch_two(TRAIN, whole, crashed, poll=0.05,
                                                into_epoch=0.5)
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
    checkpoint = EpochSnapshots(str(tmp_path), model, {"run": 1})
    checkpoint.save(1, {"loss": 1.0})
    saved = [np.array(v) for v in model.variables + model.optimizer.variables]
    _step(model, 1)
    # A crash after the manager wrote (part of) ckpt-2 but before progress.json was replaced:
    (tmp_path / "ckpt-2.index").write_bytes(b"torn")
    (tmp_path / "ckpt-2.data-00000-of-00001").write_bytes(b"")
    assert not any(p.name.startswith(".progress-") for p in tmp_path.iterdir())

    fresh = _model()
    restored = EpochSnapshots(str(tmp_path), fresh, {"run": 1})
    assert restored.restore() == 1
    assert restored.history == {"loss": [1.0]}
    now = [np.array(v) for v in fresh.variables + fresh.optimizer.variables]
    assert len(now) == len(saved)
    for a, b in zip(saved, now, strict=True):
        np.testing.assert_array_equal(a, b)  # includes lm_k, BN statistics, optimizer slots


def test_checkpoints_of_another_run_are_refused(tmp_path):
    model = _model()
    EpochSnapshots(str(tmp_path), model, {"epochs": 3}).save(1)
    with pytest.raises(KodeError, match="different run.*epochs"):
        EpochSnapshots(str(tmp_path), _model(), {"epochs": 5}).restore()


def _saved_run(directory, epochs=2):
    """A checkpoint directory with ``epochs`` committed epochs; returns the variables after
    each epoch."""
    model = _model()
    checkpoint = EpochSnapshots(str(directory), model, {"run": 1})
    states = []
    for epoch in range(1, epochs + 1):
        _step(model, epoch)
        checkpoint.save(epoch, {"loss": float(epoch)})
        states.append([np.array(v) for v in model.variables + model.optimizer.variables])
    return states


def _restored(directory, **kwargs):
    fresh = _model()
    messages = []
    checkpoint = EpochSnapshots(str(directory), fresh, {"run": 1}, log=messages.append)
    done = checkpoint.restore(**kwargs)
    return done, checkpoint, [np.array(v) for v in fresh.variables + fresh.optimizer.variables], \
        messages


def test_a_truncated_newest_checkpoint_resumes_from_the_previous_one_and_says_so(tmp_path):
    states = _saved_run(tmp_path, epochs=2)
    data = tmp_path / "ckpt-2.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # torn after the commit
    done, checkpoint, now, messages = _restored(tmp_path)
    assert done == 1 and checkpoint.history == {"loss": [1.0]}
    assert len(messages) == 1 and "ckpt-2 is unreadable" in messages[0] \
        and "resuming from the previous one, ckpt-1 (1 epochs done)" in messages[0]
    for a, b in zip(states[0], now, strict=True):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_files_are_durable_before_the_commit_and_the_previous_one_is_kept(
        tmp_path, monkeypatch):
    import kode.training.resume as distribute

    _saved_run(tmp_path, epochs=2)
    events = []
    real_fsync, real_write_json = distribute.fsync_file, distribute.write_json

    def fsync_file(path):
        events.append(("fsync", os.path.basename(path)))
        real_fsync(path)

    def write_json(path, payload, **kwargs):
        # At the commit of epoch 3, the two checkpoints the old record names still exist.
        names = set(os.listdir(tmp_path))
        events.append(("commit", "ckpt-1.index" in names and "ckpt-2.index" in names))
        real_write_json(path, payload, **kwargs)

    monkeypatch.setattr(distribute, "fsync_file", fsync_file)
    monkeypatch.setattr(distribute, "write_json", write_json)
    model = _model()
    checkpoint = EpochSnapshots(str(tmp_path), model, {"run": 1})
    assert checkpoint.restore() == 2
    checkpoint.save(3, {"loss": 3.0})
    synced = {name for kind, name in events if kind == "fsync"}
    assert {"ckpt-3.index", "ckpt-3.data-00000-of-00001"} <= synced
    assert events[-1] == ("commit", True)
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["previous"] == {"epoch": 2, "checkpoint": "ckpt-2"}


@pytest.mark.parametrize("content, words", [
    (None, "holds checkpoints but no progress.json"),
    ("null", "not a kode progress record (null instead of an object"),
    ("[1, 2]", "not a kode progress record (an array instead of an object"),
    ('{"epoch": "two", "checkpoint": "ckpt-2"}', "'epoch' must be a positive integer"),
    ("{\"epoch\": 2", "is unreadable (JSONDecodeError)"),
])
def test_a_missing_or_malformed_progress_file_is_one_line_never_a_restart(tmp_path, content,
                                                                          words):
    _saved_run(tmp_path, epochs=2)
    if content is None:
        (tmp_path / "progress.json").unlink()
    else:
        (tmp_path / "progress.json").write_text(content)
    with pytest.raises(KodeError, match=re.escape(words)) as raised:
        _restored(tmp_path)
    assert "--no-resume" in str(raised.value) and "\n" not in str(raised.value)
    assert (tmp_path / "ckpt-2.index").exists()  # nothing was removed or overwritten


def test_a_record_of_more_epochs_than_requested_is_refused(tmp_path):
    _saved_run(tmp_path, epochs=2)
    with pytest.raises(KodeError, match="records 2 completed epochs, more than the 1 requested"):
        _restored(tmp_path, total_epochs=1)


@pytest.mark.parametrize("failure", ["fsync", "tensorflow"])
def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_nothing_partial(
        tmp_path, monkeypatch, failure):
    import errno

    import tensorflow as tf

    import kode.training.resume as distribute

    _saved_run(tmp_path, epochs=1)
    model = _model()
    checkpoint = EpochSnapshots(str(tmp_path), model, {"run": 1})
    assert checkpoint.restore() == 1
    if failure == "fsync":  # the kernel reports ENOSPC when the data is flushed
        def no_space(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(distribute, "fsync_file", no_space)
    else:  # TensorFlow's writer fails half-way through the data file
        real_save = checkpoint._manager.save

        def torn_save(checkpoint_number):
            path = real_save(checkpoint_number=checkpoint_number)
            data = f"{path}.data-00000-of-00001"
            with open(data, "r+b") as fh:
                fh.truncate(os.path.getsize(data) // 2)
            raise tf.errors.ResourceExhaustedError(None, None, f"{data}; No space left on device")
        monkeypatch.setattr(checkpoint._manager, "save", torn_save)
    with pytest.raises(KodeError, match="could not write .*ckpt-2: no space left on the device"):
        checkpoint.save(2, {"loss": 2.0})
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ckpt-2")]
    assert json.loads((tmp_path / "progress.json").read_text())["epoch"] == 1
    monkeypatch.undo()
    assert _restored(tmp_path)[0] == 1
