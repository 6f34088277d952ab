"""The ``cpu`` backend: the three LoRA ops as compiled CPU code (csrc/lora_cpu.cpp, in ``rvclora._C``).

Ops (``torch.ops.rvclora``; ``needs`` = which of ``(x, weight, bias, lora_A, lora_B)`` need a
gradient, an unneeded one comes back as an empty ``(0,)`` tensor)::

    cpu_lora_linear_fwd(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, u)
    cpu_lora_conv1d_fwd(x, weight, bias?, lora_A, lora_B, scaling, stride, padding[2], dilation, groups,
                        padding_mode, dropout_p, seed?) -> (y, u)
    cpu_lora_conv_transpose1d_fwd(x, weight, bias?, lora_A, lora_B, scaling, stride, padding, output_padding,
                                  dilation, groups, dropout_p, seed?) -> (y, u)
    cpu_lora_*_bwd(grad_y, x, u, weight, lora_A, lora_B, <the forward's scalars>, seed?, needs[5])
        -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)
    cpu_dropout_mask(like, seed, dropout_p) -> mask

One op call per layer and direction. The base-sized forward and input gradient run in the
convolution/GEMM library (with the merged weight ``W + s·ΔW`` where merging is cheaper than a thin
pass over the activation); the thin LoRA passes (``u``; ``g_u = s·Bᵀg`` with ``grad_B``; ``grad_A``)
are BLAS calls on time blocks, a dilated tap being a view of ``x`` (see csrc/lora_cpu.cpp).
``auto`` runs this backend on CPU for what it supports.
Autograd keeps ``x``, ``u``, the parameters and the seed; the dropout mask is a hash of
(seed, element index of ``x``), regenerated in backward.

float32 and float64 only: half-precision inputs (CPU autocast's bfloat16) and factors of another
dtype than ``x`` are declined in :func:`unsupported_reason`, so ``auto`` runs the torch backend for
them. When the extension cannot be built (no compiler), the backend is unavailable and ``auto``
falls back to the torch backend; ``rvclora info`` shows the reason.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from . import cuda_ext
from .geometry import conv1d_out_len, conv_transpose1d_out_len

NAME = "cpu"

__all__ = ["dropout_mask", "lora_linear", "lora_conv1d", "lora_conv_transpose1d"]

_DTYPES = (torch.float32, torch.float64)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

_registered = threading.Event()
_register_lock = threading.Lock()


# --------------------------------------------------------------------------- availability


def _ops_present() -> bool:
    return hasattr(torch.ops.rvclora, "cpu_lora_conv1d_fwd")


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """``None`` once the extension is built and its ops registered (builds it on the first call).

    A constant for ``torch.compile``: evaluated once at trace time, never traced (the first call
    may run the compiler).
    """
    err = cuda_ext.load_error()
    if err is not None:
        return f"{err}; the torch backend runs instead"
    if not _ops_present():
        return (
            "the rvclora._C extension has no cpu_* ops (built ahead of time from older sources?); "
            "rebuild it, or the torch backend runs instead"
        )
    _register_python_parts()
    return None


def status_note() -> str:
    passes = torch.ops.rvclora.cpu_info() if hasattr(torch.ops.rvclora, "cpu_info") else "thin LoRA passes: unknown"
    return (
        f"compiled C++ LoRA ops on {torch.get_num_threads()} thread(s), float32/float64 "
        f"(other dtypes run on the torch backend); {passes}"
    )


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    if op not in __all__:
        return f"the cpu backend has no {op} (it runs lora_linear, lora_conv1d and lora_conv_transpose1d)"
    if x.device.type != "cpu":
        return f"the cpu backend runs CPU tensors only, got device {x.device.type!r}"
    if x.dtype not in _DTYPES:
        return f"the cpu backend runs float32 and float64 only, got {x.dtype}"
    weight, lora_A = params.get("weight"), params.get("lora_A")
    if weight is not None and weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x's {x.dtype}"
    if lora_A is not None and lora_A.dtype != x.dtype:
        return (
            f"LoRA factors in {lora_A.dtype} with x in {x.dtype} (autocast): the cpu backend computes in one "
            "dtype; the torch backend keeps the LoRA path in float32"
        )
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on: the torch backend handles its dtype policy"
    mode = params.get("padding_mode", "zeros")
    if op == "lora_conv1d" and mode not in _PADDING_MODES:
        return f"padding_mode {mode!r} is not one of {_PADDING_MODES}"
    groups = int(params.get("groups", 1))
    if lora_A is not None and lora_A.shape[0] % groups != 0:
        return f"rank r={lora_A.shape[0]} must be divisible by groups={groups}"
    return None


# --------------------------------------------------------------------------- fakes and autograd


def _linear_fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, lora_A.shape[0]))


def _conv1d_fwd_fake(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed
):
    t_out = conv1d_out_len(x.shape[-1], weight.shape[-1], stride, padding[0] + padding[1], dilation)
    return x.new_empty((x.shape[0], weight.shape[0], t_out)), x.new_empty((x.shape[0], lora_A.shape[0], t_out))


def _convt_fwd_fake(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    t_out = conv_transpose1d_out_len(x.shape[-1], weight.shape[-1], stride, padding, output_padding, dilation)
    return (
        x.new_empty((x.shape[0], weight.shape[1] * groups, t_out)),
        x.new_empty((x.shape[0], lora_A.shape[0], x.shape[-1])),
    )


def _bwd_fake_for(bias_len):
    """The backward's fake: gradients shaped (and laid out) like their inputs, empty where not needed."""

    def fake(grad_y, x, u, weight, lora_A, lora_B, *args):
        needs = args[-1]
        likes = (x, weight, None, lora_A, lora_B)
        out = []
        for i, (need, like) in enumerate(zip(needs, likes)):
            if not need:
                out.append(x.new_empty((0,)))
            elif like is None:
                out.append(x.new_empty((bias_len(weight, args),)))
            elif i == 0:  # grad_x: contiguous, like the base layers' (transposed for a transposed 2-D Linear x)
                out.append(
                    x.new_empty((x.shape[1], x.shape[0])).t()
                    if _transposed_2d(x) and x.dim() == 2 and bias_len is _BIAS_LEN_LINEAR
                    else x.new_empty(x.shape)
                )
            else:
                out.append(torch.empty_like(like))
        return tuple(out)

    return fake


