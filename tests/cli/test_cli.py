"""The ``kode`` command end to end: train → export → verify → predict, and one-line errors."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kode.cli import main

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


def _main(capsys, *args):
    """``kode ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_never_overwrites_and_predict_classifies(trained, tmp_path, capsys):
    root, _ = trained
    model_file = str(root / "logs" / "model.keras")
    code, out, err = _main(capsys, "export", model_file, "--export-dir",
                           str(root / "saved_models"))
    assert code == 0, err
    assert "lm_resnet20/2" in out
    code, out, err = _main(capsys, "export", model_file, "--export-dir",
                           str(root / "saved_models"), "--version", "1")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "already exists" in err
    from kode.testing.models import image_serving_contract, serving_contract

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
    savedmodel = str(root / "saved_models" / "lm_resnet20" / "1")
    code, out, err = _main(capsys, "predict", savedmodel, *files)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[1] in "0123456789" for line in lines)

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code, out, err = _main(capsys, "predict", savedmodel, str(text))
    assert code == 2 and out == "" and err.count("\n") == 1 and "notes.txt" in err


def test_bad_input_from_the_real_entry_point_is_one_line_on_stderr_and_exit_2():
    # A subprocess shows what only the real program does: its exit code, and that nothing
    # (TensorFlow's C++ start-up lines included) comes before the one line.
    result = run("train", "resnet20", "--dataset", "cifar10", "--data-dir", "/tmp/kode-no-data")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kode: error: ") and result.stderr.count("\n") == 1, (
        result.stderr)
    assert "not prepared" in result.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "lm_resnet21"], "did you mean lm_resnet20"),
        (["train", "resnet20", "--option", "depth=21"], "6n+2"),
        (["train", "resnet18"], ">= 32"),
        (["train", "lm_resnet20", "--gradient", "adjoint"], "needs a reversible integrator"),
        (["train", "resnet20", "--option", "include_top=false"],
         "option include_top is set by the training pipeline"),
        (["train", "resnet20", "--dataset", "imagenette"], "unknown dataset"),
        (["train", "resnet20", "--export", "/etc/passwd"], "not a directory"),
        (["finetune", "ResNet50V2", "--input-size", "16"], "height and width >= 32"),
        (["finetune", "ResNet50V2", "--freeze", "9"], "only 4 stages"),
        (["export", "/nonexistent.keras"], "'/nonexistent.keras' does not exist"),
        (["predict", "/nonexistent", "x.png"], "SavedModel"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(args, words, capsys, tmp_path):
    if args[0] in ("train", "finetune"):
        args = [*args, "--logdir", str(tmp_path / "run")]
    code, out, err = _main(capsys, *args)
    assert code == 2
    assert out == "", out  # refused before anything is printed (the devices line)
    assert err.count("\n") == 1 and err.startswith("kode: error:"), err
    assert words in err
    assert not (tmp_path / "run").exists()


def test_corrupt_keras_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.keras"
    bad.write_bytes(b"garbage")
    code, _, err = _main(capsys, "export", str(bad), "--export-dir", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1
    assert "is not a Keras model file (not a zip archive)" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("saved_model.pb"))


def test_models_lists_the_zoo(capsys):
    code, out, _ = _main(capsys, "models", "lm_resnet*")
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert "lm_resnet20" in names and "lm_resnet110_sd" in names and "resnet20" not in names


@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], "lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "lr must be a positive finite number, got inf"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["--step-size", "0"], "step_size must be a finite positive number or 'ode', got 0.0"),
    (["--step-size", "-1"], "step_size must be a finite positive number or 'ode', got -1.0"),
    (["--step-size", "nan"], "step_size must be a finite positive number or 'ode', got nan"),
    (["--step-size", "inf"], "step_size must be a finite positive number or 'ode', got inf"),
    (["--option", "step_size=0"], "step_size must be a finite positive number or 'ode', got 0"),
    (["--option", "horizon=0", "--step-size", "ode"], "horizon must be a finite positive"),
    (["--option", "classes=3"], "option classes is set by the training pipeline"),
    (["--option", "input_shape=[8,8,1]"], "option input_shape is set by the training pipeline"),
    (["--option", "width_multiplier=abc"], "option width_multiplier takes a finite number"),
    (["--dataset", "Digits", "--epochs", "0"], "epochs must be a positive integer"),
    (["--steps-per-epoch", "0"], "steps_per_epoch must be a positive integer, got 0"),
    (["--steps-per-epoch", "2.5"], "train: argument --steps-per-epoch: invalid int value"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/kode-data"], "not prepared"),
])
def test_bad_training_input_is_one_line_in_process_and_leaves_no_run_folder(
        capsys, tmp_path, args, words):
    logdir = tmp_path / "run"
    code = main(["train", "resnet20", "--logdir", str(logdir), *args])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "", out
    assert err.count("\n") == 1 and err.startswith("kode: error: ") and words in err, err
    assert not logdir.exists()


