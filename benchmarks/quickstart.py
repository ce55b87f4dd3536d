"""What the README's quick start gives: ``kode train lm_resnet20`` on ``digits`` (the same
settings, seed by seed), its test accuracy and time per run, over several seeds.

    python -m benchmarks.quickstart                 # seeds 0-4, docs/quickstart.md + .json

Each seed is a fresh ``kode train`` process (as a user runs it); accuracy is read from the
run's ``metrics.json``. The page states the mean, the spread (min–max) and every seed's value.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import record as run_record

PAGE = "quickstart.md"
MODEL, DATASET = "lm_resnet20", "digits"


def run_seed(seed: int, workdir: Path) -> dict:
    """One ``kode train`` process with ``--seed``; its test metrics and wall time."""
    logdir = workdir / f"seed{seed}"
    command = [sys.executable, "-m", "kode.cli", "train", MODEL, "--dataset", DATASET,
               "--seed", str(seed), "--logdir", str(logdir)]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SystemExit(f"quickstart: seed {seed} failed (exit {proc.returncode}): {tail}")
    metrics = json.loads((logdir / "metrics.json").read_text())
    return {"seed": seed, "test_accuracy": float(metrics["test"]["accuracy"]), "wall_s": wall}


def claims(runs: list[dict]) -> list[dict]:
    accuracies = [100 * r["test_accuracy"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    page = run_record.page_of(PAGE)
    return [
        run_record.claim("quickstart.accuracy", f"Quick start: `kode train {MODEL}` on "
                         f"{DATASET}, test accuracy, mean over {len(runs)} seeds [min, max]",
                         statistics.mean(accuracies), low=min(accuracies),
                         high=max(accuracies), unit="%", page=page),
        run_record.claim("quickstart.wall", f"Quick start: wall time of one `kode train {MODEL}`"
                         " process (import, data, training, save), median [min, max]",
                         statistics.median(walls), low=min(walls), high=max(walls), unit="s",
                         page=page),
    ]


def page(record: run_record.RunRecord, runs: list[dict]) -> list[str]:
    (acc, wall) = claims(runs)
    lines = [f"# Quick start: `kode train {MODEL}` on {DATASET}", "",
             *run_record.page_header(record), "",
             f"Test accuracy over seeds {', '.join(str(r['seed']) for r in runs)}: mean "
             f"{acc['value']:.2f}%, from {acc['low']:.2f}% to {acc['high']:.2f}%. One process "
             f"takes {wall['value']:.0f} s (median; {wall['low']:.0f}–{wall['high']:.0f} s), "
             "including TensorFlow's start-up.", "",
             "| seed | test accuracy | wall time |", "|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {100 * r['test_accuracy']:.2f}% | {r['wall_s']:.0f} s |"
              for r in runs]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default="docs", help="directory for quickstart.md and .json")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    record = run_record.start_record(
        "python -m benchmarks.quickstart" + ("" if not given else " " + shlex.join(given)),
        args.allow_load)
    with tempfile.TemporaryDirectory() as workdir:
        runs = [run_seed(seed, Path(workdir)) for seed in args.seeds]
    run_record.finish_record(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_record.write_page(out / PAGE, page(record, runs))
    run_record.write_record(out / PAGE, record, runs, claims(runs))
    print(f"wrote {out / PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
