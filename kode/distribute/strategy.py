"""Scaling out: ``tf.distribute`` strategies, devices and the cluster description.

Strategies (``make_strategy``):

- ``default``: one device, ``tf.distribute.get_strategy()``.
- ``mirrored``: ``MirroredStrategy`` over the GPUs, or over ``devices`` logical CPU devices
  (:func:`configure_cpu_devices`; must run before TensorFlow initializes its devices).
  Trained with ``model.fit``.
- ``multiworker``: ``MultiWorkerMirroredStrategy`` from ``TF_CONFIG``. Keras 3.15's
  ``model.fit`` fails under it even for a Dense model (``ValueError: Attempt to convert a value
  (PerReplica:{...}) with an unsupported type (...PerReplica) to a Tensor``, keras#20585), so
  kode trains with its own loop around ``strategy.run``
  (:func:`kode.training.custom_loop.fit_distributed`). Before the strategy is created every
  peer is probed with a TCP connect (bounded by ``connect_timeout``) so that a typo in
  ``TF_CONFIG`` fails with a message instead of hanging in gRPC retries. A worker is declared
  dead after ``heartbeat_timeout`` seconds without a heartbeat (TensorFlow's 10 s is too short
  for a loaded machine).
- ``tpu``: ``TPUStrategy`` through ``TPUClusterResolver``. Untested here (no TPU); without a
  TPU it fails at once: ``TPUClusterResolver("local")`` and unreachable TPU addresses otherwise
  block in connection retries, so the TPU is looked for first.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import keras
import tensorflow as tf

from kode.compat import all_layers, configure_coordination_service
from kode.errors import KodeError, one_line

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


DEFAULT_CONNECT_TIMEOUT = 60.0
#: Seconds without a heartbeat before the coordination service declares a worker dead
#: (TensorFlow's own 10 s failed a two-worker run on a loaded 2-core machine).
DEFAULT_HEARTBEAT_TIMEOUT = 120.0


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


#: CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic, and the GPU compute capability
#: (Ampere) from which bfloat16 runs on tensor cores.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_MIN_COMPUTE_CAPABILITY = (8, 0)


def _cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bfloat16_hardware(gpus: list | None = None, cpu_flags: set[str] | None = None) -> str | None:
    """What on this machine computes in bfloat16 natively: the first GPU of compute
    capability ≥ 8.0 or a CPU with ``avx512_bf16``/``amx_bf16``, as a short phrase; None
    when nothing does (``--precision mixed_bfloat16`` would then only emulate it)."""
    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    for gpu in gpus:
        try:
            capability = tf.config.experimental.get_device_details(gpu).get(
                "compute_capability")
        except (ValueError, RuntimeError, AttributeError):
            capability = None
        if capability and tuple(capability) >= BF16_MIN_COMPUTE_CAPABILITY:
            return f"GPU {gpu.name.rsplit(':', 1)[-1]} (compute capability " \
                   f"{capability[0]}.{capability[1]})"
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return f"CPU with {'/'.join(found)}" if found else None


_DETECT = object()


def bfloat16_hint(precision: str, hardware: str | None | object = _DETECT) -> str | None:
    """One line for a float32 run on bfloat16 hardware (``hardware``: what
    :func:`bfloat16_hardware` finds, looked up only for a float32 run): what
    ``--precision mixed_bfloat16`` gives. None otherwise."""
    if precision != "float32":
        return None
    hardware = bfloat16_hardware() if hardware is _DETECT else hardware
    if hardware is None:
        return None
    return (f"note: this machine computes bfloat16 natively ({hardware}); --precision "
            "mixed_bfloat16 trains faster (measured: zoo resnet56 trained 1.5x its float32 "
            "speed on an AMD EPYC CPU with avx512_bf16), with float32 weights and residual "
            "stream")


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


def make_strategy(
    name: str = "default",
    *,
    devices: int | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
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
        if not heartbeat_timeout > 0:
            raise KodeError(f"heartbeat timeout must be positive, got {heartbeat_timeout!r}")
        wait_for_peers(config, connect_timeout)
        configure_coordination_service({k: len(v) for k, v in config.cluster.items()},
                                       heartbeat_timeout)
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as err:  # "Collective ops must be configured at program startup"
            raise KodeError(f"strategy 'multiworker' must be created before TensorFlow runs "
                            f"any op (a fresh process): {one_line(err)}") from None
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
    layers = [la for la in all_layers(model)
              if isinstance(la, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.synchronized = True
    return len(layers)
