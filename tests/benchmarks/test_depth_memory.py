"""The depth sweep of benchmarks/gradient_memory.py (benchmarks/depth_memory.py): its
configurations, the activation memory (batch 72 − batch 8), the slope and ratio verdicts on
synthetic results built to meet, to miss and to disagree, the page and the claims; the worker's
``recompute`` key; one real tiny worker process (resnet20 at 8×8, batch 2)."""

from __future__ import annotations

import math
import sys

import pytest

from benchmarks import depth_memory as dm
from benchmarks import gradient_memory as gm
from benchmarks import record

DEPTHS = (20, 32, 56, 110, 1202)


def test_configs_one_process_per_depth_batch_and_variant():
    cfgs = dm.configs((20, 110), (8, 72), steps=2)
    assert len(cfgs) == 2 * 2 * len(dm.VARIANTS)
    assert {(c["model"], c["batch"], dm.variant(c)) for c in cfgs} == {
        (f"resnet{d}", b, v) for d in (20, 110) for b in (8, 72) for v in dm.VARIANTS}
    by_variant = {dm.variant(c): c for c in cfgs}
    assert "recompute" not in by_variant["backprop"]
    assert by_variant["adjoint"]["recompute"] is True
    assert by_variant["checkpoint"]["recompute"] is True
    assert by_variant[dm.STAGES_ONLY] == {**by_variant[dm.STAGES_ONLY], "mode": "adjoint",
                                          "recompute": False}
    assert all(c["inter_op_threads"] == 0 and c["kind"] == "zoo" for c in cfgs)
    assert {c["inter_op_threads"] for c in dm.configs((20,), inter_op_threads=1)} == {1}
    # the order rotates, so no variant always runs first
    firsts = {dm.variant(cfgs[i]) for i in range(0, len(cfgs), len(dm.VARIANTS))}
    assert len(firsts) > 1


def test_variant_labels_round_trip():
    for name in dm.VARIANTS:
        mode, recompute = dm.split_variant(name)
        cfg = dm.variant_config(name)
        assert cfg["mode"] == mode and dm.variant(cfg) == name
        assert recompute is (False if name == dm.STAGES_ONLY else None)
    # backprop has nothing to recompute: the key does not change its label
    assert dm.variant({"mode": "backprop", "recompute": False}) == "backprop"


def test_estimate_names_the_configurations_the_cap_would_kill():
    cfgs = dm.configs(dm.DEPTHS)
    lines = dm.estimate(cfgs, mem_cap_gb=16)
    assert lines[0].startswith(f"depth sweep: {len(cfgs)} processes, estimated ")
    assert "resnet1202 backprop at batch 72" in lines[0] and len(lines) == 1
    assert 10 < sum(dm.process_seconds(c) for c in cfgs) / 60 < 120
    tight = dm.estimate(cfgs, mem_cap_gb=4)
    assert "resnet1202 backprop batch 72" in tight[1]
    assert "resnet20 " not in tight[1]


def _row(model, batch, name, rss, alloc):
    return {"sweep": "depth", "kind": "zoo", "model": model, "batch": batch,
            **dm.variant_config(name), "increment_mb": rss, "allocator_increment_mb": alloc,
            "step_s": 1.0, "forward_s": None, "baseline_mb": 500.0,
            "num_steps": dm.blocks(dm.depth_of(model)) - 2, "steps": 2, "finite": True}


def synthetic(adjoint_rss, adjoint_alloc, backprop_per_block=1.0, depths=DEPTHS):
    """Raw worker results: ``f(depth)`` gives the activation memory (batch 72 − batch 8) of
    the adjoint per measure; backprop's grows ∝ blocks; batch 8 costs a depth-dependent
    amount that the difference must remove."""
    rows = []
    for d in depths:
        fixed = 40.0 + 0.1 * d  # grows with depth but not with the batch
        act = {"backprop": (backprop_per_block * dm.blocks(d),) * 2,
               "checkpoint": (5.0 * math.sqrt(dm.blocks(d)),) * 2,
               "adjoint": (adjoint_rss(d), adjoint_alloc(d)),
               dm.STAGES_ONLY: (adjoint_rss(d) + 20.0, adjoint_alloc(d) + 20.0)}
        for name, (rss, alloc) in act.items():
            rows.append(_row(f"resnet{d}", 8, name, fixed, fixed - 5))
            rows.append(_row(f"resnet{d}", 72, name, fixed + rss, fixed - 5 + alloc))
    return rows


def _claims(table):
    return {c["id"]: c for c in gm.claims(table)}


