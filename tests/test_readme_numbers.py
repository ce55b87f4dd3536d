"""Every measured number in the README comes from a generated source.

(a) The results table between the markers is what ``python -m benchmarks.readme_results``
    renders from the JSON files in docs/ (written by the benchmarks beside their pages).
(b) Elsewhere (outside fenced code blocks) the README states no measured number: no decimal
    number followed by a unit of measurement, unless the phrase is in ALLOWED with the reason
    it is not a measurement.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import readme_results  # noqa: E402

#: A number (1, 1.5, 2,194, .5) followed by a unit of measurement. A bound (≤ 1.8×, ≥ 97%,
#: < 10 min) is a target, not a measurement; × or x followed by a digit is a dimension
#: (32×32, 8 × 8) or a refinement (×2), not a multiplier.
NUMBER = r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
UNIT = (r"(?:×(?!\s*\d)|x(?![\w\d])|%|MB\b|MiB\b|GB\b|GiB\b|KB\b|KiB\b|img/s\b|images/s\b|"
        r"GFLOP/s\b|ms\b|s\b|sec(?:onds?)?\b|min(?:utes?)?\b|h\b|hours?\b)")
MEASURED = re.compile(rf"(?<![≤≥<>]\s)(?<![≤≥<>])(?<!\d)(?<![\d.,])({NUMBER}\d?)\s?{UNIT}")

#: Phrases with a number and a unit that are not measurements: regular expression → reason.
ALLOWED: dict[str, str] = {
    r"95% (?:bootstrap )?(?:confidence )?intervals?": "a confidence level, not a measurement",
    r"bootstrap 95%": "a confidence level, not a measurement",
    r"÷10 at 50% and 75% of \d+ epochs": "a learning-rate schedule (a setting)",
}


def _is_number(token: str) -> bool:
    return any(ch.isdigit() for ch in token)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and without the generated results block (their
    lines become empty, so line numbers stay)."""
    out, fenced, generated = [], False, False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
            out.append("")
            continue
        if stripped == readme_results.BEGIN:
            generated = True
        if fenced or generated:
            out.append("")
        else:
            out.append(line)
        if stripped == readme_results.END:
            generated = False
    return "\n".join(out)


def measured_numbers(text: str) -> list[str]:
    """``line N: token`` for every measured number outside code and the generated block."""
    found = []
    for number, line in enumerate(prose(text).splitlines(), 1):
        for pattern in ALLOWED:
            line = re.sub(pattern, " ", line)
        for match in MEASURED.finditer(line):
            if _is_number(match.group(1)):
                found.append(f"line {number}: {match.group(0).strip()}")
    return found


def test_the_results_block_is_generated_from_the_docs_json():
    text = (ROOT / "README.md").read_text()
    assert readme_results.BEGIN in text and readme_results.END in text, (
        "README.md lacks the results markers")
    assert readme_results.block(text) == readme_results.render(
        ROOT / "docs", also=readme_results.README_ALSO), (
        "the README's results table is stale: run python -m benchmarks.readme_results")


def test_the_readme_states_no_measured_number_outside_the_generated_block():
    found = measured_numbers((ROOT / "README.md").read_text())
    assert not found, ("measured numbers without a source (put them in a benchmark's claims, "
                       "or allow the phrase with its reason in ALLOWED): " + "; ".join(found))


@pytest.mark.parametrize("line, tokens", [
    ("The adjoint costs 1.39× [0.87, 1.69] of backprop.", ["1.39×"]),
    ("measured 98.9% with seed 0", ["98.9%"]),
    ("+30 MB with adjoint vs +2,194 MB and 11.8 GB", ["30 MB", "2,194 MB", "11.8 GB"]),
    ("about 1 minute of training, 15 s per epoch, 2x faster, 312 img/s",
     ["1 minute", "15 s", "2x", "312 img/s"]),
    ("XLA was 2–6× slower", ["6×"]),
    ("target ≤ 1.8×, ≥ 97% test accuracy, < 10 min", []),
    ("8×8 digits, 32 × 32 × 3, ×2 refined, 32x4d, tolerance 1e-5, lr 0.1, 100 steps", []),
    ("bootstrap 95% intervals; lr ÷10 at 50% and 75% of 160 epochs", []),
])
def test_the_check_catches_measured_numbers_and_spares_the_rest(line, tokens):
    assert [f.split(": ", 1)[1] for f in measured_numbers(line)] == tokens


def test_a_stray_number_in_a_readme_fails_but_code_and_the_block_do_not():
    readme = "\n".join([
        "# kode", "", "```bash", "kode train  # ≈ 15 min", "```", "",
        readme_results.BEGIN, "| speed | 1.25× | ≥ 1.2× | met |", readme_results.END, "",
        "Training reaches 98.9% on digits.",
    ])
    assert measured_numbers(readme) == ["line 11: 98.9%"]
