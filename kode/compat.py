"""Every private Keras / TensorFlow API kode uses, in one place.

Each accessor below wraps one private name; :func:`missing_private_apis` lists those a
Keras or TensorFlow upgrade has removed, so a test fails with the name and what kode uses it
for, instead of a model silently going wrong (tests/test_architecture.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import tensorflow as tf

from kode.errors import KodeError


def _attribute(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def stop_recording():
    """A context in which no gradient tape records (``tf.recompute_grad`` uses the same):
    without it an outer eager tape keeps every intermediate of a custom-gradient forward."""
    return _attribute("tensorflow.python.eager.record", "stop_recording")()


def in_xla_context() -> bool:
    """Whether the graph being built is compiled by XLA (which reorders recomputations)."""
    is_xla = _attribute("tensorflow.python.ops.control_flow_util", "GraphOrParentsInXlaContext")
    return bool(is_xla(tf.compat.v1.get_default_graph()))


def autocast_scope(dtype: str | None):
    """The scope in which a layer's ``__call__`` casts float variables to ``dtype`` (mixed
    precision); None: no casting."""
    return _attribute("keras.src.backend.common.variables", "AutocastScope")(dtype)


def input_signature(model: keras.Model) -> Any:
    """The (batch-polymorphic) input signature ``model.export`` would use."""
    return _attribute("keras.src.export.export_utils", "get_input_signature")(model)


def op_determinism_enabled() -> bool:
    """Whether ``tf.config.experimental.enable_op_determinism`` is in force (TensorFlow has
    no public getter)."""
    return bool(_attribute("tensorflow.python.framework.config", "is_op_determinism_enabled")())


def disable_op_determinism() -> None:
    """Undo ``tf.config.experimental.enable_op_determinism`` (no public call either): a run
    that asked for determinism puts the process back as it found it."""
    _attribute("tensorflow.python.framework.config", "disable_op_determinism")()


def unsafe_deserialization_enabled() -> bool:
    """Whether ``keras.config.enable_unsafe_deserialization`` was called (no public getter)."""
    state = importlib.import_module("keras.src.backend.common.global_state")
    return state.get_global_attribute("safe_mode_saving") is False


def restore_safe_deserialization() -> None:
    """Undo ``keras.config.enable_unsafe_deserialization`` (Keras has no call for it)."""
    state = importlib.import_module("keras.src.backend.common.global_state")
    state.set_global_attribute("safe_mode_saving", None)


def configure_coordination_service(jobs: dict[str, int], heartbeat_timeout_s: float) -> None:
    """Configure the multi-worker coordination service as ``MultiWorkerMirroredStrategy``
    would (it keeps a configuration it finds), with a longer heartbeat timeout: TensorFlow's
    default (10 s) declares a worker dead when a loaded machine delays its heartbeats."""
    context = _attribute("tensorflow.python.eager.context", "context")()
    job_config = _attribute("tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2",
                            "CoordinatedJob")
    leader = "chief" if "chief" in jobs else "worker"
    context.configure_coordination_service(
        service_type="standalone", service_leader=f"/job:{leader}/replica:0/task:0",
        heartbeat_timeout_in_ms=int(heartbeat_timeout_s * 1000),
        coordinated_jobs=[job_config(name=name, num_tasks=count)
                          for name, count in jobs.items()])


def coordination_service_config() -> Any:
    """The coordination service configuration the next TensorFlow server will use (or None)."""
    return _attribute("tensorflow.python.eager.context", "context")().coordination_service


def keras_test_case() -> type:
    """Keras' own ``TestCase`` (its ``run_layer_test`` conformance harness)."""
    return _attribute("keras.src.testing", "TestCase")


def tensorflow_trackable() -> type:
    """TensorFlow's ``Trackable`` base class: what ``tf.train.Checkpoint`` can save."""
    return tf.__internal__.tracking.Trackable


def all_layers(layer: keras.layers.Layer, include_self: bool = True) -> list:
    """Every layer inside ``layer`` (nested, depth first), optionally with itself."""
    return list(layer._flatten_layers(include_self=include_self))


def functional_nodes(model: keras.Model) -> Iterator[tuple[Any, Any]]:
    """(operation, node) pairs of a functional model's graph (the nodes that belong to this
    model, not to other models sharing its layers)."""
    for op in model.operations:
        for i, node in enumerate(op._inbound_nodes):
            if f"{id(op)}_ib-{i}" in model._nodes:
                yield op, node


def producer_name(tensor: Any) -> str:
    """The name of the layer that produced a symbolic Keras tensor."""
    return tensor._keras_history.operation.name


def is_functional_graph(model: Any) -> bool:
    """Whether ``model`` is a Keras model whose graph of nodes kode can read."""
    return isinstance(model, keras.Model) and hasattr(model, "_nodes")


def functional_graph(model: Any) -> keras.Model:
    """The functional model whose graph kode reads for ``model``: ``model`` itself, or for a
    built ``keras.Sequential`` the functional model Keras keeps inside it (the same layers);
    :class:`KodeError` saying why there is none (an unbuilt Sequential, a subclassed model)."""
    if is_functional_graph(model):
        return model
    if isinstance(model, keras.Sequential):
        inner = getattr(model, "_functional", None)
        if is_functional_graph(inner):
            return inner
        raise KodeError(f"Sequential model '{model.name}' has no graph yet (no keras.Input and "
                        "never built): start it with keras.Input(shape) or build it first")
    if isinstance(model, keras.Model):
        raise KodeError(f"model '{model.name}' is a subclassed keras.Model (its call() is "
                        "Python code); kode reads only functional and Sequential models")
    raise KodeError(f"expected a Keras model, got {type(model).__name__}")


