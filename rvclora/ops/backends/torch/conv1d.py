"""The torch backend's Conv1d op: ``y = conv(x, W) + b + s·B·conv(D(x), A)`` and its gradients."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rvclora import reference as ref

from ...autograd import fused_op
from ...geometry import conv1d_out_len
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

# --------------------------------------------------------------------------- Conv1d


def _conv1d_prepare(x: Tensor, padding: Sequence[int], padding_mode: str) -> Tuple[Tensor, int]:
    """Pad explicitly unless the convolution can do it itself; returns (input, conv padding)."""
    left, right = padding
    if padding_mode == "zeros" and left == right:
        return x, left
    return ref.pad1d(x, (left, right), padding_mode), 0


def _unpad_grad(x: Tensor, grad_xp: Tensor, padding: Sequence[int], padding_mode: str, conv_pad: int) -> Tensor:
    """The adjoint of :func:`_conv1d_prepare` applied to ``grad_xp``."""
    left, right = padding
    if conv_pad or (left, right) == (0, 0):
        return grad_xp
    if padding_mode == "zeros":
        # a gradient is returned contiguous, like its input (only explicit, asymmetric zero padding gets here)
        return grad_xp[..., left : grad_xp.shape[-1] - right].contiguous()
    if x.dtype != grad_xp.dtype:
        x = torch.empty_like(x, dtype=grad_xp.dtype)  # the pad backward ops only read its shape
    if padding_mode == "reflect":
        return torch.ops.aten.reflection_pad1d_backward(grad_xp, x, [left, right])
    if padding_mode == "replicate":
        return torch.ops.aten.replication_pad1d_backward(grad_xp, x, [left, right])
    # circular: the pads are copies of the other end
    t = x.shape[-1]
    gx = grad_xp[..., left : left + t].clone()
    if left:
        gx[..., t - left :] += grad_xp[..., :left]
    if right:
        gx[..., :right] += grad_xp[..., left + t :]
    return gx


def _lora_input(x: Tensor, xp: Tensor, mask: Optional[Tensor], padding, padding_mode: str, ldt) -> Tensor:
    """The (padded) input of the LoRA path, ``pad(D(x))``, in the LoRA dtype."""
    if mask is None:
        return _cast(xp, ldt)
    return _conv1d_prepare(_cast(x, ldt) * _cast(mask, ldt), padding, padding_mode)[0]


def _tap_ranges(k: int, dilation: int, pad_left: int, t_in: int, t_out: int):
    """For stride 1: ``(tap, lo, hi, off)`` with output positions ``lo ≤ τ < hi`` reading input
    ``τ + off`` (``off = tap·dilation − pad_left``); taps that only see zero padding are skipped."""
    for tap in range(k):
        off = tap * dilation - pad_left
        lo, hi = max(0, -off), min(t_out, t_in - off)
        if lo < hi:
            yield tap, lo, hi, off


def _thin_conv1d(xp: Tensor, a3: Tensor, stride: int, conv_pad: int, dilation: int, groups: int, t_out: int) -> Tensor:
    """``conv1d(xp, a3, padding=conv_pad)`` for a thin ``a3: (r, in/g, k)``.

    For stride 1 on CPU it is one GEMM ``(g, k·r/g, in/g) @ x`` and ``k`` shifted adds (the zero
    padding is handled by clipping the adds, not by copying ``x``), which beats the convolution
    library for a handful of output channels.
    """
    if stride != 1 or xp.device.type != "cpu":
        return F.conv1d(xp, a3, None, stride, conv_pad, dilation, groups)
    r, cin_g, k = a3.shape
    n, t_in = xp.shape[0], xp.shape[-1]
    rg = r // groups
    # (g, k, r/g, in/g) → (g, k·r/g, in/g)
    w = a3.reshape(groups, rg, cin_g, k).permute(0, 3, 1, 2).reshape(groups, k * rg, cin_g)
    p = torch.matmul(w, xp.reshape(n, groups, cin_g, t_in))  # (n, g, k·r/g, T_in)
    p = p.reshape(n, groups, k, rg, t_in)
    u = p.new_zeros(n, groups, rg, t_out)
    for tap, lo, hi, off in _tap_ranges(k, dilation, conv_pad, t_in, t_out):
        u[..., lo:hi] += p[:, :, tap, :, lo + off : hi + off]
    return u.reshape(n, r, t_out)


def _thin_conv1d_weight_grad(
    g_u: Tensor, xdp: Tensor, stride: int, conv_pad: int, dilation: int, groups: int, k: int
) -> Tensor:
    """``grad_A`` of :func:`_thin_conv1d` as one GEMM; returns ``(r, in/g·k)``.

    ``grad_A[j, i, t] = Σₙ,τ g_u[n, j, τ] · xp[n, i, τ·stride + t·dilation]``. On CPU the
    convolution library's weight gradient for a handful of output channels is several times
    slower than this GEMM.
    """
    n, r, t_out = g_u.shape
    if xdp.device.type != "cpu" or stride != 1:
        a_shape = (r, xdp.shape[1] // groups, k)
        return torch.ops.aten.convolution_backward(
            g_u,
            xdp,
            g_u.new_empty(a_shape),
            None,
            [stride],
            [conv_pad],
            [dilation],
            False,
            [0],
            groups,
            [False, True, False],
        )[1].reshape(r, -1)
    rg, cin_g, t_in = r // groups, xdp.shape[1] // groups, xdp.shape[-1]
    t_p = t_in + 2 * conv_pad
    # One GEMM instead of k skinny ones (1.3-2.5x faster at RVC's shapes, 1 or 2 threads):
    # G[n, grp, tap·r/g + j, τ + tap·dilation] = g_u[n, grp·r/g + j, τ] over the padded time axis (one
    # strided copy), then G @ xᵀ on the unpadded columns: the padding columns would only multiply zeros.
    stacked = g_u.new_zeros(n, groups, k * rg, t_p)
    taps = stacked.as_strided(
        (k, n, groups, rg, t_out), (rg * t_p + dilation, groups * k * rg * t_p, k * rg * t_p, t_p, 1)
    )
    taps.copy_(g_u.reshape(n, groups, rg, t_out).expand(k, -1, -1, -1, -1))
    cols = stacked[..., conv_pad : conv_pad + t_in]
    prod = torch.matmul(cols, xdp.reshape(n, groups, cin_g, t_in).transpose(-1, -2))
    grad_y = prod[0] if n == 1 else prod.sum(0)  # (g, k·r/g, in/g)
    return grad_y.reshape(groups, k, rg, cin_g).permute(0, 2, 3, 1).reshape(r, cin_g * k)


def _merged_conv1d_weight(weight: Tensor, a2: Tensor, B: Tensor, scaling: float, groups: int) -> Tensor:
    """``W + s·ΔW`` in one GEMM pass (``a2: (r, in/g·k)``, ``B: (out, r/g)``)."""
    out = weight.shape[0]
    if groups == 1:
        return torch.addmm(weight.reshape(out, -1), B, a2, alpha=scaling).view(weight.shape)
    og, rg = out // groups, a2.shape[0] // groups
    return torch.baddbmm(
        weight.reshape(groups, og, -1), B.reshape(groups, og, rg), a2.reshape(groups, rg, -1), alpha=scaling
    ).view(weight.shape)


def _add_grouped_1x1_(y: Tensor, w: Tensor, x: Tensor, groups: int, alpha: float) -> Tensor:
    """``y += alpha · grouped_1x1(w, x)`` in place (``y: (N, g·o, T)``, ``w: (g·o, c)``, ``x: (N, g·c, T)``)."""
    n, _, t = x.shape
    wg = w.reshape(groups, -1, w.shape[1])
    og, c = wg.shape[1], wg.shape[2]
    yv = y.view(n * groups, og, t)
    yv.baddbmm_(wg.expand(n, groups, og, c).reshape(n * groups, og, c), x.reshape(n * groups, c, t), alpha=alpha)
    return y


@_no_autocast
def _conv1d_fwd_impl(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int,
    padding: List[int],
    dilation: int,
    groups: int,
    padding_mode: str,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Returns ``y: (N, out, T_out)`` and ``u = conv(D(x), A): (N, r, T_out)``."""
    dt, ldt = x.dtype, _lora_dtype(x)
    k = weight.shape[-1]
    r = lora_A.shape[0]
    a3 = _cast(lora_A, ldt).reshape(r, -1, k)
    B = _cast(lora_B, ldt)
    xp, cpad = _conv1d_prepare(x, padding, padding_mode)
    t_out = conv1d_out_len(x.shape[-1], k, stride, padding[0] + padding[1], dilation)
    mask = _mask(x, dropout_p, seed)
    if _merge_ok(x, dropout_p, conv=True):
        a2 = a3.reshape(r, -1)

        def joint() -> Tuple[Tensor, Tensor]:
            # One convolution computes y and u together: conv(x, [W + s·ΔW; A]) has out + r channels,
            # so u costs r/out of the base forward and no separate pass over x.
            # (narrow/copy_/pad rather than indexing and cat: each saves microseconds of dispatch per call)
            out = weight.shape[0]
            w_cat = weight.new_empty(out + r, *weight.shape[1:])
            torch.addmm(weight.reshape(out, -1), B, a2, alpha=scaling, out=w_cat.narrow(0, 0, out).view(out, -1))
            w_cat.narrow(0, out, r).copy_(a3)
            b_cat = F.pad(bias, (0, r)) if bias is not None else None
            yu = F.conv1d(xp, w_cat, b_cat, stride, cpad, dilation, groups)
            if not yu.is_contiguous():
                # an input whose strides read as channels-last (one channel, stride 1: RVC's noise convs get
                # the harmonic source as a transposed (B, T, 1) view) gets a channels-last output; the view
                # below assumes nn.Conv1d's layout
                yu = yu.contiguous()
            # Batch 1 only: there the first ``out`` channels are one contiguous block, so y is a view in
            # nn.Conv1d's layout (the batch stride of a size-1 dim is re-stated, which moves no data).
            # u is cloned: a view would keep all of yu (an activation-sized buffer) alive for backward.
            t = yu.shape[-1]
            y = yu.narrow(1, 0, out).as_strided((1, out, t), (out * t, t, 1))
            return y, yu.narrow(1, out, r).clone(memory_format=torch.contiguous_format)

        def split() -> Tuple[Tensor, Tensor]:
            # The base-sized convolution with W + s·ΔW, and u as a thin GEMM plus k shifted adds.
            w_eff = _merged_conv1d_weight(weight, a2, B, scaling, groups)
            y = F.conv1d(xp, w_eff, bias, stride, cpad, dilation, groups)
            return y, _thin_conv1d(xp, a3, stride, cpad, dilation, groups, t_out)

        if groups != 1 or x.shape[0] != 1:
            # at batch > 1 the joint output's y would be strided (channels out of out + r per sample):
            # the base convolution writes y in nn.Conv1d's layout directly instead
            y, u = split()
        else:
            y, u = joint()
    else:
        y = F.conv1d(xp, weight, bias, stride, cpad, dilation, groups)
        xdp = _lora_input(x, xp, mask, padding, padding_mode, ldt)
        u = _thin_conv1d(xdp, a3, stride, cpad, dilation, groups, t_out)
        if ldt == dt:
            _add_grouped_1x1_(y, B, u, groups, scaling)
        else:
            # half activations: the thin 1×1 in float32, added and rounded once by a mixed-dtype add_
            y.add_(_grouped_1x1(B, u, groups), alpha=scaling)
    return y, u


