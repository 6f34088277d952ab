"""The oracle: the unfused maths of every LoRA layer kind (docs/maths.md).

Readable, float64-capable, differentiable through plain autograd. Every backend
(``torch``, ``triton``, ``cuda``) is held to these functions in the tests.

Factor shapes (all 2-D, ``g`` = groups, ``r % g == 0``):

=================  =====================  ========================  =======================
layer              base weight            ``lora_A``                ``lora_B``
=================  =====================  ========================  =======================
Linear             ``(out, in)``          ``(r, in)``               ``(out, r)``
Conv1d             ``(out, in/g, k)``     ``(r, in/g · k)``         ``(out, r/g)``
ConvTranspose1d    ``(in, out/g, k)``     ``(r, in/g)``             ``(r, out/g · k)``
Conv2d             ``(out, in/g, kh, kw)``  ``(r, in/g · kh·kw)``   ``(out, r/g)``
=================  =====================  ========================  =======================

Dropout ``D`` acts on the LoRA input only. Here it is given explicitly as
``dropout_mask``: a tensor shaped like ``x`` holding ``0`` or ``1/(1-p)`` (or ``None`` for
no dropout). Backends draw their masks from a seed; each backend can materialise its
mask so that tests compare against this oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lora_linear_ref",
    "lora_conv1d_ref",
    "lora_conv_transpose1d_ref",
    "delta_weight_linear",
    "delta_weight_conv1d",
    "delta_weight_conv_transpose1d",
    "lora_conv2d_ref",
    "delta_weight_conv2d",
    "pad1d",
    "pad2d",
]


def _drop(x: Tensor, dropout_mask: Tensor | None) -> Tensor:
    return x if dropout_mask is None else x * dropout_mask


def pad1d(x: Tensor, padding: tuple[int, int], padding_mode: str) -> Tensor:
    """Pad the last dim of ``x`` by ``(left, right)`` the way ``nn.Conv1d`` does for ``padding_mode``."""
    if padding == (0, 0):
        return x
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, padding, mode=mode)


# --------------------------------------------------------------------------- Linear


def delta_weight_linear(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``ΔW = s · B · A``, shape ``(out, in)``."""
    return scaling * (lora_B @ lora_A)


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``y = x Wᵀ + b + s · (D(x) Aᵀ) Bᵀ``.  ``x: (..., in)`` → ``y: (..., out)``."""
    base = F.linear(x, weight, bias)
    u = F.linear(_drop(x, dropout_mask), lora_A)
    return base + scaling * F.linear(u, lora_B)


# --------------------------------------------------------------------------- Conv1d


def delta_weight_conv1d(lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int, kernel_size: int) -> Tensor:
    """``ΔW[o, i, t] = s · Σⱼ B[o, j] · A[j, i·k + t]`` per group; shape ``(out, in/g, k)``."""
    r = lora_A.shape[0]
    out = lora_B.shape[0]
    rg, og = r // groups, out // groups
    a = lora_A.reshape(groups, rg, -1)  # (g, r/g, in/g·k)
    b = lora_B.reshape(groups, og, rg)  # (g, out/g, r/g)
    dw = torch.bmm(b, a)  # (g, out/g, in/g·k)
    return scaling * dw.reshape(out, -1, kernel_size)


def lora_conv1d_ref(
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
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``y = conv(x, W) + b + s · conv1x1(conv(D(x), A), B)``.

    ``x: (N, in, T)``; ``padding`` is the explicit ``(left, right)`` padding applied with
    ``padding_mode`` (the layer resolves ``'same'``/``'valid'``/ints to this).
    """
    k = weight.shape[-1]
    r = lora_A.shape[0]
    if padding_mode == "zeros" and padding[0] == padding[1]:
        base = F.conv1d(x, weight, bias, stride=stride, padding=padding[0], dilation=dilation, groups=groups)
    else:
        base = F.conv1d(pad1d(x, padding, padding_mode), weight, bias, stride=stride, dilation=dilation, groups=groups)
    dp = pad1d(_drop(x, dropout_mask), padding, padding_mode)
    u = F.conv1d(dp, lora_A.reshape(r, -1, k), None, stride=stride, dilation=dilation, groups=groups)
    lora = F.conv1d(u, lora_B.unsqueeze(-1), None, groups=groups)
    return base + scaling * lora


