"""Bad input (issue 29, items 6 and 7): the ``kode`` command prints exactly one line
``kode: error: …`` on stderr and exits with 2; the Python API raises a ValueError
(:class:`kode.KodeError`) with the same words."""

import importlib.util
import os
import struct
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import kode
import zoo
from kode.cli import main
from kode.errors import KodeError
from kode.layers import BasicBlock, IntegratorStage, RecomputedSegment

KODE = [sys.executable, "-m", "kode.cli"]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``kode ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- Keras' backend (item 1)


def _backend_words(backend: str, where: str) -> str:
    missing = {"jax": "jax", "torch": "torch"}[backend]
    cannot = ("" if importlib.util.find_spec(missing) is not None
              else f", which cannot be imported here (No module named '{missing}')")
    return (f"kode needs Keras' TensorFlow backend, but Keras is set to '{backend}' ({where})"
            f"{cannot}; set the environment variable KERAS_BACKEND=tensorflow")


def _backend_settings(tmp_path, how: str) -> tuple[str, dict]:
    """(backend, environment) choosing another backend than TensorFlow by KERAS_BACKEND or by
    keras.json."""
    if how == "variable":
        return "jax", {**os.environ, "KERAS_BACKEND": "jax"}
    (tmp_path / "keras.json").write_text('{"backend": "torch"}')
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)
    return "torch", env


@pytest.mark.parametrize("how", ["variable", "keras.json"])
def test_another_keras_backend_is_one_error_at_import_and_one_line_from_the_command(
        tmp_path, how):
    backend, env = _backend_settings(tmp_path, how)
    where = "by KERAS_BACKEND" if how == "variable" else f"in {tmp_path / 'keras.json'}"
    words = _backend_words(backend, where)
    script = ("try:\n    import kode\nexcept ValueError as err:\n"
              "    print(type(err).__name__, err, sep=': ')\n")
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=env)
    assert api.stdout == f"KodeError: {words}\n", api.stdout + api.stderr
    imported = subprocess.run([sys.executable, "-c", "import kode"], capture_output=True,
                              text=True, timeout=300, env=env)
    assert imported.returncode == 1
    # The error is kode's own, not the failure deep inside Keras' backend import.
    assert imported.stderr.splitlines()[-1] == f"kode.errors.KodeError: {words}", imported.stderr
    assert "During handling" not in imported.stderr, imported.stderr
    script = os.path.join(os.path.dirname(sys.executable), "kode")  # the console entry point
    commands = [[*KODE, "--help"], [*KODE, "models"]]
    if os.path.isfile(script):
        commands.append([script, "--help"])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (
            2, "", f"kode: error: {words}\n"), (command, result.stderr)


def test_a_keras_already_running_on_another_backend_is_refused(monkeypatch):
    # No other backend is installed here: Keras' own answer stands in for one.
    from kode._tensorflow import check_keras_backend

    monkeypatch.setattr(keras.config, "backend", lambda: "jax")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(KodeError) as err:
        check_keras_backend()
    assert str(err.value) == ("kode needs Keras' TensorFlow backend, but Keras is set to 'jax' "
                              "(by KERAS_BACKEND); set the environment variable "
                              "KERAS_BACKEND=tensorflow")


# ---------------------------------------------------------------- .keras files (item 2)


def _small_model() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(x), name="small")


