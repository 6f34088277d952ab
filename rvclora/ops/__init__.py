"""Functional LoRA ops with autograd, dispatched to a backend (see :mod:`rvclora.ops.dispatch`).

Each op computes ``base(x) + scaling · B(A · D(x))`` for its layer kind exactly as
:mod:`rvclora.reference` defines it. ``dropout_p > 0`` draws a fresh seed from torch's
default CPU generator for every call (so ``torch.manual_seed`` makes runs repeatable);
the mask is regenerated from that seed in backward, never stored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import (
    BACKENDS,
    BackendUnavailableError,
    backend_status,
    get_backend,
    preload_backends,
    select_backend,
    set_backend,
)
from .spec import SPECS

preload_backends()

__all__ = [
    "lora_linear",
    "lora_conv1d",
    "lora_conv_transpose1d",
    "lora_conv2d",
    "draw_seed",
    "BACKENDS",
    "BackendUnavailableError",
    "backend_status",
    "get_backend",
    "set_backend",
    "select_backend",
]


def draw_seed(dropout_p: float) -> Tensor | None:
    """A 0-dim int64 CPU tensor seed for a dropout mask, or ``None`` when ``dropout_p == 0``."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """``x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ``; ``x: (..., in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``."""
    return _call("lora_linear", x, weight, bias, lora_A, lora_B, scaling, {}, dropout_p, seed)


def lora_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int = 1,
    padding: tuple[int, int] = (0, 0),
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """Conv1d + LoRA; ``padding`` is explicit ``(left, right)``. Shapes: :mod:`rvclora.reference`."""
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    return _call("lora_conv1d", x, weight, bias, lora_A, lora_B, scaling, options, dropout_p, seed)


def lora_conv_transpose1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: int = 1,
    padding: int = 0,
    output_padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """ConvTranspose1d + exact LoRA. Shapes: :mod:`rvclora.reference`."""
    options = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups)
    return _call("lora_conv_transpose1d", x, weight, bias, lora_A, lora_B, scaling, options, dropout_p, seed)


def lora_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    padding_mode: str = "zeros",
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
) -> Tensor:
    """Conv2d + LoRA; ``padding`` is explicit ``(top, bottom, left, right)``. Shapes: :mod:`rvclora.reference`."""
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)
    return _call("lora_conv2d", x, weight, bias, lora_A, lora_B, scaling, options, dropout_p, seed)


def _call(
    op: str,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    options: dict,
    dropout_p: float,
    seed: Tensor | None,
) -> Tensor:
    """Every op's path: normalise the options (:mod:`rvclora.ops.spec`), pick a backend, call it in the one
    calling convention ``op(x, weight, bias, lora_A, lora_B, scaling, *options, dropout_p, seed)``."""
    spec = SPECS[op]
    if dropout_p > 0 and seed is None:
        seed = draw_seed(dropout_p)
    values = spec.option_values(options)
    params = dict(zip(spec.option_names, values))
    be = select_backend(op, x, weight=weight, lora_A=lora_A, dropout_p=dropout_p, **params)
    return getattr(be, op)(x, weight, bias, lora_A, lora_B, float(scaling), *values, float(dropout_p), seed)