def _transposed_2d(x) -> bool:
    """A transposed matrix (``x.t()`` of a contiguous one), both dims > 1 (see csrc/lora_cpu.cpp)."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) == 1 and x.stride(1) == x.shape[0]


def _BIAS_LEN_LINEAR(weight, args):
    return weight.shape[0]


_BIAS_LEN = {
    "linear": _BIAS_LEN_LINEAR,
    "conv1d": lambda weight, args: weight.shape[0],
    "convt": lambda weight, args: weight.shape[1] * args[5],  # args[5]: groups
}


_NARGS = {"linear": 8, "conv1d": 13, "convt": 13}
_OP = {"linear": "cpu_lora_linear", "conv1d": "cpu_lora_conv1d", "convt": "cpu_lora_conv_transpose1d"}


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, *args, seed = inputs
    # x and u are the LoRA's memory cost; the dropout mask is regenerated from the seed.
    ctx.save_for_backward(x, output[1], weight, lora_A, lora_B, seed)
    ctx.args = tuple(args)
    ctx.mark_non_differentiable(output[1])


def _make_backward(bwd_op, nargs):
    def backward(ctx, grad_y, _grad_u=None):
        x, u, weight, lora_A, lora_B, seed = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [bool(n[0]), bool(n[1]), bool(n[2]), bool(n[3]), bool(n[4])]
        if not any(needs):
            return (None,) * nargs
        grads = bwd_op(grad_y, x, u, weight, lora_A, lora_B, *ctx.args, seed, needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (nargs - 5)

    return backward


def _register_python_parts() -> None:
    """Fake kernels and autograd for the C++ ops (once, after the library is loaded)."""
    if _registered.is_set():
        return
    with _register_lock:
        if _registered.is_set():
            return
        ops = torch.ops.rvclora
        torch.library.register_fake("rvclora::cpu_lora_linear_fwd")(_linear_fwd_fake)
        torch.library.register_fake("rvclora::cpu_lora_conv1d_fwd")(_conv1d_fwd_fake)
        torch.library.register_fake("rvclora::cpu_lora_conv_transpose1d_fwd")(_convt_fwd_fake)
        for name in ("linear", "conv1d", "convt"):
            torch.library.register_fake(f"rvclora::{_OP[name]}_bwd")(_bwd_fake_for(_BIAS_LEN[name]))
            bwd = getattr(ops, f"{_OP[name]}_bwd").default
            torch.library.register_autograd(
                f"rvclora::{_OP[name]}_fwd", _make_backward(bwd, _NARGS[name]), setup_context=_setup_context
            )
        torch.library.register_fake("rvclora::cpu_dropout_mask")(
            lambda like, seed, dropout_p: torch.empty_like(like, memory_format=torch.contiguous_format)
        )
        for name in ("linear", "conv1d", "convt"):
            _EAGER[name] = _eager_function(
                name, getattr(ops, f"{_OP[name]}_fwd").default, getattr(ops, f"{_OP[name]}_bwd").default, _NARGS[name]
            )
        _registered.set()


_EAGER: dict = {}


def _eager_function(name, fwd_op, bwd_op, nargs):
    """A plain ``autograd.Function`` over the C++ ops, for eager calls.

    The ops' own autograd registration (used under ``torch.compile``, where each layer is one
    opaque node) costs a Python dispatch layer per call; eager calls go below it straight to
    the C++ kernel.
    """
    backward = _make_backward(bwd_op, nargs)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            y, u = fwd_op(*args)
        _setup_context(ctx, args, (y, u))
        return y

    def eager_backward(ctx, grad_y):
        with torch._C._AutoDispatchBelowAutograd():
            return backward(ctx, grad_y)

    return type(
        f"_Cpu_{name}_Function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(eager_backward)},
    )


# --------------------------------------------------------------------------- the ops


def _run(name: str, args) -> Tensor:
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"rvclora cpu backend unavailable: {why}")
    if torch.compiler.is_compiling():
        return getattr(torch.ops.rvclora, f"{_OP[name]}_fwd")(*args)[0]
    return _EAGER[name].apply(*args)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return _run(
        "linear", (x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed if dropout_p > 0 else None)
    )


def lora_conv1d(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed
):
    return _run(
        "conv1d",
        (
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            float(scaling),
            int(stride),
            [int(padding[0]), int(padding[1])],
            int(dilation),
            int(groups),
            str(padding_mode),
            float(dropout_p),
            seed if dropout_p > 0 else None,
        ),
    )


def lora_conv_transpose1d(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    return _run(
        "convt",
        (
            x,
            weight,
            bias,
            lora_A,
            lora_B,
            float(scaling),
            int(stride),
            int(padding),
            int(output_padding),
            int(dilation),
            int(groups),
            float(dropout_p),
            seed if dropout_p > 0 else None,
        ),
    )


def dropout_mask(seed: Tensor | None, shape: list[int], p: float, device, dtype) -> Tensor:
    """The mask ``D`` applies to an ``x`` of ``shape``: 0 or ``1/(1-p)``, a hash of (seed, element index)."""
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"rvclora cpu backend unavailable: {why}")
    if seed is None:
        if p != 0.0:
            raise ValueError(f"dropout_mask: p={p} > 0 needs a seed")
        seed = torch.zeros((), dtype=torch.int64)
    if dtype not in _DTYPES:
        return dropout_mask(seed, shape, p, device, torch.float64).to(dtype)
    like = torch.empty(tuple(shape), device="cpu", dtype=dtype)
    return torch.ops.rvclora.cpu_dropout_mask(like, seed, float(p)).to(device)