_conv1d_fwd = torch.library.custom_op("rvclora::torch_lora_conv1d_fwd", mutates_args=())(_conv1d_fwd_impl)


@_conv1d_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed):
    t_out = conv1d_out_len(x.shape[-1], weight.shape[-1], stride, padding[0] + padding[1], dilation)
    return (
        x.new_empty(x.shape[0], weight.shape[0], t_out),
        x.new_empty(x.shape[0], lora_A.shape[0], t_out, dtype=_lora_dtype(x)),
    )


def _conv1d_bwd_lean(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    pad: int,
    dilation: int,
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The general backward below, specialised to RVC's case (batch 1, groups 1, stride 1, symmetric zero
    padding, merged maths on CPU) with as few ops as possible: each op costs microseconds of dispatch,
    times every adapted layer of a model (tests/test_ops.py checks it against the oracle like the rest)."""
    need_x, need_w, need_b, need_A, need_B = needs
    out, cin, k = weight.shape
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    g2 = grad_y[0]
    w_eff = torch.addmm(weight.reshape(out, cin * k), B, A, alpha=scaling).view(out, cin, k)
    gx, gw, gbias = torch.ops.aten.convolution_backward(
        grad_y, x, w_eff, [out] if need_b else None, [1], [pad], [dilation], False, [0], 1, [need_x, need_w, need_b]
    )
    gA = _lean_grad_A(g2, x, B, scaling, pad, dilation, k).to(lora_A.dtype) if need_A else None
    gB = _lean_grad_B(g2, u, scaling).to(lora_B.dtype) if need_B else None
    return gx, gw, gbias, gA, gB


def _lean_grad_A(g2: Tensor, x: Tensor, B: Tensor, scaling: float, pad: int, dilation: int, k: int) -> Tensor:
    """grad_A as one GEMM over the tap-stacked, unscaled g_u = Bᵀg (see _thin_conv1d_weight_grad)."""
    r, cin = B.shape[1], x.shape[1]
    t_in, t_out = x.shape[-1], g2.shape[-1]
    t_p = t_in + 2 * pad
    stacked = g2.new_zeros(k * r, t_p)
    stacked.as_strided((k, r, t_out), (r * t_p + dilation, t_p, 1)).copy_(torch.mm(B.t(), g2).expand(k, r, t_out))
    gA = torch.mm(stacked[:, pad : pad + t_in], x[0].t())  # (k·r, in)
    return gA.view(k, r, cin).permute(1, 2, 0).reshape(r, cin * k).mul_(scaling)


def _lean_grad_B(g2: Tensor, u: Tensor, scaling: float) -> Tensor:
    # the thin operand first, then a parameter-sized transpose copy: grad_B is contiguous like lora_B
    return torch.mm(u[0], g2.t()).mul_(scaling).t().contiguous()


@_no_autocast
def _conv1d_bwd_impl(
    grad_y: Tensor,
    x: Tensor,
    u: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int,
    padding: List[int],
    dilation: int,
    groups: int,
    padding_mode: str,
    dropout_p: float,
    seed: Optional[Tensor],
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    k = weight.shape[-1]
    r = lora_A.shape[0]
    merged = _merge_ok(x, dropout_p, conv=True)
    if (
        merged
        and x.shape[0] == 1
        and groups == 1
        and stride == 1
        and x.device.type == "cpu"
        and padding_mode == "zeros"
        and padding[0] == padding[1]
    ):
        return _conv1d_bwd_lean(grad_y, x, u, weight, lora_A, lora_B, scaling, padding[0], dilation, needs)
    a3 = _cast(lora_A, ldt).reshape(r, -1, k)
    B = _cast(lora_B, ldt)
    xp, cpad = _conv1d_prepare(x, padding, padding_mode)
    mask = _mask(x, dropout_p, seed)
    xdp = _lora_input(x, xp, mask, padding, padding_mode, ldt)
    gl = _cast(grad_y, ldt)
    g_u = _grouped_1x1(B.reshape(groups, -1, B.shape[1]).transpose(1, 2).reshape(r, -1) * scaling, gl, groups)
    w_base = _merged_conv1d_weight(weight, a3.reshape(r, -1), B, scaling, groups) if merged else weight
    bias_sizes = [weight.shape[0]] if need_b else None
    gxp, gw, gbias = torch.ops.aten.convolution_backward(
        grad_y, xp, w_base, bias_sizes, [stride], [cpad], [dilation], False, [0], groups, [need_x, need_w, need_b]
    )
    gx = gA = gB = None
    need_thin_x = need_x and not merged
    if need_A:
        gA = _thin_conv1d_weight_grad(g_u, xdp, stride, cpad, dilation, groups, k).to(lora_A.dtype)
    if need_thin_x:
        gxp_lora = torch.ops.aten.convolution_backward(
            g_u, xdp, a3, None, [stride], [cpad], [dilation], False, [0], groups, [True, False, False]
        )[0]
        if mask is None:
            gxp = gxp.add_(gxp_lora)  # in place: one rounding, no float32 copy of the base part
        else:
            gx_lora = _unpad_grad(x, gxp_lora, padding, padding_mode, cpad) * _cast(mask, ldt)
    if need_x:
        gx = _unpad_grad(x, gxp, padding, padding_mode, cpad)
        if need_thin_x and mask is not None:
            gx = gx.add_(gx_lora)
    if need_B:
        gB = (_grouped_outer(gl, u, groups) * scaling).to(lora_B.dtype)
    return gx, gw, gbias, gA, gB


_conv1d_bwd = torch.library.custom_op("rvclora::torch_lora_conv1d_bwd", mutates_args=())(
    _with_empties(_conv1d_bwd_impl)
)


_conv1d_run = fused_op(
    SPECS["lora_conv1d"], "torch", eager_fwd=_conv1d_fwd_impl, eager_bwd=_conv1d_bwd_impl, contiguous_grad=True
)


def lora_conv1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, *rest):
    return _conv1d_run(x, weight, bias, lora_A, lora_B, scaling, stride, list(padding), *rest)
