"""Strategies: MirroredStrategy over 2 logical CPU devices and MultiWorkerMirroredStrategy over
2 worker processes on localhost reproduce one-device training; bad cluster input fails fast.

Models with BatchNorm are compared with synchronized BatchNorm (``sync_batchnorm``): with
per-replica statistics each replica normalizes over half the batch, which is another model (shown
below). Under MirroredStrategy the adjoint is compared on a BN-free dense model against one
device, and with synchronized BN against backprop on two devices (same collectives, same weights).
Logical devices and collective ops must be configured before TensorFlow starts, hence the
subprocesses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kode.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIRRORED = textwrap.dedent("""
    import json
    from kode.distribute import configure_cpu_devices, make_strategy, synchronize_batchnorm
    configure_cpu_devices(2)
    import keras, numpy as np, tensorflow as tf
    import zoo
    from kode import IntegratorStage

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10

    def dense_model(mode):
        # No BatchNorm: an exactly reversible stage of 4 dense residual functions.
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Flatten()(inputs)
        h = keras.layers.Dense(16)(h)
        fns = [keras.layers.Dense(16, activation="tanh") for _ in range(4)]
        h = IntegratorStage(fns, "reversible_heun", step_size="ode", gradient=mode)(h)
        return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(h))

    def run(strategy, kind, mode, sync=False):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            if kind == "dense":
                model = dense_model(mode)
            else:
                model = zoo.create_model("revheun_resnet20", depth=8, input_shape=(8, 8, 1),
                                         gradient=mode)
            if sync:
                synchronize_batchnorm(model)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                          "sparse_categorical_crossentropy", jit_compile=False)
        # batch 16 splits evenly over 2 replicas; shuffle=False: the same batches everywhere
        losses = model.fit(x, y, batch_size=16, epochs=3, shuffle=False,
                           verbose=0).history["loss"]
        return losses, [w.tolist() for w in model.get_weights()]

    one = tf.distribute.get_strategy()
    two = make_strategy("mirrored", devices=2)
    out = {"replicas": two.num_replicas_in_sync}
    cases = {"dense-backprop": ("dense", "backprop", False),
             "dense-adjoint": ("dense", "adjoint", False),
             "revheun-syncbn": ("revheun", "backprop", True)}
    for name, case in cases.items():
        out[name] = {"one": run(one, *case), "two": run(two, *case)}
    out["per_replica_bn"] = run(two, "revheun", "backprop", False)[0]
    print("RESULT " + json.dumps(out))
""")


def _python(code: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def _result(stdout: str) -> dict:
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


def test_mirrored_over_two_cpu_devices_matches_one_device(tmp_path):
    out = _python(MIRRORED)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _result(out.stdout)
    assert result["replicas"] == 2
    for case in ("dense-backprop", "dense-adjoint", "revheun-syncbn"):
        (loss_one, w_one), (loss_two, w_two) = result[case]["one"], result[case]["two"]
        # Tolerance: float32 reductions in another order (the all-reduce of the two replicas'
        # gradients and BN moments), amplified over 6 SGD steps; measured ~1e-6.
        np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
        worst = max(float(np.max(np.abs(np.subtract(a, b))))
                    for a, b in zip(w_one, w_two, strict=True))
        assert worst < 1e-4, f"{case}: max |w_mirrored - w_one| = {worst}"
        print(f"{case}: max |w_mirrored - w_one| = {worst:.2e}")
        assert loss_one[-1] < loss_one[0]
    # Per-replica BatchNorm (Keras' default) is a different model: the check above can fail.
    per_replica = result["per_replica_bn"]
    assert np.max(np.abs(np.subtract(per_replica, result["revheun-syncbn"]["one"][0]))) > 1e-3


SYNC_BN_RECOMPUTED = textwrap.dedent("""
    import json
    from kode.distribute import configure_cpu_devices, make_strategy, synchronize_batchnorm
    configure_cpu_devices(2)
    import keras, numpy as np, tensorflow as tf
    import zoo

    calls = []
    all_reduce = tf.distribute.ReplicaContext.all_reduce
    def counted(self, *args, **kwargs):
        calls.append(1)
        return all_reduce(self, *args, **kwargs)
    tf.distribute.ReplicaContext.all_reduce = counted

    x = np.random.default_rng(0).standard_normal((32, 8, 8, 1)).astype("float32")
    y = np.arange(32) % 10
    strategy = make_strategy("mirrored", devices=2)
    out = {}
    for mode in ("backprop", "adjoint", "checkpoint"):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = zoo.create_model("revheun_resnet20", depth=8, input_shape=(8, 8, 1),
                                     gradient=mode)
            synchronize_batchnorm(model)
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                          "sparse_categorical_crossentropy", jit_compile=False)
        calls.clear()
        # 1 epoch of 2 steps: the second step's loss depends on the first step's gradients.
        losses = model.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                           verbose=0).history["loss"]
        out[mode] = {"losses": losses, "all_reduces": len(calls),
                     "weights": [w.tolist() for w in model.get_weights()]}
    print("RESULT " + json.dumps(out))
