"""Smooth weights emerge in a deep linear ResNet trained from zero (Sander et al., Fig. 2).

The network is one kode :class:`~kode.layers.IntegratorStage`: N forward-Euler steps
x_{n+1} = x_n + h A_n x_n with h = 1/N, d = 2, every f_n a bias-free ``Dense`` layer
(f_n(x) = A_n x) initialized to A_n = 0, in float64. It is trained by full-batch gradient
descent on L = ½ mean_i |x_N(X_i) − B X_i|², with random inputs X_i ~ N(0, I) and targets
from a random linear map B = exp(M), M Gaussian scaled to ‖M‖_F = 1: the flow of some
x' = A(t) x reaches B exactly with O(1) weights (det B > 0), so the experiment is about
*which* weights gradient descent picks, not about an unreachable target. (A random-vector
target would be fitted by a least-squares map that may have det < 0, which no product of
I + A_n/N with bounded A_n reaches.)

Claim checked: from A_n = 0 every A_n receives the same first gradient and the weights stay
a smooth function of t = n/N: max_n |A_n| = O(1) while max_n |A_{n+1} − A_n| = O(1/N), so
N · max|ΔA| / max|A| stays constant as N grows. Contrast: the same training from an i.i.d.
N(0, σ²) initialization keeps max|ΔA| = O(σ) for every N (the updates are smooth, the
initial noise stays). |·| is the largest absolute entry.
"""

from __future__ import annotations

import numpy as np

from benchmarks.reproduce.common import Context, fmt, loglog_slope, markdown_table, mean_std, pyplot

TITLE = "Smooth weights emerge (Sander et al., Fig. 2)"

DIM = 2
SAMPLES = 256
LEARNING_RATE = 0.25  # on the ODE-scaled weights: each A_n moves by η · N · ∂L/∂A_n
IID_STD = 0.5
MAIN_N = 100
QUICK = {"ns": [25, 50, 100], "gd_steps": 300}
FULL = {"ns": [25, 50, 100, 200], "gd_steps": 400}


