"""Test-wide setup.

``auto`` takes its fixed rule (see below).

Triton's interpreter must be switched on before ``triton`` is first imported: on a machine
without a CUDA device the Triton kernels are exercised on CPU tensors through it.
"""

import os
import shutil

# ``auto`` measures its choice on the first call of each layer shape (rvclora.ops.autoselect); in the
# suite it takes the fixed rule, so that which backend runs never depends on this machine's timings
# or a cache file. Every backend runs the oracle matrix by name (tests/test_ops.py), and
# tests/test_autoselect.py switches measuring back on to test it.
os.environ.setdefault("RVCLORA_AUTOSELECT", "fixed")

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
