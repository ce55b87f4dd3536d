"""Training throughput of the zoo against a hand-written Keras ResNet-56 and against the
machine's dense matmul rate; input-pipeline rates of the named datasets.

    python -m benchmarks.throughput [--quick] [--out docs]

Writes ``<out>/performance.md``. Every configuration runs in its own Python process
(``--worker JSON``); the training processes of a comparison alternate, in an order rotated
from one repetition to the next, so drift of a shared machine reaches every side alike.

Definitions (all in the generated doc):

- images/s = batch / median step time over the timed steps of ``model.fit`` (after warm-up);
- MACs per image: multiply-adds of every Conv2D / MatMul op of the traced forward graph at
  batch 1 (:func:`count_macs`), so a function that Heun evaluates twice counts twice;
- training FLOP/s = images/s × MACs × 2 (a multiply-add is 2 FLOPs) × 3 (forward, and a
  backward that costs two forwards: gradients w.r.t. inputs and weights);
- matmul FLOP/s = 2 n³ / t of a float32 ``tf.matmul`` of two n×n matrices (best n).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import record as run_record
from benchmarks import throughput_claims
from benchmarks.gradient_memory import (
    RESULT_PREFIX,
    _release_free_heap,
    _reset_peak_rss,
    _rotated,
    _status_kib,
    machine_description,
)

if TYPE_CHECKING:
    import keras

BATCH = 128
IMAGE = (32, 32, 3)
CLASSES = 10
REFERENCE = "reference_resnet56"
#: resnet56 as built before the fix of kode.integrators.scale: every step multiplies f by h = 1.
PRE_FIX = "resnet56_with_h_mul"
#: (model, baseline, target ratio, what the ratio is): the comparisons and their targets.
COMPARISONS = (
    ("resnet56", REFERENCE, 0.97, "images/s"),
    ("lm_resnet56", "resnet56", 0.95, "images/s"),
    ("heun_resnet56", "resnet56", 0.95, "images/s × MACs per image (per evaluation)"),
    ("resnet56", PRE_FIX, None, "images/s (the fix: skip h·f when h = 1)"),
)
TRAIN_MODELS = (REFERENCE, "resnet56", PRE_FIX, "lm_resnet56", "heun_resnet56")
PROFILED = ("resnet56", REFERENCE, "lm_resnet56", "heun_resnet56")
#: Published MACs per 32×32 image (docs/reference.md §2), for the count check in the doc.
PUBLISHED_MACS = {"resnet20": 40.8e6, "resnet56": 125.7e6, "resnet110": 253.1e6}
#: Digits are trained with this model and batch (README / kode.training.RECIPES["digits"]).
DIGITS_MODEL, DIGITS_BATCH = "lm_resnet20", 64
MATMUL_SIZES = (1024, 2048, 4096)
PIPELINE_TARGET = 5.0

# ------------------------------------------------------------------------ the models


def reference_resnet(depth: int = 56, input_shape: tuple[int, int, int] = IMAGE,
                     classes: int = CLASSES) -> keras.Model:
    """The plain functional Keras pre-activation ResNet a user would write, with exactly the
    layers of ``zoo.create_model(f"resnet{depth}")``: stem conv3×3(16); stages of widths
    16/32/64 with x ← x + f(x), f = conv3×3(ReLU(BN(conv3×3(ReLU(BN(x)))))); the first block
    of stages 2 and 3 is x ← P(x) + f(x) with P = conv1×1/2(ReLU(BN(x))) (its own BN) and f's
    first conv of stride 2; head BN-ReLU-average pool-dense softmax. No bias in convs."""
    import keras
    from keras import layers

    n = (depth - 2) // 6
    init = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")

    def conv(x, filters, kernel, stride=1):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                             kernel_initializer=init)(x)

    def bn_relu(x):
        return layers.ReLU()(layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x))

    inputs = keras.Input(input_shape)
    x = conv(inputs, 16, 3)
    channels = 16
    for width, stride in zip((16, 32, 64), (1, 2, 2), strict=True):
        for i in range(n):
            s = stride if i == 0 else 1
            f = conv(bn_relu(conv(bn_relu(x), width, 3, s)), width, 3)
            shortcut = x
            if s != 1 or width != channels:
                shortcut = conv(bn_relu(x), width, 1, s)
            x = layers.Add()([shortcut, f])
            channels = width
    x = layers.GlobalAveragePooling2D()(bn_relu(x))
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"reference_resnet{depth}")


def build_model(name: str, input_shape=IMAGE, classes: int = CLASSES):
    """``reference_resnet<depth>`` (:func:`reference_resnet`) or a zoo model name."""
    if name == PRE_FIX:  # only ever in a worker process of its own
        import kode.integrators

        kode.integrators.scale = lambda h, y: h * y
        name = "resnet56"
    if name.startswith("reference_resnet"):
        return reference_resnet(int(name.removeprefix("reference_resnet")), tuple(input_shape),
                                classes)
    import zoo

    return zoo.create_model(name, input_shape=tuple(input_shape), classes=classes)


def count_macs(model, input_shape=None) -> int:
    """Multiply-adds per image of a forward pass (inference mode, batch 1), read from the
    traced graph: Σ over Conv2D ops of |output| · k_h · k_w · c_in/groups (the kernel's
    input-channel dimension already is c_in/groups), Σ over MatMul ops of m · k · n."""
    import numpy as np
    import tensorflow as tf

    shape = tuple(input_shape or model.input_shape[1:])
    fn = tf.function(lambda x: model(x, training=False))
    graph = fn.get_concrete_function(tf.TensorSpec((1, *shape), tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        if op.type in ("Conv2D", "DepthwiseConv2dNative"):
            out = op.outputs[0].shape.as_list()
            kh, kw, cin, mult = op.inputs[1].shape.as_list()
            per_out = kh * kw * (cin if op.type == "Conv2D" else 1)
            total += int(np.prod(out)) * per_out
        elif op.type in ("MatMul", "BatchMatMulV2"):
            a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
            k = a[-2] if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x") \
                else a[-1]
            total += int(np.prod(op.outputs[0].shape.as_list())) * k
            del b
    return total


def function_evaluations(model) -> int:
    """Residual-function evaluations per forward: Σ over stages of steps × evaluations per
    step (Heun: 2, the others: 1), plus one per transition block."""
    from kode.integrators import Heun
    from kode.layers.stage import IntegratorStage, TransitionBlock

    total = 0
    for layer in model._flatten_layers():
        if isinstance(layer, IntegratorStage):
            total += layer.num_steps * (2 if isinstance(layer.integrator, Heun) else 1)
        elif isinstance(layer, TransitionBlock):
            total += 1
    return total


def trainable_parameters(model) -> int:
    import numpy as np

    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


# ----------------------------------------------------------------------------- workers


def _synthetic(batch: int, shape, classes: int, batches: int = 4):
    """An in-memory, cached, prefetched tf.data stream: the model never waits for Python."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * batches, *shape)).astype("float32")
    y = rng.integers(0, classes, batch * batches).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
    return ds.cache().repeat().prefetch(tf.data.AUTOTUNE)


