"""Output lengths of the two convolution kinds: the one formula each that every backend uses.

Both are PyTorch's (``nn.Conv1d`` and ``nn.ConvTranspose1d`` documentation); ``pad_total`` is the
left plus the right padding of a Conv1d (rvclora passes them separately, for asymmetric padding).
"""

from __future__ import annotations

__all__ = ["conv1d_out_len", "conv_transpose1d_out_len"]


def conv1d_out_len(t: int, k: int, stride: int, pad_total: int, dilation: int) -> int:
    return (t + pad_total - dilation * (k - 1) - 1) // stride + 1


def conv_transpose1d_out_len(t: int, k: int, stride: int, padding: int, output_padding: int, dilation: int) -> int:
    return (t - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1
