"""The registry: the one way a model name becomes a model (after timm).

``register_model(name, builder, **defaults)`` records a builder with keras.applications-style
arguments and its defaults; ``create_model(name, **overrides)`` calls it.
"""

from __future__ import annotations

import contextvars
import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

import keras

from kode.errors import KodeError, check_argument_types


@dataclass(frozen=True)
class ModelEntry:
    """A registered name: its family, builder and the arguments that define it."""

    name: str
    family: str
    builder: Callable[..., keras.Model]
    defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def config(self, **overrides) -> dict:
        """The builder arguments for this name with ``overrides`` applied."""
        return {"name": self.name, **self.defaults, **overrides}


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, family: str, builder: Callable[..., keras.Model], **defaults):
    """Register ``name`` → ``builder(**defaults)``; names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered")
    _REGISTRY[name] = ModelEntry(name, family, builder, MappingProxyType(dict(defaults)))


def get_entry(name: str) -> ModelEntry:
    """The entry for ``name``, or a :class:`KodeError` suggesting the closest names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        close = _closest(str(name))
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `kode models`"
        raise KodeError(f"unknown model '{name}'{hint}")
    return _REGISTRY[name]


def create_model(model_name: str, /, **overrides) -> keras.Model:
    """Build the registered model ``model_name``; ``overrides`` replace its default arguments,
    e.g. ``create_model("lm_resnet56", classes=100, step_size="ode", name="mine")``."""
    entry = get_entry(model_name)
    parameters = inspect.signature(entry.builder).parameters
    check_argument_types(overrides, {k: p.annotation for k, p in parameters.items()},
                         model_name)
    try:
        return entry.builder(**entry.config(**overrides))
    except TypeError as err:
        raise KodeError(f"{model_name}: {err}") from None


_checking_arguments = contextvars.ContextVar("zoo_checking_arguments", default=False)


class _ArgumentsChecked(Exception):
    """Ends a builder called by :func:`check_model` once its arguments are validated."""


def arguments_checked() -> None:
    """A builder calls this once it has validated its arguments, before it builds anything:
    under :func:`check_model` the call ends there."""
    if _checking_arguments.get():
        raise _ArgumentsChecked


def check_model(model_name: str, /, **overrides) -> None:
    """Refuse what ``create_model(model_name, **overrides)`` would refuse for its arguments,
    without building anything (no TensorFlow work: callers check a run's settings before
    they configure TensorFlow's devices). A weights file is only checked to exist; whether it
    fits the architecture shows when the model is built."""
    token = _checking_arguments.set(True)
    try:
        create_model(model_name, **overrides)
    except _ArgumentsChecked:
        return
    finally:
        _checking_arguments.reset(token)
    raise RuntimeError(f"the builder of {model_name} built the model under check_model: it "
                       "must call zoo.registry.arguments_checked() before building")


def list_models(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style ``pattern`` (and ``family``), sorted naturally."""
    names = [n for n in _REGISTRY if fnmatch.fnmatch(n, pattern)]
    if family is not None:
        names = [n for n in names if _REGISTRY[n].family == family]
    return sorted(names, key=_natural_key)


def list_families() -> list[str]:
    return sorted({e.family for e in _REGISTRY.values()})


def family_integrator(family: str):
    """The :class:`~kode.integrators.Integrator` class of ``family``'s stages (its
    ``reversal``, ``uses_history``, …), None for a family without one (keras_resnet)."""
    from kode.integrators import INTEGRATORS

    for entry in _REGISTRY.values():
        if entry.family == family:
            spec = getattr(entry.builder, "integrator", None)
            return INTEGRATORS[spec] if isinstance(spec, str) else None
    raise KodeError(f"unknown family '{family}'; families: {', '.join(list_families())}")


def family_layouts(family: str) -> set[str]:
    """The layouts ("cifar", "imagenet") ``family`` has registered models of."""
    return {e.defaults["layout"] for e in _REGISTRY.values()
            if e.family == family and "layout" in e.defaults}


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _closest(name: str, n: int = 3) -> list[str]:
    """Most similar names; among equally similar ones, the nearest depth first."""
    depth = re.findall(r"\d+", name)

    def distance(candidate: str) -> float:
        other = re.findall(r"\d+", candidate)
        return abs(int(depth[0]) - int(other[0])) if depth and other else 0

    scored = [(difflib.SequenceMatcher(None, name, c).ratio(), c) for c in _REGISTRY]
    good = [(round(r, 3), c) for r, c in scored if r >= 0.6]
    return [c for _, c in sorted(good, key=lambda rc: (-rc[0], distance(rc[1])))[:n]]
