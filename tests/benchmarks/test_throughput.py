"""Fast checks of benchmarks/throughput.py: MAC counts against docs/reference.md §2, the
hand-written reference ResNet-56 against the zoo's, and that a tiny worker reports its
fields. No timing assertions: the numbers themselves are the benchmark's business."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from benchmarks import throughput  # noqa: E402


@functools.cache
def _model(name: str):
    return throughput.build_model(name)


@pytest.mark.parametrize(("name", "published"), [("resnet20", 40.8), ("resnet56", 125.7),
                                                 ("resnet110", 253.1)])
def test_mac_count_matches_published(name, published):
    macs = throughput.count_macs(_model(name))
    assert round(macs / 1e6, 1) == published


def test_reference_resnet56_has_the_zoo_layers():
    zoo_model = _model("resnet56")
    reference = throughput.reference_resnet(56)
    assert throughput.trainable_parameters(reference) == \
        throughput.trainable_parameters(zoo_model) == 855_674
    assert throughput.count_macs(reference) == throughput.count_macs(zoo_model)

    def kinds(model):
        counts = {}
        for layer in model._flatten_layers(include_self=False):
            kind = type(layer).__name__
            if kind in ("Conv2D", "BatchNormalization", "Dense"):
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    assert kinds(reference) == kinds(zoo_model) == {"Conv2D": 57, "BatchNormalization": 57,
                                                    "Dense": 1}


def test_heun_counts_each_inner_function_twice():
    heun = _model("heun_resnet56")
    plain = _model("resnet56")
    # Stage 1: 9 functions → 8 Heun steps × 2; stages 2, 3: transition + 8 functions → 7 × 2.
    assert throughput.function_evaluations(plain) == 27
    assert throughput.function_evaluations(heun) == 16 + 2 * (1 + 14)
    assert throughput.count_macs(heun) > throughput.count_macs(plain)


def test_tiny_train_worker_reports_the_fields():
    # The smallest plain model (stem, one block per stage, head) keeps fit's tracing short.
    result = throughput.run_train_worker({
        "kind": "train", "model": "reference_resnet8", "shape": [8, 8, 1], "batch": 4,
        "steps": 2, "warmup": 1, "rep": 0, "count": True,
    })
    for field in ("images_per_s", "step_s", "peak_mb", "trainable_params", "macs",
                  "evaluations", "loss"):
        assert field in result
    assert len(result["step_times_s"]) == 2 and result["images_per_s"] > 0
    assert result["peak_mb"] > 0 and result["evaluations"] == 0
    assert result["macs"] == throughput.count_macs(throughput.reference_resnet(8, (8, 8, 1)))


def test_summary_and_doc_from_fake_results(tmp_path):
    results = []
    for rep in range(2):
        for model, rate in (("resnet56", 90.0), ("reference_resnet56", 100.0),
                            ("lm_resnet56", 85.5), ("heun_resnet56", 54.0)):
            results.append({"kind": "train", "model": model, "rep": rep, "batch": 128,
                            "steps": 3, "warmup": 1, "images_per_s": rate + rep,
                            "step_s": 128 / (rate + rep), "peak_mb": 1400.0,
                            "trainable_params": 855_674, "macs": 125.7e6 * (
                                1.7 if model.startswith("heun") else 1), "evaluations": 27})
        results.append({"kind": "matmul", "rep": rep, "flops": {"1024": 8e10, "4096": 1e11},
                        "best_flops": 1e11})
    results.append({"kind": "pipeline", "dataset": "cifar10", "batch": 128,
                    "images_per_s": 1e4})
    for model, other in (("resnet56", 50.0), ("lm_resnet56", 150.0)):
        results.append({"kind": "profile", "model": model, "wall_ms": 1500.0,
                        "op_ms": {"fwd conv": 600.0, "bwd conv": 1200.0, "fwd batchnorm": 300.0,
                                  "bwd other": other},
                        "elementwise_ops_per_step": {"Mul": 10, "Sum": 2}})
    summary = throughput.summarize(results)
    ratios = {(c["model"], c["base"]): c["ratio"] for c in summary["comparisons"]}
    assert ratios["resnet56", "reference_resnet56"] == pytest.approx((0.9 + 91 / 101) / 2)
    assert ratios["resnet56", throughput.PRE_FIX] is None  # not in these results
    assert ratios["heun_resnet56", "resnet56"] == pytest.approx((54 / 90 + 55 / 91) / 2 * 1.7)
    meta = {"commands": ["python -m benchmarks.throughput"], "date": "today", "wall_s": 60.0,
            "machine": "test", "load_before": 0.1, "load_after": 0.2, "repeats": 2,
            "mac_check": {"resnet56": 125.7e6}, "findings": throughput.findings(summary)}
    text = throughput.write_doc(summary, meta, tmp_path).read_text()
    assert "python -m benchmarks.throughput" in text and "**missed**" in text
    assert "## Where the time goes" in text and "| lm_resnet56 | 1500 |" in text
    assert "predicts a ratio of" in text
    assert "## Findings" in text and "LM-ResNet-56 vs ResNet-56** (0.950" in text
    assert "| cifar10 |" in text


def test_profiler_op_categories():
    cat = throughput._op_category
    assert cat("m/stage1_1/stage1_f0_1/conv1_1/convolution", "_MklNativeConv2D") == "conv"
    assert cat("gradient_tape/m/stage1_1/stage1_f0_1/bn1_1/moments/mean", "Mean") == \
        "batchnorm"
    assert cat("m/batch_normalization_3_1/batchnorm/mul", "Mul") == "batchnorm"
    assert cat("m/head_bn_1/batchnorm/sub", "Sub") == "batchnorm"
    assert cat("gradient_tape/m/stage1_1/FusedBatchNormGradV3", "FusedBatchNormGradV3") == \
        "batchnorm"
    assert cat("m/stage1_1/add", "AddV2") == "other"
    assert cat("SGD/AssignSubVariableOp", "AssignSubVariableOp") == "optimizer"
    # A forward sum that grappler turned into an accumulator is the model's, not the SGD's.
    rewrite = "m/stage1_1/ArithmeticOptimizer/AddOpsRewrite_add_2/tmp_var"
    assert cat(f"{rewrite}_accum_0", "AssignAdd") == "other"
    assert cat(f"{rewrite}_initializer", "Assign") == "other"
    assert cat("m/bn1_1/AssignMovingAvg", "AssignSubVariableOp") == "batchnorm"


def test_paired_statistics_and_verdicts():
    from benchmarks.paired import alternate, median_interval, verdict

    order = []
    times = alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 40)
    assert len(times["a"]) == len(times["b"]) == 40
    firsts = order[::2]
    assert 5 < firsts.count("a") < 35  # random order per round, not always A first
    med, low, high = median_interval([1.0, 1.1, 0.9, 1.2, 1.05, 0.95, 1.0, 1.02, 0.98])
    assert low <= med <= high and low < 1.0 < high and high - low < 0.2
    assert median_interval([2.0] * 5) == (2.0, 2.0, 2.0)
    assert verdict(1.45, 1.6, 1.4) == "met"
    assert verdict(1.3, 1.5, 1.4) == "not decided"
    assert verdict(1.1, 1.2, 1.4) == "missed by 14–21%"
    assert verdict(1.2, 1.35, 1.4, at_least=False) == "met"
    assert verdict(1.5, 1.6, 1.4, at_least=False) == "missed by 7–14%"


def test_paired_summary_and_doc_from_fake_times(tmp_path):
    rounds = 9
    step = {throughput.REFERENCE: 1.5, "resnet56": 1.0, "lm_resnet56": 1.04,
            "heun_resnet56": 2.0, "matmul": 0.1}
    times = {name: [t * (1 + 0.01 * (i % 3)) for i in range(rounds)]
             for name, t in step.items()}
    info = {name: {"macs": 125.7e6 * (2 if name.startswith("heun") else 1), "evaluations": 27,
                   "trainable_params": 855_770} for name in step if name != "matmul"}
    result = {"batch": 128, "times_s": times, "models_info": info, "matmul_flop": 2 * 2048**3}
    summary = throughput.summarize_paired(result)
    by = {(c["model"], c["base"]): c for c in summary["comparisons"]}
    zoo = by["resnet56", throughput.REFERENCE]
    assert zoo["low"] <= zoo["ratio"] <= zoo["high"] and abs(zoo["ratio"] - 1.5) < 0.02
    assert zoo["verdict"] == "met"
    assert by["lm_resnet56", "resnet56"]["ratio"] == pytest.approx(1 / 1.04, rel=0.02)
    # Heun: half the speed, twice the MACs per image: equal speed per evaluation.
    assert by["heun_resnet56", "resnet56"]["ratio"] == pytest.approx(1.0, rel=0.02)
    flops = 128 / 1.0 * 125.7e6 * 6 / (2 * 2048**3 / 0.1)
    assert by["resnet56", "matmul"]["ratio"] == pytest.approx(flops, rel=0.03)
    meta = {"command": "python -m benchmarks.throughput --paired", "date": "today",
            "wall_s": 60.0, "machine": "test", "load_before": 9.0, "load_after": 10.0,
            "findings": throughput.paired_findings(summary)}
    text = throughput.write_paired_doc(summary, meta, tmp_path).read_text()
    assert "--paired" in text and "a shared machine" in text and "**met**" in text
    assert f"{zoo['ratio']:.3f} [{zoo['low']:.3f}, {zoo['high']:.3f}]" in text
