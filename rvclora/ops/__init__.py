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

preload_backends()

__all__ = [
    "lora_linear",
    "lora_conv1d",
    "lora_conv_transpose1d",
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
    if dropout_p > 0 and seed is None:
        seed = draw_seed(dropout_p)
    be = select_backend("lora_linear", x, weight=weight, lora_A=lora_A, dropout_p=dropout_p)
    return be.lora_linear(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), seed)


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
    if dropout_p > 0 and seed is None:
        seed = draw_seed(dropout_p)
    padding = (int(padding[0]), int(padding[1]))
    be = select_backend(
        "lora_conv1d", x, weight=weight, lora_A=lora_A, stride=stride, padding=padding,
        dilation=dilation, groups=groups, padding_mode=padding_mode, dropout_p=dropout_p,
    )
    return be.lora_conv1d(
        x, weight, bias, lora_A, lora_B, float(scaling), int(stride), padding, int(dilation),
        int(groups), padding_mode, float(dropout_p), seed,
    )


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
    if dropout_p > 0 and seed is None:
        seed = draw_seed(dropout_p)
    be = select_backend(
        "lora_conv_transpose1d", x, weight=weight, lora_A=lora_A, stride=stride, padding=padding,
        output_padding=output_padding, dilation=dilation, groups=groups, dropout_p=dropout_p,
    )
    return be.lora_conv_transpose1d(
        x, weight, bias, lora_A, lora_B, float(scaling), int(stride), int(padding),
        int(output_padding), int(dilation), int(groups), float(dropout_p), seed,
    )
