"""Model-level LoRA: injection (with weight_norm folding), trainability, merging, info."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn as nn

from .config import BIAS_MODES, LoRAConfig
from .layers import LORA_CLASSES, LoRALayer, check_no_foreign_weight_hooks
from .targets import target_matches

__all__ = [
    "inject_lora",
    "lora_modules",
    "planned_lora_shapes",
    "mark_only_lora_as_trainable",
    "get_lora_parameters",
    "count_lora_parameters",
    "randomize_lora_",
    "merge_lora_weights",
    "unmerge_lora_weights",
    "merged_state_dict",
    "print_lora_info",
    "target_matches",
    "saved_module_names",
    "saved_parameters",
    "canonical_saved_key",
]

_LORA_CLASS = {cls.base_class: cls for cls in LORA_CLASSES}
_BASE_NAMES = "/".join(base.__name__ for base in _LORA_CLASS)


def _base_kind(module: nn.Module) -> type | None:
    if isinstance(module, LoRALayer):
        return None
    for base in _LORA_CLASS:
        if isinstance(module, base):
            # A parametrized module's class is a generated subclass; any other subclass may have
            # its own forward, which a LoRA layer would silently drop.
            if type(module) is base or type(module).forward is base.forward:
                return base
            raise TypeError(
                f"inject_lora: {type(module).__name__} subclasses {base.__name__} with its own forward; "
                f"rvclora only adapts plain {' / '.join('nn.' + b.__name__ for b in _LORA_CLASS)}"
            )
    return None


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _check_not_wrapped(model: nn.Module) -> None:
    """DDP/DP/FSDP register the parameters they see when they wrap: factors added later are not synchronised."""
    for name, m in model.named_modules():
        kind = type(m).__name__
        if kind in _WRAPPERS and type(m).__module__.startswith("torch."):
            where = "the model" if not name else f"module {name!r}"
            raise ValueError(
                f"inject_lora: {where} is wrapped in {kind}, which registered its parameters when it "
                "wrapped them: the new LoRA factors would not be synchronised and the ranks would drift "
                "apart; inject into the bare model first, then wrap it"
            )


def _weight_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a layer's effective weight is made of (plain, legacy or parametrized weight_norm)."""
    out = {}
    for key in ("weight", "weight_g", "weight_v"):
        t = module._parameters.get(key)
        if t is not None:
            out[key] = t
    params = getattr(module, "parametrizations", None)
    if params is not None and "weight" in params:
        for key, t in params["weight"].named_parameters():
            out[f"parametrizations.weight.{key}"] = t
    return out


def _extent(t: torch.Tensor) -> tuple | None:
    """``(device, first byte, end byte)`` of the memory ``t`` reads; ``None`` where there is none (meta)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    return (t.device.type, t.device.index), start, start + span * t.element_size()


def _check_no_shared_weights(model: nn.Module, chosen: list[tuple[str, nn.Module, type]]) -> None:
    """Refuse a targeted layer whose weight is shared with (or overlaps) another module's parameter.

    Merging adds ΔW to the weight in place: a tied partner would silently change with it (or two
    targeted partners would get both updates on one tensor). One sweep over the parameters' memory
    ranges, sorted by start, finds every overlap.
    """
    mine = {f"{name}.{key}" for name, module, _ in chosen for key in _weight_tensors(module)}
    spans: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, module in model.named_modules():
        for key, t in module._parameters.items():
            ext = None if t is None else _extent(t)
            if ext is not None:
                spans.setdefault(ext[0], []).append((ext[1], ext[2], f"{name}.{key}" if name else key))
    for items in spans.values():
        items.sort()
        active: list[tuple[int, str]] = []  # (end, name) of the ranges still open at this start
        for lo, hi, name in items:
            active = [(end, other) for end, other in active if end > lo]
            for _, other in active:
                if name in mine or other in mine:
                    first, second = (other, name) if other in mine else (name, other)
                    raise ValueError(
                        f"inject_lora: {first!r} shares its memory with {second!r} (tied weights); merging would "
                        "add the update to both (or both updates to one tensor). Untie them (give one a copy: "
                        "nn.Parameter(w.detach().clone())) or leave one out of target_modules"
                    )
            active.append((hi, name))


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name under which each module is registered (a module assigned twice has two)."""
    names: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    return names


