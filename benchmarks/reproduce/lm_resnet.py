"""LM-ResNet (Lu et al. 2018): the modified equation, the stability interval, and training.

The LM step u_{n+1} = (1−k) u_n + k u_{n−1} + h f(u_n) (first step Euler, docs/reference.md §2)
is checked in three parts:

(a) Modified equation, on u' = λu. Taylor expansion of the step gives
    (1+k) u' + (1−k)(h/2) u'' ≈ f(u): at first order the scheme solves the leading-order
    equation (1+k) u' = λu, u(T) = e^{λT/(1+k)}; at second order it follows the slow
    ("physical") solution e^{μT} of the modified equation, μ the root of
    (1−k)(h/2) μ² + (1+k) μ = λ that tends to λ/(1+k). The scheme's other characteristic
    root, ≈ −k, is a parasitic mode that decays like |k|^n and that the continuous equation
    does not describe.
(b) Stability: the characteristic polynomial ζ² − (1−k+hλ) ζ − k has, as hλ → 0, the roots
    1 and −k; the root condition (roots in the closed unit disc, those on the circle simple)
    holds exactly for −1 < k ≤ 1. Checked by the growth of a perturbation of the starting
    values over many steps.
(c) LM-ResNet vs ResNet at equal depth on the embedded ``digits`` data, and the learned k_n.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from benchmarks.reproduce.common import (
    Context,
    fmt,
    loglog_slope,
    markdown_table,
    mean_std,
    pyplot,
)

TITLE = "LM-ResNet (Lu et al.): modified equation, stability, accuracy, learned k_n"

# (a) u' = λu on [0, T]; λ > 0 keeps the modified equation's roots real for every h used.
LAMBDA, HORIZON = 1.0, 1.0
MODIFIED_KS = (-0.5, 0.25, 0.75)
MODIFIED_NS = tuple(8 * 2**i for i in range(8))  # 8 … 1024
FIT_FROM = 64  # slopes over N ≥ 64: parasitic mode (|k|^N) gone, O(h) terms small
ERRORS = {
    "lead_euler": "u_N vs leading order exp(λT/(1+k)) (Euler start)",
    "mod_euler": "u_N vs modified eq. exp(μT) (Euler start)",
    "mod_physical": "u_N vs modified eq. exp(μT) (start on the slow mode)",
    "rate_euler": "growth rate vs μ (Euler start)",
}
SHORT = {"lead_euler": "leading, Euler start", "mod_euler": "modified, Euler start",
         "mod_physical": "modified, slow-mode start", "rate_euler": "rate, Euler start"}
EXPECTED_ORDER = {"lead_euler": 1, "mod_euler": 1, "mod_physical": 2, "rate_euler": 2}

# (b) k grid (step 0.01, contains ±1 exactly) and the step counts compared.
STABILITY_KS = tuple(round(-1.5 + 0.01 * i, 10) for i in range(301))
STABILITY_STEPS = (1000, 10000)
STABILITY_TABLE_KS = (-1.5, -1.2, -1.01, -1.0, -0.99, -0.9, 0.0, 0.9, 0.99, 1.0, 1.01, 1.1, 1.5)
BOUNDED_RATIO = 2.0  # 10× more steps, growth up by less than this: judged bounded

# (c) training: digits recipe (30 epochs in the full run).
QUICK_TRAINING = {"depths": [20], "epochs": 10}
FULL_TRAINING = {"depths": [20, 32], "epochs": 30}
K_INIT_RANGE = (-0.1, 0.0)
PUBLISHED_K_RANGE = (-2.5, 1.0)  # docs/reference.md §2: learned k_n in replications
PUBLISHED_LM_ERROR = {20: 8.33, 32: 7.18, 44: 6.66, 56: 6.31, 110: 6.16}  # Lu et al., CIFAR-10 %


# ---------------------------------------------------------------- (a) modified equation


def lm_solve(k: float, h_lambda: float, num_steps: int, u1: float | None = None) -> np.ndarray:
    """u_0 … u_N of the LM scheme on u' = λu, u_0 = 1, u_1 = (1 + hλ) (Euler) unless given:
    u_{n+1} = (1−k) u_n + k u_{n−1} + hλ u_n."""
    u = np.empty(num_steps + 1)
    u[0] = 1.0
    u[1] = 1.0 + h_lambda if u1 is None else u1
    for n in range(1, num_steps):
        u[n + 1] = (1.0 - k + h_lambda) * u[n] + k * u[n - 1]
    return u


def modified_rate(k: float, lam: float, h: float) -> float:
    """The slow root μ of (1−k)(h/2) μ² + (1+k) μ = λ (→ λ/(1+k) as h → 0).

    Written as 2λ / ((1+k) + √((1+k)² + 2(1−k)hλ)): no cancellation, valid at k = 1.
    """
    disc = (1.0 + k) ** 2 + 2.0 * (1.0 - k) * h * lam
    if disc < 0:
        raise ValueError(f"modified equation has complex roots for k={k}, hλ={h * lam}")
    return 2.0 * lam / ((1.0 + k) + math.sqrt(disc))


def modified_equation_errors(k: float, ns: Sequence[int] = MODIFIED_NS, lam: float = LAMBDA,
                             horizon: float = HORIZON) -> dict[str, list[float]]:
    """Relative errors at t = T for each N (h = T/N), the four kinds of :data:`ERRORS`.

    The growth rate log(u_N / u_{N/2}) / (T/2) does not depend on the amplitude of the slow
    mode, which the Euler first step sets off by O(h) (it solves u' = f, not (1+k) u' = f).
    """
    out: dict[str, list[float]] = {key: [] for key in ERRORS}
    lead = math.exp(lam * horizon / (1.0 + k))
    for n in ns:
        h = horizon / n
        mu = modified_rate(k, lam, h)
        mod = math.exp(mu * horizon)
        euler = lm_solve(k, h * lam, n)
        physical = lm_solve(k, h * lam, n, u1=math.exp(mu * h))
        rate = math.log(euler[n] / euler[n // 2]) / (horizon / 2)
        out["lead_euler"].append(abs(euler[n] - lead) / lead)
        out["mod_euler"].append(abs(euler[n] - mod) / mod)
        out["mod_physical"].append(abs(physical[n] - mod) / mod)
        out["rate_euler"].append(abs(rate - mu) / abs(mu))
    return out


def fitted_orders(ns: Sequence[int], errors: dict[str, list[float]],
                  fit_from: int = FIT_FROM) -> dict[str, float]:
    """−(log–log slope) of each error against N over N ≥ ``fit_from``: the observed order."""
    keep = [i for i, n in enumerate(ns) if n >= fit_from]
    return {key: -loglog_slope([ns[i] for i in keep], [errs[i] for i in keep])
            for key, errs in errors.items()}


def amplitude_offset(k: float, h_lambda: float) -> float:
    """Leading term of the slow mode's amplitude error after an Euler first step:
    c_1 − 1 ≈ hλ k / (1+k)² (zero for k = 0, where LM is Euler)."""
    return h_lambda * k / (1.0 + k) ** 2


# ---------------------------------------------------------------- (b) stability


def perturbation_log_growth(ks: Sequence[float], num_steps: int,
                            h_lambda: float = 0.0) -> np.ndarray:
    """log10 max_{n ≤ N} |e_n| for e_{n+1} = (1−k+hλ) e_n + k e_{n−1}, e_0 = 0, e_1 = 1.

    e_n is the difference of two LM runs whose starting values differ by 1 (the scheme is
    linear), so bounded growth as N → ∞ is zero-stability. Rescaled as it goes, so the
    exponential growth of unstable k never overflows.
    """
    k = np.asarray(ks, float)
    prev, cur = np.zeros_like(k), np.ones_like(k)
    scale = np.zeros_like(k)  # log10 of the factor divided out so far
    best = np.zeros_like(k)  # log10 max |e_n| so far (e_1 = 1)
    for _ in range(num_steps - 1):
        prev, cur = cur, (1.0 - k + h_lambda) * cur + k * prev
        with np.errstate(divide="ignore"):
            best = np.maximum(best, np.log10(np.abs(cur)) + scale)
        big = np.abs(cur) > 1e100
        prev[big] /= 1e100
        cur[big] /= 1e100
        scale[big] += 100.0
    return best


def root_condition(k: float) -> bool:
    """Dahlquist's root condition for ζ² − (1−k) ζ − k = (ζ − 1)(ζ + k): −1 < k ≤ 1."""
    return -1.0 < k <= 1.0


