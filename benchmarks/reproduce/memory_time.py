"""Memory and time vs depth of the three gradient modes, by the adjoint benchmark.

Reuses :mod:`benchmarks.gradient_memory` as is (its configurations, one worker process per
configuration, peak-RSS measurement, paired timing and plots) on a smaller sweep: one stage
of N residual functions (BasicBlock(16) on 32×32×16 states, batch 32). Expected (Sander et
al.): backprop stores O(N) activations, checkpointing O(√N), the adjoint O(1), at the price
of about one extra forward per step. ``docs/gradients.md`` holds the full benchmark.
"""

from __future__ import annotations

from benchmarks import gradient_memory as gm
from benchmarks.reproduce.common import Context, loglog_slope, markdown_table

TITLE = "Memory and time vs depth (the adjoint benchmark, reduced sweep)"

QUICK = {"ns": [8, 64], "integrators": ["euler"], "modes": ["backprop", "adjoint"],
         "timing_ns": [16]}
# ≈ 8 min alone on 2 cores; N = 256 and the whole networks are in docs/gradients.md.
FULL = {"ns": [4, 16, 64], "integrators": ["euler", "reversible_heun"],
        "modes": ["backprop", "checkpoint", "adjoint"], "timing_ns": [32]}
BATCH = 32


def run(ctx: Context) -> dict:
    sweep = QUICK if ctx.quick else FULL
    configs = gm.stage_configs(sweep["ns"], sweep["integrators"], sweep["modes"], BATCH,
                               steps=2 if ctx.quick else 3, warmup=1)
    configs += gm.timing_configs(sweep["timing_ns"], sweep["integrators"], BATCH, rounds=3)
    results = []
    for i, cfg in enumerate(configs, 1):
        r = gm.measure(cfg, timeout=900)
        results.append(r)
        what = f"{cfg['integrator']} N={cfg['n']} {cfg['mode']}"
        if "error" in r:
            status = r["error"]
        elif "ratio" in r:
            status = f"adjoint/backprop time {r['ratio']['adjoint']:.2f}"
        else:
            status = f"+{r['increment_mb']:.0f} MB, {r['step_s']:.3f} s/step"
        ctx.progress(f"{i}/{len(configs)} {what}: {status}")
    table = gm.aggregate(results)
    footer = f"{ctx.command} · one process per configuration, batch {BATCH}"
    files = gm.plot(table, ctx.out, prefix=f"results_{ctx.name}", footer=footer)
    rows = [{"integrator": k[1], "n": k[2], "mode": k[3], **v}
            for k, v in table.items() if k[0] == "stage"]
    pairs = [{"integrator": k[1], "n": k[2], **v} for k, v in table.items()
             if k[0] == "timing"]
    return {"sweep": sweep, "batch": BATCH, "stage": rows, "paired": pairs, "figures": files}


def _exponent(x: float) -> str:
    return "?" if x != x else f"{x:.2f}".replace("-0.00", "0.00")


def _growth(rows: list[dict], integrator: str, mode: str) -> float:
    pts = sorted((r["n"], r["allocator_increment_mb"]) for r in rows
                 if r["integrator"] == integrator and r["mode"] == mode and "error" not in r)
    return loglog_slope(*zip(*pts, strict=True)) if len(pts) > 1 else float("nan")


