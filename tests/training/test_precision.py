"""Mixed precision through the training paths (issue 20): `kode train`'s bfloat16 hint,
`kode finetune` of a ported keras.applications network with its export, and
MirroredStrategy, all under mixed_bfloat16 (reduced sizes)."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kode.distribute import strategy as strategy_module
from kode.distribute.strategy import bfloat16_hardware, bfloat16_hint
from kode.testing.models import mirrored_fit_losses


def test_bfloat16_hardware_detection():
    assert bfloat16_hardware(gpus=[], cpu_flags={"avx2", "avx512f"}) is None
    assert bfloat16_hardware(gpus=[], cpu_flags={"avx512f", "avx512_bf16"}) == \
        "CPU with avx512_bf16"
    assert bfloat16_hardware(gpus=[], cpu_flags={"amx_bf16", "amx_tile"}) == "CPU with amx_bf16"
    assert bfloat16_hint("float32", None) is None
    assert bfloat16_hint("mixed_bfloat16", "CPU with avx512_bf16") is None
    hint = bfloat16_hint("float32", "CPU with avx512_bf16")
    assert "--precision mixed_bfloat16" in hint and "1.5x" in hint and "AMD EPYC" in hint


@pytest.mark.parametrize("precision, hardware, printed", [
    ("float32", "CPU with avx512_bf16", 1), ("float32", None, 0),
    ("mixed_bfloat16", "CPU with avx512_bf16", 0)])
def test_train_prints_the_bfloat16_hint_once(precision, hardware, printed, tmp_path, capsys,
                                             monkeypatch):
    from kode.training.pipeline import train

    monkeypatch.setattr(strategy_module, "bfloat16_hardware", lambda: hardware)
    # train() restores the global policy itself (the autouse check fails a test that leaks it).
    train("resnet20", "digits", epochs=2, steps_per_epoch=1, batch_size=8,
          model_options={"depth": 8}, precision=precision, diagnostics=False,
          logdir=str(tmp_path / "run"), verbose=1)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "computes bfloat16 natively" in line]
    assert len(lines) == printed, out[-3000:]
    if printed:
        devices = next(i for i, ln in enumerate(out.splitlines()) if ln.startswith("training on"))
        assert out.splitlines()[devices + 1] == lines[0]


def test_kode_finetune_ported_resnet_v2_under_mixed_bfloat16(tmp_path, capsys, monkeypatch):
    """`kode finetune ResNet50V2 --precision mixed_bfloat16` with the adjoint, two steps at
    32×32: trains, the guard reports, and the SavedModel keeps float32/uint8 inputs and
    float32 outputs. ResNet50V2 is a tiny one (the same graph and stages, one step each):
    what is checked is the keras.applications path under mixed precision, not the width."""
    from kode.cli import main
    from kode.testing.applications import stand_in_for

    stand_in_for(monkeypatch, "ResNet50V2")

    keras.utils.set_random_seed(0)
    original = keras.applications.ResNet50V2(weights=None, include_top=False, pooling="avg",
                                             input_shape=(32, 32, 3))
    weights = os.path.join(tmp_path, "resnet50v2_notop.weights.h5")
    original.save_weights(weights)
    logdir, export = os.path.join(tmp_path, "run"), os.path.join(tmp_path, "export")
    code = main(["finetune", "ResNet50V2", "--weights", weights, "--input-size", "32",
                 "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
                 "--precision", "mixed_bfloat16", "--gradient", "adjoint",
                 "--on-inaccurate", "fallback", "--freeze", "3", "--no-diagnostics",
                 "--logdir", logdir, "--export", export])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    metrics = json.loads(open(os.path.join(logdir, "metrics.json")).read())
    assert np.isfinite(metrics["history"]["loss"]).all()
    assert metrics["config"]["gradient_guard"][0]["max_error"] > 0
    path = os.path.join(export, "finetune_resnet50v2", "1")
    signatures = tf.saved_model.load(path).signatures
    for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8),
                        ("serving_preprocessed", tf.float32)):
        (spec,) = signatures[name].structured_input_signature[1].values()
        assert spec.dtype == dtype
        assert signatures[name].structured_outputs["probabilities"].dtype == tf.float32
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    out = signatures["serving_uint8"](images=tf.constant(pixels))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=-1), 1.0, atol=1e-3)


@pytest.mark.numerics
@pytest.mark.bfloat16
def test_mirrored_strategy_adjoint_matches_backprop_under_mixed_bfloat16():
    """Two replicas, mixed_bfloat16: the adjoint trains as backprop does (exact reversal)."""
    losses = mirrored_fit_losses("revheun_resnet20", "mixed_bfloat16", epochs=2, depth=8)
    assert np.isfinite(losses["adjoint"]).all()
    np.testing.assert_allclose(losses["adjoint"], losses["backprop"], rtol=1e-3)
