"""Run folders: made one level at a time, removed again only while empty.

Several processes share a run folder (the workers of a multi-worker run write below the
chief's), so a process removes only folders it made itself, and never a file.
"""

from __future__ import annotations

import contextlib
import os

from kode.errors import KodeError


def prepare_logdir(logdir: str) -> list[str]:
    """Create ``logdir`` (and check it is writable); returns the directories this call made,
    deepest first (to remove again if the run fails before writing anything).

    One ``mkdir`` per level: only a directory this process made is listed, so a failing
    worker never removes the folder its chief is about to write to."""
    missing = []
    parent = os.path.abspath(logdir)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created = []
    try:
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
                created.append(directory)
            except FileExistsError:
                pass  # another worker of the same run made it
        probe = os.path.join(logdir, f".kode-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        remove_if_empty(created[::-1])
        raise KodeError(f"log directory '{logdir}' is not writable: {err.strerror}") from None
    return created[::-1]


def remove_if_empty(directories: list[str] | None) -> None:
    """Remove those of ``directories`` (deepest first) that are empty: a failed run leaves no
    empty run folder, and never removes a file or a folder another process filled."""
    for directory in directories or []:
        for inner, _, _ in os.walk(directory, topdown=False):
            with contextlib.suppress(OSError):  # not empty: it stays
                os.rmdir(inner)
        if os.path.exists(directory):
            return
