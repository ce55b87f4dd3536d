"""Your own images end to end: a folder of PNGs (grey and RGB, one corrupt) through kode train
→ kode finetune --refine auto --gradient adjoint → export → kode predict, from the command
line (in process) and from Python; kode tune on a folder; every bad folder is one line."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

import kode
from kode.cli import main
from kode.data.datasets import load_dataset
from kode.data.folders import scan_folder
from kode.errors import KodeError
from kode.io import load_keras_file
from kode.testing.images import write_image_folder

CLASSES = ["one", "two", "zero"]  # the folder names, sorted
TINY = ["--option", "depth=8", "--epochs", "1"]


def _truncate(path: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """3 classes x 20 digits at 12x12 (every third grey), and one truncated PNG."""
    root = str(tmp_path_factory.mktemp("data") / "my_images")
    write_image_folder(root, classes=3, per_class=20, size=12)
    corrupt = os.path.join(root, "two", "corrupt.png")
    with open(os.path.join(root, "two", "000.png"), "rb") as fh:
        data = fh.read()
    with open(corrupt, "wb") as fh:
        fh.write(data[: len(data) // 2])
    return root


def _main(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _exported(out: str) -> str:
    return re.search(r"exported SavedModel to (\S+) \(version", out).group(1)


def _check_predictions(capsys, savedmodel: str, model_file: str, folder: str) -> None:
    """kode predict names the folder's classes, and its probabilities are the trained model's
    on the training pipeline's test images (same decoding, channels, normalization)."""
    _, test, info = load_dataset(folder, image_size=12, batch_size=64, skip_bad_images=True)
    x = np.concatenate([b[0].numpy() for b in test])
    probabilities = load_keras_file(model_file)(x, training=False).numpy()
    files = [os.path.join(folder, name, f) for name in CLASSES
             for f in sorted(os.listdir(os.path.join(folder, name)))]
    test_files = [os.path.join(folder, rel) for rel, _ in
                  scan_folder(folder, skip_bad_images=True).test]
    assert len(test_files) == len(x)
    code, out, err = _main(capsys, "predict", savedmodel, *test_files)
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == test_files
    assert [r[1] for r in rows] == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    np.testing.assert_allclose([float(r[2]) for r in rows], probabilities.max(axis=1),
                               atol=1e-3)
    assert set(files) > set(test_files)


def test_train_finetune_export_and_predict_on_a_folder_from_the_command_line(
        folder, tmp_path, capsys):
    first, second, saved = tmp_path / "train", tmp_path / "finetune", tmp_path / "saved_models"
    code, out, err = _main(capsys, "train", "resnet20", *TINY, "--dataset", folder,
                           "--image-size", 12, "--skip-bad-images", "--logdir", first,
                           "--export", saved)
    assert code == 0, err
    assert f"skipped 1 unreadable image of {folder} (first: two/corrupt.png)" in out
    meta = json.loads((first / "kode.json").read_text())
    assert meta["class_names"] == CLASSES and meta["input_shape"] == [12, 12, 3]
    assert meta["dataset"] == "my_images" and len(meta["mean"]) == 3
    source = meta["training"]["dataset_info"]["source"]
    assert source["skipped"] == ["two/corrupt.png"] and len(source["files_sha256"]) == 64
    assert meta["training"]["image_size"] == 12 and meta["training"]["validation_split"] == 0.2
    _check_predictions(capsys, _exported(out), str(first / "model.keras"), folder)

    code, out, err = _main(capsys, "finetune", first / "model.keras", "--refine", "auto",
                           "--gradient", "adjoint", "--guard-tolerance", 2.0, "--epochs", 1,
                           "--dataset", folder, "--skip-bad-images", "--logdir", second,
                           "--export", saved)
    assert code == 0, err
    assert "refine auto: chose m = " in out
    meta = json.loads((second / "kode.json").read_text())
    # The source's input size (its kode.json) without --image-size.
    assert meta["input_shape"] == [12, 12, 3] and meta["class_names"] == CLASSES
    assert meta["training"]["image_size"] == 12
    _check_predictions(capsys, _exported(out), str(second / "model.keras"), folder)


