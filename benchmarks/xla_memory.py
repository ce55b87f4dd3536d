"""Memory and first-step time of the gradient modes with and without XLA (docs/xla_memory.md).

    python -m benchmarks.xla_memory [--n 8 32 128] [--zoo resnet110] [--out docs/xla_memory.md]

One training step of one stage of N BasicBlocks (32×32×16 state, batch 64: a state is 4 MiB),
Euler and reversible Heun, in backprop, checkpoint and adjoint mode, as a ``tf.function`` with
and without ``jit_compile``; and the training step of zoo models. Memory is what the step
adds (:mod:`kode.testing.memory`): without XLA the BFC allocator's peak increment (smallest of
3 steps), with XLA the bytes of XLA's buffer assignment of the compiled step (exact, the same
on every run). The first call's seconds include building, tracing and compiling. Every group
of measurements (one child process) records ``others_cpu`` (:mod:`benchmarks.harness.quiet`);
above 0.10 the run stops unless ``--allow-load``.
"""

from __future__ import annotations

import argparse
import math
import sys

from benchmarks.harness.quiet import OthersCpu, refuse_if_loaded
from benchmarks.record import (
    check_out_folder,
    claim,
    claims_table,
    finish_record,
    page_header,
    page_of,
    start_record,
    write_page,
    write_record,
)
from kode.testing.memory import StageStep, measure_stage_steps_timed

INTEGRATORS = ("euler", "reversible_heun")
MODES = ("backprop", "checkpoint", "adjoint")
SIZE, CHANNELS, BATCH = 32, 16, 64
ZOO_BATCH = 32
#: targets of the page's claims
ADJOINT_GROWTH_TARGET = 0.05  # states per step under XLA
ZOO_RATIO_TARGET = 1.2  # adjoint memory under XLA / without


def measure(ns: list[int], zoo_models: list[str], allow_load: bool) -> list[dict]:
    """Every measurement as a row: the configuration, ``mib``, ``first_s``, ``next_s`` and
    the ``others_cpu`` of its group."""
    groups = [[StageStep(i, n, m, SIZE, CHANNELS, BATCH, jit=jit) for n in ns]
              for i in INTEGRATORS for m in MODES for jit in (False, True)]
    groups += [[StageStep("zoo", 0, m, SIZE, 3, ZOO_BATCH, jit=jit, model=name)]
               for name in zoo_models for m in ("backprop", "adjoint") for jit in (False, True)]
    rows = []
    for steps in groups:
        with OthersCpu() as quiet:
            measured = measure_stage_steps_timed(steps, timeout=3600)
        for step, m in zip(steps, measured, strict=True):
            rows.append({"integrator": step.integrator, "n": step.n, "mode": step.mode,
                         "xla": step.jit, "model": step.model, **m,
                         "others_cpu": quiet.value})
            print(f"{step.model or step.integrator:16s} {step.mode:10s} N={step.n:4d} "
                  f"xla={step.jit!s:5s} {m['mib']:9.2f} MiB first {m['first_s']:7.2f} s "
                  f"step {m['next_s']:.3f} s others_cpu {quiet.value:.3f}", flush=True)
        refuse_if_loaded("xla_memory", quiet.value, allow_load)
    return rows


def _row(rows, **key) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def summarize(rows: list[dict], ns: list[int], page: str) -> tuple[list[dict], list[dict]]:
    """Growth per step (in states) of each stage configuration from the smallest to the
    largest N, and the page's claims."""
    state = BATCH * SIZE * SIZE * CHANNELS * 4 / 2**20
    low, high = min(ns), max(ns)
    growth = []
    for i in INTEGRATORS:
        for m in MODES:
            for xla in (False, True):
                a, b = (_row(rows, integrator=i, mode=m, xla=xla, n=n, model="")
                        for n in (low, high))
                growth.append({"integrator": i, "mode": m, "xla": xla,
                               "states_per_step": (b["mib"] - a["mib"]) / (high - low) / state,
                               "exponent": math.log(b["mib"] / a["mib"]) / math.log(high / low)})
    claims = []
    for i in INTEGRATORS:
        g = next(r for r in growth if (r["integrator"], r["mode"], r["xla"]) == (i, "adjoint",
                                                                                   True))
        claims.append(claim(
            f"xla-adjoint-growth-{i}", f"{i} adjoint under XLA: memory growth per step, "
            f"N = {low} → {high} (exact buffer assignment)", g["states_per_step"],
            unit="states/step", page=page, target=f"≤ {ADJOINT_GROWTH_TARGET}",
            verdict="met" if g["states_per_step"] <= ADJOINT_GROWTH_TARGET else "missed"))
        cp = _row(rows, integrator=i, mode="checkpoint", xla=True, n=high, model="")
        bp = _row(rows, integrator=i, mode="backprop", xla=True, n=high, model="")
        claims.append(claim(
            f"xla-checkpoint-vs-backprop-{i}", f"{i} checkpoint / backprop memory under XLA at "
            f"N = {high}", cp["mib"] / bp["mib"], unit="×", page=page, target="well below 1",
            verdict="measured"))
    for name in sorted({r["model"] for r in rows if r["model"]}):
        on, off = (_row(rows, model=name, mode="adjoint", xla=x) for x in (True, False))
        ratio = on["mib"] / off["mib"]
        # XLA's figure is exact; the allocator's is the smallest of 3 steps: a 10 % margin
        # either side of the target decides, inside it the verdict is open.
        verdict = ("met" if ratio <= ZOO_RATIO_TARGET / 1.1 else
                   "missed" if ratio >= ZOO_RATIO_TARGET * 1.1 else "not decided")
        claims.append(claim(
            f"xla-zoo-adjoint-{name}", f"{name} adjoint: memory with XLA / without",
            ratio, unit="×", page=page, target=f"≤ {ZOO_RATIO_TARGET}", verdict=verdict))
    return growth, claims


