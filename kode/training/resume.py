"""Resuming an interrupted run: durable end-of-epoch snapshots of a model and its optimizer.

Words: a *snapshot* is what a run saves after each epoch to resume from (the files are
TensorFlow checkpoints, ``<logdir>/checkpoints/ckpt-<epoch>``); "checkpoint" alone, in kode,
is the gradient mode that recomputes a stage's states from stored ones.

Snapshots (:class:`EpochSnapshots`): every variable of the model and the optimizer is saved
with ``tf.train.CheckpointManager`` after each epoch, its files are fsync'ed, then a small
``progress.json`` (epoch, checkpoint name, the previous checkpoint, history so far, run
fingerprint) is replaced atomically. The JSON is the commit point: a crash during a save leaves
the previous JSON pointing at complete, durable checkpoints (the manager keeps three, so both
checkpoints a committed JSON names survive until the next commit). A newest checkpoint that
cannot be read (truncated, corrupt) is reported and the run resumes from the previous one; a
``progress.json`` that is missing while checkpoints exist, malformed, or ahead of the run is a
one-line error, never a silent restart that would overwrite completed epochs. A failed save
(full disk) removes its partial files and stops with one line. The variables are saved as a
flat, ordered collection and the fingerprint checks the order on restore.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError, one_line
from kode.io import fsync_dir, fsync_file, write_error, write_json


def skip_epochs(dataset: Iterable, epochs: int) -> None:
    """Advance a reshuffling dataset by ``epochs`` epochs without reading it.

    ``shuffle(seed=s, reshuffle_each_iteration=True)`` (and ``Dataset.random`` with
    ``rerandomize_each_iteration``) draw the order of an epoch when an iterator is *created*,
    from a seed generator owned by the dataset. A resumed run must therefore create as many
    iterators as the interrupted one did, or epoch k would see epoch 0's order again.
    """
    for _ in range(epochs):
        iterator = iter(dataset)
        del iterator


def _variable_signature(variables: Sequence) -> list[str]:
    # Shapes and dtypes in order, not paths: Keras uniquifies names per process ("sgd_1"),
    # so the same model built twice in one process has other paths but the same layout.
    return [f"{tuple(v.shape)}:{v.dtype}" for v in variables]


class EpochSnapshots:
    """Atomic end-of-epoch checkpoints of a model and its optimizer, and their restoration.

    ``fingerprint`` (JSON-able) describes the run; restoring a directory written by a run
    with another fingerprint fails instead of silently mixing two runs.
    """

    PROGRESS = "progress.json"
    #: How to start over, in the words of both entry points.
    START_OVER = "start over with --no-resume (kode.train: resume=False) or another log directory"

    def __init__(self, directory: str, model: keras.Model, fingerprint: dict,
                 max_to_keep: int = 3, log=print):
        if model.optimizer is None:
            raise KodeError("compile the model before creating its checkpoint")
        if max_to_keep < 3:
            # Saving N deletes N - max_to_keep while progress.json still names N-1 and N-2.
            raise ValueError("max_to_keep must be >= 3 (the committed and previous checkpoints "
                             "must survive the next save)")
        self.directory, self.model, self.log = directory, model, log
        os.makedirs(directory, exist_ok=True)
        optimizer = model.optimizer
        if not optimizer.built:
            # Build now so that restore() has the slot variables to fill (fit would build
            # them lazily, after the restore).
            with model.distribute_strategy.scope():
                optimizer.build(model.trainable_variables)
        self.model_variables = list(model.variables)
        self.optimizer_variables = list(optimizer.variables)
        signature = _variable_signature(self.model_variables + self.optimizer_variables)
        self.fingerprint = {
            **fingerprint,
            "variables": hashlib.sha256("\n".join(signature).encode()).hexdigest()[:16],
        }
        self._checkpoint = tf.train.Checkpoint(
            model_variables={f"v{i:05d}": v for i, v in enumerate(self.model_variables)},
            optimizer_variables={f"v{i:05d}": v for i, v in enumerate(self.optimizer_variables)},
        )
        self._manager = tf.train.CheckpointManager(self._checkpoint, directory,
                                                   max_to_keep=max_to_keep)
        self.history: dict[str, list[float]] = {}
        self.committed: dict | None = None  # the last progress record written or restored

    @property
    def progress_path(self) -> str:
        return os.path.join(self.directory, self.PROGRESS)

    def _checkpoint_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.directory, "ckpt-*.index")))

    def read_progress(self) -> dict | None:
        """The committed progress record, None if there is none (and no checkpoint either)."""
        try:
            with open(self.progress_path) as fh:
                progress = json.load(fh)
        except FileNotFoundError:
            if self._checkpoint_files():
                raise KodeError(f"{self.directory} holds checkpoints but no {self.PROGRESS} "
                                f"(the record of completed epochs); {self.START_OVER}") from None
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else \
                type(err).__name__
            raise KodeError(f"checkpoint progress file {self.progress_path} is unreadable "
                            f"({reason}); {self.START_OVER}") from None
        problem = _progress_problem(progress)
        if problem:
            raise KodeError(f"checkpoint progress file {self.progress_path} is not a kode "
                            f"progress record ({problem}); {self.START_OVER}")
        return progress

    def restore(self, total_epochs: int | None = None) -> int:
        """Restore the last completed epoch; returns the number of completed epochs (0: none).

        ``total_epochs``: the run's length; a record of more completed epochs is refused.
        An unreadable newest checkpoint falls back to the previous one (and says so).
        """
        progress = self.read_progress()
        if progress is None:
            return 0
        if progress.get("fingerprint") != self.fingerprint:
            theirs = progress.get("fingerprint", {})
            diff = sorted(k for k in set(theirs) | set(self.fingerprint)
                          if theirs.get(k) != self.fingerprint.get(k))
            raise KodeError(f"{self.directory} holds checkpoints of a different run (differs "
                            f"in {', '.join(diff)}); {self.START_OVER}")
        epoch = progress["epoch"]
        if total_epochs is not None and epoch > total_epochs:
            raise KodeError(f"{self.progress_path} records {epoch} completed epochs, more than "
                            f"the {total_epochs} requested; {self.START_OVER}")
        candidates = [(epoch, progress["checkpoint"])]
        previous = progress.get("previous")
        if previous:
            candidates.append((previous["epoch"], previous["checkpoint"]))
        failures = []
        for done, name in candidates:
            path = os.path.join(self.directory, name)
            try:
                self._checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as err:  # a torn file raises IndexError, DataLossError, ...
                failures.append(f"{name}: {one_line(err)}")
                continue
            if done != epoch:
                self.log(f"kode: checkpoint {progress['checkpoint']} is unreadable "
                         f"({failures[0].split(': ', 1)[1]}); resuming from the previous one, "
                         f"{name} ({done} epochs done)")
            self.history = {k: list(v)[:done] for k, v in progress["history"].items()}
            self.committed = {"epoch": done, "checkpoint": name}
            return done
        raise KodeError(f"cannot restore any checkpoint in {self.directory} "
                        f"({'; '.join(failures)}); {self.START_OVER}")

    def save(self, epochs_done: int, logs: dict | None = None) -> str:
        """Save after ``epochs_done`` completed epochs: the checkpoint's files are made durable,
        then ``progress.json`` is committed (naming this and the previous checkpoint)."""
        history = {k: list(v) for k, v in self.history.items()}
        for key, value in (logs or {}).items():
            if np.ndim(value) == 0:
                history.setdefault(key, []).append(float(value))
        try:
            path = self._manager.save(checkpoint_number=epochs_done)
            for file in glob.glob(glob.escape(path) + ".*"):
                fsync_file(file)
            fsync_dir(self.directory)
        except Exception as err:
            self._remove_partial(epochs_done)
            if isinstance(err, OSError | tf.errors.OpError):
                raise write_error(os.path.join(self.directory, f"ckpt-{epochs_done}"), err) \
                    from None
            raise
        record = {"epoch": epochs_done, "checkpoint": os.path.basename(path)}
        write_json(self.progress_path, {
            **record, "previous": self.committed, "history": history,
            "fingerprint": self.fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1)
        self.history, self.committed = history, record
        return path

    def _remove_partial(self, number: int) -> None:
        """Remove what a failed save of checkpoint ``number`` left (never a committed one)."""
        prefix = os.path.join(self.directory, f"ckpt-{number}")
        for leftover in glob.glob(glob.escape(prefix) + "[._]*"):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(leftover)

    def merged_history(self, history: dict) -> dict:
        """The history of the whole run: restored epochs, then ``history``'s new ones."""
        if not self.history:
            return dict(history)
        return {k: list(v) for k, v in self.history.items()}


