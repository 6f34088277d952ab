"""The ``torch`` backend: pure PyTorch, the CPU path and the fallback everywhere.

Fast, not naive (the performance model: docs/maths.md):

* **Merged weight** when the maths is true fp32/fp64 and dropout is off: ``W_eff = W + ΔW``
  costs ``in·out·k·r`` flops once per call, then the forward and the input gradient are one
  base-sized op each. ``W_eff`` is recomputed in backward rather than saved.
* **Thin projections as GEMMs**: ``u = conv(x, A)`` with ``r`` output channels runs poorly
  through the convolution library on CPU; for stride 1 it is one ``(k·r × in) @ x`` GEMM
  plus ``k`` shifted adds. ``ConvTranspose1d``'s ``u = A·x`` is a plain GEMM.
* **Memory**: autograd keeps ``x`` and ``u`` (and the parameters); dropout masks are
  regenerated from their seed in backward, never stored.
* **Low precision** (fp16/bf16, or TF32 on CUDA): the LoRA path stays a separate term, so a
  small ``ΔW`` is never rounded into ``W``. Base-sized work (``y``, ``grad_x``, ``grad_W``) runs in
  the activation dtype; the thin LoRA GEMMs run in float32 and their term is added to the base
  part by one in-place mixed-dtype op (computed in float32, rounded once). The factors may have
  any float dtype (autocast keeps them float32): they are cast to the compute dtype per call.
* **Layout**: ``y`` is the output of the base-sized library op itself (updated in place), and each
  gradient is produced in the layout the base class's autograd gives, so outputs are drop-ins
  (``.view()`` works) and the fake kernels state exactly the real strides.

Each op is a ``torch.library`` custom op (``rvclora::torch_*``) with a fake implementation
and an autograd formula, so ``torch.compile(fullgraph=True)`` traces it as one node.

The package, one module per op (each read top to bottom: forward, its fake, backward, the
:func:`~rvclora.ops.autograd.fused_op` registration, the entry point), over one shared module:

* ``_common.py``  — masks, dtype and autocast plumbing, the merged-weight rule, grouped 1×1 helpers
  (the custom-op autograd, the eager ``autograd.Function`` and the gradient fakes are
  :func:`rvclora.ops.autograd.fused_op`'s, shared by every backend);
* ``linear.py``, ``conv1d.py``, ``conv_transpose1d.py``, ``conv2d.py`` — the ops (Conv2d: plain and exact,
  the LoRA term always separate).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._common import _merge_ok, dropout_mask
from .conv1d import _conv1d_bwd, _conv1d_fwd, lora_conv1d
from .conv2d import _conv2d_bwd, _conv2d_fwd, lora_conv2d
from .conv_transpose1d import _convt_bwd, _convt_fwd, lora_conv_transpose1d
from .linear import _linear_bwd, _linear_fwd, lora_linear

NAME = "torch"

__all__ = ["dropout_mask", "lora_linear", "lora_conv1d", "lora_conv_transpose1d", "lora_conv2d"]
# the custom ops, for tests and opcheck
_OPS = (_linear_fwd, _linear_bwd, _conv1d_fwd, _conv1d_bwd, _convt_fwd, _convt_bwd, _conv2d_fwd, _conv2d_bwd, _merge_ok)


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(op: str, x: Tensor, **params) -> Optional[str]:
    return None
