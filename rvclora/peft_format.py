"""PEFT's on-disk adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`export_peft_adapter` writes what ``PeftModel.save_pretrained`` writes for a LoRA adapter
on the same base model, so ``PeftModel.from_pretrained(base_model, directory)`` loads it;
:func:`import_peft_adapter` reads such a directory into an rvclora-injected model. PEFT itself
is not needed for either.

Keys are ``base_model.model.<module name>.lora_A.weight`` / ``.lora_B.weight`` (PEFT drops the
adapter name on save). PEFT's tensors are the weights of its ``lora_A`` / ``lora_B`` modules:

=================  ============================  ====================================
layer              PEFT ``lora_A.weight``         PEFT ``lora_B.weight``
=================  ============================  ====================================
Linear             ``(r, in)``  (= rvclora's)     ``(out, r)`` (= rvclora's)
Conv1d             ``(r, in, k)``: a full conv     ``(out, r/g, 1)``: grouped 1×1 conv
                   with the base's kernel size,
                   stride and padding, groups=1
=================  ============================  ====================================

For a grouped Conv1d, rvclora's per-group ``A`` becomes PEFT's full ``A`` with zero blocks
off the diagonal. PEFT's ``lora_A`` convolution has no dilation and pads with zeros, so a
Conv1d with dilation > 1 (or a non-zero padding mode) has no PEFT equivalent, and PEFT has no
LoRA layer for ConvTranspose1d at all: both raise a ``ValueError`` naming the layer.
Per-layer ranks and alphas go to ``rank_pattern`` / ``alpha_pattern``; PEFT has one dropout per
adapter, so every exported layer must share it.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Union

import torch
import torch.nn as nn

from .checkpoint import atomic_write
from .inject import lora_modules
from .layers import LoRAConv1d, LoRAConvTranspose1d, LoRALayer, LoRALinear

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_peft_adapter", "import_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
PathLike = Union[str, "os.PathLike[str]"]


def _exportable(name: str, m: LoRALayer) -> None:
    if isinstance(m, LoRAConvTranspose1d):
        raise ValueError(
            f"export_peft_adapter: layer {name!r} is a ConvTranspose1d; PEFT has no LoRA layer for "
            "nn.ConvTranspose1d, so this adapter cannot be written in PEFT's format "
            "(save it with rvclora.save_lora_checkpoint instead)"
        )
    if isinstance(m, LoRAConv1d):
        if m.dilation[0] != 1:
            raise ValueError(
                f"export_peft_adapter: Conv1d {name!r} has dilation={m.dilation[0]}; PEFT's Conv1d LoRA "
                "convolves lora_A without dilation, so it cannot express this layer's adapter"
            )
        if m.padding_mode != "zeros" and m.padding not in ("valid", (0,)):
            raise ValueError(
                f"export_peft_adapter: Conv1d {name!r} has padding_mode={m.padding_mode!r}; PEFT's Conv1d "
                "LoRA pads lora_A's input with zeros, so it cannot express this layer's adapter"
            )
    elif not isinstance(m, LoRALinear):
        raise ValueError(
            f"export_peft_adapter: layer {name!r} is a {type(m).__name__}; PEFT supports "
            "Linear and Conv1d LoRA layers only"
        )


def _peft_tensors(m: LoRALayer) -> tuple[torch.Tensor, torch.Tensor]:
    """rvclora factors → PEFT's ``lora_A.weight``, ``lora_B.weight`` (exact)."""
    A, B = m.lora_A.detach(), m.lora_B.detach()
    if isinstance(m, LoRALinear):
        return A, B
    g, k, r = m.groups, m.kernel_size[0], m.r
    cin_g = m.in_channels // g
    full = A.new_zeros(g, r // g, g, cin_g, k)
    full[torch.arange(g), :, torch.arange(g)] = A.reshape(g, r // g, cin_g, k)
    return full.reshape(r, m.in_channels, k), B.unsqueeze(-1)


def _rvclora_tensors(name: str, m: LoRALayer, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A.weight``, ``lora_B.weight`` → rvclora factors (exact, or a ``ValueError``)."""
    if isinstance(m, LoRALinear):
        want_a, want_b = tuple(m.lora_A.shape), tuple(m.lora_B.shape)
    elif isinstance(m, LoRAConv1d):
        want_a, want_b = (m.r, m.in_channels, m.kernel_size[0]), (m.out_channels, m.r // m.groups, 1)
    else:
        raise ValueError(
            f"import_peft_adapter: layer {name!r} is a {type(m).__name__}; PEFT adapters hold "
            "Linear and Conv1d LoRA layers only"
        )
    if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
        raise ValueError(
            f"import_peft_adapter: layer {name!r}: the adapter has lora_A {tuple(A.shape)} and lora_B "
            f"{tuple(B.shape)}, the model's layer expects {want_a} and {want_b} (same r and layer sizes?)"
        )
    if isinstance(m, LoRALinear):
        return A, B
    g, r, k = m.groups, m.r, m.kernel_size[0]
    cin_g = m.in_channels // g
    blocks = A.reshape(g, r // g, g, cin_g, k)
    eye = torch.eye(g, dtype=torch.bool)
    if blocks.masked_select(~eye[:, None, :, None, None].expand_as(blocks)).any():
        raise ValueError(
            f"import_peft_adapter: Conv1d {name!r} (groups={g}): the adapter's lora_A reads input channels of "
            "other groups, which a LoRA of a grouped convolution cannot express"
        )
    return blocks[torch.arange(g), :, torch.arange(g)].reshape(r, cin_g * k), B.squeeze(-1)


def export_peft_adapter(model: nn.Module, directory: PathLike) -> None:
    """Write ``model``'s LoRA adapter to ``directory`` in PEFT's format (config + safetensors).

    Every LoRA layer with ``r > 0`` must be a Linear or a Conv1d PEFT can express (see the module
    docstring), all with the same dropout, and no bias may be trained (``bias="none"``). The files
    are written atomically; ``directory`` is created if needed.
    """
    from safetensors.torch import save_file

    layers = [(n, m) for n, m in lora_modules(model) if m.r > 0]
    if not layers:
        raise ValueError("export_peft_adapter: model has no LoRA layer with r > 0 (was inject_lora called?)")
    saved = getattr(getattr(model, "rvclora_config", None), "modules_to_save", None)
    if saved:
        raise ValueError(
            f"export_peft_adapter: the adapter saves modules whole (modules_to_save={saved}); rvclora "
            "exports LoRA factors only, so a whole-voice adapter has no PEFT form here (use rvclora's "
            "adapter file, or merge it)"
        )
    for name, m in layers:
        _exportable(name, m)
    dropouts = {m.lora_dropout for _, m in layers}
    if len(dropouts) != 1:
        raise ValueError(
            f"export_peft_adapter: the layers use the dropouts {sorted(dropouts)}; a PEFT adapter "
            "has one lora_dropout for all of them"
        )
    cfg = getattr(model, "rvclora_config", None)
    bias = getattr(cfg, "bias", "none")
    if bias != "none":
        raise ValueError(
            f"export_peft_adapter: the model trains biases (bias={bias!r}); rvclora exports "
            "LoRA factors only, so export with bias='none' to lose nothing"
        )
    names = [n for n, _ in layers]
    first = layers[0][1]
    ranks = {n: m.r for n, m in layers}
    # PEFT's scaling is lora_alpha / r; a converted rsLoRA layer's alpha is re-expressed that way
    alphas = {n: m.lora_alpha if m.lora_alpha / m.r == m.scaling else m.scaling * m.r for n, m in layers}
    # PEFT resolves a pattern key by the first key matching "(.*\.)?(key)$": longer names first, so
    # every layer finds its own entry
    ordered = sorted(names, key=lambda n: -n.count("."))
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": alphas[names[0]],
        "lora_dropout": first.lora_dropout,
        # a regular expression PEFT full-matches against module names: exactly the exported layers
        "target_modules": "|".join(re.escape(n) for n in names),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(n): ranks[n] for n in ordered if ranks[n] != first.r},
        "alpha_pattern": {re.escape(n): alphas[n] for n in ordered if alphas[n] != alphas[names[0]]},
    }
    try:
        import peft

        config["peft_version"] = peft.__version__
    except ImportError:
        pass
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers:
        a, b = _peft_tensors(m)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.to("cpu", copy=True).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.to("cpu", copy=True).contiguous()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_config(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    atomic_write(os.path.join(directory, CONFIG_NAME), write_config)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule (``get_pattern_key``): the first key matching ``(.*\\.)?(key)$``.

    The keys come from a downloaded file: they run on rvclora's linear-time engine
    (:func:`rvclora.targets.compile_regex`), never on backtracking ``re``.
    """
    from .targets import compile_regex

    if not isinstance(patterns, dict):
        raise ValueError(f"import_peft_adapter: rank_pattern/alpha_pattern must be a dict, got {patterns!r:.80}")
    for key, value in patterns.items():
        try:
            match = compile_regex(rf"(.*\.)?({key})")
        except ValueError as e:
            raise ValueError(f"import_peft_adapter: {CONFIG_NAME} pattern {key!r:.80}: {e}") from None
        if match(name):
            return value
    return default


def import_peft_adapter(model: nn.Module, directory: PathLike) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model``, an rvclora-injected model of the same base.

    Every adapter key must name a LoRA layer of ``model`` whose rank and alpha equal the
    adapter's for that layer, and every LoRA layer of ``model`` must get its factors; otherwise a
    ``KeyError``/``ValueError`` names the layer. Adapters PEFT built with rsLoRA, DoRA, LoRA
    biases, trained biases or ``modules_to_save`` raise a ``ValueError``. Returns ``model``.
    """
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(
            f"import_peft_adapter: {os.path.join(directory, CONFIG_NAME)!r} is not valid JSON "
            f"({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(f"import_peft_adapter: {CONFIG_NAME} holds a {type(config).__name__}, expected a dict")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"import_peft_adapter: {CONFIG_NAME} has peft_type={config.get('peft_type')!r}, expected 'LORA'"
        )
    for key, plain in (
        ("use_rslora", False),
        ("use_dora", False),
        ("lora_bias", False),
        ("bias", "none"),
        ("modules_to_save", None),
        ("fan_in_fan_out", False),
    ):
        if config.get(key, plain) not in (plain, [] if plain is None else plain):
            raise ValueError(
                f"import_peft_adapter: {CONFIG_NAME} has {key}={config[key]!r}; rvclora imports "
                f"plain LoRA factors only ({key}={plain!r})"
            )
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.fullmatch(re.escape(_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", key)
        if m is None:
            raise KeyError(
                f"import_peft_adapter: unexpected key {key!r} in {WEIGHTS_NAME}; expected "
                f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'"
            )
        factors.setdefault(m.group(1), {})[m.group(2)] = value
    layers = dict(lora_modules(model))
    missing = sorted(n for n, layer in layers.items() if layer.r > 0 and n not in factors)
    if missing:
        raise KeyError(f"import_peft_adapter: the adapter has no factors for the model's LoRA layers {missing}")
    loaded = []
    for name, pair in factors.items():
        layer = layers.get(name)
        if layer is None or layer.r == 0:
            raise KeyError(
                f"import_peft_adapter: the adapter adapts {name!r}, which is not a LoRA layer of the "
                "model (were the same target_modules injected?)"
            )
        if set(pair) != {"lora_A", "lora_B"}:
            raise KeyError(f"import_peft_adapter: {name!r} has only {sorted(pair)} in {WEIGHTS_NAME}")
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        if r != layer.r or not math.isclose(alpha / r, layer.scaling, rel_tol=1e-12):
            raise ValueError(
                f"import_peft_adapter: layer {name!r} has r={layer.r}, scaling={layer.scaling}; the "
                f"adapter has r={r}, lora_alpha={alpha} (scaling {alpha / r})"
            )
        loaded.append((layer, *_rvclora_tensors(name, layer, pair["lora_A"], pair["lora_B"])))
    for layer, a, b in loaded:
        was_merged = layer.merged
        layer.unmerge()
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        if was_merged:
            layer.merge()
    return model
