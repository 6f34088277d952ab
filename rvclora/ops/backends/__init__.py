"""The backends of :mod:`rvclora.ops`, one module (or package) each, all of one shape.

``reference`` (the oracle through plain autograd), ``torch`` (pure PyTorch, one module per op), ``cpu`` and ``cuda``
(the compiled ops of ``rvclora._C``, built by :mod:`rvclora.ops.extension`) and ``triton`` (the kernels and
launchers of the top-level ``kernels/``, installed as ``rvclora.kernels``). Each keeps the contract in
:mod:`rvclora.ops.dispatch`, registers its ops through :func:`rvclora.ops.autograd.fused_op`, and is imported by
dispatch, never here.
"""
