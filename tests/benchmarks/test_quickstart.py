"""benchmarks.quickstart: the page and claims state what the seeds' runs measured."""

from benchmarks import quickstart
from benchmarks import record as run_record

RUNS = [{"seed": 0, "test_accuracy": 0.9833, "wall_s": 61.0},
        {"seed": 1, "test_accuracy": 0.9750, "wall_s": 58.0},
        {"seed": 2, "test_accuracy": 0.9889, "wall_s": 70.0}]


def test_claims_are_the_mean_and_spread_of_the_seeds():
    accuracy, wall = quickstart.claims(RUNS)
    assert accuracy["value"] == (98.33 + 97.50 + 98.89) / 3
    assert (accuracy["low"], accuracy["high"]) == (97.50, 98.89)
    assert (wall["value"], wall["low"], wall["high"]) == (61.0, 58.0, 70.0)
    run_record.check_claims([accuracy, wall])


def test_the_page_starts_with_the_record_and_states_every_seed():
    record = run_record.RunRecord("python -m benchmarks.quickstart", "2026-12-02T00:00:00+00:00",
                                  "test machine", 2, 3.0, 2.0)
    lines = quickstart.page(record, RUNS)
    assert lines[2] == run_record.under_load_line(record)  # loaded: said first
    text = "\n".join(lines)
    assert "mean 98.24%, from 97.50% to 98.89%" in text
    for run in RUNS:
        assert f"| {run['seed']} | float32 | {100 * run['test_accuracy']:.2f}% |" in text


def test_bfloat16_runs_are_judged_against_the_float32_spread():
    inside = [{**r, "precision": "mixed_bfloat16", "test_accuracy": 0.98} for r in RUNS]
    outside = [{**r, "precision": "mixed_bfloat16", "test_accuracy": 0.90} for r in RUNS]
    assert quickstart.claims(RUNS + inside)[2]["verdict"] == "met"
    assert quickstart.claims(RUNS + outside)[2]["verdict"] == "missed"
    assert len(quickstart.claims(RUNS)) == 2
