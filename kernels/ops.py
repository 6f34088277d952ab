"""Launchers of the fused LoRA kernels (:mod:`.lora_kernels`): the op bodies of the ``triton`` backend.

:mod:`rvclora.ops.backends.triton` registers each body as a ``torch.library.triton_op`` (``wrap_triton`` inside,
so ``torch.compile(fullgraph=True)`` traces into the kernels) named ``rvclora::triton_lora_<op>_{fwd,bwd}``,
with :func:`rvclora.ops.autograd.fused_op`'s autograd and eager fast path::

    lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (y, u)
    lora_linear_bwd(grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_p, seed, needs) -> grads
    lora_conv1d_fwd(x, weight, bias, lora_A, lora_B, scaling, stride, padding[2], dilation, groups,
                    padding_mode, dropout_p, seed) -> (y, u)
    lora_conv1d_bwd(grad_y, x, u, weight, lora_A, lora_B, <the forward's scalars>, seed, needs) -> grads
    dropout_mask_fill(seed, like, dropout_p) -> mask      (rvclora::triton_dropout_mask)

``u = D(x)·Aᵀ`` (fp32, ``(rows, r)``) is the only intermediate kept for backward besides ``x``
and the weights; the dropout mask is regenerated from ``seed`` (a 0-dim int64 CPU tensor, handed to
the kernels as a scalar argument). Every body enters its tensors' CUDA device before launching.
Gradients not in ``needs`` come back as empty tensors and are not computed.
"""

# torch.library evaluates the op signatures below at runtime to infer their schemas; they keep the
# typing forms (Optional, List, Tuple) its schema inference has been tested with here, should the
# pyupgrade rules (UP006, UP035, UP045) be enabled.
# ruff: noqa: UP006, UP035, UP045
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from rvclora.ops.geometry import conv1d_out_len

from .lora_kernels import (
    INTERPRET,
    PAD_MODES,
    dropout_mask_kernel,
    lora_forward_kernel,
    lora_grad_input_kernel,
    lora_grad_u_kernel,
    lora_weight_grad_kernel,
)

__all__ = [
    "MAX_RANK_PER_GROUP",
    "dropout_mask_fill",
    "lora_conv1d_bwd",
    "lora_conv1d_fwd",
    "lora_linear_bwd",
    "lora_linear_fwd",
]

#: Largest rank per group the kernels take: the LoRA accumulator ``(BLOCK_M, BLOCK_R)`` lives in
#: registers beside the base tile; 32 keeps every config spill-free (rvclora/checks/triton_compile.py).
MAX_RANK_PER_GROUP = 32


def _block_r(r_g: int) -> int:
    # tl.dot needs every dimension ≥ 16.
    return max(16, triton.next_power_of_2(r_g))


