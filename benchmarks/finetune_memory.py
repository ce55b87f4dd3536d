"""Memory and step time of fine-tuning keras.applications ResNet152V2 ported into kode, per
gradient mode, before and after refinement (issues: fine-tune pretrained ResNets; 21,
recomputation outside the stages).

    python -m benchmarks.finetune_memory [--input-size 224] [--batch 16] [--out docs]

Every memory configuration runs in its own process with the method of
:mod:`benchmarks.gradient_memory` (peak RSS increment over the model built and traced on a
batch of 1, and the allocator's peak): backprop, checkpoint and adjoint with recomputation
outside the stages (``recompute=True``) and the adjoint without it ("adjoint (stages only)").
Step times come from one more process per refinement factor that builds backprop, adjoint and
adjoint (stages only) models and alternates their steps (:mod:`benchmarks.paired`).
Targets: adjoint memory ≤ 0.12× backprop's at m = 1 and ≤ 0.08× at m = 2 (RSS and allocator
both), adjoint step time ≤ 1.8× backprop's and ≤ 1.1× the stages-only adjoint's (paired, 95%
interval). Writes ``<out>/finetune_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks import record as run_record
from benchmarks.depth_memory import STAGES_ONLY, variant, variant_config
from benchmarks.gradient_memory import _ratio, _rotated, machine_description, measure
from benchmarks.paired import median_interval, ratios, verdict
from kode.io import write_json

#: The memory configurations per refinement factor (gradient modes and the adjoint without
#: recomputation outside the stages, :data:`benchmarks.depth_memory.STAGES_ONLY`).
MODES = ("backprop", "checkpoint", "adjoint", STAGES_ONLY)
#: The paired-timing process's models; ratios are per round, to backprop and to STAGES_ONLY.
PAIR_MODES = ("backprop", "adjoint", STAGES_ONLY)
#: Issue 21: adjoint memory increment ≤ limit × backprop's, per refinement factor m.
MEMORY_TARGETS = {1: 0.12, 2: 0.08}
#: adjoint step time ≤ limit × backprop's; adjoint (recompute on) ≤ limit × stages only.
TIME_TARGET, RECOMPUTE_TIME_TARGET = 1.8, 1.1


def configs(args) -> list[dict]:
    """One memory process per (refinement, variant), variants rotated between refinements;
    then one paired-timing process per refinement (:data:`PAIR_MODES`: the time targets'
    sides; recomputation on unless the variant turns it off)."""
    base = {"sweep": "finetune", "kind": "zoo", "model": args.model, "classes": args.classes,
            "input_size": args.input_size, "batch": args.batch}
    memory = [{**base, "refine": m, **variant_config(name), "steps": args.steps, "warmup": 1}
              for k, m in enumerate(args.refine) for name in _rotated(MODES, k)]
    timing = [{**base, "refine": m, "mode": "pair", "modes": list(PAIR_MODES),
               "recompute": True, "rounds": args.rounds} for m in args.refine]
    return memory + timing


def pending(todo: list[dict], results: list[dict]) -> list[dict]:
    """The configurations of ``todo`` that ``results`` (of an interrupted run) lack or that
    failed there."""
    done = {(r["refine"], variant(r)) for r in results if "error" not in r}
    return [c for c in todo if (c["refine"], variant(c)) not in done]


def _tables(results: list[dict]) -> tuple[dict, dict]:
    """(memory rows by (m, variant), paired-timing rows by m)."""
    mem = {(r["refine"], variant(r)): r for r in results if variant(r) in MODES}
    pairs = {r["refine"]: r for r in results if r["mode"] == "pair"}
    return mem, pairs


def recompute_ratio(pair: dict) -> tuple[float, float, float] | None:
    """(median, low, high): per-round step time of the adjoint over the stages-only adjoint in
    one paired process, with the bootstrap 95% interval of the median; None if the process
    did not time both."""
    times = pair.get("times_s", {})
    if "error" in pair or "adjoint" not in times or STAGES_ONLY not in times:
        return None
    return median_interval(ratios(times["adjoint"], times[STAGES_ONLY]))


def _cell(row: dict | None, field: str, fmt: str = "{:.0f}") -> str:
    if row is None:
        return "—"
    if "error" in row:
        return f"killed ({row['error']})"
    return fmt.format(row[field])


def memory_verdict(rss: float | None, alloc: float | None, limit: float) -> str:
    """Met/missed when the RSS and allocator ratios agree about ``limit``, else not decided
    (one process per configuration: the two measures are the only spread we have)."""
    result = run_record.agreeing_verdict((rss, alloc), limit)
    if result == "missed":
        return f"missed (by {min(rss, alloc) / limit - 1:.0%}–{max(rss, alloc) / limit - 1:.0%})"
    return result


def findings(mem: dict, pairs: dict) -> list[str]:
    """What the numbers say, computed from them: growth per added stage step, what
    recomputation outside the stages saves, time against the cost model."""
    out = []
    ok = {k: r for k, r in mem.items() if "error" not in r}
    factors = sorted({m for m, _ in ok})
    if len(factors) >= 2:
        m1, m2 = factors[0], factors[-1]
        rows = {mode: (ok[m1, mode], ok[m2, mode]) for mode in MODES
                if (m1, mode) in ok and (m2, mode) in ok}
        if "backprop" in rows and len(rows) > 1:
            added = rows["backprop"][1]["num_steps"] - rows["backprop"][0]["num_steps"]
            growth = {mode: b["increment_mb"] - a["increment_mb"]
                      for mode, (a, b) in rows.items()}
            out.append(
                f"- Refining ×{m2} adds {added} stage steps: backprop's increment grows by "
                f"{growth['backprop']:.0f} MB ({growth['backprop'] / added:.0f} MB per step, the "
                f"activations of one bottleneck block at batch {rows['backprop'][0]['batch']})"
                + "".join(f", {mode}'s by {growth[mode]:+.0f} MB" for mode in MODES[1:]
                          if mode in growth)
                + ": checkpoint stores ⌈√N⌉ states per stage, the adjoint none of the stages' "
                "activations, so refining (which is what makes its gradients accurate) costs "
                "it no activation memory.")
    for m in factors:
        a, s = ok.get((m, "adjoint")), ok.get((m, STAGES_ONLY))
        if a and s:
            out.append(
                f"- m = {m}: recomputing the stem, the 7 shape-changing blocks and the head "
                f"from their inputs takes the adjoint's increment from {s['increment_mb']:.0f} "
                f"MB ({STAGES_ONLY}: those parts backpropagate and keep their activations, "
                f"among them the largest feature maps, 112×112 and 56×56) to "
                f"{a['increment_mb']:.0f} MB (allocator {s['allocator_increment_mb']:.0f} → "
                f"{a['allocator_increment_mb']:.0f} MiB).")
    for m, r in sorted(pairs.items()):
        if "error" in r:
            continue
        t = r["step_s"]
        text = (f"- Step time at m = {m}: the adjoint takes {r['ratio']['adjoint']:.2f}× "
                f"backprop's time; the cost model gives {1 + 2 * t['fwd'] / t['backprop']:.2f}× "
                f"(a forward = {t['fwd'] / t['backprop']:.2f} of a backprop step)")
        rc = recompute_ratio(r)
        if rc is not None:
            text += (f"; recomputation outside the stages costs {rc[0]:.2f}× the stages-only "
                     f"adjoint's time ({t['adjoint']:.1f} vs {t[STAGES_ONLY]:.1f} s)")
        out.append(text + ".")
    return out


def claims(results: list[dict], page: str = "docs/finetune_memory.md") -> list[dict]:
    """The Targets section's numbers and verdicts, per refinement factor m: the adjoint's
    memory over backprop's (RSS; [low, high] spans the RSS and allocator ratios, the two
    measures the verdict needs to agree; target where issue 21 sets one), the stages-only
    adjoint's (measured), and the paired step-time ratios to backprop and to the stages-only
    adjoint."""
    mem, pairs = _tables(results)
    out = []
    for m in sorted({r["refine"] for r in results}):
        b = mem.get((m, "backprop"))
        for name, tag in (("adjoint", "adjoint"), (STAGES_ONLY, "adjoint-stages-only")):
            a = mem.get((m, name))
            rss, alloc = (_ratio(a, b, f) for f in ("increment_mb", "allocator_increment_mb"))
            if rss is None or alloc is None:
                continue
            limit = MEMORY_TARGETS.get(m) if name == "adjoint" else None
            out.append(run_record.claim(
                f"finetune_memory.m{m}.{tag}-memory", f"ResNet152V2 fine-tuning, refine ×{m}: "
                f"{name} / backprop training memory (RSS; range: RSS and allocator)",
                rss, low=min(rss, alloc), high=max(rss, alloc), unit="×",
                target=None if limit is None else f"≤ {limit}×",
                verdict="measured" if limit is None else memory_verdict(rss, alloc, limit),
                page=page))
        r = pairs.get(m)
        if r and "error" not in r:
            low, high = r["interval"]["adjoint"]
            out.append(run_record.claim(
                f"finetune_memory.m{m}.adjoint-time", f"ResNet152V2 fine-tuning, refine ×{m}: "
                "adjoint / backprop step time (paired)", r["ratio"]["adjoint"], low=low,
                high=high, unit="×", target=f"≤ {TIME_TARGET}×",
                verdict=verdict(low, high, TIME_TARGET, at_least=False), page=page))
            rc = recompute_ratio(r)
            if rc is not None:
                out.append(run_record.claim(
                    f"finetune_memory.m{m}.recompute-time", f"ResNet152V2 fine-tuning, refine "
                    f"×{m}: adjoint with / without recomputation outside the stages, step time "
                    "(paired)", rc[0], low=rc[1], high=rc[2], unit="×",
                    target=f"≤ {RECOMPUTE_TIME_TARGET}×",
                    verdict=verdict(rc[1], rc[2], RECOMPUTE_TIME_TARGET, at_least=False),
                    page=page))
    return out


def _memory_target(m: int, mem: dict) -> str:
    a, b = mem.get((m, "adjoint")), mem.get((m, "backprop"))
    rss, alloc = (_ratio(a, b, f) for f in ("increment_mb", "allocator_increment_mb"))
    limit = MEMORY_TARGETS.get(m)
    what = (f"adjoint memory ≤ {limit}× backprop's" if limit is not None else
            "adjoint memory / backprop's (no target at this m)")
    if rss is None:
        return f"{what}: **not measured** (a process is missing or failed)"
    values = f"RSS {rss:.3f}×, allocator {alloc:.3f}×"
    if limit is None:
        return f"{what}: {values}"
    return f"{what}: {values} — **{memory_verdict(rss, alloc, limit)}**"


def _time_targets(r: dict | None) -> str:
    if not r or "error" in r:
        return ""
    low, high = r["interval"]["adjoint"]
    text = (f"; adjoint step time ≤ {TIME_TARGET}× backprop's: {r['ratio']['adjoint']:.2f} "
            f"[{low:.2f}, {high:.2f}] — **{verdict(low, high, TIME_TARGET, at_least=False)}**")
    rc = recompute_ratio(r)
    if rc is not None:
        text += (f"; adjoint step time ≤ {RECOMPUTE_TIME_TARGET}× the stages-only adjoint's "
                 f"(recomputation outside the stages): {rc[0]:.2f} [{rc[1]:.2f}, {rc[2]:.2f}] — "
                 f"**{verdict(rc[1], rc[2], RECOMPUTE_TIME_TARGET, at_least=False)}**")
    return text


def write_doc(results: list[dict], meta: dict, out: Path, record=None) -> Path:
    """``out/finetune_memory.md``; every number comes from ``results``; ``record``'s header
    first."""
    mem, pairs = _tables(results)
    factors = sorted({r["refine"] for r in results})
    modes = [mode for mode in MODES if any(k[1] == mode for k in mem)]
    first = next((r for r in results if "error" not in r and "params" in r), {})
    size, batch = first.get("input_size", meta["input_size"]), first.get("batch", meta["batch"])
    lines = [
        *([*run_record.page_header(record), ""] if record else []),
        "# Fine-tuning a ported ResNet152V2: memory and step time per gradient mode",
        "",
        f"`keras.applications.ResNet152V2(weights=None)` at {size}×{size}×3 with a "
        f"{first.get('classes', 10)}-class head, ported with `zoo.create_model("
        f"\"{meta['model']}\", gradient=mode)` (its 43 identity blocks become Euler stages), "
        "then `kode.layers.set_gradient_mode(model, mode, recompute=...)`: checkpoint and "
        "adjoint with `recompute=True`, i.e. the stem, the 7 blocks that change shape and the "
        "head keep only their input and recompute their activations in the backward; "
        f"`{STAGES_ONLY}` is the adjoint with `recompute=False` (those parts backpropagate). "
        "Refined with `kode.tools.refine.refine(model, m)` where m > 1 (each stage step becomes "
        f"m untied steps of h/m). Every weight is trained (SGD, batch {batch}, float32, "
        "`tf.function` without XLA), as in `kode finetune` without `--freeze`.",
        "",
        "## How it was measured",
        "",
        f"Machine: {meta['machine']}.",
        "",
        f"Command (worker processes took {meta['wall_s'] / 60:.0f} min in total; 1-minute "
        f"load average {meta['load']} when they started, on 2 cores):",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        "**Memory**: one process per configuration, the method of "
        "`benchmarks/gradient_memory.py` (described in [gradients.md](gradients.md)): the "
        "train step is traced and run once on a batch of 1, then the peak RSS (`VmHWM`) over "
        f"the RSS at that point is taken over 1 untimed and {first.get('steps', '?')} timed "
        "full-batch steps; in parentheses the peak of TensorFlow's CPU allocator (BFC) over "
        "its bytes in use at the same point. The increment is what training adds to the "
        "built model traced on a batch of 1. Everything whose size does not depend on the batch "
        "was allocated by that batch-1 step and stays in TensorFlow's pool, among it the "
        f"{first.get('trainable_params', 0) * 4 / 2**20:.0f} MiB of float32 weight gradients "
        "(m = 1), so the increment is the batch-sized memory: activations kept for the "
        "backward and temporaries.",
        "",
        "**Time**: one more process per refinement factor builds the "
        + ", ".join(f"`{mode}`" for mode in PAIR_MODES) + " models and alternates their "
        f"training steps for {next(iter(pairs.values()), {}).get('rounds', '?')} rounds in a "
        "random order per round, after one untimed step each "
        "(`benchmarks/paired.py`); ratio = median over rounds of the per-round ratio (to "
        f"backprop, and the adjoint's to `{STAGES_ONLY}`), with a bootstrap 95% interval; "
        "forward: a forward pass of the backprop model in training mode, alternated with them. "
        "The Euler adjoint adds a reverse step and a recomputation of every stage step (≈ 2 "
        "forwards of the stages) to backprop's step, hence the cost model 1 + 2·forward/"
        "backprop (it counts the whole forward; recomputation outside the stages adds about "
        "one forward of the stem, transitions and head, which the ratio to "
        f"`{STAGES_ONLY}` measures).",
        "",
        "## Memory",
        "",
        "| refine m | stage steps | parameters | " + " | ".join(f"{m} MB" for m in modes)
        + " | " + " | ".join(f"{m}/backprop" for m in modes[1:]) + " | losses finite |",
        "|---:|---:|---:|" + "---:|" * (2 * len(modes) - 1) + "---|",
    ]
    for m in factors:
        row = {mode: mem.get((m, mode)) for mode in modes}
        ok = next((r for r in row.values() if r and "error" not in r), {})
        cells = [f"{_cell(r, 'increment_mb')} ({_cell(r, 'allocator_increment_mb')})"
                 if r and "error" not in r else _cell(r, "increment_mb") for r in row.values()]
        shares = []
        for mode in modes[1:]:
            rss = _ratio(row[mode], row.get("backprop"), "increment_mb")
            alloc = _ratio(row[mode], row.get("backprop"), "allocator_increment_mb")
            shares.append("—" if rss is None else f"{rss:.2f} ({alloc:.2f})")
        finite = all(r["finite"] for r in row.values() if r and "error" not in r)
        lines.append(f"| {m} | {ok.get('num_steps', '—')} | {ok.get('params', 0):,} | "
                     + " | ".join(cells) + " | " + " | ".join(shares) + f" | {finite} |")
    lines += [
        "",
        "Cells: RSS increment in MB (allocator increment in MiB); ratios RSS (allocator).",
        "",
        "## Step time",
        "",
        f"| refine m | backprop s | adjoint s | {STAGES_ONLY} s | forward s | "
        f"adjoint/backprop [95%] | adjoint/{STAGES_ONLY} [95%] | "
        "cost model 1 + 2·forward/backprop |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in factors:
        r = pairs.get(m)
        if r is None or "error" in r:
            lines.append(f"| {m} | {_cell(r, 'x')} | | | | | | |")
            continue
        t, (low, high) = r["step_s"], r["interval"]["adjoint"]
        rc = recompute_ratio(r)
        lines.append(f"| {m} | {t['backprop']:.1f} | {t['adjoint']:.1f} | "
                     + (f"{t[STAGES_ONLY]:.1f}" if STAGES_ONLY in t else "—")
                     + f" | {t['fwd']:.1f} | {r['ratio']['adjoint']:.2f} [{low:.2f}, "
                     f"{high:.2f}] | "
                     + ("—" if rc is None else f"{rc[0]:.2f} [{rc[1]:.2f}, {rc[2]:.2f}]")
                     + f" | {1 + 2 * t['fwd'] / t['backprop']:.2f} |")
    lines += ["", "## Targets", ""]
    for m in factors:
        lines.append(f"- m = {m}: {_memory_target(m, mem)}{_time_targets(pairs.get(m))}.")
    lines += ["", *findings(mem, pairs), *meta.get("findings", [])]
    return run_record.write_page(out / "finetune_memory.md", lines)


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _span(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}" if values else "not recorded"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="keras_resnet152v2")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--refine", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=1, help="timed steps per memory process")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the paired timing")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--json", help="write the raw per-process results here")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write the doc from raw results of earlier runs, run nothing")
    parser.add_argument("--resume", metavar="JSON",
                        help="keep the results of an interrupted run (its --json) and run only "
                             "the configurations it lacks, appending to it")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--mem-cap-gb", type=float, default=18.0)
    parser.add_argument("--findings", help="a Markdown file of findings appended to the doc")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    results: list[dict] = []
    for path in args.merge or []:
        results += json.loads(Path(path).read_text())
    command = "python -m benchmarks.finetune_memory " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv)
    started = time.monotonic()
    if args.resume:
        results = [r for r in json.loads(Path(args.resume).read_text()) if "error" not in r]
        print(f"resuming: {len(results)} results kept from {args.resume}", flush=True)
        args.json = args.json or args.resume
    todo = [] if args.merge else pending(configs(args), results)
    # Before any work: the highest load at start of the kept results and, if something is
    # measured now, of now.
    kept = run_record.merged_start_load(results)
    record = run_record.start_record(command, args.allow_load, load=max(
        ([kept] if kept is not None else []) + ([_load()] if todo else []), default=None))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for i, cfg in enumerate(todo):
        load = _load()
        r = measure(cfg, timeout=args.timeout, mem_cap_gb=args.mem_cap_gb)
        r["command"] = command
        r["load_at_start"] = load
        results.append(r)
        status = r.get("error") or (
            f"+{r['increment_mb']:.0f} MB (alloc {r['allocator_increment_mb']:.0f}), "
            f"{r['step_s']:.2f} s/step" if "increment_mb" in r else
            ", ".join(f"{k} {v:.2f} s" for k, v in r["step_s"].items()))
        print(f"[{i + 1}/{len(todo)} {time.monotonic() - started:.0f}s] refine={cfg['refine']} "
              f"{variant(cfg)}: {status} (process {r['wall_s']:.0f} s)", flush=True)
        if args.json:
            write_json(args.json, results, indent=1)
    commands = sorted({r["command"] for r in results if r.get("command")})
    meta = {"machine": machine_description(), "model": args.model, "batch": args.batch,
            "input_size": args.input_size, "command": "\n".join(commands),
            "wall_s": sum(r.get("wall_s", 0) for r in results),
            "load": _span([r["load_at_start"] for r in results if "load_at_start" in r]),
            "findings": Path(args.findings).read_text().splitlines() if args.findings else []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_record.finish_record(record)
    path = write_doc(results, meta, out, record)
    run_record.write_record(path, record, results, claims(results))
    print(f"wrote {path} and its .json", flush=True)


if __name__ == "__main__":
    main()
