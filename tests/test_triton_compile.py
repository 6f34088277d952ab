"""Every fused Triton kernel and autotune config compiles for sm_80 and sm_90 without spills.

Runs :mod:`rvclora.checks.triton_compile` in a subprocess without ``TRITON_INTERPRET`` (the
interpreter compiles nothing): tensor-core instructions in the PTX of the half-precision
variants, ``STACK:0`` from ``cuobjdump``, ≤ 255 registers, shared memory within the per-block
limits. No GPU is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.subprocess  # every test here runs rvclora or pytest in a child process

triton = pytest.importorskip("triton")


def test_every_kernel_config_compiles_for_sm80_and_sm90():
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip(f"this Triton wheel ships no cuobjdump at {cuobjdump}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "rvclora.checks.triton_compile"], env=env, capture_output=True, text=True, timeout=900
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert f"triton {triton.__version__}: " in proc.stdout and "0 with problems" in proc.stdout
    assert "mma" in proc.stdout