def stability_sweep(ks: Sequence[float] = STABILITY_KS,
                    steps: Sequence[int] = STABILITY_STEPS) -> dict:
    """Growth for f ≡ 0 and for f(u) = −u on [0, 1] (hλ = −1/N), at each step count."""
    growth = {
        "f0": {str(n): perturbation_log_growth(ks, n).tolist() for n in steps},
        "decay": {str(n): perturbation_log_growth(ks, n, -1.0 / n).tolist() for n in steps},
    }
    lo, hi = str(steps[0]), str(steps[-1])

    def bounded(case: str) -> list[bool]:
        return [growth[case][hi][i] - growth[case][lo][i] < math.log10(BOUNDED_RATIO)
                for i in range(len(ks))]

    # The verdict is zero-stability (f ≡ 0, the h → 0 limit). With hλ = −1/N the h → 0 limit
    # is reached only once h|λ| ≪ (1+k)²: just inside k = −1 that needs far more steps.
    verdict, decay = bounded("f0"), bounded("decay")
    inside = [k for k, b in zip(ks, verdict, strict=True) if b]
    return {"ks": list(ks), "steps": list(steps), "log10_growth": growth, "bounded": verdict,
            "bounded_range": [min(inside), max(inside)] if inside else None,
            "mismatches": [k for k, b in zip(ks, verdict, strict=True) if b != root_condition(k)],
            "decay_disagrees": [k for k, b in zip(ks, decay, strict=True)
                                if b != root_condition(k)]}