def run_train_worker(cfg: dict) -> dict:
    """Train ``cfg["model"]`` as ``kode train`` does (compiled model, SGD momentum 0.9, weight
    decay 1e-4, sparse cross-entropy + accuracy, ``jit_compile=False``, ``model.fit`` on a
    prefetched ``tf.data`` stream) for ``warmup`` + ``steps`` steps; time each step between
    the batch callbacks; reset VmHWM after the warm-up so the peak is the timed steps'."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from kode.training.pipeline import make_optimizer

    keras.utils.set_random_seed(0)
    shape, classes, batch = tuple(cfg.get("shape", IMAGE)), cfg.get("classes", CLASSES), \
        cfg.get("batch", BATCH)
    warmup, steps = cfg.get("warmup", 2), cfg.get("steps", 8)
    t0 = time.perf_counter()
    model = build_model(cfg["model"], shape, classes)
    model.compile(optimizer=make_optimizer(0.1, 0.9, 1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=False)
    build_s = time.perf_counter() - t0
    begins, ends, marks = {}, {}, {}

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch_index, logs=None):
            if batch_index == warmup:
                _release_free_heap()
                marks["rss_mb"] = _status_kib("VmRSS") / 1024
                _reset_peak_rss()
            begins[batch_index] = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            ends[batch_index] = time.perf_counter()

    t1 = time.perf_counter()
    history = model.fit(_synthetic(batch, shape, classes), epochs=1,
                        steps_per_epoch=warmup + steps, verbose=0, callbacks=[Timer()])
    peak_mb = _status_kib("VmHWM") / 1024
    fit_s = time.perf_counter() - t1
    times = [ends[i] - begins[i] for i in range(warmup, warmup + steps)]
    step_s = statistics.median(times)
    result = {
        **cfg,
        "images_per_s": batch / step_s,
        "step_s": step_s,
        "step_times_s": times,
        "first_step_s": ends[0] - begins[0],
        "peak_mb": peak_mb,
        "rss_after_warmup_mb": marks.get("rss_mb"),
        "trainable_params": trainable_parameters(model),
        "build_s": build_s,
        "fit_s": fit_s,
        "loss": float(history.history["loss"][-1]),
    }
    if cfg.get("count"):
        result["macs"] = count_macs(model, shape)
        result["evaluations"] = function_evaluations(model)
    return result


def run_matmul_worker(cfg: dict) -> dict:
    """FLOP/s of a float32 ``tf.matmul`` of n×n matrices in a ``tf.function``: 2n³ / median
    time of ``repeats`` calls after one warm-up call, for each n in ``sizes``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    # The sum keeps the product inside the function (no 64 MiB copy out per call).
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    rates = {}
    for n in cfg.get("sizes", MATMUL_SIZES):
        a = tf.random.normal((n, n), seed=1)
        b = tf.random.normal((n, n), seed=2)
        float(matmul(a, b))
        times = []
        for _ in range(cfg.get("repeats", 5)):
            t = time.perf_counter()
            float(matmul(a, b))
            times.append(time.perf_counter() - t)
        rates[str(n)] = 2 * n**3 / statistics.median(times)
    return {**cfg, "flops": rates, "best_flops": max(rates.values())}


def run_pipeline_worker(cfg: dict) -> dict:
    """Images/s of iterating a train pipeline of :func:`kode.data.load_dataset` alone
    (augmentation as in training, ``.repeat()`` as ``kode train`` uses it), after one epoch
    that fills the cache. cifar10 runs under ``tfds.testing.mock_data`` (random images in
    the real format, through the real loading code)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import contextlib

    from kode.data.datasets import load_dataset

    context = contextlib.nullcontext()
    if cfg["dataset"] != "digits":
        import tensorflow_datasets as tfds

        context = tfds.testing.mock_data(num_examples=cfg.get("mock_examples", 2560))
    with context:
        train, _, info = load_dataset(cfg["dataset"], batch_size=cfg["batch"])
        for _ in train:  # first epoch: decode, normalize, fill the cache
            pass
        seen, t = 0, time.perf_counter()
        for x, _y in train.repeat():
            seen += int(x.shape[0])
            if seen >= cfg.get("images", 50_000) or time.perf_counter() - t > 20:
                break
        elapsed = time.perf_counter() - t
    return {**cfg, "images_per_s": seen / elapsed, "images": seen, "train_size": info.train_size,
            "image_shape": list(info.input_shape)}


def _op_category(name: str, op_type: str) -> str:
    """Where a profiled op's time goes: conv, batchnorm, relu, optimizer or other
    (residual adds, integrator arithmetic, loss, head)."""
    segments = name.split("/")
    if "Conv2D" in op_type:
        return "conv"
    if op_type.startswith("FusedBatchNorm") or any(
            seg.startswith(("bn", "head_bn", "batch_normalization")) for seg in segments):
        return "batchnorm"
    if op_type in ("Relu", "ReluGrad"):
        return "relu"
    if "/tmp_var" in name:
        # Grappler's AddOpsRewrite runs a sum of three or more tensors (LM's earlier
        # u + k(u_prev − u) + f) as AccumulateNV2: a temporary variable, Assign, AssignAdd.
        # Model arithmetic, not the optimizer's, though its op types start with "Assign".
        return "other"
    if "sgd" in name.lower() or op_type.startswith("Assign"):
        return "optimizer"
    return "other"


PROFILE_CATEGORIES = ("conv", "batchnorm", "relu", "other", "optimizer")


def run_profile_worker(cfg: dict) -> dict:
    """Profile ``steps`` training steps (after ``warmup``) with TensorFlow's profiler
    (``tf.profiler.experimental``) and sum the host op events of the trace by category and
    direction (ops under ``gradient_tape/`` are the backward): op time in ms per step, summed
    over the threads that ran the ops."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import glob
    import tempfile

    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from kode.training.pipeline import make_optimizer

    keras.utils.set_random_seed(0)
    batch, steps = cfg.get("batch", BATCH), cfg.get("steps", 3)
    model = build_model(cfg["model"])
    model.compile(optimizer=make_optimizer(0.1, 0.9, 1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=False)
    data = _synthetic(batch, IMAGE, CLASSES)
    model.fit(data, epochs=1, steps_per_epoch=cfg.get("warmup", 2), verbose=0)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        wall = time.perf_counter() - t
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        path = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]
        space.ParseFromString(Path(path).read_bytes())
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith(("tf_Compute", "tf_numa")):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or "::" in name:  # executor bookkeeping, not an op
                    continue
                op_name, op_type = name.rsplit(":", 1)
                # AddN sums the gradients of a tensor used twice (x feeds f and the skip).
                backward = "gradient_tape/" in op_name or op_type == "AddN"
                direction = "bwd" if backward else "fwd"
                key = f"{direction} {_op_category(op_name, op_type)}"
                times[key] = times.get(key, 0.0) + event.duration_ps / 1e9 / steps
                if op_type in ("Mul", "AddV2", "Sub", "AddN", "Sum", "Tile"):
                    counts[op_type] = counts.get(op_type, 0) + 1
    return {**cfg, "op_ms": times, "wall_ms": 1e3 * wall / steps,
            "elementwise_ops_per_step": {k: v / steps for k, v in counts.items()}}


