"""The README is a user's guide that stays true: its set-up commands are the ones CI runs, its
zoo table is the registry, and its fine-tuning example runs as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_commands():
    return [line for line in README.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "kode train lm_resnet20" in commands[0]
    assert "pytest" in commands[1] and "lint-imports" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def _zoo_table() -> dict[str, set[str]]:
    """family → the names its README row lists (``CIFAR: 20 32`` / ``ImageNet: …`` are depths
    after the family name; backticked names are names)."""
    section = README.split("## The zoo", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        family, names = cells[0].strip("`"), set(re.findall(r"`([a-z0-9_]+)`", cells[2]))
        for part in re.findall(r"(?:CIFAR|ImageNet): ([0-9v ]+)", cells[2]):
            names.update(f"{family}{depth}" for depth in part.split())
        rows[family] = names
    return rows


def test_the_zoo_table_lists_exactly_the_registry():
    import zoo

    rows = _zoo_table()
    registered: dict[str, set[str]] = {}
    for name in zoo.list_models():
        registered.setdefault(zoo.get_entry(name).family, set()).add(name)
    assert rows == registered
    count = int(re.search(r"lists (\d+) names", README).group(1))
    assert count == len(zoo.list_models())


def test_the_zoo_table_check_catches_a_missing_name(monkeypatch):
    import zoo

    real = zoo.list_models
    monkeypatch.setattr(zoo, "list_models", lambda *a, **k: [*real(*a, **k), "resnet2000"])
    monkeypatch.setattr(zoo, "get_entry", lambda name, _get=zoo.get_entry: _get(
        "resnet20" if name == "resnet2000" else name))
    try:
        test_the_zoo_table_lists_exactly_the_registry()
    except AssertionError:
        return
    raise AssertionError("a registered name missing from the README table went unnoticed")


def test_the_fine_tuning_example_runs_as_written(tmp_path, monkeypatch, capsys):
    block = README.split("## Fine-tune your own Keras model", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (fine-tuning example)", "exec"), {})
    out = capsys.readouterr().out
    assert "grad rel err" in out and "whole model" in out  # the guard's table was printed
