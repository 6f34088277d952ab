"""Fused Triton kernels of rvclora (installed as ``rvclora.kernels``): Linear and Conv1d + LoRA.

:mod:`.lora_kernels` holds the ``@triton.jit`` kernels and :mod:`.ops` their launchers; the ``triton`` backend
(:mod:`rvclora.ops.backends.triton`) registers the launchers as ``torch.library`` ops. Their sm_80/sm_90 compile
and resource check is :mod:`rvclora.checks.triton_compile`. A source checkout imports this folder as
``rvclora.kernels`` through :mod:`rvclora._checkout`.
Nothing here queries a GPU at import time.
"""
