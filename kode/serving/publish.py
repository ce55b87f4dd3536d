"""Versioned publishing of SavedModels in the TensorFlow Serving layout.

Layout written by :func:`export_model`::

    <export_dir>/<name>/<version>/saved_model.pb
                                 /variables/...
                                 /assets.extra/kode.json     # metadata (see below)

``<version>`` is an integer folder, as TensorFlow Serving expects. A version is never
overwritten. It is written to a hidden temporary sibling folder (``<name>/.tmp-export-...``,
which Serving ignores because the name is not an integer), every file is fsync'ed, the result
is verified against the Keras model, and only then renamed into place, so Serving never sees a
half-written or unverified version. The exporting process holds an ``flock`` on
``.tmp-export-*/owner`` while it works; a temporary folder whose lock is free was left by a
killed export and is removed by the next export into the same model folder (never one in
flight). A SavedModel that fails verification is moved to ``<name>/.refused-*`` (not a
version) and the error names that folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow as tf

from kode.errors import KodeError, one_line
from kode.io import fsync_dir, write_json

METADATA_DIR = "assets.extra"


METADATA_FILE = "kode.json"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


_TMP_PREFIX = ".tmp-export-"


_REFUSED_PREFIX = ".refused-"


_OWNER_FILE = "owner"


# A temporary folder without an owner lock (only an older kode writes those) is stale once
# nothing in it changed for this long.
_UNLOCKED_STALE_SECONDS = 3600.0


def check_export_dir(export_dir: str, name: str) -> None:
    """Fail now, before a long training run, if ``export_dir/name`` cannot take a new version."""
    _check_name(name)
    model_dir = _prepare_model_dir(export_dir, name)
    remove_stale_exports(model_dir)
    tmp, owner = _make_tmp_dir(model_dir, None)
    shutil.rmtree(tmp, ignore_errors=True)
    owner.close()


def remove_stale_exports(model_dir: str) -> list[str]:
    """Remove ``.tmp-export-*`` folders of ``model_dir`` left by killed exports; return them.

    A folder is stale when no process holds the ``flock`` on its ``owner`` file (the kernel
    releases it when the exporting process dies, however it dies); folders of exports in
    flight are never touched. A folder without an ``owner`` file is stale once nothing in it
    changed for an hour.
    """
    removed = []
    try:
        entries = sorted(os.listdir(model_dir))
    except OSError:
        return removed
    for entry in entries:
        path = os.path.join(model_dir, entry)
        if not entry.startswith(_TMP_PREFIX) or not os.path.isdir(path):
            continue
        try:
            fh = open(os.path.join(path, _OWNER_FILE), "rb")  # noqa: SIM115 (held for the lock)
        except FileNotFoundError:
            if time.time() - _newest_mtime(path) > _UNLOCKED_STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # an export in flight
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        fsync_dir(model_dir)
    return removed


def load_metadata(path: str) -> dict:
    """Read ``assets.extra/kode.json`` of a SavedModel folder (or a model folder's latest)."""
    sm_path = _resolve_savedmodel(path)
    meta_path = os.path.join(sm_path, METADATA_DIR, METADATA_FILE)
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise KodeError(
            f"{sm_path} has no {METADATA_DIR}/{METADATA_FILE}: not a kode export"
        ) from None
    except (OSError, ValueError) as exc:
        raise KodeError(f"cannot read metadata {meta_path}: {one_line(exc)}") from exc
    if not isinstance(meta, dict):
        raise KodeError(f"metadata {meta_path} is not a JSON object")
    return meta


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KodeError(
            f"invalid export name {name!r}: use letters, digits, '.', '_' or '-' "
            "(not starting with '.'); pass name=..."
        )


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
        raise KodeError(f"version must be a non-negative integer, got {version!r}")


def _prepare_model_dir(export_dir: str, name: str) -> str:
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir):
        raise KodeError(f"invalid export directory {export_dir!r}")
    model_dir = os.path.join(os.path.abspath(os.fspath(export_dir)), name)
    for path in (os.path.dirname(model_dir), model_dir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise KodeError(f"cannot export to {path}: a file is in the way (not a directory)")
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as exc:
        raise KodeError(f"cannot create export directory {model_dir}: {one_line(exc)}") from exc
    return model_dir


def _make_tmp_dir(model_dir: str, version: int | None) -> tuple[str, Any]:
    """A new ``.tmp-export-*`` folder and its open, flock'ed ``owner`` file (close to unlock)."""
    prefix = f"{_TMP_PREFIX}{'next' if version is None else version}-"
    try:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=model_dir)
    except OSError as exc:
        raise KodeError(f"export directory {model_dir} is not writable: {one_line(exc)}") from exc
    try:
        owner = open(os.path.join(tmp, _OWNER_FILE), "w", encoding="utf-8")  # noqa: SIM115
        fcntl.flock(owner.fileno(), fcntl.LOCK_EX)
        owner.write(f"pid {os.getpid()}\n")
        owner.flush()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KodeError(f"export directory {model_dir} is not writable: {one_line(exc)}") from exc
    return tmp, owner


