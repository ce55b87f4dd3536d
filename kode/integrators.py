"""One-step ODE integrators: the only place where the schemes of a residual stage live.

A stage integrates dx/dt = f(t, x) on a time grid t_n = n·h with one residual function f_n
per grid point. Each integrator is a short class (after diffrax's solvers):

- ``init_state(x, history, fns, h)`` turns the stage input into the integrator's state
  (a tuple of tensors: momentum carries a velocity, reversible Heun a second copy);
- ``step(n, state, fns, h, params)`` advances from t_n to t_{n+1};
- ``reverse_step(n, state, fns, h, params)`` goes back from t_{n+1} to t_n (exactly or
  approximately, as ``reversal`` declares; absent when ``reversal == "none"``);
- ``output(state)`` is the stage output x_N.

``fns`` is the list of residual functions as plain callables x ↦ f_n(x) (the training flag is
already bound), so integrators never see layers. ``params`` holds the integrator's own
trainable variables, created by ``create_variables`` through the stage layer (only LM has any).

(A little over 450 lines: nine schemes, each a short class; one module keeps them side by
side, as the table of schemes in docs/reference.md §2. LM's k_n bookkeeping outside the step
lives with its users: loading old files in the stage, per-step labels in kode.tools.stages.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import keras

State = tuple[Any, ...]
ResidualFn = Callable[[Any], Any]

EXACT = "exact"
APPROXIMATE = "approximate"
NO_REVERSAL = "none"


def scale(h: float, y):
    """h·y, or y itself when h == 1: bitwise the same (1·y == y for every float, NaN and ±0
    included) and one elementwise pass over the state fewer per evaluation, forward and
    backward; the classic ResNet/LM/Heun models have h = 1 (docs/performance.md)."""
    return y if h == 1.0 else h * y


class Integrator:
    """Base class. Subclasses declare ``name``, ``order``, ``reversal`` as class data."""

    name: ClassVar[str]
    order: ClassVar[int | None]
    reversal: ClassVar[str] = NO_REVERSAL
    #: True when the scheme needs x_{n-1} (LM): a transition then hands over P(x_n).
    uses_history: ClassVar[bool] = False
    #: Why the adjoint is refused when ``reversal == "none"`` (shown to the user).
    no_reversal_reason: ClassVar[str] = "has no reversal"
    #: Steps per stage beyond which the reversal's float32 rounding growth makes the adjoint
    #: inaccurate (None: no limit).
    max_adjoint_steps: int | None = None
    #: Residual functions one step evaluates with their own weights (RevNet's F and G: 2).
    functions_per_step: ClassVar[int] = 1
    #: The dtype of the residual stream under a mixed precision policy (f_n computing in
    #: bfloat16/float16), None: the policy's variable dtype, float32. A reversal whose rounding
    #: grows step by step (momentum's division by γ) needs more: a rebuilt state off by more
    #: than float32 rounding casts to another bfloat16 input of f_n at some coordinates, and
    #: each such flip changes f_n's output by a bfloat16 rounding step, which the next reverse
    #: steps amplify (measured: momentum adjoint vs backprop 9e-3 with a float32 stream, 0 with
    #: a float64 one).
    mixed_precision_stream: ClassVar[str | None] = None

    def residual_shape(self, state_shape: tuple) -> tuple:
        """The shape a residual function maps to itself, given the stage's (concatenated)
        state shape: the state's own shape unless the scheme splits it (RevNet's halves)."""
        return tuple(state_shape)

    def num_steps(self, num_functions: int) -> int:
        """Steps taken by a stage holding ``num_functions`` residual functions."""
        return num_functions

    def create_variables(
        self, layer: keras.layers.Layer, num_steps: int, has_history: bool
    ) -> list[keras.Variable]:
        """Create the scheme's own trainable variables on ``layer`` (none by default)."""
        return []

    def init_state(self, x, history, fns: Sequence[ResidualFn], h: float) -> State:
        return (x,)

    def output(self, state: State):
        return state[0]

    def step(self, n: int, state: State, fns: Sequence[ResidualFn], h: float, params) -> State:
        raise NotImplementedError

    def reverse_step(
        self, n: int, state: State, fns: Sequence[ResidualFn], h: float, params
    ) -> State:
        raise NotImplementedError(f"integrator '{self.name}' has no reversal")

    def reverse_replays(self, n: int) -> int:
        """The forward step (−1: ``init_state``) that first evaluated the functions that
        ``reverse_step(n)`` evaluates, whose random draws the reversal must repeat."""
        return n

    @property
    def reversible(self) -> bool:
        return self.reversal != NO_REVERSAL

    def get_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.get_config().items()))))


