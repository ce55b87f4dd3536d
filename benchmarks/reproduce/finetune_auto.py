"""``--refine auto`` in the fine-tuning experiment (:mod:`benchmarks.reproduce.finetune`):
refine with the m that ``kode finetune --refine auto`` would choose, fine-tune both ways, and
the verdict on Sander et al.'s Table 2 claim "adjoint fine-tuning recovers backprop's accuracy"
(within :data:`TOLERANCE`), computed from the per-seed accuracies."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.reproduce.common import fmt, markdown_table, mean_std

# Fine-tuning counts as recovering when within this many points of backprop's accuracy.
TOLERANCE = 0.01


def run_auto(model, rows: list[dict], budget: dict, guard_batch,
             finetune_both: Callable[[object], dict]) -> dict:
    """``refine(model, "auto")`` as ``kode finetune --refine auto`` does (choose_factor on the
    guard batch, ``budget``'s tolerance and factors), then ``finetune_both(refined)`` (test
    accuracy per mode: ``finetuned_backprop``, ``finetuned_adjoint``). When it picks
    one of the fixed factors, that row's fine-tuning is reused: the same refined weights, seed
    and data order give the same run. ``{"m": None, "error": ...}`` when no m passes."""
    from kode.errors import KodeError
    from kode.tools.refine import choose_factor

    tolerance, factors = budget["auto_tolerance"], budget["auto_factors"]
    try:
        choice = choose_factor(model, *guard_batch, tolerance, factors=factors)
    except KodeError as err:
        return {"m": None, "error": str(err), "tolerance": tolerance, "reused": False}
    auto = {"m": choice.factor, "tolerance": tolerance, "factors": list(factors),
            "candidates": [r.as_dict() for r in choice.rows],
            "guard_error": choice.rows[-1].gradient_error}
    fixed = next((r for r in rows if r["m"] == choice.factor), None)
    if fixed is not None:
        return {**auto, "reused": True, **{k: fixed[k] for k in (
            "finetuned_backprop", "finetuned_adjoint", "guard_error_after")}}
    return {**auto, "reused": False, **finetune_both(choice.model)}


def auto_verdict(autos: list[dict], tolerance: float = TOLERANCE) -> dict:
    """Over the seeds of ``autos`` (one :func:`run_auto` result each): gap = backprop −
    adjoint fine-tuned accuracy per seed that chose an m, its mean and std, how many seeds are
    within ``tolerance``; ``agrees`` (with Sander et al.: the adjoint recovers backprop's
    accuracy) when every seed chose an m and the mean gap is ≤ ``tolerance``, None when no
    seed chose one."""
    chosen = [a for a in autos if a.get("m") is not None]
    out = {"seeds": len(autos), "failed": len(autos) - len(chosen), "tolerance": tolerance,
           "ms": [a.get("m") for a in autos]}
    if not chosen:
        return {**out, "gaps": [], "gap_mean": None, "gap_std": None, "within": 0,
                "agrees": None}
    gaps = [a["finetuned_backprop"] - a["finetuned_adjoint"] for a in chosen]
    mean, std = mean_std(gaps)
    return {**out, "gaps": gaps, "gap_mean": mean, "gap_std": std,
            "within": sum(g <= tolerance for g in gaps),
            "agrees": not out["failed"] and mean <= tolerance}


def auto_report(runs: list[dict], guard_batch: int) -> list[str]:
    """The ``--refine auto`` section: per seed the m chosen and both fine-tuned accuracies,
    then the verdict of :func:`auto_verdict` (computed, with its numbers)."""
    autos = [run["auto"] for run in runs if "auto" in run]
    v = auto_verdict(autos)
    first = autos[0]
    rows = []
    for run, a in zip((r for r in runs if "auto" in r), autos, strict=True):
        if a["m"] is None:
            rows.append([run["seed"], "none passed", "—", "—", "—", "—"])
            continue
        rows.append([run["seed"], a["m"], fmt(a["guard_error"]),
                     f"{a['finetuned_backprop']:.3f}", f"{a['finetuned_adjoint']:.3f}",
                     f"{100 * (a['finetuned_backprop'] - a['finetuned_adjoint']):+.1f}"
                     + (" (×m row)" if a.get("reused") else "")])
    lines = [
        f"**With `--refine auto`** (`kode.tools.refine.choose_factor`, what `kode finetune "
        f"--refine auto` runs: the smallest m of {', '.join(map(str, first.get('factors', [])))}"
        f" whose adjoint gradient error, measured by the guard on {guard_batch} fine-tuning "
        f"examples, is ≤ {first['tolerance']:g}), then fine-tuned with backprop and with the "
        "adjoint as above; where auto chose one of the fixed factors, that row's runs are "
        "reused (same refined weights, seed and data order):",
        "",
        *markdown_table(["seed", "m chosen", "guard error at m", "fine-tuned backprop",
                         "fine-tuned adjoint", "backprop − adjoint (points)"], rows),
        "",
    ]
    tol = f"{v['tolerance'] * 100:.0f} point"
    if v["agrees"] is None:
        return lines + [f"Verdict on \"adjoint within {tol} of backprop\": not measured (no "
                        "seed found an m within the tolerance)."]
    gap = f"{100 * v['gap_mean']:+.1f} ± {100 * v['gap_std']:.1f} points"
    failed = (f"; {v['failed']} of {v['seeds']} seeds found no m within the tolerance"
              if v["failed"] else "")
    return lines + [
        f"Verdict on \"adjoint within {tol} of backprop\" (Sander et al., Table 2) with "
        f"`--refine auto`: mean gap over {v['seeds'] - v['failed']} seeds {gap} (within "
        f"{tol} at {v['within']} of them{failed}) — "
        + ("**agrees**." if v["agrees"] else "**disagrees**.")]
