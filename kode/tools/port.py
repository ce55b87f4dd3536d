"""Port a Keras model into kode: runs of shape-preserving residual blocks become stages.

A residual block is found in the model's graph as an ``Add`` of a tensor x and a branch
f(x) computed from x by a chain of one-input layers. Consecutive blocks (each one's output is
the next one's input) become one :class:`~kode.stage.IntegratorStage` whose residual
functions are :class:`LayerChain` layers holding the original branch layers (and a copy of
their weights):

- pre-activation (keras.applications ResNet50V2/101V2/152V2): x_{n+1} = x_n + f_n(x_n), an
  Euler step with h = 1 (integrator ``euler``; the adjoint applies);
- post-activation (ResNet50/101/152): x_{n+1} = relu(x_n + f_n(x_n)) (integrator
  ``post_activation_euler``: no reversal, so ``checkpoint`` but not ``adjoint``).

Every other layer (stem, the blocks that change shape, head) is copied as it is; with
``segments`` (the default) the layers between two stages become one
:class:`~kode.layers.RecomputedSegment` each (:mod:`kode.tools.segments`), which memory-saving
gradient modes recompute in the backward. The ported model computes the same function as the
original, in inference and in training mode. A model with no such blocks (a kode model: its
residual blocks are stages already) is copied.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import keras
from keras import layers

from kode.compat import functional_graph, functional_nodes, producer_name
from kode.errors import KodeError
from kode.layers.chain import LayerChain
from kode.layers.stage import IntegratorStage
from kode.tools.segments import cut_at_stages

#: Longest branch searched for; keras.applications branches have 8–10 layers.
MAX_BRANCH_LAYERS = 64


@dataclass
class _Block:
    """One residual block of the source graph."""

    input: object  # KerasTensor x
    output: object  # KerasTensor x + f(x), or relu(x + f(x))
    branch: list  # the branch's layers, input side first
    absorbed: list  # every layer the stage replaces (branch, Add, post-activation ReLU)
    post_activation: bool


def _is_plain_relu(layer) -> bool:
    if isinstance(layer, layers.Activation):
        return getattr(layer.activation, "__name__", "") == "relu"
    if isinstance(layer, layers.ReLU):
        return (layer.max_value is None and float(layer.negative_slope) == 0.0
                and float(layer.threshold) == 0.0)
    return False


class _Graph:
    """The model's nodes in topological order, with producers and consumers of each tensor."""

    def __init__(self, model: keras.Model):
        self.nodes = list(functional_nodes(model))
        self.producer, self.consumers = {}, {}
        for op, node in self.nodes:
            for t in node.output_tensors:
                self.producer[id(t)] = (op, node)
            for t in node.input_tensors:
                self.consumers.setdefault(id(t), []).append(op)

    def single_consumer(self, tensor, op) -> bool:
        return self.consumers.get(id(tensor), []) == [op]

    def block_at(self, add, node) -> _Block | None:
        """The residual block ending in ``add``, or None when ``add`` is not x + f(x)."""
        if len(node.input_tensors) != 2 or len(node.output_tensors) != 1:
            return None
        for shortcut, branch_end in (node.input_tensors, node.input_tensors[::-1]):
            chain = self._branch(shortcut, branch_end, add)
            if chain is None:
                continue
            if sorted(map(id, self.consumers.get(id(shortcut), []))) != sorted(
                    [id(add), id(chain[0])]):
                continue  # x feeds something else too: not a block of its own
            out, absorbed, post = node.output_tensors[0], [*chain, add], False
            after = self.consumers.get(id(out), [])
            if len(after) == 1 and _is_plain_relu(after[0]) and len(
                    self.producer_node_of_consumer(after[0], out).input_tensors) == 1:
                relu_node = self.producer_node_of_consumer(after[0], out)
                out, post = relu_node.output_tensors[0], True
                absorbed.append(after[0])
            return _Block(shortcut, out, chain, absorbed, post)
        return None

    def producer_node_of_consumer(self, op, tensor):
        for o, node in self.nodes:
            if o is op and any(t is tensor for t in node.input_tensors):
                return node
        raise KodeError(f"layer '{op.name}' has no node reading its input")  # unreachable

    def _branch(self, start, end, add) -> list | None:
        """Layers of a one-input chain from ``start`` to ``end`` (inclusive), or None."""
        chain, tensor, consumer = [], end, add
        while tensor is not start:
            if len(chain) >= MAX_BRANCH_LAYERS or id(tensor) not in self.producer:
                return None
            op, node = self.producer[id(tensor)]
            if (isinstance(op, layers.InputLayer) or len(node.input_tensors) != 1
                    or len(node.output_tensors) != 1
                    or not self.single_consumer(tensor, consumer)
                    or any(v is not None for v in node.arguments.kwargs.values())):
                return None
            chain.append(op)
            tensor, consumer = node.input_tensors[0], op
        return chain[::-1] or None


