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
  (``.view()`` works) and the fake kernels below state exactly the real strides.

Each op is a ``torch.library`` custom op (``rvclora::torch_*``) with a fake implementation
and an autograd formula, so ``torch.compile(fullgraph=True)`` traces it as one node.
"""

from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference as ref
from .geometry import conv1d_out_len, conv_transpose1d_out_len

NAME = "torch"

__all__ = ["dropout_mask", "lora_linear", "lora_conv1d", "lora_conv_transpose1d"]


def unavailable_reason() -> Optional[str]:
    return None


def unsupported_reason(op: str, x: Tensor, **params) -> Optional[str]:
    return None


# --------------------------------------------------------------------------- helpers


def dropout_mask(seed: Tensor, shape: Sequence[int], p: float, device, dtype) -> Tensor:
    """The scaled mask (``0`` or ``1/(1-p)``) this backend applies for ``seed``.

    Drawn with a private ``torch.Generator`` seeded by ``seed``, so backward regenerates
    exactly the mask forward used.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    keep = torch.rand(tuple(shape), generator=gen, device=device, dtype=torch.float32) >= p
    return keep.to(dtype) * (1.0 / (1.0 - p))


def _mask(x: Tensor, dropout_p: float, seed: Optional[Tensor]) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    return dropout_mask(seed, x.shape, dropout_p, x.device, x.dtype)


def _merge_ok(x: Tensor, dropout_p: float, conv: bool) -> bool:
    """May the LoRA term be folded into the weight without losing it to rounding?"""
    if dropout_p != 0.0 or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.device.type == "cuda" and x.dtype == torch.float32:
        return not _tf32_enabled(conv)
    return True


def _tf32_enabled(conv: bool) -> bool:
    """Would PyTorch run a float32 base op of this kind (cuDNN convolution or cuBLAS matmul) in TF32 on CUDA?

    Then the base part follows it (the base-sized ops are the library's own, under the same flags) and the
    LoRA term stays separate, never rounded into a TF32 ``W + ΔW``. Reads the ``fp32_precision`` settings
    (``"tf32"``/``"ieee"``; ``"none"`` defers to the enclosing level) and, where none is set, the legacy
    ``allow_tf32`` flags; reading a legacy flag raises once the new settings are in use, so they come first.
    """
    levels = ((getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends) if conv
              else (torch.backends.cuda.matmul, torch.backends))
    for level in levels:
        try:
            precision = getattr(level, "fp32_precision", "none")
        except RuntimeError:
            precision = "none"
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32 if conv else torch.backends.cuda.matmul.allow_tf32)


def _no_autocast(fn):
    """Run an op body with autocast off: its dtypes are chosen explicitly (autocast would turn
    the float32 LoRA path of half inputs back into half)."""

    @functools.wraps(fn)
    def wrapper(*args):
        device_type = args[0].device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(*args)
        return fn(*args)

    return wrapper


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A Python-side check is cheaper than Tensor.to's dispatch when nothing changes (the common case).
    return t if t.dtype == dtype else t.to(dtype)


def _with_empties(bwd_impl):
    """A backward body returning ``None`` for unneeded gradients, as a custom op must: empty tensors."""

    @functools.wraps(bwd_impl)
    def op_impl(*args):
        x, needs = args[1], args[-1]
        # by ``needs``, not by None: convolution_backward may return a gradient it was not asked for
        return tuple(t if need and t is not None else x.new_empty(0) for t, need in zip(bwd_impl(*args), needs))

    return op_impl