def _progress_problem(progress) -> str | None:
    """What makes ``progress`` (parsed progress.json) unusable, or None."""
    if not isinstance(progress, dict):
        kinds = {type(None): "null", list: "an array", str: "a string", bool: "a boolean",
                 int: "a number", float: "a number"}
        return f"{kinds.get(type(progress), type(progress).__name__)} instead of an object"
    epoch = progress.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return f"'epoch' must be a positive integer, got {epoch!r}"
    checkpoint = progress.get("checkpoint")
    if not isinstance(checkpoint, str) or os.path.basename(checkpoint) != checkpoint \
            or not checkpoint:
        return f"'checkpoint' must be a checkpoint name, got {checkpoint!r}"
    history = progress.get("history")
    if not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values()):
        return "'history' must map metric names to lists"
    if not isinstance(progress.get("fingerprint"), dict):
        return "'fingerprint' must be an object"
    previous = progress.get("previous")
    if previous is not None and not (
            isinstance(previous, dict) and isinstance(previous.get("checkpoint"), str)
            and isinstance(previous.get("epoch"), int) and 0 < previous["epoch"] < epoch):
        return f"'previous' must be null or an earlier checkpoint, got {previous!r}"
    return None


class SnapshotCallback(keras.callbacks.Callback):
    """Saves an :class:`EpochSnapshots` at the end of every epoch (put it last, so that the
    other callbacks' additions to ``logs`` are recorded in the history)."""

    def __init__(self, checkpoint: EpochSnapshots):
        super().__init__()
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoint.save(epoch + 1, logs)