def test_flat_adjoint_meets_both_targets():
    table = gm.aggregate(synthetic(lambda d: 1.0, lambda d: 1.2))
    act = dm.activation(table)
    assert act["adjoint", 110]["rss"] == pytest.approx(1.0)
    assert act["backprop", 110]["alloc"] == pytest.approx(54.0)
    s = dm.slopes(act)
    assert s["adjoint"]["rss"] == pytest.approx(0.0, abs=1e-9)
    assert s["backprop"]["rss"] == pytest.approx(1.0, abs=0.05)  # blocks = (d − 2)/2
    assert s["adjoint"]["depths"] == list(DEPTHS)
    text = "\n".join(dm.targets(table))
    assert "RSS 0.000, allocator 0.000 — **met**" in text
    assert "= 0.019× (allocator 1 vs 54 MiB = 0.022×) — **met**" in text
    claims = _claims(table)
    slope = claims["gradients.depth.adjoint-slope"]
    assert slope["verdict"] == "met" and slope["target"] == "≤ 0.05"
    ratio = claims["gradients.depth.resnet110.adjoint-vs-backprop"]
    assert ratio["verdict"] == "met"
    assert (ratio["value"], ratio["low"], ratio["high"]) == pytest.approx(
        (1 / 54, 1 / 54, 1.2 / 54))
    assert claims["gradients.depth.backprop-slope"]["verdict"] == "measured"
    assert claims["gradients.depth.resnet110.adjoint-stages-only-vs-backprop"][
        "verdict"] == "measured"
    record.check_claims(list(claims.values()))


def test_a_flat_adjoint_says_from_which_depth_the_ratio_target_holds():
    table = gm.aggregate(synthetic(lambda d: 1.0, lambda d: 1.2))
    crossing = dm.ratio_depth(dm.activation(table))
    # backprop: 1 MB per block, adjoint: 1 MB → 1 / blocks ≤ 0.03 from 33.3 blocks on
    assert crossing["per_block"] == pytest.approx(1.0)
    assert crossing["depth"] == pytest.approx(2 / 0.03 + 2)
    assert "≤ 0.03× from about depth 69 on" in "\n".join(dm.targets(table))
    growing = gm.aggregate(synthetic(lambda d: 0.5 * d, lambda d: 0.5 * d))
    assert "from about depth" not in "\n".join(dm.targets(growing))


def test_growing_adjoint_misses_both_targets():
    # ∝ depth^0.3 and 10% of backprop: the slope and the ratio are both out
    table = gm.aggregate(synthetic(lambda d: 2.0 * d**0.3, lambda d: 2.1 * d**0.3))
    claims = _claims(table)
    assert claims["gradients.depth.adjoint-slope"]["verdict"] == "missed"
    assert claims["gradients.depth.adjoint-slope"]["value"] == pytest.approx(0.3)
    assert claims["gradients.depth.resnet110.adjoint-vs-backprop"]["verdict"] == "missed"
    text = "\n".join(dm.targets(table))
    assert "RSS 0.300, allocator 0.300 — **missed**" in text


def test_measures_that_disagree_leave_the_targets_undecided():
    # RSS flat, the allocator grows: one process per configuration cannot tell which is right
    table = gm.aggregate(synthetic(lambda d: 1.0, lambda d: 0.2 * d**0.5,
                                   backprop_per_block=1.0))
    verdicts = {k: c["verdict"] for k, c in _claims(table).items()}
    assert verdicts["gradients.depth.adjoint-slope"] == "not decided"
    assert verdicts["gradients.depth.resnet110.adjoint-vs-backprop"] == "not decided"


def test_a_failed_process_drops_its_depth_and_says_why():
    rows = synthetic(lambda d: 1.0, lambda d: 1.0)
    rows = [r for r in rows if not (r["model"] == "resnet1202" and r["mode"] == "backprop"
                                    and r["batch"] == 72)]
    rows.append({**_row("resnet1202", 72, "backprop", 0, 0), "error": "RSS > 16 GB cap"})
    table = gm.aggregate(rows)
    act = dm.activation(table)
    assert act["backprop", 1202]["error"] == "batch 72: RSS > 16 GB cap"
    assert dm.slopes(act)["backprop"]["depths"] == [20, 32, 56, 110]
    assert "failed: batch 72: RSS > 16 GB cap" in "\n".join(dm.section(table))


def test_section_names_the_scheduling_and_the_largest_step_to_step_spread():
    rows = synthetic(lambda d: 1.0, lambda d: 1.2)
    rows[3]["step_allocator_increments_mb"] = [30.0, 150.5]  # one step overlapped
    text = "\n".join(dm.section(gm.aggregate(rows)))
    assert "TensorFlow's default inter-op scheduling" in text
    assert "allocator peaks in one process: 120.5 MiB" in text
    for r in rows:
        r["inter_op_threads"] = 1
    assert "ops one at a time (`inter_op_threads` 1)" in "\n".join(
        dm.section(gm.aggregate(rows)))


def test_slope_needs_two_positive_values():
    assert math.isnan(dm.slope([20], [1.0]))
    assert math.isnan(dm.slope([20, 110], [1.0, -0.5]))
    assert dm.slope([10, 100], [1.0, 10.0]) == pytest.approx(1.0)
    assert record.agreeing_verdict((0.01, math.nan), 0.05) == "not measured"


