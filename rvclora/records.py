"""Layer records: what a saved adapter says of each adapted layer (its kind and its groups).

Written into an adapter's metadata (``metadata["layers"]``) by :mod:`rvclora.checkpoint`, read by
:mod:`rvclora.blend` (a blend needs each layer's factor layout) and checked by :mod:`rvclora.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .inject import lora_modules
from .layers import LORA_CLASSES
from .ops.spec import KINDS

__all__ = ["KINDS", "LayerRecord", "layer_records", "model_layer_records"]


@dataclass(frozen=True)
class LayerRecord:
    """What a blend needs to know of an adapted layer: its kind and its groups."""

    kind: str
    groups: int = 1


def layer_records(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: {"kind", "groups"}}`` for every LoRA layer of ``model`` (saved in adapter metadata).

    The kind is the layer class's (:attr:`rvclora.layers.LoRALayer.kind`); a LoRA layer of a kind no
    spec describes is refused, never left out of the records.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in lora_modules(model):
        if m.r <= 0:
            continue
        kind = getattr(type(m), "spec", None) and m.kind
        if kind not in KINDS:
            raise TypeError(
                f"layer_records: {name!r} is a {type(m).__name__} of kind {kind!r}; a saved layer's kind "
                f"must be one of {KINDS} (give the class a spec of rvclora.ops.spec.SPECS)"
            )
        out[name] = {"kind": kind, "groups": m.lora_groups}
    return out


def model_layer_records(model: torch.nn.Module, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{prefix + name: {"kind", "groups"}}`` for every layer of ``model`` that a LoRA class adapts, adapted or not.

    What ``layers=`` of :func:`rvclora.blend.blend_adapters` takes for adapters saved without layer records.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        for cls in LORA_CLASSES:
            if isinstance(m, cls.base_class):
                out[prefix + name] = {"kind": cls.spec.kind, "groups": int(m.groups) if cls.spec.grouped else 1}
                break
    return out
