"""Fused LoRA kernels (Triton) for Linear and Conv1d, as implicit GEMMs (docs/maths.md).

One set of kernels serves both layer kinds. A Linear ``x: (M, in)`` is the Conv1d case
``N = M, C = in, T = T_out = 1, k = 1`` (``IS_LINEAR`` compiles the index arithmetic away).
Per group ``g`` of a Conv1d with ``C_g = C/g`` input channels, ``O_g = O/g`` output channels and
rank ``R_g = r/g`` per group, the GEMM views are

* rows ``m = n·T_out + t_out`` (``M = N·T_out``),
* the reduction index ``kk = c·k + tap`` over ``K = C_g·k`` taps (the layout of ``W.reshape(O, -1)``
  and of ``lora_A: (r, C_g·k)``),
* the patch element ``x[n, g·C_g + c, src(t_out·stride + tap·dilation − pad_left)]`` where ``src``
  maps a position of the padded signal to the unpadded one (zeros / reflect / replicate / circular).

Dropout ``D`` is drawn from Philox: element ``e`` of the *unpadded* ``x`` (its row-major index in
``x``'s logical shape) is kept with probability ``1 − p`` when ``tl.rand(seed, e) ≥ p`` and scaled
by ``1/(1−p)``. The mask is regenerated wherever it is needed, never stored.

Precision: dot products run in the activation dtype with fp32 accumulation. The LoRA dots in
fp32 always use ``input_precision="ieee"`` (exact fp32 maths): TF32 rounds operands to 10
mantissa bits, which would swamp a small ``ΔW``. The base dots (``x·Wᵀ``, its input gradient
and ``grad_W``) follow the precision PyTorch would use for the base layer
(``BASE_PRECISION``): TF32 where PyTorch's flags allow it for that op
(``torch.backends.cudnn.allow_tf32`` for Conv1d, on by default; the float32 matmul precision
for Linear, "highest" (no TF32) by default), IEEE fp32 otherwise. LoRA factors stored in fp32
while activations are half are rounded to the activation dtype per tile (as autocast would).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRET",
    "PAD_MODES",
    "dropout_mask_kernel",
    "lora_forward_kernel",
    "lora_grad_input_kernel",
    "lora_grad_u_kernel",
    "lora_weight_grad_kernel",
]

#: ``padding_mode`` → the ``PAD_MODE`` constexpr of the kernels.
PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(half, fp32, interpreter):
    """Autotune configs ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)``.

    Half-precision dots run on tensor cores; fp32 dots (IEEE, or TF32 for the base dots where
    PyTorch allows it) hold fp32 operands in registers, so they get their own smaller tiles, told
    apart by ``BLOCK_K == 16`` (see :func:`_prune_by_dtype`). The interpreter runs one config:
    benchmarking there measures nothing.
    """
    shapes = [interpreter] if INTERPRET else half + fp32
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune_by_dtype(configs, named_args, **kwargs):
    """Keep the fp32 configs (``BLOCK_K == 16``) for fp32 dots, the others for fp16/bf16 dots."""
    if INTERPRET:
        return configs
    if "DOT_FROM_Q" in kwargs or "DOT_FROM_Q" in named_args:
        dot_from_q = kwargs.get("DOT_FROM_Q", named_args.get("DOT_FROM_Q"))
        dot_arg = "q_ptr" if dot_from_q else "p_ptr"
    else:
        dot_arg = "x_ptr" if "x_ptr" in named_args else "g_ptr"
    dots_fp32 = named_args[dot_arg].dtype == torch.float32
    return [c for c in configs if (c.kwargs["BLOCK_K"] == 16) == dots_fp32]


# Tile shapes for which every config compiles without spills and within shared memory on sm_80
# and sm_90 under each Triton release the supported torch range brings (3.6, 3.8, 3.9:
# rvclora/checks/triton_compile.py); the last tuple is the interpreter's. fp32 configs use 4 warps: with
# 8, some releases cap the registers per thread on sm_90 (128 or 80) and spill.
FORWARD_CONFIGS = _configs(
    [(64, 128, 32, 8, 2), (64, 64, 32, 8, 2)],
    [(32, 64, 16, 4, 1), (32, 32, 16, 4, 1)],
    (32, 32, 32, 4, 1),
)
# Two reductions and the dropout epilogue: smaller tiles per warp than the forward. (32x64x32 with
# two stages spills 8 B on sm_90 under Triton 3.8; one stage is clean.)
GRAD_INPUT_CONFIGS = _configs(
    [(64, 64, 32, 8, 2), (32, 64, 32, 4, 1)],
    [(64, 64, 16, 8, 1), (32, 64, 16, 4, 1)],
    (32, 32, 32, 4, 1),
)
# grad_u reduces over O_g in BLOCK_K steps into a (BLOCK_M, BLOCK_R) accumulator; BLOCK_N is unused.
GRAD_U_CONFIGS = _configs(
    [(64, 1, 64, 4, 2)],
    [(64, 1, 16, 4, 1)],
    (32, 1, 32, 4, 1),
)
# (64x128x64 spills hundreds of bytes under Triton 3.6: BLOCK_K 32 halves the operand tiles.)
WEIGHT_GRAD_CONFIGS = _configs(
    [(64, 128, 32, 8, 2), (128, 64, 32, 8, 2)],
    [(64, 32, 16, 4, 1), (32, 64, 16, 4, 1)],
    (32, 32, 32, 4, 1),
)
_PRUNE = {"early_config_prune": _prune_by_dtype}

# Integer arguments Triton must not specialise on: the ones that follow the input's length (rows,
# time steps), and the dropout seed. Triton otherwise compiles a variant per "== 1" and "% 16 == 0"
# pattern of its int arguments, so variable-length audio would recompile the kernels call after
# call; none of these values changes the generated code's structure (masks handle every size).
# Channel counts, strides of contiguous tensors and the conv options stay specialised: they are
# fixed per layer, and a unit stride lets Triton vectorise the loads. (rvclora/checks/triton_compile.py
# compiles exactly this form: sizes as plain i32, unit strides as constants.)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _seed_value(seed, HAS_DROPOUT: tl.constexpr, SEED_IS_PTR: tl.constexpr):
    """The Philox seed as int64: a scalar argument (eager launches), or read through a pointer.

    The pointer form exists for launches recorded inside a ``torch.compile`` trace, where the
    seed's value is not known on the host until the graph runs; eager launches pass the value
    itself, so a dropout call costs no host-to-device copy and stays legal under CUDA-graph
    capture. ``int32`` and ``int64`` scalars give the same int64 value, hence the same mask.
    """
    if HAS_DROPOUT:
        if SEED_IS_PTR:
            s = tl.load(seed).to(tl.int64)
        else:
            s = seed.to(tl.int64)
    else:
        s = 0
    return s


@triton.jit
def _keep_scale(seed, offsets, p_drop):
    """Inverted-dropout factor ``1/(1−p)`` where ``rand(seed, offset) ≥ p``, else ``0`` (fp32)."""
    r = tl.rand(seed, offsets)
    return tl.where(r >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _source_position(t, T, PAD_MODE: tl.constexpr):
    """Padded-signal position ``t`` (relative to the unpadded start) → (source index, valid).

    Zeros padding reads nothing outside ``[0, T)``; the other modes read an element of ``x``
    (PyTorch limits reflect padding to ``< T`` and circular padding to ``≤ T``, so one fold
    suffices).
    """
    if PAD_MODE == 1:  # reflect
        src = tl.where(t < 0, -t, t)
        src = tl.where(src >= T, 2 * T - 2 - src, src)
    elif PAD_MODE == 2:  # replicate
        src = tl.minimum(tl.maximum(t, 0), T - 1)
    elif PAD_MODE == 3:  # circular
        src = tl.where(t < 0, t + T, tl.where(t >= T, t - T, t))
    else:
        src = t
    return src, (src >= 0) & (src < T)


@triton.jit
def _load_patch(
    x_ptr,
    seed,
    rows,
    cols,
    g,
    M,
    K,
    T_out,
    C,
    C_g,
    T,
    s_n,
    s_c,
    s_t,
    stride,
    dil,
    pad_l,
    p_drop,
    KS: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_LINEAR: tl.constexpr,
):
    """The implicit-GEMM tile ``X[rows, cols]`` of ``x: (N, C, T)`` and, if ``HAS_DROPOUT``, its mask.

    Returns ``(x_tile, scale)``; ``scale`` is the fp32 dropout factor of each element (``1.0``
    without dropout), indexed by the element's position in the unpadded ``x``.
    """
    if IS_LINEAR:
        n = rows.to(tl.int64)[:, None]
        ch = (g * C_g + cols).to(tl.int64)[None, :]
        src = tl.zeros_like(n)
        valid = (rows < M)[:, None] & (cols < K)[None, :]
    else:
        n = (rows // T_out).to(tl.int64)[:, None]
        t_out = (rows % T_out)[:, None]
        c = cols // KS
        tap = (cols % KS)[None, :]
        ch = (g * C_g + c).to(tl.int64)[None, :]
        src, in_signal = _source_position(t_out * stride + tap * dil - pad_l, T, PAD_MODE)
        valid = (rows < M)[:, None] & (cols < K)[None, :] & in_signal
        src = src.to(tl.int64)
    x = tl.load(x_ptr + n * s_n + ch * s_c + src * s_t, mask=valid, other=0.0)
    if HAS_DROPOUT:
        scale = _keep_scale(seed, (n * C + ch) * T + src, p_drop)
    else:
        scale = 1.0
    return x, scale


# --------------------------------------------------------------------------- forward


@triton.autotune(configs=FORWARD_CONFIGS, key=["M_KEY", "O_g", "K", "R_g", "KS", "IS_LINEAR"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["seed", "M", "T_out", "T"])
def lora_forward_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    u_ptr,
    seed,
    M,
    M_KEY,
    O_g,
    K,
    R_g,
    T_out,
    C,
    C_g,
    T,
    s_xn,
    s_xc,
    s_xt,
    s_wo,
    s_wk,
    s_ar,
    s_ak,
    s_bo,
    s_br,
    s_yn,
    s_yo,
    s_yt,
    s_um,
    s_ur,
    stride,
    dil,
    pad_l,
    scaling,
    p_drop,
    KS: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_LINEAR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y = X·Wᵀ + b + s·(D(X)·Aᵀ)·Bᵀ`` per group, and ``u = D(X)·Aᵀ`` (fp32) for backward.

    ``X: (M, K)`` the implicit patch matrix of ``x``, ``W: (O, K)``, ``A: (r, K)``, ``B: (O, R_g)``;
    grid ``(cdiv(M, BLOCK_M), cdiv(O_g, BLOCK_N), groups)``. Each ``x`` tile is loaded once and
    feeds both accumulators; the programs of the first column of output tiles store ``u``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    DT = x_ptr.dtype.element_ty
    seed = _seed_value(seed, HAS_DROPOUT, SEED_IS_PTR)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    w_rows = (g * O_g + outs).to(tl.int64)
    a_rows = g * R_g + ranks

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x, scale = _load_patch(
            x_ptr,
            seed,
            rows,
            ks,
            g,
            M,
            K,
            T_out,
            C,
            C_g,
            T,
            s_xn,
            s_xc,
            s_xt,
            stride,
            dil,
            pad_l,
            p_drop,
            KS,
            PAD_MODE,
            HAS_DROPOUT,
            IS_LINEAR,
        )
        wt = tl.load(
            w_ptr + w_rows[None, :] * s_wo + ks[:, None] * s_wk,
            mask=(outs < O_g)[None, :] & (ks < K)[:, None],
            other=0.0,
        )
        at = tl.load(
            a_ptr + a_rows[None, :] * s_ar + ks[:, None] * s_ak,
            mask=(ranks < R_g)[None, :] & (ks < K)[:, None],
            other=0.0,
        )
        acc = tl.dot(x, wt.to(DT), acc=acc, input_precision=BASE_PRECISION)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * scale).to(DT)
        u = tl.dot(x, at.to(DT), acc=u, input_precision="ieee")

    bt = tl.load(
        b_ptr + w_rows[None, :] * s_bo + ranks[:, None] * s_br,
        mask=(outs < O_g)[None, :] & (ranks < R_g)[:, None],
        other=0.0,
    )
    acc += scaling * tl.dot(u.to(DT), bt.to(DT), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + w_rows, mask=outs < O_g, other=0.0).to(tl.float32)[None, :]

    row_ok = rows < M
    if IS_LINEAR:
        y_off = rows.to(tl.int64)[:, None] * s_yn + w_rows[None, :] * s_yo
    else:
        n = (rows // T_out).to(tl.int64)
        y_off = (n * s_yn + (rows % T_out) * s_yt)[:, None] + w_rows[None, :] * s_yo
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & (outs < O_g)[None, :])
    if pid_n == 0:
        tl.store(
            u_ptr + rows.to(tl.int64)[:, None] * s_um + a_rows[None, :] * s_ur,
            u,
            mask=row_ok[:, None] & (ranks < R_g)[None, :],
        )


# --------------------------------------------------------------------------- backward


@triton.autotune(configs=GRAD_U_CONFIGS, key=["M_KEY", "O_g", "R_g", "IS_LINEAR"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["M", "T_out"])
def lora_grad_u_kernel(
    g_ptr,
    b_ptr,
    gu_ptr,
    M,
    M_KEY,
    O_g,
    R_g,
    T_out,
    s_gn,
    s_go,
    s_gt,
    s_bo,
    s_br,
    s_um,
    s_ur,
    scaling,
    IS_LINEAR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``g_u = s·G·B`` per group (fp32, ``(M, r)``): the gradient of the LoRA hidden ``u``.

    ``G: (M, O_g)`` the rows of ``grad_y``; grid ``(cdiv(M, BLOCK_M), groups)``; the reduction
    over output channels runs in ``BLOCK_K`` steps (``BLOCK_N`` is unused).
    """
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    DT = g_ptr.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    if IS_LINEAR:
        g_row = rows.to(tl.int64) * s_gn
    else:
        g_row = (rows // T_out).to(tl.int64) * s_gn + (rows % T_out) * s_gt
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, O_g, BLOCK_K):
        outs = o0 + tl.arange(0, BLOCK_K)
        ch = (g * O_g + outs).to(tl.int64)
        gt = tl.load(
            g_ptr + g_row[:, None] + ch[None, :] * s_go, mask=(rows < M)[:, None] & (outs < O_g)[None, :], other=0.0
        )
        bt = tl.load(
            b_ptr + ch[:, None] * s_bo + ranks[None, :] * s_br,
            mask=(outs < O_g)[:, None] & (ranks < R_g)[None, :],
            other=0.0,
        )
        acc = tl.dot(gt, bt.to(DT), acc=acc, input_precision="ieee")
    tl.store(
        gu_ptr + rows.to(tl.int64)[:, None] * s_um + (g * R_g + ranks)[None, :] * s_ur,
        acc * scaling,
        mask=(rows < M)[:, None] & (ranks < R_g)[None, :],
    )


