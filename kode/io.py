"""Files: durable, all-or-nothing writes (every file a run writes goes through here), and
reading what a run wrote (a ``.keras`` model and the ``kode.json`` beside it).

A file is written to a temporary name in its final directory, flushed and fsync'ed, then
renamed over the final name (atomic on POSIX: a reader sees the old file or the new one, never
a part), and the directory is fsync'ed so that the rename survives a crash too. A failed write
(full disk, quota, I/O error) removes the temporary file and raises :class:`KodeError` with one
line naming the file, so nothing truncated is ever left behind under a final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from kode.errors import KodeError, one_line


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename or new file in it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush one file's data to disk (for files written by libraries that do not fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder below ``root`` (a folder published by one rename)."""
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def write_error(path: str, err: BaseException) -> KodeError:
    """The one-line error for a failed write of ``path`` (full disk named as such)."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        reason = "no space left on the device"
    elif isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return KodeError(f"could not write {path}: {reason}; nothing was left half-written")


def temporary_path(path: str, suffix: str = "") -> str:
    """A fresh, unused name beside ``path`` (same directory, so the final rename is atomic)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix,
                               dir=directory)
    os.close(fd)
    return tmp


def commit(tmp: str, path: str) -> None:
    """fsync ``tmp``, rename it to ``path``, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def write_with(path: str, writer: Callable[[str], Any], suffix: str = "") -> None:
    """Atomically create ``path`` with ``writer(tmp_path)`` (e.g. ``model.save``), which
    writes a complete file at the temporary name it is given."""
    tmp = temporary_path(path, suffix)
    try:
        writer(tmp)
        commit(tmp, path)
    except KodeError:
        _remove(tmp)
        raise
    except (OSError, Exception) as err:
        _remove(tmp)
        if _is_write_failure(err):
            raise write_error(path, err) from None
        raise


def _is_write_failure(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return True
    # TensorFlow's file layer and h5py turn ENOSPC into their own types.
    text = str(err)
    return "No space left" in text or "ENOSPC" in text or type(err).__name__ in (
        "ResourceExhaustedError", "DataLossError", "UnknownError")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
    """``open(path, mode)`` for writing, made durable and visible only when the block ends
    without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files ('w' or 'wb'), not {mode!r}")
    tmp = temporary_path(path)
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise
    fsync_dir(os.path.dirname(path) or ".")


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str, payload: Any, indent: int = 2) -> None:
    """Atomically write ``payload`` as strict JSON (non-finite numbers become null)."""
    text = json.dumps(finite_json(payload), indent=indent, allow_nan=False)
    with atomic_open(path) as fh:
        fh.write(text)


SIDECAR = "kode.json"


def read_sidecar(model_path: str) -> dict | None:
    """The ``kode.json`` a training run writes beside its ``model.keras``; None if there is
    none. Unreadable or not a JSON object: :class:`KodeError` (restore it or move it away)."""
    sidecar = os.path.join(os.path.dirname(os.path.abspath(model_path)), SIDECAR)
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar) as fh:
            metadata = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not valid JSON: {err}"
        raise KodeError(f"'{sidecar}' beside the model is unreadable ({reason}); restore "
                        "it or move it away (then pass --name)") from None
    if not isinstance(metadata, dict):
        raise KodeError(f"'{sidecar}' beside the model is not a JSON object; restore it or "
                        "move it away (then pass --name)")
    return metadata


#: A zip archive starts with a local file header; a file that starts like one but is not a
#: readable archive was cut short (a copy or download that stopped) or damaged.
_ZIP_START = b"PK\x03\x04"


def _python_code(config: Any, layer: dict | None = None) -> str | None:
    """What in a model's ``config.json`` holds Python code (a serialized ``__lambda__``, which
    Keras' safe_mode refuses to load), or None."""
    if isinstance(config, dict):
        if config.get("class_name") == "__lambda__":
            if layer is not None and layer.get("class_name") == "Lambda":
                return f"Lambda layer '{layer.get('config', {}).get('name', '?')}'"
            return "a Python lambda"
        if isinstance(config.get("class_name"), str) and isinstance(config.get("config"), dict):
            layer = config
        values = config.values()
    elif isinstance(config, list):
        values = config
    else:
        return None
    for value in values:
        found = _python_code(value, layer)
        if found:
            return found
    return None


def _read_keras_archive(path: str) -> dict:
    """The ``config.json`` of the ``.keras`` archive ``path`` (every member's checksum
    verified), or :class:`KodeError` saying what is wrong with the file."""
    import zipfile
    import zlib

    try:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as fh:
                truncated = fh.read(len(_ZIP_START)) == _ZIP_START
            raise KodeError(f"'{path}' is truncated or corrupt (not a complete zip archive)"
                            if truncated else
                            f"'{path}' is not a Keras model file (not a zip archive)")
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise KodeError(f"'{path}' is truncated or corrupt ({bad} fails its checksum)")
            if "config.json" not in archive.namelist():
                raise KodeError(f"'{path}' is not a Keras model file (a zip archive without "
                                "config.json)")
            config = json.loads(archive.read("config.json"))
    except KodeError:
        raise
    except OSError as err:  # unreadable (permissions, I/O error)
        raise KodeError(f"'{path}' cannot be read: {err.strerror or one_line(err)}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as err:  # JSON, UTF-8 too
        raise KodeError(f"'{path}' is truncated or corrupt ({one_line(err)})") from None
    if not isinstance(config, dict):
        raise KodeError(f"'{path}' is not a Keras model file (its config.json is not a model)")
    return config


def check_keras_file(path: str) -> None:
    """Refuse, with one line naming ``path`` and the problem, a file that
    :func:`load_keras_file` would not load: missing, not a ``.keras`` archive, truncated or
    corrupt, or holding Python code (a ``Lambda`` layer's lambda: loading it would run code
    from the file). Reads only the file, no TensorFlow: commands call it before any other
    work."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise KodeError(f"'{path}' does not exist")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise KodeError(f"'{path}' is not a .keras model file")
    code = _python_code(_read_keras_archive(path))
    if code is not None:
        what = "Lambda layers" if code.startswith("Lambda") else "Python lambdas"
        raise KodeError(f"'{path}' contains Python code ({code}); kode does not load it: "
                        f"rebuild the model without {what}")


def load_keras_file(path: str):
    """``keras.saving.load_model(path, compile=False)`` for every ``.keras`` file a user gives
    kode (finetune's source, export, a zoo model's weights), after
    :func:`check_keras_file`; whatever else goes wrong (an unknown custom layer) is one line
    too."""
    import keras

    path = os.fspath(path)
    check_keras_file(path)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # unknown classes, mismatched weights: many types
        raise KodeError(f"'{path}' could not be loaded as a Keras model: "
                        f"{one_line(err)}") from None