""")


def test_synchronized_batchnorm_recomputation_reuses_the_forward_all_reduce():
    # The backward's recomputation used to all-reduce BN moments again; the extra collectives
    # raced the optimizer's all-reduce between replica threads ("Shape mismatch in the
    # collective instance"). Now it reuses the forward's sums: as many all-reduces as backprop,
    # with the transitions (depth 8: two) recomputed too in adjoint and checkpoint mode.
    out = _python(SYNC_BN_RECOMPUTED, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _result(out.stdout)
    backprop = result["backprop"]
    assert backprop["all_reduces"] > 0
    for mode in ("adjoint", "checkpoint"):
        assert result[mode]["all_reduces"] == backprop["all_reduces"], mode
        np.testing.assert_allclose(result[mode]["losses"], backprop["losses"], rtol=1e-5)
        worst = max(float(np.max(np.abs(np.subtract(a, b)))) for a, b in
                    zip(result[mode]["weights"], backprop["weights"], strict=True))
        assert worst < 1e-4, f"{mode}: max |w - w_backprop| = {worst}"


def test_kode_train_mirrored_over_two_devices(tmp_path):
    # Its own process: after several models trained under MirroredStrategy in one process,
    # a later fit failed with "Shape mismatch in the collective instance" (see the docs).
    out = subprocess.run([sys.executable, "-m", "kode.cli", *TRAIN, "--strategy", "mirrored",
                          "--devices", "2", "--no-diagnostics", "--logdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["strategy"] == "mirrored" and config["replicas"] == 2


WORKER = textwrap.dedent("""
    import json, os, sys
    from kode.compat import coordination_service_config
    from kode.distribute import make_strategy
    strategy = make_strategy("multiworker", connect_timeout=60)
    import keras, numpy as np
    from kode.training import train
    out = {"heartbeat_ms": coordination_service_config().heartbeat_timeout_in_ms}
    for mode in ("adjoint",):  # backprop's distributed loop is the same loop (CI time)
        r = train("revheun_resnet20", "digits", epochs=1, batch_size=256,
                  model_options={"depth": 8}, gradient=mode, strategy=strategy,
                  sync_batchnorm=True, logdir=os.path.join(sys.argv[1], mode),
                  diagnostics=False, verbose=0)
        out[mode] = {"loss": r.history["loss"], "test": r.test_metrics,
                     "weights": [w.tolist() for w in r.model.get_weights()],
                     "logdir": r.logdir}
    print("RESULT " + json.dumps(out))
