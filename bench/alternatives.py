"""What users would otherwise train with, built so the benchmarks can time them against rvclora.

* **plain**: the textbook unfused LoRA module, ``base(x) + scaling · B(A(dropout(x)))`` with
  ``nn.Linear`` / ``nn.Conv1d`` submodules. For ``ConvTranspose1d`` it is the *exact*
  factorisation of docs/maths.md done unfused: a 1×1 ``Conv1d`` A at the input rate, then a
  ``ConvTranspose1d`` B with the base's stride, padding, output_padding, dilation and groups.
* **peft**: Hugging Face PEFT's LoRA, where PEFT accepts the layer.
* **loralib**: Microsoft's ``loralib.Linear`` / ``loralib.Conv1d``, where they apply.

Builders raise :class:`Unsupported` with a short reason (never anything else) when a library
cannot adapt a layer or computes something other than the layer's LoRA; the harness then
reports the case as unsupported instead of timing it. Factors use the same layout as rvclora
wherever the library allows, so :func:`copy_factors` can give every variant identical
``A``/``B`` and the harness can check that they all compute the same function.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Unsupported",
    "PlainLoRALinear",
    "PlainLoRAConv1d",
    "PlainLoRAConvTranspose1d",
    "plain_lora",
    "inject_plain_lora",
    "peft_lora",
    "loralib_lora",
    "library_version",
    "copy_factors",
    "lora_factors",
]


class Unsupported(Exception):
    """A library cannot (correctly) adapt this layer; ``str(e)`` is the reason shown in the table."""


def library_version(dist: str) -> str | None:
    """The installed version of ``dist`` without importing it, or ``None``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class _PlainLoRA(nn.Module):
    def __init__(
        self, base: nn.Module, lora_A: nn.Module, lora_B: nn.Module, r: int, lora_alpha: float, lora_dropout: float
    ) -> None:
        super().__init__()
        self.base = base
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.scaling = lora_alpha / r
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


