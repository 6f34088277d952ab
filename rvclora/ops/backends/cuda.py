"""The ``cuda`` backend: the fused ConvTranspose1d + LoRA kernels of ``csrc/`` (``rvclora._C``).

Ops (``torch.ops.rvclora``, defined in csrc/lora_convt_cpu.cpp, kernels for CPU and CUDA)::

    cuda_lora_conv_transpose1d_fwd(x, weight, bias?, lora_A, lora_B, scaling, stride, padding,
                                   output_padding, dilation, groups, dropout_p, seed?) -> (y, u)
    cuda_lora_conv_transpose1d_bwd(grad_y, x, u, weight, lora_A, lora_B, scaling, stride, ..., seed?,
                                   needs[5]) -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)
    cuda_dropout_mask(like, seed, dropout_p) -> mask

``y = convT(concat[x, s·A·D(x)], concat[W, B]) + b`` in one kernel; ``u = A·D(x)``
(``(N, r, T)``, fp32 for half inputs) is what backward needs for ``grad_B``. Entries of an
unrequested gradient are empty ``(0,)`` tensors. The forward's fake (meta) kernel is registered
here; the autograd, the backward's fake and the eager fast path by :func:`rvclora.ops.autograd.fused_op`.

On CPU tensors the same kernel bodies run through the CPU twin (float32 and float64): that is
how the GPU kernel's indexing is tested on machines without a GPU. Shapes:
:mod:`rvclora.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import extension
from ..autograd import fused_op, run_once
from ..geometry import conv_transpose1d_out_len
from ..spec import SPECS

NAME = "cuda"

_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64)
# Per-block shared memory the launcher may use without an opt-in (lora_convt_cuda.h).
_MAX_SMEM = 48 * 1024
_FWD_TQ, _BWD_TT = 64, 64  # tile lengths of lora_convt_kernel.cuh


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fwd_fake(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    N, _, T = x.shape
    L = conv_transpose1d_out_len(T, weight.shape[2], stride, padding, output_padding, dilation)
    y = x.new_empty((N, weight.shape[1] * groups, L))
    u = x.new_empty((N, lora_A.shape[0], T), dtype=_acc_dtype(x.dtype))
    return y, u


def _mask_fake(like, seed, dropout_p):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@run_once
def _register_python_parts() -> None:
    """Fake kernels and autograd for the C++ ops (once, after the library is loaded)."""
    torch.library.register_fake("rvclora::cuda_lora_conv_transpose1d_fwd")(_fwd_fake)
    torch.library.register_fake("rvclora::cuda_dropout_mask")(_mask_fake)
    _RUN["lora_conv_transpose1d"] = fused_op(SPECS["lora_conv_transpose1d"], NAME, below_autograd=True)


#: ``run(*args) -> y`` per op (:func:`rvclora.ops.autograd.fused_op`), once the extension is loaded.
_RUN: dict = {}


def unavailable_reason() -> str | None:
    err = extension.load_error()
    if err is None:
        _register_python_parts()
    return err


def status_note() -> str:
    """What "available" means here, for ``rvclora info``: with a CUDA torch, whether the CUDA part was built."""
    if torch.version.cuda is None:
        return "CPU twin of the CUDA kernel only (this torch has no CUDA; CPU tensors run it only when requested)"
    note = extension.cuda_note()
    if note is not None or not extension.has_cuda_kernels():
        return note or "CPU twin only: the loaded extension has no CUDA kernels"
    return "CUDA kernels and their CPU twin"


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    if op != "lora_conv_transpose1d":
        return f"the cuda backend fuses lora_conv_transpose1d only; {op} runs on the torch or triton backend"
    if x.device.type == "cpu":
        if x.dtype not in _CPU_DTYPES:
            return f"the CPU twin of the CUDA kernel runs float32 and float64 only, got {x.dtype}"
    elif x.device.type == "cuda":
        if torch.version.cuda is None:
            return "torch was built without CUDA, so the extension has no CUDA kernels"
        if not extension.has_cuda_kernels():
            return extension.cuda_note() or "the loaded rvclora._C extension has no CUDA kernels"
        if x.dtype not in _CUDA_DTYPES:
            return f"the CUDA kernel runs float32, float64, float16 and bfloat16, got {x.dtype}"
    else:
        return f"no kernel for device type {x.device.type!r} (cpu and cuda only)"
    lora_A, weight = params.get("lora_A"), params.get("weight")
    for name, t in (("weight", weight), ("lora_A", lora_A)):
        if t is not None and t.device != x.device:
            return f"{name} is on {t.device} but x is on {x.device}"
    if weight is not None and weight.dtype != x.dtype:
        # nn.ConvTranspose1d itself refuses this mix; under autocast the layer casts W to x's dtype.
        return f"weight has dtype {weight.dtype} but x has {x.dtype}; the kernel computes the base in x's dtype"
    if lora_A is not None and not lora_A.is_floating_point():
        return f"lora_A has dtype {lora_A.dtype}; LoRA factors must be floating point"
    groups = int(params.get("groups", 1))
    if lora_A is not None and lora_A.shape[0] % groups != 0:
        return f"rank r={lora_A.shape[0]} must be divisible by groups={groups}"
    if x.device.type == "cuda" and lora_A is not None and weight is not None:
        rg = lora_A.shape[0] // groups
        acc = 8 if x.dtype == torch.float64 else 4
        m = (weight.shape[-1] - 1) * int(params.get("dilation", 1)) // int(params.get("stride", 1))
        smem = max(rg * (_FWD_TQ + m), rg * _BWD_TT) * acc
        if smem > _MAX_SMEM:
            return f"rank per group {rg} needs {smem} B of shared memory per block, over the {_MAX_SMEM} B limit"
    return None


def lora_conv_transpose1d(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    """``convT(x, W) + b + s · convT(A · D(x), B)`` through the fused kernel (CPU twin on CPU tensors)."""
    err = unavailable_reason()
    if err is not None:
        raise RuntimeError(err)
    if dropout_p == 0.0:
        seed = None
    # The kernel computes in x's dtype (fp32 accumulation for half). Factors kept in another dtype
    # (fp32 under autocast; fp32 factors with fp64 x on the CPU twin) and a bias in another dtype
    # are cast to it here: factor-sized copies, and autograd returns their gradients in their own dtype.
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    return _RUN["lora_conv_transpose1d"](
        x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
    )


def dropout_mask(seed: Tensor | None, shape, p: float, device, dtype) -> Tensor:
    """The mask ``D`` applies to an ``x`` of ``shape``: 0 or ``1/(1-p)``, a function of (seed, element index)."""
    err = unavailable_reason()
    if err is not None:
        raise RuntimeError(err)
    if seed is None:
        if p != 0.0:
            raise ValueError(f"dropout_mask: p={p} > 0 needs a seed")
        seed = torch.zeros((), dtype=torch.int64)
    like = torch.empty(tuple(shape), device=device, dtype=dtype)
    return torch.ops.rvclora.cuda_dropout_mask(like, seed, float(p))
