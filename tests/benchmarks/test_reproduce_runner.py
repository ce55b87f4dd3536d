"""`kode reproduce`: the runner, its document and the sections that need no training."""

import json
import math
import subprocess
import sys

import pytest

from benchmarks import gradient_memory as gm
from benchmarks.reproduce import EXPERIMENTS, memory_time, runner
from benchmarks.reproduce.common import Context, loglog_slope

KODE = [sys.executable, "-m", "kode.cli"]


def run(*args):
    return subprocess.run([*KODE, *args], capture_output=True, text=True, timeout=300)


def test_only_one_experiment_writes_its_section_and_keeps_the_others(tmp_path):
    result = run("reproduce", "--only", "cifar_recipes", "--out", str(tmp_path), "--allow-load")
    assert result.returncode == 0, result.stderr
    assert "cifar_recipes done" in result.stdout
    doc = (tmp_path / "results.md").read_text()
    store = json.loads((tmp_path / "results.json").read_text())
    assert list(store) == ["cifar_recipes"]
    assert store["cifar_recipes"]["command"] == (
        f"kode reproduce --only cifar_recipes --out {tmp_path} --allow-load")
    # the run's record (this test may run on a busy machine: --allow-load) and no claims
    assert store["cifar_recipes"]["record"]["allow_load"] is True
    assert store["cifar_recipes"]["claims"] == []
    assert "kode train lm_resnet110_sd --dataset cifar10" in doc and "4.80% error" in doc
    assert "Not run by `kode reproduce`" in doc
    # Every experiment has a section, in order; the ones not run say how to run them.
    headings = [line for line in doc.splitlines() if line.startswith("## ")]
    assert len(headings) == len(EXPERIMENTS)
    assert doc.count("Not run yet") == len(EXPERIMENTS) - 1

    # A later run of another experiment keeps this one's stored result and command.
    store["smooth_weights"] = {**store["cifar_recipes"], "command": "kode reproduce --quick",
                               "error": "exit 1: boom"}
    (tmp_path / "results.json").write_text(json.dumps(store))
    again = run("reproduce", "--only", "cifar_recipes", "--out", str(tmp_path), "--allow-load")
    assert again.returncode == 0, again.stderr
    doc = (tmp_path / "results.md").read_text()
    assert "**This run failed**: exit 1: boom" in doc and "`kode reproduce --quick`" in doc


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--only", "nothing"], "invalid choice: 'nothing'"),
])
def test_bad_arguments_are_one_line_exit_2(args, words):
    result = run("reproduce", *args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_figures_carry_the_command_and_seeds(tmp_path):
    from benchmarks.reproduce.common import pyplot

    plt = pyplot()
    ctx = Context(name="demo", quick=True, seeds=[3, 4], out=tmp_path,
                  command="kode reproduce --quick")
    fig, ax = plt.subplots()
    ax.plot([1, 2], [1, 2])
    texts = []
    fig.savefig = lambda *a, _save=fig.savefig, **k: (
        texts.extend(t.get_text() for t in fig.texts), _save(*a, **k))
    name = ctx.save_figure(fig, "line")
    assert name == "results_demo_line.png" and (tmp_path / name).stat().st_size > 0
    assert texts == ["kode reproduce --quick · seeds 3, 4"]


def test_loglog_slope_recovers_a_power_law_and_ignores_zeros():
    assert loglog_slope([4, 8, 16, 32], [1 / n**2 for n in (4, 8, 16, 32)]) == pytest.approx(-2)
    # Zero (and non-finite) errors are left out of the fit, not turned into log 0 = −inf.
    assert loglog_slope([2, 4, 8, 16], [0.0, 1 / 16, 1 / 64, math.inf]) == pytest.approx(-2)
    assert loglog_slope([4, 8, 16], [1.0, 1.0, 1.0]) == pytest.approx(0)
    assert math.isnan(loglog_slope([4, 8, 16], [0.0, 0.0, 1.0]))  # one point: no slope


def _worker_row(integrator, n, mode, allocator_mb):
    return {"sweep": "stage", "kind": "stage", "integrator": integrator, "n": n, "mode": mode,
            "increment_mb": allocator_mb + 3, "allocator_increment_mb": allocator_mb,
            "step_s": 0.01 * n, "forward_s": None, "baseline_mb": 100, "num_steps": n,
            "batch": 32, "steps": 2, "finite": True}


@pytest.mark.parametrize("adjoint_grows", [False, True])
def test_memory_section_verdict_follows_the_measured_growth(adjoint_grows):
    rows = []
    for n in (8, 64):
        rows.append(_worker_row("euler", n, "backprop", 8.0 * n))
        rows.append(_worker_row("euler", n, "adjoint", 2.0 * n if adjoint_grows else 18.0))
    table = gm.aggregate(rows)
    result = {"sweep": memory_time.QUICK, "batch": 32, "paired": [], "figures": ["m", "t"],
              "stage": [{"integrator": k[1], "n": k[2], "mode": k[3], **v}
                        for k, v in table.items()]}
    text = "\n".join(memory_time.report(result))
    assert "| euler | 64 | 515 (512) | " in text
    if adjoint_grows:
        assert "does NOT agree" in text and "N^1.00 with the adjoint" in text
    else:
        assert "measurement agrees" in text and "N^0.00 with the adjoint" in text


def test_memory_section_predicts_one_forward_per_step_where_the_evaluation_is_reused():
    rows = [_worker_row(i, n, mode, 10.0) for i in ("euler", "reversible_heun")
            for n in (8, 64) for mode in ("backprop", "adjoint")]
    table = gm.aggregate(rows)
    paired = [{"integrator": i, "n": 32, "step_s": {"backprop": 1.0, "adjoint": 1.5, "fwd": 0.25},
               "ratio": {"adjoint": 1.5}} for i in ("euler", "reversible_heun")]
    result = {"sweep": memory_time.QUICK, "batch": 32, "paired": paired, "figures": ["m", "t"],
              "stage": [{"integrator": k[1], "n": k[2], "mode": k[3], **v}
                        for k, v in table.items()]}
    text = "\n".join(memory_time.report(result))
    assert ("- euler, N = 32, steps alternated in one process: adjoint 1.500 s vs backprop "
            "1.000 s per step = 1.50×; a forward pass takes 0.250 s, so one reverse step plus "
            "one recomputation per step predicts 1 + 2·forward/backprop = 1.50×.") in text
    assert ("reversible_heun, N = 32, steps alternated in one process: adjoint 1.500 s vs "
            "backprop 1.000 s per step = 1.50×; a forward pass takes 0.250 s, so one reverse "
            "step whose evaluation the product reuses per step predicts 1 + forward/backprop "
            "= 1.25×.") in text
    assert "does not do yet" not in text and "about one extra forward per step" in text


def test_runner_module_and_cli_share_one_parser():
    parser = runner.build_parser()
    args = parser.parse_args(["--quick", "--only", "lm_resnet"])
    assert args.quick and args.only == ["lm_resnet"] and args.seeds is None
