"""Peak training memory and step time of the gradient modes (backprop, checkpoint, adjoint,
Keras remat), each configuration measured in its own Python process.

    python -m benchmarks.gradient_memory [--quick] [--out docs]

Sweeps: one ``IntegratorStage`` of N ``BasicBlock(16)`` (Euler, reversible Heun) for N up to
256; the zoo's ResNet-110 and ResNet-1202; activation
memory against depth of the zoo's CIFAR ResNets (``depth``, in :mod:`benchmarks.depth_memory`).
Writes ``<out>/gradients.md`` and ``<out>/gradients_{memory,time,depth}.png``; the method is
described in the doc (``METHOD`` below) and in :func:`run_worker`.

A worker configuration's ``mode`` may carry ``"recompute": bool`` (passed to
``kode.layers.set_gradient_mode`` after the build: recomputation outside the stages in
checkpoint/adjoint mode); a paired configuration's ``modes`` may name variants such as
``"adjoint (stages only)"`` (:func:`benchmarks.depth_memory.variant`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import depth_memory
from benchmarks import record as run_record
from benchmarks.depth_memory import split_variant, variant
from benchmarks.record import machine_description

MODES = ("backprop", "checkpoint", "adjoint", "remat")
STAGE_INTEGRATORS = ("euler", "reversible_heun")
#: integrators whose adjoint differentiates the reverse step's evaluations (exact reversals)
REUSING = ("reversible_heun",)
#: adjoint step time ≤ limit × backprop's.
TIME_TARGETS = (("euler", 1.6), ("reversible_heun", 1.4))
RESULT_PREFIX = "RESULT "

# ---------------------------------------------------------------------------------- worker


def _status_kib(key: str, pid: int | str = "self") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS: resident now, VmHWM: peak resident)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``clear_refs`` value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_free_heap() -> None:
    """Give freed malloc pages back to the OS so that VmRSS at rest counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is then an upper bound
        pass


def set_recompute(model, mode: str, recompute: bool) -> None:
    """``kode.layers.set_gradient_mode(model, mode, recompute=recompute)`` for checkpoint and
    adjoint: whether the layers outside the stages keep only their input and recompute
    (backprop has nothing to recompute, so its models are left as built)."""
    if mode in depth_memory.RECOMPUTING:
        from kode.layers import set_gradient_mode

        set_gradient_mode(model, mode, recompute=recompute)


def _build_model(cfg: dict):
    """(model, input shape, stage steps) of a worker configuration: ``kind`` "stage" (one
    ``IntegratorStage`` of ``n`` BasicBlocks) or "zoo" (``model``, optionally refined ×
    ``refine``); its stages in ``mode`` (remat: backprop), and ``recompute`` if given."""
    import keras

    from kode.integrators import get_integrator
    from kode.layers.blocks import BasicBlock
    from kode.layers.stage import IntegratorStage

    mode = cfg["mode"]
    gradient = "backprop" if mode == "remat" else mode
    if cfg["kind"] == "stage":
        size, channels = cfg.get("size", 32), cfg.get("channels", 16)
        inputs = keras.Input((size, size, channels))
        # N residual functions on the part of the state the scheme gives them (RevNet: halves).
        f_channels = get_integrator(cfg["integrator"]).residual_shape((channels,))[-1]
        fns = [BasicBlock(f_channels, name=f"f{i}") for i in range(cfg["n"])]
        stage = IntegratorStage(fns, cfg["integrator"], step_size="ode", gradient=gradient,
                                name="stage")
        x = stage(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(10, activation="softmax")(x)
        return keras.Model(inputs, outputs), (size, size, channels), stage.num_steps
    import zoo

    shape = (cfg.get("input_size", 32),) * 2 + (3,)
    model = zoo.create_model(cfg["model"], gradient=gradient, input_shape=shape,
                             classes=cfg.get("classes", 10))
    if cfg.get("refine", 1) != 1:  # Sander et al.'s untying: m steps of h/m per step
        from kode.tools.refine import refine

        model = refine(model, cfg["refine"])
    if "recompute" in cfg:  # after refine, which copies the stages
        set_recompute(model, gradient, bool(cfg["recompute"]))
    from kode.layers.stage import integrator_stages

    stages = integrator_stages(model)
    return model, shape, sum(s.num_steps for s in stages)


def _allocator_stats() -> dict:
    """Bytes in use / peak of TensorFlow's CPU allocator (oneDNN's BFC pool on x86 Linux)."""
    import tensorflow as tf

    try:
        return tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):
        return {"current": 0, "peak": 0}


def _reset_allocator_peak() -> None:
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        pass


def _train_step(cfg: dict, mode: str):
    """(model, SGD train step, input shape, integrator steps) for ``mode`` (a gradient mode,
    "remat", or a variant label such as "adjoint (stages only)"); the step is a
    ``tf.function`` with a dynamic batch dimension unless ``cfg["eager"]``."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg.get("seed", 0))
    mode, recompute = split_variant(mode)
    cfg = {**cfg, "mode": mode, **({} if recompute is None else {"recompute": recompute})}
    if mode == "remat":
        with keras.RematScope(mode=cfg.get("remat_mode", "activations")):
            model, shape, num_steps = _build_model(cfg)
    else:
        model, shape, num_steps = _build_model(cfg)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables

    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return loss

    if not cfg.get("eager"):
        train_step = tf.function(
            train_step, jit_compile=bool(cfg.get("jit", False)), reduce_retracing=True,
            input_signature=[tf.TensorSpec((None, *shape), tf.float32),
                             tf.TensorSpec((None,), tf.int32)],
        )
    return model, train_step, shape, num_steps


def _data(batch: int, shape):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    return (tf.constant(rng.standard_normal((batch, *shape)), tf.float32),
            tf.constant(rng.integers(0, 10, batch), tf.int32))


def run_pair_worker(cfg: dict) -> dict:
    """Time the modes ``cfg["modes"]`` of one configuration in one process, alternating their
    steps in a random order per round (:func:`benchmarks.paired.alternate`) so that load on
    the machine hits all of them alike. Reports per-mode medians and the median over rounds
    of the per-round time ratio to the first mode with its bootstrap 95% interval; ``fwd`` is
    a forward pass of the first mode's model (training mode)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    modes = list(cfg["modes"])
    steps, num_steps = {}, None
    for mode in modes:
        model, steps[mode], shape, num_steps = _train_step(cfg, mode)
        if mode == modes[0]:
            forward = tf.function(lambda x, model=model: model(x, training=True),
                                  reduce_retracing=True,
                                  input_signature=[tf.TensorSpec((None, *shape), tf.float32)])
    x, y = _data(cfg["batch"], shape)
    steps["fwd"] = lambda x, y: forward(x)
    for name in (*modes, "fwd"):  # trace, then one untimed full-batch step
        float(tf.reduce_sum(steps[name](x[:1], y[:1])))
        float(tf.reduce_sum(steps[name](x, y)))
    from benchmarks.paired import alternate, median_interval, ratios

    times = alternate({name: lambda name=name: float(tf.reduce_sum(steps[name](x, y)))
                       for name in (*modes, "fwd")}, cfg.get("rounds", 5))
    intervals = {m: median_interval(ratios(times[m], times[modes[0]])) for m in modes[1:]}
    return {**cfg, "num_steps": num_steps, "times_s": times,
            "step_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio": {m: v[0] for m, v in intervals.items()},
            "interval": {m: v[1:] for m, v in intervals.items()}, "finite": True}


