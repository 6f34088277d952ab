"""Layer records: what a saved adapter says of each adapted layer (its kind and its groups).

Written into an adapter's metadata (``metadata["layers"]``) by :mod:`rvclora.checkpoint`, read by
:mod:`rvclora.blend` (a blend needs each layer's factor layout) and checked by :mod:`rvclora.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .inject import lora_modules
from .layers import LoRAConv1d, LoRAConvTranspose1d, LoRALinear

__all__ = ["LayerRecord", "layer_records", "model_layer_records"]


@dataclass(frozen=True)
class LayerRecord:
    """What a blend needs to know of an adapted layer: its kind and its groups."""

    kind: str
    groups: int = 1


def layer_records(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: {"kind", "groups"}}`` for every LoRA layer of ``model`` (saved in adapter metadata)."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in lora_modules(model):
        if m.r <= 0:
            continue
        if isinstance(m, LoRAConvTranspose1d):
            out[name] = {"kind": "conv_transpose1d", "groups": int(m.groups)}
        elif isinstance(m, LoRAConv1d):
            out[name] = {"kind": "conv1d", "groups": int(m.groups)}
        elif isinstance(m, LoRALinear):
            out[name] = {"kind": "linear", "groups": 1}
    return out


def model_layer_records(model: torch.nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{prefix + name: {"kind", "groups"}}`` for every Linear / Conv1d / ConvTranspose1d of ``model``, adapted or not.

    What ``layers=`` of :func:`rvclora.blend.blend_adapters` takes for adapters saved without layer records.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ConvTranspose1d):
            out[prefix + name] = {"kind": "conv_transpose1d", "groups": int(m.groups)}
        elif isinstance(m, torch.nn.Conv1d):
            out[prefix + name] = {"kind": "conv1d", "groups": int(m.groups)}
        elif isinstance(m, torch.nn.Linear):
            out[prefix + name] = {"kind": "linear", "groups": 1}
    return out
