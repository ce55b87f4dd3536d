"""A training command run twice side by side, one copy killed with SIGKILL in its second
epoch: the fault-tolerance tests' shared set-up (the rerun and the comparison are theirs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

#: ``kode`` as a fresh process.
KODE = [sys.executable, "-m", "kode.cli"]


def epochs_done(logdir) -> int:
    """Epochs a run's snapshots record as finished (0 before the first)."""
    try:
        with open(os.path.join(logdir, "checkpoints", "progress.json")) as fh:
            return json.load(fh)["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def run_and_kill_in_epoch_two(argv: list[str], whole, crashed, *, poll: float,
                              into_epoch: float) -> tuple[subprocess.Popen, int]:
    """Start ``kode argv`` in ``whole`` (left running; returned) and in ``crashed``, kill the
    latter with SIGKILL ``into_epoch`` seconds after its first epoch is recorded; returns the
    uninterrupted run and the crashed run's epochs done."""
    reference = subprocess.Popen([*KODE, *argv, "--logdir", str(whole)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([*KODE, *argv, "--logdir", str(crashed)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while epochs_done(crashed) < 1 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    time.sleep(into_epoch)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    return reference, epochs_done(crashed)
