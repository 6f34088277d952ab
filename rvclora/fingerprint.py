"""Which base model an adapter belongs to: :func:`base_fingerprint`.

An adapter is a difference against one base. Merged into another voice's model it gives
garbage that loads fine, so every adapter records a fingerprint of the base it was trained
on, and merging or loading checks it.

The fingerprint must be the same for the three forms a base takes:

* the fp32 training checkpoint (``G_*.pth``, or a generator built in memory);
* RVC's exported model, which casts every tensor to half and keeps ``weight_g``/``weight_v``
  as they are (so the effective weight is *not* what gets rounded);
* the model after :func:`rvclora.inject_lora`, whose adapted layers hold the folded weight
  ``g·v/‖v‖`` instead of ``g`` and ``v`` (the folding cannot be undone).

So it is defined on what the export stores: the decoder's tensors (the ``dec.`` keys with the
prefix dropped when the state dict has any, else every key) as stored (``weight_g``/``weight_v``
for legacy weight_norm; ``parametrizations.weight.original0/1`` are renamed to those), each
rounded to half, hashed with its name and shape in sorted order. Biases are left out (a bias
mode may train them, and the adapter then carries its own), and so are the LoRA factors.
Rounding an fp32 tensor to half gives the same bits as the export's half copy, so the fp32 and
fp16 forms agree exactly. An injected model cannot recompute it, so :func:`rvclora.inject_lora`
computes it on the model before replacing any layer and records it as
``model.rvclora_base_fingerprint``; :func:`base_fingerprint` of an injected model returns that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["FINGERPRINT_PREFIX", "base_fingerprint", "short_fingerprint"]

#: Every fingerprint starts with this (the definition's version).
FINGERPRINT_PREFIX = "fp16-sha256:"
_RENAME = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _normalise(key: str) -> str:
    for long, short in _RENAME.items():
        if key.endswith(long):
            return key[: -len(long)] + short
    return key


def _selected(state: Mapping[str, Tensor]) -> dict:
    keys = [k for k in state if isinstance(k, str)]
    if any(k.startswith("dec.") for k in keys):
        keys = [k[4:] for k in keys if k.startswith("dec.")]
        state = {k: state["dec." + k] for k in keys}
    out = {}
    for k in keys:
        leaf = k.rpartition(".")[2]
        if leaf in ("lora_A", "lora_B", "bias"):
            continue
        v = state[k]
        if not isinstance(v, Tensor):
            raise TypeError(f"base_fingerprint: state dict value {k!r} is a {type(v).__name__}, expected a tensor")
        if not v.is_floating_point():
            continue  # counters and other integer buffers are not weights
        out[_normalise(k)] = v
    return out


def base_fingerprint(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """The fingerprint of a base model's decoder weights (see the module docstring), as ``"fp16-sha256:<hex>"``.

    Accepts a module or a state dict (an RVC export's ``weight``, a checkpoint's ``model``, a
    generator's own). A model :func:`rvclora.inject_lora` adapted returns the fingerprint it
    recorded then. A model with LoRA layers and no record (converted from PEFT, say) is
    fingerprinted from its state dict when none of them folded a weight_norm, else raises ``ValueError``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        recorded = getattr(model_or_state_dict, "rvclora_base_fingerprint", None)
        if recorded is not None:
            return recorded
        from .layers import LoRALayer

        if any(isinstance(m, LoRALayer) and m.weight_norm_kind is not None for m in model_or_state_dict.modules()):
            raise ValueError("base_fingerprint: this model has LoRA layers with folded weight_norm and no recorded "
                             "rvclora_base_fingerprint (it is recorded by inject_lora); fingerprint the base "
                             "model or its exported file instead")
        # LoRA layers without weight_norm keep the base weight, unmerged, under the base's own key
        state: Mapping[str, Tensor] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        kind = type(model_or_state_dict).__name__
        raise TypeError(f"base_fingerprint expects an nn.Module or a state dict, got {kind}")
    tensors = _selected(state)
    if not tensors:
        raise ValueError("base_fingerprint: the state dict holds no floating-point weights to fingerprint")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        half = t.to("cpu", torch.float16).contiguous()
        h.update(f"{name}:{tuple(half.shape)};".encode())
        h.update(half.view(torch.int16).numpy().tobytes())
    return FINGERPRINT_PREFIX + h.hexdigest()[:32]


def short_fingerprint(fp: str | None) -> str:
    """A fingerprint shortened for messages (``"fp16-sha256:1a2b3c4d5e6f"``), or ``"none"``."""
    return "none" if fp is None else fp[: len(FINGERPRINT_PREFIX) + 12]