class Euler(Integrator):
    """Forward Euler (the ResNet): x_{n+1} = x_n + h f_n(x_n)."""

    name = "euler"
    order = 1
    reversal = APPROXIMATE

    def step(self, n, state, fns, h, params):
        (x,) = state
        return (x + scale(h, fns[n](x)),)

    def reverse_step(self, n, state, fns, h, params):
        # x_n ≈ x_{n+1} − h f_n(x_{n+1}): Euler with step −h, local error O(h²).
        (x,) = state
        return (x - scale(h, fns[n](x)),)


class _FunctionsOnGrid(Integrator):
    """Schemes that evaluate f at both ends of a step: N functions give N−1 steps.

    A stage holding a single function integrates the autonomous x' = f_0(x) in one step.
    """

    def num_steps(self, num_functions):
        return max(num_functions - 1, 1)

    @staticmethod
    def _next(fns, n):
        return fns[min(n + 1, len(fns) - 1)]


class Heun(_FunctionsOnGrid):
    """Heun's method with functions on the time grid (Sander et al.), N functions, N−1 steps.

    k1 = h f_n(x_n); k2 = h f_{n+1}(x_n + k1); x_{n+1} = x_n + (k1 + k2)/2.
    """

    name = "heun"
    order = 2
    reversal = APPROXIMATE

    def step(self, n, state, fns, h, params):
        (x,) = state
        k1 = scale(h, fns[n](x))
        k2 = scale(h, self._next(fns, n)(x + k1))
        return (x + 0.5 * (k1 + k2),)

    def reverse_step(self, n, state, fns, h, params):
        # Heun with step −h and the two functions swapped; local error O(h³).
        (x,) = state
        k2 = scale(h, self._next(fns, n)(x))
        return (x - 0.5 * (k2 + scale(h, fns[n](x - k2))),)


