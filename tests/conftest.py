"""Shared pytest set-up of the tests under tests/."""

import os

import pytest

#: oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below avx512_core_bf16. Under such a cap on a CPU with
#: bfloat16 instructions, TensorFlow still picks its oneDNN bfloat16 kernels (it checks the
#: CPU, not the cap) and oneDNN cannot build them: Conv2D aborts ("could not create a
#: primitive descriptor") and MatMul crashes the process. A real AVX2 CPU gets Eigen's
#: bfloat16 kernels instead, so this is an artifact of the cap, not of kode.
_NO_BF16_CAPS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def pytest_collection_modifyitems(config, items):
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap not in _NO_BF16_CAPS:
        return
    skip = pytest.mark.skip(reason=f"bfloat16 kernels cannot run under ONEDNN_MAX_CPU_ISA={cap}")
    for item in items:
        if "bfloat16" in item.keywords:
            item.add_marker(skip)
