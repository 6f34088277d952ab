"""The GPU code's compile and resource checks, runnable on a machine without a GPU.

* :mod:`.triton_compile` — every Triton kernel variant and autotune config compiled for sm_80 and
  sm_90 (``triton.compile`` to PTX/cubin): spills, registers, shared memory, tensor-core
  instructions. ``python -m rvclora.checks.triton_compile``.
* :mod:`.cuda_compile` — every ``.cu`` in ``csrc/`` through ``nvcc -Xptxas -v`` for sm_80 and
  sm_90: spills, registers, shared memory. ``python -m rvclora.checks.cuda_compile``.

Both are tested (``tests/test_triton_compile.py``, ``tests/test_cuda_compile.py``) and run by
``rvclora selftest`` on a GPU machine; docs/verification.md says what each proves.
"""
