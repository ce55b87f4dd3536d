"""kode's pytest plugin (``-p kode.testing.pytest_plugin`` in pyproject.toml's addopts, so it
covers tests/, kode/ and zoo/ alike): a test that leaves a process-wide setting changed
(:mod:`kode.testing.global_state`) fails, naming the setting, and the setting is put back so
the tests after it on the same worker run as they would alone.

Under pytest-xdist every worker (and every process a test starts) runs each TensorFlow op on
one thread: the workers already fill the cores, and the tests' tiny ops lose more to handing
work between threads than they gain (measured on 2 cores, two workers,
tests/core/test_gradients.py: 152–163 s with TensorFlow's default, 132–134 s with one
intra-op thread). ``TF_NUM_INTRAOP_THREADS`` set by the caller wins."""

from __future__ import annotations

import os

import pytest

from kode.testing.global_state import global_settings, restore_global_settings


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # before any test starts TensorFlow's runtime
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")


@pytest.fixture(autouse=True)
def _no_leaked_global_settings():
    before = global_settings()
    yield
    changed = restore_global_settings(before)
    if changed:
        pytest.fail("the test left process-wide settings changed (restored now): "
                    + "; ".join(changed), pytrace=False)
