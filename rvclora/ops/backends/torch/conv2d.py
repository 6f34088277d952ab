"""The torch backend's Conv2d op: ``y = conv2d(x, W) + b + s·conv1x1(conv2d(D(x), A), B)`` and its gradients.

Plain and exact: the LoRA path is always a separate term (no merged weight), through the convolution
library's own forward and backward. ``padding`` is the explicit ``(top, bottom, left, right)``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rvclora import reference as ref

from ...autograd import fused_op
from ...spec import SPECS
from ._common import (
    _cast,
    _lora_dtype,
    _mask,
    _no_autocast,
    _with_empties,
)


def _prepare(x: Tensor, padding: Sequence[int], padding_mode: str) -> Tuple[Tensor, List[int]]:
    """Pad explicitly unless the convolution can do it itself; returns (input, conv padding)."""
    top, bottom, left, right = padding
    if padding_mode == "zeros" and top == bottom and left == right:
        return x, [top, left]
    return ref.pad2d(x, (top, bottom, left, right), padding_mode), [0, 0]


def _unpad_grad(x: Tensor, grad_xp: Tensor, padding: Sequence[int], padding_mode: str, conv_pad: List[int]) -> Tensor:
    """The adjoint of :func:`_prepare` applied to ``grad_xp``."""
    top, bottom, left, right = padding
    if conv_pad != [0, 0] or (top, bottom, left, right) == (0, 0, 0, 0):
        return grad_xp
    if padding_mode == "zeros":
        h, w = grad_xp.shape[-2:]
        return grad_xp[..., top : h - bottom, left : w - right].contiguous()
    if x.dtype != grad_xp.dtype:
        x = torch.empty_like(x, dtype=grad_xp.dtype)  # the pad backward ops only read its shape
    if padding_mode == "reflect":
        return torch.ops.aten.reflection_pad2d_backward(grad_xp, x, [left, right, top, bottom])
    if padding_mode == "replicate":
        return torch.ops.aten.replication_pad2d_backward(grad_xp, x, [left, right, top, bottom])
    # circular: the pads are copies of the other end, along W then along H
    return _circular_adjoint(_circular_adjoint(grad_xp, left, right, x.shape[-1], -1), top, bottom, x.shape[-2], -2)


def _circular_adjoint(g: Tensor, lo: int, hi: int, n: int, dim: int) -> Tensor:
    out = g.narrow(dim, lo, n).clone()
    if lo:
        out.narrow(dim, n - lo, lo).add_(g.narrow(dim, 0, lo))
    if hi:
        out.narrow(dim, 0, hi).add_(g.narrow(dim, lo + n, hi))
    return out


def _out_format(x: Tensor) -> torch.memory_format:
    """Outputs follow a channels-last input (as the convolution library's do); anything else is contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _out_hw(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int]:
    out = []
    for i in range(2):
        size = x.shape[2 + i] + padding[2 * i] + padding[2 * i + 1]
        out.append((size - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1)
    return out[0], out[1]


@_no_autocast
def _conv2d_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    padding_mode: str,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Returns ``y: (N, out, H_out, W_out)`` and ``u = conv2d(pad(D(x)), A): (N, r, H_out, W_out)``."""
    ldt = _lora_dtype(x)
    r = lora_A.shape[0]
    a4 = _cast(lora_A, ldt).reshape(r, -1, weight.shape[2], weight.shape[3])
    b4 = _cast(lora_B, ldt)[:, :, None, None]
    xp, cpad = _prepare(x, padding, padding_mode)
    y = F.conv2d(xp, weight, bias, stride, cpad, dilation, groups).contiguous(memory_format=_out_format(x))
    mask = _mask(x, dropout_p, seed)
    if mask is None and ldt == x.dtype:
        xdp = xp
    else:
        xl = _cast(x, ldt) if mask is None else _cast(x, ldt) * _cast(mask, ldt)
        xdp = _prepare(xl, padding, padding_mode)[0]
    u = F.conv2d(xdp, a4, None, stride, cpad, dilation, groups).contiguous()
    y.add_(F.conv2d(u, b4, None, 1, 0, 1, groups), alpha=scaling)  # half activations: one rounding into y
    return y, u


_conv2d_fwd = torch.library.custom_op("rvclora::torch_lora_conv2d_fwd", mutates_args=())(_conv2d_fwd_impl)


@_conv2d_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed):
    h, w = _out_hw(x, weight, stride, padding, dilation)
    y = x.new_empty(x.shape[0], weight.shape[0], h, w).contiguous(memory_format=_out_format(x))
    return y, x.new_empty(x.shape[0], lora_A.shape[0], h, w, dtype=_lora_dtype(x))


@_no_autocast
def _conv2d_bwd_impl(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    padding_mode: str,
    dropout_p: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    r = lora_A.shape[0]
    a4 = _cast(lora_A, ldt).reshape(r, -1, weight.shape[2], weight.shape[3])
    b4 = _cast(lora_B, ldt)[:, :, None, None]
    xp, cpad = _prepare(x, padding, padding_mode)
    mask = _mask(x, dropout_p, seed)
    bias_sizes = [weight.shape[0]] if need_b else None
    gxp, gw, gbias = torch.ops.aten.convolution_backward(
        grad_y, xp, weight, bias_sizes, stride, cpad, dilation, False, [0, 0], groups, [need_x, need_w, need_b]
    )
    gx = gA = gB = None
    if need_x or need_A or need_B:
        gl = _cast(grad_y, ldt)
        g_u, gb4, _ = torch.ops.aten.convolution_backward(
            gl, u, b4, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, [need_x or need_A, need_B, False]
        )
        if need_B:
            gB = (gb4 * scaling).reshape(lora_B.shape).to(lora_B.dtype)
        if need_x or need_A:
            g_u = g_u * scaling
            xl = _cast(x, ldt) if mask is None else _cast(x, ldt) * _cast(mask, ldt)
            xdp = _prepare(xl, padding, padding_mode)[0]
            gxp_lora, ga4, _ = torch.ops.aten.convolution_backward(
                g_u, xdp, a4, None, stride, cpad, dilation, False, [0, 0], groups, [need_x, need_A, False]
            )
            if need_A:
                gA = ga4.reshape(lora_A.shape).to(lora_A.dtype)
            if need_x:
                if mask is None:
                    gx = _unpad_grad(x, gxp.add_(gxp_lora), padding, padding_mode, cpad)
                else:
                    gx_lora = _unpad_grad(x, gxp_lora, padding, padding_mode, cpad) * _cast(mask, ldt)
                    gx = _unpad_grad(x, gxp, padding, padding_mode, cpad).add_(gx_lora)
    # grad_x in x's layout (channels-last or contiguous, as nn.Conv2d's), the parameter gradients contiguous
    if gx is not None:
        gx = gx.contiguous(memory_format=_out_format(x))
    if gw is not None:
        gw = gw.contiguous()
    return gx, gw, gbias, gA, gB


_conv2d_bwd = torch.library.custom_op("rvclora::torch_lora_conv2d_bwd", mutates_args=())(
    _with_empties(_conv2d_bwd_impl)
)


_conv2d_run = fused_op(
    SPECS["lora_conv2d"], "torch", eager_fwd=_conv2d_fwd_impl, eager_bwd=_conv2d_bwd_impl, contiguous_grad=True
)


def lora_conv2d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, *rest):
    return _conv2d_run(x, weight, bias, lora_A, lora_B, scaling, list(stride), list(padding), list(dilation), *rest)