def render(record, rows: list[dict], growth: list[dict], claims: list[dict],
           ns: list[int]) -> list[str]:
    lines = ["# Memory and first-step time with and without XLA", "", *page_header(record), "",
             f"One training step of one stage of N BasicBlocks ({SIZE}×{SIZE}×{CHANNELS} "
             f"state, batch {BATCH}: a state is "
             f"{BATCH * SIZE * SIZE * CHANNELS * 4 / 2**20:g} MiB). Memory: without XLA the "
             "allocator's peak increment (smallest of 3 steps), with XLA the bytes of XLA's "
             "buffer assignment of the compiled step. First call: building, tracing, compiling "
             "and one step, in seconds.", "",
             "| integrator | mode | N | MiB | MiB (XLA) | first call s | first call s (XLA) "
             "| step s | step s (XLA) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i in INTEGRATORS:
        for m in MODES:
            for n in ns:
                off, on = (_row(rows, integrator=i, mode=m, n=n, xla=x, model="")
                           for x in (False, True))
                lines.append(f"| {i} | {m} | {n} | {off['mib']:.1f} | {on['mib']:.1f} | "
                             f"{off['first_s']:.1f} | {on['first_s']:.1f} | "
                             f"{off['next_s']:.3f} | {on['next_s']:.3f} |")
    lines += ["", f"Growth from N = {min(ns)} to {max(ns)}: states per step, and the exponent "
              "p of memory ∝ N^p over that range.", "",
              "| integrator | mode | states/step | p | states/step (XLA) | p (XLA) |",
              "|---|---|---:|---:|---:|---:|"]
    for i in INTEGRATORS:
        for m in MODES:
            off, on = (next(g for g in growth if (g["integrator"], g["mode"], g["xla"])
                            == (i, m, x)) for x in (False, True))
            lines.append(f"| {i} | {m} | {off['states_per_step']:.3f} | {off['exponent']:.2f} "
                         f"| {on['states_per_step']:.3f} | {on['exponent']:.2f} |")
    zoo_rows = [r for r in rows if r["model"]]
    if zoo_rows:
        lines += ["", f"Zoo models, one training step at batch {ZOO_BATCH}, "
                  f"{SIZE}×{SIZE}×3 inputs:", "",
                  "| model | mode | XLA | MiB | first call s | step s |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['mode']} | {'on' if r['xla'] else 'off'} | "
                  f"{r['mib']:.1f} | {r['first_s']:.1f} | {r['next_s']:.3f} |"
                  for r in zoo_rows]
    lines += ["", "## Claims", "", *claims_table(claims)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.xla_memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--zoo", nargs="*", default=["resnet110"])
    parser.add_argument("--out", default="docs/xla_memory.md")
    parser.add_argument("--allow-load", action="store_true")
    args = parser.parse_args(argv)
    if len(set(args.n)) < 2 or min(args.n) < 1:
        parser.error("--n takes at least two different positive step counts")
    check_out_folder(parser, args.out)
    record = start_record("python -m benchmarks.xla_memory " + " ".join(argv or sys.argv[1:]),
                          allow_load=True)  # others_cpu, not the load average, decides
    rows = measure(sorted(set(args.n)), args.zoo, args.allow_load)
    record.others_cpu = max(r["others_cpu"] for r in rows)
    record.allow_load = args.allow_load
    finish_record(record)
    growth, claims = summarize(rows, sorted(set(args.n)), page_of(args.out))
    write_record(args.out, record, {"rows": rows, "growth": growth}, claims)
    write_page(args.out, render(record, rows, growth, claims, sorted(set(args.n))))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