def planned_lora_shapes(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{layer: (lora_A shape, lora_B shape)}`` that :func:`inject_lora` would create, without creating them.

    Readers compare a file's factors with these before injecting, so a file never makes
    rvclora allocate factors it does not hold (a few KB declaring a rank of 8192 for every layer).
    """
    out = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, LoRALayer):
            continue
        base = _base_kind(module)
        if base is not None and any(target_matches(t, name) for t in config.target_modules):
            shape_a, shape_b = _LORA_CLASS[base].factor_shapes(module, config.r)
            out[name] = (tuple(shape_a), tuple(shape_b))
    return out


def inject_lora(model: nn.Module, config: LoRAConfig, freeze_base: bool = True) -> nn.Module:
    """Replace every matching Linear / Conv1d / ConvTranspose1d / Conv2d of ``model`` in place.

    weight_norm (legacy or parametrizations) on a replaced layer is folded into its weight
    exactly, so the injected model equals the original at step 0; the layer remembers the
    weight_norm kind and dim for :func:`merged_state_dict`. The base's fingerprint
    (:func:`rvclora.fingerprint.base_fingerprint`, taken before any layer is replaced) is
    recorded as ``model.rvclora_base_fingerprint``. A model is injected once: a second call
    raises ``ValueError`` (inject a fresh base with one config naming every target). With
    ``freeze_base`` (the default) only the LoRA factors, and the biases ``config.bias`` names,
    stay trainable.
    Returns ``model``.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"inject_lora: config must be a LoRAConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject_lora: model must be an nn.Module, got {type(model).__name__}")
    _check_not_wrapped(model)
    injected = [name for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    if injected or isinstance(getattr(model, "rvclora_config", None), LoRAConfig):
        raise ValueError(
            f"inject_lora: the model is already injected ({len(injected)} LoRA layers, e.g. "
            f"{injected[:3]}); inject a fresh copy of the base model, with one config covering every target"
        )
    chosen: list[tuple[str, nn.Module, type]] = []
    candidates: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        base = _base_kind(module)
        if base is None:
            continue
        candidates.append(name)
        if any(target_matches(t, name) for t in config.target_modules):
            check_no_foreign_weight_hooks(module, name)  # before any layer is replaced
            chosen.append((name, module, base))
    if not chosen:
        sample = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(
            f"inject_lora: target_modules={config.target_modules} match no {_BASE_NAMES} "
            f"module; adaptable modules are: {sample or 'none'}"
        )
    aliases = _aliases(model)
    for name, module, _ in chosen:
        names = aliases[id(module)]
        unselected = [n for n in names if not any(target_matches(t, n) for t in config.target_modules)]
        if len(names) > 1 and unselected:
            raise ValueError(
                f"inject_lora: the module {name!r} is also registered as {unselected[0]!r}, which "
                f"target_modules {config.target_modules} do not select; one module is one layer: "
                "select all of its names or none"
            )
    _check_no_shared_weights(model, chosen)
    saved = saved_module_names(model, config.modules_to_save, where="inject_lora")
    for name, _, _ in chosen:
        for s_name in saved:
            if _within(name, s_name) or _within(s_name, name):
                raise ValueError(
                    f"inject_lora: {name!r} is both a LoRA target (target_modules="
                    f"{config.target_modules}) and saved whole (modules_to_save {s_name!r}); "
                    "a module is either adapted or saved, not both"
                )
    from .fingerprint import base_fingerprint, fingerprint_scopes

    # before any layer is replaced: the weights as stored. Adapters reaching outside the decoder of an
    # RVC synthesizer record the whole-synthesizer fingerprint; decoder adapters the decoder's, as before.
    has_dec = any(n.startswith("dec.") for n, _ in model.named_parameters())
    touched = [n for n, _, _ in chosen] + saved
    scope = "synth" if has_dec and any(not n.startswith("dec.") for n in touched) else "decoder"
    if any(p.is_meta for p in model.parameters()):  # no weights to fingerprint (sizing a model on "meta")
        fingerprints, fingerprint = {}, None
    else:
        fingerprints = {sc: base_fingerprint(model, scope=sc) for sc in fingerprint_scopes(model)}
        fingerprint = fingerprints[scope]
    # every new layer is built before any is put in place: a refusal leaves the model as it was
    new_layers = [
        (
            module,
            _LORA_CLASS[base].from_base(
                module,
                r=config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                merge_weights=config.merge_weights,
            ),
        )
        for _, module, base in chosen
    ]
    for module, new in new_layers:
        for alias in aliases[id(module)]:  # a module registered under several names stays one (LoRA) layer
            parent_name, _, child = alias.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    model.rvclora_config = config
    model.rvclora_base_fingerprint = fingerprint
    model.rvclora_base_fingerprints = fingerprints
    if freeze_base:
        mark_only_lora_as_trainable(model, config.bias, config.modules_to_save)
    return model


def _within(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def saved_module_names(model: nn.Module, patterns: list[str], where: str = "modules_to_save") -> list[str]:
    """The modules ``patterns`` (a config's ``modules_to_save``) select: the outermost matches, in model order.

    Like ``target_modules``, an entry may match nothing in a given model (``enc_p.emb_pitch`` in a no-f0
    model), but the entries together must select at least one module with parameters (``ValueError``
    otherwise).
    """
    if not patterns:
        return []
    names: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_within(name, n) for n in names):
            continue
        matched = [t for t in patterns if target_matches(t, name)]
        if matched and any(True for _ in module.parameters()):
            if isinstance(module, LoRALayer) or any(isinstance(m, LoRALayer) for m in module.modules()):
                raise ValueError(f"{where}: {name!r} holds LoRA layers; a module is either adapted or saved whole")
            names.append(name)
    if not names:
        raise ValueError(f"{where}: modules_to_save={list(patterns)} match no module with parameters")
    return names


_WN_CANONICAL = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def canonical_saved_key(key: str) -> str:
    """A saved module's parameter name in RVC's file form: ``parametrizations.weight.original0/1`` → ``weight_g/v``."""
    for long, short in _WN_CANONICAL.items():
        if key.endswith("." + long):
            return key[: -len(long)] + short
    return key


def saved_parameters(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Parameter]:
    """``{canonical key: parameter}`` of the modules ``patterns`` saves (default: the injected config's)."""
    if patterns is None:
        cfg = getattr(model, "rvclora_config", None)
        patterns = cfg.modules_to_save if isinstance(cfg, LoRAConfig) else []
    out: dict[str, nn.Parameter] = {}
    for name in saved_module_names(model, patterns):
        for pname, p in model.get_submodule(name).named_parameters():
            out[canonical_saved_key(f"{name}.{pname}")] = p
    return out


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(qualified name, layer)`` for every LoRA layer of ``model`` (``r > 0`` or not)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def mark_only_lora_as_trainable(
    model: nn.Module, bias: str = "none", modules_to_save: list[str] | None = None
) -> nn.Module:
    """Freeze everything but ``lora_A``/``lora_B``; ``bias`` ∈ ``none|all|lora_only`` keeps those biases trainable,
    and every parameter of the ``modules_to_save`` modules (default: those of the config
    :func:`inject_lora` recorded) stays trainable."""
    if bias not in BIAS_MODES:
        raise ValueError(f"mark_only_lora_as_trainable: bias must be one of {BIAS_MODES}, got {bias!r}")
    keep = {id(p) for p in saved_parameters(model, modules_to_save).values()}
    for name, p in model.named_parameters():
        leaf = name.rpartition(".")[2]
        p.requires_grad_(leaf in ("lora_A", "lora_B") or (bias == "all" and leaf == "bias") or id(p) in keep)
    if bias == "lora_only":
        for _, m in lora_modules(model):
            if m.r > 0 and getattr(m, "bias", None) is not None:
                m.bias.requires_grad_(True)
    return model


def get_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every ``lora_A`` and ``lora_B`` parameter of ``model``."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2] in ("lora_A", "lora_B")]


def count_lora_parameters(model: nn.Module) -> int:
    """Number of elements in the LoRA factors of ``model``."""
    return sum(p.numel() for p in get_lora_parameters(model))


def randomize_lora_(model: nn.Module, relative_norm: float, seed: int) -> nn.Module:
    """Set every LoRA factor of ``model`` at random (seeded) so that ``‖ΔW‖ = relative_norm · ‖W‖`` per layer.

    For demos and tests that need a known, non-zero update (a fresh layer's ``B = 0`` gives none).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_modules(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
            scale = (relative_norm * layer.weight.norm() / layer.get_delta_weight().norm()).sqrt()
            layer.lora_A.mul_(scale)
            layer.lora_B.mul_(scale)
    return model


def merge_lora_weights(model: nn.Module, safe_merge: bool = True) -> nn.Module:
    """Fold ΔW into every LoRA layer's weight (exactly reversible with :func:`unmerge_lora_weights`).

    With ``safe_merge`` (the default) every merged weight is computed and checked first: if
    any is not finite in the weight's dtype, ``ValueError`` names the first such layer and
    nothing is merged.
    """
    if safe_merge:
        from .io import first_nonfinite

        with torch.no_grad():
            for name, m in lora_modules(model):
                if m.r > 0 and not m.merged:
                    bad = first_nonfinite([(name + ".weight", m.weight + m.get_delta_weight().to(m.weight.dtype))])
                    if bad is not None:
                        raise ValueError(
                            f"merge_lora_weights: merged {bad[0]!r} would not be finite ({bad[1]}); nothing was merged"
                        )
    for _, m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Restore every merged LoRA layer's original weight, bit for bit."""
    for _, m in lora_modules(model):
        m.unmerge()
    return model


def merged_state_dict(model: nn.Module, safe_merge: bool = True) -> OrderedDict[str, torch.Tensor]:
    """``model``'s state dict with ΔW merged into each base weight and the LoRA keys removed.

    Each adapted weight is re-expressed in its layer's original weight_norm form
    (legacy: ``weight_g``/``weight_v``; parametrizations: ``parametrizations.weight.original0/1``;
    with ``v = W_merged`` and ``g = ‖W_merged‖`` over every dim but the weight_norm dim), so the
    result loads strictly into a fresh, un-injected model of the original class. The model is
    not changed. With ``safe_merge`` (the default) a result that is not finite in its dtype
    raises ``ValueError`` naming the first such key.
    """
    state = model.state_dict()
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALayer)}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is None:
            out[key] = value
            continue
        if leaf in ("lora_A", "lora_B"):
            continue
        if leaf != "weight":
            out[key] = value
            continue
        with torch.no_grad():
            w = value.clone()
            if layer.r > 0:
                w += layer.get_delta_weight().to(w.dtype)
        prefix = owner + "." if owner else ""
        if layer.weight_norm_kind is None:
            out[key] = w
        else:
            g = torch.norm_except_dim(w, 2, layer.weight_norm_dim)
            if layer.weight_norm_kind == "legacy":
                out[prefix + "weight_g"], out[prefix + "weight_v"] = g, w
            else:
                out[prefix + "parametrizations.weight.original0"] = g
                out[prefix + "parametrizations.weight.original1"] = w
    if safe_merge:
        from .io import first_nonfinite

        bad = first_nonfinite(out.items())
        if bad is not None:
            raise ValueError(f"merged_state_dict: merged {bad[0]!r} is not finite ({bad[1]})")
    return out