def report(result: dict) -> list[str]:
    rows, sweep = result["stage"], result["sweep"]
    cell = {(r["integrator"], r["n"], r["mode"]): r for r in rows}
    lines = [
        f"One stage of N residual functions (BasicBlock(16), 32×32×16 states, batch "
        f"{result['batch']}), each configuration in its own process, measured by "
        "`benchmarks/gradient_memory.py` (method and the full sweep up to N = 256 and "
        "ResNet-1202: [gradients.md](gradients.md)). Memory is the peak RSS increment over "
        "the built model during training steps (MB), in parentheses TensorFlow's allocator "
        "peak (MiB); time is the median step.",
        "",
    ]
    headers = ["integrator", "N"] + [f"{m} MB" for m in sweep["modes"]] + \
        [f"{m} s" for m in sweep["modes"]]
    table_rows = []
    for integrator in sweep["integrators"]:
        for n in sweep["ns"]:
            cells = [cell.get((integrator, n, m)) for m in sweep["modes"]]
            table_rows.append([integrator, n] + [gm._mb(c) for c in cells]
                              + [gm._sec(c) for c in cells])
    lines += markdown_table(headers, table_rows) + [""]
    lines += [f"![memory vs N]({result['figures'][0]})",
              f"![step time vs N]({result['figures'][1]})", ""]
    n_max = max(sweep["ns"])
    for integrator in sweep["integrators"]:
        bp, adj = cell.get((integrator, n_max, "backprop")), cell.get((integrator, n_max,
                                                                       "adjoint"))
        bp_exp, adj_exp = (_exponent(_growth(rows, integrator, m))
                           for m in ("backprop", "adjoint"))
        text = (f"- {integrator}: allocator peak grows like N^{bp_exp} with backprop and "
                f"N^{adj_exp} with the adjoint")
        if "checkpoint" in sweep["modes"]:
            text += f", N^{_exponent(_growth(rows, integrator, 'checkpoint'))} with checkpointing"
        if gm._ok(bp) and gm._ok(adj):
            text += (f"; at N = {n_max} the adjoint needs "
                     f"{adj['increment_mb'] / bp['increment_mb']:.3f}× backprop's memory")
        lines.append(text + ".")
    for p in result["paired"]:
        if "error" in p:
            continue
        t = p["step_s"]
        # An exact reversal's evaluation is reused by the product: one forward per step.
        forwards = 1 if p["integrator"] in gm.REUSING else 2
        how = ("one reverse step whose evaluation the product reuses" if forwards == 1 else
               "one reverse step plus one recomputation")
        lines.append(f"- {p['integrator']}, N = {p['n']}, steps alternated in one process: "
                     f"adjoint {t['adjoint']:.3f} s vs backprop {t['backprop']:.3f} s per step "
                     f"= {p['ratio']['adjoint']:.2f}×; a forward pass takes {t['fwd']:.3f} s, so "
                     f"{how} per step predicts 1 + {forwards if forwards > 1 else ''}"
                     f"{'·' if forwards > 1 else ''}forward/backprop = "
                     f"{1 + forwards * t['fwd'] / t['backprop']:.2f}×.")
    flat = [i for i in sweep["integrators"] if abs(_growth(rows, i, "adjoint")) < 0.1
            and _growth(rows, i, "backprop") > 0.8]
    verdict = ("agrees" if len(flat) == len(sweep["integrators"]) else "does NOT agree")
    lines += [
        "",
        f"Agreement with Sander et al.: the measurement {verdict} with the claim that the "
        "adjoint's activation memory is O(1) in depth while backprop's is O(N) (exponents "
        "above). On time, [reference.md](reference.md) §3 says \"about one extra forward per "
        "step\"; kode's "
        "Euler adjoint pays about two per step (the reverse step evaluates f_n at x_{n+1}, "
        "the recomputation at the rebuilt x_n: two points, so they cannot share an "
        "evaluation)"
        + (": measured " + ", ".join(
            f"{(p['step_s']['adjoint'] - p['step_s']['backprop']) / p['step_s']['fwd']:.1f}"
            f" forwards ({p['integrator']}, N = {p['n']})"
            for p in result["paired"] if "error" not in p) if result["paired"] else "")
        + ("; reversible Heun's reverse step evaluates the same f_n at the same z_n as the "
           "product needs, and the adjoint differentiates that evaluation instead of "
           "recomputing it: about one extra forward per step"
           if "reversible_heun" in sweep["integrators"] else "") + ".",
    ]
    return lines
