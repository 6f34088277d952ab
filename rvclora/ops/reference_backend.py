"""The ``reference`` backend: the oracle run through plain autograd (slow, for checking).

Its dropout mask is the torch backend's (:func:`rvclora.ops.torch_backend.dropout_mask`),
so ``reference`` and ``torch`` give the same result for the same seed.
"""

from __future__ import annotations

from torch import Tensor

from .. import reference as ref
from .torch_backend import dropout_mask

NAME = "reference"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    return None


def _mask(x: Tensor, dropout_p: float, seed: Tensor | None):
    if dropout_p == 0.0:
        return None
    return dropout_mask(seed, x.shape, dropout_p, x.device, x.dtype)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    return ref.lora_linear_ref(x, weight, bias, lora_A, lora_B, scaling, _mask(x, dropout_p, seed))


def lora_conv1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode,
                dropout_p, seed):
    return ref.lora_conv1d_ref(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups,
                               padding_mode, _mask(x, dropout_p, seed))


def lora_conv_transpose1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation,
                          groups, dropout_p, seed):
    return ref.lora_conv_transpose1d_ref(x, weight, bias, lora_A, lora_B, scaling, stride, padding,
                                         output_padding, dilation, groups, _mask(x, dropout_p, seed))