# --------------------------------------------------------------------------- ConvTranspose1d


def delta_weight_conv_transpose1d(
    lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int, kernel_size: int
) -> Tensor:
    """``ΔW[i, o, t] = s · Σⱼ A[j, i] · B[j, o·k + t]`` per group; shape ``(in, out/g, k)``."""
    r = lora_A.shape[0]
    rg = r // groups
    a = lora_A.reshape(groups, rg, -1)  # (g, r/g, in/g)
    b = lora_B.reshape(groups, rg, -1)  # (g, r/g, out/g·k)
    dw = torch.bmm(a.transpose(1, 2), b)  # (g, in/g, out/g·k)
    in_ch = dw.shape[0] * dw.shape[1]
    return scaling * dw.reshape(in_ch, -1, kernel_size)


def lora_conv_transpose1d_ref(
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
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``y = convT(x, W) + b + s · convT(A · D(x), B)``.  ``x: (N, in, T)``.

    ``A`` is a grouped 1×1 projection at the input rate; ``B`` upsamples exactly like the
    base (same stride, padding, output_padding, dilation, groups).
    """
    k = weight.shape[-1]
    r = lora_A.shape[0]
    base = F.conv_transpose1d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    u = F.conv1d(_drop(x, dropout_mask), lora_A.unsqueeze(-1), None, groups=groups)  # (N, r, T)
    lora = F.conv_transpose1d(u, lora_B.reshape(r, -1, k), None, stride, padding, output_padding, groups, dilation)
    return base + scaling * lora


# --------------------------------------------------------------------------- Conv2d


def pad2d(x: Tensor, padding: tuple[int, int, int, int], padding_mode: str) -> Tensor:
    """Pad the last two dims of ``x`` by ``(top, bottom, left, right)`` as ``nn.Conv2d`` does for ``padding_mode``."""
    if tuple(padding) == (0, 0, 0, 0):
        return x
    top, bottom, left, right = padding
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode)


def delta_weight_conv2d(
    lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int, kernel_size: tuple[int, int]
) -> Tensor:
    """``ΔW[o, i, h, w] = s · Σⱼ B[o, j] · A[j, (i·kh + h)·kw + w]`` per group; shape ``(out, in/g, kh, kw)``."""
    r = lora_A.shape[0]
    out = lora_B.shape[0]
    rg, og = r // groups, out // groups
    dw = torch.bmm(lora_B.reshape(groups, og, rg), lora_A.reshape(groups, rg, -1))  # (g, out/g, in/g·kh·kw)
    return scaling * dw.reshape(out, -1, *kernel_size)


def lora_conv2d_ref(
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
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``y = conv2d(x, W) + b + s · conv1x1(conv2d(D(x), A), B)``.

    ``x: (N, in, H, W)``; ``padding`` is the explicit ``(top, bottom, left, right)`` padding applied with
    ``padding_mode`` (the layer resolves ``'same'``/``'valid'``/ints/pairs to this).
    """
    kh, kw = weight.shape[-2:]
    r = lora_A.shape[0]
    base = F.conv2d(pad2d(x, padding, padding_mode), weight, bias, stride=stride, dilation=dilation, groups=groups)
    dp = pad2d(_drop(x, dropout_mask), padding, padding_mode)
    u = F.conv2d(dp, lora_A.reshape(r, -1, kh, kw), None, stride=stride, dilation=dilation, groups=groups)
    lora = F.conv2d(u, lora_B[:, :, None, None], None, groups=groups)
    return base + scaling * lora