def _bad_file(tmp_path, kind: str) -> str:
    """A ``.keras`` file that must not load, of the given kind."""
    path = tmp_path / kind / "model.keras"
    path.parent.mkdir()
    if kind == "noise":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "lambda":
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Lambda(lambda t: 2.0 * t, name="double")(inputs)
        x = keras.layers.GlobalAveragePooling2D()(x)
        keras.Model(inputs, keras.layers.Dense(3)(x)).save(path)
    else:
        _small_model().save(path)
        data = bytearray(path.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # "corrupt": one byte of the weights changed, the zip's structure intact
            with zipfile.ZipFile(path) as archive:
                info = archive.getinfo("model.weights.h5")
            name_length, extra_length = struct.unpack(
                "<HH", data[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + name_length + extra_length
            data[start + info.compress_size // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return str(path)


_FILE_WORDS = {
    "noise": "is not a Keras model file (not a zip archive)",
    "truncated": "is truncated or corrupt (not a complete zip archive)",
    "corrupt": "is truncated or corrupt (model.weights.h5 fails its checksum)",
    "lambda": ("contains Python code (Lambda layer 'double'); kode does not load it: rebuild "
               "the model without Lambda layers"),
}


@pytest.mark.parametrize("kind", list(_FILE_WORDS))
def test_a_bad_keras_file_is_one_line_for_every_command_and_the_same_error_in_the_api(
        capsys, tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    words = f"'{path}' {_FILE_WORDS[kind]}"
    commands = {
        "finetune": ["finetune", path, "--logdir", str(tmp_path / "run")],
        "export": ["export", path, "--export-dir", str(tmp_path / "out")],
        "check-gradients": ["check-gradients", "resnet20", "--option", "depth=8", "--weights",
                            path],
    }
    for name, args in commands.items():
        assert _main(capsys, *args) == (2, "", f"kode: error: {words}\n"), name
    from kode.serving.export import export_keras_file

    calls = {
        "kode.finetune": lambda: kode.finetune(path, logdir=str(tmp_path / "run")),
        "export_keras_file": lambda: export_keras_file(path, str(tmp_path / "out")),
        "zoo.create_model": lambda: zoo.create_model(
            "resnet20", depth=8, input_shape=(8, 8, 1), weights=path),
    }
    for name, call in calls.items():
        with pytest.raises(KodeError) as err:
            call()
        assert str(err.value) == words, name
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_a_bad_keras_file_from_the_real_entry_point_has_no_traceback(tmp_path):
    path = _bad_file(tmp_path, "noise")
    result = _run([*KODE, "finetune", path, "--logdir", str(tmp_path / "run")])
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kode: error: '{path}' {_FILE_WORDS['noise']}\n")


def test_a_missing_or_misnamed_keras_file_is_one_line(capsys, tmp_path):
    missing = str(tmp_path / "missing.keras")
    for args in (["finetune", missing], ["export", missing]):
        assert _main(capsys, *args, "--logdir" if args[0] == "finetune" else "--export-dir",
                     str(tmp_path / "run")) == (2, "", f"kode: error: '{missing}' does not "
                                                        "exist\n")
    with pytest.raises(KodeError, match="^'.*missing.keras' does not exist$"):
        kode.finetune(missing, logdir=str(tmp_path / "run"))


# ---------------------------------------------------------------- Sequential models (item 3)


def _sequential(with_input: bool = True) -> keras.Sequential:
    stack = [keras.layers.Conv2D(4, 3, padding="same", name="conv"),
             IntegratorStage([BasicBlock(4)], "euler", name="stage"),
             keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(3, name="out")]
    return keras.Sequential(([keras.Input((8, 8, 1))] if with_input else []) + stack,
                            name="seq")


def test_cut_at_stages_cuts_a_built_sequential_model():
    keras.utils.set_random_seed(0)
    model = _sequential()
    cut = kode.cut_at_stages(model, gradient="checkpoint")
    assert cut.name == "seq"
    assert [layer.name for layer in cut.layers if isinstance(layer, RecomputedSegment)] == \
        ["stem", "head"]
    x = np.random.default_rng(0).random((2, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(cut(x), model(x))
    ported = kode.port_model(model)  # port_model reads the same graph
    np.testing.assert_allclose(ported(x), model(x), rtol=1e-6, atol=1e-6)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def test_a_model_without_a_graph_is_one_clear_error():
    with pytest.raises(KodeError) as err:
        kode.cut_at_stages(_sequential(with_input=False))
    assert str(err.value) == (
        "Sequential model 'seq' has no graph yet (no keras.Input and never built): start it "
        "with keras.Input(shape) or build it first")
    with pytest.raises(KodeError) as err:
        kode.cut_at_stages(_Subclassed())
    assert str(err.value) == (
        "model 'sub' is a subclassed keras.Model (its call() is Python code); kode reads "
        "only functional and Sequential models")
    with pytest.raises(KodeError) as err:
        kode.port_model(_Subclassed())
    assert "model 'sub' is a subclassed keras.Model" in str(err.value)


# ---------------------------------------------------------------- kode reproduce (item 4)


@pytest.mark.parametrize("args, words", [
    (["--bogus"], "reproduce: unrecognized arguments: --bogus"),
    (["--seeds", "x"], "reproduce: argument --seeds: invalid int value: 'x'"),
])
def test_reproduce_argument_errors_are_kode_errors(args, words):
    result = _run([*KODE, "reproduce", *args])
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"kode: error: {words}\n")