#: Paired mode: (model, baseline, target, what); "matmul" is the float32 matmul's FLOP/s.
#: A model name may carry a gradient mode and a Keras dtype policy: ``name:mode@policy``.
BF16 = "@mixed_bfloat16"
PAIRED_COMPARISONS = (
    ("resnet56", REFERENCE, 1.4, "speed (images/s ratio)"),
    ("lm_resnet56", "resnet56", 0.97, "speed (images/s ratio)"),
    ("heun_resnet56", "resnet56", 0.95, "speed per function evaluation (× MACs ratio)"),
    ("resnet56", "matmul", 0.7, "training FLOP/s / matmul FLOP/s"),
    (f"resnet56{BF16}", REFERENCE, 1.9, "speed (images/s ratio)"),
    (f"resnet56{BF16}", "resnet56", 1.4, "speed (images/s ratio)"),
    (f"lm_resnet56{BF16}", f"resnet56{BF16}", 0.97, "speed (images/s ratio)"),
    # ≥ 1/1.4: the adjoint's step takes at most 1.4× its backprop step.
    (f"revheun_resnet56:adjoint{BF16}", f"revheun_resnet56{BF16}", 0.714,
     "speed (images/s ratio; ≥ 0.714 means the adjoint step is ≤ 1.4× backprop's)"),
)
PAIRED_MODELS = (REFERENCE, "resnet56", "lm_resnet56", "heun_resnet56", f"resnet56{BF16}",
                 f"lm_resnet56{BF16}", f"revheun_resnet56{BF16}",
                 f"revheun_resnet56:adjoint{BF16}")
PAIRED_MATMUL = 2048