# ---------------------------------------------------------------- (c) training


def lm_k_values(model) -> tuple[list[str], list[float]]:
    """Labels ("stage2/lm_k_0": step 0 of stage2) and values of every LM k_n of a model, in
    network order (:func:`kode.tools.diagnostics.lm_k_values`)."""
    from kode.tools.diagnostics import lm_k_values as labelled

    pairs = labelled(model)
    return [label for label, _ in pairs], [value for _, value in pairs]


DECAY_LM_K = False  # kode's default: weight decay pulls k towards 0, i.e. towards a ResNet


def train_one(family: str, depth: int, seed: int, epochs: int) -> dict:
    """Train ``{family}{depth}`` on digits with the recipe; test accuracy and the k_n."""
    import keras

    import kode
    import zoo
    from kode.data.datasets import dataset_info

    name = f"{family}{depth}"
    # train() seeds Keras with ``seed`` before building, so this rebuild draws the same k_n
    # initial values as the trained model had (checked: identical).
    keras.utils.set_random_seed(seed)
    info = dataset_info("digits")
    _, k_init = lm_k_values(zoo.create_model(name, input_shape=info.input_shape,
                                             classes=info.num_classes))
    start = time.process_time()
    with tempfile.TemporaryDirectory() as logdir:
        result = kode.train(name, dataset="digits", epochs=epochs, seed=seed, verbose=0,
                            diagnostics=False, resume=False, logdir=logdir,
                            decay_lm_k=DECAY_LM_K)
    labels, k_final = lm_k_values(result.model)
    return {"model": family, "depth": depth, "seed": seed,
            "test_accuracy": float(result.test_metrics["accuracy"]),
            "params": int(result.model.count_params()), "cpu_s": time.process_time() - start,
            "k_labels": labels, "k_init": k_init, "k_final": k_final}


def training_runs(ctx: Context) -> dict:
    from kode.data.datasets import dataset_info
    from kode.training.settings import RECIPES

    plan = QUICK_TRAINING if ctx.quick else FULL_TRAINING
    recipe, info = RECIPES["digits"], dataset_info("digits")
    runs = []
    total = len(plan["depths"]) * len(ctx.seeds) * 2
    for depth in plan["depths"]:
        for seed in ctx.seeds:
            for family in ("resnet", "lm_resnet"):
                run = train_one(family, depth, seed, plan["epochs"])
                runs.append(run)
                ctx.progress(f"(c) {len(runs)}/{total} {family}{depth} seed {seed}: test "
                             f"accuracy {run['test_accuracy']:.4f} ({run['cpu_s']:.0f} s CPU)")
    return {"depths": plan["depths"], "epochs": plan["epochs"],
            "batch_size": recipe.batch_size, "lr": recipe.lr, "schedule": recipe.schedule,
            "momentum": recipe.momentum, "weight_decay": recipe.weight_decay,
            "decay_lm_k": DECAY_LM_K, "train_size": info.train_size,
            "test_size": info.test_size, "runs": runs}


def accuracy_summary(training: dict) -> list[dict]:
    """Per depth: mean ± std test accuracy of both models and of the paired difference."""
    rows = []
    for depth in training["depths"]:
        acc = {fam: {r["seed"]: r["test_accuracy"] for r in training["runs"]
                     if r["depth"] == depth and r["model"] == fam}
               for fam in ("resnet", "lm_resnet")}
        seeds = sorted(set(acc["resnet"]) & set(acc["lm_resnet"]))
        diff = [acc["lm_resnet"][s] - acc["resnet"][s] for s in seeds]
        rows.append({"depth": depth, "seeds": seeds,
                     "resnet": mean_std(list(acc["resnet"].values())),
                     "lm_resnet": mean_std(list(acc["lm_resnet"].values())),
                     "difference": mean_std(diff)})
    return rows


