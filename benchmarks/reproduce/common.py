"""What every experiment of ``kode reproduce`` shares: its run context, figures, tables."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Context:
    """How an experiment is run: ``quick`` (the < 10 min sweep) or full, with which seeds.

    ``command`` is the command line that made the run; ``save_figure`` stamps it and the
    seeds on every figure, so a PNG found alone still says how to regenerate it.
    """

    name: str
    quick: bool
    seeds: list[int]
    out: Path
    command: str
    started: float = field(default_factory=time.monotonic)

    def progress(self, message: str) -> None:
        """One progress line on stdout (the runner relays it)."""
        elapsed = time.monotonic() - self.started
        print(f"  [{self.name} {elapsed:5.0f}s] {message}", flush=True)

    def figure_name(self, tag: str) -> str:
        return f"results_{self.name}_{tag}.png"

    def save_figure(self, fig, tag: str) -> str:
        """Save ``fig`` as ``docs/results_<experiment>_<tag>.png``; return that file name."""
        seeds = ", ".join(str(s) for s in self.seeds)
        # Below the axes: bbox "tight" grows the canvas to include it.
        fig.text(0.005, -0.01, f"{self.command} · seeds {seeds}", fontsize=7, color="0.4",
                 ha="left", va="top")
        name = self.figure_name(tag)
        self.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return name


def pyplot():
    """matplotlib's pyplot on the non-interactive backend (figures are only saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (the empirical order of a power law)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    keep = (xs > 0) & (ys > 0) & np.isfinite(ys)
    if keep.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log(xs[keep]), np.log(ys[keep]), 1)[0])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence], align: str = "") -> list[str]:
    """A Markdown table; ``align`` has one of 'l'/'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def fmt(x: float, digits: int = 2) -> str:
    """Scientific for small/large magnitudes, fixed otherwise; '—' for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def warn(message: str) -> None:
    print(f"  warning: {message}", file=sys.stderr, flush=True)
