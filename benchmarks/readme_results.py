"""The README's results table, generated from the JSON files the benchmarks write beside
their pages (:mod:`benchmarks.record`).

    python -m benchmarks.readme_results [--readme README.md] [--docs docs]

rewrites the lines between :data:`BEGIN` and :data:`END` in the README. A JSON contributes
its ``claims`` with its own run record (``docs/performance.json``, ...), or, for
``docs/results.json`` (one entry per experiment), each entry's ``claims`` with that entry's
``record``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.record import RunRecord

BEGIN = "<!-- results:begin (python -m benchmarks.readme_results) -->"
END = "<!-- results:end -->"
#: The README lists the claims that have a target, and those its prose points to (the quick
#: start's accuracy and time); every value is on its page.
README_ALSO = ("quickstart.accuracy", "quickstart.wall")
HEADER = ["| claim | measured | target | verdict | others' CPU share, else load at start | page |",
          "|---|---:|---|---|---:|---|"]


def _number(x: float | None) -> str:
    if x is None:
        return "—"
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.1f}"


def _measured(c: dict) -> str:
    unit = c["unit"] or ""
    sep = "" if unit in ("×", "%") else " "
    text = f"{_number(c['value'])}{sep}{unit}".rstrip()
    if c["low"] is not None or c["high"] is not None:
        text += f" [{_number(c['low'])}, {_number(c['high'])}]"
    return text


def claims_with_records(doc: dict) -> list[tuple[dict, RunRecord]]:
    """Every claim of one JSON with the record of the run that made it."""
    if "claims" in doc:
        record = RunRecord.from_dict(doc)
        return [(c, record) for c in doc["claims"]]
    return [(c, RunRecord.from_dict(entry["record"])) for entry in doc.values()
            if isinstance(entry, dict) and "record" in entry for c in entry.get("claims", [])]


def collect(docs_dir: str | Path) -> list[tuple[dict, RunRecord]]:
    """The claims of every ``<docs_dir>/*.json`` that has any, sorted by page then id."""
    rows = []
    for path in sorted(Path(docs_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"readme_results: {path} is not valid JSON ({err})") from None
        if isinstance(doc, dict):
            rows += claims_with_records(doc)
    return sorted(rows, key=lambda row: (row[0]["page"], row[0]["id"]))


def render(docs_dir: str | Path = "docs", also: tuple[str, ...] | None = None) -> str:
    """The Markdown table (no markers): claim | measured (value [low, high]) | target |
    verdict | others_cpu (the largest share of the machine other processes used during a
    measurement), or for runs that did not record it the 1-minute load at start | link to
    the page; a run under load shows its load in bold
    and "under load" in the verdict. Every claim, or with ``also`` only the claims that have
    a target and those whose id is in ``also`` (the README's table; the other measured values
    stay on their pages)."""
    lines = list(HEADER)
    for c, record in collect(docs_dir):
        if also is not None and c["verdict"] == "measured" and c["id"] not in also:
            continue
        load = (f"others_cpu {record.others_cpu:.3f}" if record.others_cpu is not None
                else f"{record.load_before:.2f} / {record.cores} cores")
        verdict = c["verdict"]
        if record.under_load:
            load, verdict = f"**{load}**", f"{verdict}, under load"
        page = c["page"]
        lines.append(f"| {c['claim']} | {_measured(c)} | {c['target'] or '—'} | {verdict} | "
                     f"{load} | [{Path(page).name}]({page}) |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """``text`` with the lines between the markers replaced by ``table``; ValueError (one
    line) when the markers are missing, repeated or out of order."""
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"the README needs exactly one '{BEGIN}' line followed by one "
                         f"'{END}' line")
    return "\n".join([*lines[:begins[0] + 1], table, *lines[ends[0]:]])


def block(text: str) -> str:
    """The lines between the markers (without them)."""
    lines = text.split("\n")
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    return "\n".join(lines[begin + 1:end])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the README's results table.")
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    try:
        text = replace_block(Path(args.readme).read_text(),
                             render(args.docs, also=README_ALSO))
    except (OSError, ValueError) as err:
        print(f"readme_results: {args.readme}: {err}", file=sys.stderr)
        return 1
    from kode.io import atomic_open  # temporary name, fsync, rename

    with atomic_open(args.readme) as f:
        f.write(text)
    print(f"rewrote the results table of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
