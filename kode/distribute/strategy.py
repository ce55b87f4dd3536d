"""Scaling out: ``tf.distribute`` strategies, the multi-worker training loop, and fault-tolerant
epoch checkpoints.

Strategies (``make_strategy``):

- ``default``: one device, ``tf.distribute.get_strategy()``.
- ``mirrored``: ``MirroredStrategy`` over the GPUs, or over ``devices`` logical CPU devices
  (:func:`configure_cpu_devices`; must run before TensorFlow initializes its devices).
  Trained with ``model.fit``.
- ``multiworker``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``. Keras 3.15's
  ``model.fit`` fails under it even for a Dense model (``ValueError: Attempt to convert a value
  (PerReplica:{...}) with an unsupported type (...PerReplica) to a Tensor``, keras#20585), so
  kode trains with its own loop around ``strategy.run`` (:func:`fit_distributed`). Before the
  strategy is created every peer is probed with a TCP connect (bounded by ``connect_timeout``)
  so that a typo in ``TF_CONFIG`` fails with a message instead of hanging in gRPC retries.
- ``tpu``: ``TPUStrategy`` through ``TPUClusterResolver``. Untested here (no TPU); without a
  TPU it fails at once: ``TPUClusterResolver("local")`` and unreachable TPU addresses otherwise
  block in connection retries, so the TPU is looked for first.

Checkpoints (:class:`EpochCheckpoint`): every variable of the model and the optimizer is saved
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
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from kode.errors import KodeError
from kode.files import fsync_dir, fsync_file, write_error, write_json

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DEFAULT_CONNECT_TIMEOUT = 60.0

# --------------------------------------------------------------------------- devices

#: C++ log lines TensorFlow prints on a machine without a (usable) GPU: noise before kode's
#: own messages; the device line of :func:`describe_devices` says the same in one line.
_NO_GPU_NOISE = ("cuInit", "cuda_platform", "cudart_stub", "Could not find cuda drivers",
                 "TF-TRT Warning", "Unable to register cu")


def discover_devices_quietly() -> list:
    """``tf.config.list_physical_devices()`` with the C++ start-up lines of a machine without
    GPU (``E0000 ... failed call to cuInit``) filtered from stderr; other lines pass through.

    The first device query initializes the CUDA platform, which logs from C++ straight to
    fd 2; call this before anything else queries devices (safe before logical-device and
    collective configuration).
    """
    try:
        saved = os.dup(2)
    except OSError:
        return tf.config.list_physical_devices()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            devices = tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        lines = capture.read().decode(errors="replace").splitlines()
    kept = [line for line in lines if not any(n in line for n in _NO_GPU_NOISE)]
    if kept:
        print("\n".join(kept), file=sys.stderr)
    return devices


def describe_devices(strategy: tf.distribute.Strategy) -> str:
    """One line: the devices a strategy trains on, and whether a GPU was found."""
    gpus = tf.config.list_physical_devices("GPU")
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: TensorFlow's default placement
        devices = ["/GPU:0" if gpus else "/CPU:0"]
    where = ", ".join(d.rsplit("/", 1)[-1].removeprefix("device:") for d in devices)
    note = f"{len(gpus)} GPU(s) found" if gpus else "no GPU found"
    return f"training on {len(devices)} device(s): {where} ({note})"



def configure_cpu_devices(count: int) -> list[str]:
    """Split the first physical CPU into ``count`` logical devices; returns their names.

    TensorFlow fixes its logical devices when it first initializes them (the first op, or
    ``list_logical_devices``): call this before that, e.g. first thing in a program.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise KodeError(f"devices must be a positive integer, got {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        have = tf.config.list_logical_devices("CPU")
        if len(have) != count:
            raise KodeError(
                f"cannot split the CPU into {count} devices: TensorFlow already initialized "
                f"{len(have)}; set devices before any TensorFlow op runs (a fresh process)"
            ) from None
    return [d.name for d in tf.config.list_logical_devices("CPU")]


# --------------------------------------------------------------------------- TF_CONFIG


@dataclass(frozen=True)
class ClusterConfig:
    """The parts of ``TF_CONFIG`` kode uses."""

    cluster: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def address(self) -> str:
        return self.cluster[self.task_type][self.task_index]

    @property
    def is_chief(self) -> bool:
        # MultiWorkerMirroredStrategy's convention: the "chief" task, else worker 0.
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def peers(self) -> list[str]:
        return [a for t, addrs in self.cluster.items() for i, a in enumerate(addrs)
                if (t, i) != (self.task_type, self.task_index)]

    @property
    def num_workers(self) -> int:
        return sum(len(v) for v in self.cluster.values())


def _split_address(address: object, where: str) -> tuple[str, int]:
    host, sep, port = str(address).rpartition(":")
    if not isinstance(address, str) or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise KodeError(f"TF_CONFIG: {where} address {address!r} is not HOST:PORT")
    return host, int(port)


def parse_tf_config(text: str | None = None) -> ClusterConfig:
    """Validate ``TF_CONFIG`` (the environment variable when ``text`` is None)."""
    text = os.environ.get("TF_CONFIG") if text is None else text
    if not text:
        raise KodeError("strategy 'multiworker' needs TF_CONFIG (cluster and task), which is "
                        "not set; see docs/distributed.md")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise KodeError(f"TF_CONFIG is not valid JSON: {err.msg} at position {err.pos}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise KodeError('TF_CONFIG must be {"cluster": {...}, "task": {"type": ..., "index": ...}}')
    unknown = set(cluster) - {"chief", "worker"}
    if unknown:
        raise KodeError(f"TF_CONFIG: MultiWorkerMirroredStrategy takes 'chief' and 'worker' "
                        f"tasks, not {', '.join(sorted(unknown))}")
    if not all(isinstance(v, list) and v for v in cluster.values()) or not cluster:
        raise KodeError("TF_CONFIG: cluster must map 'worker' (and 'chief') to address lists")
    if len(cluster.get("chief", [])) > 1:
        raise KodeError("TF_CONFIG: a cluster has at most one chief")
    seen = set()
    for kind, addresses in cluster.items():
        for i, address in enumerate(addresses):
            _split_address(address, f"{kind} {i}")
            if address in seen:
                raise KodeError(f"TF_CONFIG: address {address} appears twice")
            seen.add(address)
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise KodeError(f"TF_CONFIG: task type {task_type!r} is not in the cluster "
                        f"({', '.join(cluster)})")
    if isinstance(index, bool) or not isinstance(index, int) \
            or not 0 <= index < len(cluster[task_type]):
        raise KodeError(f"TF_CONFIG: task index {index!r} out of range for "
                        f"{len(cluster[task_type])} {task_type} task(s)")
    return ClusterConfig({k: list(v) for k, v in cluster.items()}, task_type, index)


def wait_for_peers(config: ClusterConfig, timeout: float = DEFAULT_CONNECT_TIMEOUT,
                   interval: float = 0.2) -> None:
    """Return once every peer accepts a TCP connection; :class:`KodeError` after ``timeout``.

    Peers start at slightly different times, so each one is retried until the deadline. While
    waiting this task listens on its own port (a placeholder closed just before TensorFlow's
    server takes the port), otherwise two workers would wait for each other forever.
    """
    if not timeout > 0:
        raise KodeError(f"connect timeout must be positive, got {timeout!r}")
    host, port = _split_address(config.address, "own")
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        placeholder.bind((host, port))
        placeholder.listen(16)
    except OSError as err:
        placeholder.close()
        raise KodeError(f"cannot listen on this task's address {config.address} from "
                        f"TF_CONFIG: {err.strerror}") from None
    deadline = time.monotonic() + timeout
    try:
        waiting = list(config.peers)
        while waiting:
            waiting = [a for a in waiting if not _reachable(a, min(1.0, timeout))]
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise KodeError(f"TF_CONFIG: worker(s) {', '.join(waiting)} unreachable after "
                                f"{timeout:g} s (are they started, and is the address right?)")
            time.sleep(interval)
    finally:
        placeholder.close()


def _reachable(address: str, timeout: float) -> bool:
    host, port = _split_address(address, "peer")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- strategies


def make_strategy(
    name: str = "default",
    *,
    devices: int | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """Create strategy ``name`` (one of :data:`STRATEGIES`); see the module docstring.

    Call it before anything else touches TensorFlow: logical CPU devices (``devices``) and the
    collective ops of ``multiworker`` can only be configured before TensorFlow starts.
    """
    if name not in STRATEGIES:
        raise KodeError(f"unknown strategy '{name}'; choose one of {', '.join(STRATEGIES)}")
    if devices is not None and name != "mirrored":
        raise KodeError(f"devices={devices} splits the CPU for strategy 'mirrored' only")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if devices is not None:
            names = configure_cpu_devices(devices)
            return tf.distribute.MirroredStrategy(names)
        gpus = tf.config.list_logical_devices("GPU")
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(None if gpus else cpus)
    if name == "multiworker":
        config = parse_tf_config()
        wait_for_peers(config, connect_timeout)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as err:  # "Collective ops must be configured at program startup"
            raise KodeError(f"strategy 'multiworker' must be created before TensorFlow runs "
                            f"any op (a fresh process): {str(err).splitlines()[0]}") from None
    return _tpu_strategy(tpu if tpu is not None else os.environ.get("TPU_NAME"))


def _tpu_strategy(tpu: str | None) -> tf.distribute.Strategy:
    local = tpu in (None, "", "local")
    if local and not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        raise KodeError("strategy 'tpu': no TPU on this machine (no /dev/accel*); on a Cloud "
                        "TPU VM run there, or pass --tpu NAME|grpc://HOST:PORT")
    if tpu and tpu.startswith("grpc://") and not _reachable(tpu.removeprefix("grpc://"), 5.0):
        raise KodeError(f"strategy 'tpu': TPU at {tpu} is unreachable")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="local" if local else tpu
        )
        if not local:
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError, ImportError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KodeError(f"strategy 'tpu': no usable TPU ({first})") from None


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (always, except non-chief workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def worker_logdir(logdir: str, strategy: tf.distribute.Strategy) -> str:
    """``logdir`` for the chief; ``logdir/worker-<i>`` for the other workers, whose files
    (logs, checkpoints) would otherwise overwrite the chief's on a shared file system."""
    if is_chief(strategy):
        return logdir
    resolver = strategy.cluster_resolver
    return os.path.join(logdir, f"{resolver.task_type}-{resolver.task_id}")


def synchronize_batchnorm(model: keras.Model) -> int:
    """Make every BatchNormalization of ``model`` compute batch statistics over the global
    batch (all replicas) instead of per replica; returns how many layers were changed.

    Needed for a multi-replica run to match a one-device run with the same global batch. The
    flag is read at call time, so setting it before the first (traced) call suffices.
    """
    layers = [la for la in model._flatten_layers()
              if isinstance(la, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- checkpoints


def _variable_signature(variables: Sequence) -> list[str]:
    # Shapes and dtypes in order, not paths: Keras uniquifies names per process ("sgd_1"),
    # so the same model built twice in one process has other paths but the same layout.
    return [f"{tuple(v.shape)}:{v.dtype}" for v in variables]


class EpochCheckpoint:
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
                failures.append(f"{name}: {_first_line(err)}")
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


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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


class CheckpointCallback(keras.callbacks.Callback):
    """Saves an :class:`EpochCheckpoint` at the end of every epoch (put it last, so that the
    other callbacks' additions to ``logs`` are recorded in the history)."""

    def __init__(self, checkpoint: EpochCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        self.checkpoint.save(epoch + 1, logs)


# --------------------------------------------------------------------------- multi-worker loop


def _per_replica_sums(model, loss_fn, x, y, training: bool):
    probs = model(x, training=training)
    per_example = loss_fn(y, probs)
    predicted = tf.argmax(probs, axis=-1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int32)), tf.float32))
    return per_example, correct


def _batches(distributed, dataset: tf.data.Dataset):
    """Iterate a distributed dataset for exactly its known number of batches.

    Running into the end of a multi-worker iterator costs a cross-worker "any data left?"
    round, which was measured to stall 20–60 s on localhost; with a known cardinality every
    worker stops after the same number of steps without it.
    """
    steps = int(dataset.cardinality())
    iterator = iter(distributed)
    if steps < 0:
        yield from iterator
        return
    for _ in range(steps):
        yield next(iterator)


def _stream(distributed, dataset: tf.data.Dataset, start: int):
    """The batches of pass after pass over ``distributed`` (one iterator per pass, so each
    pass draws its own shuffle, as in ``fit`` over ``dataset.repeat()``), from batch ``start``
    of that stream on: the passes before it only create their iterator, the batches of the
    current pass before it are read and dropped."""
    passes, offset = divmod(start, int(dataset.cardinality()))
    skip_epochs(distributed, passes)
    while True:
        for batch in _batches(distributed, dataset):
            if offset:
                offset -= 1
                continue
            yield batch


def fit_distributed(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    *,
    epochs: int,
    strategy: tf.distribute.Strategy,
    validation_data: tf.data.Dataset | None = None,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    steps_per_epoch: int | None = None,
) -> dict:
    """Train a compiled classifier (sparse labels, probability outputs) with a custom loop
    around ``strategy.run``: what ``model.fit`` does, for strategies ``fit`` cannot drive.

    The loss of a step is the mean over the *global* batch: each replica divides its sum by
    the all-reduced example count, and the optimizer sums the replicas' gradients. So the
    ragged last batch (split unevenly between replicas) is weighted exactly as on one device.
    Logs (``loss``, ``accuracy``, ``val_*``) are example-weighted epoch means, as in ``fit``.
    ``steps_per_epoch`` (as in ``fit``; None: one pass of ``train_ds``): epoch k trains on
    batches [k·S, (k+1)·S) of the stream of passes over ``train_ds``, each pass shuffled anew,
    also when resumed at ``initial_epoch``. Returns the history dict.
    """
    optimizer = model.optimizer
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    dist_train = strategy.experimental_distribute_dataset(train_ds)
    dist_val = (strategy.experimental_distribute_dataset(validation_data)
                if validation_data is not None else None)

    def replica_train(x, y):
        context = tf.distribute.get_replica_context()
        count = tf.cast(tf.shape(y)[0], tf.float32)
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
        with tf.GradientTape() as tape:
            per_example, correct = _per_replica_sums(model, loss_fn, x, y, True)
            loss = tf.reduce_sum(per_example) / global_count
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return tf.reduce_sum(per_example), correct, count

    def replica_test(x, y):
        per_example, correct = _per_replica_sums(model, loss_fn, x, y, False)
        return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)

    def make_step(fn, distributed):
        # Traced once for all batches: the distributed dataset's spec leaves the batch size
        # unknown, so the ragged last batch does not trace the step a second time.
        @tf.function(input_signature=distributed.element_spec)
        def step(x, y):
            results = strategy.run(fn, args=(x, y))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]
        return step

    test_step = make_step(replica_test, dist_val) if dist_val is not None else None
    steps = int(train_ds.cardinality())
    if steps_per_epoch is not None:
        if steps < 0:
            raise KodeError("steps_per_epoch needs a training dataset of known length "
                            "(cardinality); this one has none")
        steps = int(steps_per_epoch)
        stream = _stream(dist_train, train_ds, initial_epoch * steps)
    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, model=model,
        verbose=verbose, epochs=epochs, steps=steps if steps >= 0 else None,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    if steps_per_epoch is None:
        skip_epochs(dist_train, initial_epoch)
    train_step, traced_modes = None, None
    for epoch in range(initial_epoch, epochs):
        # The gradient guard may switch stages to 'checkpoint' (fallback): retrace then.
        modes = tuple(getattr(la, "gradient", None) for la in model._flatten_layers())
        if modes != traced_modes:
            train_step, traced_modes = make_step(replica_train, dist_train), modes
        callback_list.on_epoch_begin(epoch)
        totals = np.zeros(3)
        batches = (_batches(dist_train, train_ds) if steps_per_epoch is None
                   else itertools.islice(stream, steps))
        for batch, (x, y) in enumerate(batches):
            callback_list.on_train_batch_begin(batch)
            sums = np.array([float(v) for v in train_step(x, y)])
            totals += sums
            callback_list.on_train_batch_end(batch, {"loss": sums[0] / sums[2]})
        logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
        if dist_val is not None:
            val = np.zeros(3)
            for x, y in _batches(dist_val, validation_data):
                val += np.array([float(v) for v in test_step(x, y)])
            logs.update(val_loss=val[0] / val[2], val_accuracy=val[1] / val[2])
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return dict(model.history.history)


def evaluate_distributed(model: keras.Model, dataset: tf.data.Dataset,
                         strategy: tf.distribute.Strategy) -> dict:
    """Example-weighted test loss and accuracy with ``strategy.run`` (``model.evaluate`` has
    the same multi-worker problem as ``fit``)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    distributed = strategy.experimental_distribute_dataset(dataset)

    @tf.function(input_signature=distributed.element_spec)  # one trace, as in fit_distributed
    def step(x, y):
        def replica(x, y):
            per_example, correct = _per_replica_sums(model, loss_fn, x, y, False)
            return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)

        results = strategy.run(replica, args=(x, y))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    totals = np.zeros(3)
    for x, y in _batches(distributed, dataset):
        totals += np.array([float(v) for v in step(x, y)])
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
