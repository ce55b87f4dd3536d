"""The serving contract a TensorFlow Serving client relies on, checked offline.

A digits model trained for two epochs by kode.train in Python and exported on the way must take
raw pixel values 0-255 under the input key ``images`` and answer with ``probabilities`` and
``class_ids``; a request built the way TF Serving's REST API builds it from
``{"instances": [...]}``, ``saved_model_cli run`` and ``kode predict``'s code must get the
right digits back. (The SavedModels of ``kode train --export`` and ``kode export`` are checked
against the same contract in tests/cli/test_cli.py, which trains through the CLI anyway.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import kode
from kode.data.datasets import _digits_arrays
from kode.serving.predict import predict_files
from kode.serving.publish import load_metadata
from kode.testing.models import image_serving_contract, serving_contract

SAVED_MODEL_CLI = Path(sys.executable).with_name("saved_model_cli")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """kode.train in Python, exported on the way (the other two export paths, `kode train
    --export` and `kode export`, are checked against the same contract in test_cli.py)."""
    root = tmp_path_factory.mktemp("serving")
    return kode.train("lm_resnet20", "digits", epochs=2, model_options={"depth": 8},
                      logdir=str(root / "run"), export_dir=str(root / "saved_models"),
                      verbose=0, diagnostics=False)


def _client_pixels(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Test digits as a client has them: uint8 0-255 (sklearn's 0-16 scaled), and labels."""
    _, _, x_test, y_test, _, _ = _digits_arrays()
    pixels = np.round(x_test[:count].astype(np.float64) * 255 / 16).astype(np.uint8)
    return pixels, y_test[:count]


def _rest_predict(loaded, body: str) -> dict:
    """What TF Serving's REST predict does with a row-format body: each instance is one
    example of the signature's single input; JSON numbers become the input's dtype (TF Serving
    refuses a non-integer for an integer input); the response lists one object per instance."""
    request = json.loads(body)
    fn = loaded.signatures[request.get("signature_name", "serving_default")]
    ((key, spec),) = fn.structured_input_signature[1].items()
    values = np.asarray(request["instances"])
    if spec.dtype.is_integer and not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{key}: JSON value is not an integer for {spec.dtype.name} input")
    outputs = fn(**{key: tf.constant(values, dtype=spec.dtype)})
    rows = [dict(zip(outputs, row, strict=True))
            for row in zip(*(t.numpy().tolist() for t in outputs.values()), strict=True)]
    return json.loads(json.dumps({"predictions": rows}))


def test_python_export_has_the_contract(trained):
    assert serving_contract(trained.export.path) == image_serving_contract((8, 8, 1))
    meta = load_metadata(trained.export.path)
    assert meta["serving"]["input_key"] == "images"
    assert meta["serving"]["output_keys"] == ["probabilities", "class_ids"]
    assert meta["preprocessing"]["kind"] == "mean_std"
    assert meta["preprocessing"]["mean"] == pytest.approx(meta["mean"])


def test_rest_instances_of_raw_pixels_give_the_right_digits(trained):
    loaded = tf.saved_model.load(trained.export.path)
    pixels, labels = _client_pixels(60)
    # The same images normalized the way training saw them, through the Keras model.
    info = kode.data.dataset_info("digits")
    keras_classes = trained.model.predict(
        kode.data.preprocess_images(pixels / np.float32(255), info), verbose=0).argmax(axis=1)
    assert (keras_classes == labels).mean() >= 0.9  # the model has learnt the digits

    for body in (
        json.dumps({"instances": pixels.tolist()}),  # JSON integers → float32 input
        json.dumps({"instances": (pixels.astype(np.float64)).tolist()}),  # floats 0-255
        json.dumps({"signature_name": "serving_uint8", "instances": pixels.tolist()}),
    ):
        predictions = _rest_predict(loaded, body)["predictions"]
        classes = np.array([p["class_ids"] for p in predictions])
        probabilities = np.array([p["probabilities"] for p in predictions])
        np.testing.assert_array_equal(classes, keras_classes)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert (classes == labels).mean() >= 0.9
    with pytest.raises(ValueError, match="not an integer"):
        _rest_predict(loaded, json.dumps({"signature_name": "serving_uint8",
                                          "instances": (pixels + 0.5).tolist()}))
    # Already-normalized input goes to serving_preprocessed and gives the same answers.
    normalized = kode.data.preprocess_images(pixels / np.float32(255), info)
    body = json.dumps({"signature_name": "serving_preprocessed", "instances": normalized.tolist()})
    predictions = _rest_predict(loaded, body)["predictions"]
    np.testing.assert_array_equal([p["class_ids"] for p in predictions], keras_classes)


def test_saved_model_cli_run_and_kode_predict_get_the_right_digits(trained, tmp_path):
    export = trained.export.path
    pixels, labels = _client_pixels(60)
    info = kode.data.dataset_info("digits")
    keras_classes = trained.model.predict(
        kode.data.preprocess_images(pixels / np.float32(255), info), verbose=0).argmax(axis=1)
    known = np.flatnonzero(keras_classes == labels)[:4]  # digits the model knows
    assert len(known) == 4
    np.save(tmp_path / "digits.npy", pixels[known].astype(np.float32))
    run = subprocess.run(
        [str(SAVED_MODEL_CLI), "run", "--dir", export, "--tag_set", "serve",
         "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'digits.npy'}",
         "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "class_ids.npy"), labels[known])

    files = []
    for i in known:
        files.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(pixels[i, ..., 0]).save(files[-1])
    predictions = predict_files(export, files)
    assert [p.class_name for p in predictions] == [str(d) for d in labels[known]]