@triton.autotune(
    configs=GRAD_INPUT_CONFIGS, key=["M_KEY", "C_g", "O_g", "R_g", "KS", "IS_LINEAR"], prune_configs_by=_PRUNE
)
@triton.jit(do_not_specialize=["seed", "M", "T_rows", "tp0", "T_out", "T"])
def lora_grad_input_kernel(
    g_ptr,
    w_ptr,
    gu_ptr,
    a_ptr,
    dx_ptr,
    seed,
    M,
    M_KEY,
    C_g,
    O_g,
    R_g,
    T_rows,
    tp0,
    T_out,
    C,
    T,
    s_gn,
    s_go,
    s_gt,
    s_wo,
    s_wk,
    s_um,
    s_ur,
    s_ar,
    s_ak,
    s_dn,
    s_dc,
    s_dt,
    stride,
    dil,
    pad_l,
    p_drop,
    KS: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_LINEAR: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``grad_x = Gᵀ-conv(W) + D'(g_u ᵀ-conv A)``: the transposed implicit GEMM.

    Rows are positions ``(n, tp)`` of the padded input, ``tp ∈ [tp0, tp0 + T_rows)`` (``M = N·T_rows``);
    columns are the group's input channels ``c``. Two reductions over ``(o, tap)`` and ``(j, tap)``:
    ``Σ G[n, o, t_out]·W[o, c·k+tap] + D(Σ g_u[n·T_out+t_out, j]·A[j, c·k+tap])`` with
    ``t_out·stride = tp − tap·dilation``. The dropout factor ``D`` is that of the source element of
    ``tp`` (so folding the padded positions back onto ``x`` stays exact). Grid
    ``(cdiv(M, BLOCK_M), cdiv(C_g, BLOCK_N), groups)``; writes ``dx[n, g·C_g + c, tp − tp0]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    DT = g_ptr.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    c_ok = cs < C_g
    if IS_LINEAR:
        n = rows.to(tl.int64)
        tp = tl.zeros_like(rows)
    else:
        n = (rows // T_rows).to(tl.int64)
        tp = tp0 + rows % T_rows

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, O_g * KS, BLOCK_K):
        qs = q0 + tl.arange(0, BLOCK_K)
        o = qs // KS
        tap = qs % KS
        if IS_LINEAR:
            t_out = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
            hit = row_ok[:, None] & (qs < O_g)[None, :]
        else:
            num = tp[:, None] - (tap * dil)[None, :]
            t_out = tl.maximum(num, 0) // stride
            hit = row_ok[:, None] & (qs < O_g * KS)[None, :] & (num >= 0) & (num % stride == 0) & (t_out < T_out)
        gch = (g * O_g + o).to(tl.int64)
        gt = tl.load(g_ptr + n[:, None] * s_gn + gch[None, :] * s_go + t_out * s_gt, mask=hit, other=0.0)
        wt = tl.load(
            w_ptr + gch[:, None] * s_wo + (cs[None, :] * KS + tap[:, None]) * s_wk,
            mask=(qs < O_g * KS)[:, None] & c_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(gt, wt.to(DT), acc=acc, input_precision=BASE_PRECISION)

    lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, R_g * KS, BLOCK_K):
        qs = q0 + tl.arange(0, BLOCK_K)
        j = qs // KS
        tap = qs % KS
        if IS_LINEAR:
            u_row = n[:, None] + tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int64)
            hit = row_ok[:, None] & (qs < R_g)[None, :]
        else:
            num = tp[:, None] - (tap * dil)[None, :]
            t_out = tl.maximum(num, 0) // stride
            u_row = n[:, None] * T_out + t_out
            hit = row_ok[:, None] & (qs < R_g * KS)[None, :] & (num >= 0) & (num % stride == 0) & (t_out < T_out)
        gut = tl.load(gu_ptr + u_row * s_um + (g * R_g + j)[None, :] * s_ur, mask=hit, other=0.0)
        at = tl.load(
            a_ptr + (g * R_g + j)[:, None] * s_ar + (cs[None, :] * KS + tap[:, None]) * s_ak,
            mask=(qs < R_g * KS)[:, None] & c_ok[None, :],
            other=0.0,
        )
        lora = tl.dot(gut.to(DT), at.to(DT), acc=lora, input_precision="ieee")

    ch = (g * C_g + cs).to(tl.int64)
    if HAS_DROPOUT:
        seed = _seed_value(seed, HAS_DROPOUT, SEED_IS_PTR)
        src, _ = _source_position(tp - pad_l, T, PAD_MODE)
        lora *= _keep_scale(seed, (n[:, None] * C + ch[None, :]) * T + src.to(tl.int64)[:, None], p_drop)
    acc += lora
    if IS_LINEAR:
        dx_off = n[:, None] * s_dn + ch[None, :] * s_dc
    else:
        dx_off = (n * s_dn + (tp - tp0) * s_dt)[:, None] + ch[None, :] * s_dc
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.autotune(
    configs=WEIGHT_GRAD_CONFIGS, key=["M_KEY", "I_g", "J", "KS", "IS_LINEAR", "SPLIT"], prune_configs_by=_PRUNE
)
@triton.jit(do_not_specialize=["seed", "M", "T_out", "T"])
def lora_weight_grad_kernel(
    p_ptr,
    q_ptr,
    out_ptr,
    seed,
    M,
    M_KEY,
    I_g,
    J,
    T_out,
    C,
    C_g,
    T,
    s_pn,
    s_pc,
    s_pt,
    s_qn,
    s_qc,
    s_qt,
    s_os,
    s_oi,
    s_oj,
    stride,
    dil,
    pad_l,
    alpha,
    p_drop,
    KS: tl.constexpr,
    PAD_MODE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_LINEAR: tl.constexpr,
    DOT_FROM_Q: tl.constexpr,
    SPLIT: tl.constexpr,
    SEED_IS_PTR: tl.constexpr,
    BASE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out[split, g·I_g + i, j] = α·Σ_{rows of split} P[row, g·I_g + i]·D(Q)[row, j]`` (fp32 partials).

    The weight-side gradients, reductions over the ``M = N·T_out`` rows:
    ``grad_W = Gᵀ·X``, ``grad_A = g_uᵀ·D(X)`` and ``grad_B = s·Gᵀ·u``. ``P`` is addressed as
    ``(N, channels, T_out)``; ``Q`` as the patch matrix of ``(N, C, T)`` (``X`` itself, or ``u``
    viewed with ``k = 1``). Grid ``(cdiv(I_g, BLOCK_M), cdiv(J, BLOCK_N), groups·SPLIT)``: each split
    reduces a contiguous run of row tiles (``BLOCK_K`` rows per step); the caller sums the splits,
    which keeps the result deterministic (no atomics).
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    g = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    if DOT_FROM_Q:
        DT = q_ptr.dtype.element_ty
    else:
        DT = p_ptr.dtype.element_ty
    seed = _seed_value(seed, HAS_DROPOUT, SEED_IS_PTR)

    i_s = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    j_s = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ch = (g * I_g + i_s).to(tl.int64)
    n_tiles = tl.cdiv(M, BLOCK_K)
    per_split = tl.cdiv(n_tiles, SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(split * per_split, tl.minimum((split + 1) * per_split, n_tiles)):
        rows = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        if IS_LINEAR:
            p_row = rows.to(tl.int64) * s_pn
        else:
            p_row = (rows // T_out).to(tl.int64) * s_pn + (rows % T_out) * s_pt
        pt = tl.load(
            p_ptr + p_ch[:, None] * s_pc + p_row[None, :], mask=(i_s < I_g)[:, None] & (rows < M)[None, :], other=0.0
        )
        q, scale = _load_patch(
            q_ptr,
            seed,
            rows,
            j_s,
            g,
            M,
            J,
            T_out,
            C,
            C_g,
            T,
            s_qn,
            s_qc,
            s_qt,
            stride,
            dil,
            pad_l,
            p_drop,
            KS,
            PAD_MODE,
            HAS_DROPOUT,
            IS_LINEAR,
        )
        if HAS_DROPOUT:
            q = q.to(tl.float32) * scale
        acc = tl.dot(pt.to(DT), q.to(DT), acc=acc, input_precision=BASE_PRECISION)
    tl.store(
        out_ptr + split * s_os + p_ch[:, None] * s_oi + j_s[None, :] * s_oj,
        acc * alpha,
        mask=(i_s < I_g)[:, None] & (j_s < J)[None, :],
    )


# --------------------------------------------------------------------------- dropout mask


@triton.jit(do_not_specialize=["seed", "numel"])
def dropout_mask_kernel(out_ptr, seed, numel, p_drop, BLOCK: tl.constexpr, SEED_IS_PTR: tl.constexpr):
    """``out[e] = 1/(1−p)`` if ``rand(seed, e) ≥ p`` else ``0``, ``e`` the row-major element index."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seed = _seed_value(seed, True, SEED_IS_PTR)
    tl.store(out_ptr + offs, _keep_scale(seed, offs, p_drop).to(out_ptr.dtype.element_ty), mask=offs < numel)