def keras_applications_resnet() -> Callable[..., keras.Model]:
    """keras.applications' own ResNet builder ``ResNet(stack_fn, preact, use_bias, ...)``
    (public only through ResNet50 … ResNet152V2, at full width and depth)."""
    return _attribute("keras.src.applications.resnet", "ResNet")


def keras_applications_resnet_stack(version: str) -> Callable[..., Any]:
    """keras.applications' stack of residual blocks ``(x, filters, blocks, stride1, name)``
    of ResNet ``version`` "v1" or "v2"."""
    return _attribute("keras.src.applications.resnet", f"stack_residual_blocks_{version}")


def _check_functional_nodes() -> None:
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, name="dense_probe")(inputs)
    model = keras.Model(inputs, outputs)
    if not is_functional_graph(model) or len(list(functional_nodes(model))) != 2:
        raise AttributeError("Functional model _nodes / Operation._inbound_nodes changed")
    if producer_name(outputs) != "dense_probe":
        raise AttributeError("KerasTensor._keras_history changed")


def _check_sequential_graph() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    if functional_graph(model) is not model._functional:
        raise AttributeError("Sequential._functional changed")


def _has(owner: Callable[[], Any], name: str) -> Callable[[], None]:
    """A probe for a private method kode overrides or a private flag it sets on ``owner()``."""
    def probe() -> None:
        if not hasattr(owner(), name):
            raise AttributeError(f"{name} is gone")
    return probe


#: name → (what kode uses it for, a call that fails when it is gone).
PRIVATE_APIS: dict[str, tuple[str, Callable[[], Any]]] = {
    "tensorflow.python.eager.record.stop_recording": (
        "the adjoint's forward keeps nothing for an outer tape", lambda: stop_recording()),
    "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext": (
        "the warning that XLA undoes the adjoint's memory saving", in_xla_context),
    "keras.src.backend.common.variables.AutocastScope": (
        "diagnostics call residual functions as their layer would under mixed precision",
        lambda: autocast_scope(None)),
    "keras.src.export.export_utils.get_input_signature": (
        "the SavedModel's input signature", lambda: _attribute(
            "keras.src.export.export_utils", "get_input_signature")),
    "tensorflow.python.framework.config.is_op_determinism_enabled": (
        "a deterministic run restores op determinism; the tests check nothing leaks it",
        op_determinism_enabled),
    "tensorflow.python.framework.config.disable_op_determinism": (
        "a deterministic run restores op determinism", lambda: _attribute(
            "tensorflow.python.framework.config", "disable_op_determinism")),
    "keras.src.backend.common.global_state safe_mode_saving": (
        "the tests check that nothing leaves unsafe deserialization on",
        unsafe_deserialization_enabled),
    "tensorflow.python.eager.context.context().configure_coordination_service": (
        "multi-worker training survives a loaded machine (a longer heartbeat timeout)",
        lambda: (_attribute("tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2",
                            "CoordinatedJob"),
                 _has(lambda: _attribute("tensorflow.python.eager.context", "context")(),
                      "configure_coordination_service")())),
    "keras.src.testing.TestCase": ("the layer contract tests (run_layer_test)",
                                   keras_test_case),
    "tf.__internal__.tracking.Trackable": (
        "tf.train.Checkpoint sees the layers and variables kode layers hold in lists",
        tensorflow_trackable),
    "keras.layers.Layer._flatten_layers": (
        "finding a model's integrator stages and BatchNormalization layers",
        lambda: all_layers(keras.layers.Dense(1))),
    "keras.Model._nodes / Operation._inbound_nodes / KerasTensor._keras_history": (
        "port_model reads a functional model's graph", _check_functional_nodes),
    "keras.Sequential._functional": (
        "port_model and cut_at_stages read a Sequential model's graph", _check_sequential_graph),
    "keras.layers.BatchNormalization._moments": (
        "kode's BatchNormalization overrides it to use TensorFlow's fused kernel",
        _has(lambda: keras.layers.BatchNormalization, "_moments")),
    "Trackable._trackable_children": (
        "kode layers add list-held children to tf.train.Checkpoint by overriding it",
        _has(tensorflow_trackable, "_trackable_children")),
    "tensorflow_datasets gcs_utils._is_gcs_disabled": (
        "building a tfds builder offline (no lookup of Google Cloud Storage)",
        _has(lambda: importlib.import_module("tensorflow_datasets.core.utils.gcs_utils"),
             "_is_gcs_disabled")),
    "keras.src.applications.resnet.ResNet / stack_residual_blocks_v1 / _v2": (
        "tests build tiny keras.applications ResNets (kode.testing.applications)",
        lambda: [keras_applications_resnet(), keras_applications_resnet_stack("v1"),
                 keras_applications_resnet_stack("v2")]),
}


def missing_private_apis() -> list[str]:
    """``"<name>: <use> (<error>)"`` for every private API that no longer works."""
    missing = []
    for name, (use, probe) in PRIVATE_APIS.items():
        try:
            probe()
        except Exception as err:  # ImportError, AttributeError, TypeError after an upgrade
            missing.append(f"{name}: {use} ({type(err).__name__}: {err})")
    return missing