def _kind(m: LoRALayer) -> str:
    return m.spec.base


def lora_summary(model: nn.Module) -> list[dict[str, object]]:
    """One row per LoRA layer: name, kind, weight/A/B shapes, rank, LoRA params, merged, weight_norm."""
    rows = []
    for name, m in lora_modules(model):
        rows.append(
            {
                "layer": name,
                "kind": _kind(m),
                "weight": tuple(m.weight.shape),
                "lora_A": tuple(m.lora_A.shape) if m.r else None,
                "lora_B": tuple(m.lora_B.shape) if m.r else None,
                "r": m.r,
                "lora_params": (m.lora_A.numel() + m.lora_B.numel()) if m.r else 0,
                "merged": m.merged,
                "weight_norm": m.weight_norm_kind or "-",
            }
        )
    return rows


def print_lora_info(model: nn.Module, file=None) -> str:
    """Print (and return) a table of every LoRA layer and the parameter totals."""
    rows = lora_summary(model)
    header = ("layer", "kind", "weight", "lora_A", "lora_B", "r", "lora_params", "merged", "weight_norm")
    table = [header] + [tuple("-" if r[h] is None else str(r[h]) for h in header) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(p.numel() for p in model.parameters())
    lora = count_lora_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append("")
    lines.append(
        f"LoRA layers: {len(rows)}   LoRA parameters: {lora:,}   trainable: {trainable:,}   "
        f"all parameters: {total:,}   LoRA share: {100.0 * lora / max(total, 1):.2f} %"
    )
    text = "\n".join(lines)
    print(text, file=file)
    return text
