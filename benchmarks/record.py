"""Where a benchmark's numbers come from: the run record every result page starts with, and
the JSON written beside the page (``docs/X.md`` → ``docs/X.json``) from which the README's
results table is generated (:mod:`benchmarks.readme_results`).

A run starts with :func:`start_record` (before any work: it refuses a loaded machine unless
``--allow-load``), ends with :func:`finish_record`; its page begins with
:func:`page_header` and :func:`write_record` stores the command, date, machine, load, the raw
results and the page's headline *claims*::

    {"command", "date", "machine", "cores", "load_before", "load_after", "allow_load",
     "results": <the benchmark's raw results>,
     "claims": [{"id", "claim", "value", "low", "high", "unit", "target", "verdict", "page"}]}
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

#: A run is "under load" when its 1-minute load average at start exceeds this per core.
LOAD_PER_CORE = 0.5
VERDICTS = ("met", "missed", "not decided", "measured")
CLAIM_KEYS = ("id", "claim", "value", "low", "high", "unit", "target", "verdict", "page")


@dataclasses.dataclass
class RunRecord:
    """How a result was made: command line, UTC date (ISO 8601), machine, cores, the
    1-minute load average before (at start) and after the run, and whether ``--allow-load``
    let it run on a loaded machine."""

    command: str
    date: str
    machine: str
    cores: int
    load_before: float
    load_after: float | None = None
    allow_load: bool = False
    #: the worst ``others_cpu`` of the run's measurements (benchmarks.harness.quiet), where
    #: the benchmark records it
    others_cpu: float | None = None

    @property
    def threshold(self) -> float:
        return LOAD_PER_CORE * self.cores

    @property
    def under_load(self) -> bool:
        """Other processes used more than ``QUIET`` of the machine during a measurement, or
        (where that is not recorded) the load at start exceeded :data:`LOAD_PER_CORE` per
        core."""
        if self.others_cpu is not None:
            from benchmarks.harness.quiet import QUIET

            return self.others_cpu > QUIET
        return self.load_before > self.threshold

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def machine_description() -> str:
    """CPU, cores, memory, OS and library versions of this machine, in one line."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import keras
    import tensorflow as tf

    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"`nproc` = {nproc}, `{model}` (/proc/cpuinfo model name), {mem_gb:.0f} GiB RAM, "
            f"no GPU; Linux {platform.release()}, glibc {platform.libc_ver()[1]}, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__} (oneDNN on), "
            f"Keras {keras.__version__}")


def cores() -> int:
    """The cores this process may run on (what ``nproc`` says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _prog(command: str) -> str:
    words = command.split()
    if words[:2] == ["python", "-m"] and len(words) > 2:
        return words[2]
    if words[:1] == ["kode"] and len(words) > 1:
        return " ".join(words[:2])
    return words[0] if words else "benchmark"


def start_record(command: str, allow_load: bool, *, load: float | None = None,
                 prog: str | None = None) -> RunRecord:
    """The record of a run that starts now; call it before any work.

    ``load`` (default: ``os.getloadavg()[0]`` now) above :data:`LOAD_PER_CORE` per core stops
    the run with one line unless ``allow_load`` (the page will then say so). A page written
    from earlier runs' results (``--merge``) passes their highest load at start.
    """
    n = cores()
    load = os.getloadavg()[0] if load is None else float(load)
    if load > LOAD_PER_CORE * n and not allow_load:
        raise SystemExit(
            f"{prog or _prog(command)}: load average {load:.2f} on {n} cores is above "
            f"{LOAD_PER_CORE:g} per core: the machine is not quiet; rerun when it is, or pass "
            "--allow-load (the page will say so)")
    return RunRecord(command=command, date=datetime.now(timezone.utc).isoformat(
        timespec="seconds"), machine=machine_description(), cores=n, load_before=load,
        allow_load=allow_load)


def merged_start_load(results: list[dict]) -> float | None:
    """The highest load at the start of the runs whose per-process ``results`` are merged: a
    run's load at start is its first process's (``load_at_start``); later processes start on
    a machine the run itself loads, so their loads say nothing about other jobs."""
    first: dict = {}
    for r in results:
        if "load_at_start" in r:
            first.setdefault(r.get("command"), r["load_at_start"])
    return max(first.values(), default=None)


def finish_record(record: RunRecord, load: float | None = None) -> RunRecord:
    """Set the load after the run (default: ``os.getloadavg()[0]`` now); returns ``record``."""
    record.load_after = os.getloadavg()[0] if load is None else float(load)
    return record


def under_load_line(record: RunRecord) -> str:
    if record.others_cpu is not None:
        return (f"**Measured while other processes used {record.others_cpu:.2f} of the "
                "machine: these numbers are not evidence.**")
    return (f"**Measured under load ({record.load_before:.2f} on {record.cores} cores): these "
            "numbers are not evidence about speed.**")


def page_header(record: RunRecord) -> list[str]:
    """The first lines of a result page: the warning when the run was under load, then
    command, date, machine and load."""
    after = "not recorded" if record.load_after is None else f"{record.load_after:.2f}"
    lines = [under_load_line(record), ""] if record.under_load else []
    return lines + [
        f"- Command: `{record.command}`",
        f"- Date (UTC): {record.date}",
        f"- Machine: {record.machine}",
        f"- Load: 1-minute load average {record.load_before:.2f} at the start and {after} at "
        f"the end, on {record.cores} cores (quiet: ≤ {record.threshold:.2f}"
        + (", run with --allow-load" if record.allow_load else "") + ")",
    ] + ([f"- others_cpu: {record.others_cpu:.3f} (the largest share of the machine that "
          "processes outside the benchmark used during one of its measurements; evidence "
          "only ≤ 0.10)"] if record.others_cpu is not None else [])


def claims_table(claims: list[dict]) -> list[str]:
    """A page's claims as a Markdown table: claim | value | target | verdict."""
    return ["| claim | value | target | verdict |", "|---|---:|---|---|"] + [
        f"| {c['claim']} | {c['value']:.3f} {c['unit']} | {c['target']} | {c['verdict']} |"
        for c in claims]


