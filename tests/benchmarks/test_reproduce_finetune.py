"""kode reproduce, fine-tuning (Sander et al., Table 2) with ``--refine auto``: the m chosen per
seed, and the verdict "adjoint within one point of backprop" computed from the accuracies
(inputs built to agree and to disagree), in the section and in the claims."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.reproduce import claims, finetune
from benchmarks.reproduce.finetune_auto import auto_report, auto_verdict, run_auto


def _auto(m, backprop, adjoint, reused=False):
    return {"m": m, "tolerance": 0.05, "factors": [1, 2, 4, 8, 16], "reused": reused,
            "guard_error": 0.04, "finetuned_backprop": backprop, "finetuned_adjoint": adjoint,
            "guard_error_after": 0.03, "candidates": []}


AGREE = [_auto(8, 0.95, 0.948), _auto(16, 0.96, 0.955), _auto(8, 0.94, 0.945)]
DISAGREE = [_auto(8, 0.95, 0.92), _auto(16, 0.96, 0.955), _auto(8, 0.94, 0.90)]


def test_verdict_agrees_when_the_mean_gap_is_within_one_point():
    v = auto_verdict(AGREE)
    assert v["agrees"] is True and v["within"] == 3 and v["ms"] == [8, 16, 8]
    assert v["gap_mean"] == pytest.approx((0.002 + 0.005 - 0.005) / 3)


def test_verdict_disagrees_when_the_mean_gap_exceeds_one_point():
    v = auto_verdict(DISAGREE)
    assert v["agrees"] is False and v["within"] == 1
    assert v["gap_mean"] == pytest.approx((0.03 + 0.005 + 0.04) / 3)


def test_a_seed_without_an_m_within_the_tolerance_is_no_agreement():
    failed = {"m": None, "error": "no refinement factor up to 16 ...", "tolerance": 0.05,
              "reused": False}
    v = auto_verdict([*AGREE, failed])
    assert v["agrees"] is False and v["failed"] == 1 and v["ms"][-1] is None
    assert auto_verdict([failed])["agrees"] is None


def _result(autos):
    rows = [{"m": m, "functions": 4 * m, "parameters": 100, "output_change": 0.1,
             "guard_error_tied": 3.0, "guard_error": 1.0 / m, "refined_accuracy": 0.8,
             "finetuned_backprop": 0.95, "finetuned_adjoint": 0.9, "guard_error_after": 0.5 / m}
            for m in finetune.FACTORS]
    runs = [{"seed": i, "pretrained_accuracy": 0.8, "rows": rows, "auto": a}
            for i, a in enumerate(autos)]
    memory = [{"m": m, "mode": mode, "increment_mb": 10.0 * m, "allocator_increment_mb": 9.0,
               "step_s": 0.1} for m in finetune.FACTORS for mode in finetune.MODES]
    return {"budget": finetune.QUICK, "steps": 4, "width": 16, "memory_batch": 512,
            "runs": runs, "memory": memory, "figure": "f.png"}


@pytest.mark.parametrize("autos, word, verdict", [(AGREE, "**agrees**", "met"),
                                                  (DISAGREE, "**disagrees**", "missed")])
def test_section_and_claim_state_the_computed_verdict(autos, word, verdict):
    text = "\n".join(finetune.report(_result(autos)))
    assert "**With `--refine auto`**" in text
    assert f"`--refine auto`: mean gap over 3 seeds {100 * auto_verdict(autos)['gap_mean']:+.1f}" \
           in text
    assert text.rstrip().endswith(word + ".")
    assert "| 1 | 16 | 0.04 | 0.960 | 0.955 | +0.5 |" in text
    c = {c["id"]: c for c in claims.finetune(_result(autos))}["reproduce.finetune.auto-"
                                                               "backprop-minus-adjoint"]
    assert c["verdict"] == verdict and c["target"] == "≤ 1 point"
    assert c["value"] == pytest.approx(100 * auto_verdict(autos)["gap_mean"])


def test_results_without_auto_render_as_before():
    result = _result(AGREE)
    for run in result["runs"]:
        del run["auto"]
    assert "--refine auto" not in "\n".join(finetune.report(result))
    assert not [c for c in claims.finetune(result) if "auto" in c["id"]]
    assert auto_report([{"seed": 0, "auto": {"m": None, "error": "x", "tolerance": 0.05}}],
                       128)[-1].endswith("not measured (no seed found an m within the "
                                         "tolerance).")


def test_run_auto_chooses_refines_and_reuses_a_fixed_factor():
    """On the experiment's real tiny network (random weights): a loose tolerance takes the
    first factor tried; a fixed factor's fine-tuning is reused, any other is run; no factor
    within the tolerance gives m = None."""
    model = finetune.build_pretrained(0)
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((8, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 8))
    rows = [{"m": 1, "finetuned_backprop": 0.9, "finetuned_adjoint": 0.8,
             "guard_error_after": 0.3}]
    tuned = []

    def finetune_both(refined):
        tuned.append(sum(s.num_steps for s in refined.layers if hasattr(s, "num_steps")))
        return {"finetuned_backprop": 0.7, "finetuned_adjoint": 0.6, "guard_error_after": 0.2}

    loose = {"auto_tolerance": 1e9, "auto_factors": [1, 2]}
    a = run_auto(model, rows, loose, batch, finetune_both)
    assert (a["m"], a["reused"], a["finetuned_adjoint"], tuned) == (1, True, 0.8, [])
    a = run_auto(model, rows, {**loose, "auto_factors": [2]}, batch, finetune_both)
    assert (a["m"], a["reused"], a["finetuned_adjoint"]) == (2, False, 0.6)
    assert tuned == [2 * finetune.STEPS]
    strict = {"auto_tolerance": 1e-12, "auto_factors": [1]}
    a = run_auto(model, rows, strict, batch, finetune_both)
    assert a["m"] is None and "tolerance" in a["error"]
