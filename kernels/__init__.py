"""Fused Triton kernels of rvclora (installed as ``rvclora.kernels``): Linear and Conv1d + LoRA.

:mod:`.lora_kernels` holds the ``@triton.jit`` kernels, :mod:`.ops` their launchers and the
``torch.library`` ops, :mod:`.backend` the ``triton`` backend the dispatcher of
:mod:`rvclora.ops` loads (its sm_80/sm_90 compile and resource check is :mod:`rvclora.checks.triton_compile`).
Nothing here queries a GPU at import time.
"""