def run_worker(cfg: dict) -> dict:
    """Measure one configuration in this process (call it in a fresh process).

    1. build the model and an SGD ``tf.function`` train step with a dynamic batch dimension;
    2. trace it and run it once on a batch of 1 (graph optimization, executor, kernels:
       everything but the batch-sized memory; under XLA, which compiles per shape, this
       warm-up step uses the full batch instead);
    3. baseline: VmRSS after ``malloc_trim``; reset VmHWM and the allocator's peak;
    4. ``warmup`` + ``steps`` full-batch steps (only the last ``steps`` are timed);
    5. increment = VmHWM − baseline (and the allocator's peak − its bytes in use at 3).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    if cfg.get("inter_op_threads"):
        # 1: one op at a time, so the peak holds one op's scratch buffer, not as many as
        # ops that happen to overlap (a schedule-dependent constant, see the module doc).
        tf.config.threading.set_inter_op_parallelism_threads(cfg["inter_op_threads"])
    if cfg.get("record_forward"):
        # Negative control for the tests: let an outer tape record the adjoint's forward
        # (what happens without stop_recording), so its activations stay alive.
        import contextlib

        import kode.gradients

        kode.gradients.stop_recording = contextlib.nullcontext

    jit = bool(cfg.get("jit", False))
    t0 = time.perf_counter()
    model, train_step, shape, num_steps = _train_step(cfg, cfg["mode"])
    batch = cfg["batch"]
    x, y = _data(batch, shape)
    _release_free_heap()
    rss_built = _status_kib("VmRSS")

    t1 = time.perf_counter()
    first = batch if jit else 1
    float(train_step(x[:first], y[:first]))
    trace_s = time.perf_counter() - t1

    _release_free_heap()
    baseline = _status_kib("VmRSS")
    alloc_baseline = _allocator_stats()["current"]
    _reset_peak_rss()
    _reset_allocator_peak()
    times, losses, step_peaks = [], [], []
    warmup = cfg.get("warmup", 1)
    for i in range(warmup + cfg.get("steps", 5)):
        t = time.perf_counter()
        loss = float(train_step(x, y))
        if i >= warmup:
            times.append(time.perf_counter() - t)
        losses.append(loss)
        # Each step's own allocator peak (the pool keeps RSS at the first step's peak, so
        # only the allocator shows a later step's): a schedule-dependent overlap shows.
        step_peaks.append(_allocator_stats()["peak"])
        _reset_allocator_peak()
    peak = _status_kib("VmHWM")
    alloc_peak = max(step_peaks)
    forward_s = None
    if cfg.get("time_forward"):  # cost of one forward in training mode (for the cost model)
        forward = tf.function(lambda x: model(x, training=True), jit_compile=jit)
        forward(x)
        ts = []
        for _ in range(cfg.get("steps", 5)):
            t = time.perf_counter()
            forward(x).numpy()
            ts.append(time.perf_counter() - t)
        forward_s = statistics.median(ts)
    return {
        **cfg,
        "num_steps": num_steps,
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "rss_built_mb": rss_built / 1024,
        "baseline_mb": baseline / 1024,
        "peak_mb": peak / 1024,
        "increment_mb": (peak - baseline) / 1024,
        "allocator_increment_mb": (alloc_peak - alloc_baseline) / 2**20,
        "step_allocator_increments_mb": [(p - alloc_baseline) / 2**20 for p in step_peaks],
        "step_times_s": times,
        "step_s": statistics.median(times),
        "forward_s": forward_s,
        "trace_s": trace_s,
        "build_s": t1 - t0,
        "losses": losses,
        "finite": bool(np.all(np.isfinite(losses))),
    }


# ---------------------------------------------------------------------------------- parent


def _mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 1 << 60


def measure(cfg: dict, timeout: float = 1800.0, mem_cap_gb: float = 16.0,
            min_available_gb: float = 2.0) -> dict:
    """Run ``cfg`` in a fresh ``python -m benchmarks.gradient_memory --worker`` process.

    The worker is killed (by its pid) when its RSS exceeds ``mem_cap_gb``, when the machine's
    available memory falls under ``min_available_gb`` or after ``timeout`` seconds.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    # The standard tensorflow wheel's CPU allocator keeps no statistics unless it is the BFC
    # allocator ("Allocator stats not available"); tensorflow-cpu's was BFC by default.
    env.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gradient_memory", "--worker", json.dumps(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
    )
    start, killed, max_rss = time.monotonic(), None, 0
    while proc.poll() is None:
        try:
            rss = _status_kib("VmRSS", proc.pid)
        except (OSError, KeyError):
            rss = 0
        max_rss = max(max_rss, rss)
        if rss > mem_cap_gb * 2**20:
            killed = f"RSS > {mem_cap_gb:g} GB cap"
        elif _mem_available_kib() < min_available_gb * 2**20:
            killed = f"machine below {min_available_gb:g} GB available"
        elif time.monotonic() - start > timeout:
            killed = f"timeout {timeout:g} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.monotonic() - start
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "wall_s": wall}
    tail = " | ".join(err.strip().splitlines()[-3:])
    return {**cfg, "error": killed or f"exit {proc.returncode}: {tail}", "wall_s": wall,
            "max_rss_mb": max_rss / 1024}


def _rotated(items, k: int) -> list:
    items = list(items)
    k %= len(items)
    return items[k:] + items[:k]


def stage_configs(ns, integrators, modes, batch, steps, warmup, repeats=1) -> list[dict]:
    """The stage sweep, interleaved: every (N, integrator) runs its modes back to back in an
    order rotated from one group to the next, so no mode always runs first or last."""
    configs, k = [], 0
    for rep in range(repeats):
        for n in ns:
            for integrator in integrators:
                for mode in _rotated(modes, k):
                    configs.append({"sweep": "stage", "kind": "stage", "integrator": integrator,
                                    "n": n, "mode": mode, "batch": batch, "steps": steps,
                                    "warmup": warmup, "rep": rep,
                                    "time_forward": mode == "backprop"})
                k += 1
    return configs


def timing_configs(ns, integrators, batch, rounds) -> list[dict]:
    """Paired timing: backprop and adjoint alternate step by step in one process."""
    return [{"sweep": "timing", "kind": "stage", "integrator": integrator, "n": n,
             "mode": "pair", "modes": ["backprop", "adjoint"], "batch": batch,
             "rounds": rounds, "rep": 0}
            for n in ns for integrator in integrators]


def zoo_timing_configs(runs) -> list[dict]:
    """Paired timing of whole networks: (model, batch, rounds); backprop and adjoint alternate."""
    return [{"sweep": "timing", "kind": "zoo", "model": model, "batch": batch, "mode": "pair",
             "modes": ["backprop", "adjoint"], "rounds": rounds, "rep": 0}
            for model, batch, rounds in runs]


def overhead_configs(ns) -> list[dict]:
    """The Euler adjoint at batch 1: what grows with N when activations are negligible."""
    return [{"sweep": "overhead", "kind": "stage", "integrator": "euler", "n": n,
             "mode": "adjoint", "batch": 1, "steps": 2, "warmup": 1, "rep": 0} for n in ns]


def zoo_configs(runs, modes) -> list[dict]:
    """``runs``: (model, batch, steps, warmup, modes or None) tuples."""
    configs, k = [], 0
    for model, batch, steps, warmup, only in runs:
        for mode in _rotated(only or modes, k):
            configs.append({"sweep": "zoo", "kind": "zoo", "model": model, "mode": mode,
                            "batch": batch, "steps": steps, "warmup": warmup, "rep": 0})
        k += 1
    return configs


def _key(r: dict) -> tuple:
    if r["kind"] == "stage":
        return (r["sweep"], r["integrator"], r["n"], r["mode"])
    return (r["sweep"], r["model"], r["batch"], variant(r))