def _runs(blocks: list[_Block], graph: _Graph) -> list[list[_Block]]:
    """Maximal runs of consecutive same-kind blocks (block k's output is only block k+1's
    input)."""
    by_input = {id(b.input): b for b in blocks}
    starts = [b for b in blocks
              if not any(p.output is b.input and p.post_activation == b.post_activation
                         for p in blocks)]
    runs = []
    for block in starts:
        run = [block]
        while True:
            nxt = by_input.get(id(run[-1].output))
            if nxt is None or nxt.post_activation != block.post_activation:
                break
            run.append(nxt)
        runs.append(run)
    return runs


def _clone(layer: layers.Layer) -> layers.Layer:
    return type(layer).from_config(layer.get_config())


def _block_name(block: _Block, index: int) -> str:
    prefix = os.path.commonprefix([lay.name for lay in block.branch]).rstrip("_")
    return prefix or f"block{index}"


def _stage_name(names: list[str], taken: set[str]) -> str:
    """``conv3_stage`` for blocks ``conv3_block2…`` (keras.applications naming), else
    ``stage_<first block>``."""
    groups = {m.group(1) if m else None for m in (re.match(r"(.+)_block\d+$", n) for n in names)}
    candidates = [f"{groups.pop()}_stage"] if len(groups) == 1 and None not in groups else []
    candidates += [f"stage_{names[0]}", f"stage{len(taken)}"]
    for name in candidates:
        if name not in taken:
            taken.add(name)
            return name
    raise KodeError(f"no free name for the stage starting at {names[0]}")  # unreachable


@dataclass(frozen=True)
class PortSummary:
    """What :func:`port_model` replaced: one entry per stage, (name, integrator, steps)."""

    stages: tuple[tuple[str, str, int], ...]

    def format(self) -> str:
        if not self.stages:
            return "no residual blocks to port (the model's stages are kode stages already)"
        return "; ".join(f"{n}: {k} × {i}" for n, i, k in self.stages)


def port_model(model: keras.Model, gradient: str = "backprop",
               name: str | None = None, copy: bool = True,
               segments: bool = True) -> keras.Model:
    """A kode version of ``model``: runs of x + f(x) (or relu(x + f(x))) blocks become stages.

    ``segments``: cut the layers outside the stages into recomputable segments, which take
    ``gradient`` too (False: leave them as plain layers of the model, which backpropagate).

    With ``copy`` the result owns new layers with copies of the weights (the source is left
    untouched); without, it reuses the source's layers (no second set of variables: half the
    time and memory when the source is thrown away). Either way it computes the same
    function. ``port_summary(result)`` lists the stages created.
    """
    functional = functional_graph(model)  # a Sequential's is the functional model inside it
    graph = _Graph(functional)
    blocks = [b for op, node in graph.nodes if isinstance(op, layers.Add)
              for b in [graph.block_at(op, node)] if b is not None]
    runs = _runs(blocks, graph)
    run_ending_at = {id(run[-1].absorbed[-1]): run for run in runs}
    absorbed = {id(op) for run in runs for b in run for op in b.absorbed}

    clones: dict[int, tuple[layers.Layer, layers.Layer]] = {}

    def clone_of(op):
        if not copy:
            return op
        if id(op) not in clones:
            clones[id(op)] = (op, _clone(op))
        return clones[id(op)][1]

    tensors: dict[int, object] = {}
    new_inputs = []
    for t in functional.inputs:
        x = keras.Input(shape=t.shape[1:], batch_size=t.shape[0], dtype=t.dtype,
                        name=producer_name(t))
        tensors[id(t)] = x
        new_inputs.append(x)
    stages_made, taken, index = [], {lay.name for lay in functional.layers}, 0
    for op, node in graph.nodes:
        if isinstance(op, layers.InputLayer):
            continue
        if id(op) in absorbed:
            run = run_ending_at.get(id(op))
            if run is None:
                continue  # replaced by the stage built at its run's last layer
            names = []
            fns = []
            for block in run:
                index += 1
                names.append(_block_name(block, index))
                fns.append(LayerChain([clone_of(lay) for lay in block.branch], name=names[-1]))
            post = run[0].post_activation
            integrator = "post_activation_euler" if post else "euler"
            stage = IntegratorStage(fns, integrator, 1.0, gradient=gradient,
                                    name=_stage_name(names, taken))
            tensors[id(run[-1].output)] = stage(tensors[id(run[0].input)])
            stages_made.append((stage.name, integrator, len(run)))
            continue
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = clone_of(op)(*args, **kwargs)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for old, new in zip(node.output_tensors, outputs, strict=True):
            tensors[id(old)] = new
    outputs = [tensors[id(t)] for t in functional.outputs]
    ported = keras.Model(new_inputs if len(new_inputs) > 1 else new_inputs[0],
                         outputs if len(outputs) > 1 else outputs[0], name=name or model.name)
    for source, copy in clones.values():
        copy.set_weights(source.get_weights())
    if segments:
        ported = cut_at_stages(ported, gradient)
    ported._kode_port_summary = PortSummary(tuple(stages_made))
    return ported


def port_summary(model: keras.Model) -> PortSummary:
    """The stages :func:`port_model` created in ``model`` (empty for a model not ported here)."""
    return getattr(model, "_kode_port_summary", PortSummary(()))
