"""The headline numbers of each ``kode reproduce`` experiment, as claims of
``docs/results.md`` (:mod:`benchmarks.record`): computed from the experiment's stored result,
the numbers its section of the page states."""

from __future__ import annotations

import statistics

from benchmarks.record import claim
from benchmarks.reproduce.finetune_auto import auto_verdict

PAGE = "docs/results.md"


def _c(name: str, id: str, text: str, value, **kw) -> dict:
    return claim(f"reproduce.{name}.{id}", text, value, page=PAGE, **kw)


def smooth_weights(r: dict) -> list[dict]:
    s = r["slopes"]
    return [_c("smooth_weights", "slope-zero-init", "Trained from zero: log–log slope of "
               "the weights' roughness max|ΔA| against depth N (smooth weights: −1)",
               s["zero"], unit="slope", target="−1 (paper)")]


def adjoint_error(r: dict) -> list[dict]:
    by = {s["key"]: s for s in r["series"]}
    out = []
    for key, expected in (("euler/smooth", "−1"), ("heun/smooth", "−2")):
        if key in by:
            integrator, weights = key.split("/")
            out.append(_c("adjoint_error", f"slope-{integrator}-{weights}",
                          f"{integrator.capitalize()} adjoint, {weights} weights: log–log slope "
                          "of the gradient error against N", by[key]["slope"], unit="slope",
                          target=f"{expected} (paper)"))
    return out


def memory_time(r: dict) -> list[dict]:
    return [_c("memory_time", f"adjoint-time-{p['integrator']}-n{p['n']}",
               f"{p['integrator']} stage of N={p['n']}: adjoint / backprop step time (paired)",
               p["ratio"]["adjoint"], unit="×") for p in r.get("paired", [])
            if "ratio" in p]


def depth_accuracy(r: dict) -> list[dict]:
    deepest = max(r["depths"])
    cells = {(s["integrator"], s["gradient"]): s for s in r["summary"] if s["depth"] == deepest}
    out = []
    for integrator in sorted({i for i, _ in cells}):
        bp, ad = cells.get((integrator, "backprop")), cells.get((integrator, "adjoint"))
        if bp and ad:
            out.append(_c("depth_accuracy", f"{integrator}-n{deepest}-adjoint-minus-backprop",
                          f"{integrator}, N={deepest}: adjoint − backprop test accuracy "
                          "(digits, mean over seeds)", 100 * (ad["acc_mean"] - bp["acc_mean"]),
                          unit="points"))
    return out


def lm_resnet(r: dict) -> list[dict]:
    return [_c("lm_resnet", f"depth{a['depth']}-accuracy-difference",
               f"LM-ResNet-{a['depth']} − ResNet-{a['depth']} test accuracy (digits, mean over "
               "seeds)", 100 * a["difference"][0], unit="points")
            for a in r.get("training", {}).get("accuracy", [])]


def finetune(r: dict) -> list[dict]:
    rows = [row for run in r["runs"] for row in run["rows"]]
    out = []
    for m in sorted({row["m"] for row in rows}):
        for mode in ("adjoint", "backprop"):
            values = [row[f"finetuned_{mode}"] for row in rows if row["m"] == m]
            out.append(_c("finetune", f"m{m}-{mode}-accuracy", f"Fine-tuned with {mode} after "
                          f"refining ×{m}: test accuracy (mean over seeds)",
                          100 * statistics.fmean(values), unit="%"))
    autos = [run["auto"] for run in r["runs"] if "auto" in run]
    verdict = auto_verdict(autos) if autos else {"agrees": None}
    if verdict["agrees"] is not None:
        out.append(_c("finetune", "auto-backprop-minus-adjoint", "Fine-tuned after "
                      "`--refine auto`: backprop − adjoint test accuracy (mean over seeds; "
                      "target: Sander et al., Table 2)", 100 * verdict["gap_mean"],
                      unit="points", target=f"≤ {100 * verdict['tolerance']:g} point",
                      verdict="met" if verdict["agrees"] else "missed"))
    return out


#: experiment → its claims; experiments without measured headline numbers have none.
CLAIMS = {"smooth_weights": smooth_weights, "adjoint_error": adjoint_error,
          "memory_time": memory_time, "depth_accuracy": depth_accuracy, "lm_resnet": lm_resnet,
          "finetune": finetune}


def experiment_claims(name: str, result: dict) -> list[dict]:
    fn = CLAIMS.get(name)
    return fn(result) if fn else []
