"""kode's pytest plugin (``-p kode.testing.pytest_plugin`` in pyproject.toml's addopts, so it
covers tests/, kode/ and zoo/ alike): a test that leaves a process-wide setting changed
(:mod:`kode.testing.global_state`) fails, naming the setting, and the setting is put back so
the tests after it on the same worker run as they would alone."""

from __future__ import annotations

import pytest

from kode.testing.global_state import global_settings, restore_global_settings


@pytest.fixture(autouse=True)
def _no_leaked_global_settings():
    before = global_settings()
    yield
    changed = restore_global_settings(before)
    if changed:
        pytest.fail("the test left process-wide settings changed (restored now): "
                    + "; ".join(changed), pytrace=False)