def _lora_dtype(x: Tensor) -> torch.dtype:
    """The LoRA path of half/bfloat16 inputs runs in float32 (one rounding at the end)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _setup(ctx, inputs, output):
    """Every op's inputs are ``(x, weight, bias, lora_A, lora_B, *non-tensor args, seed)``: autograd keeps
    ``x``, ``u`` and the parameters (no activation-sized intermediate, no dropped copy of ``x``)."""
    x, weight, _bias, lora_A, lora_B, *args, seed = inputs
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.args = tuple(args)


def _backward(ctx, grad_y, bwd):
    x, u, weight, lora_A, lora_B, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], n[2], n[3], n[4]]
    grads = bwd(grad_y.contiguous(), x, u, weight, lora_A, lora_B, *ctx.args, seed, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (len(n) - 5)


def _register_autograd(fwd_op, bwd_op) -> None:
    """The custom-op path (used under ``torch.compile``): backward through the backward custom op."""
    fwd_op.register_autograd(lambda ctx, grad_y, grad_u: _backward(ctx, grad_y, bwd_op), setup_context=_setup)


def _eager_function(name, fwd_impl, bwd_impl):
    """A plain ``autograd.Function`` over the same bodies as the custom ops.

    Eager calls skip the custom-op machinery (hundreds of microseconds per call on CPU, times
    every adapted layer of a model); under ``torch.compile`` the custom ops are used instead,
    so the graph holds one opaque node per layer.
    """

    def forward(ctx, *args):
        out = fwd_impl(*args)
        _setup(ctx, args, out)
        return out[0]

    def backward(ctx, grad_y):
        return _backward(ctx, grad_y, bwd_impl)

    return type(f"_Torch_{name}_Function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


# --------------------------------------------------------------------------- Linear


@_no_autocast
def _linear_fwd_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor],
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
    grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Optional[Tensor], needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_W, grad_b, grad_A, grad_B)`` in each input's dtype, in the layout nn.Linear's autograd
    gives (contiguous; ``grad_x`` transposed for a transposed 2-D ``x``); an unneeded gradient is ``None``.
    The base-sized GEMMs run in the activation dtype."""
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    A, B = _cast(lora_A, ldt), _cast(lora_B, ldt)
    x2 = x.reshape(-1, x.shape[-1])
    g = grad.reshape(-1, grad.shape[-1])
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
        xl = _cast(x2, ldt)
        gA = torch.mm(g_u.t(), xl if mask is None else xl * mask).to(lora_A.dtype)
    if need_B:
        # the thin operand first (several times faster on CPU), then a parameter-sized transpose copy
        gB = torch.mm(u.t(), gl).mul_(scaling).t().contiguous().to(lora_B.dtype)
    return gx, gw, gbias, gA, gB


_linear_bwd = torch.library.custom_op("rvclora::torch_lora_linear_bwd", mutates_args=())(
    _with_empties(_linear_bwd_impl)
)


@_linear_bwd.register_fake
def _(grad, x, u, weight, lora_A, lora_B, scaling, dropout_p, seed, needs):
    return _grad_fakes(x, weight, (weight.shape[0],), lora_A, lora_B, needs, _transposed_2d(x))