def test_train_finetune_and_predict_on_a_folder_from_python(folder, tmp_path):
    result = kode.train("resnet20", folder, model_options={"depth": 8}, epochs=1,
                        image_size=10, skip_bad_images=True, logdir=str(tmp_path / "a"),
                        verbose=0)
    assert list(result.config["dataset_info"]["class_names"]) == CLASSES
    assert result.model.input_shape == (None, 10, 10, 3)
    tuned = kode.finetune(result.model_path, folder, refine="auto", gradient="adjoint",
                          guard_tolerance=2.0, epochs=1, skip_bad_images=True,
                          logdir=str(tmp_path / "b"), export_dir=str(tmp_path / "sm"),
                          verbose=0)
    chosen = json.loads((tmp_path / "b" / "kode.json").read_text())["finetune"]
    assert chosen["refine_requested"] == "auto" and isinstance(chosen["refine"], int)
    files = [os.path.join(folder, "zero", "000.png"), os.path.join(folder, "one", "001.png")]
    predictions = kode.predict_files(tuned.export.path, files)
    assert [p.file for p in predictions] == files
    assert all(p.class_name in CLASSES for p in predictions)
    with pytest.raises(KodeError, match=r"^cannot read image .*two/corrupt.png: image file is "
                                        r"truncated"):
        kode.train("resnet20", folder, model_options={"depth": 8}, epochs=1, image_size=10,
                   logdir=str(tmp_path / "c"), verbose=0)
    assert not (tmp_path / "c").exists()


def test_tune_searches_on_a_folder(folder, tmp_path):
    from kode.training.tuning import tune

    # 8 px as the digits tune tests: at 10-16 px a trial of this search crashed in oneDNN
    # (double free; gone with TF_ENABLE_ONEDNN_OPTS=0), whatever the data source.
    result = tune("resnet", folder, max_trials=1, epochs=1, depths=[8], image_size=8,
                       skip_bad_images=True, directory=str(tmp_path / "tune"), export_dir=None,
                       verbose=0)
    meta = json.loads((tmp_path / "tune" / "kode.json").read_text())
    assert meta["class_names"] == CLASSES and meta["input_shape"] == [8, 8, 3]
    assert 0.0 <= result.test_metrics["accuracy"] <= 1.0


def _garbage(root):
    write_image_folder(root, classes=2, per_class=5)
    with open(os.path.join(root, "one", "bad.png"), "wb") as fh:
        fh.write(b"not an image")


def _truncated(root):
    write_image_folder(root, classes=2, per_class=5)
    _truncate(os.path.join(root, "one", "003.png"))


def _class_without_images(root):
    write_image_folder(root, classes=2, per_class=5)
    os.makedirs(os.path.join(root, "empty"))


@pytest.mark.parametrize("make, words", [
    (lambda root: None, "dataset folder {root} has no class folders"),
    (_class_without_images, "class folder {root}/empty has no images (.bmp, .gif, .jpeg, .jpg, "
                            ".png)"),
    (lambda root: write_image_folder(root, classes=1, per_class=5),
     "dataset folder {root} has one class only (zero)"),
    (_garbage, "cannot read image {root}/one/bad.png: not a PNG, JPEG, BMP or GIF image; fix "
               "or remove it, or skip unreadable images with --skip-bad-images"),
    (_truncated, "cannot read image {root}/one/003.png: image file is truncated; fix or "
                 "remove it"),
    ("missing", "dataset folder {root} does not exist"),
], ids=["empty", "class-without-images", "one-class", "not-an-image", "truncated", "missing"])
def test_a_bad_folder_is_one_line_and_writes_nothing(tmp_path, capsys, make, words):
    root = str(tmp_path / "data")
    if make != "missing":
        os.makedirs(root)
        make(root)
    logdir = tmp_path / "run"
    code, out, err = _main(capsys, "train", "resnet20", *TINY, "--dataset", root,
                           "--image-size", 8, "--logdir", logdir)
    assert code == 2 and out == "", out
    assert err.count("\n") == 1 and err.startswith("kode: error: "), err
    assert words.format(root=root) in err, err
    assert not logdir.exists()
    with pytest.raises(KodeError) as raised:
        kode.train("resnet20", root, model_options={"depth": 8}, epochs=1, image_size=8,
                   logdir=str(logdir), verbose=0)
    assert err == f"kode: error: {raised.value}\n"
    assert not logdir.exists()