class LinearMultistep(Integrator):
    """LM-ResNet's two-step scheme (Lu et al. 2018, paper convention for k_n):

    u_{n+1} = (1 − k_n) u_n + k_n u_{n−1} + h f_n(u_n), one trainable scalar k_n per step,
    k_n ~ U(−0.1, 0) at init. Without a history (the network's first stage) step 0 is Euler
    and carries no k. Stable (root condition) for −1 < k_n ≤ 1.

    Computed on the state (u_n, d_n), d_n = u_n − u_{n−1} (d_0 = u_0 − P(u) after a
    transition): t = h f_n(u_n) − k_n d_n; u_{n+1} = u_n + t; d_{n+1} = t. The same map up to
    rounding, in three elementwise passes instead of four, and u_n feeds two ops (f_n and the
    sum), as in a ResNet, not four: its gradient is one two-term sum per step.

    A stage's k_n live in one variable ``lm_k`` of shape (K,), K the steps that carry one
    (entry i is step n = N − K + i): the optimizer updates one variable per stage, not K.
    """

    name = "lm"
    order = 1
    # The exact inverse u_{n−1} = (u_{n+1} − (1−k_n) u_n − h f_n(u_n)) / k_n divides by
    # k_n ≈ −0.05 and amplifies rounding ~20× per step: no usable reversal.
    reversal = NO_REVERSAL
    no_reversal_reason = "has no stable reversal (LM's exact inverse divides by k_n)"
    uses_history = True

    def __init__(self, k_init_range: tuple[float, float] = (-0.1, 0.0)):
        low, high = (float(v) for v in k_init_range)
        if not low <= high:
            raise ValueError(f"k_init_range must be (low, high), low <= high; got {k_init_range}")
        self.k_init_range = (low, high)

    def create_variables(self, layer, num_steps, has_history):
        num_k = num_steps - (0 if has_history else 1)
        if num_k < 1:
            return []
        # K scalar initializers drawn in order: the same seeds, hence the same k_n, as the
        # K scalar variables ``lm_k_<n>`` of earlier versions under the same Keras seed.
        draws = [keras.initializers.RandomUniform(*self.k_init_range) for _ in range(num_k)]
        return [layer.add_weight(
            name="lm_k", shape=(num_k,),
            initializer=lambda shape, dtype=None: keras.ops.stack([d((), dtype) for d in draws]),
            trainable=True,
            # Read in its own dtype, never autocast: the forward runs inside the layer's
            # autocast scope, the checkpoint's recomputation outside it, and both must see
            # the same k (the stream is float32 under mixed precision).
            autocast=False)]

    def init_state(self, x, history, fns, h):
        return (x, None if history is None else x - history)

    def step(self, n, state, fns, h, params):
        u, d = state
        t = scale(h, fns[n](u))
        if d is not None:
            (ks,) = params
            # k_n: a float32 variable under mixed precision, as the stream; cast for a plain
            # policy. t = h f + (−k) d, not h f − k d: the gradient of a difference negates a
            # full tensor, −k negates a scalar.
            k = keras.ops.cast(ks[n - (len(fns) - ks.shape[0])], u.dtype)
            t = t + (-k) * d
        return (u + t, t)

    def get_config(self):
        return {"k_init_range": list(self.k_init_range)}


class Momentum(Integrator):
    """Momentum ResNet (Sander et al. 2021): v_{n+1} = γ v_n + (1−γ) h f_n(x_n);
    x_{n+1} = x_n + v_{n+1}; v_0 = 0. With h = 1 this is the published form.

    The reversal v_n = (v_{n+1} − (1−γ) h f_n(x_n)) / γ is exact in exact arithmetic but
    amplifies float rounding by 1/γ per step.
    """

    name = "momentum"
    order = 1
    reversal = EXACT
    # The reversal divides by γ: float32 rounding, grown by γ^-N, would change f_n's
    # bfloat16 inputs (see Integrator.mixed_precision_stream).
    mixed_precision_stream = "float64"

    def __init__(self, gamma: float = 0.9):
        gamma = float(gamma)
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"momentum gamma must be in (0, 1), got {gamma}")
        self.gamma = gamma
        # Each reverse step divides by γ: float32 rounding (~1e-7) grows like γ^-N. Measured
        # (dense tanh stage, γ = 0.9): relative gradient error 4e-6 at N = 32, 4e-4 at N = 64.
        # Allow γ^-N ≤ 100, i.e. ~1e-5 error: N ≤ 43 for γ = 0.9, 458 for γ = 0.99.
        self.max_adjoint_steps = int(math.log(100.0) / math.log(1.0 / gamma))

    def init_state(self, x, history, fns, h):
        return (x, keras.ops.zeros_like(x))

    def step(self, n, state, fns, h, params):
        x, v = state
        v = self.gamma * v + (1.0 - self.gamma) * h * fns[n](x)
        return (x + v, v)

    def reverse_step(self, n, state, fns, h, params):
        x, v = state
        x = x - v
        return (x, (v - (1.0 - self.gamma) * h * fns[n](x)) / self.gamma)

    def get_config(self):
        return {"gamma": self.gamma}