def _grad_fakes(x, weight, bias_shape, lora_A, lora_B, needs, x_transposed=False):
    """Contiguous gradients in each input's dtype (empty 1-D tensors for unneeded ones), as the real ops return
    (``grad_x`` transposed for a transposed 2-D Linear input)."""
    shapes = (x.shape, weight.shape, bias_shape, lora_A.shape, lora_B.shape)
    dts = (x.dtype, x.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
    out = [x.new_empty(s, dtype=d) if n else x.new_empty(0) for s, d, n in zip(shapes, dts, needs)]
    if x_transposed and needs[0]:
        out[0] = x.new_empty(x.shape[1], x.shape[0]).t()
    return tuple(out)


def _transposed_2d(x: Tensor) -> bool:
    """A transposed matrix (``x.t()`` of a contiguous one), both dims > 1."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) == 1 and x.stride(1) == x.shape[0]


_register_autograd(_linear_fwd, _linear_bwd)
_LinearFunction = _eager_function("linear", _linear_fwd_impl, _linear_bwd_impl)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if torch.compiler.is_compiling():
        return _linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)[0]
    return _LinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


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
        return grad_xp[..., left: grad_xp.shape[-1] - right].contiguous()
    if x.dtype != grad_xp.dtype:
        x = torch.empty_like(x, dtype=grad_xp.dtype)  # the pad backward ops only read its shape
    if padding_mode == "reflect":
        return torch.ops.aten.reflection_pad1d_backward(grad_xp, x, [left, right])
    if padding_mode == "replicate":
        return torch.ops.aten.replication_pad1d_backward(grad_xp, x, [left, right])
    # circular: the pads are copies of the other end
    t = x.shape[-1]
    gx = grad_xp[..., left: left + t].clone()
    if left:
        gx[..., t - left:] += grad_xp[..., :left]
    if right:
        gx[..., :right] += grad_xp[..., left + t:]
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
        u[..., lo:hi] += p[:, :, tap, :, lo + off: hi + off]
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
            g_u, xdp, g_u.new_empty(a_shape), None, [stride], [conv_pad], [dilation], False, [0], groups,
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
    cols = stacked[..., conv_pad: conv_pad + t_in]
    prod = torch.matmul(cols, xdp.reshape(n, groups, cin_g, t_in).transpose(-1, -2))
    grad = prod[0] if n == 1 else prod.sum(0)  # (g, k·r/g, in/g)
    return grad.reshape(groups, k, rg, cin_g).permute(0, 2, 3, 1).reshape(r, cin_g * k)


def _merged_conv1d_weight(weight: Tensor, a2: Tensor, B: Tensor, scaling: float, groups: int) -> Tensor:
    """``W + s·ΔW`` in one GEMM pass (``a2: (r, in/g·k)``, ``B: (out, r/g)``)."""
    out = weight.shape[0]
    if groups == 1:
        return torch.addmm(weight.reshape(out, -1), B, a2, alpha=scaling).view(weight.shape)
    og, rg = out // groups, a2.shape[0] // groups
    return torch.baddbmm(
        weight.reshape(groups, og, -1), B.reshape(groups, og, rg), a2.reshape(groups, rg, -1), alpha=scaling
    ).view(weight.shape)


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
        weight.reshape(groups, ig, -1), A.reshape(groups, rg, ig).transpose(1, 2), B.reshape(groups, rg, -1),
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
        return phases[:, off % stride, :, off // stride: off // stride + t_in]

    return tap_view


def _convt_lora_grads(
    grad: Tensor, u: Tensor, b3: Tensor, stride: int, padding: int, dilation: int, groups: int, need_b: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(convT_B^T(g), grad_B3)`` for ``u: (N, r, T)``, ``b3: (r, out/g, k)`` — unscaled.

    ``g_u[n, j, τ] = Σ_{o,t} B[j, o, t]·g[n, o, τ·stride − padding + t·dilation]`` and
    ``grad_B[j, o, t] = Σ_{n,τ} u[n, j, τ]·g[n, o, …]``: ``2k`` GEMMs over polyphase views.
    """
    n, r, t_in = u.shape
    _, og, k = b3.shape
    rg = r // groups
    view = _polyphase(grad, stride, padding, dilation, k, t_in)
    bg = b3.reshape(groups, rg, og, k)
    ug = u.reshape(n, groups, rg, t_in)
    g_u = u.new_zeros(n, groups, rg, t_in)
    gB = u.new_empty(groups, rg, og, k) if need_b else None
    for tap in range(k):
        gs = view(tap).reshape(n, groups, og, t_in)
        g_u += torch.matmul(bg[..., tap], gs)
        if need_b:
            prod = torch.matmul(ug, gs.transpose(-1, -2))  # (n, g, r/g, out/g)
            gB[..., tap] = prod[0] if n == 1 else prod.sum(0)
    return g_u.reshape(n, r, t_in), (gB.reshape(r, og, k) if need_b else None)


def _grouped_1x1(w: Tensor, x: Tensor, groups: int) -> Tensor:
    """``w: (g·o, c)`` applied per group to ``x: (N, g·c, T)`` → ``(N, g·o, T)``."""
    n, _, t = x.shape
    if groups == 1 and n == 1:
        return torch.mm(w, x[0]).unsqueeze(0)
    wg = w.reshape(groups, -1, w.shape[1])  # explicit sizes below: -1 is ambiguous for empty inputs
    return torch.matmul(wg, x.reshape(n, groups, x.shape[1] // groups, t)).reshape(n, w.shape[0], t)


def _add_grouped_1x1_(y: Tensor, w: Tensor, x: Tensor, groups: int, alpha: float) -> Tensor:
    """``y += alpha · grouped_1x1(w, x)`` in place (``y: (N, g·o, T)``, ``w: (g·o, c)``, ``x: (N, g·c, T)``)."""
    n, _, t = x.shape
    wg = w.reshape(groups, -1, w.shape[1])
    og, c = wg.shape[1], wg.shape[2]
    yv = y.view(n * groups, og, t)
    yv.baddbmm_(wg.expand(n, groups, og, c).reshape(n * groups, og, c), x.reshape(n * groups, c, t), alpha=alpha)
    return y


def _grouped_outer(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``Σ_{n,t} a[n, g·p, t] · b[n, g·q, t]`` per group → ``(g·p, q)``."""
    n, _, t = a.shape
    if groups == 1 and n == 1:
        # the thin operand on the left (about twice as fast on CPU), then a parameter-sized transpose copy
        return torch.mm(b[0], a[0].t()).t().contiguous()
    ag = a.reshape(n, groups, a.shape[1] // groups, t)
    bg = b.reshape(n, groups, b.shape[1] // groups, t)
    return torch.matmul(ag, bg.transpose(-1, -2)).sum(0).reshape(a.shape[1], bg.shape[2])


@_no_autocast
def _conv1d_fwd_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
    stride: int, padding: List[int], dilation: int, groups: int, padding_mode: str,
    dropout_p: float, seed: Optional[Tensor],
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
    return (x.new_empty(x.shape[0], weight.shape[0], t_out),
            x.new_empty(x.shape[0], lora_A.shape[0], t_out, dtype=_lora_dtype(x)))


def _conv1d_bwd_lean(
    grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    pad: int, dilation: int, needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The general backward below, specialised to RVC's case (batch 1, groups 1, stride 1, symmetric zero
    padding, merged maths on CPU) with as few ops as possible: each op costs microseconds of dispatch,
    times every adapted layer of a model (tests/test_ops.py checks it against the oracle like the rest)."""
    need_x, need_w, need_b, need_A, need_B = needs
    out, cin, k = weight.shape
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    g2 = grad[0]
    w_eff = torch.addmm(weight.reshape(out, cin * k), B, A, alpha=scaling).view(out, cin, k)
    gx, gw, gbias = torch.ops.aten.convolution_backward(
        grad, x, w_eff, [out] if need_b else None, [1], [pad], [dilation], False, [0], 1, [need_x, need_w, need_b]
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
    gA = torch.mm(stacked[:, pad: pad + t_in], x[0].t())  # (k·r, in)
    return gA.view(k, r, cin).permute(1, 2, 0).reshape(r, cin * k).mul_(scaling)


def _lean_grad_B(g2: Tensor, u: Tensor, scaling: float) -> Tensor:
    # the thin operand first, then a parameter-sized transpose copy: grad_B is contiguous like lora_B
    return torch.mm(u[0], g2.t()).mul_(scaling).t().contiguous()


@_no_autocast
def _conv1d_bwd_impl(
    grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    stride: int, padding: List[int], dilation: int, groups: int, padding_mode: str,
    dropout_p: float, seed: Optional[Tensor], needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_A, need_B = needs
    ldt = _lora_dtype(x)
    k = weight.shape[-1]
    r = lora_A.shape[0]
    merged = _merge_ok(x, dropout_p, conv=True)
    if (merged and x.shape[0] == 1 and groups == 1 and stride == 1 and x.device.type == "cpu"
            and padding_mode == "zeros" and padding[0] == padding[1]):
        return _conv1d_bwd_lean(grad, x, u, weight, lora_A, lora_B, scaling, padding[0], dilation, needs)
    a3 = _cast(lora_A, ldt).reshape(r, -1, k)
    B = _cast(lora_B, ldt)
    xp, cpad = _conv1d_prepare(x, padding, padding_mode)
    mask = _mask(x, dropout_p, seed)
    xdp = _lora_input(x, xp, mask, padding, padding_mode, ldt)
    gl = _cast(grad, ldt)
    g_u = _grouped_1x1(B.reshape(groups, -1, B.shape[1]).transpose(1, 2).reshape(r, -1) * scaling, gl, groups)
    w_base = _merged_conv1d_weight(weight, a3.reshape(r, -1), B, scaling, groups) if merged else weight
    bias_sizes = [weight.shape[0]] if need_b else None
    gxp, gw, gbias = torch.ops.aten.convolution_backward(
        grad, xp, w_base, bias_sizes, [stride], [cpad], [dilation], False, [0], groups, [need_x, need_w, need_b]
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


@_conv1d_bwd.register_fake
def _(grad, x, u, weight, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p,
      seed, needs):
    return _grad_fakes(x, weight, (weight.shape[0],), lora_A, lora_B, needs)


_register_autograd(_conv1d_fwd, _conv1d_bwd)
_Conv1dFunction = _eager_function("conv1d", _conv1d_fwd_impl, _conv1d_bwd_impl)


def lora_conv1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode,
                dropout_p, seed):
    args = (x, weight, bias, lora_A, lora_B, scaling, stride, list(padding), dilation, groups, padding_mode,
            dropout_p, seed)
    if torch.compiler.is_compiling():
        return _conv1d_fwd(*args)[0]
    return _Conv1dFunction.apply(*args)


# --------------------------------------------------------------------------- ConvTranspose1d


@_no_autocast
def _convt_fwd_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
    stride: int, padding: int, output_padding: int, dilation: int, groups: int,
    dropout_p: float, seed: Optional[Tensor],
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
    return (x.new_empty(x.shape[0], out, t_out),
            x.new_empty(x.shape[0], lora_A.shape[0], x.shape[-1], dtype=_lora_dtype(x)))


@_no_autocast
def _convt_bwd_impl(
    grad: Tensor, x: Tensor, u: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
    stride: int, padding: int, output_padding: int, dilation: int, groups: int,
    dropout_p: float, seed: Optional[Tensor], needs: List[bool],
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
        grad, x, w_base, bias_sizes, *conv_args, [need_x, need_w, need_b]
    )
    gA = gB = None
    if need_A or need_B or (need_x and not merged):
        # g_u = s·convT_B^T(g): the strided correlation of g with B, r output channels.
        if grad.device.type == "cpu" and u.shape[0] * u.shape[-1] >= 256:
            g_u, gb3 = _convt_lora_grads(_cast(grad, ldt), u, b3, stride, padding, dilation, groups, need_B)
        else:
            g_u, gb3, _ = torch.ops.aten.convolution_backward(
                _cast(grad, ldt), u, b3, None, *conv_args, [True, need_B, False]
            )
        g_u = g_u * scaling
        if need_B:
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


@_convt_bwd.register_fake
def _(grad, x, u, weight, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p,
      seed, needs):
    return _grad_fakes(x, weight, (weight.shape[1] * groups,), lora_A, lora_B, needs)


_register_autograd(_convt_fwd, _convt_bwd)
_ConvtFunction = _eager_function("convt", _convt_fwd_impl, _convt_bwd_impl)


def lora_conv_transpose1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation,
                          groups, dropout_p, seed):
    args = (x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p,
            seed)
    if torch.compiler.is_compiling():
        return _convt_fwd(*args)[0]
    return _ConvtFunction.apply(*args)