def test_usage_version_and_help_texts(capsys):
    import argparse

    from kode import __version__
    from kode.cli import build_parser

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kode") and "a command is required" in err
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"kode {__version__}"

    def undocumented(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from undocumented(sub, f"{path} {name}")
            elif not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(undocumented(build_parser(), "kode")) == []


def test_ctrl_c_says_the_same_command_resumes(capsys, monkeypatch):
    from kode.training import pipeline as training

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(training.TrainingPipeline, "run", interrupted)
    assert main(["train", "resnet20"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def _small_keras_file(path):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.save(path)


def test_corrupt_side_files_and_random_bytes_are_one_line(capsys, tmp_path):
    model_file = tmp_path / "model.keras"
    _small_keras_file(model_file)
    (tmp_path / "kode.json").write_text('{"model": "resnet20", ')
    assert main(["export", str(model_file), "--export-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kode.json' beside the model is unreadable" in err, err

    noise = tmp_path / "noise" / "model.keras"
    noise.parent.mkdir()
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["export", str(noise), "--export-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a Keras model file (not a zip archive)" in err, err
    assert "File not found" not in err, err


def test_check_gradients_refuses_weights_of_another_architecture(capsys, tmp_path):
    import zoo

    deeper = zoo.create_model("resnet20", depth=14, input_shape=(8, 8, 1))
    deeper.save_weights(tmp_path / "r14.weights.h5")
    deeper.save(tmp_path / "r14.keras")
    for weights in ("r14.weights.h5", "r14.keras"):
        code = main(["check-gradients", "resnet20", "--option", "depth=8",
                     "--weights", str(tmp_path / weights)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "holds the weights of" in err, err
        assert "(stages of 1 steps, 47 weight tensors" in err  # both architectures
        assert "(stages of 2/1/1 steps, " in err


def test_a_full_disk_while_saving_the_model_is_one_line_and_leaves_no_partial_file(
        capsys, tmp_path, monkeypatch):
    import errno
    import zipfile

    real_writestr = zipfile.ZipFile.writestr

    def writestr(self, name, data, *args, **kwargs):
        if str(name).endswith(".h5"):  # the weights: half written, then the disk is full
            real_writestr(self, name, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_writestr(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    logdir = tmp_path / "run"
    code = main(["train", "resnet20", "--option", "depth=8", "--epochs", "1",
                 "--no-diagnostics", "--logdir", str(logdir)])
    out, err = capsys.readouterr()
    # The default strategy's one device, on a machine with or without a GPU.
    assert re.match(r"training on 1 device\(s\): (CPU:0 \(no GPU found\)|GPU:0 \(\d+ GPU\(s\) "
                    r"found\))\n", out), out
    assert code == 2 and err.count("\n") == 1, err
    assert f"could not write {logdir / 'model.keras'}: no space left on the device" in err
    names = [p.name for p in logdir.rglob("*")]
    assert "model.keras" not in names and "metrics.json" not in names
    assert not [n for n in names if ".tmp-" in n], names


def test_tensorflow_no_gpu_lines_do_not_precede_kode_messages(capfd, monkeypatch):
    import tensorflow as tf

    from kode.distribute.strategy import discover_devices_quietly

    def noisy_discovery(*args):
        os.write(2, b"E0000 00:00:1 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
                    b"W0000 something else worth seeing\n")
        return []
    monkeypatch.setattr(tf.config, "list_physical_devices", noisy_discovery)
    discover_devices_quietly()
    err = capfd.readouterr().err
    assert "cuInit" not in err and "something else worth seeing" in err