class ReversibleHeun(_FunctionsOnGrid):
    """Reversible Heun (Kidger et al. 2021), N functions, N−1 steps, algebraically reversible:

    z_{n+1} = 2 y_n − z_n + h f_n(z_n); y_{n+1} = y_n + (h/2)(f_n(z_n) + f_{n+1}(z_{n+1})).

    The state carries f_n(z_n) so each step (and each reverse step) evaluates one function.
    """

    name = "reversible_heun"
    order = 2
    reversal = EXACT
    # A float32 reconstruction off by one rounding casts to another bfloat16 input of f_n at
    # a few coordinates; the reverse steps amplify the flip (measured at full size,
    # revheun_resnet56 adjoint vs backprop under mixed_bfloat16 with a float32 stream: 0.18
    # at h = 1, 3.2e-2 at h = 1/N; see Integrator.mixed_precision_stream).
    mixed_precision_stream = "float64"

    def init_state(self, x, history, fns, h):
        return (x, x, fns[0](x))

    def step(self, n, state, fns, h, params):
        y, z, fz = state
        z_next = 2.0 * y - z + h * fz
        fz_next = self._next(fns, n)(z_next)
        return (y + 0.5 * h * (fz + fz_next), z_next, fz_next)

    def reverse_replays(self, n):
        return n - 1  # f_n(z_n) was evaluated by step n−1 (or by init_state for n = 0)

    def reverse_step(self, n, state, fns, h, params):
        y_next, z_next, fz_next = state
        z = 2.0 * y_next - z_next - h * fz_next
        fz = fns[n](z)
        return (y_next - 0.5 * h * (fz + fz_next), z, fz)


class _PairedFunctions(Integrator):
    """Schemes whose step evaluates two residual functions of its own: 2N functions, N steps."""

    functions_per_step = 2

    def num_steps(self, num_functions):
        if num_functions % 2:
            raise ValueError(
                f"integrator '{self.name}' takes two residual functions per step; got an odd "
                f"number ({num_functions})"
            )
        return num_functions // 2


class PolyNet(Integrator):
    """PolyNet's poly-2 module (Lu et al.'s reading): with F_n = h f_n,

    u_{n+1} = u_n + F_n(u_n) + F_n(F_n(u_n)) = (I + F_n + F_n²) u_n,

    the truncated Neumann series of (I − F_n)^{-1}: an approximation of backward Euler
    u_{n+1} = u_n + F_n(u_{n+1}). Order 1 when f_n(0) = 0 (a linear f); otherwise
    F_n(F_n(u)) ≈ h f_n(0) and the scheme is not consistent with u' = f(u) as h → 0.
    """

    name = "polynet"
    order = 1
    reversal = APPROXIMATE

    def step(self, n, state, fns, h, params):
        (u,) = state
        fu = scale(h, fns[n](u))
        return (u + fu + scale(h, fns[n](fu)),)

    def reverse_step(self, n, state, fns, h, params):
        # Backward Euler's exact inverse u_n = u_{n+1} − F(u_{n+1}); for the poly-2 step
        # (I − F)(I + F + F²) = I − F³ (linear F): local error O(h³), O(h²) for nonlinear f.
        (u,) = state
        return (u - scale(h, fns[n](u)),)


class FractalNet(_PairedFunctions):
    """FractalNet's two-column join (Lu et al.'s reading), a 2nd-order Runge–Kutta step:

    u_{n+1} = k1 u_n + k2 (k3 u_n + f1(u_n)) + f2(k3 u_n + f1(u_n)), with FractalNet's
    averaging join (the mean of the shallow column u_n and the deep column v + h g2(v)):
    k1 = k2 = 1/2, k3 = 1, f1 = h g1, f2 = (h/2) g2, i.e. v = u_n + h g1(u_n),
    u_{n+1} = (u_n + v + h g2(v)) / 2 = u_n + (h/2)(g1(u_n) + g2(v)): Heun's method with the
    two stages' functions g1 = f_{2n} (at t_n) and g2 = f_{2n+1} (at t_{n+1}) apart.
    """

    name = "fractalnet"
    order = 2
    reversal = APPROXIMATE

    def step(self, n, state, fns, h, params):
        (u,) = state
        v = u + scale(h, fns[2 * n](u))
        return (0.5 * (u + v + scale(h, fns[2 * n + 1](v))),)

    def reverse_step(self, n, state, fns, h, params):
        # The join run with step −h, stages swapped (as Heun's reversal): local error O(h³)
        # when g1 ≈ g2, O(h²) otherwise.
        (u,) = state
        w = scale(h, fns[2 * n + 1](u))
        return (u - 0.5 * (w + scale(h, fns[2 * n](u - w))),)