def test_one_depth_gives_no_slope_and_says_so():
    table = gm.aggregate(synthetic(lambda d: 1.0, lambda d: 1.0, depths=(110,)))
    assert "| slope of log memory vs log depth | | — | — | — | — | | |" in dm.section(table)
    text = "\n".join(dm.targets(table))
    assert "— (needs two depths or more, each with a positive value) — **not measured**" in text
    assert "**met**" in text  # the ResNet-110 ratio needs one depth only
    assert [c["id"] for c in gm.claims(table)] == [
        "gradients.depth.resnet110.adjoint-vs-backprop",
        "gradients.depth.resnet110.adjoint-stages-only-vs-backprop"]


def test_worker_model_recomputes_outside_the_stages_as_configured():
    from kode.layers.stage import recomputable_layers

    for recompute, expected in ((True, "adjoint"), (False, "backprop")):
        model, _, _ = gm._build_model({"kind": "zoo", "model": "resnet20", "input_size": 8,
                                       "mode": "adjoint", "recompute": recompute})
        layers = recomputable_layers(model)
        assert layers and {la.gradient for la in layers} == {expected}


def test_page_has_the_depth_section_targets_and_plot(tmp_path):
    table = gm.aggregate(synthetic(lambda d: 1.0, lambda d: 1.2))
    meta = {"machine": "test", "commands": ["python -m benchmarks.gradient_memory --sweeps "
                                            "depth"], "wall_s": 60, "notes": []}
    text = gm.write_doc(table, meta, tmp_path).read_text()
    assert "## Sweep 3: activation memory against depth" in text
    assert "| depth | stage steps | backprop MB | checkpoint MB | adjoint MB | " \
           f"{dm.STAGES_ONLY} MB | adjoint/backprop | {dm.STAGES_ONLY}/backprop |" in text
    assert "| 110 | 52 | 54 (54) | " in text
    assert "![activation memory vs depth](gradients_depth.png)" in text
    assert "Adjoint activation memory flat in depth" in text
    assert "ResNet-110, adjoint activation memory (batch 72 − batch 8) ≤ 0.03×" in text
    # a page of the depth sweep alone has no findings or cost model of the other sweeps
    assert "## Findings" not in text and "Cost model" not in text and "nan" not in text
    assert gm.plot(table, tmp_path) == ["gradients_depth.png"]
    assert (tmp_path / "gradients_depth.png").stat().st_size > 1000
    assert "## Whole networks" not in text  # the depth sweep is here: no pointer to it


def test_depth_sweep_alone_writes_its_own_page_and_claims_name_it(tmp_path, monkeypatch):
    """``--merge A.json --page gradients_depth.md``: the page under that name, without the
    stage pages' guard section, its claims naming it; the full page has the guard section
    and, without depth results, points to the depth page."""
    import json

    rows = synthetic(lambda d: 1.0, lambda d: 1.2)
    for r in rows:
        r["command"] = "python -m benchmarks.gradient_memory --sweeps depth"
        r["load_at_start"] = 0.2
    merged = tmp_path / "depth.json"
    merged.write_text(json.dumps(rows))
    monkeypatch.setattr(gm, "plot", lambda table, out, **kw: [])
    gm.main(["--merge", str(merged), "--out", str(tmp_path), "--page", "gradients_depth.md"])
    text = (tmp_path / "gradients_depth.md").read_text()
    assert "## Sweep 3" in text and "## The gradient guard's error" not in text
    claims = json.loads((tmp_path / "gradients_depth.json").read_text())["claims"]
    assert claims and {c["page"] for c in claims} == {"docs/gradients_depth.md"}
    assert not (tmp_path / "gradients.md").exists()
    meta = {"machine": "test", "commands": [], "wall_s": 0, "notes": []}
    full = gm.write_doc({}, meta, tmp_path).read_text()
    assert "## The gradient guard's error" in full
    assert "[gradients_depth.md](gradients_depth.md)" in full


class _Model:
    pass


def test_worker_passes_recompute_to_set_gradient_mode(monkeypatch):
    import kode.layers

    calls = []
    monkeypatch.setattr(kode.layers, "set_gradient_mode",
                        lambda model, mode, recompute=True: calls.append((mode, recompute)))
    gm.set_recompute(_Model(), "backprop", True)  # nothing to recompute: left as built
    gm.set_recompute(_Model(), "adjoint", False)
    gm.set_recompute(_Model(), "checkpoint", True)
    assert calls == [("adjoint", False), ("checkpoint", True)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_one_tiny_worker_process_per_variant():
    """resnet20 at 8×8, batch 2, in real worker processes: the label comes back, the loss is
    finite, both measures are there."""
    for name in ("adjoint", dm.STAGES_ONLY):
        cfg = {"sweep": "depth", "kind": "zoo", "model": "resnet20", "input_size": 8,
               **dm.variant_config(name), "batch": 2, "steps": 1, "warmup": 0,
               "inter_op_threads": 1}
        r = gm.measure(cfg, timeout=300.0, mem_cap_gb=4.0)
        assert "error" not in r, r["error"]
        assert r["finite"] and dm.variant(r) == name and r["num_steps"] > 0
        assert r["increment_mb"] >= 0 and r["allocator_increment_mb"] >= 0
