"""The fine-tuning memory benchmark: its configurations, verdicts, worker model and doc."""

from __future__ import annotations

import argparse

from benchmarks import finetune_memory
from benchmarks.gradient_memory import _build_model


def test_one_memory_process_per_mode_and_refinement_and_one_pair_per_refinement():
    args = argparse.Namespace(model="keras_resnet152v2", classes=10, input_size=224, batch=16,
                              refine=[1, 2], steps=1, rounds=4)
    cfgs = finetune_memory.configs(args)
    memory = [c for c in cfgs if c["mode"] != "pair"]
    assert sorted((c["refine"], c["mode"]) for c in memory) == sorted(
        (m, mode) for m in (1, 2) for mode in finetune_memory.MODES)
    # the mode order rotates, so no mode always runs first
    assert memory[0]["mode"] != memory[3]["mode"]
    pairs = [c for c in cfgs if c["mode"] == "pair"]
    assert [(c["refine"], c["modes"]) for c in pairs] == [
        (1, ["backprop", "adjoint"]), (2, ["backprop", "adjoint"])]
    assert all(c["input_size"] == 224 and c["batch"] == 16 for c in cfgs)
    # an interrupted run resumes with what it lacks (failed configurations included)
    results = [{**memory[0]}, {**memory[1], "error": "exit -9"}]
    left = finetune_memory.pending(cfgs, results)
    assert left == cfgs[1:]


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


def _memory(m, mode, increment, alloc):
    return {"refine": m, "mode": mode, "increment_mb": increment,
            "allocator_increment_mb": alloc, "num_steps": 43 * m, "params": 1000 * m,
            "trainable_params": 900 * m, "finite": True, "input_size": 224, "batch": 16,
            "classes": 10, "steps": 1, "wall_s": 1.0}


def test_doc_reports_ratios_intervals_and_verdicts(tmp_path):
    results = [_memory(1, "backprop", 4000, 3900), _memory(1, "checkpoint", 1500, 1400),
               _memory(1, "adjoint", 800, 790),
               {"refine": 1, "mode": "pair", "rounds": 4, "wall_s": 1.0,
                "step_s": {"backprop": 40.0, "adjoint": 60.0, "fwd": 12.0},
                "ratio": {"adjoint": 1.5}, "interval": {"adjoint": [1.4, 1.7]}},
               {"refine": 2, "mode": "backprop", "error": "RSS > 18 GB cap", "wall_s": 1.0},
               _memory(2, "adjoint", 820, 800)]
    meta = {"machine": "test machine", "model": "keras_resnet152v2", "batch": 16,
            "input_size": 224, "command": "python -m benchmarks.finetune_memory", "wall_s": 60,
            "load": "1.0–2.0", "findings": ["- a finding"]}
    text = finetune_memory.write_doc(results, meta, tmp_path).read_text()
    assert "| 1 | 43 | 1,000 | 4000 (3900) | 1500 (1400) | 800 (790) | 0.38 (0.36) | " \
           "0.20 (0.20) | True |" in text
    assert "RSS 0.200×, allocator 0.203× — **met**" in text
    assert "1.50 [1.40, 1.70] — **met**" in text
    assert "| 1 | 40.0 | 60.0 | 12.0 | 1.50 [1.40, 1.70] | 1.60 |" in text
    assert "killed (RSS > 18 GB cap)" in text
    assert text.rstrip().endswith("- a finding")
