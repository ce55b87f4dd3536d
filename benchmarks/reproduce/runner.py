"""Run the experiments of :mod:`benchmarks.reproduce`, each in its own process, and write
``docs/results.md`` from their results.

``python -m benchmarks.reproduce [--quick] [--only NAME ...] [--seeds S ...] [--out DIR]``
(``kode reproduce`` is the same command). Raw results are kept in ``<out>/results.json``, so
``--only`` re-runs some experiments and the document keeps the others' last results, each
section stating the command, seeds and date of the run that produced it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import record as run_record
from benchmarks.reproduce import EXPERIMENTS
from benchmarks.reproduce.claims import experiment_claims
from benchmarks.reproduce.common import Context

ROOT = Path(__file__).resolve().parents[2]
QUICK_SEEDS, FULL_SEEDS = [0, 1], [0, 1, 2]


def experiment_module(name: str):
    return importlib.import_module(f"benchmarks.reproduce.{name}")


def run_worker(name: str, quick: bool, seeds: list[int], out: Path, command: str,
               result_path: Path) -> None:
    """Run one experiment in this process and write its result JSON (the child's job)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(name=name, quick=quick, seeds=seeds, out=out, command=command)
    result = experiment_module(name).run(ctx)
    result_path.write_text(json.dumps(result, indent=1, default=float))


def _spawn(name: str, args, command: str) -> dict:
    """One experiment in a fresh process; its progress lines pass through as they come."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "benchmarks.reproduce", "--worker", name,
                "--result", str(result_path), "--out", str(args.out),
                "--command", command, "--seeds", *map(str, args.seeds)]
        if args.quick:
            argv.append("--quick")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        start = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - start
        entry = {"command": command, "seeds": args.seeds, "quick": args.quick,
                 "wall_s": wall, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        if proc.returncode == 0 and result_path.exists():
            return {**entry, "result": json.loads(result_path.read_text())}
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-5:]
        sys.stderr.write("\n".join(tail) + "\n")
        return {**entry, "error": f"exit {proc.returncode}: " + " | ".join(tail[-2:])}


def _section(index: int, name: str, entry: dict | None) -> list[str]:
    try:
        module = experiment_module(name)
    except ModuleNotFoundError:  # a checkout from before the experiment existed
        return [f"## {index}. {name}", "", "Not available in this checkout.", ""]
    lines = [f"## {index}. {module.TITLE}", ""]
    if entry is None or "result" not in entry and "error" not in entry:
        return lines + ["Not run yet: `kode reproduce --only " + name + "`.", ""]
    seeds = ", ".join(str(s) for s in entry["seeds"])
    lines += [f"*Run {entry['date']} by `{entry['command']}` · seeds {seeds} · "
              f"{entry['wall_s'] / 60:.1f} min.*", ""]
    if "record" in entry:
        record = run_record.RunRecord.from_dict(entry["record"])
        lines += [*([run_record.under_load_line(record)] if record.under_load else []),
                  f"*Load average {record.load_before:.2f} at the start on {record.cores} "
                  "cores.*", ""]
    if "error" in entry:
        return lines + [f"**This run failed**: {entry['error']}", ""]
    return lines + module.report(entry["result"]) + [""]


def write_document(store: dict, out: Path) -> Path:
    """Render ``<out>/results.md`` from the stored results of every experiment."""
    import kode  # noqa: F401  (imports TensorFlow without its start-up banner)
    from benchmarks.gradient_memory import machine_description

    lines = [*header(store),
        "# Reproducing the papers",
        "",
        "Lu et al. (ICML 2018, LM-ResNet) and Sander, Ablin, Peyré (NeurIPS 2022, the "
        "memory-free adjoint and Heun) make claims that this page checks on data and "
        "hardware available here. Everything below, numbers and figures, is written by "
        "`kode reproduce` (`--quick`: the reduced sweep, under 10 minutes on 2 CPU cores; "
        "without it: the full sweep, which prints its progress). Formulas and published "
        "numbers: [reference.md](reference.md). Where a result disagrees with a paper the "
        "section says so.",
        "",
        f"Machine of the last run: {machine_description()}.",
        "",
    ]
    for i, name in enumerate(EXPERIMENTS, 1):
        lines += _section(i, name, store.get(name))
    return run_record.write_page(out / "results.md", lines)


def header(store: dict) -> list[str]:
    """The page's first lines: the record of the latest experiment run (its header), and a
    warning naming every other kept experiment that ran under load."""
    runs = {name: run_record.RunRecord.from_dict(store[name]["record"]) for name in EXPERIMENTS
            if "record" in store.get(name, {})}
    if not runs:
        return []
    latest = max(runs, key=lambda name: runs[name].date)
    loaded = [f"{name} ({r.load_before:.2f} on {r.cores} cores)" for name, r in runs.items()
              if r.under_load and name != latest]
    return [*run_record.page_header(runs[latest]), *(
        ["", "**Measured under load: " + ", ".join(loaded) + "; these numbers are not evidence "
         "about speed.**"] if loaded else []), ""]


def record_entry(entry: dict, record: run_record.RunRecord, name: str) -> dict:
    """``entry`` with the run's record and the experiment's claims (none if it failed)."""
    claims = experiment_claims(name, entry["result"]) if "result" in entry else []
    run_record.check_claims(claims)
    return {**entry, "record": record.to_dict(), "claims": claims}


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="kode reproduce",
        description="Run the papers' experiments and regenerate docs/results.md.")
    parser.add_argument("--quick", action="store_true",
                        help="reduced sweep: under 10 minutes on a 2-core CPU")
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, metavar="NAME",
                        help=f"run only these ({', '.join(EXPERIMENTS)})")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help=f"seeds (default {QUICK_SEEDS} with --quick, else {FULL_SEEDS})")
    parser.add_argument("--out", default=str(ROOT / "docs"),
                        help="directory for results.md, results.json and the figures")
    parser.add_argument("--render", action="store_true",
                        help="rewrite results.md from the stored results.json, run nothing")
    run_record.add_allow_load(parser)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--command", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, parser_class=argparse.ArgumentParser) -> int:
    """Run the experiments (all, or ``--only``) and rewrite results.md; 1 if one failed."""
    args = build_parser(parser_class).parse_args(argv)
    args.seeds = args.seeds or (QUICK_SEEDS if args.quick else FULL_SEEDS)
    args.out = Path(args.out).resolve()
    if args.worker:
        run_worker(args.worker, args.quick, args.seeds, args.out, args.command,
                   Path(args.result))
        return 0

    if importlib.util.find_spec("matplotlib") is None:
        parser_class(prog="kode reproduce").error(
            "the figures need matplotlib: pip install -e '.[bench]'")
    given = sys.argv[1:] if argv is None else argv
    command = "kode reproduce" + ("" if not given else " " + shlex.join(given))
    store_path = args.out / "results.json"
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    names = [] if args.render else list(args.only or EXPERIMENTS)
    if names:  # before any work: refuse a loaded machine unless --allow-load
        run_record.start_record(command, args.allow_load)
    started, failed = time.monotonic(), []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)} {time.monotonic() - started:5.0f}s] {name}: "
              f"{experiment_module(name).TITLE}", flush=True)
        # Each experiment's own record: its load at start (the first one's was checked).
        record = run_record.start_record(command, True)
        record.allow_load = args.allow_load
        entry = _spawn(name, args, command)
        store[name] = record_entry(entry, run_record.finish_record(record), name)
        args.out.mkdir(parents=True, exist_ok=True)
        from kode.io import write_json

        write_json(str(store_path), store, indent=1)
        status = "failed: " + entry["error"] if "error" in entry else "done"
        print(f"[{i}/{len(names)} {time.monotonic() - started:5.0f}s] {name} {status} "
              f"({entry['wall_s']:.0f} s)", flush=True)
        if "error" in entry:
            failed.append(name)
    path = write_document(store, args.out)
    print(f"wrote {path} ({(time.monotonic() - started) / 60:.1f} min)"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
