"""The lu_schemes section: equal parameter budgets, and a report that shows every number."""

import numpy as np

from benchmarks.reproduce import lu_schemes


def test_the_four_schemes_have_equal_budgets_within_four_percent():
    counts = {}
    for scheme in lu_schemes.SCHEMES:
        stage = lu_schemes.build_model(scheme, "backprop", seed=0).get_layer("stage")
        counts[scheme] = sum(int(np.prod(v.shape)) for v in stage.trainable_variables)
    assert max(counts.values()) <= 1.04 * min(counts.values()), counts


def test_report_shows_accuracy_errors_and_memory():
    runs = [{"scheme": s, "gradient": g, "seed": seed, "integrator": lu_schemes.SCHEMES[s][0],
             "steps": 4, "functions": 4, "stage_params": 4224, "test_accuracy": 0.9,
             "train_cpu_s": 1.0, "grad_error_init": 1e-7 if "RevNet" in s else 0.5,
             "grad_error_trained": 2e-7 if "RevNet" in s else 0.7,
             "reconstruction_init": 0.1, "reconstruction_trained": 0.2}
            for seed in (0, 1) for s, g in lu_schemes.RUNS]
    memory = [{"n": 64, "mode": "backprop", "increment_mb": 345.0,
               "allocator_increment_mb": 0.0, "step_s": {}},
              {"n": 64, "mode": "adjoint", "error": "timeout"}]
    text = "\n".join(lu_schemes.report({"epochs": 5, "runs": runs, "memory": memory,
                                        "memory_batch": 32}))
    assert "RevNet (coupled Euler), adjoint" in text and "0.900 ± 0.000" in text
    assert "killed: timeout" in text and "At N = 64" not in text  # a failed config is shown
    assert "range 0.50–0.70" in text