def paired_difference_significant(mean: float, std: float, n: int,
                                  level: float = 0.95) -> bool:
    """Two-sided paired t-test of mean ≠ 0: |mean| / (std/√n) > t_{(1+level)/2, n−1}."""
    if n < 2:
        return False
    if std == 0:
        return mean != 0
    from scipy.stats import t as student_t

    return abs(mean) / (std / math.sqrt(n)) > float(student_t.ppf((1 + level) / 2, n - 1))


def k_summary(training: dict) -> dict:
    """Range of the learned k_n, how far they moved from init, and where they sit."""
    final = [k for r in training["runs"] if r["model"] == "lm_resnet" for k in r["k_final"]]
    init = [k for r in training["runs"] if r["model"] == "lm_resnet" for k in r["k_init"]]
    moved = [abs(a - b) for a, b in zip(final, init, strict=True)]
    low, high = K_INIT_RANGE
    return {
        "count": len(final), "min": min(final), "max": max(final),
        "mean_abs_change": float(np.mean(moved)), "max_abs_change": max(moved),
        "in_init_range": sum(low <= k <= high for k in final),
        "in_stability": sum(root_condition(k) for k in final),
        "in_published": sum(PUBLISHED_K_RANGE[0] <= k <= PUBLISHED_K_RANGE[1] for k in final),
    }


# ---------------------------------------------------------------- figures


def plot_modified(ctx: Context, modified: dict) -> str:
    plt = pyplot()
    ks = modified["ks"]
    fig, axes = plt.subplots(1, len(ks), figsize=(4.3 * len(ks), 4.0), sharey=True,
                             squeeze=False)
    ns = np.asarray(modified["ns"], float)
    styles = {"lead_euler": ("C0", "o-"), "mod_euler": ("C1", "s-"),
              "mod_physical": ("C2", "^-"), "rate_euler": ("C3", "d--")}
    for ax, k in zip(axes[0], ks, strict=True):
        errs, orders = modified["errors"][str(k)], modified["orders"][str(k)]
        for key, (color, style) in styles.items():
            ax.loglog(ns, errs[key], style, color=color, ms=4, label=ERRORS[key])
        anchor = errs["mod_physical"][0]
        for factor, power in ((3.0, 1), (0.3, 2)):
            ref = anchor * factor * (ns / ns[0]) ** -power
            ax.loglog(ns, ref, ":", color="0.4", lw=1)
            ax.text(ns[-1], ref[-1], " N⁻¹" if power == 1 else " N⁻²", va="center",
                    fontsize=8, color="0.3")
        ax.text(0.03, 0.03, "fitted orders:\n" + "\n".join(
            f"{SHORT[key]}: {orders[key]:.2f}" for key in ERRORS),
            transform=ax.transAxes, fontsize=7, va="bottom",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
        ax.set_title(f"k = {k}")
        ax.set_xlabel(f"N (h = T/N, T = {modified['horizon']:g})")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("relative error at t = T")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8,
               bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"LM scheme on u' = λu (λ = {modified['lambda']:g}) vs the leading-order "
                 "equation (1+k)u' = λu and the modified equation (1+k)u' + (1−k)(h/2)u'' = λu"
                 f"; orders fitted on N ≥ {modified['fit_from']}", fontsize=9.5)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return ctx.save_figure(fig, "modified_equation")


