"""The Euler and Heun adjoints' gradient error against the number of steps N, in float64,
float32 and under ``mixed_bfloat16``, on one stage whose weights are smooth in depth (h = 1/N,
the regime where the errors fall like 1/N and 1/N², Sander et al. 2022).

    python -m benchmarks.adjoint_precision          # docs/adjoint_precision.md + .json + .png

Per (integrator, N, precision): the guard's error (``kode.check_gradients``: relative error of
the adjoint's parameter gradients against backprop's of the same model, weights and batch).
Beside it, bfloat16's own gradient error: backprop under ``mixed_bfloat16`` against float32
backprop, same weights. An adjoint computed in bfloat16 cannot be closer to its float32
counterpart than that, so where the float32 curve falls below it, the bfloat16 curve flattens.

Target (the bfloat16 curve follows float32's): 0.5 ≤ error(bfloat16) / error(float32) ≤ 2 at
every N ≤ 64, decided twice: at every N, and at the N where the float32 error is above twice
bfloat16's own gradient error (what a bfloat16 adjoint can resolve).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks import record as run_record

PAGE = "adjoint_precision.md"
INTEGRATORS = ("euler", "heun")
NS = (4, 8, 16, 32, 64)
PRECISIONS = ("float64", "float32", "mixed_bfloat16")
WIDTH, BATCH, CLASSES = 8, 64, 3
FACTOR = 2.0  # the bfloat16 curve within this factor of the float32 one
ORDERS = {"euler": 1, "heun": 2}


def _backprop_gradients(model, x, y) -> list:
    import keras
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    return [tf.cast(g, tf.float64) for g in tape.gradient(loss, model.trainable_variables)]


def _relative(got: list, want: list) -> float:
    """‖got − want‖ / ‖want‖ over all tensors."""
    num = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
              for a, b in zip(got, want, strict=True))
    return math.sqrt(num / sum(float(np.sum(np.asarray(b) ** 2)) for b in want))


def measure(integrator: str, n: int, seed: int = 0) -> dict:
    """The adjoint's error per precision and bfloat16's own gradient error at N = ``n``."""
    from kode.testing.models import smooth_dense_classifier
    from kode.tools.guard import check_gradients

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, WIDTH)).astype("float32")
    y = np.arange(BATCH) % CLASSES
    # Heun's step n evaluates f_n and f_{n+1}: N + 1 functions for N steps.
    functions = n if integrator == "euler" else n + 1
    models = {p: smooth_dense_classifier(functions, integrator, p, WIDTH, seed, CLASSES)
              for p in PRECISIONS}
    row = {"integrator": integrator, "n": n}
    for precision, model in models.items():
        inputs = x.astype("float64") if precision == "float64" else x
        row[precision] = check_gradients(model, inputs, y).max_error
    row["bfloat16_floor"] = _relative(_backprop_gradients(models["mixed_bfloat16"], x, y),
                                      _backprop_gradients(models["float32"], x, y))
    return row


def order(rows: list[dict], precision: str) -> float:
    """Least-squares slope of log(error) against log(N): −1 for Euler, −2 for Heun."""
    ns = [r["n"] for r in rows]
    return float(np.polyfit(np.log(ns), np.log([r[precision] for r in rows]), 1)[0])


def resolvable(row: dict) -> bool:
    """Whether the float32 error is above twice bfloat16's own gradient error."""
    return row["float32"] > FACTOR * row["bfloat16_floor"]


def _within(rows: list[dict]) -> tuple[str, float, float]:
    ratios = [r["mixed_bfloat16"] / r["float32"] for r in rows]
    if not ratios:
        return "not measured", float("nan"), float("nan")
    ok = all(1 / FACTOR <= q <= FACTOR for q in ratios)
    return ("met" if ok else "missed"), min(ratios), max(ratios)