class RevNet(_PairedFunctions):
    """RevNet (Gomez et al. 2017; Lu et al.: forward Euler on a coupled system). The state is
    the pair of channel halves (X, Y) of x; F_n = f_{2n} and G_n = f_{2n+1} act on half the
    channels:

    X_{n+1} = X_n + h F_n(Y_n);  Y_{n+1} = Y_n + h G_n(X_{n+1}).

    Exactly reversible, no division: Y_n = Y_{n+1} − h G_n(X_{n+1}); X_n = X_{n+1} − h F_n(Y_n).
    """

    name = "revnet"
    order = 1
    reversal = EXACT
    # As reversible Heun's: with a float32 stream, revnet110's adjoint under mixed_bfloat16
    # was 0.19 from backprop (one rounding of X + F undone by − F is not always exact).
    mixed_precision_stream = "float64"

    def residual_shape(self, state_shape):
        channels = state_shape[-1]
        if channels is not None and channels % 2:
            raise ValueError(
                f"integrator 'revnet' splits the state's channels in two halves; got an odd "
                f"number of channels ({channels})"
            )
        return (*state_shape[:-1], None if channels is None else channels // 2)

    def init_state(self, x, history, fns, h):
        half = x.shape[-1] // 2
        return (x[..., :half], x[..., half:])

    def output(self, state):
        return keras.ops.concatenate(state, axis=-1)

    def step(self, n, state, fns, h, params):
        x, y = state
        x = x + scale(h, fns[2 * n](y))
        return (x, y + scale(h, fns[2 * n + 1](x)))

    def reverse_step(self, n, state, fns, h, params):
        x, y = state
        y = y - scale(h, fns[2 * n + 1](x))
        return (x - scale(h, fns[2 * n](y)), y)


class PostActivationEuler(Integrator):
    """The post-activation ResNet block (He et al. 2016a, keras.applications ResNet50/101/152):
    x_{n+1} = relu(x_n + h f_n(x_n)). Not an integrator step of x' = f(x): the ReLU after the
    sum clips every negative coordinate, so x_n cannot be rebuilt from x_{n+1}.
    """

    name = "post_activation_euler"
    order = None
    reversal = NO_REVERSAL
    no_reversal_reason = (
        "cannot be reversed: relu(x + f(x)) is not invertible (the ReLU after the sum maps "
        "every negative coordinate to 0, so x_n cannot be rebuilt from x_{n+1})"
    )

    def step(self, n, state, fns, h, params):
        (x,) = state
        return (keras.ops.relu(x + scale(h, fns[n](x))),)


INTEGRATORS: dict[str, type[Integrator]] = {
    cls.name: cls
    for cls in (Euler, Heun, LinearMultistep, Momentum, ReversibleHeun, PolyNet, FractalNet,
                RevNet, PostActivationEuler)
}


def get_integrator(spec: str | dict | Integrator, **kwargs) -> Integrator:
    """An integrator from its name (``"euler"``…), a ``{"name", "config"}`` dict or itself."""
    if isinstance(spec, Integrator):
        return spec
    if isinstance(spec, dict):
        return get_integrator(spec["name"], **{**spec.get("config", {}), **kwargs})
    if not isinstance(spec, str):
        raise TypeError(f"integrator must be a name, a dict or an Integrator, got {spec!r}")
    if spec not in INTEGRATORS:
        raise ValueError(f"unknown integrator '{spec}'; known: {', '.join(sorted(INTEGRATORS))}")
    return INTEGRATORS[spec](**kwargs)


def serialize_integrator(integrator: Integrator) -> dict:
    return {"name": integrator.name, "config": integrator.get_config()}
