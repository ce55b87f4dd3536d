"""The tree's architecture holds: imports run one way (import-linter contracts), the library
never reaches into the benchmarks or changes sys.path, every private Keras/TensorFlow API is
used through kode.compat, and modules stay small."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from kode import compat

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([*LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _copy_tree(tmp_path: Path) -> Path:
    for package in ("kode", "zoo"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("kode/layers/stage.py", "import zoo", "kode.layers.stage -> zoo"),
    ("kode/tools/guard.py", "import kode.training.pipeline",
     "kode.tools.guard -> kode.training.pipeline"),
    ("zoo/builder.py", "import kode.serving.export", "zoo.builder -> kode.serving.export"),
    ("kode/serving/export.py", "import benchmarks", "kode.serving.export -> benchmarks"),
    ("kode/errors.py", "import kode.layers", "kode.errors -> kode.layers"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path, module, line, broken):
    tree = _copy_tree(tmp_path)
    if broken.endswith("benchmarks"):
        (tree / "benchmarks").mkdir()
        (tree / "benchmarks" / "__init__.py").write_text("")
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout[-3000:]


def test_only_test_modules_are_exempt_from_the_layers():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for contract in config["contracts"]:
        for rule in contract.get("ignore_imports", []):
            importer = rule.split("->")[0].strip()
            assert importer.rsplit(".", 1)[-1].endswith("_test"), rule


def _library_modules():
    for package in ("kode", "zoo"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith("_test.py"):
                yield path


def test_library_code_never_changes_sys_path():
    offenders = []
    for path in _library_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_private_framework_apis_are_used_only_through_kode_compat():
    offenders = []
    for path in _library_modules():
        if path.name == "compat.py":
            continue
        text = path.read_text()
        for private in ("keras.src", "tensorflow.python", "tf.__internal__", "_flatten_layers",
                        "_inbound_nodes", "_keras_history"):
            if private in text:
                offenders.append(f"{path.relative_to(ROOT)}: {private}")
    assert not offenders, offenders


def test_every_private_api_kode_uses_still_works():
    assert compat.missing_private_apis() == []


def test_a_private_api_removed_by_an_upgrade_is_named(monkeypatch):
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    missing = compat.missing_private_apis()
    assert len(missing) == 1
    assert missing[0].startswith("keras.layers.Layer._flatten_layers: finding a model's")


def test_modules_stay_small_or_say_why():
    too_long = []
    for path in _library_modules():
        text = path.read_text()
        if text.count("\n") > 450 and "450 lines" not in (ast.get_docstring(ast.parse(text))
                                                           or ""):
            too_long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not too_long, too_long


def test_the_documented_top_level_names_stay():
    import kode
    import zoo

    for name in ("train", "finetune", "tune", "port_model", "export_model", "predict_files",
                 "load_dataset", "check_gradients", "set_gradient_mode", "IntegratorStage",
                 "TransitionBlock", "BasicBlock", "Bottleneck", "LayerChain", "get_integrator",
                 "KodeError"):
        assert callable(getattr(kode, name)), name
    for name in ("create_model", "list_models", "list_families", "port_model"):
        assert callable(getattr(zoo, name)), name