def _m_key(m: int) -> int:
    return triton.next_power_of_2(max(m, 1))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split_count(rows: int, out_tiles: int, device: torch.device) -> int:
    """How many row splits the weight-gradient reduction uses (a power of two).

    Enough programs to fill the GPU about twice when the gradient itself has few tiles (a
    rank-8 ``grad_B`` has one tile column), but at least 256 rows per split. The interpreter
    uses up to 2 splits, so the tests exercise the split-and-sum path.
    """
    if INTERPRET or device.type != "cuda":
        target = 2
    else:
        target = triton.cdiv(2 * _sm_count(device.index or 0), max(out_tiles, 1))
    split = min(target, 64, max(rows // 256, 1)) if not INTERPRET else min(target, max(rows // 32, 1))
    return 1 << (max(split, 1).bit_length() - 1)


def _is_traced(t: Tensor) -> bool:
    """Whether ``t`` is a fake tensor of a ``torch.compile`` / ``make_fx`` trace (no data, no device)."""
    return is_fake(t) or torch.compiler.is_compiling()


def _seed_arg(seed: Optional[Tensor], dropout_p: float, like: Tensor) -> Tuple[object, bool]:
    """The kernels' ``(seed, SEED_IS_PTR)`` arguments.

    Eager calls pass the seed's value as a scalar kernel argument: ``seed`` is a CPU tensor, so
    reading it costs no device copy and no synchronisation, and a launch stays legal during
    CUDA-graph capture. Inside a trace the value exists only when the graph runs, so the seed is
    moved to the kernels' device there and read through a pointer (``SEED_IS_PTR``).
    """
    if dropout_p == 0.0 or seed is None:
        return 0, False
    if _is_traced(seed):
        return seed.to(device=like.device, dtype=torch.int64).reshape(1), True
    return int(seed), False


def _device_guard(t: Tensor):
    """Make ``t``'s CUDA device the current one for the launches of an op.

    Triton launches on the current device and its current stream; without this guard, tensors
    on ``cuda:1`` while ``cuda:0`` is current would be handed to a kernel running on the wrong
    GPU. A traced call needs none: the code inductor generates guards its own launches.
    """
    if t.device.type != "cuda" or _is_traced(t):
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def base_precision(x: Tensor, is_linear: bool) -> str:
    """``input_precision`` of the base-sized fp32 dots: ``"tf32"`` where PyTorch would run the base op in TF32.

    nn.Conv1d in fp32 runs through cuDNN, which uses TF32 when ``torch.backends.cudnn.allow_tf32``
    (the default); nn.Linear through cuBLAS, which uses it when the float32 matmul precision is
    not ``"highest"`` (the default is "highest"). The LoRA dots never use TF32.
    """
    if x.dtype != torch.float32 or x.device.type != "cuda":
        return "ieee"
    if is_linear:
        allowed = torch.get_float32_matmul_precision() != "highest"
    else:
        allowed = bool(torch.backends.cudnn.allow_tf32)
    return "tf32" if allowed else "ieee"


def _empty() -> Tensor:
    return torch.empty(0)


@dataclass(frozen=True)
class _Geometry:
    """The implicit-GEMM view of a call: ``x`` as ``(N, C, T)`` with strides, and the conv options.

    Built once per call by :meth:`of`; flattened into scalars only at the kernel launch.
    """

    is_linear: bool
    x: Tensor
    N: int
    C: int
    T: int
    x_strides: Tuple[int, int, int]
    ks: int
    T_out: int
    O: int  # noqa: E741 (output channels: the name the kernels and docs use)
    R: int
    G: int
    C_g: int
    O_g: int
    R_g: int
    K: int
    M: int
    stride: int
    dilation: int
    pad_left: int
    pad_right: int
    pad_mode: int
    w2: Tensor

    @classmethod
    def of(
        cls,
        x: Tensor,
        weight: Tensor,
        lora_A: Tensor,
        *,
        is_linear: bool,
        stride: int = 1,
        pad_left: int = 0,
        pad_right: int = 0,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> _Geometry:
        if is_linear:
            x = x.reshape(-1, x.shape[-1])
            n, c, t = x.shape[0], x.shape[1], 1
            x_strides = (x.stride(0), x.stride(1), 0)
            ks, t_out = 1, 1
        else:
            n, c, t = x.shape
            x_strides = tuple(x.stride())
            ks = weight.shape[-1]
            t_out = conv1d_out_len(t, ks, stride, pad_left + pad_right, dilation)
        o, r = weight.shape[0], lora_A.shape[0]
        return cls(
            is_linear=is_linear,
            x=x,
            N=n,
            C=c,
            T=t,
            x_strides=x_strides,
            ks=ks,
            T_out=t_out,
            O=o,
            R=r,
            G=groups,
            C_g=c // groups,
            O_g=o // groups,
            R_g=r // groups,
            K=c // groups * ks,
            M=n * t_out,
            stride=stride,
            dilation=dilation,
            pad_left=pad_left,
            pad_right=pad_right,
            pad_mode=PAD_MODES[padding_mode],
            w2=weight.reshape(o, -1),
        )

    def out_strides(self, t: Tensor) -> Tuple[int, int, int]:
        """``(n, channel, t)`` strides of an ``(N·T_out, ch)`` (linear) or ``(N, ch, T_out)`` tensor."""
        if self.is_linear:
            return t.stride(0), t.stride(1), 0
        return t.stride()

    def rows_view_strides(self, t: Tensor) -> Tuple[int, int, int]:
        """``(n, channel, t)`` strides of a row-major ``(N·T_out, ch)`` tensor such as ``u``."""
        return self.T_out * t.stride(0), t.stride(1), t.stride(0)


# --------------------------------------------------------------------------- launchers


def _forward(
    geo: _Geometry,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    y: Tensor,
) -> Tensor:
    """Fill ``y`` (``(M, O)`` or ``(N, O, T_out)``) and return ``u: (M, r)`` fp32."""
    x = geo.x
    u = torch.empty((geo.M, geo.R), device=x.device, dtype=torch.float32)
    if geo.M == 0:
        return u

    def grid(meta):
        return (triton.cdiv(geo.M, meta["BLOCK_M"]), triton.cdiv(geo.O_g, meta["BLOCK_N"]), geo.G)

    seed_v, seed_is_ptr = _seed_arg(seed, dropout_p, x)
    wrap_triton(lora_forward_kernel)[grid](
        x,
        geo.w2,
        bias if bias is not None else x,
        lora_A,
        lora_B,
        y,
        u,
        seed_v,
        geo.M,
        _m_key(geo.M),
        geo.O_g,
        geo.K,
        geo.R_g,
        geo.T_out,
        geo.C,
        geo.C_g,
        geo.T,
        *geo.x_strides,
        *geo.w2.stride(),
        *lora_A.stride(),
        *lora_B.stride(),
        *geo.out_strides(y),
        *u.stride(),
        geo.stride,
        geo.dilation,
        geo.pad_left,
        scaling,
        dropout_p,
        KS=geo.ks,
        PAD_MODE=geo.pad_mode,
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        IS_LINEAR=geo.is_linear,
        BLOCK_R=_block_r(geo.R_g),
        SEED_IS_PTR=seed_is_ptr,
        BASE_PRECISION=base_precision(x, geo.is_linear),
    )
    return u


def _grad_u(geo: _Geometry, g: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    gu = torch.empty((geo.M, geo.R), device=g.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(geo.M, meta["BLOCK_M"]), geo.G)

    wrap_triton(lora_grad_u_kernel)[grid](
        g,
        lora_B,
        gu,
        geo.M,
        _m_key(geo.M),
        geo.O_g,
        geo.R_g,
        geo.T_out,
        *geo.out_strides(g),
        *lora_B.stride(),
        *gu.stride(),
        scaling,
        IS_LINEAR=geo.is_linear,
        BLOCK_R=_block_r(geo.R_g),
    )
    return gu


def _grad_input_rows(
    geo: _Geometry,
    g: Tensor,
    gu: Tensor,
    lora_A: Tensor,
    seed_t,
    dropout_p: float,
    tp0: int,
    t_rows: int,
    dtype: torch.dtype,
) -> Tensor:
    """Gradient at the padded-input positions ``[tp0, tp0 + t_rows)``: ``(N, C, t_rows)`` (``(M, C)`` linear)."""
    if geo.is_linear:
        dx = torch.empty((geo.N, geo.C), device=g.device, dtype=dtype)
        d_strides = (dx.stride(0), dx.stride(1), 0)
    else:
        dx = torch.empty((geo.N, geo.C, t_rows), device=g.device, dtype=dtype)
        d_strides = dx.stride()
    rows = geo.N * t_rows
    if rows == 0:
        return dx

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(geo.C_g, meta["BLOCK_N"]), geo.G)

    wrap_triton(lora_grad_input_kernel)[grid](
        g,
        geo.w2,
        gu,
        lora_A,
        dx,
        seed_t[0],
        rows,
        _m_key(rows),
        geo.C_g,
        geo.O_g,
        geo.R_g,
        t_rows,
        tp0,
        geo.T_out,
        geo.C,
        geo.T,
        *geo.out_strides(g),
        *geo.w2.stride(),
        *gu.stride(),
        *lora_A.stride(),
        *d_strides,
        geo.stride,
        geo.dilation,
        geo.pad_left,
        dropout_p,
        KS=geo.ks,
        PAD_MODE=geo.pad_mode,
        HAS_DROPOUT=dropout_p > 0.0,
        IS_LINEAR=geo.is_linear,
        SEED_IS_PTR=seed_t[1],
        BASE_PRECISION=base_precision(g, geo.is_linear),
    )
    return dx


def _source_index(t: Tensor, T: int, padding_mode: str) -> Tensor:
    """The PyTorch twin of ``_source_position`` for the (non-zeros) padded positions ``t``."""
    if padding_mode == "reflect":
        t = t.abs()
        return torch.where(t >= T, 2 * T - 2 - t, t)
    if padding_mode == "replicate":
        return t.clamp(0, T - 1)
    return torch.where(t < 0, t + T, torch.where(t >= T, t - T, t))


def _grad_input(
    geo: _Geometry,
    g: Tensor,
    gu: Tensor,
    lora_A: Tensor,
    seed_t,
    dropout_p: float,
    padding_mode: str,
    dtype: torch.dtype,
) -> Tensor:
    """``grad_x``. Non-zeros padding modes also compute the gradient at the padded positions (a strip of
    ``pad_left + pad_right`` columns) and fold it onto the source elements."""
    fold = not geo.is_linear and padding_mode != "zeros" and (geo.pad_left > 0 or geo.pad_right > 0)
    t_rows = 1 if geo.is_linear else geo.T
    dx = _grad_input_rows(geo, g, gu, lora_A, seed_t, dropout_p, geo.pad_left, t_rows, torch.float32 if fold else dtype)
    if not fold:
        return dx
    for tp0, width in ((0, geo.pad_left), (geo.pad_left + geo.T, geo.pad_right)):
        if width > 0:
            strip = _grad_input_rows(geo, g, gu, lora_A, seed_t, dropout_p, tp0, width, torch.float32)
            t = torch.arange(tp0, tp0 + width, device=g.device) - geo.pad_left
            dx.index_add_(2, _source_index(t, geo.T, padding_mode), strip)
    return dx.to(dtype)


def _weight_grad(
    geo: _Geometry,
    p: Tensor,
    p_strides,
    i_g: int,
    q: Tensor,
    *,
    q_is_x: bool,
    alpha: float,
    seed_t,
    dropout_p: float,
    dot_from_q: bool,
    out_rows: int,
    j: int,
    precision: str = "ieee",
) -> Tensor:
    """``Σ_rows P[row, i]·Q[row, j]`` per group (fp32, ``(G·I_g, J)``); ``Q`` is ``x``'s patches or ``u``."""
    split = _split_count(geo.M, triton.cdiv(i_g, 64) * triton.cdiv(j, 64) * geo.G, p.device)
    out = torch.empty((split, out_rows, j), device=p.device, dtype=torch.float32)
    if geo.M == 0:
        return out.zero_().sum(0)
    if q_is_x:
        q_strides, C, C_g, T, ks = geo.x_strides, geo.C, geo.C_g, geo.T, geo.ks
        stride, dilation, pad_left, pad_mode = geo.stride, geo.dilation, geo.pad_left, geo.pad_mode
    else:
        q_strides = (q.stride(0), q.stride(1), 0) if geo.is_linear else geo.rows_view_strides(q)
        C, C_g, T, ks = geo.R, geo.R_g, geo.T_out, 1
        stride, dilation, pad_left, pad_mode = 1, 1, 0, 0

    def grid(meta):
        return (triton.cdiv(i_g, meta["BLOCK_M"]), triton.cdiv(j, meta["BLOCK_N"]), geo.G * split)

    wrap_triton(lora_weight_grad_kernel)[grid](
        p,
        q,
        out,
        seed_t[0],
        geo.M,
        _m_key(geo.M),
        i_g,
        j,
        geo.T_out,
        C,
        C_g,
        T,
        *p_strides,
        *q_strides,
        *out.stride(),
        stride,
        dilation,
        pad_left,
        alpha,
        dropout_p,
        KS=ks,
        PAD_MODE=pad_mode,
        HAS_DROPOUT=dropout_p > 0.0,
        IS_LINEAR=geo.is_linear,
        DOT_FROM_Q=dot_from_q,
        SPLIT=split,
        SEED_IS_PTR=seed_t[1],
        BASE_PRECISION=precision,
    )
    return out.sum(0)


def _backward(
    geo: _Geometry,
    g: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    u: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    padding_mode: str,
    needs: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_b, need_A, need_B = needs
    seed_t = _seed_arg(seed, dropout_p, g)
    g_strides = geo.out_strides(g)
    grad_x, grad_w, grad_bias, grad_A, grad_B = (_empty() for _ in range(5))
    gu = _grad_u(geo, g, lora_B, scaling) if (need_x or need_A) and geo.M > 0 else None
    if gu is None:
        gu = torch.zeros((geo.M, geo.R), device=g.device, dtype=torch.float32)
    if need_x:
        grad_x = _grad_input(geo, g, gu, lora_A, seed_t, dropout_p, padding_mode, geo.x.dtype)
    if need_w:
        grad_w = (
            _weight_grad(
                geo,
                g,
                g_strides,
                geo.O_g,
                geo.x,
                q_is_x=True,
                alpha=1.0,
                seed_t=seed_t,
                dropout_p=0.0,
                dot_from_q=True,
                out_rows=geo.O,
                j=geo.K,
                precision=base_precision(g, geo.is_linear),
            )
            .reshape(weight.shape)
            .to(weight.dtype)
        )
    if need_A:
        gu_strides = (gu.stride(0), gu.stride(1), 0) if geo.is_linear else geo.rows_view_strides(gu)
        grad_A = _weight_grad(
            geo,
            gu,
            gu_strides,
            geo.R_g,
            geo.x,
            q_is_x=True,
            alpha=1.0,
            seed_t=seed_t,
            dropout_p=dropout_p,
            dot_from_q=True,
            out_rows=geo.R,
            j=geo.K,
        ).to(lora_A.dtype)
    if need_B:
        grad_B = _weight_grad(
            geo,
            g,
            g_strides,
            geo.O_g,
            u,
            q_is_x=False,
            alpha=scaling,
            seed_t=seed_t,
            dropout_p=0.0,
            dot_from_q=False,
            out_rows=geo.O,
            j=geo.R_g,
        ).to(lora_B.dtype)
    if need_b:
        # accumulated in float32, returned in the activation dtype (the bias's under autocast)
        grad_bias = g.sum(0 if geo.is_linear else (0, 2), dtype=torch.float32).to(g.dtype)
    return grad_x, grad_w, grad_bias, grad_A, grad_B


# --------------------------------------------------------------------------- op bodies
# (registered as triton ops by rvclora.ops.backends.triton; their annotations give the schemas)


def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """``y = x·Wᵀ + b + s·(D(x)·Aᵀ)·Bᵀ`` and ``u = D(x)·Aᵀ`` (fp32, ``(rows, r)``)."""
    geo = _Geometry.of(x, weight, lora_A, is_linear=True)
    y = torch.empty((geo.M, geo.O), device=x.device, dtype=x.dtype)
    with _device_guard(x):
        u = _forward(geo, bias, lora_A, lora_B, scaling, dropout_p, seed, y)
    return y.reshape(*x.shape[:-1], geo.O), u


def lora_linear_bwd(
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
    """``(grad_x, grad_W, grad_b, grad_A, grad_B)``; those not in ``needs`` are empty."""
    geo = _Geometry.of(x, weight, lora_A, is_linear=True)
    g = grad_y.reshape(-1, geo.O)
    with _device_guard(x):
        grads = _backward(geo, g, weight, lora_A, lora_B, u, scaling, dropout_p, seed, "zeros", needs)
    grad_x = grads[0].reshape(x.shape) if needs[0] else grads[0]
    return (grad_x,) + tuple(grads[1:])


def lora_conv1d_fwd(
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
    """``y = conv(x, W) + b + s·conv1x1(conv(D(x), A), B)`` and ``u`` (fp32, ``(N·T_out, r)``)."""
    geo = _Geometry.of(
        x,
        weight,
        lora_A,
        is_linear=False,
        stride=stride,
        pad_left=padding[0],
        pad_right=padding[1],
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    y = torch.empty((geo.N, geo.O, geo.T_out), device=x.device, dtype=x.dtype)
    with _device_guard(x):
        u = _forward(geo, bias, lora_A, lora_B, scaling, dropout_p, seed, y)
    return y, u


def lora_conv1d_bwd(
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
    """``(grad_x, grad_W, grad_b, grad_A, grad_B)``; those not in ``needs`` are empty."""
    geo = _Geometry.of(
        x,
        weight,
        lora_A,
        is_linear=False,
        stride=stride,
        pad_left=padding[0],
        pad_right=padding[1],
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
    )
    with _device_guard(x):
        return _backward(geo, grad_y, weight, lora_A, lora_B, u, scaling, dropout_p, seed, padding_mode, needs)


# --------------------------------------------------------------------------- dropout mask


def dropout_mask_fill(seed: Tensor, like: Tensor, dropout_p: float) -> Tensor:
    """The scaled mask (``0`` or ``1/(1−p)``) the kernels apply to an ``x`` shaped like ``like``."""
    out = torch.empty(like.shape, device=like.device, dtype=like.dtype)
    numel = out.numel()
    if numel == 0:
        return out
    block = 1024

    def grid(meta):
        return (triton.cdiv(numel, block),)

    seed_v, seed_is_ptr = _seed_arg(seed, dropout_p, out)
    with _device_guard(out):
        wrap_triton(dropout_mask_kernel)[grid](out, seed_v, numel, dropout_p, BLOCK=block, SEED_IS_PTR=seed_is_ptr)
    return out
