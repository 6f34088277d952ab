"""The torch backend's ConvTranspose1d op: ``y = convT(x, W) + b + s·convT(A·D(x), B)`` and its gradients."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...autograd import fused_op
from ...geometry import conv_transpose1d_out_len
from ...spec import SPECS
from ._common import (
    _cast,
    _grouped_1x1,
    _grouped_outer,
    _lora_dtype,
    _mask,
    _merge_ok,
    _no_autocast,
    _with_empties,
)


def _convt_merge_pays(x: Tensor, weight: Tensor) -> bool:
    """Merging a transposed convolution's weight costs a pass over ``in·out/g·k`` elements per call;
    the separate LoRA term costs a thin convolution at the input rate. RVC's first upsampler
    (512→256, k=16, 32 frames) has a weight 30× larger than its input: there the separate term wins
    (measured in ``pytest bench/``); the later upsamplers, with long inputs, merge."""
    return weight.numel() <= x.numel() * weight.shape[-1]


def _merged_convt_weight(weight: Tensor, A: Tensor, B: Tensor, scaling: float, groups: int) -> Tensor:
    """``W + s·ΔW`` in one GEMM pass (``W: (in, out/g, k)``, ``A: (r, in/g)``, ``B: (r, out/g·k)``)."""
    cin = weight.shape[0]
    if groups == 1:
        return torch.addmm(weight.reshape(cin, -1), A.t(), B, alpha=scaling).view(weight.shape)
    ig, rg = cin // groups, A.shape[0] // groups
    return torch.baddbmm(
        weight.reshape(groups, ig, -1),
        A.reshape(groups, rg, ig).transpose(1, 2),
        B.reshape(groups, rg, -1),
        alpha=scaling,
    ).view(weight.shape)


def _polyphase(g: Tensor, stride: int, padding: int, dilation: int, k: int, t_in: int):
    """Views ``tap ↦ g[..., τ·stride − padding + tap·dilation]`` for ``τ < t_in``, each with unit inner stride.

    One copy of ``g`` regrouped by phase (``τ·stride`` mod stride) replaces ``k`` strided
    gathers; each tap's view then feeds a GEMM directly.
    """
    n, c, t_out = g.shape
    need = (t_in - 1) * stride + (k - 1) * dilation + 1
    q = -(-need // stride)
    gp = F.pad(g, (padding, q * stride - padding - t_out))
    phases = gp.reshape(n, c, q, stride).permute(0, 3, 1, 2).contiguous()  # (n, stride, c, q)

    def tap_view(tap: int) -> Tensor:
        off = tap * dilation
        return phases[:, off % stride, :, off // stride : off // stride + t_in]

    return tap_view


def _convt_lora_grads(
    grad_y: Tensor, u: Tensor, b3: Tensor, stride: int, padding: int, dilation: int, groups: int, need_b: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(convT_B^T(g), grad_B3)`` for ``u: (N, r, T)``, ``b3: (r, out/g, k)`` — unscaled.

    ``g_u[n, j, τ] = Σ_{o,t} B[j, o, t]·g[n, o, τ·stride − padding + t·dilation]`` and
    ``grad_B[j, o, t] = Σ_{n,τ} u[n, j, τ]·g[n, o, …]``: ``2k`` GEMMs over polyphase views.
    """
    n, r, t_in = u.shape
    _, og, k = b3.shape
    rg = r // groups
    view = _polyphase(grad_y, stride, padding, dilation, k, t_in)
    bg = b3.reshape(groups, rg, og, k)
    ug = u.reshape(n, groups, rg, t_in)
    g_u = u.new_zeros(n, groups, rg, t_in)
    gB = u.new_empty(groups, rg, og, k) if need_b else None
    for tap in range(k):
        gs = view(tap).reshape(n, groups, og, t_in)
        g_u += torch.matmul(bg[..., tap], gs)
        if gB is not None:
            prod = torch.matmul(ug, gs.transpose(-1, -2))  # (n, g, r/g, out/g)
            gB[..., tap] = prod[0] if n == 1 else prod.sum(0)
    return g_u.reshape(n, r, t_in), (gB.reshape(r, og, k) if gB is not None else None)


# --------------------------------------------------------------------------- ConvTranspose1d


