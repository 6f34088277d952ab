"""Test-wide setup.

Triton's interpreter must be switched on before ``triton`` is first imported: on a machine
without a CUDA device the Triton kernels are exercised on CPU tensors through it.
"""

import os
import shutil

if not os.environ.get("CUDA_VISIBLE_DEVICES") and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
