"""The torch backend's Linear op: ``y = x Wᵀ + b + s·(D(x) Aᵀ) Bᵀ`` and its gradients."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...autograd import _transposed_2d, fused_op
from ...spec import SPECS
from ._common import (
    _cast,
    _lora_dtype,
    _mask,
    _merge_ok,
    _no_autocast,
    _with_empties,
)

# --------------------------------------------------------------------------- Linear


@_no_autocast
def _linear_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Returns ``y: (..., out)`` in ``F.linear``'s layout and ``u = D(x)·Aᵀ: (M, r)`` (saved for backward).

    ``y`` is the output of the base-sized ``F.linear`` itself (updated in place), so it has exactly
    ``nn.Linear``'s shape and strides without a copy.
    """
    ldt = _lora_dtype(x)
    A, B = _cast(lora_A, ldt), _cast(lora_B, ldt)
    x2 = x.reshape(-1, x.shape[-1])
    mask = _mask(x2, dropout_p, seed)
    if _merge_ok(x, dropout_p, conv=False):
        # The base-sized GEMM with W + s·BA, and u as a thin GEMM (r/out of the base's flops).
        y = F.linear(x, torch.addmm(weight, B, A, alpha=scaling), bias)
        u = torch.mm(x2, A.t())
    else:
        y = F.linear(x, weight, bias)  # in the activation dtype, like the base layer
        xl = _cast(x2, ldt) if mask is None else _cast(x2, ldt) * _cast(mask, ldt)
        u = torch.mm(xl, A.t())
        _add_lora_mm_(y.view(x2.shape[0], weight.shape[0]), u, B.t(), scaling)
    return y, u


def _add_lora_mm_(y: Tensor, u: Tensor, bt: Tensor, scaling: float) -> Tensor:
    """``y += s · u @ bt`` in place, ``y`` in the activation dtype, ``u``/``bt`` in the LoRA dtype.

    Same dtype: one ``addmm_``. Half activations: the thin product runs in float32 and one mixed-dtype
    ``add_`` computes ``y + s·lora`` in float32 and rounds once into ``y`` (no float32 copy of ``y``).
    """
    if y.dtype == u.dtype:
        return y.addmm_(u, bt, alpha=scaling)
    return y.add_(torch.mm(u, bt), alpha=scaling)


_linear_fwd = torch.library.custom_op("rvclora::torch_lora_linear_fwd", mutates_args=())(_linear_fwd_impl)


@_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    m = math.prod(x.shape[:-1])
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(m, lora_A.shape[0], dtype=_lora_dtype(x))


@_no_autocast
def _linear_bwd_impl(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_W, grad_b, grad_A, grad_B)`` in each input's dtype, in the layout nn.Linear's autograd
    gives (contiguous; ``grad_x`` transposed for a transposed 2-D ``x``); an unneeded gradient is ``None``.
    The base-sized GEMMs run in the activation dtype."""
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    A, B = _cast(lora_A, ldt), _cast(lora_B, ldt)
    x2 = x.reshape(-1, x.shape[-1])
    g = grad_y.reshape(-1, grad_y.shape[-1])
    gl = _cast(g, ldt)
    mask = _mask(x2, dropout_p, seed)
    mask = _cast(mask, ldt) if mask is not None else None
    merged = _merge_ok(x, dropout_p, conv=False)
    gx = gw = gbias = gA = gB = None
    g_u = torch.mm(gl, B * scaling) if need_A or (need_x and not merged) else None  # (M, r)
    if need_x:
        w_x = torch.addmm(weight, B, A, alpha=scaling) if merged else weight
        # nn.Linear's grad_x of a transposed 2-D input is transposed too (autograd's mm backward)
        gx = torch.mm(w_x.t(), g.t()).t() if _transposed_2d(x) else torch.mm(g, w_x)
        if not merged:
            assert g_u is not None
            if mask is None and gx.dtype == ldt:
                gx.addmm_(g_u, A)
            else:
                lx = torch.mm(g_u, A)
                gx.add_(lx if mask is None else lx.mul_(mask))
        gx = gx.view(x.shape)
    if need_w:
        gw = torch.mm(g.t(), x2)
    if need_b:
        gbias = g.sum(0)
    if need_A:
        assert g_u is not None
        xl = _cast(x2, ldt)
        gA = torch.mm(g_u.t(), xl if mask is None else xl * mask).to(lora_A.dtype)
    if need_B:
        # the thin operand first (several times faster on CPU), then a parameter-sized transpose copy
        gB = torch.mm(u.t(), gl).mul_(scaling).t().contiguous().to(lora_B.dtype)
    return gx, gw, gbias, gA, gB


_linear_bwd = torch.library.custom_op("rvclora::torch_lora_linear_bwd", mutates_args=())(
    _with_empties(_linear_bwd_impl)
)


_linear_run = fused_op(
    SPECS["lora_linear"], "torch", eager_fwd=_linear_fwd_impl, eager_bwd=_linear_bwd_impl, contiguous_grad=True
)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _linear_run(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
