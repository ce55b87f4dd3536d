"""Cut a functional model at its integrator stages: the layers between two stages (and before
the first, after the last) become one :class:`~kode.layers.RecomputedSegment` each, so that a
memory-saving gradient mode recomputes them in the backward instead of storing their
activations (a ported ResNet's stem, its shape-changing blocks, its head).

A segment starts from one tensor (a model input or a stage's output) and holds every layer
that depends on it before the next stage. A graph that does not cut that way (a layer reading
two stages' outputs, or a stage reading two segments) is left as it is.
"""

from __future__ import annotations

import keras
from keras import layers

from kode.compat import functional_graph, functional_nodes
from kode.layers.segment import RecomputedSegment
from kode.layers.stage import IntegratorStage


class _Segment:
    def __init__(self, entry):
        self.entry = entry  # the KerasTensor it starts from
        self.nodes: list = []
        self.produced: dict[int, object] = {}  # id → KerasTensor made inside


def _segments(model: keras.Model) -> tuple[list, list[_Segment]] | None:
    """The graph in order as ("stage", op, node) / ("segment", _Segment) items, or None."""
    owner: dict[int, _Segment] = {}  # tensor id → segment that produced it
    by_entry: dict[int, _Segment] = {}
    items, segments = [], []
    for op, node in functional_nodes(model):
        if isinstance(op, layers.InputLayer):
            continue
        if isinstance(op, IntegratorStage):
            items.append(("stage", op, node))
            continue
        inner = {id(owner[id(t)]): owner[id(t)] for t in node.input_tensors if id(t) in owner}
        outer = {id(t): t for t in node.input_tensors if id(t) not in owner}
        if len(inner) > 1 or len(outer) > 1:
            return None
        if inner:
            segment = next(iter(inner.values()))
            if outer and id(segment.entry) not in outer:
                return None
        elif outer:
            entry = next(iter(outer.values()))
            segment = by_entry.get(id(entry))
            if segment is None:
                segment = by_entry[id(entry)] = _Segment(entry)
                segments.append(segment)
                items.append(("segment", segment))
        else:
            return None  # a layer without inputs: nothing to cut at
        segment.nodes.append(node)
        for t in node.output_tensors:
            owner[id(t)] = segment
            segment.produced[id(t)] = t
    return items, segments


def _read_outside(model: keras.Model, items: list) -> set[int]:
    """Ids of the tensors read by a stage or given out as a model output."""
    needed = {id(t) for t in model.outputs}
    for item in items:
        if item[0] == "stage":
            needed |= {id(t) for t in item[2].input_tensors}
    return needed


def _name(segment: _Segment, index: int, last: bool, model: keras.Model, taken: set) -> str:
    base = "stem" if segment.entry in model.inputs else "head" if last else f"transition{index}"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def cut_at_stages(model: keras.Model, gradient: str = "backprop") -> keras.Model:
    """``model`` (functional, or a built Sequential) rebuilt as a functional model of stages
    and :class:`RecomputedSegment` layers in between (the same layers and weights, not
    copies); ``model`` itself when it has no stage or does not cut. A model without a graph
    (an unbuilt Sequential, a subclassed model): :class:`~kode.errors.KodeError`.

    Each segment takes ``gradient`` (recomputed in the backward unless "backprop")."""
    graph = functional_graph(model)  # a Sequential's is the functional model inside it
    found = _segments(graph)
    if found is None or not any(item[0] == "stage" for item in found[0]):
        return model
    items, segments = found
    taken = {layer.name for layer in graph.layers}
    needed = _read_outside(graph, items)
    tensors = {id(t): t for t in graph.inputs}
    for k, item in enumerate(items):
        if item[0] == "stage":
            _, op, node = item
            args, kwargs = node.arguments.fill_in(tensors)
            outputs = op(*args, **kwargs)
            tensors[id(node.output_tensors[0])] = outputs
            continue
        segment = item[1]
        exits = [t for key, t in segment.produced.items() if key in needed]
        body = keras.Model(segment.entry, exits[0] if len(exits) == 1 else exits,
                           name=f"{model.name}_{segment.nodes[0].operation.name}_segment")
        last = not any(i[0] == "stage" for i in items[k + 1:])
        layer = RecomputedSegment(body, gradient,
                                  name=_name(segment, segments.index(segment), last, graph, taken))
        outputs = layer(tensors[id(segment.entry)])
        outputs = list(outputs) if isinstance(outputs, tuple | list) else [outputs]
        for old, new in zip(exits, outputs, strict=True):
            tensors[id(old)] = new
    new_outputs = [tensors[id(t)] for t in graph.outputs]
    return keras.Model(graph.inputs if len(graph.inputs) > 1 else graph.inputs[0],
                       new_outputs if len(new_outputs) > 1 else new_outputs[0], name=model.name)