@_no_autocast
def _convt_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int,
    padding: int,
    output_padding: int,
    dilation: int,
    groups: int,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Returns ``y: (N, out, T_out)`` and ``u = A·D(x): (N, r, T)``."""
    ldt = _lora_dtype(x)
    k = weight.shape[-1]
    r = lora_A.shape[0]
    A, B = _cast(lora_A, ldt), _cast(lora_B, ldt)
    mask = _mask(x, dropout_p, seed)
    xl = _cast(x, ldt) if mask is None else _cast(x, ldt) * _cast(mask, ldt)
    u = _grouped_1x1(A, xl, groups)
    if _merge_ok(x, dropout_p, conv=True) and _convt_merge_pays(x, weight):
        w_eff = _merged_convt_weight(weight, A, B, scaling, groups)
        y = F.conv_transpose1d(x, w_eff, bias, stride, padding, output_padding, groups, dilation)
    else:
        y = F.conv_transpose1d(x, weight, bias, stride, padding, output_padding, groups, dilation)
        lora = F.conv_transpose1d(u, B.reshape(r, -1, k), None, stride, padding, output_padding, groups, dilation)
        y.add_(lora, alpha=scaling)  # half activations: float32 lora, one rounding into y
    return y, u


_convt_fwd = torch.library.custom_op("rvclora::torch_lora_conv_transpose1d_fwd", mutates_args=())(_convt_fwd_impl)


@_convt_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed):
    k = weight.shape[-1]
    t_out = conv_transpose1d_out_len(x.shape[-1], k, stride, padding, output_padding, dilation)
    out = weight.shape[1] * groups
    return (
        x.new_empty(x.shape[0], out, t_out),
        x.new_empty(x.shape[0], lora_A.shape[0], x.shape[-1], dtype=_lora_dtype(x)),
    )


@_no_autocast
def _convt_bwd_impl(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int,
    padding: int,
    output_padding: int,
    dilation: int,
    groups: int,
    dropout_p: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    k = weight.shape[-1]
    r = lora_A.shape[0]
    A, B = _cast(lora_A, ldt), _cast(lora_B, ldt)
    b3 = B.reshape(r, -1, k)
    mask = _mask(x, dropout_p, seed)
    mask = _cast(mask, ldt) if mask is not None else None
    merged = _merge_ok(x, dropout_p, conv=True) and _convt_merge_pays(x, weight)
    w_base = _merged_convt_weight(weight, A, B, scaling, groups) if merged else weight
    bias_sizes = [weight.shape[1] * groups] if need_b else None
    conv_args = ([stride], [padding], [dilation], True, [output_padding], groups)
    gx, gw, gbias = torch.ops.aten.convolution_backward(
        grad_y, x, w_base, bias_sizes, *conv_args, [need_x, need_w, need_b]
    )
    gA = gB = None
    if need_A or need_B or (need_x and not merged):
        # g_u = s·convT_B^T(g): the strided correlation of g with B, r output channels.
        if grad_y.device.type == "cpu" and u.shape[0] * u.shape[-1] >= 256:
            g_u, gb3 = _convt_lora_grads(_cast(grad_y, ldt), u, b3, stride, padding, dilation, groups, need_B)
        else:
            g_u, gb3, _ = torch.ops.aten.convolution_backward(
                _cast(grad_y, ldt), u, b3, None, *conv_args, [True, need_B, False]
            )
        g_u = g_u * scaling
        if need_B:
            assert gb3 is not None
            gB = (gb3 * scaling).reshape(r, -1).to(lora_B.dtype)
        if need_A:
            xl = _cast(x, ldt)
            gA = _grouped_outer(g_u, xl if mask is None else xl * mask, groups).to(lora_A.dtype)
        if need_x and not merged:
            at = A.reshape(groups, r // groups, -1).transpose(1, 2).reshape(-1, r // groups)
            lx = _grouped_1x1(at, g_u, groups)
            gx.add_(lx if mask is None else lx.mul_(mask))  # in place: the base part stays in x's dtype
    return gx, gw, gbias, gA, gB


_convt_bwd = torch.library.custom_op("rvclora::torch_lora_conv_transpose1d_bwd", mutates_args=())(
    _with_empties(_convt_bwd_impl)
)


_convt_run = fused_op(
    SPECS["lora_conv_transpose1d"], "torch", eager_fwd=_convt_fwd_impl, eager_bwd=_convt_bwd_impl, contiguous_grad=True
)


#: the entry point: the runner itself (every argument passes through as it is)
lora_conv_transpose1d = _convt_run