def test_a_folder_that_changed_is_refused_on_resume(tmp_path, capsys):
    root = str(tmp_path / "data")
    write_image_folder(root, classes=2, per_class=6)
    run = ["train", "resnet20", *TINY, "--dataset", root, "--image-size", 8, "--logdir",
           tmp_path / "run"]
    code, _, err = _main(capsys, *run)
    assert code == 0, err
    code, out, err = _main(capsys, *run)  # unchanged: the snapshot is taken up
    assert code == 0 and "resuming from" in out and "1 of 1 epochs done" in out, err
    write_image_folder(root, classes=2, per_class=1, start=6)  # overwrites 000.png of each
    os.rename(os.path.join(root, "one", "000.png"), os.path.join(root, "one", "new.png"))
    code, out, err = _main(capsys, *run)
    assert code == 2 and err.count("\n") == 1, err
    assert "holds checkpoints of a different run (differs in dataset_files)" in err


def test_a_truncated_image_is_the_only_line_of_the_real_command(tmp_path):
    """The decoder's own complaint (TensorFlow logs it from C++ straight to the terminal when
    a decode fails outside tf.data) does not stand before kode's line."""
    import subprocess
    import sys

    root = str(tmp_path / "data")
    _truncated(root)
    result = subprocess.run(
        [sys.executable, "-m", "kode.cli", "train", "resnet20", *TINY, "--dataset", root,
         "--image-size", "8", "--logdir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"kode: error: cannot read image {root}/one/003.png: image file is "
                             "truncated; fix or remove it, or skip unreadable images with "
                             "--skip-bad-images (skip_bad_images=True)\n"), result.stderr


def test_the_readme_command_on_a_folder_with_a_tiny_resnet50v2(folder, tmp_path, capsys,
                                                               monkeypatch):
    """`kode finetune ResNet50V2 --weights … --dataset FOLDER --refine auto --gradient adjoint
    --export DIR` as in the README, with keras.applications.ResNet50V2 standing in as a tiny
    network of the same graph (kode.testing.applications) and weights made here instead of
    ImageNet's: the folder is read at the source's input size and keeps ResNetV2's own
    preprocessing, and kode predict names the folder's classes."""
    import keras

    from kode.testing.applications import stand_in_for

    stand_in_for(monkeypatch, "ResNet50V2")
    keras.utils.set_random_seed(0)
    weights = str(tmp_path / "resnet50v2_notop.weights.h5")
    keras.applications.ResNet50V2(weights=None, include_top=False, pooling="avg",
                                  input_shape=(32, 32, 3)).save_weights(weights)
    code, out, err = _main(capsys, "finetune", "ResNet50V2", "--weights", weights,
                           "--input-size", 32, "--dataset", folder, "--skip-bad-images",
                           "--refine", "auto", "--gradient", "adjoint", "--guard-tolerance",
                           1e6, "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 8,
                           "--no-diagnostics", "--logdir", tmp_path / "run", "--export",
                           tmp_path / "saved_models")
    assert code == 0, err[-3000:]
    meta = json.loads((tmp_path / "run" / "kode.json").read_text())
    assert meta["input_shape"] == [32, 32, 3] and meta["training"]["image_size"] == 32
    assert meta["preprocessing"]["kind"] == "scale" and "mean" not in meta
    assert meta["class_names"] == CLASSES
    code, out, err = _main(capsys, "predict", _exported(out),
                           os.path.join(folder, "zero", "000.png"))
    assert code == 0 and out.split("\t")[1] in CLASSES, err


@pytest.mark.parametrize("args, words", [
    (["--image-size", "12"], "image_size is for folders and tfds:NAME datasets; digits has its "
                             "own size"),
    (["--image-size", "0", "--dataset", "FOLDER"], "image_size must be a positive integer"),
    (["--validation-split", "1.5", "--dataset", "FOLDER"],
     "validation_split must be a number in (0, 1), got 1.5"),
    (["--dataset", "no_such_name"], "unknown dataset 'no_such_name'; give one of cifar10, "
                                    "cifar100, digits, imagenet2012, mnist, a folder of images"),
])
def test_bad_data_options_are_one_line(folder, tmp_path, capsys, args, words):
    args = [folder if a == "FOLDER" else a for a in args]
    code, out, err = _main(capsys, "train", "resnet20", *TINY, "--logdir", tmp_path / "run",
                           *args)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert words in err and not (tmp_path / "run").exists()