def _keep_refused(export_path: str, model_dir: str, tmp: str) -> str:
    """Move a SavedModel that failed verification to ``model_dir/.refused-*``; say where."""
    dest = os.path.join(model_dir, _REFUSED_PREFIX + os.path.basename(tmp)[len(_TMP_PREFIX):])
    try:
        os.rename(export_path, dest)
    except OSError as exc:
        return f"nowhere: it could not be moved out of the temporary folder ({one_line(exc)})"
    fsync_dir(model_dir)
    return dest


def _newest_mtime(root: str) -> float:
    newest = 0.0
    for dirpath, _dirs, filenames in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            try:
                newest = max(newest, os.lstat(p).st_mtime)
            except OSError:
                pass
    return newest


def _existing_versions(model_dir: str) -> list[int]:
    try:
        entries = os.listdir(model_dir)
    except OSError as exc:
        raise KodeError(f"cannot list {model_dir}: {one_line(exc)}") from exc
    return [int(e) for e in entries if e.isdigit() and e.isascii()]


def _refuse_existing(model_dir: str, version: int) -> None:
    if int(version) in _existing_versions(model_dir):
        raise KodeError(
            f"version {version} already exists; refusing to overwrite "
            f"{os.path.join(model_dir, str(version))} (omit version to use the next free one)"
        )


def _publish(src: str, model_dir: str, version: int | None) -> tuple[int, str]:
    """Rename ``src`` to ``model_dir/<version>``; with version=None retry on a lost race."""
    for _ in range(100):
        if version is None:
            chosen = max(_existing_versions(model_dir), default=0) + 1
        else:
            chosen = int(version)
            _refuse_existing(model_dir, chosen)
        dest = os.path.join(model_dir, str(chosen))
        if os.path.lexists(dest):  # created meanwhile by a concurrent export
            if version is not None:
                _refuse_existing(model_dir, chosen)
            continue
        try:
            # On POSIX a directory rename onto an existing non-empty directory fails, so a
            # concurrent export that took the same number is never overwritten.
            os.rename(src, dest)
        except OSError as exc:
            if os.path.lexists(dest):
                if version is None:
                    continue
                raise KodeError(
                    f"version {chosen} already exists; refusing to overwrite {dest}"
                ) from exc
            raise KodeError(f"cannot move export into {dest}: {one_line(exc)}") from exc
        fsync_dir(model_dir)
        return chosen, dest
    raise KodeError(f"could not find a free version number in {model_dir}")


def _write_metadata(savedmodel_dir: str, meta: dict) -> None:
    extra = os.path.join(savedmodel_dir, METADATA_DIR)
    os.makedirs(extra, exist_ok=True)
    write_json(os.path.join(extra, METADATA_FILE), meta)


def _is_savedmodel(path: str) -> bool:
    return any(
        os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")
    )


def _resolve_savedmodel(path: Any) -> str:
    """A SavedModel folder as given, or the latest integer version inside a model folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise KodeError(f"expected a SavedModel path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise KodeError(f"{path} is not a SavedModel directory (no such directory)")
    if _is_savedmodel(path):
        return path
    versions = sorted(
        (v for v in _existing_versions(path) if _is_savedmodel(os.path.join(path, str(v)))),
        reverse=True,
    )
    if versions:
        return os.path.join(path, str(versions[0]))
    raise KodeError(f"{path} is not a SavedModel directory (no saved_model.pb)")


def _load_savedmodel(path: str) -> Any:
    try:
        return tf.saved_model.load(path)
    except Exception as exc:  # TF raises OSError, ValueError, DecodeError, ...
        raise KodeError(f"cannot load SavedModel {path}: {one_line(exc)}") from exc