class PlainLoRALinear(_PlainLoRA):
    """``base(x) + s · B(A(D(x)))``; ``A = Linear(in, r)``, ``B = Linear(r, out)``."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        a = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        b = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        super().__init__(base, a, b, r, lora_alpha, lora_dropout)


class PlainLoRAConv1d(_PlainLoRA):
    """``A = Conv1d(in, r, k)`` with the base's stride/padding/dilation/groups/padding_mode, ``B`` a grouped 1×1."""

    def __init__(self, base: nn.Conv1d, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        a = nn.Conv1d(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            base.groups,
            bias=False,
            padding_mode=base.padding_mode,
            **kw,
        )
        b = nn.Conv1d(r, base.out_channels, 1, groups=base.groups, bias=False, **kw)
        super().__init__(base, a, b, r, lora_alpha, lora_dropout)


class PlainLoRAConvTranspose1d(_PlainLoRA):
    """The exact transposed factorisation, unfused: ``A = Conv1d(in, r, 1)``, ``B = ConvTranspose1d(r, out, k)``."""

    def __init__(self, base: nn.ConvTranspose1d, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        a = nn.Conv1d(base.in_channels, r, 1, groups=base.groups, bias=False, **kw)
        b = nn.ConvTranspose1d(
            r,
            base.out_channels,
            base.kernel_size,
            base.stride,
            base.padding,
            base.output_padding,
            base.groups,
            bias=False,
            dilation=base.dilation,
            **kw,
        )
        super().__init__(base, a, b, r, lora_alpha, lora_dropout)


def plain_lora(base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> _PlainLoRA:
    """Wrap ``base`` (a Linear, Conv1d or ConvTranspose1d) in the matching plain LoRA module."""
    # ConvTranspose1d first: it is not a Conv1d subclass, but keep the order explicit anyway.
    for kind, cls in (
        (nn.ConvTranspose1d, PlainLoRAConvTranspose1d),
        (nn.Conv1d, PlainLoRAConv1d),
        (nn.Linear, PlainLoRALinear),
    ):
        if isinstance(base, kind):
            return cls(base, r, lora_alpha, lora_dropout)
    raise TypeError(f"plain_lora: expected Linear/Conv1d/ConvTranspose1d, got {type(base).__name__}")


def inject_plain_lora(
    model: nn.Module, names: Iterable[str], r: int, lora_alpha: float, lora_dropout: float = 0.0
) -> nn.Module:
    """Replace each named submodule of ``model`` by a plain LoRA wrapper around it (in place)."""
    for name in list(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain_lora(getattr(parent, child), r, lora_alpha, lora_dropout))
    return model


def peft_lora(model: nn.Module, target_regex: str, r: int, lora_alpha: float, lora_dropout: float = 0.0) -> nn.Module:
    """Inject PEFT's LoRA into every module whose qualified name fully matches ``target_regex``."""
    if library_version("peft") is None:
        raise Unsupported("peft not installed")
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_regex)
    try:
        return peft.inject_adapter_in_model(config, model)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if re.search(r"ConvTranspose", first) or "is not supported" in first:
            raise Unsupported(f"unsupported (peft {peft.__version__}: layer type not supported)") from None
        raise Unsupported(f"unsupported (peft {peft.__version__}: {first[:80]})") from None


def loralib_lora(base: nn.Module, r: int, lora_alpha: float) -> nn.Module:
    """The loralib layer equivalent to ``base`` (same weight and bias), or :class:`Unsupported`."""
    if library_version("loralib") is None:
        raise Unsupported("loralib not installed")
    import loralib

    kw = dict(r=r, lora_alpha=lora_alpha, merge_weights=False)
    if isinstance(base, nn.Linear):
        layer = loralib.Linear(base.in_features, base.out_features, bias=base.bias is not None, **kw)
        target = layer
    elif isinstance(base, nn.ConvTranspose1d):
        raise Unsupported("unsupported (loralib has no ConvTranspose1d)")
    elif isinstance(base, nn.Conv1d):
        layer = loralib.Conv1d(
            base.in_channels,
            base.out_channels,
            base.kernel_size[0],
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=base.groups,
            bias=base.bias is not None,
            padding_mode=base.padding_mode,
            **kw,
        )
        target = layer.conv
    else:
        raise Unsupported(f"unsupported (loralib has no {type(base).__name__})")
    with torch.no_grad():
        target.weight.copy_(base.weight)
        if base.bias is not None:
            target.bias.copy_(base.bias)
    layer.to(device=base.weight.device, dtype=base.weight.dtype)
    # loralib.Conv1d reshapes a (out·k, r·k) @ (r·k, in·k) product into the (out, in, k) weight, which
    # only has the right number of elements for kernel size 1: run it once to find out.
    try:
        with torch.no_grad():
            shape = (2, base.in_channels if not isinstance(base, nn.Linear) else base.in_features)
            x = torch.zeros(*shape, 8) if not isinstance(base, nn.Linear) else torch.zeros(*shape)
            layer(x.to(base.weight))
    except RuntimeError as e:
        raise Unsupported(f"unsupported (loralib.{type(base).__name__} fails: {str(e).splitlines()[0][:60]})") from None
    return layer


def lora_factors(module: nn.Module) -> dict[str, Tensor]:
    """``{"A": ..., "B": ...}`` of one LoRA layer of any variant, reshaped to rvclora's 2-D layout.

    rvclora: ``lora_A``/``lora_B`` parameters; plain: ``lora_A``/``lora_B`` submodules; PEFT:
    ``lora_A["default"]``/``lora_B["default"]``; loralib: ``lora_A``/``lora_B`` parameters.
    Returns views of the parameters (to be written in place under ``no_grad``).
    """
    a, b = module.lora_A, module.lora_B
    if isinstance(a, nn.ModuleDict):
        a, b = a["default"], b["default"]
    if isinstance(a, nn.Module):
        a, b = a.weight, b.weight
    return {"A": a, "B": b}


def copy_factors(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the factors of the rvclora layer ``src`` (layouts in the module docstring)."""
    s, d = lora_factors(src), lora_factors(dst)
    with torch.no_grad():
        for key in ("A", "B"):
            d[key].copy_(s[key].reshape(d[key].shape))


def conv_output_check(y: Tensor, x: Tensor, w_eff: Tensor, base: nn.Module) -> float:
    """Relative error of ``y`` against the base op with the merged weight ``w_eff`` (the exact LoRA output)."""
    if isinstance(base, nn.ConvTranspose1d):
        ref = F.conv_transpose1d(
            x, w_eff, base.bias, base.stride, base.padding, base.output_padding, base.groups, base.dilation
        )
    elif isinstance(base, nn.Conv1d):
        ref = F.conv1d(x, w_eff, base.bias, base.stride, base.padding, base.dilation, base.groups)
    else:
        ref = F.linear(x, w_eff, base.bias)
    if y.shape != ref.shape:
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))
