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

Second part, the exact reversals at full size: the zoo's reversible-Heun, momentum and RevNet
ResNets (56/38 and 110 layers, 32×32×3, batch 8, same seed in both precisions), the guard's
error in float32 and under mixed_bfloat16 (whose residual stream stays float32); target under
mixed_bfloat16: ≤ 1e-3.
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
#: (zoo name, step size): the builders' default (h = 1 per step, as a classic ResNet) at two
#: depths, and h = T/N (``step_size="ode"``) at the first.
EXACT_MODELS = tuple((m, None) for m in (
    "revheun_resnet56", "momentum_resnet56", "revnet38",
    "revheun_resnet110", "momentum_resnet110", "revnet110")) + tuple(
    (m, "ode") for m in ("revheun_resnet56", "momentum_resnet56", "revnet38"))
EXACT_PRECISIONS = ("float32", "mixed_bfloat16")
EXACT_TARGET = 1e-3
EXACT_BATCH, EXACT_SIZE = 8, 32


def measure(integrator: str, n: int, seed: int = 0) -> dict:
    """The adjoint's error per precision and bfloat16's own gradient error at N = ``n``."""
    import keras

    from kode.testing.models import smooth_dense_classifier
    from kode.tools.guard import check_gradients, model_gradients, relative_error

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
    loss = keras.losses.SparseCategoricalCrossentropy()
    row["bfloat16_floor"] = relative_error(model_gradients(models["mixed_bfloat16"], loss, x, y),
                                           model_gradients(models["float32"], loss, x, y))
    return row


def measure_exact(name: str, step_size: str | None = None, seed: int = 1) -> dict:
    """The guard's report on zoo model ``name`` (full depth, 32×32×3, 10 classes; the
    builder's ``step_size`` unless given) in float32 and under mixed_bfloat16: the same seed,
    hence the same weights, and the same batch."""
    import keras

    import zoo
    from kode.layers.stage import integrator_stages
    from kode.scopes import precision_scope
    from kode.tools.guard import check_gradients

    rng = np.random.default_rng(0)
    x = rng.standard_normal((EXACT_BATCH, EXACT_SIZE, EXACT_SIZE, 3)).astype("float32")
    y = np.arange(EXACT_BATCH) % 10
    row = {"model": name, "step_size": step_size}
    options = {} if step_size is None else {"step_size": step_size}
    for precision in EXACT_PRECISIONS:
        with precision_scope(precision):
            keras.utils.set_random_seed(seed)
            model = zoo.create_model(name, input_shape=x.shape[1:], classes=10, **options)
            report = check_gradients(model, x, y)
        streams = sorted({s.stream_dtype for s in integrator_stages(model)})
        row[precision] = {
            "stream": ", ".join(streams),
            "max_error": report.max_error, "model_error": report.model_error,
            "h": [s.step_size for s in report.stages],
            "reconstruction": max(s.reconstruction_error for s in report.stages),
            "stages": len(report.stages)}
    return row


def exact_claims(rows: list[dict]) -> list[dict]:
    """Per model: the largest stage error under mixed_bfloat16 against :data:`EXACT_TARGET`."""
    page = run_record.page_of(PAGE)
    out = []
    for r in rows:
        value = r["mixed_bfloat16"]["max_error"]
        ode = r.get("step_size") == "ode"
        out.append(run_record.claim(
            f"adjoint-precision.{r['model']}{'-ode' if ode else ''}.mixed-bfloat16",
            f"{r['model']}{' (step_size=ode)' if ode else ''} (32×32×3, batch {EXACT_BATCH}) "
            "under mixed_bfloat16: adjoint vs backprop relative gradient error, largest over "
            "its stages",
            value, unit="", target=f"≤ {EXACT_TARGET:g}", page=page,
            verdict="met" if value <= EXACT_TARGET else "missed"))
    return out


def exact_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["## Exact reversals at full size", "",
             f"`zoo.create_model(name)` at 32×32×3 and 10 classes, batch {EXACT_BATCH} of "
             "standard-normal images, the same seed (so the same weights) in both precisions; "
             "the guard's error (largest over the stages, and of the whole model's gradient) "
             "and the reconstruction error max |x_0 − x̂_0| / max |x_0| after N steps forward "
             "and N reverse steps.", "",
             "| model | h per step | float32 error | float32 reconstruction | "
             "mixed_bfloat16 stream | mixed_bfloat16 error | mixed_bfloat16 whole-model error "
             "| mixed_bfloat16 reconstruction |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        f32, bf16 = r["float32"], r["mixed_bfloat16"]
        h = ", ".join(f"{v:.3g}" for v in bf16.get("h", [])) or "—"
        lines.append(f"| `{r['model']}` | {h} | {f32['max_error']:.1e} | "
                     f"{f32['reconstruction']:.1e} | {bf16.get('stream', '—')} | "
                     f"{bf16['max_error']:.1e} | "
                     f"{bf16['model_error']:.1e} | {bf16['reconstruction']:.1e} |")
    lines += [""] + [f"- {c['claim']}: {c['value']:.2g}; target {c['target']}: "
                     f"**{c['verdict']}**" for c in exact_claims(rows)] + [""]
    return lines


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
        return "not decided", float("nan"), float("nan")
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


def page(record: run_record.RunRecord, rows: list[dict], image: str,
         exact: list[dict] = ()) -> list[str]:
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
              "that of bfloat16 itself, which backprop under mixed_bfloat16 has too.", "",
              *exact_section(list(exact))]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=list(NS))
    parser.add_argument("--exact-models", nargs="*",
                        default=[m if h is None else f"{m}:{h}" for m, h in EXACT_MODELS],
                        help="zoo models of the full-size part, NAME or NAME:ode (none: "
                        "skip it)")
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
    exact = []
    for spec in args.exact_models:
        name, _, step_size = spec.partition(":")
        exact.append(measure_exact(name, step_size or None))
        print(f"{spec}: " + ", ".join(f"{p} {exact[-1][p]['max_error']:.2e}"
                                      for p in EXACT_PRECISIONS), flush=True)
    run_record.finish_record(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = plot(rows, out / "adjoint_precision.png")
    run_record.write_page(out / PAGE, page(record, rows, image.name, exact))
    run_record.write_record(out / PAGE, record, {"curves": rows, "exact": exact},
                            claims(rows) + exact_claims(exact))
    print(f"wrote {out / PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