def aggregate(results: list[dict]) -> dict:
    """Per configuration: medians over its processes (one unless ``--repeats``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(_key(r), []).append(r)
    table = {}
    for key, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            table[key] = {"error": rs[0]["error"], "max_rss_mb": rs[0].get("max_rss_mb", 0),
                          "runs": len(rs)}
            continue
        if key[0] == "timing":
            table[key] = {
                "step_s": {m: statistics.median(r["step_s"][m] for r in ok)
                           for m in ok[0]["step_s"]},
                "ratio": {m: statistics.median(r["ratio"][m] for r in ok)
                          for m in ok[0]["ratio"]},
                "rounds": ok[0]["rounds"], "runs": len(ok), "num_steps": ok[0]["num_steps"],
                **({"interval": ok[0]["interval"]} if len(ok) == 1 and "interval" in ok[0]
                   else {}),
            }
            continue

        def med(field, ok=ok):
            vals = [r[field] for r in ok if r.get(field) is not None]
            return statistics.median(vals) if vals else None

        table[key] = {
            "increment_mb": med("increment_mb"),
            "allocator_increment_mb": med("allocator_increment_mb"),
            "step_s": med("step_s"),
            "forward_s": med("forward_s"),
            "baseline_mb": med("baseline_mb"),
            "num_steps": ok[0]["num_steps"],
            "batch": ok[0]["batch"],
            "timed_steps": ok[0]["steps"],
            "finite": all(r["finite"] for r in ok),
            "runs": len(ok),
            "inter_op_threads": ok[0].get("inter_op_threads", 0),
            "step_allocator_increments_mb": [
                v for r in ok for v in r.get("step_allocator_increments_mb", [])],
        }
    return table


# ------------------------------------------------------------------------------- reporting


def _ok(row) -> bool:
    return bool(row) and "error" not in row


def _mb(row) -> str:
    if row is None:
        return "—"
    if "error" in row:
        return f"killed: {row['error']}"
    return f"{row['increment_mb']:.0f} ({row['allocator_increment_mb']:.0f})"


def _sec(row) -> str:
    if not _ok(row):
        return "—"
    t = row["step_s"]
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 10 else f"{t:.1f}"


def _ratio(a, b, field: str = "increment_mb") -> float | None:
    if not _ok(a) or not _ok(b) or not b[field]:
        return None
    return a[field] / b[field]


def _r(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def plot(table: dict, out: Path, prefix: str = "gradients", footer: str | None = None
         ) -> list[str]:
    """Memory and step time vs N per stage integrator: ``<prefix>_memory.png``/``_time.png``;
    activation memory vs depth (the depth sweep): ``<prefix>_depth.png``.

    ``footer`` (e.g. the command and seeds of the run) is printed in the figure's corner.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = depth_memory.plot(table, out, prefix)
    keys = [k for k in table if k[0] == "stage"]
    integrators = [i for i in STAGE_INTEGRATORS if any(k[1] == i for k in keys)]
    if not integrators:
        return files
    ns = sorted({k[2] for k in keys})
    for field, ylabel, fname in (
        ("increment_mb", "peak RSS increment over the built model (MB)", f"{prefix}_memory.png"),
        ("step_s", "median training-step time (s)", f"{prefix}_time.png"),
    ):
        fig, axes = plt.subplots(1, len(integrators), figsize=(5.5 * len(integrators), 4.2),
                                 sharey=True, squeeze=False)
        colors = dict(zip(MODES, ("C0", "C1", "C2", "C3"), strict=True))
        for ax, integrator in zip(axes[0], integrators, strict=True):
            for mode, style in zip(MODES, ("o-", "s-", "^-", "x--"), strict=True):
                pts = [(n, table[k][field]) for n in ns
                       if _ok(table.get(k := ("stage", integrator, n, mode)))]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=mode, color=colors[mode],
                            alpha=0.45 if field == "step_s" else 1.0)
            if field == "step_s":  # the paired timing, the numbers the targets use
                for mode in ("backprop", "adjoint"):
                    pts = sorted((k[2], v["step_s"][mode]) for k, v in table.items()
                                 if k[0] == "timing" and k[1] == integrator and _ok(v))
                    if pts:
                        ax.plot(*zip(*pts, strict=True), "D-", color=colors[mode], lw=2.2,
                                markerfacecolor="white", label=f"{mode}, paired")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"one stage, {integrator}")
            ax.set_xlabel("N residual functions (BasicBlock(16))")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend()
        fig.tight_layout()
        if footer:
            # Below the axes (bbox "tight" grows the canvas to include it).
            fig.text(0.005, -0.01, footer, fontsize=7, color="0.4", ha="left", va="top")
        fig.savefig(out / fname, dpi=100, bbox_inches="tight" if footer else None)
        plt.close(fig)
        files.append(fname)
    return files


def _stage_tables(table: dict, meta: dict) -> list[str]:
    keys = [k for k in table if k[0] == "stage"]
    if not keys:
        return []
    ns = sorted({k[2] for k in keys})
    any_row = next(table[k] for k in keys if _ok(table[k]))
    batch = meta.get("stage_batch", 32)
    lines = [
        "## Sweep 1: one stage of N residual functions",
        "",
        f"An `IntegratorStage` of N `kode.BasicBlock(16)` (`step_size=\"ode\"`, h = 1/steps) "
        f"on a {batch}×32×32×16 float32 state ({batch * 32 * 32 * 16 * 4 / 2**20:.0f} MiB), then "
        "global average pooling and a 10-way softmax; reversible Heun runs N−1 steps with N "
        f"functions. Per process: trace + one batch-1 step, {meta.get('stage_warmup', 1)} "
        f"untimed and {any_row['timed_steps']} timed full-batch steps.",
        "",
        "Memory cells: **RSS peak increment in MB** (in parentheses: peak of TensorFlow's CPU "
        "allocator over its bytes in use at the baseline, MiB). Times: median step, seconds. "
        "`fwd` is the median time of a forward pass alone (training mode, same `tf.function` "
        "setup), used in the cost model below.",
        "",
    ]
    for integrator in STAGE_INTEGRATORS:
        rows_n = [n for n in ns if any(("stage", integrator, n, m) in table for m in MODES)]
        if not rows_n:
            continue
        lines += [
            f"### {integrator}",
            "",
            "| N | " + " | ".join(f"{m} MB" for m in MODES) + " | "
            + " | ".join(f"{m} s" for m in MODES) + " | fwd s | adj/bp MB | adj/bp time |",
            "|" + "---:|" * (2 * len(MODES) + 4),
        ]
        for n in rows_n:
            row = {m: table.get(("stage", integrator, n, m)) for m in MODES}
            bp = row["backprop"]
            lines.append(
                f"| {n} | " + " | ".join(_mb(row[m]) for m in MODES) + " | "
                + " | ".join(_sec(row[m]) for m in MODES) + " | "
                + (f"{bp['forward_s']:.3f}" if _ok(bp) and bp.get("forward_s") else "—") + " | "
                + _r(_ratio(row["adjoint"], bp), 3) + " | "
                + _r(_ratio(row["adjoint"], bp, "step_s")) + " |"
            )
        lines.append("")
    lines += ["![peak memory increment vs N](gradients_memory.png)", "",
              "![training-step time vs N](gradients_time.png)", ""]
    return lines


