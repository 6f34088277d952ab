"""The ``triton`` backend of :mod:`rvclora.ops` (interface: :mod:`rvclora.ops.dispatch`): the Triton kernels of
the top-level ``kernels/`` (``rvclora.kernels``) and their launchers, registered as ``rvclora::triton_*`` ops.

Covers ``lora_linear`` and ``lora_conv1d`` (every stride, padding incl. asymmetric, dilation,
groups, padding mode, bias, dropout) on CUDA tensors in fp32, fp16 and bf16, and on CPU tensors
under ``TRITON_INTERPRET=1`` (fp32 and fp16: the interpreter computes bf16 wrongly, numpy has
no bf16, so bf16 is refused there rather than computed wrongly). ``lora_conv_transpose1d`` is
not a Triton kernel: it is refused with a reason, so an explicit ``RVCLORA_BACKEND=triton``
raises instead of falling back.

Auto mode (:func:`prefer`): the fused kernels tile the rows (``batch·time`` or the leading dims
of a Linear) in blocks of 32-128; with fewer than :data:`MIN_ROWS_FOR_AUTO` rows a launch is one
partial row tile per output tile, both paths are bound by reading ``W`` and launch latency, and
fusion saves nothing, so auto mode hands such calls to the torch path. This threshold follows
from the tile shapes; it was not tuned by GPU measurement.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.library import triton_op

from rvclora.kernels import ops as _ops
from rvclora.kernels.lora_kernels import PAD_MODES

from ..autograd import fused_op
from ..geometry import conv1d_out_len
from ..spec import SPECS

NAME = "triton"

#: Auto mode uses the fused kernels only from this many GEMM rows on (see the module docstring).
MIN_ROWS_FOR_AUTO = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    """``None`` when Triton kernels can run here: a CUDA device, or ``TRITON_INTERPRET=1``."""
    if _interpreting():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1"
    return None


def status_note() -> str:
    """What "available" means here, for ``rvclora info``."""
    if _interpreting():
        return "Triton interpreter on CPU tensors (TRITON_INTERPRET=1): for checking, not speed"
    return "compiled Triton kernels on CUDA tensors"


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    """Why this backend cannot run ``op`` on ``x`` with ``params`` (``None`` when it can)."""
    if op == "lora_conv_transpose1d":
        return (
            "the triton backend has no ConvTranspose1d kernel (it covers lora_linear and lora_conv1d); "
            "use the cuda or torch backend"
        )
    if op not in ("lora_linear", "lora_conv1d"):
        return f"the triton backend has no {op} (it covers lora_linear and lora_conv1d); use the torch backend"
    if x.device.type != "cuda" and not (_interpreting() and x.device.type == "cpu"):
        return f"x is on {x.device}; Triton kernels need a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1)"
    if x.dtype not in _DTYPES:
        return f"x has dtype {x.dtype}; the Triton kernels take float32, float16 or bfloat16"
    if _interpreting() and x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "bfloat16 under TRITON_INTERPRET computes wrong results (numpy has no bfloat16)"
    for name in ("weight", "lora_A"):
        t = params.get(name)
        if t is not None and t.dtype not in _DTYPES:
            return f"{name} has dtype {t.dtype}; the Triton kernels take float32, float16 or bfloat16"
        if t is not None and t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    groups = int(params.get("groups", 1))
    lora_A = params.get("lora_A")
    if lora_A is not None and lora_A.shape[0] // max(groups, 1) > _ops.MAX_RANK_PER_GROUP:
        return f"rank per group {lora_A.shape[0] // groups} exceeds the kernels' limit {_ops.MAX_RANK_PER_GROUP}"
    if op == "lora_conv1d":
        mode = params.get("padding_mode", "zeros")
        if mode not in PAD_MODES:
            return f"padding_mode {mode!r} is not one of {tuple(PAD_MODES)}"
    return None


def _rows(op: str, x: Tensor, **params) -> int:
    if op == "lora_linear":
        return x.numel() // max(x.shape[-1], 1)
    weight = params.get("weight")
    k = weight.shape[-1] if weight is not None else 1
    left, right = params.get("padding", (0, 0))
    t_out = conv1d_out_len(x.shape[-1], k, int(params.get("stride", 1)), left + right, int(params.get("dilation", 1)))
    return x.shape[0] * max(t_out, 0)


def prefer(op: str, x: Tensor, **params) -> bool:
    """Auto mode only: use the fused kernels from :data:`MIN_ROWS_FOR_AUTO` GEMM rows on."""
    return _rows(op, x, **params) >= MIN_ROWS_FOR_AUTO


# --------------------------------------------------------------------------- the ops
# The launchers of kernels/ops.py as triton ops (inductor traces into their kernels), with the shared autograd.

triton_op("rvclora::triton_lora_linear_fwd", mutates_args={})(_ops.lora_linear_fwd)
triton_op("rvclora::triton_lora_linear_bwd", mutates_args={})(_ops.lora_linear_bwd)
triton_op("rvclora::triton_lora_conv1d_fwd", mutates_args={})(_ops.lora_conv1d_fwd)
triton_op("rvclora::triton_lora_conv1d_bwd", mutates_args={})(_ops.lora_conv1d_bwd)
triton_op("rvclora::triton_dropout_mask", mutates_args={})(_ops.dropout_mask_fill)
_linear_run = fused_op(SPECS["lora_linear"], NAME, below_autograd=True, bwd_fake=False)
_conv1d_run = fused_op(SPECS["lora_conv1d"], NAME, below_autograd=True, bwd_fake=False)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """Fused ``x·Wᵀ + b + s·(D(x)·Aᵀ)·Bᵀ``; ``x: (..., in)``."""
    return _linear_run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed if dropout_p > 0.0 else None)


def lora_conv1d(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed
):
    """Fused Conv1d + LoRA; ``x: (N, C, T)``, explicit ``padding = (left, right)``."""
    seed = seed if dropout_p > 0.0 else None
    return _conv1d_run(
        x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed
    )


def lora_conv_transpose1d(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    raise NotImplementedError(unsupported_reason("lora_conv_transpose1d", x))


def dropout_mask(seed: Tensor, shape, p: float, device, dtype) -> Tensor:
    """The exact mask (values ``0`` or ``1/(1−p)``, shaped ``shape``) the kernels apply for ``seed``."""
    like = torch.empty(shape, device=device, dtype=dtype)
    if p == 0.0:
        return torch.ones_like(like)
    return torch.ops.rvclora.triton_dropout_mask(seed, like, float(p))
