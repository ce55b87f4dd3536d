"""Activation memory of one training step of an integrator stage, as TensorFlow's CPU
allocator counts it: the library's memory claims (the adjoint flat in the number of steps N,
checkpointing ∝ √N, backprop ∝ N) tested on small stages.

Each measurement is the allocator's peak during one step (a warm, traced step) minus the
bytes in use before it: what the step adds, in MiB. The allocator keeps statistics only as
TensorFlow's BFC allocator, chosen by an environment variable before TensorFlow starts, so
:func:`measure_stage_steps` runs the steps in one child process (``python -m
kode.testing.memory CONFIGS``) with ``TF_CPU_ALLOCATOR_USE_BFC=true``.

TensorFlow's default inter-op scheduling, as users train: two independent ops may overlap
and hold their scratch buffers at once, a chance event, so each step runs ``repeats`` times
and the smallest increment counts. (With one inter-op thread the Euler adjoint's and the
checkpoint's side work queues up and their memory grows with N: measured 5.6 → 18.7 MiB
for the adjoint from N = 4 to 16 on a 0.5 MiB state, against 4.0 → 4.2 with the default.)
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

#: the line before the child's JSON result (TensorFlow may print before it).
_RESULT = "kode.testing.memory result: "
#: the environment variable naming the child's XLA dump folder.
_DUMP = "KODE_TESTING_XLA_DUMP"


@dataclass(frozen=True)
class StageStep:
    """One training step of a stage of ``n`` steps of ``integrator`` (BasicBlocks on a
    ``size``×``size``×``channels`` state; RevNet's on half the channels), ``batch`` examples,
    in gradient ``mode``; ``eager``: under an eager GradientTape, else a ``tf.function``
    (``jit``: compiled by XLA)."""

    integrator: str
    n: int
    mode: str
    size: int = 16
    channels: int = 16
    batch: int = 32
    eager: bool = False
    jit: bool = False
    #: a zoo model's name: its training step on ``size``×``size``×3 inputs (``integrator``
    #: and ``n`` are then only labels) instead of a stage's
    model: str = ""

    @property
    def state_mib(self) -> float:
        """One float32 state of the stage, MiB."""
        return self.batch * self.size * self.size * self.channels * 4 / 2**20


def measure_stage_steps(steps: list[StageStep], timeout: float = 600.0) -> list[float]:
    """The memory (MiB) of each step in ``steps``, in one child process: the allocator peak
    increment, or for a ``jit`` step the bytes of XLA's buffer assignment of the compiled step
    (exact; the BFC allocator hands XLA's one large temporary buffer a whole region of a
    doubling size, so its peak only shows powers of two there)."""
    return [m["mib"] for m in measure_stage_steps_timed(steps, timeout)]


def measure_stage_steps_timed(steps: list[StageStep], timeout: float = 600.0) -> list[dict]:
    """As :func:`measure_stage_steps`, each as ``{"mib", "first_s", "next_s"}``: the memory,
    the seconds of the first call (building, tracing, XLA compiling and running it) and of the
    next (the smallest of the repeats)."""
    with tempfile.TemporaryDirectory() as dump:
        # TensorFlow's own thread pools, as users train, whatever the caller set.
        env = {**{k: v for k, v in os.environ.items() if k != "TF_NUM_INTRAOP_THREADS"},
               "TF_CPU_ALLOCATOR_USE_BFC": "true", "TF_CPP_MIN_LOG_LEVEL": "3",
               _DUMP: dump, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                         f"--xla_dump_to={dump}".strip()}
        done = subprocess.run(
            [sys.executable, "-m", "kode.testing.memory",
             json.dumps([asdict(s) for s in steps])],
            env=env, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
    if done.returncode or not lines:
        raise RuntimeError(f"memory child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(_RESULT))


def _stage(step: StageStep):
    import keras

    if step.model:
        import zoo

        keras.utils.set_random_seed(0)
        return zoo.create_model(step.model, gradient=step.mode,
                                input_shape=(step.size, step.size, 3))

    from kode.integrators import get_integrator
    from kode.layers import BasicBlock, IntegratorStage

    integrator = get_integrator(step.integrator)
    width = step.channels // 2 if integrator.functions_per_step == 2 else step.channels
    functions = next(k for k in range(step.n, 2 * step.n + 2)  # Heun-type: N + 1 for N
                     if _steps(integrator, k) == step.n)
    keras.utils.set_random_seed(0)
    return IntegratorStage([BasicBlock(width, name=f"f{i}") for i in range(functions)],
                           integrator, gradient=step.mode)


def _steps(integrator, functions: int) -> int | None:
    try:
        return integrator.num_steps(functions)
    except ValueError:  # RevNet: an odd number of functions
        return None


def _xla_buffer_mib(name: str) -> float:
    """'Total bytes used' of XLA's buffer assignment for the compiled tf.function ``name``."""
    used = [int(m[1]) for path in glob.glob(os.path.join(os.environ[_DUMP], f"*{name}_*"
                                                          "buffer-assignment.txt"))
            if (m := re.search(r"Total bytes used: (\d+)", open(path).read()))]
    if not used:
        raise RuntimeError(f"no XLA buffer assignment was dumped for {name}")
    return max(used) / 2**20


def _peak_increment(step: StageStep, index: int = 0, repeats: int = 3) -> dict:
    import time

    import numpy as np
    import tensorflow as tf

    start = time.perf_counter()
    stage = _stage(step)
    x = tf.constant(np.random.default_rng(0).standard_normal(
        (step.batch, step.size, step.size, 3 if step.model else step.channels)), tf.float32)
    stage(x)

    def train_step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(stage(x, training=True)))
        grads = tape.gradient(loss, stage.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    name = f"kode_memory_step_{index}"  # names the XLA dump's files
    train_step.__name__ = name
    if not step.eager:
        train_step = tf.function(train_step, jit_compile=step.jit)
    float(train_step(x))  # traced (and compiled), scratch pools grown
    first = time.perf_counter() - start
    increments, seconds = [], []
    for _ in range(repeats):
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        tf.config.experimental.reset_memory_stats("CPU:0")
        start = time.perf_counter()
        float(train_step(x))
        seconds.append(time.perf_counter() - start)
        increments.append(tf.config.experimental.get_memory_info("CPU:0")["peak"] - before)
    mib = _xla_buffer_mib(name) if step.jit else min(increments) / 2**20
    return {"mib": mib, "first_s": first, "next_s": min(seconds)}


def _main(argv: list[str]) -> None:
    steps = [StageStep(**c) for c in json.loads(argv[0])]
    print(_RESULT + json.dumps([_peak_increment(s, i) for i, s in enumerate(steps)]),
          flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