def run_paired_worker(cfg: dict) -> dict:
    """All ``cfg["models"]`` built and compiled in this process as ``run_train_worker`` does;
    after ``warmup`` steps each, ``rounds`` rounds in which every model takes one train step
    (``train_on_batch`` on the same in-memory batch; the loss is read back, so the step has
    finished) and a float32 ``tf.matmul`` of two n×n matrices runs once, in a random order per
    round (:func:`benchmarks.paired.alternate`)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.paired import alternate
    from kode.scopes import precision_scope
    from kode.training.pipeline import make_optimizer

    batch, shape = cfg.get("batch", BATCH), tuple(cfg.get("shape", IMAGE))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, *shape)).astype("float32"))
    y = tf.constant(rng.integers(0, CLASSES, batch).astype("int32"))
    steps, info = {}, {}
    for name in cfg["models"]:
        keras.utils.set_random_seed(0)
        spec, _, policy = name.partition("@")
        zoo_name, _, gradient = spec.partition(":")
        with precision_scope(policy or "float32"):
            model = build_model(zoo_name, shape, CLASSES)
        if gradient:
            from kode.layers.stage import set_gradient_mode

            set_gradient_mode(model, gradient)
        model.compile(optimizer=make_optimizer(0.1, 0.9, 1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      jit_compile=False)
        steps[name] = lambda model=model: model.train_on_batch(x, y)
        info[name] = {"macs": count_macs(model, shape), "evaluations": function_evaluations(model),
                      "trainable_params": trainable_parameters(model)}
    n = cfg.get("matmul", PAIRED_MATMUL)
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    a, b = tf.random.normal((n, n), seed=1), tf.random.normal((n, n), seed=2)
    steps["matmul"] = lambda: float(matmul(a, b))
    for _ in range(cfg.get("warmup", 2)):
        for step in steps.values():
            step()
    times = alternate(steps, cfg.get("rounds", 20), seed=cfg.get("seed", 0))
    return {**cfg, "times_s": times, "models_info": info, "matmul_flop": 2 * n**3}


WORKERS = {"train": run_train_worker, "profile": run_profile_worker, "matmul": run_matmul_worker,
           "pipeline": run_pipeline_worker, "paired": run_paired_worker}


def summarize_paired(result: dict) -> dict:
    """Per comparison: per-round ratios, their median and bootstrap 95% interval, verdict."""
    from benchmarks.paired import median_interval, ratios, verdict

    times, info, batch = result["times_s"], result["models_info"], result["batch"]
    models = {}
    for name, t in times.items():
        step = statistics.median(t)
        models[name] = {"step_s": step, "all_step_s": t, **info.get(name, {})}
        if name != "matmul":
            models[name]["images_per_s"] = batch / step
    comparisons = []
    for model, base, target, what in PAIRED_COMPARISONS:
        if model not in times or base not in times:
            continue
        if base == "matmul":
            # (batch/t_model · MACs · 6) / (2n³/t_matmul), per round.
            per_round = ratios(times[base], times[model],
                               batch * info[model]["macs"] * 6 / result["matmul_flop"])
        else:
            scale = info[model]["macs"] / info[base]["macs"] if "MACs" in what else 1.0
            per_round = ratios(times[base], times[model], scale)
        med, low, high = median_interval(per_round)
        comparisons.append({"model": model, "base": base, "target": target, "what": what,
                            "per_round": per_round, "ratio": med, "low": low, "high": high,
                            "verdict": verdict(low, high, target)})
    return {"models": models, "comparisons": comparisons, "rounds": len(times["matmul"])}


def write_paired_doc(summary: dict, meta: dict, out: Path, record=None) -> Path:
    """``<out>/performance.md`` from a paired run (every number measured in that run)."""
    from benchmarks.paired import fmt_interval

    models, comps = summary["models"], summary["comparisons"]
    # The run itself keeps the 2 cores busy: only the load at the start says whether other
    # work shared the machine (the record's header judges it so).
    loaded = meta["load_before"] > run_record.LOAD_PER_CORE * run_record.cores()
    lines = [
        *([*run_record.page_header(record), ""] if record else [
            "```bash", meta["command"], "```", "",
            f"- Date (UTC): {meta['date']}.", f"- Machine: {meta['machine']}.",
            f"- Load: 1-minute load average {meta['load_before']:.2f} at the start"
            + (" — **a shared machine: other work ran during the measurement**." if loaded
               else "."), ""]),
        "# Performance: training throughput",
        "",
        f"Wall time {meta['wall_s'] / 60:.1f} min.",
        *([f"Note: {meta['note']}"] if meta.get("note") else []),
        "",
        "## Method: paired, in one process",
        "",
        f"One process builds all models ({', '.join(f'`{m}`' for m in PAIRED_MODELS)}) "
        "exactly as `kode train` compiles them (`kode.training.pipeline.make_optimizer`: SGD "
        "momentum 0.9, weight decay 1e-4; sparse cross-entropy, an accuracy metric, "
        f"`jit_compile=False`), batch {BATCH} of 32×32×3 random images, 10 classes. After "
        "two warm-up steps each, every round runs one train step of every model "
        "(`train_on_batch` on the same in-memory batch; the loss is read back, so the step "
        f"has finished) and one float32 `tf.matmul` of two {PAIRED_MATMUL}×{PAIRED_MATMUL} "
        f"matrices, **in a random order per round**; {summary['rounds']} rounds. A comparison "
        "is the **median of its per-round ratios** with a **bootstrap 95% interval** of that "
        "median (4000 resamples of the rounds). Verdicts: *met* when the whole interval is on "
        "the target's side, *missed by X–Y%* when it is wholly on the other side (X–Y: the "
        "interval's distances to the target), *not decided* when it straddles the target.",
        "",
        "- speed ratio of A to B in a round = t_B / t_A (step times);",
        "- per function evaluation: the speed ratio × MACs_A / MACs_B (Heun evaluates each "
        "function twice per step; MACs counted from the traced graph, `count_macs`);",
        "- FLOP/s fraction in a round = (batch / t_model × MACs × 2 × 3) / (2n³ / t_matmul): "
        "training FLOP/s (a multiply-add is 2 FLOPs; forward + a backward of two forwards) over "
        "the matmul's.",
        "",
        "The per-process mode (`python -m benchmarks.throughput` without `--paired`: one "
        "process per configuration, peak RSS, profiles, input pipelines) remains for memory; "
        "it was not run for this page.",
        "",
        "## Targets",
        "",
        "| comparison | what | ratio [95% interval] | target | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for c in comps:
        lines.append(f"| {c['model']} / {c['base']} | {c['what']} | "
                     f"{fmt_interval(c['ratio'], c['low'], c['high'])} | ≥ {c['target']} | "
                     f"**{c['verdict']}** |")
    lines += ["", "## Step times (medians over the rounds)", "",
              "| model | trainable params | MACs / image | function evaluations | "
              "median step s | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for name in (*PAIRED_MODELS, "matmul"):
        m = models.get(name)
        if not m:
            continue
        if name == "matmul":
            lines.append(f"| float32 matmul {PAIRED_MATMUL}² | — | — | — | {m['step_s']:.3f} | "
                         f"({2 * PAIRED_MATMUL**3 / m['step_s'] / 1e9:.1f} GFLOP/s) |")
            continue
        lines.append(f"| {name} | {m['trainable_params']:,} | {m['macs'] / 1e6:.1f}M | "
                     f"{m['evaluations']} | {m['step_s']:.3f} | {m['images_per_s']:.1f} |")
    lines += ["", *meta.get("findings", [])]
    return run_record.write_page(out / "performance.md", lines)


def run_paired(args) -> None:
    """``--paired``: one worker process with every model alternated; writes the doc."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python -m benchmarks.throughput " + shlex.join(sys.argv[1:])).strip()
    record = run_record.start_record(command, args.allow_load)
    started, load_before = time.monotonic(), record.load_before
    cfg = {"kind": "paired", "models": list(PAIRED_MODELS), "batch": BATCH,
           "rounds": args.rounds or (8 if args.quick else 30), "warmup": 2}
    result = measure(cfg, timeout=7200.0)
    meta = {"command": command, "machine": machine_description(), "load_before": load_before,
            "load_after": _load1(), "wall_s": time.monotonic() - started, "note": args.note,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    if args.json:
        from kode.io import write_json

        write_json(args.json, [meta, result], indent=1)
    if "error" in result:
        raise SystemExit(f"paired run failed: {result['error']}")
    summary = summarize_paired(result)
    for c in summary["comparisons"]:
        print(f"{c['model']} / {c['base']}: {c['ratio']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"
              f" target {c['target']}: {c['verdict']}", flush=True)
    meta["findings"] = paired_findings(summary)
    run_record.finish_record(record, meta["load_after"])
    path = write_paired_doc(summary, meta, out, record)
    run_record.write_record(path, record, {"meta": meta, "result": result},
                            throughput_claims.paired_claims(summary))
    print(f"wrote {path} and its .json", flush=True)


def paired_findings(summary: dict) -> list[str]:
    """Short, computed explanations next to the targets."""
    by = {(c["model"], c["base"]): c for c in summary["comparisons"]}
    out = ["## Findings", ""]
    zoo = by.get(("resnet56", REFERENCE))
    if zoo:
        out.append(
            f"- **Zoo ResNet-56 vs the hand-written Keras ResNet-56**: {zoo['ratio']:.2f}× "
            f"[{zoo['low']:.2f}, {zoo['high']:.2f}]. Both run the same 57 convolutions; the zoo "
            "model's 57 batch normalizations are `kode.layers.BatchNormalization`, "
            "which runs TensorFlow's fused kernel (`FusedBatchNormV3`: one pass forward, one "
            "backward), while the hand-written model keeps `keras.layers.BatchNormalization` "
            "(Keras 3 computes moments and elementwise ops, several passes over the "
            "activations each way). Outputs and gradients equal Keras' within 1e-5 "
            "(`tests/core/test_normalization.py`). Whether the fused kernel's speed-up (1.57× "
            "measured on the idle machine with one process per model) holds under load is what "
            "this ratio measures; where its interval excludes the target, the cause is not "
            "established by this run.")
    lm = by.get(("lm_resnet56", "resnet56"))
    if lm:
        out.append(
            f"- **LM-ResNet-56 vs ResNet-56**: {lm['ratio']:.3f}× [{lm['low']:.3f}, "
            f"{lm['high']:.3f}]. The LM step u ← (1−k)u + k·u_prev + f(u) adds elementwise "
            "passes over the state and a reduction for ∂L/∂k per block (kode carries "
            "d = u − u_prev: t = f(u) − k·d, u ← u + t, d ← t, one product, two adds and one "
            "reduction for ∂L/∂k; a stage's k_n are one vector variable).")
    heun = by.get(("heun_resnet56", "resnet56"))
    if heun:
        out.append(
            f"- **Heun per function evaluation**: {heun['ratio']:.3f}× [{heun['low']:.3f}, "
            f"{heun['high']:.3f}]: a Heun step adds x + k1 and the average x + (k1 + k2)/2 "
            "(four elementwise passes per step against one for Euler).")
    frac = by.get(("resnet56", "matmul"))
    if frac:
        out.append(
            f"- **FLOP/s**: ResNet-56 training runs at {frac['ratio']:.2f} "
            f"[{frac['low']:.2f}, {frac['high']:.2f}] of a {PAIRED_MATMUL}² float32 matmul's "
            "FLOP/s measured in the same rounds. The profile ([profile.md](profile.md)) puts "
            "most of the op time in the backward convolutions, not in batch normalization or "
            "elementwise work, so the gap is mostly the convolution kernels themselves: with 16–64 "
            "channels on 32×32 to 8×8 maps their backward passes reach a fraction of a large "
            "matmul's rate on this CPU.")
    return out


# ------------------------------------------------------------------------------ parent


def measure(cfg: dict, timeout: float = 900.0) -> dict:
    """Run ``cfg`` in a fresh ``python -m benchmarks.throughput --worker`` process."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(cfg.get("env", {}))
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.throughput", "--worker", json.dumps(cfg)],
            capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout {timeout:g} s", "wall_s": time.monotonic() - start}
    wall = time.monotonic() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "wall_s": wall}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {**cfg, "error": f"exit {proc.returncode}: {tail}", "wall_s": wall}


PARTS = ("train", "fix", "matmul", "pipelines", "macs", "profiles")
QUICK_PARTS = ("train", "matmul", "pipelines")


def plan(quick: bool, repeats: int | None = None, parts=None) -> list[dict]:
    """The run order: per repetition the training models (rotated) and a matmul process;
    then the digits model and the two pipelines, the MAC check and the profiles. ``--quick``:
    one repetition of 1 + 3 steps, without the pre-fix variant ("fix"), MAC check and
    profiles (unless ``parts`` names them)."""
    repeats = repeats or (1 if quick else 3)
    parts = parts or (QUICK_PARTS if quick else PARTS)
    steps, warmup = (3, 1) if quick else (8, 2)
    models = [m for m in TRAIN_MODELS if m != PRE_FIX or "fix" in parts]
    configs = []
    for rep in range(repeats):
        if "train" in parts:
            configs += [{"kind": "train", "model": model, "batch": BATCH, "steps": steps,
                         "warmup": warmup, "rep": rep, "count": rep == 0}
                        for model in _rotated(models, rep)]
        if "matmul" in parts:
            configs.append({"kind": "matmul", "sizes": list(MATMUL_SIZES),
                            "repeats": 3 if quick else 5, "rep": rep})
    if "pipelines" in parts:
        configs.append({"kind": "train", "model": DIGITS_MODEL, "shape": [8, 8, 1],
                        "batch": DIGITS_BATCH, "steps": steps, "warmup": warmup, "rep": 0,
                        "count": True})
        configs += [{"kind": "pipeline", "dataset": dataset, "batch": batch,
                     "images": 20_000 if quick else 50_000, "rep": 0}
                    for dataset, batch in (("digits", DIGITS_BATCH), ("cifar10", BATCH))]
    if "macs" in parts:
        configs.append({"kind": "macs", "models": list(PUBLISHED_MACS), "rep": 0})
    if "profiles" in parts:
        configs += [{"kind": "profile", "model": model, "steps": 2, "warmup": 1, "rep": 0}
                    for model in PROFILED]
    return configs


def summarize(results: list[dict]) -> dict:
    """Medians over processes, per-repetition ratios of each comparison, FLOP/s analysis."""
    ok = [r for r in results if "error" not in r]
    train = {}
    for r in ok:
        if r["kind"] == "train":
            train.setdefault(r["model"], []).append(r)
    models = {}
    for name, rs in train.items():
        counted = next((r for r in rs if "macs" in r), {})
        models[name] = {
            "images_per_s": statistics.median(r["images_per_s"] for r in rs),
            "all_images_per_s": [r["images_per_s"] for r in rs],
            "step_s": statistics.median(r["step_s"] for r in rs),
            "peak_mb": statistics.median(r["peak_mb"] for r in rs),
            "trainable_params": rs[0]["trainable_params"],
            "macs": counted.get("macs"), "evaluations": counted.get("evaluations"),
            "batch": rs[0]["batch"], "steps": rs[0]["steps"], "warmup": rs[0]["warmup"],
            "processes": len(rs),
        }
    comparisons = []
    for model, base, target, what in COMPARISONS:
        if model not in models or base not in models:
            comparisons.append({"model": model, "base": base, "target": target,
                                "what": what, "ratio": None})
            continue
        scale = 1.0
        if "MACs" in what:
            scale = models[model]["macs"] / models[base]["macs"]
        by_rep = {}
        for r in ok:
            if r["kind"] == "train" and r["model"] in (model, base):
                by_rep.setdefault(r["rep"], {})[r["model"]] = r["images_per_s"]
        per_rep = [v[model] / v[base] * scale for v in by_rep.values() if len(v) == 2]
        comparisons.append({
            "model": model, "base": base, "target": target, "what": what, "scale": scale,
            "per_rep": per_rep, "ratio": statistics.median(per_rep) if per_rep else None,
            "ratio_of_medians": models[model]["images_per_s"] / models[base]["images_per_s"]
            * scale,
        })
    matmul = [r for r in ok if r["kind"] == "matmul"]
    sizes = sorted({int(n) for r in matmul for n in r["flops"]})
    matmul_flops = {n: statistics.median(r["flops"][str(n)] for r in matmul) for n in sizes}
    pipelines = {r["dataset"]: r for r in ok if r["kind"] == "pipeline"}
    profiles = {r["model"]: r for r in ok if r["kind"] == "profile"}
    # Training FLOP/s over the matmul rate of the same repetition (the same machine state).
    fractions = {}
    for name, model in models.items():
        if not model.get("macs"):
            continue
        per_rep = [r["images_per_s"] * model["macs"] * 6 / m["best_flops"]
                   for r in train[name] for m in matmul if m["rep"] == r["rep"]]
        if per_rep:
            fractions[name] = {"per_rep": per_rep, "median": statistics.median(per_rep)}
    return {"models": models, "comparisons": comparisons, "matmul": matmul_flops,
            "fractions": fractions,
            "pipelines": pipelines, "profiles": profiles,
            "errors": [r for r in results if "error" in r]}


# ----------------------------------------------------------------------------- the doc


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def training_flops(model: dict) -> float | None:
    """images/s × MACs per image × 2 FLOPs per MAC × 3 (forward + backward)."""
    if not model or not model.get("macs"):
        return None
    return model["images_per_s"] * model["macs"] * 6


def write_doc(summary: dict, meta: dict, out: Path, record=None) -> Path:
    """``<out>/performance.md`` from the measured ``summary`` (no hand-typed measurements)."""
    models, comps = summary["models"], summary["comparisons"]
    lines = [
        *([*run_record.page_header(record), ""] if record else []),
        "# Performance baseline: training throughput",
        "",
        "The benchmark: `python -m benchmarks.throughput [--quick] [--out docs]` (one "
        "command measures everything and rewrites this page; `--quick` is one repetition "
        "without the profiles). This page was generated by the command"
        + ("s" if len(meta["commands"]) > 1 else "") + " below; every number on it is "
        "measured there except the published MAC counts ([reference.md](reference.md) §2), "
        "which are labelled.",
        "",
        "```bash",
        *meta["commands"],
        "```",
        "",
        *([f"(then `{meta['merge']}` wrote this page from their `--json` results)", ""]
          if meta.get("merge") else []),
        f"- Date (UTC): {meta['date']}; wall time: {meta['wall_s'] / 60:.1f} min.",
        f"- Machine: {meta['machine']}.",
        f"- Load: 1-minute load average {meta['load_before']:.2f} before and "
        f"{meta['load_after']:.2f} after the run on {os.cpu_count()} cores"
        + (" — **a shared machine: other jobs ran during the measurement**, so absolute "
           "rates are low and noisy; the alternated ratios are the robust numbers."
           if max(meta["load_before"], meta["load_after"]) > 1.5 else "."),
        *([f"- Note: {meta['note']}"] if meta.get("note") else []),
        "",
        "## Method",
        "",
        "- **Each configuration runs in its own process** (`python -m benchmarks.throughput "
        "--worker JSON`). The training processes of the models run one after another in "
        f"each of {meta['repeats']} repetition(s), in an order rotated from one repetition to "
        "the next (A B C D, B C D A, …), followed by a matmul process. A comparison's ratio "
        "is the median over repetitions of the ratio of the two processes of the same "
        "repetition, so slow drift of the machine cancels.",
        "- **A training step is what `kode train` runs**: the model is compiled with "
        "`kode.training.make_optimizer` (SGD, momentum 0.9, weight decay 1e-4), sparse "
        "cross-entropy and an accuracy metric, `jit_compile=False` (XLA measured 2–6× slower "
        "on this CPU), and trained with `model.fit` on a cached, prefetched in-memory "
        f"`tf.data` stream of random images (batch {BATCH}, 32×32×3, 10 classes): no Python "
        "runs between steps except Keras' callbacks. Step time: between the "
        "`on_train_batch_begin`/`_end` callbacks of the timed steps after the warm-up "
        "steps; images/s = batch / median step time.",
        "- **Peak memory**: `VmHWM` of the process (kernel's peak resident set), reset to the "
        "current RSS after the warm-up steps, read after the timed steps. TensorFlow's "
        "allocator keeps its pool, so this is the process's whole footprint during training.",
        "- **MACs per image** (`count_macs`): the forward graph at batch 1 is traced and every "
        "Conv2D (|output| · k_h · k_w · c_in/groups) and MatMul (m · k · n) op is counted; "
        "functions that an integrator evaluates twice are counted twice.",
        "- **Training FLOP/s** = images/s × MACs × 2 (FLOPs per multiply-add) × 3 (forward + "
        "a backward of about two forwards). **Matmul FLOP/s** = 2n³ / median time of a "
        "float32 `tf.matmul` of two n×n matrices inside a `tf.function` (best n).",
        "",
        "## Training throughput",
        "",
        "| model | trainable params | MACs / image | function evaluations | images/s (median) "
        "| per process | step s | peak RSS MB | processes |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name in (*TRAIN_MODELS, DIGITS_MODEL):
        m = models.get(name)
        if not m:
            continue
        label = name + (f" (8×8×1 digits, batch {m['batch']})" if name == DIGITS_MODEL else "")
        macs = f"{m['macs'] / 1e6:.1f}M" if m.get("macs") else "—"
        lines.append(
            f"| {label} | {m['trainable_params']:,} | {macs} | {m.get('evaluations') or '—'} | "
            f"{m['images_per_s']:.1f} | "
            + ", ".join(f"{v:.1f}" for v in m["all_images_per_s"])
            + f" | {m['step_s']:.3f} | {m['peak_mb']:.0f} | {m['processes']} |")
    any_model = next(iter(models.values()), None)
    if any_model:
        lines += ["", f"Per process: {any_model['warmup']} warm-up and {any_model['steps']} "
                  "timed steps. `reference_resnet56` is `benchmarks.throughput."
                  "reference_resnet`: a plain functional Keras model (Conv2D, "
                  "BatchNormalization, ReLU, Add) with the same layers, initializers and "
                  "trainable parameter count as the zoo's `resnet56` (checked by "
                  "`tests/benchmarks/test_throughput.py`)."]
    lines += ["", "### MAC counts against the published ones", "",
              "| model | counted | published ([reference.md](reference.md) §2) |",
              "|---|---:|---:|"]
    for name, macs in meta.get("mac_check", {}).items():
        lines.append(f"| {name} | {macs / 1e6:.1f}M | {PUBLISHED_MACS[name] / 1e6:.1f}M |")
    lines += ["", "## Targets", "",
              "| comparison | ratio (median of per-repetition ratios) | per repetition | "
              "ratio of medians | target | verdict |", "|---|---:|---|---:|---:|---|"]
    for c in comps:
        target = "—" if c["target"] is None else f"≥ {c['target']}"
        if c["ratio"] is None:
            lines.append(f"| {c['model']} / {c['base']} | — | | | {target} | not measured |")
            continue
        verdict = ("before/after" if c["target"] is None else
                   "**met**" if c["ratio"] >= c["target"] else "**missed**")
        lines.append(
            f"| {c['model']} / {c['base']} ({c['what']}) | {c['ratio']:.3f} | "
            + ", ".join(f"{v:.3f}" for v in c["per_rep"])
            + f" | {c['ratio_of_medians']:.3f} | {target} | {verdict} |")
    heun = next((c for c in comps if c["model"] == "heun_resnet56" and c["ratio"]), None)
    if heun and models.get("heun_resnet56", {}).get("evaluations"):
        h, r = models["heun_resnet56"], models["resnet56"]
        lines += ["", "Heun normalization: `heun_resnet56` holds the same residual functions "
                  "as `resnet56` but evaluates each inner one twice (k1 and k2; N functions "
                  "give N−1 steps of 2 evaluations), so an image costs more work. Its "
                  "images/s are multiplied by the work per image relative to `resnet56`: "
                  f"counted MACs {h['macs'] / 1e6:.1f}M / {r['macs'] / 1e6:.1f}M = "
                  f"{heun['scale']:.3f} (residual-function evaluations "
                  f"{h['evaluations']} / {r['evaluations']} = "
                  f"{h['evaluations'] / r['evaluations']:.3f}; the MAC ratio is the exact "
                  "one, as stem, projections and head are not evaluated twice). A ratio of 1 "
                  "means Heun's extra evaluations cost exactly what they compute."]
    lines += ["", "## Against the machine: FLOP/s", "",
              "| n | float32 matmul GFLOP/s (median over processes) |", "|---:|---:|"]
    for n, f in summary["matmul"].items():
        lines.append(f"| {n} | {f / 1e9:.1f} |")
    lines.append("")
    for name in TRAIN_MODELS:
        f, frac = training_flops(models.get(name)), summary.get("fractions", {}).get(name)
        if f and frac:
            lines.append(f"- `{name}`: {f / 1e9:.1f} GFLOP/s achieved in training (median "
                         f"over processes); over the matmul rate of the same repetition: "
                         f"**{frac['median']:.2f}** (per repetition "
                         + ", ".join(f"{v:.2f}" for v in frac["per_rep"]) + ").")
    lines += ["", "## Input pipelines", "",
              "| dataset | source | batch | pipeline images/s | model trained on it | "
              "model images/s | pipeline / model | target | verdict |",
              "|---|---|---:|---:|---|---:|---:|---:|---|"]
    for dataset, model_name in (("digits", DIGITS_MODEL), ("cifar10", "resnet56")):
        p = summary["pipelines"].get(dataset)
        m = models.get(model_name)
        if not p:
            continue
        source = ("scikit-learn's bundled digits (real data)" if dataset == "digits" else
                  f"`tfds.testing.mock_data` ({p.get('mock_examples', 2560)} random images in "
                  "CIFAR-10's format; this machine cannot download CIFAR)")
        ratio = p["images_per_s"] / m["images_per_s"] if m else None
        verdict = "—" if ratio is None else ("**met**" if ratio >= PIPELINE_TARGET
                                              else "**missed**")
        lines.append(f"| {dataset} | {source} | {p['batch']} | {p['images_per_s']:,.0f} | "
                     f"{model_name} | {_fmt(m and m['images_per_s'], 1)} | {_fmt(ratio, 1)} | "
                     f"≥ {PIPELINE_TARGET:g} | {verdict} |")
    lines += ["", "Pipeline rate: `kode.data.load_dataset(name, batch_size=…)` train split "
              "with the training augmentation (digits: none by default; CIFAR: pad-4 random "
              "crop and flip), `.repeat()` as `kode train` uses it, iterated alone in its own "
              "process after one epoch that fills the cache (`cache → shuffle → parallel "
              "map → batch → prefetch`)."]
    lines += profile_table(summary.get("profiles", {}))
    lines += ["", *meta.get("findings", [])]
    if summary["errors"]:
        lines += ["", "## Failed processes", ""]
        lines += [f"- `{json.dumps({k: v for k, v in e.items() if k != 'error'})}`: "
                  f"{e['error']}" for e in summary["errors"]]
    return run_record.write_page(out / "performance.md", lines)




def _profile_share(profile: dict, key: str) -> float:
    return profile["op_ms"].get(key, 0.0) / sum(profile["op_ms"].values())


def profile_table(profiles: dict) -> list[str]:
    """Op time per category from the profiler traces (one process per model)."""
    if not profiles:
        return []
    keys = [f"{d} {c}" for d in ("fwd", "bwd") for c in PROFILE_CATEGORIES]
    keys = [k for k in keys if any(k in p["op_ms"] for p in profiles.values())]
    lines = ["", "## Where the time goes (TensorFlow profiler)", "",
             "`tf.profiler.experimental` trace of training steps after a warm-up step, one "
             "process per model; host op events summed by category, in ms of op time per "
             "step (summed over the threads that ran them, so it exceeds the wall time on 2 "
             "cores), and as a share of all op time. `bwd`: ops under `gradient_tape/` and "
             "the gradient sums (AddN). `other`: residual adds, integrator arithmetic "
             "(h·f, LM mixing, Heun's averaging), loss, pooling and dense head.",
             "", "| model | wall ms/step | " + " | ".join(keys) + " | Mul/Add/Sub/Sum ops per "
             "step |", "|---|---:|" + "---:|" * len(keys) + "---:|"]
    for name, p in profiles.items():
        ops = sum(v for k, v in p["elementwise_ops_per_step"].items()
                  if k in ("Mul", "AddV2", "Sub", "Sum"))
        lines.append(f"| {name} | {p['wall_ms']:.0f} | " + " | ".join(
            f"{p['op_ms'].get(k, 0):.0f} ({100 * _profile_share(p, k):.0f}%)" for k in keys)
            + f" | {ops:.0f} |")
    return lines


def _load1() -> float:
    return os.getloadavg()[0]


def run_all(args) -> None:
    """Run the plan (or read ``--merge`` results of an earlier run) and write the doc."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python -m benchmarks.throughput " + shlex.join(sys.argv[1:])).strip()
    merged = [m for path in args.merge or [] for m in json.loads(Path(path).read_text())
              if m["kind"] == "meta"]
    record = run_record.start_record(command, args.allow_load, load=max(
        (m["load_before"] for m in merged), default=None))
    if args.merge:
        # Repetitions of different runs are different repetitions: pair processes per run.
        records = [{**r, "rep": f"{i}:{r.get('rep', 0)}"} for i, path in enumerate(args.merge)
                   for r in json.loads(Path(path).read_text())]
        metas = [r for r in records if r["kind"] == "meta"]
        results = [r for r in records if r["kind"] != "meta"]
        meta = {**metas[0], "commands": [m["command"] for m in metas],
                "wall_s": sum(m["wall_s"] for m in metas),
                "repeats": len({r["rep"] for r in results if r["kind"] == "train"
                                and r["model"] == "resnet56"}),
                "load_before": max(m["load_before"] for m in metas),
                "load_after": max(m["load_after"] for m in metas),
                "merge": "python -m benchmarks.throughput " + shlex.join(sys.argv[1:])}
    else:
        results, meta = run_plan(args)
        meta["commands"] = [meta["command"]]
    summary = summarize(results)
    mac_check = next((r for r in results if r["kind"] == "macs" and "error" not in r), {})
    meta = {**meta, "mac_check": mac_check.get("macs", {}), "findings": findings(summary)}
    run_record.finish_record(record, meta["load_after"] if args.merge else None)
    path = write_doc(summary, meta, out, record)
    run_record.write_record(path, record, {"meta": meta, "results": results},
                            throughput_claims.per_process_claims(summary))
    print(f"wrote {path} and its .json", flush=True)


