"""What the torch backend's ops share: masks, dtype/autocast plumbing, the merged-weight rule and grouped 1×1
helpers (their autograd: :mod:`rvclora.ops.autograd`, shared by every backend)."""

from __future__ import annotations

import functools

# List and Tuple: the op modules' implementations are wrapped here (_no_autocast, _with_empties), and
# torch.library evaluates their string annotations in the wrapper's globals, i.e. this module's.
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch
from torch import Tensor

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
    assert seed is not None, "dropout_p > 0 needs a seed"
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
    levels = (
        (getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, torch.backends)
        if conv
        else (torch.backends.cuda.matmul, torch.backends)
    )
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


def _grouped_1x1(w: Tensor, x: Tensor, groups: int) -> Tensor:
    """``w: (g·o, c)`` applied per group to ``x: (N, g·c, T)`` → ``(N, g·o, T)``."""
    n, _, t = x.shape
    if groups == 1 and n == 1:
        return torch.mm(w, x[0]).unsqueeze(0)
    wg = w.reshape(groups, -1, w.shape[1])  # explicit sizes below: -1 is ambiguous for empty inputs
    return torch.matmul(wg, x.reshape(n, groups, x.shape[1] // groups, t)).reshape(n, w.shape[0], t)


def _grouped_outer(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """``Σ_{n,t} a[n, g·p, t] · b[n, g·q, t]`` per group → ``(g·p, q)``."""
    n, _, t = a.shape
    if groups == 1 and n == 1:
        # the thin operand on the left (about twice as fast on CPU), then a parameter-sized transpose copy
        return torch.mm(b[0], a[0].t()).t().contiguous()
    ag = a.reshape(n, groups, a.shape[1] // groups, t)
    bg = b.reshape(n, groups, b.shape[1] // groups, t)
    return torch.matmul(ag, bg.transpose(-1, -2)).sum(0).reshape(a.shape[1], bg.shape[2])
