"""Run records, the JSON beside a page and the README's results table (benchmarks/record.py,
benchmarks/readme_results.py): fake loads, fake claims, temporary directories."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import readme_results, record


@pytest.fixture(autouse=True)
def _two_cores(monkeypatch):
    monkeypatch.setattr(record, "cores", lambda: 2)
    monkeypatch.setattr(record, "machine_description", lambda: "test machine")


def _load(monkeypatch, value):
    monkeypatch.setattr(os, "getloadavg", lambda: (value, 0.0, 0.0))


def test_start_refuses_a_loaded_machine_in_one_line(monkeypatch, capsys):
    _load(monkeypatch, 1.37)
    with pytest.raises(SystemExit) as stop:
        record.start_record("python -m benchmarks.throughput --paired", allow_load=False)
    message = str(stop.value)
    assert message == (
        "benchmarks.throughput: load average 1.37 on 2 cores is above 0.5 per core: the "
        "machine is not quiet; rerun when it is, or pass --allow-load (the page will say so)")
    assert "\n" not in message


def test_start_accepts_a_quiet_machine_or_allow_load(monkeypatch):
    _load(monkeypatch, 1.0)  # exactly 0.5 per core: quiet
    quiet = record.start_record("kode reproduce --quick", allow_load=False)
    assert (quiet.load_before, quiet.cores, quiet.allow_load) == (1.0, 2, False)
    assert not quiet.under_load and quiet.machine == "test machine"
    _load(monkeypatch, 3.5)
    loaded = record.start_record("kode reproduce --quick", allow_load=True)
    assert loaded.under_load and loaded.allow_load and loaded.load_after is None
    _load(monkeypatch, 4.25)
    assert record.finish_record(loaded).load_after == 4.25
    # a page written from earlier runs (--merge) is judged by their load, not today's
    with pytest.raises(SystemExit, match="kode reproduce: load average 2.50"):
        record.start_record("kode reproduce", allow_load=False, load=2.5)


def _record(load_before, allow_load=False, load_after=0.4):
    return record.RunRecord(command="python -m benchmarks.x --allow-load", date="2026-12-02T06:00"
                            ":00+00:00", machine="test machine", cores=2,
                            load_before=load_before, load_after=load_after,
                            allow_load=allow_load)


@pytest.mark.parametrize("load, after, warned", [(0.2, 0.4, False), (1.0, 0.4, False),
                                                 (0.3, 5.0, False), (1.01, 0.4, True),
                                                 (7.5, 0.4, True)])
def test_page_header_says_measured_under_load_exactly_above_the_threshold(load, after, warned):
    # The load at start decides (the run's own work raises the load after it).
    lines = record.page_header(_record(load, allow_load=warned, load_after=after))
    text = "\n".join(lines)
    assert ("Measured under load" in text) is warned
    if warned:
        assert lines[0] == (f"**Measured under load ({load:.2f} on 2 cores): these numbers are "
                            "not evidence about speed.**")
    assert "`python -m benchmarks.x --allow-load`" in text and "test machine" in text
    assert f"{load:.2f} at the start and {after:.2f} at the end, on 2 cores" in text


def _claim(id="a.b", verdict="met", page="docs/x.md", **kw):
    return record.claim(id, f"claim {id}", kw.pop("value", 1.25), unit=kw.pop("unit", "×"),
                        page=page, verdict=verdict, **kw)


def test_claim_verdicts_are_normalized_and_checked():
    assert _claim(verdict="missed by 7–14%")["verdict"] == "missed"
    assert _claim(verdict="**met**")["verdict"] == "met"
    with pytest.raises(ValueError, match="verdict"):
        _claim(verdict="probably")
    with pytest.raises(ValueError, match="twice"):
        record.check_claims([_claim(), _claim()])


def test_write_record_round_trips_beside_the_page(tmp_path):
    page = tmp_path / "performance.md"
    claims = [_claim(low=1.1, high=1.4, target="≥ 1.2×")]
    path = record.write_record(page, _record(0.3), {"raw": [1.5, float("nan")]}, claims)
    assert path == tmp_path / "performance.json"
    data = json.loads(path.read_text())
    assert data == {"command": "python -m benchmarks.x --allow-load",
                    "date": "2026-12-02T06:00:00+00:00", "machine": "test machine", "cores": 2,
                    "load_before": 0.3, "load_after": 0.4, "allow_load": False,
                    "others_cpu": None, "results": {"raw": [1.5, None]}, "claims": claims}
    assert record.RunRecord.from_dict(data) == _record(0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.json"]


def test_others_cpu_decides_whether_a_page_was_quiet():
    quiet, busy = _record(1.9), _record(0.1)  # the load average says the opposite
    quiet.others_cpu, busy.others_cpu = 0.02, 0.3
    assert not quiet.under_load and busy.under_load
    assert record.page_header(busy)[0].startswith("**Measured while other processes used 0.30")
    assert any("others_cpu: 0.020" in line for line in record.page_header(quiet))


def test_a_failed_write_keeps_the_previous_record_and_leaves_no_temporary(tmp_path):
    page = tmp_path / "performance.md"
    record.write_record(page, _record(0.3), {"n": 1}, [_claim()])
    before = (tmp_path / "performance.json").read_text()
    with pytest.raises(TypeError):  # not JSON-able: fails while writing
        record.write_record(page, _record(0.3), {"n": object()}, [_claim()])
    with pytest.raises(ValueError):  # a bad claim: refused before writing
        record.write_record(page, _record(0.3), {"n": 2}, [{"id": "x"}])
    assert (tmp_path / "performance.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.json"]
    record.write_page(page, ["# Page", "text"])
    assert page.read_text() == "# Page\ntext\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["performance.json", "performance.md"]


def _docs(tmp_path):
    record.write_record(tmp_path / "zeta.md", _record(0.3), {}, [
        _claim("perf.speed", page="docs/zeta.md", low=1.1, high=1.4, target="≥ 1.2×"),
        _claim("perf.alpha", page="docs/zeta.md", value=2194.4, unit="MB",
               verdict="measured")])
    record.write_record(tmp_path / "alpha.md", _record(3.2, allow_load=True), {}, [
        _claim("alpha.time", page="docs/alpha.md", value=0.9333, verdict="not decided",
               target="≥ 0.95×")])
    store = {"exp": {"command": "kode reproduce", "result": {},
                     "record": _record(0.1).to_dict(),
                     "claims": [_claim("reproduce.exp.acc", page="docs/results.md", value=98.25,
                                       unit="%", verdict="measured")]},
             "old": {"command": "kode reproduce", "result": {}}}
    (tmp_path / "results.json").write_text(json.dumps(store))
    (tmp_path / "raw.json").write_text(json.dumps([{"not": "a record"}]))


def test_render_builds_the_table_from_every_json_with_claims(tmp_path):
    _docs(tmp_path)
    lines = readme_results.render(tmp_path).splitlines()
    assert lines[:2] == readme_results.HEADER
    assert lines[2:] == [
        "| claim alpha.time | 0.933× | ≥ 0.95× | not decided, under load | "
        "**3.20 / 2 cores** | [alpha.md](docs/alpha.md) |",
        "| claim reproduce.exp.acc | 98.2% | — | measured | 0.10 / 2 cores | "
        "[results.md](docs/results.md) |",
        "| claim perf.alpha | 2,194 MB | — | measured | 0.30 / 2 cores | [zeta.md](docs/zeta.md) |",
        "| claim perf.speed | 1.25× [1.1, 1.4] | ≥ 1.2× | met | 0.30 / 2 cores | "
        "[zeta.md](docs/zeta.md) |",
    ]


def test_main_rewrites_only_the_marked_block(tmp_path, capsys):
    _docs(tmp_path)
    readme = tmp_path / "README.md"
    before = "# kode\n\nText 1.\n\n" + readme_results.BEGIN + "\n| old |\n"
    after = readme_results.END + "\n\nMore text.\n"
    readme.write_text(before + after)
    assert readme_results.main(["--readme", str(readme), "--docs", str(tmp_path)]) == 0
    text = readme.read_text()
    table = readme_results.render(tmp_path, also=readme_results.README_ALSO)
    assert text == before.replace("| old |\n", "") + table + "\n" + after
    assert readme_results.block(text) == table
    assert "| — | measured |" not in table and "| met |" in table  # no row without a target
    kept = readme_results.render(tmp_path, also=("perf.alpha",))
    assert "| claim perf.alpha | 2,194 MB | — | measured |" in kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    readme.write_text("# kode\nno markers\n")
    assert readme_results.main(["--readme", str(readme), "--docs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and readme_results.BEGIN in err
    assert readme.read_text() == "# kode\nno markers\n"


def test_a_merged_pages_load_is_the_highest_load_at_the_start_of_its_runs():
    from benchmarks.record import merged_start_load

    results = [{"command": "a", "load_at_start": 0.8}, {"command": "a", "load_at_start": 1.9},
               {"command": "b", "load_at_start": 0.6}, {"command": "b", "load_at_start": 1.7},
               {"command": "b"}]
    assert merged_start_load(results) == 0.8
    assert merged_start_load([{"command": "c", "load_at_start": 3.0}, *results]) == 3.0
    assert merged_start_load([{"command": "a"}]) is None