def plot_stability(ctx: Context, stability: dict) -> str:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.3))
    ks = np.asarray(stability["ks"])
    lo, hi = (str(n) for n in (stability["steps"][0], stability["steps"][-1]))
    top, top_ratio = 6.0, 2.5
    cases = (("f0", "-", "f ≡ 0"), ("decay", "--", "f(u) = −u on [0, 1]"))
    cases_names = [(c, what) for c, _, what in cases]
    for ax in (left, right):
        ax.axvspan(-1.0, 1.0, color="C2", alpha=0.12, label="root condition: −1 < k ≤ 1")
        ax.axvline(-1.0, color="C2", ls=":", lw=1)
        ax.axvline(1.0, color="C2", lw=1)
        ax.set_xlim(ks[0], ks[-1])
        ax.set_xlabel("k")
        ax.grid(True, alpha=0.3)
    for case, style, what in cases:
        growth = stability["log10_growth"][case]
        for color, n in zip(("C0", "C3"), (lo, hi), strict=True):
            left.plot(ks, np.minimum(growth[n], top + 1), style, color=color, lw=1.3,
                      label=f"{what}, {n} steps")
        increase = np.asarray(growth[hi]) - np.asarray(growth[lo])
        right.plot(ks, np.minimum(increase, top_ratio + 1), style, marker=".", ms=3,
                   color="C0" if case == "f0" else "C1", lw=1, label=what)
    right.axhline(math.log10(BOUNDED_RATIO), color="0.3", lw=0.8, ls="-.",
                  label=f"threshold ×{BOUNDED_RATIO:g}: bounded below it")
    if -1.0 in stability["ks"]:
        i = stability["ks"].index(-1.0)
        for case, dy in (("f0", 0.25), ("decay", 0.45)):
            g = stability["log10_growth"][case]
            value = g[hi][i] - g[lo][i]
            right.annotate(f"k = −1, {dict(cases_names)[case]}: ×{10 ** value:.3g}",
                           (-1.0, value), (-0.75, value + dy), fontsize=7.5,
                           bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
                           arrowprops={"arrowstyle": "->", "lw": 0.7})
    left.set_ylim(-0.2, top)
    left.set_ylabel("log10 max_n |e_n|   (e_0 = 0, e_1 = 1)")
    left.set_title(f"Growth of a starting perturbation (clipped at 10^{top:g})", fontsize=9.5)
    right.set_ylim(-0.1, top_ratio)
    right.set_ylabel(f"log10 [growth({hi} steps) / growth({lo} steps)]")
    right.set_title(f"Increase from {lo} to {hi} steps (0: bounded; clipped)", fontsize=9.5)
    left.legend(fontsize=7.5, loc="upper center")
    right.legend(fontsize=7.5, loc="upper center")
    fig.tight_layout()
    return ctx.save_figure(fig, "stability")


def plot_learned_k(ctx: Context, training: dict) -> str:
    plt = pyplot()
    depths = training["depths"]
    lm_runs = [r for r in training["runs"] if r["model"] == "lm_resnet"]
    fig, axes = plt.subplots(1, len(depths), figsize=(6.5 * len(depths), 4.3), squeeze=False)
    values = [k for r in lm_runs for k in r["k_final"] + r["k_init"]]
    y_low = min(PUBLISHED_K_RANGE[0], min(values)) - 0.2
    y_high = max(PUBLISHED_K_RANGE[1], max(values)) + 0.3
    for ax, depth in zip(axes[0], depths, strict=True):
        runs = [r for r in lm_runs if r["depth"] == depth]
        ax.axhspan(*PUBLISHED_K_RANGE, color="0.85", alpha=0.6,
                   label="published learned range ≈ [−2.5, 1]")
        ax.axhspan(*K_INIT_RANGE, color="C2", alpha=0.35, label="init U(−0.1, 0)")
        ax.axhline(1.0, color="C3", lw=1.2,
                   label="stability interval (−1, 1] (dashed end excluded)")
        ax.axhline(-1.0, color="C3", lw=1.2, ls="--")
        for i, run in enumerate(runs):
            x = np.arange(len(run["k_final"])) + (i - (len(runs) - 1) / 2) * 0.12
            ax.plot(x, run["k_init"], "o", mfc="none", color=f"C{i}", ms=4)
            ax.plot(x, run["k_final"], "o", color=f"C{i}", ms=6,
                    label=f"seed {run['seed']}: learned (hollow: init)")
            for xi, a, b in zip(x, run["k_init"], run["k_final"], strict=True):
                ax.plot([xi, xi], [a, b], color=f"C{i}", lw=0.7, alpha=0.6)
        labels = runs[0]["k_labels"] if runs else []
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab.replace("stage", "s").replace("/lm_k_", "·") for lab in labels],
                           rotation=90 if len(labels) > 16 else 0, fontsize=7)
        ax.set_ylim(y_low, y_high)
        ax.set_xlabel("LM block (stage · step)")
        ax.set_ylabel("k_n")
        decay = "weight decay on k" if training["decay_lm_k"] else "no weight decay on k"
        ax.set_title(f"LM-ResNet{depth} on digits, {training['epochs']} epochs ({decay}): "
                     "learned k_n", fontsize=9.5)
        ax.legend(fontsize=6.5, loc="lower right")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return ctx.save_figure(fig, "learned_k")


# ---------------------------------------------------------------- experiment