def claims(rows: list[dict]) -> list[dict]:
    """Per integrator: the bfloat16/float32 error ratio at every N and at the resolvable N
    (value = the ratio farthest from 1; low/high = its range), and the float32 order."""
    page = run_record.page_of(PAGE)
    out = []
    target = f"within [{1 / FACTOR:g}, {FACTOR:g}]"
    for integrator in INTEGRATORS:
        mine = [r for r in rows if r["integrator"] == integrator]
        if not mine:
            continue
        name = integrator.capitalize()
        top = max(r["n"] for r in mine)
        for suffix, subset, words in (
                ("all-n", mine, f"every N ≤ {top}"),
                ("resolvable-n", [r for r in mine if resolvable(r)],
                 "the N where the float32 error exceeds 2× bfloat16's own gradient error")):
            verdict, low, high = _within(subset)
            worst = max((low, high), key=lambda q: abs(math.log(q))) if subset else None
            out.append(run_record.claim(
                f"adjoint-precision.{integrator}.{suffix}",
                f"{name} adjoint, smooth stage: gradient error under mixed_bfloat16 / float32, "
                f"at {words} ({', '.join(str(r['n']) for r in subset) or 'none'})",
                worst, low=None if not subset else low, high=None if not subset else high,
                unit="×", target=target, verdict=verdict, page=page))
        out.append(run_record.claim(
            f"adjoint-precision.{integrator}.float32-order",
            f"{name} adjoint, smooth stage: slope of log gradient error against log N, float32",
            order(mine, "float32"), unit="slope", target=f"≈ −{ORDERS[integrator]}",
            page=page))
    return out


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(INTEGRATORS), figsize=(10, 4), sharey=True)
    for ax, integrator in zip(np.atleast_1d(axes), INTEGRATORS, strict=True):
        mine = [r for r in rows if r["integrator"] == integrator]
        ns = [r["n"] for r in mine]
        for precision, style in zip(PRECISIONS, ("o-", "s-", "^-"), strict=True):
            ax.loglog(ns, [r[precision] for r in mine], style, label=f"adjoint, {precision}")
        ax.loglog(ns, [r["bfloat16_floor"] for r in mine], "k--",
                  label="bfloat16 backprop vs float32 backprop")
        ax.set_title(f"{integrator.capitalize()} (smooth weights, h = 1/N)")
        ax.set_xlabel("steps N")
        ax.grid(True, which="both", alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("relative gradient error vs backprop")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    from kode.io import atomic_open

    with atomic_open(str(path), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def page(record: run_record.RunRecord, rows: list[dict], image: str) -> list[str]:
    lines = ["# Adjoint gradient error in float64, float32 and mixed_bfloat16", "",
             *run_record.page_header(record), "",
             "One `IntegratorStage` of N residual functions f_n(x) = tanh(x W(t_n) + b(t_n)) "
             "whose weights vary smoothly with t_n = n/(N − 1) (W(t) = A + sin(3t) B + cos(2t) "
             f"C), h = 1/N, width {WIDTH}, a softmax head over {CLASSES} classes, a batch of "
             f"{BATCH} standard-normal inputs; the same weights in every precision "
             "(`kode.testing.models.smooth_dense_classifier`). Error = the guard's "
             "(`kode.check_gradients`): ‖g_adjoint − g_backprop‖ / ‖g_backprop‖ over the "
             "stage's parameters, each precision against its own backprop. *bfloat16 floor* = "
             "backprop under mixed_bfloat16 against float32 backprop: how far bfloat16 residual "
             "functions move the gradient by themselves.", "",
             "| integrator | N | float64 | float32 | mixed_bfloat16 | bfloat16 floor | "
             "bfloat16 / float32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['integrator']} | {r['n']} | {r['float64']:.2e} | "
                     f"{r['float32']:.2e} | {r['mixed_bfloat16']:.2e} | "
                     f"{r['bfloat16_floor']:.2e} | {r['mixed_bfloat16'] / r['float32']:.2f} |")
    lines += ["", f"![adjoint error by precision]({image})", "", "## Targets", ""]
    for c in claims(rows):
        low = "" if c["low"] is None else f" (range {c['low']:.3g} to {c['high']:.3g})"
        value = "—" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(f"- {c['claim']}: {value}{low}; target {c['target']}: **{c['verdict']}**")
    lines += ["", "Where the float32 error falls below bfloat16's own gradient error, an adjoint "
              "computed with bfloat16 residual functions cannot follow it: its error there is "
              "that of bfloat16 itself, which backprop under mixed_bfloat16 has too."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=list(NS))
    parser.add_argument("--out", default="docs", help="directory for the page, .json, .png")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    record = run_record.start_record(
        "python -m benchmarks.adjoint_precision" + ("" if not given else " "
                                                    + shlex.join(given)), args.allow_load)
    rows = []
    for integrator in INTEGRATORS:
        for n in args.ns:
            rows.append(measure(integrator, n))
            r = rows[-1]
            print(f"{integrator} N={n}: " + ", ".join(
                f"{k} {r[k]:.2e}" for k in (*PRECISIONS, "bfloat16_floor")), flush=True)
    run_record.finish_record(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = plot(rows, out / "adjoint_precision.png")
    run_record.write_page(out / PAGE, page(record, rows, image.name))
    run_record.write_record(out / PAGE, record, rows, claims(rows))
    print(f"wrote {out / PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
