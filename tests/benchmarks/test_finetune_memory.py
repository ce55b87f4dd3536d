"""The fine-tuning memory benchmark: its configurations, verdicts, worker model and doc."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import finetune_memory
from benchmarks.depth_memory import STAGES_ONLY, variant
from benchmarks.gradient_memory import _build_model


def test_one_memory_process_per_mode_and_refinement_and_one_pair_per_refinement():
    args = argparse.Namespace(model="keras_resnet152v2", classes=10, input_size=224, batch=16,
                              refine=[1, 2], steps=1, rounds=4)
    cfgs = finetune_memory.configs(args)
    memory = [c for c in cfgs if c["mode"] != "pair"]
    assert sorted((c["refine"], variant(c)) for c in memory) == sorted(
        (m, mode) for m in (1, 2) for mode in finetune_memory.MODES)
    # recomputation outside the stages on, except in the configuration that turns it off
    assert {variant(c): c.get("recompute") for c in memory} == {
        "backprop": None, "checkpoint": True, "adjoint": True, STAGES_ONLY: False}
    # the mode order rotates, so no mode always runs first
    assert variant(memory[0]) != variant(memory[4])
    pairs = [c for c in cfgs if c["mode"] == "pair"]
    assert [(c["refine"], c["modes"], c["recompute"]) for c in pairs] == [
        (1, ["backprop", "adjoint", STAGES_ONLY], True),
        (2, ["backprop", "adjoint", STAGES_ONLY], True)]
    assert all(c["input_size"] == 224 and c["batch"] == 16 for c in cfgs)
    # an interrupted run resumes with what it lacks (failed configurations included), and
    # the two adjoint configurations are told apart
    results = [{**memory[0]}, {**memory[1], "error": "exit -9"}]
    left = finetune_memory.pending(cfgs, results)
    assert left == cfgs[1:]
    done = [c for c in memory if c["mode"] == "adjoint" and c["recompute"]]
    assert [c for c in finetune_memory.pending(memory, done)
            if c["mode"] == "adjoint"] == [c for c in memory if variant(c) == STAGES_ONLY]


def test_memory_verdict_needs_both_measures_on_the_same_side():
    verdict = finetune_memory.memory_verdict
    assert verdict(0.2, 0.24, 0.25) == "met"
    assert verdict(0.3, 0.5, 0.25).startswith("missed (by 20%–100%")
    assert verdict(0.2, 0.3, 0.25) == "not decided"
    assert verdict(None, 0.1, 0.25) == "not measured"


def test_worker_builds_the_zoo_model_at_the_input_size_and_refined():
    model, shape, steps = _build_model({"kind": "zoo", "model": "resnet20", "mode": "adjoint",
                                        "input_size": 16, "classes": 12})
    refined, _, refined_steps = _build_model({"kind": "zoo", "model": "resnet20",
                                              "mode": "adjoint", "input_size": 16,
                                              "classes": 12, "refine": 2})
    assert shape == (16, 16, 3) and model.output_shape == (None, 12)
    assert refined_steps == 2 * steps > 0
    stages = [la for la in refined.layers if hasattr(la, "dynamics")]
    assert stages and all(s.gradient == "adjoint" for s in stages)


def _memory(m, name, increment, alloc):
    from benchmarks.depth_memory import variant_config

    return {"refine": m, **variant_config(name), "increment_mb": increment,
            "allocator_increment_mb": alloc, "num_steps": 43 * m, "params": 1000 * m,
            "trainable_params": 900 * m, "finite": True, "input_size": 224, "batch": 16,
            "classes": 10, "steps": 1, "wall_s": 1.0}


def _pair(m, adjoint_over_stages_only, rounds=8):
    """A paired process whose adjoint takes the given multiple of the stages-only adjoint's
    time in every round (±1% alternating, so the interval is narrow but not empty)."""
    stages = [10.0 * (1 + 0.01 * (i % 2)) for i in range(rounds)]
    return {"refine": m, "mode": "pair", "rounds": rounds, "wall_s": 1.0,
            "times_s": {"backprop": [8.0] * rounds, STAGES_ONLY: stages,
                        "adjoint": [adjoint_over_stages_only * t for t in stages],
                        "fwd": [2.0] * rounds},
            "step_s": {"backprop": 8.0, "adjoint": 10.0 * adjoint_over_stages_only,
                       STAGES_ONLY: 10.0, "fwd": 2.0},
            "ratio": {"adjoint": 1.5, STAGES_ONLY: 1.25},
            "interval": {"adjoint": [1.4, 1.7], STAGES_ONLY: [1.2, 1.3]}}


def test_doc_reports_ratios_intervals_and_verdicts(tmp_path):
    results = [_memory(1, "backprop", 4000, 3900), _memory(1, "checkpoint", 1500, 1400),
               _memory(1, "adjoint", 400, 390), _memory(1, STAGES_ONLY, 800, 790),
               _pair(1, 1.05),
               {"refine": 2, "mode": "backprop", "error": "RSS > 18 GB cap", "wall_s": 1.0},
               _memory(2, "adjoint", 820, 800), _pair(2, 1.3)]
    meta = {"machine": "test machine", "model": "keras_resnet152v2", "batch": 16,
            "input_size": 224, "command": "python -m benchmarks.finetune_memory", "wall_s": 60,
            "load": "1.0–2.0", "findings": ["- a finding"]}
    text = finetune_memory.write_doc(results, meta, tmp_path).read_text()
    assert "| 1 | 43 | 1,000 | 4000 (3900) | 1500 (1400) | 400 (390) | 800 (790) | " \
           "0.38 (0.36) | 0.10 (0.10) | 0.20 (0.20) | True |" in text
    assert "m = 1: adjoint memory ≤ 0.12× backprop's: RSS 0.100×, allocator 0.100× — " \
           "**met**" in text
    assert "1.50 [1.40, 1.70] — **met**" in text
    assert "the stages-only adjoint's (recomputation outside the stages): 1.05 [1.05, 1.05] " \
           "— **met**" in text
    assert "| 1 | 8.0 | 10.5 | 10.0 | 2.0 | 1.50 [1.40, 1.70] | 1.05 [1.05, 1.05] | 1.50 |" \
        in text
    assert "1.30 [1.30, 1.30] — **missed by 18–18%**" in text
    assert "m = 2: adjoint memory ≤ 0.08× backprop's: **not measured** (a process is " \
           "missing or failed)" in text
    assert "killed (RSS > 18 GB cap)" in text
    assert "takes the adjoint's increment from 800 MB" in text and "to 400 MB" in text
    assert text.rstrip().endswith("- a finding")


@pytest.mark.parametrize("factor, expected", [(1.05, "met"), (1.3, "missed"),
                                              (1.1, "not decided")])
def test_recompute_time_verdict_from_the_paired_rounds(factor, expected):
    results = [_memory(1, "backprop", 4000, 3900), _memory(1, "adjoint", 500, 470), _pair(1, 1)]
    # per-round ratios straddle the target in the undecided case
    pair = results[-1]
    stages = pair["times_s"][STAGES_ONLY]
    spread = [0.95, 1.05] if expected == "not decided" else [1.0, 1.0]
    pair["times_s"]["adjoint"] = [factor * t * spread[i % 2] for i, t in enumerate(stages)]
    claims = {c["id"]: c for c in finetune_memory.claims(results)}
    c = claims["finetune_memory.m1.recompute-time"]
    assert c["verdict"] == expected and c["target"] == "≤ 1.1×"
    assert c["low"] <= c["value"] <= c["high"]
    mem = claims["finetune_memory.m1.adjoint-memory"]
    assert mem["target"] == "≤ 0.12×"
    assert mem["verdict"] == "missed"  # 500/4000 = 0.125, 470/3900 = 0.121: both above


def test_tiny_paired_process_times_both_adjoints():
    """A real paired process (resnet20 at 8×8, batch 2, 2 rounds) with the variant label:
    it builds the three models and the recompute ratio comes out of its rounds."""
    from benchmarks.gradient_memory import measure

    r = measure({"kind": "zoo", "model": "resnet20", "input_size": 8, "mode": "pair",
                 "modes": list(finetune_memory.PAIR_MODES), "recompute": True, "batch": 2,
                 "rounds": 2, "refine": 1}, timeout=300.0, mem_cap_gb=4.0)
    assert "error" not in r, r["error"]
    assert set(r["times_s"]) == {*finetune_memory.PAIR_MODES, "fwd"}
    assert all(len(v) == 2 for v in r["times_s"].values())
    median, low, high = finetune_memory.recompute_ratio(r)
    assert 0 < low <= median <= high
