"""The claims of ``docs/performance.md`` (:mod:`benchmarks.throughput`) for its JSON: the
comparisons of its Targets table, with the values and verdicts the page states."""

from __future__ import annotations

from benchmarks.record import claim

PAGE = "docs/performance.md"


def _id(c: dict) -> str:
    return f"throughput.{c['model']}-vs-{c['base']}"


def paired_claims(summary: dict, page: str = PAGE) -> list[dict]:
    """Every paired comparison: median of per-round ratios, bootstrap 95% interval, verdict."""
    return [claim(_id(c), f"{c['model']} / {c['base']}: {c['what']} (paired)", c["ratio"],
                  low=c["low"], high=c["high"], unit="×", target=f"≥ {c['target']}×",
                  verdict=c["verdict"], page=page)
            for c in summary["comparisons"]]


def per_process_claims(summary: dict, page: str = PAGE) -> list[dict]:
    """The measured comparisons of a per-process run (median of per-repetition ratios; no
    interval) and ResNet-56's training FLOP/s over the matmul's."""
    out = []
    for c in summary["comparisons"]:
        if c["ratio"] is None:
            continue
        target = c["target"]
        out.append(claim(
            _id(c), f"{c['model']} / {c['base']}: {c['what']} (one process each, median of "
            f"{len(c['per_rep'])} repetitions)", c["ratio"], unit="×",
            target=None if target is None else f"≥ {target}×",
            verdict="measured" if target is None else
            "met" if c["ratio"] >= target else "missed", page=page))
    frac = summary.get("fractions", {}).get("resnet56")
    if frac:
        out.append(claim("throughput.resnet56-flops-vs-matmul", "resnet56 training FLOP/s / "
                         "float32 matmul FLOP/s (one process each)", frac["median"], unit="×",
                         page=page))
    return out