""")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _run_two_workers(logdir, env):
    ports = _free_ports(2)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(logdir)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **env, "TF_CONFIG": _tf_config(ports, i)})
        for i in range(2)
    ]
    return workers, [w.communicate(timeout=400) for w in workers]


def test_two_workers_on_localhost_match_one_worker_with_the_same_global_batch(tmp_path):
    env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
    two = tmp_path / "two"
    workers, outputs = _run_two_workers(two, env)
    if any(w.returncode and "stopped sending heartbeats" in err
           for w, (_, err) in zip(workers, outputs, strict=True)):
        # Seen once with other TensorFlow jobs on the 2 cores: a worker starved past the
        # coordination service's heartbeat timeout. A machine-load failure, not a result:
        # run the pair once more in a fresh directory.
        two = tmp_path / "two-again"
        workers, outputs = _run_two_workers(two, env)
    failed = [f"worker {i} (exit {w.returncode}): {err[-2000:]}"
              for i, (w, (_, err)) in enumerate(zip(workers, outputs, strict=True))
              if w.returncode]
    assert not failed, "\n".join(failed)  # every worker's error: the first may be a symptom
    single = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path / "one")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env, "TF_CONFIG": _tf_config(_free_ports(1), 0)})
    assert single.returncode == 0, single.stderr[-3000:]
    chief, other, one = (_result(o) for o in (outputs[0][0], outputs[1][0], single.stdout))
    from kode.distribute.strategy import DEFAULT_HEARTBEAT_TIMEOUT

    assert chief["heartbeat_ms"] == other["heartbeat_ms"] == DEFAULT_HEARTBEAT_TIMEOUT * 1000
    for mode in ("adjoint",):
        # Same global batch (256; the ragged last batch of 157 is split between the workers
        # and weighted exactly). Measured: step 1 equal, later steps drift to ~2e-4 relative:
        # float32 reduction order (two partial sums per all-reduce), amplified ~1e4 by 6
        # training steps, the same as a 1e-7 weight perturbation on one device
        # (docs/distributed.md, benchmarks/training_sensitivity.py): tolerance 1e-3.
        # Per-worker BN or a wrong shard/weighting moves the loss by > 1e-2.
        np.testing.assert_allclose(chief[mode]["loss"], one[mode]["loss"], rtol=1e-3)
        np.testing.assert_allclose(chief[mode]["test"]["loss"], one[mode]["test"]["loss"],
                                   rtol=1e-3)
        worst = max(float(np.max(np.abs(np.subtract(a, b))))
                    for a, b in zip(chief[mode]["weights"], one[mode]["weights"], strict=True))
        print(f"{mode}: max |w_2workers - w_1worker| = {worst:.2e}")
        assert worst < 1e-2, f"{mode}: max |w_2workers - w_1worker| = {worst}"
        # Both workers hold the same (mirrored) weights; only the chief writes to the logdir.
        np.testing.assert_array_equal(chief[mode]["weights"][0], other[mode]["weights"][0])
        assert chief[mode]["logdir"] == str(two / mode)
        assert other[mode]["logdir"] == str(two / mode / "worker-1")
        assert os.path.isfile(os.path.join(chief[mode]["logdir"], "model.keras"))


def _error(capsys, argv, env=None, monkeypatch=None) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kode: error:"), err
    return lines[0]


TRAIN = ["train", "resnet20", "--option", "depth=8", "--epochs", "1"]


@pytest.mark.parametrize("tf_config, words", [
    (None, "needs TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "must be"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "HOST:PORT"),
    ('{"cluster": {"worker": ["127.0.0.1:2"]}, "task": {"type": "worker", "index": 3}}',
     "out of range"),
    ('{"cluster": {"ps": ["127.0.0.1:2"]}, "task": {"type": "ps", "index": 0}}',
     "'chief' and 'worker'"),
])
def test_malformed_tf_config_is_a_one_line_error(capsys, monkeypatch, tmp_path, tf_config,
                                                 words):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    line = _error(capsys, [*TRAIN, "--strategy", "multiworker", "--logdir", str(tmp_path)])
    assert words in line


def test_unreachable_worker_fails_within_the_connect_timeout(capsys, monkeypatch, tmp_path):
    own, absent = _free_ports(2)  # nobody listens on `absent`
    monkeypatch.setenv("TF_CONFIG", _tf_config([own, absent], 0))
    start = time.monotonic()
    line = _error(capsys, [*TRAIN, "--strategy", "multiworker", "--connect-timeout", "1.5",
                           "--logdir", str(tmp_path / "run")])
    assert time.monotonic() - start < 10
    assert f"127.0.0.1:{absent} unreachable after 1.5 s" in line
    assert not (tmp_path / "run").exists()  # a failed run leaves no empty run folder


@pytest.mark.parametrize("extra, words", [
    (["--strategy", "tpu"], "no TPU"),
    (["--strategy", "tpu", "--tpu", f"grpc://127.0.0.1:{_free_ports(1)[0]}"], "unreachable"),
    (["--devices", "2"], "'mirrored' only"),
    (["--strategy", "mirrored", "--devices", "0"], "positive integer"),
    (["--precision", "float8"], "invalid choice"),
])
def test_unavailable_strategies_and_bad_flags_are_one_line_errors(capsys, tmp_path, extra,
                                                                  words):
    assert words in _error(capsys, [*TRAIN, *extra, "--logdir", str(tmp_path)])


def test_unwritable_logdir_is_a_one_line_error(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not writable" in _error(capsys, [*TRAIN, "--logdir", str(blocker / "logs")])


def test_a_failing_run_removes_only_the_empty_folders_it_made(tmp_path):
    from kode.training.logdir import prepare_logdir, remove_if_empty

    (tmp_path / "runs").mkdir()
    made = prepare_logdir(str(tmp_path / "runs" / "a" / "b"))
    assert made == [str(tmp_path / "runs" / "a" / "b"), str(tmp_path / "runs" / "a")]
    assert prepare_logdir(str(tmp_path / "runs" / "a")) == []  # a second worker made nothing
    # The chief's run (a/b) and a worker's own folder in it: the worker fails first.
    worker = prepare_logdir(str(tmp_path / "runs" / "a" / "b" / "worker-1"))
    assert worker == [str(tmp_path / "runs" / "a" / "b" / "worker-1")]
    remove_if_empty(worker)
    assert (tmp_path / "runs" / "a" / "b").is_dir()  # the chief's folder stays
    # A folder that holds a file (written by another process meanwhile) is never removed,
    # nor are its parents; empty subfolders of an otherwise empty folder are.
    (tmp_path / "runs" / "a" / "b" / "train").mkdir()
    (tmp_path / "runs" / "a" / "b" / "model.keras").write_text("x")
    remove_if_empty(made)
    assert (tmp_path / "runs" / "a" / "b" / "model.keras").read_text() == "x"
    (tmp_path / "runs" / "a" / "b" / "model.keras").unlink()
    remove_if_empty(made)
    assert not (tmp_path / "runs" / "a").exists() and (tmp_path / "runs").is_dir()


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_and_restores_the_global_policy(tmp_path, precision):
    import keras

    from kode.training.pipeline import train

    result = train("resnet20", "digits", epochs=1, model_options={"depth": 8},
                   precision=precision, logdir=str(tmp_path), verbose=0)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert result.model.dtype_policy.name == precision
    assert np.isfinite(result.history["loss"]).all() and result.test_metrics["accuracy"] > 0.3
    scaled = isinstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")  # dynamic loss scaling for float16 only