def problem(seed: int, dim: int = DIM, samples: int = SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X ~ N(0, I) and targets Y = X Bᵀ, B = exp(M), M Gaussian with ‖M‖_F = 1."""
    from scipy.linalg import expm

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, dim))
    m = rng.standard_normal((dim, dim))
    # A fixed ‖M‖_F keeps ‖B‖ ≤ e: one learning rate then converges for every seed.
    b = expm(m / np.linalg.norm(m))
    return x, x @ b.T


def train_linear_resnet(
    num_steps: int, seed: int, gd_steps: int, init_std: float = 0.0,
    learning_rate: float = LEARNING_RATE,
) -> dict:
    """Full-batch GD on the Euler stage x_{n+1} = x_n + (1/N) A_n x_n; returns A (N×d×d),
    the loss curve and the smoothness measures of the trained weights."""
    import keras
    import tensorflow as tf

    from kode.layers.stage import IntegratorStage

    x_np, y_np = problem(seed)
    rng = np.random.default_rng(seed + 10_000)
    fns = [
        keras.layers.Dense(
            DIM, use_bias=False, dtype="float64",
            kernel_initializer=keras.initializers.Constant(
                init_std * rng.standard_normal((DIM, DIM))),
        )
        for _ in range(num_steps)
    ]
    stage = IntegratorStage(fns, "euler", step_size="ode", dtype="float64")
    x, y = tf.constant(x_np), tf.constant(y_np)
    stage(x)
    variables = [f.kernel for f in fns]
    # ∂L/∂A_n = O(h): scaling the step by N is plain GD on the continuous-time weights A(t).
    rate = learning_rate * num_steps

    @tf.function
    def gd_step():
        with tf.GradientTape() as tape:
            loss = 0.5 * tf.reduce_mean(tf.reduce_sum((stage(x, training=True) - y) ** 2, -1))
        for v, g in zip(variables, tape.gradient(loss, variables), strict=True):
            v.assign_sub(rate * g)
        return loss

    losses = [float(gd_step()) for _ in range(gd_steps)]
    # Dense computes x K, so A_n = K_nᵀ.
    a = np.stack([np.asarray(v.numpy()).T for v in variables])
    final = 0.5 * float(np.mean(np.sum((np.asarray(stage(x)) - y_np) ** 2, -1)))
    return {"A": a, "losses": losses + [final], **smoothness(a)}


def smoothness(a: np.ndarray) -> dict:
    """max_n |A_n|, max_n |A_{n+1} − A_n| (largest entries) and N · their ratio."""
    max_a = float(np.abs(a).max())
    max_diff = float(np.abs(np.diff(a, axis=0)).max())
    ratio = max_diff / max_a if max_a > 0 else float("nan")
    return {"max_a": max_a, "max_diff": max_diff, "ratio": ratio, "n_ratio": len(a) * ratio}


def run(ctx: Context) -> dict:
    sweep = QUICK if ctx.quick else FULL
    runs, curves = [], {}
    for init, std in (("zero", 0.0), ("iid", IID_STD)):
        for n in sweep["ns"]:
            for seed in ctx.seeds:
                r = train_linear_resnet(n, seed, sweep["gd_steps"], init_std=std)
                ctx.progress(f"{init} init N={n} seed {seed}: loss {r['losses'][0]:.3g} → "
                             f"{r['losses'][-1]:.2g}, max|A| {r['max_a']:.3g}, "
                             f"max|ΔA| {r['max_diff']:.3g}")
                runs.append({"init": init, "n": n, "seed": seed,
                             "loss_start": r["losses"][0], "loss_end": r["losses"][-1],
                             **{k: r[k] for k in ("max_a", "max_diff", "ratio", "n_ratio")}})
                if n == MAIN_N and seed == ctx.seeds[0]:
                    curves[init] = {"A": r["A"].tolist(), "losses": r["losses"]}
    slopes = {init: loglog_slope([r["n"] for r in runs if r["init"] == init],
                                 [r["max_diff"] for r in runs if r["init"] == init])
              for init in ("zero", "iid")}
    figure = ctx.save_figure(_figure(runs, curves), "weights")
    return {"dim": DIM, "samples": SAMPLES, "learning_rate": LEARNING_RATE,
            "iid_std": IID_STD, "main_n": MAIN_N, "gd_steps": sweep["gd_steps"],
            "ns": sweep["ns"], "seeds": ctx.seeds, "runs": runs, "slopes": slopes,
            "figure": figure}


def _figure(runs: list[dict], curves: dict):
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    labels = ["$A_{11}$", "$A_{12}$", "$A_{21}$", "$A_{22}$"]
    for ax, init, title in ((axes[0, 0], "zero", "trained from $A_n = 0$"),
                            (axes[0, 1], "iid", f"trained from i.i.d. N(0, {IID_STD}²)")):
        a = np.asarray(curves[init]["A"]).reshape(MAIN_N, -1)
        for j, label in enumerate(labels):
            ax.plot(np.arange(MAIN_N), a[:, j], lw=1.2, label=label)
        ax.set(title=f"entries of $A_n$ vs layer n (N = {MAIN_N}), {title}", xlabel="layer n",
               ylabel="entry value")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8, ncol=2)
    ax = axes[1, 0]
    for init, marker in (("zero", "o"), ("iid", "s")):
        ns = sorted({r["n"] for r in runs if r["init"] == init})
        means = [mean_std([r["max_diff"] for r in runs if r["init"] == init and r["n"] == n])[0]
                 for n in ns]
        ax.loglog(ns, means, marker=marker, label=f"{init} init: max$_n|A_{{n+1}}-A_n|$")
        if init == "zero":
            ax.loglog(ns, [means[0] * ns[0] / n for n in ns], "k:", lw=1, label="∝ 1/N")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set(title="roughness of the trained weights vs depth (mean over seeds)", xlabel="N",
           ylabel="max$_n|A_{n+1}-A_n|$")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for init in ("zero", "iid"):
        ax.semilogy(curves[init]["losses"], label=f"{init} init")
    ax.set(title=f"training loss, full-batch GD (N = {MAIN_N})", xlabel="GD step",
           ylabel="½ mean $|x_N - BX|^2$")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.suptitle("Deep linear ResNet, d = 2, $x_{n+1} = x_n + A_n x_n / N$, "
                 "regression to $Y = \\exp(M) X$", fontsize=11)
    fig.tight_layout()
    return fig


def _summary(runs: list[dict], init: str, n: int, key: str) -> tuple[float, float]:
    return mean_std([r[key] for r in runs if r["init"] == init and r["n"] == n])


def report(result: dict) -> list[str]:
    runs, ns, main = result["runs"], result["ns"], result["main_n"]

    def cell(init: str, n: int, key: str) -> str:
        m, s = _summary(runs, init, n, key)
        return f"{fmt(m)} ± {fmt(s)}"

    rows = [(init, n, cell(init, n, "max_a"), cell(init, n, "max_diff"),
             cell(init, n, "n_ratio"), f"{fmt(_summary(runs, init, n, 'loss_start')[0])} → "
             f"{fmt(_summary(runs, init, n, 'loss_end')[0])}")
            for init in ("zero", "iid") for n in ns]
    zero_nr = [_summary(runs, "zero", n, "n_ratio")[0] for n in ns]
    iid_diff = [_summary(runs, "iid", n, "max_diff")[0] for n in ns]
    main_zero = {k: _summary(runs, "zero", main, k)[0] for k in ("max_a", "max_diff", "ratio")}
    slope_zero, slope_iid = result["slopes"]["zero"], result["slopes"]["iid"]
    smooth_ok = -1.2 <= slope_zero <= -0.8
    lines = [
        f"A linear ResNet x_{{n+1}} = x_n + (1/N) A_n x_n in d = {result['dim']} (one kode "
        "`IntegratorStage`, Euler, `step_size=\"ode\"`, bias-free `Dense` residual functions, "
        f"float64), trained by {result['gd_steps']} steps of full-batch gradient descent "
        f"(rate {result['learning_rate']} on the ODE-scaled weights, i.e. A_n moves by "
        f"η·N·∂L/∂A_n) on {result['samples']} random inputs X ~ N(0, I) with targets B X, "
        "B = exp(M) (M Gaussian, ‖M‖_F = 1): positive determinant, reachable by a linear flow. "
        "|·| is the largest absolute entry. Mean ± std over seeds "
        f"{', '.join(str(s) for s in result['seeds'])}.",
        "",
        # "|" inside a cell would end it: escaped.
        *markdown_table(["init", "N", r"max_n \|A_n\|", r"max_n \|A_{n+1} − A_n\|",
                         r"N · max\|ΔA\| / max\|A\|", "loss start → end"], rows, "lrrrrr"),
        "",
        f"![entries of A_n against n, and max|ΔA| against N]({result['figure']})",
        "",
        f"**From A_n = 0 (the setting of the paper's Fig. 2):** at N = {main}, max|A_n| = "
        f"{fmt(main_zero['max_a'])} and max|A_{{n+1}} − A_n| = {fmt(main_zero['max_diff'])}, "
        f"a ratio of {fmt(main_zero['ratio'])} ≈ {fmt(main_zero['ratio'] * main)}/N. "
        f"Across N = {ns[0]}…{ns[-1]} the roughness falls with log–log slope "
        f"{fmt(slope_zero)} (smooth weights: −1) and N·max|ΔA|/max|A| stays between "
        f"{fmt(min(zero_nr))} and {fmt(max(zero_nr))}: the trained A_n sample a smooth "
        "function A(t), as Sander et al. (Fig. 2) report. "
        + ("This agrees with the paper." if smooth_ok else
           "**This disagrees with the paper's O(1/N) claim** at these sizes."),
        "",
        f"**From i.i.d. N(0, {result['iid_std']}²) weights (contrast):** max|ΔA| is "
        f"{fmt(min(iid_diff))}…{fmt(max(iid_diff))} over N = {ns[0]}…{ns[-1]} (slope "
        f"{fmt(slope_iid)}"
        + (", i.e. no decay): gradient descent adds a smooth correction, the initial noise "
           "stays. The smoothness is a property of the initialization plus training, not of "
           "training alone, which is why the adjoint section below compares smooth and "
           "i.i.d. weights." if slope_iid > -0.3 else
           "): **unexpectedly, training removes the initial noise** at these sizes."),
    ]
    return lines