def run(ctx: Context) -> dict:
    ctx.progress("(a) modified equation on u' = λu")
    errors = {str(k): modified_equation_errors(k) for k in MODIFIED_KS}
    modified = {
        "lambda": LAMBDA, "horizon": HORIZON, "ks": list(MODIFIED_KS), "ns": list(MODIFIED_NS),
        "fit_from": FIT_FROM, "errors": errors,
        "orders": {k: fitted_orders(MODIFIED_NS, e) for k, e in errors.items()},
        "amplitude_predicted": {str(k): amplitude_offset(k, LAMBDA * HORIZON / MODIFIED_NS[-1])
                                for k in MODIFIED_KS},
    }
    modified["figure"] = plot_modified(ctx, modified)
    for k in MODIFIED_KS:
        orders = modified["orders"][str(k)]
        ctx.progress(f"(a) k = {k}: orders " + ", ".join(f"{key} {v:.2f}"
                                                          for key, v in orders.items()))

    ctx.progress(f"(b) stability sweep: {len(STABILITY_KS)} values of k × {STABILITY_STEPS} steps")
    stability = stability_sweep()
    stability["figure"] = plot_stability(ctx, stability)
    ctx.progress(f"(b) bounded for k in {stability['bounded_range']}, "
                 f"{len(stability['mismatches'])} disagreement(s) with the root condition")

    training = training_runs(ctx)
    training["accuracy"] = accuracy_summary(training)
    training["k"] = k_summary(training)
    training["figure"] = plot_learned_k(ctx, training)
    return {"modified": modified, "stability": stability, "training": training}


# ---------------------------------------------------------------- report


def _growth_text(log10_growth: float) -> str:
    if log10_growth < 5:
        return f"{10.0**log10_growth:.4g}"
    return f"10^{log10_growth:.1f}"


def _pct(mean_sd: Sequence[float]) -> str:
    return f"{100 * mean_sd[0]:.2f} ± {100 * mean_sd[1]:.2f}"


def _report_modified(m: dict) -> list[str]:
    rows = []
    for k in m["ks"]:
        orders = m["orders"][str(k)]
        rows.append([f"{k:g}", *(fmt(orders[key], 2) for key in ERRORS),
                     fmt(m["errors"][str(k)]["mod_physical"][-1], 2)])
    exp = ", ".join(f"{EXPECTED_ORDER[key]}" for key in ERRORS)
    worst_first = max(abs(m["orders"][str(k)]["lead_euler"] - 1) for k in m["ks"])
    worst_second = max(abs(m["orders"][str(k)][key] - 2) for k in m["ks"]
                       for key in ("mod_physical", "rate_euler"))
    amp = m["amplitude_predicted"]
    n_last = m["ns"][-1]
    amp_rows = ", ".join(f"k = {k:g}: {fmt(abs(amp[str(k)]), 2)} predicted vs "
                         f"{fmt(m['errors'][str(k)]['mod_euler'][-1], 2)} measured"
                         for k in m["ks"])
    return [
        "### (a) Modified equation",
        "",
        f"Test equation u' = λu, λ = {m['lambda']:g}, on [0, T], T = {m['horizon']:g}, "
        f"h = T/N, N = {m['ns'][0]}…{m['ns'][-1]}, u_0 = 1, float64. Compared at t = T "
        "(relative errors): the LM solution u_N against the leading-order solution "
        "e^{λT/(1+k)} of (1+k)u' = λu, and against the slow solution e^{μT} of the modified "
        "equation (1+k)u' + (1−k)(h/2)u'' = λu (μ its root that tends to λ/(1+k)). The "
        "scheme's second characteristic root ≈ −k is a parasitic mode with no counterpart in "
        f"the equation; it decays like |k|^N, so orders are fitted on N ≥ {m['fit_from']}.",
        "",
        *markdown_table(["k", *[f"order: {SHORT[key]}" for key in ERRORS],
                         f"error at N = {n_last}: modified, slow-mode start"], rows),
        "",
        "Columns: " + "; ".join(f"*{SHORT[key]}*: {text}" for key, text in ERRORS.items())
        + ".",
        "",
        f"Expected orders, column by column: {exp}. The largest deviation from order 1 "
        f"against the leading-order equation is {fmt(worst_first, 2)}; from order 2 against "
        f"the modified equation (slow-mode start and growth rate) {fmt(worst_second, 2)}.",
        "",
        "What the columns say: with the network's Euler first step, u_N follows the modified "
        "equation's *rate* to second order (growth-rate column), but its amplitude is off "
        "at O(h), because that Euler step solves u' = f rather than (1+k)u' = f: the "
        "slow mode starts with amplitude c_1 = 1 + hλk/(1+k)² + O(h²) instead of 1, so u_N "
        "itself agrees with e^{μT} only to first order (except k = 0, where LM is Euler). At "
        f"N = {n_last}, |c_1 − 1| vs the relative error of u_N against e^{{μT}} (Euler "
        f"start): {amp_rows}. Started on the slow mode instead "
        "(u_1 = e^{μh}), u_N matches the modified equation to second order. This refines, "
        "and does not contradict, Lu et al.'s modified-equation claim.",
        "",
        f"![LM error vs N on u' = λu against the leading-order and the modified "
        f"equation]({m['figure']})",
        "",
    ]