def _timing_table(table: dict) -> list[str]:
    keys = [k for k in table if k[0] == "timing" and k[1] in STAGE_INTEGRATORS]
    if not keys:
        return []
    rounds = next(table[k]["rounds"] for k in keys if _ok(table[k]))
    lines = [
        "## Step time, paired",
        "",
        "Single-process step times on a shared 2-core machine vary by ±30% with other jobs "
        "(compare backprop and remat above, the same computation). For the time targets each "
        "process below builds the backprop and the adjoint model of one configuration and "
        f"alternates their steps for {rounds} rounds (backprop, adjoint and F in a random order "
        "per round; F: a forward pass of the backprop model in training mode), after one "
        "untimed full-batch step each. Ratio: median over rounds of adjoint/backprop within the "
        "round, with a bootstrap 95% interval of that median in brackets (`benchmarks/"
        "paired.py`).",
        "",
        "| integrator | N | backprop s | adjoint s | fwd s | adjoint/backprop [95%] | "
        "fwd/backprop | predicted 1 + 2·fwd/bp | 1 + fwd/bp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in sorted(keys, key=lambda k: (STAGE_INTEGRATORS.index(k[1]), k[2])):
        row = table[k]
        if not _ok(row):
            lines.append(f"| {k[1]} | {k[2]} | {_mb(row)} | | | | | |")
            continue
        t = row["step_s"]
        f = t["fwd"] / t["backprop"]
        lines.append(f"| {k[1]} | {k[2]} | {t['backprop']:.3f} | {t['adjoint']:.3f} | "
                     f"{t['fwd']:.3f} | {_with_interval(row)} | {f:.2f} | "
                     f"{1 + 2 * f:.2f} | {1 + f:.2f} |")
    return lines + [""]


def _zoo_table(table: dict) -> list[str]:
    keys = [k for k in table if k[0] == "zoo"]
    if not keys:
        return []
    runs = {(k[1], k[2]) for k in keys} | {
        (k[1], k[2]) for k in table if k[0] == "timing" and k[1] not in STAGE_INTEGRATORS}
    runs = sorted(runs, key=lambda mb: (len(mb[0]), mb[0], mb[1]))
    modes = [m for m in ("backprop", "checkpoint", "adjoint", "remat")
             if any(k[3] == m for k in keys)]
    lines = [
        "## Sweep 2: whole zoo networks (`zoo.create_model(name, gradient=...)`, 32×32×3, "
        "10 classes)",
        "",
        "Transitions run the builder's default `recompute` (sweep 3 compares recomputation "
        "on and off); `stage steps` is the number of integrator steps in "
        "the model's stages. Memory cells as above (RSS MB, allocator MiB in parentheses).",
        "",
        "| model | batch | stage steps | " + " | ".join(f"{m} MB" for m in modes) + " | "
        + " | ".join(f"{m} s" for m in modes) + " | bp/adj MB | adj/bp time | timed steps "
        "| paired adj/bp time (bp s, adj s) |",
        "|---|---:|---:|" + "---:|" * (2 * len(modes) + 4),
    ]
    for model, batch in runs:
        row = {m: table.get(("zoo", model, batch, m)) for m in modes}
        first = next((r for r in row.values() if _ok(r)), {})
        lines.append(
            f"| {model} | {batch} | {first.get('num_steps', '—')} | "
            + " | ".join(_mb(row[m]) for m in modes) + " | "
            + " | ".join(_sec(row[m]) for m in modes) + " | "
            + _r(_ratio(row.get("backprop"), row.get("adjoint")), 1) + " | "
            + _r(_ratio(row.get("adjoint"), row.get("backprop"), "step_s")) + " | "
            + f"{first.get('timed_steps', '—')} | "
            + _paired(table.get(("timing", model, batch, "pair"))) + " |"
        )
    zoo_pairs = [k for k in table if k[0] == "timing" and k[1] not in STAGE_INTEGRATORS]
    if zoo_pairs:
        lines += ["", "Paired: one process builds both models and alternates their steps "
                  f"({table[zoo_pairs[0]].get('rounds', '?')} rounds after an untimed "
                  "full-batch step each), as in the paired stage timing. The single-process "
                  "times are from few steps; for ResNet-1202 there is no untimed step, so the "
                  "first timed step also grows the allocator's pool (11 GB of page faults for "
                  "backprop). A paired process holds both models' memory: for ResNet-1202 at "
                  "batch 128 that exceeded the 16 GB cap, hence the pair at batch 64."]
    return lines + [""]


def _paired(row) -> str:
    if row is None:
        return "—"
    if not _ok(row):
        return f"killed: {row['error']}"
    t = row["step_s"]
    return f"{row['ratio']['adjoint']:.2f} ({t['backprop']:.1f}, {t['adjoint']:.1f})"


def _overhead(table: dict) -> list[str]:
    rows = sorted((k[2], v) for k, v in table.items() if k[0] == "overhead" and _ok(v))
    if len(rows) < 2:
        return []
    (n0, a), (n1, b) = rows[0], rows[-1]
    growth = (b["increment_mb"] - a["increment_mb"]) / (n1 - n0)
    return [
        f"- What grows is not activations: at batch 1 (a state of 64 KiB) the Euler adjoint's "
        f"RSS increment is {a['increment_mb']:.1f} MB at N={n0} and {b['increment_mb']:.1f} MB "
        f"at N={n1} (allocator {a['allocator_increment_mb']:.1f} and "
        f"{b['allocator_increment_mb']:.1f} MiB): "
        f"{growth * 1024:.0f} KB per step of host memory whatever the batch, i.e. the "
        "executor's per-run bookkeeping of a graph that is unrolled over the N steps (O(N) "
        "nodes for every mode). That is "
        f"{growth / 2:.3f} states per step at batch 32 (2 MiB states) and vanishes relative "
        "to the state at larger batches.",
    ]


def _with_interval(row: dict, mode: str = "adjoint") -> str:
    interval = row.get("interval", {}).get(mode)
    text = f"{row['ratio'][mode]:.2f}"
    return text + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(table: dict) -> list[str]:
    """The issue's targets, each met or missed (and by how much), computed from ``table``."""
    out = []

    def st(integrator, n, mode):
        return table.get(("stage", integrator, n, mode))

    for integrator in STAGE_INTEGRATORS:
        a128, b128, a8 = (st(integrator, 128, "adjoint"), st(integrator, 128, "backprop"),
                          st(integrator, 8, "adjoint"))
        for base, what, limit in ((b128, "backprop", 0.2), (a8, "its own N=8", 1.15)):
            r = _ratio(a128, base)
            if r is None:
                continue
            ra = _ratio(a128, base, "allocator_increment_mb")
            out.append(
                f"- {integrator}, adjoint memory at N=128 ≤ {limit:g}× {what}: "
                f"{a128['increment_mb']:.0f} MB vs {base['increment_mb']:.0f} MB = {r:.3f}× "
                f"(allocator: {a128['allocator_increment_mb']:.0f} vs "
                f"{base['allocator_increment_mb']:.0f} MiB = {ra:.3f}×) — "
                f"{_verdict(r <= limit)}"
                + ("" if r <= limit else f", by {r / limit - 1:.0%}") + ".")
    for integrator, limit in TIME_TARGETS:
        rows = {k[2]: table[k] for k in table
                if k[0] == "timing" and k[1] == integrator and _ok(table[k])}
        if rows and all("interval" in r for r in rows.values()):
            from benchmarks.paired import verdict

            for n, row in sorted(rows.items()):
                low, high = row["interval"]["adjoint"]
                out.append(f"- {integrator}, adjoint step time ≤ {limit}× backprop (paired "
                           f"timing, N={n}, {row['rounds']} rounds): {_with_interval(row)} — "
                           f"**{verdict(low, high, limit, at_least=False)}**.")
            continue
        paired = {n: row["ratio"]["adjoint"] for n, row in rows.items()}
        if paired:
            ratios, source = dict(sorted(paired.items())), "paired timing"
        else:
            ns = sorted(k[2] for k in table if k[0] == "stage" and k[1] == integrator
                        and k[3] == "adjoint")
            ratios = {n: _ratio(st(integrator, n, "adjoint"), st(integrator, n, "backprop"),
                                "step_s") for n in ns}
            ratios, source = {n: x for n, x in ratios.items() if x is not None}, "sweep 1"
        if not ratios:
            continue
        big = {n: x for n, x in ratios.items() if n >= 32} or ratios
        med = statistics.median(big.values())
        met = sum(x <= limit for x in ratios.values())
        out.append(
            f"- {integrator}, adjoint step time ≤ {limit}× backprop ({source}): "
            + ", ".join(f"N={n}: {x:.2f}×" for n, x in ratios.items())
            + f"; median over N ≥ {min(big)}: {med:.2f}× — {_verdict(med <= limit)}"
            + (f" (missed by {med / limit - 1:.0%})" if med > limit else "")
            + f"; within the target at {met} of {len(ratios)} sizes.")
    zoo = {k[2]: k for k in table if k[0] == "zoo" and k[1] == "resnet1202"}
    for batch in sorted(zoo, reverse=True):
        a, b = (table.get(("zoo", "resnet1202", batch, m)) for m in ("adjoint", "backprop"))
        if a is None:
            continue
        if not _ok(a):
            out.append(f"- ResNet-1202 at batch {batch} with adjoint: {a['error']} — "
                       "**missed**.")
            continue
        text = (f"- ResNet-1202 trains with adjoint at batch {batch}: increment "
                f"{a['increment_mb']:.0f} MB, {a['step_s']:.0f} s/step, losses finite: "
                f"{a['finite']} (memory only: resnet1202 has h = 1, where the Euler adjoint's "
                "gradients are far from backprop's; the guard would stop such a run or switch "
                "its stages to checkpoint)")
        if _ok(b):
            r = b["increment_mb"] / a["increment_mb"]
            text += (f"; backprop {b['increment_mb']:.0f} MB = {r:.1f}× — "
                     f"{_verdict(r >= 4)}.")
        elif b is not None:
            bound = b["max_rss_mb"] - a["baseline_mb"]
            text += (f"; backprop was killed ({b['error']}) after its RSS reached "
                     f"{b['max_rss_mb']:.0f} MB, i.e. an increment > {bound:.0f} MB = "
                     f"> {bound / a['increment_mb']:.0f}× — "
                     f"{_verdict(bound >= 4 * a['increment_mb'])}.")
        out.append(text)
    return out + depth_memory.targets(table)


def claims(table: dict, page: str = "docs/gradients.md") -> list[dict]:
    """The headline numbers of :func:`targets` (same values, same verdicts) for the JSON."""
    from benchmarks.paired import verdict

    out = []

    def st(integrator, n, mode):
        return table.get(("stage", integrator, n, mode))

    def claim(id, text, value, **kw):
        out.append(run_record.claim(f"gradients.{id}", text, value, page=page, **kw))

    for integrator in STAGE_INTEGRATORS:
        a128 = st(integrator, 128, "adjoint")
        for base, tag, what, limit in (
                (st(integrator, 128, "backprop"), "vs-backprop", "backprop's", 0.2),
                (st(integrator, 8, "adjoint"), "vs-n8", "its own at N=8", 1.15)):
            r = _ratio(a128, base)
            if r is not None:
                claim(f"{integrator}.adjoint-memory-n128-{tag}",
                      f"{integrator} stage, adjoint training memory at N=128 / {what}", r,
                      unit="×", target=f"≤ {limit:g}×", verdict="met" if r <= limit else "missed")
        ns = sorted(k[2] for k in table if k[0] == "stage" and k[1] == integrator
                    and k[3] == "adjoint" and _ok(table[k]) and _ok(st(integrator, k[2],
                                                                        "backprop")))
        if ns:
            n = ns[-1]
            for mode in ("adjoint", "backprop"):
                claim(f"{integrator}.{mode}-memory-n{n}",
                      f"{integrator} stage of N={n}, {mode} training memory increment",
                      st(integrator, n, mode)["increment_mb"], unit="MB")
    for integrator, limit in TIME_TARGETS:
        rows = {k[2]: table[k] for k in table
                if k[0] == "timing" and k[1] == integrator and _ok(table[k])}
        if rows and all("interval" in r for r in rows.values()):
            n, row = max(rows.items())
            low, high = row["interval"]["adjoint"]
            claim(f"{integrator}.adjoint-time-n{n}",
                  f"{integrator} stage of N={n}, adjoint / backprop step time (paired)",
                  row["ratio"]["adjoint"], low=low, high=high, unit="×",
                  target=f"≤ {limit}×", verdict=verdict(low, high, limit, at_least=False))
    zoo = sorted((k[2] for k in table if k[0] == "zoo" and k[1] == "resnet1202"),
                 reverse=True)
    for batch in zoo[:1]:
        a, b = (table.get(("zoo", "resnet1202", batch, m)) for m in ("adjoint", "backprop"))
        if not _ok(a):
            continue
        claim("resnet1202.adjoint-memory", f"ResNet-1202 at batch {batch}, adjoint training "
              "memory increment", a["increment_mb"], unit="MB")
        if _ok(b):
            r = b["increment_mb"] / a["increment_mb"]
            claim("resnet1202.backprop-vs-adjoint-memory", f"ResNet-1202 at batch {batch}, "
                  "backprop / adjoint training memory", r, unit="×", target="≥ 4×",
                  verdict="met" if r >= 4 else "missed")
        elif b is not None:
            r = (b["max_rss_mb"] - a["baseline_mb"]) / a["increment_mb"]
            claim("resnet1202.backprop-vs-adjoint-memory", f"ResNet-1202 at batch {batch}, "
                  "backprop / adjoint training memory (backprop killed: a lower bound)", r,
                  low=r, unit="×", target="≥ 4×", verdict="met" if r >= 4 else "missed")
    return out + depth_memory.claims(table, page)


def cost_model(table: dict) -> list[str]:
    """Predicted adjoint/backprop time ratios from the measured forward time."""
    lines = []
    timing = any(k[0] == "timing" for k in table)
    for integrator in STAGE_INTEGRATORS:
        preds = []
        for n in sorted({k[2] for k in table if k[1] == integrator}):
            if timing:
                row = table.get(("timing", integrator, n, "pair"))
                if _ok(row):
                    f, t = row["step_s"]["fwd"], row["step_s"]["backprop"]
                    preds.append((n, f / t, 1 + 2 * f / t, 1 + f / t, row["ratio"]["adjoint"]))
                continue
            bp, adj = (table.get(("stage", integrator, n, m)) for m in ("backprop", "adjoint"))
            if _ok(bp) and _ok(adj) and bp.get("forward_s"):
                f, t = bp["forward_s"], bp["step_s"]
                preds.append((n, f / t, (t + 2 * f) / t, (t + f) / t, adj["step_s"] / t))
        if preds:
            lines.append(
                f"- {integrator}: forward/backprop-step = "
                + ", ".join(f"{p[1]:.2f}" for p in preds)
                + f" (N = {', '.join(str(p[0]) for p in preds)}); predicted adjoint/backprop "
                + ("= 1 + fwd/step (one evaluation per reverse step, reused by the product) = "
                   + ", ".join(f"{p[3]:.2f}" for p in preds)
                   if integrator in REUSING else
                   "= 1 + 2·fwd/step = " + ", ".join(f"{p[2]:.2f}" for p in preds))
                + "; measured " + ", ".join(f"{p[4]:.2f}" for p in preds) + ".")
    return lines


def _cost_model_section(table: dict) -> list[str]:
    """The cost-model paragraph and its lines (none without stage timings, e.g. a page of
    the depth sweep alone)."""
    lines = cost_model(table)
    if not lines:
        return []
    return [
        "Cost model of a step (forward F, backward of backprop ≈ step − F): the Euler adjoint "
        "adds one reverse step and one recomputation per step, ≈ 2F, so adjoint/backprop ≈ "
        "1 + 2F/step; the reversible-Heun adjoint differentiates its reverse step's evaluation "
        "(no recomputation), ≈ F, so ≈ 1 + F/step:",
        "",
        *lines,
        "",
    ]


def write_doc(table: dict, meta: dict, out: Path, record=None,
              name: str = "gradients.md") -> Path:
    """``out/<name>``: every number comes from ``table``; ``record``'s header first."""
    lines = [
        *([*run_record.page_header(record), ""] if record else []),
        *DOC_HEAD,
        "## How it was measured",
        "",
        f"Machine: {meta['machine']}.",
        "",
        "Commands (one process per configuration; the worker processes took "
        f"{meta['wall_s'] / 60:.0f} min in total):",
        "",
        "```bash",
        *meta["commands"],
        "```",
        "",
        *METHOD,
        "",
        *meta.get("notes", []),
        "",
        *_stage_tables(table, meta),
        *_timing_table(table),
        "## Under XLA",
        "",
        "Memory and first-step time with and without XLA: [xla_memory.md](xla_memory.md) "
        "(its own run).",
        "",
        *_zoo_table(table),
        *(depth_memory.section(table) or RELATED),
        "## Targets",
        "",
        *targets(table),
        "",
        *_cost_model_section(table),
        *notes(table),
        "",
        *(GUARD_SECTION if name == "gradients.md" else []),
    ]
    return run_record.write_page(out / name, lines)


# A page without the depth sweep points to the pages that measure what it leaves out.
RELATED = [
    "## Whole networks, and the adjoint's error by precision",
    "",
    "- [gradients_depth.md](gradients_depth.md): the zoo's CIFAR ResNets from resnet20 to "
    "resnet1202, activation memory against depth per gradient mode, with the layers outside "
    "the stages recomputed in the backward (`--sweeps depth`, its own run record).",
    "- [adjoint_precision.md](adjoint_precision.md): the Euler and Heun adjoints' gradient "
    "error against N in float64, float32 and mixed_bfloat16 "
    "(`python -m benchmarks.adjoint_precision`).",
    "",
]

# Measured once (not by this benchmark); kept when the document is regenerated.
GUARD_SECTION = [
    ("## The gradient guard's error: the adjoint, not rounding"),
    "",
    ('The guard (`kode.tools.guard.check_gradients`, the `GradientGuard` of `kode train '
     "--gradient adjoint`) compares a stage's parameter gradients from the adjoint "
     "with backprop's. On an AMD EPYC with avx512 (oneDNN on, TensorFlow 2.21), "
     '`kode.train("revheun_resnet20", "digits", epochs=1, model_options={"depth": 8}, '
     'gradient="adjoint", guard_every=1)` reported a relative error of 5.98·10⁻³ after'
     ' epoch 1 for its one exact reversible-Heun stage (reconstruction error '
     '7.1·10⁻⁷); with `ONEDNN_MAX_CPU_ISA=AVX2` the same weights and batch gave '
     '3.7·10⁻⁷, and 3.1·10⁻⁷ with `TF_ENABLE_ONEDNN_OPTS=0`.'),
    "",
    ('Cause, measured on those weights and that batch (32 examples):'),
    "",
    ("- Not a small norm: the stage's backprop gradient norm is 0.78 (the model's "
     "2.1), and every stage variable differs by 4–7·10⁻³ relative, the stem's kernel "
     '(upstream) by 4.8·10⁻³.'),
    ('- Not a bad kernel, and not batch-norm statistics: a float64 evaluation of the '
     'same point agrees with the avx512 adjoint to 7.8·10⁻⁷ and with backprop without '
     'oneDNN to 6.8·10⁻⁷, while backprop with oneDNN (avx512 and AVX2 alike, 7.9·10⁻⁷ '
     'apart) differs from it by 6.0·10⁻³. Backprop evaluated twice gives identical '
     'gradients, and checkpoint mode equals backprop.'),
    ('- A ReLU input within rounding of zero: the stage evaluates f at z₁ = x + f(x), '
     "and in f's second ReLU one of its 32 768 inputs (example 27, position (2, 2), "
     'channel 10) is 1.9·10⁻⁷ in float64; the next smallest is 2.0·10⁻⁵. The forward '
     "and the adjoint's recomputation compute z₁ along different paths (the "
     'recomputation starts from the rebuilt state), so that input comes out −7.0·10⁻⁸ '
     'in the forward and +1.8·10⁻⁷ in the recomputation with oneDNN on avx512 (ReLU '
     'off in one, on in the other), −3.8·10⁻⁷ and −2.9·10⁻⁷ under AVX2, +4.6·10⁻⁷ and '
     "+3.1·10⁻⁷ without oneDNN. The gradient jumps at the kink by that element's whole"
     " contribution, 6·10⁻³ of the stage's gradient. Evaluated at one fixed float32 "
     "z₁, f's gradient with float32 kernels (oneDNN or not) differs from float64's by "
     '6.6·10⁻³ for the same reason: the gradient at that point is not determined to '
     "better than the kink's jump."),
    "",
    ("Which side of the kink an input falls on depends on the kernels' rounding, so a "
     'comparison at a single point is a chance event on every CPU, seen here on one '
     'instruction set and at one point of training (after epoch 3 the same run reports'
     ' 3.3·10⁻⁷).'),
    "",
    ("How the guard's error is defined: per stage, the smallest over the guard's batch"
     ' x and two nearby batches x + 10⁻³·rms(x)·u_k (u_k standard normal, seeds 1 and '
     '2) of ‖g_adjoint − g_backprop‖ / ‖g_backprop‖, each with its own backprop '
     'reference. A tie within rounding of a kink does not survive a 10⁻³ perturbation,'
     ' and another tie at all three points is unlikely; an inexact adjoint (Euler, '
     'Heun) is wrong by about the same amount at every nearby point, so the minimum '
     "keeps its O(1/N) and O(1/N²) errors. The report keeps every point's error "
     '(`StageCheck.point_errors`); the table shows the largest as `worst point` next '
     'to `grad rel err`, so a large spread stays visible. On the run above the guard '
     'now reports 3.2·10⁻⁷ (worst point 6.0·10⁻³). The tests marked `numerics` '
     '(reversal exactness, adjoint and checkpoint against backprop, convergence '
     "orders, the guard) run in CI both with the CPU's default kernels and with "
     '`ONEDNN_MAX_CPU_ISA=AVX2`.'),
]


DOC_HEAD = [
    "# Gradient modes: memory and time",
    "",
    "Every `IntegratorStage` has `gradient=\"backprop\" | \"checkpoint\" | \"adjoint\"` "
    "(constructor argument, settable attribute, `zoo.create_model(name, gradient=...)`, or "
    "`kode.set_gradient_mode(model, mode)` for a whole model, then recompile):",
    "",
    "- `backprop`: autodiff through every step; keeps the activations of all N steps, O(N).",
    "- `checkpoint`: keeps the state every ⌈√N⌉ steps, recomputes one segment at a time in "
    "the backward; exact gradients, O(√N) states, about one extra forward.",
    "- `adjoint` (Sander et al. 2022): the forward keeps only the final state; the backward "
    "rebuilds x_n with the integrator's `reverse_step` and takes one vector-Jacobian product "
    "per step: O(1) states; exact up to rounding for reversible Heun and RevNet; momentum's "
    "reversal divides by γ each step, which amplifies rounding (kode refuses its adjoint "
    "beyond a step limit, 43 steps at γ = 0.9); approximate for Euler (gradient error: "
    "[reference.md](reference.md) §3).",
    "- `remat` (not a kode mode, the Keras alternative): `keras.RematScope(mode="
    "\"activations\")` around building a backprop model (mode `\"full\"` fails in `fit` with "
    "BatchNorm, keras#21207).",
    "",
    "Reproduce with `python -m benchmarks.gradient_memory [--quick] [--out docs]` "
    "(`--quick`: N = 4, 8, 32, 128, ResNet-110 at batch 32 and the depth sweep up to "
    "ResNet-110, about a quarter of the full run's time, most of it tracing the unrolled "
    "graphs and ResNet-1202; `--sweeps depth` runs the depth sweep alone).",
    "",
]

METHOD = [
    "**Memory: peak RSS increment over the built model during training steps.** Each "
    "configuration runs in a fresh process (`python -m benchmarks.gradient_memory --worker "
    "JSON`). The worker builds the model, an SGD optimizer and a `tf.function` train step "
    "(`GradientTape`, `optimizer.apply`: what `model.fit` runs; `jit_compile=False`) with a "
    "dynamic batch dimension, traces it and runs it once **on a batch of 1**: graph "
    "optimization, executor, kernels and oneDNN primitives now exist, but nothing "
    "batch-sized has been allocated. Then it calls `malloc_trim(0)`, reads `VmRSS` from "
    "`/proc/self/status` (the baseline) and resets the kernel's peak counter (`echo 5 > "
    "/proc/self/clear_refs` sets `VmHWM` to the current RSS), runs the full-batch steps and "
    "reports `VmHWM` − baseline. `VmHWM` is updated by the kernel on every page fault, so no "
    "short peak is missed (as RSS sampling could), and the baseline excludes tracing.",
    "",
    "Why not a full-batch warm-up step before the baseline: with oneDNN on (the default on "
    "x86), TensorFlow allocates large tensors from a BFC pool (`MklCPUAllocator`) that never "
    "returns memory, so after one full training step the RSS already sits at the step's "
    "peak and later steps show an increment of ~0 whatever the mode (measured: 2–4 MB for "
    "backprop at N=8 and N=64). As a cross-check the worker also reports the allocator's own "
    "peak (`tf.config.experimental.get_memory_info('CPU:0')['peak']` after "
    "`reset_memory_stats`) over its bytes in use at the baseline; it agrees with the RSS "
    "increment to within a few MB plus the pool's rounding. The backprop rows, which grow ∝ N, "
    "show the method sees the stored activations.",
    "",
    "The peak includes the scratch buffers of the ops running at that moment. TensorFlow's "
    "convolution filter gradient takes 27 MiB of scratch at batch 16 on a 32×32×16 state, and "
    "when two of them overlap on the two inter-op threads (a slowed one, under load, still "
    "running when the next starts) the peak is one such buffer higher at any N: in graph "
    "mode the Euler adjoint at batch 16 peaked at 64–68 MiB (allocator) at N = 16, 32 and 64 "
    "with an overlap, 34–40 MiB without. A deeper stage offers more chances of an overlap, "
    "which looked like growth from N = 4 to 16 in a test run (2026-11-30). "
    "`tests/benchmarks/test_gradient_memory.py` therefore runs its workers one op at a time "
    "(`\"inter_op_threads\": 1` in the worker's configuration; peaks then repeat to ~0.2 MB); "
    "the tables here use TensorFlow's default scheduling.",
    "",
    "**Time**: median wall time of the timed full-batch steps (each returns the loss as a "
    "Python float, so the step has finished).",
]

def notes(table: dict) -> list[str]:
    """Findings and explanations (numbers from ``table`` where the command measures them)."""
    def st(integrator, n, mode):
        return table.get(("stage", integrator, n, mode))

    def alloc_range(integrator):
        vals = [v["allocator_increment_mb"] for k, v in table.items()
                if k[0] == "stage" and k[1] == integrator and k[3] == "adjoint" and _ok(v)]
        if not vals:
            return "?"
        lo, hi = f"{min(vals):.0f}", f"{max(vals):.0f}"
        return lo if lo == hi else f"{lo}–{hi}"

    def paired(integrator):
        rows = [v for k, v in table.items() if k[0] == "timing" and k[1] == integrator
                and _ok(v)]
        measured = [r["ratio"]["adjoint"] for r in rows]
        f = [r["step_s"]["fwd"] / r["step_s"]["backprop"] for r in rows]
        return measured, f

    def span(xs, digits=2):
        if not xs:
            return "?"
        low, high = f"{min(xs):.{digits}f}", f"{max(xs):.{digits}f}"
        return low if low == high else f"{low}–{high}"

    bp = sorted((k[2], v["allocator_increment_mb"]) for k, v in table.items()
                if k[0] == "stage" and k[1] == "euler" and k[3] == "backprop" and _ok(v))
    per_step = (bp[-1][1] - bp[0][1]) / (bp[-1][0] - bp[0][0]) if len(bp) > 1 else float("nan")
    state = next((v["batch"] * 32 * 32 * 16 * 4 / 2**20 for k, v in table.items()
                  if k[0] == "stage" and _ok(v)), float("nan"))
    out = ["## Findings", ""]
    out.append(
        "- **The adjoint's memory is flat in N** (eager and graph mode): the allocator's peak is "
        f"{alloc_range('euler')} MiB for Euler and {alloc_range('reversible_heun')} MiB for "
        "reversible Heun (three tensors per state) at every N from 4 to 256, i.e. a few states, "
        f"while backprop grows by {per_step:.1f} MiB ({per_step / state:.1f} states) per "
        "step. The forward runs under "
        "`stop_recording` and keeps only the final state, and `tf.control_dependencies` "
        "sequence each rebuild after the previous vector-Jacobian product. "
        "`tests/benchmarks/test_gradient_memory.py` checks flatness in eager and graph mode, "
        "and that the same check fails when the forward is recorded by the outer tape.")
    out += _overhead(table)
    a8, a128 = st("euler", 8, "adjoint"), st("euler", 128, "adjoint")
    if _ok(a8) and _ok(a128):
        out.append(
            f"- That host memory is why the Euler target \"N=128 ≤ 1.15× N=8\" is missed in RSS "
            f"({a128['increment_mb']:.0f} vs {a8['increment_mb']:.0f} MB) while the tensors "
            f"are flat (allocator {a128['allocator_increment_mb']:.0f} vs "
            f"{a8['allocator_increment_mb']:.0f} MiB). An unrolled graph costs O(N) host memory "
            "in every mode; a `tf.while_loop` over the steps would remove it but needs the "
            "per-step weights stacked or switched by index.")
    e_measured, e_f = paired("euler")
    h_measured, h_f = paired("reversible_heun")
    out += [
        "- **Euler** (target ≤ 1.6×): the adjoint adds one reverse step (f_n at x_{n+1}) "
        "and one recomputation (f_n at the rebuilt x_n) per step, ≈ 2F on top of backprop's "
        f"F + B. With the measured F = {span(e_f)} of a backprop step that predicts "
        f"{span([1 + 2 * x for x in e_f])}×; measured {span(e_measured)}×. **This is the "
        "floor for an exact-to-the-scheme Euler adjoint**: the vector-Jacobian product needs "
        "f_n linearized at x_n, and x_n is only known after f_n(x_{n+1}) has been evaluated "
        "(x_n = x_{n+1} − h f_n(x_{n+1})), so the two evaluations are at different points and "
        "in sequence; neither can be shared. Below it lies only a different approximation: "
        "differentiating f_n at x_{n+1} (the reverse step's own evaluation, one evaluation "
        "per step, predicted 1 + F/step) changes the gradient by O(h) per step, the same order "
        "as the Euler adjoint's error but a second error on top of it; kode does not do that.",
        "- **Reversible Heun** (target ≤ 1.4×): `reverse_step(n)` evaluates f_n(z_n), the very "
        "evaluation (same function, same point up to rounding, the reversal being exact) that "
        "the vector-Jacobian product of `step(n−1)` needs. `kode/gradients.py` now tapes the "
        "reverse step's evaluations and the product differentiates them instead of evaluating "
        "again (generic: `Dynamics.reuse_reverse_evaluations`, set for exact reversals; the "
        "adjoint loop never sees the residual functions, only `kode.gradients.evaluate`'s "
        "keys), so a step costs one evaluation plus its backward: predicted 1 + F/step = "
        f"{span([1 + x for x in h_f])}×, measured {span(h_measured)}× (it was 1 + 2F/step "
        "before, measured 1.53–1.80×). `tests/core/test_gradients.py` counts the evaluations. "
        "Momentum and RevNet reversals reuse their evaluations the same way.",
    ]
    out += [
        "- **remat**: `keras.RematScope(mode=\"activations\")` saves nothing here (memory "
        "equals backprop's at every N): it only rematerializes the `activation` of layers "
        "that have one (`Dense(..., activation=...)`, `Conv2D(..., activation=...)`), while "
        "kode's pre-activation blocks apply ReLU with `keras.ops.relu` and their convolutions "
        "have the linear activation. Mode `\"full\"` would rematerialize but fails in `fit` "
        "with BatchNorm (keras#21207).",
        "- **checkpoint** grows like √N, as designed (store ⌈√N⌉ states, recompute one "
        "segment of ⌈√N⌉ steps at a time), at about one extra forward.",
    ]
    if not any(k[0] == "stage" for k in table):  # the bullets above are sweep 1's findings
        out = out[:2]
    b, a = (table.get(("zoo", "resnet1202", 128, m)) for m in ("backprop", "adjoint"))
    pair_keys = sorted((k for k in table if k[0] == "timing" and k[1] == "resnet1202"
                        and _ok(table[k])), key=lambda k: -k[2])
    pair = table[pair_keys[0]] if pair_keys else None
    if _ok(b) and _ok(a):
        text = (f"- **ResNet-1202 at batch 128**: backprop's training steps need "
                f"{b['increment_mb'] / 1024:.1f} GB on top of the model, the adjoint "
                f"{a['increment_mb']:.0f} MB (the stem's and head's activations, the "
                "transitions' under the builder's default `recompute`, and a few states per "
                "stage)")
        if _ok(pair):
            t = pair["step_s"]
            text += (f"; alternating steps in one process (batch {pair_keys[0][2]}) the "
                     f"adjoint takes {pair['ratio']['adjoint']:.2f}× backprop's time "
                     f"({t['adjoint']:.0f} vs {t['backprop']:.0f} s per step)")
        out.append(text + ".")
    return out if len(out) > 2 else []


def run_all(args) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from kode.io import write_json
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: list[dict] = []
    for path in args.merge or []:
        results += json.loads(Path(path).read_text())
    command = ("python -m benchmarks.gradient_memory " + shlex.join(sys.argv[1:])).strip()
    if args.merge:
        command = None
    record = run_record.start_record(
        command or "python -m benchmarks.gradient_memory " + shlex.join(sys.argv[1:]),
        args.allow_load, load=run_record.merged_start_load(results))
    quick = args.quick
    ns = args.ns or ([4, 8, 32, 128] if quick else [4, 8, 16, 32, 64, 128, 256])
    configs: list[dict] = []
    if not args.merge and "stage" in args.sweeps:
        configs += stage_configs(ns, STAGE_INTEGRATORS, MODES, args.stage_batch,
                                 2 if quick else args.steps, 1, args.repeats)
    if not args.merge and "timing" in args.sweeps:
        configs += timing_configs(args.timing_ns or ([8, 32] if quick else [16, 32, 64, 128]),
                                  STAGE_INTEGRATORS, args.stage_batch, args.rounds)
    if not args.merge and "overhead" in args.sweeps:
        configs += overhead_configs([8, 32] if quick else [8, 128])
    if not args.merge and "zoo" in args.sweeps:
        if quick:
            runs = [("resnet110", 32, 2, 1, None)]
        else:
            runs = [("resnet110", 32, 3, 1, ("backprop", "adjoint")),
                    ("resnet110", args.zoo_batch, 3, 1, None),
                    ("resnet1202", args.zoo_batch, 2, 0, None)]
        configs += zoo_configs(runs, ("backprop", "checkpoint", "adjoint"))
    if not args.merge and "zoo-timing" in args.sweeps:
        configs += zoo_timing_configs([("resnet110", 32, 2)] if quick else
                                      [("resnet110", args.zoo_batch, 3),
                                       ("resnet1202", args.zoo_batch, 2)])
    if not args.merge and "depth" in args.sweeps:
        depth_cfgs = depth_memory.configs(
            args.depths or (depth_memory.QUICK_DEPTHS if quick else depth_memory.DEPTHS),
            args.depth_batches, variants=tuple(args.depth_variants),
            inter_op_threads=args.depth_inter_op_threads)
        for line in depth_memory.estimate(depth_cfgs, args.mem_cap_gb):
            print(line, flush=True)
        configs += depth_cfgs
    for i, cfg in enumerate(configs):
        load = os.getloadavg()[0]
        r = measure(cfg, timeout=args.timeout, mem_cap_gb=args.mem_cap_gb)
        r["command"] = command
        r["load_at_start"] = load
        results.append(r)
        desc = " ".join(f"{k}={cfg[k]}" for k in ("sweep", "model", "integrator", "n", "mode",
                                                   "recompute", "batch") if k in cfg)
        if "error" in r:
            status = r["error"]
        elif "ratio" in r:
            status = (", ".join(f"{k} {v:.3f} s" for k, v in r["step_s"].items())
                      + ", ratio " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratio"].items())
                      + f", process {r['wall_s']:.0f} s")
        else:
            status = (f"+{r['increment_mb']:.0f} MB (alloc {r['allocator_increment_mb']:.0f}), "
                      f"{r['step_s']:.3f} s/step, process {r['wall_s']:.0f} s")
        print(f"[{i + 1}/{len(configs)} {time.monotonic() - started:.0f}s] {desc}: {status}",
              flush=True)
        if args.json:
            write_json(args.json, results, indent=1)
    if args.json and not configs:
        write_json(args.json, results, indent=1)
    table = aggregate(results)
    commands = sorted({r["command"] for r in results if r.get("command")})
    if args.merge:
        commands.append("python -m benchmarks.gradient_memory " + shlex.join(sys.argv[1:]))
    wall = sum(r.get("wall_s", 0) for r in results)
    meta = {
        "machine": machine_description(), "commands": commands, "wall_s": wall,
        "stage_batch": args.stage_batch, "stage_warmup": 1,
        "notes": [
            "Configurations run one after another, interleaved: each (N, integrator) runs "
            "its four modes back to back, in an order that rotates from one group to the "
            "next, so slow drift of the machine (other jobs ran on it at times) spreads over "
            "all modes instead of biasing one. Every cell is one process "
            + ("" if args.repeats == 1 else f"(median of {args.repeats} processes) ")
            + "and every time the median of its timed steps.",
            *([args.note] if args.note else []),
        ],
    }
    plot(table, out)
    run_record.finish_record(record)
    path = write_doc(table, meta, out, record, args.page)
    run_record.write_record(path, record, results,
                            claims(table, page=run_record.page_of(path)))
    print(f"wrote {path} and its .json", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Peak training memory and step time of the gradient modes.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller sweep (≈ 20 min on 2 cores)")
    parser.add_argument("--out", default="docs", help="directory for the page and plots")
    parser.add_argument("--page", default="gradients.md",
                        help="the page's file name (the depth sweep alone: gradients_depth.md; "
                        "its claims name this page)")
    sweeps = ["stage", "timing", "overhead", "zoo", "zoo-timing", "depth"]
    parser.add_argument("--sweeps", nargs="+", default=sweeps, choices=sweeps)
    parser.add_argument("--depths", type=int, nargs="+", choices=depth_memory.DEPTHS,
                        help="override the depth sweep's zoo depths (resnet<d>)")
    parser.add_argument("--depth-variants", nargs="+", choices=depth_memory.VARIANTS,
                        default=list(depth_memory.VARIANTS), metavar="VARIANT",
                        help="the depth sweep's variants (default: all; a slow depth can run "
                        "with fewer and the results be merged with --merge)")
    parser.add_argument("--depth-batches", type=int, nargs=2, default=depth_memory.BATCHES,
                        metavar=("SMALL", "LARGE"),
                        help="the depth sweep's two batches (activation memory = LARGE − SMALL)")
    parser.add_argument("--depth-inter-op-threads", type=int,
                        default=depth_memory.INTER_OP_THREADS, metavar="K",
                        help="the depth sweep's TensorFlow inter-op threads (0: TensorFlow's "
                        "default, as a user's training; 1: one op at a time)")
    parser.add_argument("--ns", type=int, nargs="+", help="override the stage sweep's N")
    parser.add_argument("--timing-ns", type=int, nargs="+", help="override the timing sweep's N")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the timing sweep")
    parser.add_argument("--repeats", type=int, default=1, help="processes per stage config")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage process")
    parser.add_argument("--stage-batch", type=int, default=32)
    parser.add_argument("--zoo-batch", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per process, seconds")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0,
                        help="kill a worker whose RSS exceeds this")
    parser.add_argument("--json", help="write the raw per-process results here")
    parser.add_argument("--note", help="a sentence added to the doc's method section")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write the doc from raw results of earlier runs, run nothing")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        result = run_pair_worker(cfg) if "modes" in cfg else run_worker(cfg)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return
    run_all(args)


if __name__ == "__main__":
    main()