def run_plan(args) -> tuple[list[dict], dict]:
    """Every configuration of :func:`plan` in its own process, in order."""
    command = ("python -m benchmarks.throughput " + shlex.join(sys.argv[1:])).strip()
    started, load_before = time.monotonic(), _load1()
    configs = plan(args.quick, args.repeats, args.parts)
    results: list[dict] = []
    meta = {"kind": "meta", "command": command, "machine": machine_description(),
            "load_before": load_before,
            "repeats": len({c["rep"] for c in configs if c["kind"] == "train"}),
            "note": args.note}
    for i, cfg in enumerate(configs):
        r = measure(cfg)
        results.append(r)
        if "error" in r:
            status = r["error"]
        elif r["kind"] == "train":
            status = f"{r['images_per_s']:.1f} img/s, peak {r['peak_mb']:.0f} MB"
        elif r["kind"] == "matmul":
            status = ", ".join(f"{n}: {f / 1e9:.1f} GFLOP/s" for n, f in r["flops"].items())
        elif r["kind"] == "macs":
            status = ", ".join(f"{n}: {m / 1e6:.1f}M MACs" for n, m in r["macs"].items())
        elif r["kind"] == "profile":
            status = f"{r['wall_ms']:.0f} ms/step profiled"
        else:
            status = f"{r['images_per_s']:.0f} img/s"
        desc = " ".join(str(cfg[k]) for k in ("kind", "model", "dataset", "rep") if k in cfg)
        print(f"[{i + 1}/{len(configs)} {time.monotonic() - started:.0f}s] {desc}: {status} "
              f"(process {r['wall_s']:.0f} s)", flush=True)
        meta.update(wall_s=time.monotonic() - started, load_after=_load1(),
                    date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"))
        if args.json:
            from kode.io import write_json

            write_json(args.json, [meta, *results], indent=1)
    return results, meta


def run_macs_worker(cfg: dict) -> dict:
    """MACs per image of each zoo model in ``cfg["models"]`` (32×32×3, 10 classes)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return {**cfg, "macs": {name: count_macs(build_model(name)) for name in cfg["models"]}}


WORKERS["macs"] = run_macs_worker


def _comparison(summary: dict, model: str, base: str) -> dict | None:
    return next((c for c in summary["comparisons"] if c["model"] == model
                 and c["base"] == base and c["ratio"] is not None), None)


def _op_ms(profile: dict | None, *keys: str) -> float:
    return sum(profile["op_ms"].get(k, 0.0) for k in keys) if profile else float("nan")


def findings(summary: dict) -> list[str]:
    """The findings section: every number in it is computed from ``summary``."""
    models, profiles = summary["models"], summary.get("profiles", {})
    out = ["## Findings", ""]
    zoo, fix = _comparison(summary, "resnet56", REFERENCE), _comparison(summary, "resnet56",
                                                                         PRE_FIX)
    if zoo:
        text = (f"- **Zoo vs hand-written Keras** ({zoo['ratio']:.3f}×, target ≥ 0.97: "
                f"{'met' if zoo['ratio'] >= 0.97 else 'missed'}). Both graphs run the same "
                "57 convolutions and 57 batch normalizations; kode's layers (nested "
                "`IntegratorStage`, `BasicBlock`, `TransitionBlock`) cost graph-tracing time "
                "(the first step), not step time.")
        lo, hi = min(zoo["per_rep"]), max(zoo["per_rep"])
        if lo < 0.97 <= hi:
            text += (f" The per-repetition ratios span {lo:.2f}–{hi:.2f} (ratio of medians "
                     f"{zoo['ratio_of_medians']:.2f}): the distance to the target is far "
                     "smaller than the process-to-process spread, so this run cannot tell "
                     "0.97× from 1.0×; the verdict above is the median's, not a measured "
                     "slowdown.")
        if min(zoo["per_rep"]) > 1.05:
            text += (" The hand-written model was slower in every repetition (per "
                     "repetition " + ", ".join(f"{v:.2f}" for v in zoo["per_rep"]) + "), "
                     "although its graph has the same ops; the cause (Keras' `Add`/`ReLU` "
                     "layers against kode's inline ops, or op scheduling) is not "
                     "established by this benchmark.")
        pz, pr = profiles.get("resnet56"), profiles.get(REFERENCE)
        if pz and pr:
            count = {name: sum(p["elementwise_ops_per_step"].get(k, 0)
                               for k in ("Mul", "AddV2", "Sub", "Sum"))
                     for name, p in (("z", pz), ("r", pr))}
            text += (f" Profiled, the zoo model runs {count['z']:.0f} Mul/Add/Sub/Sum ops per "
                     f"step against the reference's {count['r']:.0f}.")
        if fix:
            text += (" The profiler found the one difference there was: every Euler step "
                     "computed x + h·f(x) with h = 1, an extra multiply of the whole state "
                     "forward and backward (25 Euler steps in ResNet-56). "
                     "`kode.integrators.scale` now skips it when h = 1 (bitwise the same "
                     "result: 1·y = y for every float), and the op counts above are now "
                     "equal. Measured in this run, `resnet56` trains at "
                     f"{fix['ratio']:.3f}× the speed of `{PRE_FIX}` (the model with the "
                     "multiply, alternated in the same repetitions: per repetition "
                     + ", ".join(f"{v:.2f}" for v in fix["per_rep"]) + ").")
            spread = statistics.pstdev(models["resnet56"]["all_images_per_s"]) / \
                models["resnet56"]["images_per_s"] if models["resnet56"]["processes"] > 1 \
                else None
            if spread is None or spread > abs(fix["ratio"] - 1):
                text += (" That ratio is within the process-to-process noise of this run "
                         + ("(one repetition)" if spread is None else
                            f"(ResNet-56's images/s vary by ±{100 * spread:.0f}% between its "
                            "processes)")
                         + ": 25 elementwise passes are small next to 57 convolutions, and "
                         "the equal op counts are the firm evidence.")
        out.append(text)
    lm = _comparison(summary, "lm_resnet56", "resnet56")
    if lm:
        pl, pz = profiles.get("lm_resnet56"), profiles.get("resnet56")
        text = (f"- **LM-ResNet-56 vs ResNet-56** ({lm['ratio']:.3f}×, target ≥ 0.95: "
                f"{'met' if lm['ratio'] >= 0.95 else 'missed'}). The LM step "
                "u ← (1−k)u + k·u_prev + f(u), computed on (u, d = u − u_prev) as "
                "t = f(u) − k·d, u ← u + t, d ← t, adds a product and an add forward, and the "
                "backward of a trainable scalar k is a reduction over the whole state: "
                "∂L/∂k = −Σ g_t·d (a multiply and a full sum per block), plus the scaled "
                "gradient −k·g_t and the sum g_t of t's two uses.")
        if pl and pz:
            # Shares of each process's own op time: robust to load, unlike absolute times.
            s_lm = _op_ms(pl, "fwd other", "bwd other") / sum(pl["op_ms"].values())
            s_rn = _op_ms(pz, "fwd other", "bwd other") / sum(pz["op_ms"].values())
            text += (f" Profiled, the `other` ops (where that arithmetic sits) take "
                     f"{100 * s_lm:.0f}% of LM-ResNet-56's op time against {100 * s_rn:.0f}% "
                     "of ResNet-56's; if everything else costs the same, that alone predicts "
                     f"a ratio of (1 − {s_lm:.3f}) / (1 − {s_rn:.3f}) = "
                     f"{(1 - s_lm) / (1 - s_rn):.2f}.")
        text += (" These are memory-bound elementwise passes over a 128×32×32×16 float32 "
                 "state (8 MiB) that TensorFlow runs as separate kernels. What rewriting "
                 "the step removes at the library's level, the (u, d) form removes (the "
                 "same map up to rounding, tests/core/test_integrators.py); fusing the rest "
                 "needs XLA, which is "
                 "2–6× slower overall on this CPU (README). The cost is the LM scheme's "
                 "(a trainable mixing per block), not kode's abstraction's.")
        out.append(text)
    heun = _comparison(summary, "heun_resnet56", "resnet56")
    if heun:
        h, r = models.get("heun_resnet56", {}), models.get("resnet56", {})
        text = (f"- **Heun per function evaluation** ({heun['ratio']:.3f}×, target ≥ 0.95: "
                f"{'met' if heun['ratio'] >= 0.95 else 'missed'}). Besides its 2 "
                "evaluations, a Heun step adds x + k1 and the average x + (k1 + k2)/2 (four "
                "elementwise passes per step against one for Euler), and it keeps k1, k2 and "
                "x + k1 alive for the backward")
        if h.get("peak_mb") and r.get("peak_mb"):
            text += (f": peak RSS {h['peak_mb']:.0f} MB against {r['peak_mb']:.0f} MB for "
                     "ResNet-56")
        out.append(text + ". These are the scheme's own operations (the same numerics "
                   "argument as for LM applies to fusing them).")
    frac = summary.get("fractions", {}).get("resnet56")
    pz = profiles.get("resnet56")
    if frac:
        text = (f"- **FLOP/s**: ResNet-56 training reaches {frac['median']:.2f} of the "
                "FLOP/s of a large float32 matmul measured in the same repetition.")
        if pz:
            total = sum(pz["op_ms"].values())
            conv = _op_ms(pz, "fwd conv", "bwd conv")
            bn = _op_ms(pz, "fwd batchnorm", "bwd batchnorm")
            text += (f" Convolutions take {100 * conv / total:.0f}% of the op time and batch "
                     f"normalization {100 * bn / total:.0f}%: Keras 3's `BatchNormalization` "
                     "is not TensorFlow's fused kernel but moments + elementwise ops "
                     "(mean, squared difference, mean, rsqrt, multiply, subtract, and their "
                     "gradients), each a pass over the activations. The hand-written Keras "
                     "model pays exactly the same. Replacing it with `tf.nn."
                     "fused_batch_norm` would change the layer class (saved `.keras` files) "
                     "and the variance's rounding, so kode keeps Keras' layer.")
        text += (" Data layout: the models are NHWC "
                 "(Keras' default, what TensorFlow's CPU convolutions take; no other layout "
                 "was measured); the input pipeline is not "
                 "the limit (below; training here reads a cached, prefetched in-memory "
                 "stream); `jit_compile` stays off (XLA measured 2–6× slower on this CPU, "
                 "README).")
        out.append(text)
    pipes = summary["pipelines"]
    if pipes:
        out.append("- **Input pipelines** (`cache → shuffle → parallel map → batch → "
                   "prefetch`, no Python per element): " + "; ".join(
                       f"{name} {p['images_per_s']:,.0f} images/s" for name, p in
                       pipes.items()) + ", far above the training rates they feed.")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Training throughput baseline.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="1 repetition of 1+3 steps, no MAC check (≤ 5 min, quiet 2 cores)")
    parser.add_argument("--out", default="docs", help="directory for performance.md")
    parser.add_argument("--repeats", type=int, help="repetitions of the alternated processes")
    parser.add_argument("--json", help="write the raw per-process results here")
    parser.add_argument("--note", help="a sentence added to the doc")
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="run only these parts (default: all; --quick: "
                        + " ".join(QUICK_PARTS) + ")")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="write the doc from --json files of earlier runs, run nothing")
    parser.add_argument("--paired", action="store_true",
                        help="in-process paired timing of all models (ratios with bootstrap "
                        "95%% intervals); writes performance.md")
    parser.add_argument("--rounds", type=int, help="--paired: rounds (default 30, quick 8)")
    run_record.add_allow_load(parser)
    args = parser.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print(RESULT_PREFIX + json.dumps(WORKERS[cfg["kind"]](cfg)), flush=True)
        return
    if args.paired:
        run_paired(args)
        return
    run_all(args)


if __name__ == "__main__":
    main()
