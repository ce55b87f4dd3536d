"""Paired timing: several computations in one process, their steps alternated in a random
order each round, compared by the median of per-round ratios with a bootstrap interval.

Process-to-process spread on a shared machine (±10–15 %, more under load) exceeds the gaps
the speed targets are about; within one process and one round the computations see the same
machine state, so the per-round ratio cancels most of it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence


def alternate(steps: dict[str, Callable[[], object]], rounds: int, seed: int = 0
              ) -> dict[str, list[float]]:
    """Wall time of each ``steps[name]()`` per round; every round runs all of them once, in
    a random order (seeded), so none is systematically first or last."""
    order = random.Random(seed)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    return times


def median_interval(values: Sequence[float], confidence: float = 0.95,
                    resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and a percentile-bootstrap interval
    of the median (``resamples`` resamples with replacement)."""
    values = list(values)
    if not values:
        raise ValueError("no values")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values)))
                     for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    low = medians[int(tail * (resamples - 1))]
    high = medians[int(round((1.0 - tail) * (resamples - 1)))]
    return statistics.median(values), low, high


def ratios(numerators: Sequence[float], denominators: Sequence[float], scale: float = 1.0
           ) -> list[float]:
    """Per-round ratios scale · a_i / b_i."""
    return [scale * a / b for a, b in zip(numerators, denominators, strict=True)]


def verdict(low: float, high: float, target: float, at_least: bool = True) -> str:
    """"met" when the whole interval is on the target's side, "missed by X–Y%" (the interval's
    distances to the target) when it is wholly on the other side, else "not decided"."""
    if not at_least:  # a ceiling: mirror it into a floor
        low, high, target = -high, -low, -target
    if low >= target:
        return "met"
    if high < target:
        near, far = abs((target - high) / target), abs((target - low) / target)
        return f"missed by {100 * near:.0f}–{100 * far:.0f}%"
    return "not decided"


def fmt_interval(median: float, low: float, high: float, digits: int = 3) -> str:
    return f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