def _report_stability(s: dict) -> list[str]:
    lo, hi = (str(n) for n in (s["steps"][0], s["steps"][-1]))
    rows = []
    for k in STABILITY_TABLE_KS:
        if k not in s["ks"]:
            continue
        i = s["ks"].index(k)
        g = s["log10_growth"]
        rows.append([f"{k:g}", _growth_text(g["f0"][lo][i]), _growth_text(g["f0"][hi][i]),
                     _growth_text(g["decay"][lo][i]), _growth_text(g["decay"][hi][i]),
                     "bounded" if s["bounded"][i] else "**grows**",
                     "stable" if root_condition(k) else "unstable"])
    rng = s["bounded_range"]
    step = s["ks"][1] - s["ks"][0]
    mism = s["mismatches"]
    verdict = ("agrees with the root condition at every grid point" if not mism else
               f"disagrees with the root condition at k = {', '.join(f'{k:g}' for k in mism)}")
    i_m1 = s["ks"].index(-1.0)
    off = s["decay_disagrees"]
    decay_text = (
        "With f = −u the same criterion gives the same interval." if not off else
        f"With f = −u the same criterion disagrees at k = {', '.join(f'{k:g}' for k in off)}: "
        "there |hλ| = 1/N is not small against (1+k)²/(2(1−k)) ("
        + ", ".join(f"{(1 + k) ** 2 / (2 * (1 - k)):.2g} at k = {k:g}" for k in off)
        + "), the discriminant of ζ² − (1−k+hλ)ζ − k is negative and the roots are a "
        "complex pair near the double root of k = −1: these N are not yet in the h → 0 "
        "regime the root condition is about."
    )
    return [
        "### (b) Stability interval −1 < k ≤ 1",
        "",
        "A perturbation e_n of the starting values obeys e_{n+1} = (1−k+hλ) e_n + k e_{n−1}; "
        "with e_0 = 0, e_1 = 1 we record max_n |e_n| after "
        f"{s['steps'][0]} and {s['steps'][-1]} steps, for f ≡ 0 and for f(u) = −u on [0, 1] "
        f"(hλ = −1/N), on a grid of k from {s['ks'][0]:g} to {s['ks'][-1]:g} (step "
        f"{step:.2g}). A k counts as bounded when {s['steps'][-1] // s['steps'][0]}× more "
        f"steps raise the growth with f ≡ 0 (the h → 0 limit) by less than "
        f"{BOUNDED_RATIO:g}×.",
        "",
        *markdown_table(["k", f"f ≡ 0, N = {lo}", f"f ≡ 0, N = {hi}", f"f = −u, N = {lo}",
                         f"f = −u, N = {hi}", "measured", "root condition"], rows),
        "",
        f"Bounded on the grid for k in [{rng[0]:g}, {rng[1]:g}]: the measurement {verdict}. "
        f"At k = −1 (double root 1) the growth is linear in N with f ≡ 0 "
        f"({_growth_text(s['log10_growth']['f0'][lo][i_m1])} → "
        f"{_growth_text(s['log10_growth']['f0'][hi][i_m1])}); with f = −u the double root "
        "splits into two roots on the unit circle and the growth is ~√N "
        f"({_growth_text(s['log10_growth']['decay'][lo][i_m1])} → "
        f"{_growth_text(s['log10_growth']['decay'][hi][i_m1])}), still unbounded. At k = 1 "
        "the roots are 1 and −1, both simple: bounded. Beyond |k| > 1 the growth is "
        "exponential, |k|^N. " + decay_text,
        "",
        f"![growth of a starting perturbation vs k]({s['figure']})",
        "",
    ]


