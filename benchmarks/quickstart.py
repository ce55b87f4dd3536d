"""What the README's quick start gives: ``kode train lm_resnet20`` on ``digits`` (the same
settings, seed by seed), its test accuracy and time per run, over several seeds, in float32
(the default) and with ``--precision mixed_bfloat16``.

    python -m benchmarks.quickstart                 # seeds 0-4, docs/quickstart.md + .json

Each run is a fresh ``kode train`` process (as a user runs it); accuracy is read from the
run's ``metrics.json``. The page states the mean, the spread (min–max) and every seed's value;
the bfloat16 runs' mean accuracy is checked against the float32 runs' spread.
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
PRECISIONS = ("float32", "mixed_bfloat16")


def run_seed(seed: int, workdir: Path, precision: str = "float32") -> dict:
    """One ``kode train`` process with ``--seed``; its test metrics and wall time."""
    logdir = workdir / f"{precision}-seed{seed}"
    command = [sys.executable, "-m", "kode.cli", "train", MODEL, "--dataset", DATASET,
               "--seed", str(seed), "--logdir", str(logdir), "--precision", precision]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise SystemExit(f"quickstart: seed {seed} failed (exit {proc.returncode}): {tail}")
    metrics = json.loads((logdir / "metrics.json").read_text())
    return {"seed": seed, "precision": precision,
            "test_accuracy": float(metrics["test"]["accuracy"]), "wall_s": wall}


def claims(runs: list[dict]) -> list[dict]:
    """The float32 runs' accuracy and time; with bfloat16 runs, their accuracy against the
    float32 spread ("met" when the bfloat16 mean lies within the float32 runs' [min, max])."""
    base = [r for r in runs if r.get("precision", "float32") == "float32"]
    bf16 = [r for r in runs if r.get("precision") == "mixed_bfloat16"]
    accuracies = [100 * r["test_accuracy"] for r in base]
    walls = [r["wall_s"] for r in base]
    page = run_record.page_of(PAGE)
    out = [
        run_record.claim("quickstart.accuracy", f"Quick start: `kode train {MODEL}` on "
                         f"{DATASET}, test accuracy, mean over {len(base)} seeds [min, max]",
                         statistics.mean(accuracies), low=min(accuracies),
                         high=max(accuracies), unit="%", page=page),
        run_record.claim("quickstart.wall", f"Quick start: wall time of one `kode train {MODEL}`"
                         " process (import, data, training, save), median [min, max]",
                         statistics.median(walls), low=min(walls), high=max(walls), unit="s",
                         page=page),
    ]
    if bf16:
        low, high = min(accuracies), max(accuracies)
        mean = statistics.mean(100 * r["test_accuracy"] for r in bf16)
        out.append(run_record.claim(
            "quickstart.accuracy-mixed-bfloat16", f"Quick start with --precision mixed_bfloat16:"
            f" test accuracy, mean over {len(bf16)} seeds [min, max], against the float32 runs'"
            " spread", mean, low=min(100 * r["test_accuracy"] for r in bf16),
            high=max(100 * r["test_accuracy"] for r in bf16), unit="%",
            target=f"within [{low:.2f}, {high:.2f}] (float32)", page=page,
            verdict="met" if low <= mean <= high else "missed"))
    return out


def page(record: run_record.RunRecord, runs: list[dict]) -> list[str]:
    acc, wall, *bf16 = claims(runs)
    seeds = [r["seed"] for r in runs if r.get("precision", "float32") == "float32"]
    lines = [f"# Quick start: `kode train {MODEL}` on {DATASET}", "",
             *run_record.page_header(record), "",
             f"Test accuracy over seeds {', '.join(map(str, seeds))}: mean "
             f"{acc['value']:.2f}%, from {acc['low']:.2f}% to {acc['high']:.2f}%. One process "
             f"takes {wall['value']:.0f} s (median; {wall['low']:.0f}–{wall['high']:.0f} s), "
             "including TensorFlow's start-up.", ""]
    if bf16:
        c = bf16[0]
        lines += [f"With `--precision mixed_bfloat16`: mean {c['value']:.2f}% (from "
                  f"{c['low']:.2f}% to {c['high']:.2f}%); target: {c['target']}: "
                  f"**{c['verdict']}**.", ""]
    lines += ["| seed | precision | test accuracy | wall time |", "|---:|---|---:|---:|"]
    lines += [f"| {r['seed']} | {r.get('precision', 'float32')} | "
              f"{100 * r['test_accuracy']:.2f}% | {r['wall_s']:.0f} s |" for r in runs]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--out", default="docs", help="directory for quickstart.md and .json")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    record = run_record.start_record(
        "python -m benchmarks.quickstart" + ("" if not given else " " + shlex.join(given)),
        args.allow_load)
    with tempfile.TemporaryDirectory() as workdir:
        runs = [run_seed(seed, Path(workdir), precision)
                for precision in args.precisions for seed in args.seeds]
    run_record.finish_record(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_record.write_page(out / PAGE, page(record, runs))
    run_record.write_record(out / PAGE, record, runs, claims(runs))
    print(f"wrote {out / PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