def check_out_folder(parser, out: str) -> None:
    """A page's folder must exist before anything is measured (argparse error otherwise)."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        parser.error(f"--out {out}: its folder does not exist")


def normalize_verdict(verdict: str) -> str:
    """One of :data:`VERDICTS` from a page's verdict text ("missed by 7–14%" → "missed")."""
    text = verdict.strip("* ").lower()
    for v in VERDICTS:
        if text.startswith(v):
            return v
    raise ValueError(f"verdict {verdict!r} is none of {', '.join(VERDICTS)}")


def claim(id: str, text: str, value: float, *, unit: str, page: str, low: float | None = None,
          high: float | None = None, target: str | None = None, verdict: str = "measured"
          ) -> dict:
    """One claim of a page, in the JSON layout (the verdict normalized)."""
    return {"id": id, "claim": text, "value": None if value is None else float(value),
            "low": None if low is None else float(low),
            "high": None if high is None else float(high), "unit": unit, "target": target,
            "verdict": normalize_verdict(verdict), "page": page}


def agreeing_verdict(values, limit: float) -> str:
    """The verdict on a ceiling ``limit`` from several measures of one quantity (e.g. a
    process's peak RSS and its allocator peak): "met" when every value is ≤ limit, "missed"
    when every value is above it, "not decided" when they disagree, "not measured" when one is
    missing (None or NaN). Used where one process per configuration leaves the agreement of
    the measures as the only check of their spread."""
    values = list(values)
    if not values or any(v is None or v != v for v in values):  # v != v: NaN
        return "not measured"
    if max(values) <= limit:
        return "met"
    if min(values) > limit:
        return "missed"
    return "not decided"


def check_claims(claims: list[dict]) -> None:
    """ValueError unless every claim has the layout's keys, a known verdict and a unique id."""
    seen = set()
    for c in claims:
        missing = [k for k in CLAIM_KEYS if k not in c]
        if missing:
            raise ValueError(f"claim {c.get('id')!r} lacks {', '.join(missing)}")
        if c["verdict"] not in VERDICTS:
            raise ValueError(f"claim {c['id']!r}: verdict {c['verdict']!r}")
        if c["id"] in seen:
            raise ValueError(f"claim id {c['id']!r} twice")
        seen.add(c["id"])


def record_path(page_path: str | os.PathLike) -> Path:
    """The JSON beside a page: same directory and stem, ``.json``."""
    return Path(page_path).with_suffix(".json")


def write_record(page_path: str | os.PathLike, record: RunRecord, results, claims: list[dict]
                 ) -> Path:
    """Write ``<page>.json`` atomically (temporary name, fsync, rename) and return its path."""
    from kode.io import write_json  # imports TensorFlow: only when writing

    check_claims(claims)
    path = record_path(page_path)
    write_json(str(path), {**record.to_dict(), "results": results, "claims": claims}, indent=1)
    return path


def write_page(path: str | os.PathLike, lines: list[str]) -> Path:
    """Write a Markdown page atomically (temporary name, fsync, rename)."""
    from kode.io import atomic_open

    with atomic_open(str(path)) as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return Path(path)


def page_of(page_path: str | os.PathLike) -> str:
    """How claims name a page: ``docs/<name>`` (pages live in docs/, wherever --out was)."""
    return f"docs/{Path(page_path).name}"


def add_allow_load(parser) -> None:
    parser.add_argument("--allow-load", action="store_true",
                        help="run even when the 1-minute load average exceeds "
                        f"{LOAD_PER_CORE:g} per core (the page then says it was measured "
                        "under load)")