def _report_training(t: dict) -> list[str]:
    rows, verdicts = [], []
    test_size = t["test_size"]
    for row in t["accuracy"]:
        params = {r["model"]: r["params"] for r in t["runs"] if r["depth"] == row["depth"]}
        d_mean, d_sd = row["difference"]
        n = len(row["seeds"])
        resolved = paired_difference_significant(d_mean, d_sd, n)
        rows.append([row["depth"], _pct(row["resnet"]), _pct(row["lm_resnet"]),
                     f"{100 * d_mean:+.2f} ± {100 * d_sd:.2f}", n,
                     f"{params.get('resnet', 0):,} / {params.get('lm_resnet', 0):,}"])
        if not resolved:
            verdicts.append(f"at depth {row['depth']} the difference ({100 * d_mean:+.2f} pp, "
                            f"{d_mean * test_size:+.1f} test images) is not significant "
                            f"over {n} seed(s) (paired t-test, 95%)")
        elif d_mean > 0:
            verdicts.append(f"at depth {row['depth']} LM-ResNet is better by "
                            f"{100 * d_mean:.2f} pp (significant over {n} seeds, paired t-test, "
                            "95%), as the paper claims")
        else:
            verdicts.append(f"at depth {row['depth']} LM-ResNet is *worse* by "
                            f"{100 * -d_mean:.2f} pp (significant over {n} seeds, paired "
                            "t-test, 95%), against the paper's claim")
    published = "; ".join(f"LM-ResNet{d}: {PUBLISHED_LM_ERROR[d]:.2f}%" for d in t["depths"]
                          if d in PUBLISHED_LM_ERROR)
    k = t["k"]
    decay = "also applied to the k_n" if t["decay_lm_k"] else "not applied to the k_n " \
        "(kode's default, decay_lm_k=False; the authors' code decays them)"
    moved_far = k["max_abs_change"] > 0.5
    k_text = (
        f"On digits with {t['epochs']} epochs the k_n move by {fmt(k['mean_abs_change'], 2)} "
        f"on average from their initialization and span [{fmt(k['min'], 2)}, "
        f"{fmt(k['max'], 2)}]"
        + (", a small part of the published spread: this run does not reproduce the wide "
           f"range of learned k_n reported by replications (small data, {t['epochs']} epochs)."
           if not moved_far and k["max"] - k["min"] < 1.5 else
           ", comparable in spread to the published range.")
        + (" None leaves the stability interval." if k["in_stability"] == k["count"] else
           f" {k['count'] - k['in_stability']} leave the stability interval: the trained "
           "network need not be a stable discretization.")
    )
    return [
        "### (c) LM-ResNet vs ResNet at equal depth on digits",
        "",
        f"`kode.train` on the embedded digits data ({t['train_size']} train / "
        f"{test_size} test 8×8 images), "
        f"{t['epochs']} epochs, batch {t['batch_size']}, SGD momentum {t['momentum']:g}, "
        f"lr {t['lr']:g} ({t['schedule']} schedule: ÷10 at 50% and 75%), weight decay "
        f"{t['weight_decay']:g}, {decay}. The same seed gives both models the same data "
        "order (not the same weights: LM draws its k_n in between); the difference column "
        "is paired by seed.",
        "",
        *markdown_table(["depth", "ResNet test acc. (%)", "LM-ResNet test acc. (%)",
                         "LM − ResNet (pp)", "seeds", "params ResNet / LM"], rows),
        "",
        f"Published (Lu et al., CIFAR-10 test error, not comparable in scale): {published}; "
        "the paper's claim is that LM-ResNet beats the ResNet of the same depth. Here: "
        + "; ".join(verdicts) + f". One test image is {100 / test_size:.2f} pp of accuracy.",
        "",
        f"**Learned k_n** ({k['count']} values over all LM runs): range "
        f"[{fmt(k['min'], 3)}, {fmt(k['max'], 3)}]; mean |k − k_init| = "
        f"{fmt(k['mean_abs_change'], 3)} (max {fmt(k['max_abs_change'], 3)}); "
        f"{k['in_init_range']} of {k['count']} still in the init range [−0.1, 0], "
        f"{k['in_stability']} of {k['count']} inside the stability interval (−1, 1], "
        f"{k['in_published']} of {k['count']} inside the published range ≈ [−2.5, 1] "
        "([reference.md](reference.md) §2: learned k_n reported by replications). " + k_text,
        "",
        f"![learned k_n per LM block, with init range, stability interval and published "
        f"range]({t['figure']})",
        "",
    ]


def report(result: dict) -> list[str]:
    return [
        "The LM step u_{n+1} = (1−k_n) u_n + k_n u_{n−1} + h f_n(u_n) (paper convention, "
        "first step Euler). Parts (a) and (b) check the numerical-analysis claims on a "
        "scalar linear ODE, part (c) trains the networks.",
        "",
        *_report_modified(result["modified"]),
        *_report_stability(result["stability"]),
        *_report_training(result["training"]),
    ]
