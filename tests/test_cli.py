"""The ``kode`` command end to end: train → export → verify → predict, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

KODE = [sys.executable, "-m", "kode.cli"]


def run(*args, cwd=None):
    return subprocess.run([*KODE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    result = run("train", "lm_resnet20", "--epochs", "2", "--option", "depth=8",
                 "--logdir", str(root / "logs"), "--export", str(root / "saved_models"))
    assert result.returncode == 0, result.stderr
    return root, result


def test_train_writes_logs_metrics_model_and_verified_export(trained):
    root, result = trained
    assert "test: accuracy" in result.stdout
    assert "max |SavedModel − Keras| = " in result.stdout
    metrics = json.loads((root / "logs" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["config"]["dataset"] == "digits" and metrics["config"]["epochs"] == 2
    assert len(metrics["history"]["loss"]) == 2
    assert (root / "logs" / "model.keras").is_file()
    events = [f for _, _, files in os.walk(root / "logs") for f in files if "tfevents" in f]
    assert events, "TensorBoard event files missing"
    assert (root / "saved_models" / "lm_resnet20" / "1" / "saved_model.pb").is_file()


def test_export_never_overwrites_and_predict_classifies(trained, tmp_path):
    root, _ = trained
    model_file = str(root / "logs" / "model.keras")
    again = run("export", model_file, "--export-dir", str(root / "saved_models"))
    assert again.returncode == 0, again.stderr
    assert "lm_resnet20/2" in again.stdout
    refused = run("export", model_file, "--export-dir", str(root / "saved_models"),
                  "--version", "1")
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "Traceback" not in refused.stderr
    from kode.testing import image_serving_contract, serving_contract

    contract = image_serving_contract((8, 8, 1))  # the same for kode.train (test_serving.py)
    for version in ("1", "2"):  # kode train --export, kode export
        assert serving_contract(str(root / "saved_models" / "lm_resnet20" / version)) == contract

    from sklearn.datasets import load_digits

    digits = load_digits()
    files = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        files.append(str(path))
    predicted = run("predict", str(root / "saved_models" / "lm_resnet20" / "1"), *files)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[1] in "0123456789" for line in lines)

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    bad = run("predict", str(root / "saved_models" / "lm_resnet20" / "1"), str(text))
    assert bad.returncode == 2 and "notes.txt" in bad.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "lm_resnet21"], "did you mean lm_resnet20"),
        (["train", "resnet20", "--option", "depth=21"], "6n+2"),
        (["train", "resnet18"], ">= 32"),
        (["train", "resnet20", "--dataset", "imagenette"], "unknown dataset"),
        (["train", "resnet20", "--dataset", "cifar10", "--data-dir", "/tmp/kode-no-data"],
         "not prepared"),
        (["train", "resnet20", "--epochs", "0"], "epochs"),
        (["train", "resnet20", "--export", "/etc/passwd"], "not a directory"),
        (["export", "/nonexistent.keras"], "not a .keras model file"),
        (["predict", "/nonexistent", "x.png"], "SavedModel"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, words):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kode: error:"), result.stderr
    assert words in lines[0]


def test_corrupt_keras_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"garbage")
    result = run("export", str(bad), "--export-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "could not be loaded" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("saved_model.pb"))


def test_models_lists_the_zoo():
    result = run("models", "lm_resnet*")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert "lm_resnet20" in names and "lm_resnet110_sd" in names and "resnet20" not in names
