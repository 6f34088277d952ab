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

**Scopes.** The definition above is the ``"decoder"`` scope (prefix ``fp16-sha256:``), which every
adapter of the decoder records, as earlier releases did. An adapter that reaches outside the decoder
of an RVC synthesizer (``enc_p``, ``flow``, ``emb_g``, ...) records the ``"synth"`` scope instead
(prefix ``fp16-sha256:synth:``): the same hash over every floating-point, non-bias tensor of the
synthesizer whose key does not contain ``enc_q`` (RVC's export drops those), under its full key
(``dec.ups.0.weight_g``, ``flow.flows.0.pre.weight``, ``emb_g.weight``). So a base whose flow, text
encoder or speaker table differs is told apart, and a training checkpoint and its export still agree.
A fingerprint says its own scope (:func:`fingerprint_scope`); checks compute the base's in that scope.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "FINGERPRINT_PREFIX",
    "SCOPES",
    "SYNTH_PREFIX",
    "base_fingerprint",
    "fingerprint_scope",
    "fingerprint_scopes",
    "short_fingerprint",
]

#: Every fingerprint starts with this (the definition's version).
FINGERPRINT_PREFIX = "fp16-sha256:"
#: Whole-synthesizer fingerprints start with this.
SYNTH_PREFIX = FINGERPRINT_PREFIX + "synth:"
#: ``"decoder"``: the decoder's weights; ``"synth"``: the synthesizer's, except ``enc_q``.
SCOPES = ("decoder", "synth")
_RENAME = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _normalise(key: str) -> str:
    for long, short in _RENAME.items():
        if key.endswith(long):
            return key[: -len(long)] + short
    return key


def fingerprint_scope(fp: str) -> str:
    """The scope a fingerprint was computed in: ``"synth"`` or ``"decoder"``."""
    return "synth" if fp.startswith(SYNTH_PREFIX) else "decoder"


def fingerprint_scopes(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> tuple[str, ...]:
    """The scopes that mean something for this model: both for an RVC synthesizer, ``("decoder",)`` otherwise."""
    keys = (
        (n for n, _ in model_or_state_dict.named_parameters())
        if isinstance(model_or_state_dict, nn.Module)
        else iter(model_or_state_dict)
    )
    has_dec = has_other = False
    for k in keys:
        if isinstance(k, str) and k.startswith("dec."):
            has_dec = True
        elif isinstance(k, str) and "enc_q" not in k:
            has_other = True
        if has_dec and has_other:
            return SCOPES
    return ("decoder",)


def _selected(state: Mapping[str, Tensor], scope: str = "decoder") -> dict:
    keys = [k for k in state if isinstance(k, str)]
    if scope == "synth":
        keys = [k for k in keys if "enc_q" not in k]
    elif any(k.startswith("dec.") for k in keys):
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


def base_fingerprint(model_or_state_dict: nn.Module | Mapping[str, Tensor], scope: str | None = None) -> str:
    """The fingerprint of a base model (see the module docstring), as ``"fp16-sha256:<hex>"`` (decoder scope)
    or ``"fp16-sha256:synth:<hex>"`` (``scope="synth"``).

    Accepts a module or a state dict (an RVC export's ``weight``, a checkpoint's ``model``, a
    generator's own). A model :func:`rvclora.inject_lora` adapted returns the fingerprint it
    recorded then (``scope=None``: the one its adapter records; else the one of that scope). A model
    with LoRA layers and no record (converted from PEFT, say) is fingerprinted from its state dict
    when none of them folded a weight_norm, else raises ``ValueError``.
    """
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"base_fingerprint: scope must be one of {SCOPES} or None, got {scope!r}")
    if isinstance(model_or_state_dict, nn.Module):
        recorded = getattr(model_or_state_dict, "rvclora_base_fingerprint", None)
        by_scope = getattr(model_or_state_dict, "rvclora_base_fingerprints", None) or {}
        if scope is not None and scope in by_scope:
            return by_scope[scope]
        if recorded is not None and (scope is None or fingerprint_scope(recorded) == scope):
            return recorded
        from .layers import LoRALayer

        if any(isinstance(m, LoRALayer) and m.weight_norm_kind is not None for m in model_or_state_dict.modules()):
            raise ValueError(
                "base_fingerprint: this model has LoRA layers with folded weight_norm and no recorded "
                "rvclora_base_fingerprint (it is recorded by inject_lora); fingerprint the base "
                "model or its exported file instead"
            )
        # LoRA layers without weight_norm keep the base weight, unmerged, under the base's own key
        state: Mapping[str, Tensor] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        kind = type(model_or_state_dict).__name__
        raise TypeError(f"base_fingerprint expects an nn.Module or a state dict, got {kind}")
    scope = scope or "decoder"
    tensors = _selected(state, scope)
    if not tensors:
        raise ValueError("base_fingerprint: the state dict holds no floating-point weights to fingerprint")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        half = t.to("cpu", torch.float16).contiguous()
        h.update(f"{name}:{tuple(half.shape)};".encode())
        h.update(half.view(torch.int16).numpy().tobytes())
    return (SYNTH_PREFIX if scope == "synth" else FINGERPRINT_PREFIX) + h.hexdigest()[:32]


def short_fingerprint(fp: str | None) -> str:
    """A fingerprint shortened for messages (``"fp16-sha256:1a2b3c4d5e6f"``), or ``"none"``."""
    if fp is None:
        return "none"
    return fp[: (len(SYNTH_PREFIX) if fp.startswith(SYNTH_PREFIX) else len(FINGERPRINT_PREFIX)) + 12]
