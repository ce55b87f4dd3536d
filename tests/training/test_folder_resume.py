"""Bit-exact resumption on a folder of images: ``kode train --dataset FOLDER`` killed with
SIGKILL in its second epoch and run again ends with the weights and losses of a run that was
never interrupted (the folder variant of tests/training/test_fault_tolerance.py: the file
order, the seeded shuffle of the names and the decoding are the same in every process)."""

from __future__ import annotations

import json
import subprocess

import keras
import numpy as np

from kode.testing.images import write_image_folder
from kode.testing.processes import KODE, run_and_kill_in_epoch_two

EPOCHS = 3


def test_sigkill_on_a_folder_then_rerun_matches_the_uninterrupted_run(tmp_path):
    import kode  # noqa: F401  (registers kode's layers for loading)

    data = str(tmp_path / "data")
    write_image_folder(data, classes=3, per_class=60, size=8)  # 144 train images: 36 steps
    train = ["train", "resnet20", "--option", "depth=8", "--epochs", str(EPOCHS),
             "--batch-size", "4", "--deterministic", "--no-diagnostics", "--seed", "3",
             "--dataset", data, "--image-size", "8"]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    reference, done = run_and_kill_in_epoch_two(train, whole, crashed, poll=0.02,
                                                into_epoch=0.2)
    assert 1 <= done < EPOCHS, done

    resumed = subprocess.run([*KODE, *train, "--logdir", str(crashed)], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done} of {EPOCHS} epochs done" in resumed.stdout
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]
    losses = [json.loads((d / "metrics.json").read_text())["history"]["loss"]
              for d in (whole, crashed)]
    np.testing.assert_array_equal(*losses)
    weights = [keras.saving.load_model(str(d / "model.keras"), compile=False).get_weights()
               for d in (whole, crashed)]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)
