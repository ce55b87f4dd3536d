"""Activation memory against depth of the zoo's CIFAR ResNets, per gradient mode (issue 21):
the ``depth`` sweep of :mod:`benchmarks.gradient_memory` (``--sweeps depth``).

What is measured: ``zoo.create_model(f"resnet{d}", gradient=mode)`` (Euler stages, h = 1,
32×32×3, 10 classes) for the basic-block CIFAR depths d, trained with SGD at batch 8 and at
batch 72, one process per (depth, variant, batch) with ``gradient_memory.run_worker``: the
peak RSS over the model built and traced on a batch of 1, and the peak of TensorFlow's CPU
allocator over its bytes in use at that point. **Activation memory** = increment at batch
72 − increment at batch 8: the memory of 64 more examples. The difference removes what does
not scale with the batch, among it the unrolled graph's per-step host bookkeeping, which grows
with depth in every mode (``docs/gradients.md``, "what grows is not activations").

Variants: ``backprop``; ``checkpoint`` and ``adjoint`` with recomputation outside the stages
(``recompute=True``: the layers ``kode.layers.stage.recomputable_layers`` finds, in these
CIFAR ResNets the two transition blocks, keep only their input and recompute their
activations in the backward; the stem convolution and the head are not among them and
backpropagate); ``adjoint (stages only)`` (``recompute=False``: the transitions backpropagate
too, the behaviour before issue 21).

Targets: the slope of log(activation memory) against log(depth), least squares over the
depths, ≤ 0.05 for the adjoint; at ResNet-110 the adjoint's activation memory ≤ 0.03×
backprop's. Each is met when the RSS and the allocator measure both meet it, missed when both
miss it, otherwise not decided (:func:`benchmarks.record.agreeing_verdict`).

This module is the sweep's configurations, run-time estimate, aggregation, verdicts, claims,
plot and page section; running the processes and writing the page stay in
``gradient_memory`` (which imports this module, never the other way round).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from benchmarks import record as run_record

SWEEP = "depth"
#: The zoo's basic-block CIFAR depths 6n + 2 (164, the bottleneck layout, is left out: a
#: different block, so not the same curve).
DEPTHS = (20, 32, 44, 56, 110, 1202)
QUICK_DEPTHS = (20, 32, 56, 110)
BATCHES = (8, 72)
STAGES_ONLY_SUFFIX = " (stages only)"
STAGES_ONLY = "adjoint" + STAGES_ONLY_SUFFIX
VARIANTS = ("backprop", "checkpoint", "adjoint", STAGES_ONLY)
#: The modes whose parts outside the stages can recompute (``set_gradient_mode(recompute=)``).
RECOMPUTING = ("checkpoint", "adjoint")
SLOPE_TARGET = 0.05
RATIO_DEPTH, RATIO_TARGET = 110, 0.03
#: TensorFlow's default inter-op scheduling (0), what a user's training runs. One op at a time
#: (1) avoids a random overlap of two convolution filter gradients' scratch buffers (≈ 120 MiB
#: at batch 72 on a 32×32×16 state), but TensorFlow's executor, when it has one thread, follows
#: one chain of ready ops and leaves the others queued: the adjoint's rebuilt activations then
#: wait for their queued consumers and pile up with depth (a stage of 320 Euler steps, 16×16×16
#: at batch 64: 145–278 MiB with one thread against 9 MiB with the default, 2026-12-02).
#: Each process reports its steps' allocator peaks one by one, so an overlap shows.
INTER_OP_THREADS = 0

# Cost model of one worker process, for the printed estimate only. Measured on this machine
# (2 cores) on 2026-12-02, adjoint at batch 8, one op at a time: resnet110 (54 blocks) 21 s per
# process, 9.4 s of it tracing (load 1.5); resnet1202 (600 blocks) 460 s, 408 s tracing (load
# 3.5–4.6, so an upper bound): tracing grows faster than the blocks (graph optimization),
# fitted by a·n + b·n²; backprop traces in about 1/1.3 of the adjoint's time. Steps: the zoo
# sweep of docs/gradients.md (ResNet-110 and -1202 at batch 128, quiet machine): 0.41–0.44 ms
# per block and example for a backprop step, 0.6 checkpoint, 0.7 adjoint; backprop's
# increment 0.15 MB per block and example.
STARTUP_S, TRACE_S_PER_BLOCK, TRACE_S_PER_BLOCK2 = 8.0, 0.124, 9.3e-4
STEP_S_PER_BLOCK_EXAMPLE = {"backprop": 0.45e-3, "checkpoint": 0.6e-3, "adjoint": 0.7e-3}
BACKPROP_MB_PER_BLOCK_EXAMPLE = 0.155


def variant(cfg: dict) -> str:
    """A worker configuration's label: its ``mode``, plus " (stages only)" when it turns
    recomputation outside the stages off (``"recompute": False``)."""
    mode = cfg["mode"]
    if cfg.get("recompute") is False and mode in RECOMPUTING:
        return mode + STAGES_ONLY_SUFFIX
    return mode


def split_variant(name: str) -> tuple[str, bool | None]:
    """(gradient mode, recompute) of a label of :func:`variant`; recompute is None when the
    label does not set it (the builder's default applies)."""
    if name.endswith(STAGES_ONLY_SUFFIX):
        return name[: -len(STAGES_ONLY_SUFFIX)], False
    return name, None


def variant_config(name: str) -> dict:
    """The worker-configuration keys of a variant: recompute on for checkpoint and adjoint
    (explicit, so the label means what it says whatever the builder's default), off for
    " (stages only)", absent for backprop."""
    mode, recompute = split_variant(name)
    if mode not in RECOMPUTING:
        return {"mode": mode}
    return {"mode": mode, "recompute": recompute is not False}


def configs(depths=DEPTHS, batches=BATCHES, steps: int = 2,
            variants: tuple[str, ...] = VARIANTS,
            inter_op_threads: int = INTER_OP_THREADS) -> list[dict]:
    """One worker configuration per (depth, batch, variant); the variants' order rotates from
    one (depth, batch) to the next so that none always runs first or last."""
    out = []
    for k, (depth, batch) in enumerate((d, b) for d in depths for b in batches):
        shift = k % len(variants)
        for name in variants[shift:] + variants[:shift]:
            out.append({"sweep": SWEEP, "kind": "zoo", "model": f"resnet{depth}",
                        **variant_config(name), "batch": batch, "steps": steps,
                        "warmup": 0, "inter_op_threads": inter_op_threads, "rep": 0})
    return out


def depth_of(model: str) -> int:
    """The depth of a zoo name (``resnet110`` → 110)."""
    return int(re.search(r"(\d+)$", model).group(1))


def blocks(depth: int) -> int:
    """Residual blocks of a basic-block CIFAR ResNet of ``depth`` = 6n + 2 (3 stages of n)."""
    return (depth - 2) // 2


def process_seconds(cfg: dict) -> float:
    """Estimated wall time of one worker process (the cost model above)."""
    mode, n = cfg["mode"], blocks(depth_of(cfg["model"]))
    trace = (TRACE_S_PER_BLOCK * n + TRACE_S_PER_BLOCK2 * n**2) / (
        1.3 if mode == "backprop" else 1.0)
    steps = cfg.get("warmup", 0) + cfg.get("steps", 1)
    return STARTUP_S + trace + steps * cfg["batch"] * n * STEP_S_PER_BLOCK_EXAMPLE[mode]


def peak_gb(cfg: dict) -> float:
    """Estimated peak RSS of one worker process: the built and traced model (0.6 GB + 5 MB
    per block of unrolled graph: measured 0.86 GB for resnet110, 2.7 GB for resnet1202, so
    an upper bound there) plus its activations (backprop: every block;
    checkpoint and adjoint: bounded by 2√blocks blocks' worth, which matched ResNet-110 and
    -1202 at batch 128)."""
    n = blocks(depth_of(cfg["model"]))
    held = n if cfg["mode"] == "backprop" else 2 * math.sqrt(n)
    return 0.6 + 0.005 * n + BACKPROP_MB_PER_BLOCK_EXAMPLE * held * cfg["batch"] / 1024


def estimate(cfgs: list[dict], mem_cap_gb: float) -> list[str]:
    """Lines to print before the sweep runs: processes, estimated time, the largest peak and
    which configurations the memory cap would kill."""
    if not cfgs:
        return []
    seconds = sum(process_seconds(c) for c in cfgs)
    big = max(cfgs, key=peak_gb)
    lines = [f"depth sweep: {len(cfgs)} processes, estimated {seconds / 60:.0f} min on 2 idle "
             f"cores; largest estimated peak RSS {peak_gb(big):.1f} GB ({big['model']} "
             f"{variant(big)} at batch {big['batch']}; cap {mem_cap_gb:g} GB)"]
    over = [c for c in cfgs if peak_gb(c) > mem_cap_gb]
    if over:
        lines.append("depth sweep: the memory cap will likely kill "
                     + ", ".join(f"{c['model']} {variant(c)} batch {c['batch']}" for c in over)
                     + ": raise --mem-cap-gb if the machine has the memory")
    return lines


# ------------------------------------------------------------------------------ aggregation


def _ok(row) -> bool:
    return bool(row) and "error" not in row


def activation(table: dict) -> dict[tuple[str, int], dict]:
    """(variant, depth) → activation memory: ``rss`` (MB) and ``alloc`` (MiB) = increment at
    the largest batch − increment at the smallest, with those batches and the stage steps;
    ``{"error": ...}`` when one of the two processes failed. ``table``: the aggregate of
    ``gradient_memory`` (keys (sweep, model, batch, variant))."""
    by: dict[tuple[str, int], dict[int, dict]] = {}
    for key, row in table.items():
        if key[0] == SWEEP:
            by.setdefault((key[3], depth_of(key[1])), {})[key[2]] = row
    out = {}
    for (name, depth), rows in by.items():
        if len(rows) < 2:
            continue
        low, high = min(rows), max(rows)
        a, b = rows[low], rows[high]
        failed = [(batch, r) for batch, r in ((low, a), (high, b)) if not _ok(r)]
        if failed:
            batch, r = failed[0]
            out[name, depth] = {"error": f"batch {batch}: {r.get('error', 'missing')}",
                                "low_batch": low, "high_batch": high}
            continue
        out[name, depth] = {
            "rss": b["increment_mb"] - a["increment_mb"],
            "alloc": b["allocator_increment_mb"] - a["allocator_increment_mb"],
            "low_batch": low, "high_batch": high, "num_steps": b["num_steps"],
            "inter_op_threads": b.get("inter_op_threads", 0),
            "step_spread": max(_spread(a), _spread(b))}
    return out


def _spread(row: dict) -> float:
    """Largest − smallest allocator peak over a process's steps (MiB; 0 with one step)."""
    peaks = row.get("step_allocator_increments_mb") or [0.0]
    return max(peaks) - min(peaks)


def scheduling(act: dict) -> str:
    """How the rows' ops were scheduled, in words, and the largest step-to-step spread."""
    threads = {r.get("inter_op_threads", 0) for r in act.values() if _ok(r)}
    spread = max((r.get("step_spread", 0.0) for r in act.values() if _ok(r)), default=0.0)
    how = ("TensorFlow's default inter-op scheduling (what a user's training runs)"
           if threads == {0} else "ops one at a time (`inter_op_threads` 1)" if threads == {1}
           else f"inter-op threads {sorted(threads)}")
    return (f"{how}; the largest difference between two steps' allocator peaks in one "
            f"process: {spread:.1f} MiB")


def slope(depths, values) -> float:
    """Least-squares slope of log(value) against log(depth); NaN with fewer than two depths
    or a value ≤ 0 (no logarithm: the fit would silently drop that depth)."""
    values = np.asarray(values, float)
    if len(values) < 2 or not np.all(values > 0):
        return math.nan
    k = np.polyfit(np.log(np.asarray(depths, float)), np.log(values), 1)[0]
    return round(float(k), 12) + 0.0  # rounding noise of a flat line prints as "-0.000"


def slopes(act: dict) -> dict[str, dict]:
    """Per variant: the depths with a measurement and the slope of each measure over them."""
    out = {}
    for name in VARIANTS:
        rows = sorted((d, r) for (v, d), r in act.items() if v == name and _ok(r))
        if rows:
            depths = [d for d, _ in rows]
            out[name] = {"depths": depths,
                         **{f: slope(depths, [r[f] for _, r in rows]) for f in ("rss", "alloc")}}
    return out


def ratio(act: dict, depth: int, name: str = "adjoint") -> dict | None:
    """``name``'s activation memory over backprop's at ``depth``, per measure (None if either
    is missing or failed)."""
    a, b = act.get((name, depth)), act.get(("backprop", depth))
    if not (_ok(a) and _ok(b)) or b["rss"] <= 0 or b["alloc"] <= 0:
        return None
    return {f: a[f] / b[f] for f in ("rss", "alloc")}


def _batches(act: dict) -> str:
    """"batch 72 − batch 8": the difference the activation memory is (the first row's)."""
    row = next(iter(act.values()))
    return f"batch {row['high_batch']} − batch {row['low_batch']}"


def _verdict_text(verdict: str) -> str:
    return f"**{verdict}**"


def _range(values: dict, digits: int) -> str:
    if math.isnan(values["rss"]) or math.isnan(values["alloc"]):
        return "— (needs two depths or more, each with a positive value)"
    return f"RSS {values['rss']:.{digits}f}, allocator {values['alloc']:.{digits}f}"


def _pair_cell(values: dict | None, digits: int = 3) -> str:
    if values is None or math.isnan(values["rss"]) or math.isnan(values["alloc"]):
        return "—"
    return f"{values['rss']:.{digits}f} ({values['alloc']:.{digits}f})"


# ------------------------------------------------------------------------------- reporting


def targets(table: dict) -> list[str]:
    """The sweep's two targets with values and verdicts; empty without depth results."""
    act = activation(table)
    if not act:
        return []
    out = []
    s = slopes(act)
    if "adjoint" in s:
        row = s["adjoint"]
        verdict = run_record.agreeing_verdict((row["rss"], row["alloc"]), SLOPE_TARGET)
        others = "; ".join(f"{name}: {_range(s[name], 2)}" for name in VARIANTS
                           if name != "adjoint" and name in s and not math.isnan(s[name]["rss"]))
        out.append(
            f"- Adjoint activation memory flat in depth (slope of log memory against log depth "
            f"≤ {SLOPE_TARGET:g}, least squares over d = {', '.join(map(str, row['depths']))}):"
            f" {_range(row, 3)} — {_verdict_text(verdict)}"
            + (f" (for comparison, {others})" if others else "") + ".")
    r = ratio(act, RATIO_DEPTH)
    if r is not None:
        a, b = act["adjoint", RATIO_DEPTH], act["backprop", RATIO_DEPTH]
        verdict = run_record.agreeing_verdict(r.values(), RATIO_TARGET)
        stages = ratio(act, RATIO_DEPTH, STAGES_ONLY)
        out.append(
            f"- ResNet-{RATIO_DEPTH}, adjoint activation memory (batch {a['high_batch']} − "
            f"batch {a['low_batch']}) ≤ {RATIO_TARGET:g}× backprop's: {a['rss']:.0f} vs "
            f"{b['rss']:.0f} MB = {r['rss']:.3f}× (allocator {a['alloc']:.0f} vs "
            f"{b['alloc']:.0f} MiB = {r['alloc']:.3f}×) — {_verdict_text(verdict)}"
            + (f"; with recomputation off ({STAGES_ONLY}) {stages['rss']:.3f}× (allocator "
               f"{stages['alloc']:.3f}×)" if stages else "") + ".")
        crossing = ratio_depth(act)
        flat = "adjoint" in s and run_record.agreeing_verdict(
            (s["adjoint"]["rss"], s["adjoint"]["alloc"]), SLOPE_TARGET) == "met"
        if crossing is not None and flat:
            out.append(f"  What the adjoint keeps does not grow with depth (a constant, "
                       f"{crossing['constant']:.0f} MB on average over the depths) while "
                       f"backprop's grows by {crossing['per_block']:.1f} MB per block, so the "
                       f"ratio falls like 1/depth: ≤ {RATIO_TARGET:g}× from about depth "
                       f"{crossing['depth']:.0f} on (RSS; from the measured means, not a "
                       "measurement at that depth).")
    return out


def ratio_depth(act: dict, target: float = RATIO_TARGET) -> dict | None:
    """Where the adjoint/backprop ratio reaches ``target``, from the measurements: the
    adjoint's mean activation memory over the depths (RSS, MB) over backprop's mean per block
    (least squares through the origin), depth 2·blocks + 2. None without both variants."""
    depths = sorted(d for (v, d), r in act.items() if v == "adjoint" and _ok(r))
    pairs = [(blocks(d), act["backprop", d]["rss"]) for d in depths
             if _ok(act.get(("backprop", d)))]
    if not depths or not pairs:
        return None
    constant = float(np.mean([act["adjoint", d]["rss"] for d in depths]))
    per_block = sum(n * m for n, m in pairs) / sum(n * n for n, _ in pairs)
    if per_block <= 0:
        return None
    return {"constant": constant, "per_block": per_block,
            "depth": 2 * constant / (target * per_block) + 2}


def claims(table: dict, page: str) -> list[dict]:
    """The targets' numbers for the JSON (value: RSS; [low, high]: the RSS and allocator
    values), plus backprop's slope and the stages-only ratio as measurements."""
    act = activation(table)
    out = []
    s = slopes(act)
    for name, tag in (("adjoint", "adjoint"), (STAGES_ONLY, "adjoint-stages-only"),
                      ("backprop", "backprop")):
        row = s.get(name)
        if row is None or math.isnan(row["rss"]) or math.isnan(row["alloc"]):
            continue
        target = name == "adjoint"
        out.append(run_record.claim(
            f"gradients.depth.{tag}-slope",
            f"zoo ResNets d = {row['depths'][0]}–{row['depths'][-1]}, {name}: slope of log "
            f"activation memory ({_batches(act)}) against log depth (RSS; range: RSS and "
            "allocator)", row["rss"], low=min(row["rss"], row["alloc"]),
            high=max(row["rss"], row["alloc"]), unit="slope",
            target=f"≤ {SLOPE_TARGET:g}" if target else None,
            verdict=run_record.agreeing_verdict((row["rss"], row["alloc"]), SLOPE_TARGET)
            if target else "measured", page=page))
    for name, tag in (("adjoint", "adjoint"), (STAGES_ONLY, "adjoint-stages-only")):
        r = ratio(act, RATIO_DEPTH, name)
        if r is None:
            continue
        target = name == "adjoint"
        verdict = run_record.agreeing_verdict(r.values(), RATIO_TARGET)
        out.append(run_record.claim(
            f"gradients.depth.resnet{RATIO_DEPTH}.{tag}-vs-backprop",
            f"ResNet-{RATIO_DEPTH}, {name} / backprop activation memory ({_batches(act)}; "
            "RSS; range: RSS and allocator)", r["rss"], low=min(r.values()),
            high=max(r.values()), unit="×", target=f"≤ {RATIO_TARGET:g}×" if target else None,
            verdict=verdict if target else "measured", page=page))
    return out


def _cell(row) -> str:
    if row is None:
        return "—"
    if not _ok(row):
        return f"failed: {row['error']}"
    return f"{row['rss']:.0f} ({row['alloc']:.0f})"


def section(table: dict, image: str = "gradients_depth.png") -> list[str]:
    """The page's section: method, table per depth, slopes, figure."""
    act = activation(table)
    if not act:
        return []
    depths = sorted({d for _, d in act})
    names = [v for v in VARIANTS if any(k[0] == v for k in act)]
    first = next(r for r in act.values() if "low_batch" in r)
    low, high = first["low_batch"], first["high_batch"]
    lines = [
        "## Sweep 3: activation memory against depth (zoo CIFAR ResNets)",
        "",
        f"`zoo.create_model(\"resnet<d>\", gradient=mode)` (Euler stages, h = 1, 32×32×3, 10 "
        "classes), then `kode.layers.set_gradient_mode(model, mode, recompute=...)`: "
        "checkpoint and adjoint with `recompute=True` (the two transition blocks keep only "
        "their input and recompute their activations in the backward; the stem convolution "
        "and the head backpropagate in every mode); "
        f"`{STAGES_ONLY}` is the adjoint with `recompute=False` (the transitions "
        "backpropagate too). One process per (depth, "
        f"mode, batch), {scheduling(act)} (an overlap of two convolution filter gradients' "
        "scratch buffers would add ~120 MiB to one step at random; with one inter-op thread "
        "TensorFlow's executor queues the adjoint's side work and its memory grows with depth "
        "instead), no untimed step, 2 timed steps. **Activation memory = increment at "
        f"batch {high} − increment at batch {low}** (RSS MB; allocator MiB in parentheses): "
        "the memory of the extra examples, without what does not scale with the batch (the "
        "unrolled graph's host bookkeeping grows with depth in every mode).",
        "",
        "| depth | stage steps | " + " | ".join(f"{v} MB" for v in names)
        + " | adjoint/backprop | " + f"{STAGES_ONLY}/backprop |",
        "|---:|---:|" + "---:|" * (len(names) + 2),
    ]
    for d in depths:
        steps = next((r["num_steps"] for (v, dd), r in act.items() if dd == d and _ok(r)), "—")
        cells = [_cell(act.get((v, d))) for v in names]
        ratios = [_pair_cell(ratio(act, d, name)) for name in ("adjoint", STAGES_ONLY)]
        lines.append(f"| {d} | {steps} | " + " | ".join(cells) + " | " + " | ".join(ratios)
                     + " |")
    s = slopes(act)
    lines.append("| slope of log memory vs log depth | | "
                 + " | ".join(_pair_cell(s.get(v)) for v in names) + " | | |")
    return lines + ["", f"![activation memory vs depth]({image})", ""]


def plot(table: dict, out: Path, prefix: str = "gradients") -> list[str]:
    """``<prefix>_depth.png``: activation memory against depth, log–log, one line per variant,
    RSS and allocator side by side; [] without depth results."""
    act = activation(table)
    if not act:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    styles = dict(zip(VARIANTS, ("o-", "s-", "^-", "v--"), strict=True))
    s = slopes(act)
    for ax, field, title in zip(axes, ("rss", "alloc"),
                                ("peak RSS increment (MB)", "allocator peak increment (MiB)"),
                                strict=True):
        for name in VARIANTS:
            pts = sorted((d, r[field]) for (v, d), r in act.items()
                         if v == name and _ok(r) and r[field] > 0)
            if pts:
                k = s.get(name, {}).get(field, math.nan)
                ax.plot(*zip(*pts, strict=True), styles[name],
                        label=f"{name} (slope {k:.2f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("depth d (zoo resnet<d>)")
        ax.set_title(f"{title}: {_batches(act)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("activation memory")
    fig.tight_layout()
    name = f"{prefix}_depth.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return [name]
