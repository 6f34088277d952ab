"""Coming from PEFT or loralib: :func:`convert` swaps their LoRA layers for rvclora's, exactly.

Every supported layer is replaced in place by the rvclora layer of its kind that computes the
same function: same base weight and bias (shared, not copied), the adapter's factors rearranged
into rvclora's layout (:mod:`rvclora.reference`), the same scaling, dropout probability and
training mode. A layout that rvclora cannot express at the same rank is expressed exactly at a
higher rank; one it cannot express exactly at all raises a ``ValueError`` that says why. Nothing
is ever approximated.

=========================================  ==================================================
source layer                               rvclora layer
=========================================  ==================================================
PEFT ``lora.Linear`` over ``nn.Linear``    :class:`LoRALinear`; ``A``, ``B`` as they are
PEFT ``lora.Conv1d`` over ``nn.Conv1d``    :class:`LoRAConv1d`; ``A: (r, in, k)`` flattened
                                           (its block diagonal for ``groups > 1``),
                                           ``B: (out, r/g, 1)`` squeezed
loralib ``Linear``                         :class:`LoRALinear` (``fan_in_fan_out`` weights are
                                           transposed into a new ``(out, in)`` weight)
loralib ``Conv1d`` (``ConvLoRA``), k = 1   :class:`LoRAConv1d`; rank ``r`` (``groups == 1``),
                                           ``groups²·r`` for grouped convolutions
=========================================  ==================================================

PEFT and loralib are optional: a model without their layers converts (to itself) without them.
The on-disk PEFT adapter format lives in :mod:`rvclora.peft_format` and is re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn

from .config import LoRAConfig
from .inject import lora_modules
from .layers import LoRAConv1d, LoRALayer, LoRALinear
from .peft_format import export_peft_adapter, import_peft_adapter

__all__ = ["convert", "export_peft_adapter", "import_peft_adapter"]


def _peft_classes() -> dict | None:
    try:
        from peft import PeftModel
        from peft.tuners.lora import layer as peft_lora
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return None
    return {
        "PeftModel": PeftModel,
        "BaseTuner": BaseTuner,
        "LoraLayer": peft_lora.LoraLayer,
        "Linear": peft_lora.Linear,
        "Conv1d": peft_lora.Conv1d,
    }


def _loralib_classes() -> dict | None:
    try:
        import loralib
    except ImportError:
        return None
    return {"LoRALayer": loralib.LoRALayer, "Linear": loralib.Linear, "Conv1d": loralib.Conv1d}


def _set_factors(layer: LoRALayer, lora_A: torch.Tensor, lora_B: torch.Tensor, requires_grad: bool) -> None:
    """Install exact factor values, keeping the source's dtype, device and trainability."""
    if tuple(lora_A.shape) != tuple(layer.lora_A.shape) or tuple(lora_B.shape) != tuple(layer.lora_B.shape):
        raise AssertionError(  # a bug in this module, not a user error
            f"factor shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)} do not fit {type(layer).__name__} "
            f"({tuple(layer.lora_A.shape)}, {tuple(layer.lora_B.shape)})"
        )
    layer.lora_A = nn.Parameter(lora_A.detach().clone().contiguous(), requires_grad=requires_grad)
    layer.lora_B = nn.Parameter(lora_B.detach().clone().contiguous(), requires_grad=requires_grad)


def _block_diagonal_conv_A(name: str, a3: torch.Tensor, groups: int, what: str) -> torch.Tensor:
    """``a3: (r, in, k)`` acting on every input channel → rvclora's ``(r, in/g·k)`` per-group rows.

    Exact only when row block ``j`` (feeding output group ``j·g/r``) reads no input channel
    outside its own group; otherwise the adapter mixes groups, which no LoRA of a grouped
    convolution can do.
    """
    r, cin, k = a3.shape
    if groups == 1:
        return a3.reshape(r, cin * k)
    blocks = a3.reshape(groups, r // groups, groups, cin // groups, k)
    eye = torch.eye(groups, dtype=torch.bool, device=a3.device)
    off_diagonal = blocks.masked_select(~eye[:, None, :, None, None].expand_as(blocks))
    if off_diagonal.any():
        raise ValueError(
            f"convert: {what} layer {name!r}: its lora_A reads input channels of other groups "
            f"(groups={groups}), so the adapter is not a LoRA of the grouped convolution; "
            "it cannot be converted exactly"
        )
    diag = blocks[torch.arange(groups), :, torch.arange(groups)]  # (g, r/g, in/g, k)
    return diag.reshape(r, (cin // groups) * k)


# --------------------------------------------------------------------------- PEFT


def _peft_adapter(name: str, m: nn.Module) -> str:
    adapters = list(m.lora_A.keys())
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or adapters != active:
        raise ValueError(
            f"convert: PEFT layer {name!r} has adapters {adapters} with active {list(m.active_adapters)}; "
            "rvclora layers hold exactly one adapter: delete the others (delete_adapter) or merge them first"
        )
    a = active[0]
    if m.disable_adapters:
        raise ValueError(f"convert: PEFT layer {name!r} has its adapters disabled; enable them or drop the adapter")
    if m.merged:
        raise ValueError(f"convert: PEFT layer {name!r} is merged; call unmerge_adapter() before converting")
    if m.lora_variant.get(a) is not None or m.use_dora.get(a):
        raise ValueError(
            f"convert: PEFT layer {name!r} uses the LoRA variant {type(m.lora_variant.get(a)).__name__} "
            f"(use_dora={m.use_dora.get(a)}); rvclora converts plain LoRA only"
        )
    if m.lora_bias.get(a):
        raise ValueError(f"convert: PEFT layer {name!r} has lora_bias=True; rvclora layers have no LoRA bias")
    return a


def _dropout_p(name: str, dropout: nn.Module) -> float:
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    raise ValueError(f"convert: layer {name!r} has LoRA dropout {type(dropout).__name__}; expected nn.Dropout")


def _convert_peft(name: str, m: nn.Module, peft: dict) -> LoRALayer:
    a = _peft_adapter(name, m)
    base = m.get_base_layer()
    r, scaling = m.r[a], m.scaling[a]
    lora_alpha = m.lora_alpha[a] if not m.use_rslora.get(a) else scaling * r
    p = _dropout_p(name, m.lora_dropout[a])
    wa, wb = m.lora_A[a].weight, m.lora_B[a].weight
    if isinstance(m, peft["Linear"]):
        if type(base) is not nn.Linear and type(base).forward is not nn.Linear.forward:
            raise ValueError(f"convert: PEFT Linear {name!r} wraps a {type(base).__name__}, expected nn.Linear")
        new = LoRALinear.from_base(base, r=r, lora_alpha=lora_alpha, lora_dropout=p)
        A, B = wa, wb
    else:
        if not isinstance(base, nn.Conv1d):
            raise ValueError(f"convert: PEFT Conv1d {name!r} wraps a {type(base).__name__}, expected nn.Conv1d")
        conv_a, conv_b = m.lora_A[a], m.lora_B[a]
        # PEFT builds lora_A with only the base's kernel size, stride and padding
        mismatch = [
            f"{attr}={getattr(conv_a, attr)!r} (base: {getattr(base, attr)!r})"
            for attr in ("kernel_size", "stride", "padding", "dilation")
            if getattr(conv_a, attr) != getattr(base, attr)
        ]
        if base.padding_mode != conv_a.padding_mode and base.padding not in ("valid", (0,)):
            mismatch.append(f"padding_mode={conv_a.padding_mode!r} (base: {base.padding_mode!r})")
        if mismatch:
            raise ValueError(
                f"convert: PEFT Conv1d {name!r}: its lora_A convolution differs from the base layer in "
                f"{', '.join(mismatch)}, so the adapter is not a LoRA of this layer (PEFT gives lora_A no "
                "dilation or padding mode); it cannot be converted exactly"
            )
        if conv_a.groups != 1 or conv_b.kernel_size != (1,) or conv_b.groups != base.groups:
            raise ValueError(f"convert: PEFT Conv1d {name!r} has an unexpected lora_A/lora_B layout")
        new = LoRAConv1d.from_base(base, r=r, lora_alpha=lora_alpha, lora_dropout=p)
        A = _block_diagonal_conv_A(name, wa, base.groups, "PEFT Conv1d")
        B = wb.squeeze(-1)
    new.scaling = scaling  # bit-identical to the source (rsLoRA's alpha/sqrt(r) included)
    _set_factors(new, A, B, wa.requires_grad)
    return new.train(m.training)


# --------------------------------------------------------------------------- loralib


def _plain_linear(m: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``m``'s weight and bias (a loralib layer carries its own attributes)."""
    plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    if getattr(m, "fan_in_fan_out", False):
        # loralib keeps such weights as (in, out); rvclora layers are nn.Linear: (out, in)
        plain.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=m.weight.requires_grad)
    else:
        plain.weight = m.weight
    plain.bias = m.bias
    return plain


def _convert_loralib(name: str, m: nn.Module, lib: dict) -> LoRALayer:
    was_training = m.training
    m.train(True)  # loralib's own unmerge, should eval() have folded ΔW into the weight
    if isinstance(m, lib["Linear"]):
        if m.r == 0:
            return LoRALinear.from_base(_plain_linear(m), r=0).train(was_training)
        p = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
        new = LoRALinear.from_base(
            _plain_linear(m), r=m.r, lora_alpha=m.lora_alpha, lora_dropout=p, merge_weights=m.merge_weights
        )
        _set_factors(new, m.lora_A, m.lora_B, m.lora_A.requires_grad)
        new.scaling = m.scaling
        return new.train(was_training)
    conv = m.conv
    k, g = conv.kernel_size[0], conv.groups
    if m.r == 0:
        return LoRAConv1d.from_base(conv, r=0).train(was_training)
    if k != 1:
        raise ValueError(
            f"convert: loralib Conv1d {name!r} has kernel_size={k}: loralib's ConvLoRA sizes its factors for a "
            f"k×k kernel (lora_A {tuple(m.lora_A.shape)}, lora_B {tuple(m.lora_B.shape)}: ΔW has "
            f"{m.lora_B.shape[0] * m.lora_A.shape[1]} entries, the weight {conv.weight.numel()}), so the adapter "
            "does not define a ΔW of this layer (loralib's own forward fails on it); only kernel_size=1 converts"
        )
    r, cin, cout = m.r, conv.in_channels, conv.out_channels
    A, B = m.lora_A.detach(), m.lora_B.detach()  # (r, in), (out/g, r)
    if g == 1:
        rank, A_new, B_new = r, A, B
    else:
        # loralib views B·A: (out/g, in) as (out, in/g, 1), so ΔW[o, c] = Σⱼ B[o//g, j]·A[j, (o%g)·in/g + c]:
        # output o reads the (o % g)-th column block of A. Exact as a grouped LoRA with g·r ranks per group:
        # row (q, j) of every group's A' is A's q-th column block, B'[o, (q, j)] = B[o//g, j]·[q == o % g].
        cin_g = cin // g
        a_blocks = A.reshape(r, g, cin_g).permute(1, 0, 2).reshape(g * r, cin_g)  # rows (q, j)
        rank = g * g * r
        A_new = a_blocks.repeat(g, 1)  # the same rows in every group
        o = torch.arange(cout, device=B.device)
        B_new = B.new_zeros(cout, g, r)
        B_new[o, o % g] = B[o // g]
        B_new = B_new.reshape(cout, g * r)
    new = LoRAConv1d.from_base(
        conv, r=rank, lora_alpha=m.scaling * rank, lora_dropout=0.0, merge_weights=m.merge_weights
    )  # ConvLoRA applies no dropout
    _set_factors(new, A_new, B_new, m.lora_A.requires_grad)
    new.scaling = m.scaling
    return new.train(was_training)


# --------------------------------------------------------------------------- driver


def _unwrap_peft(model: nn.Module, peft: dict | None) -> nn.Module:
    """The user's model inside a ``PeftModel`` / ``LoraModel`` wrapper (or ``model`` itself)."""
    if peft is None:
        return model
    if isinstance(model, peft["PeftModel"]):
        model = model.base_model
    if isinstance(model, peft["BaseTuner"]):
        model = model.model
    return model


def _single_config(model: nn.Module, names: list[str]) -> LoRAConfig | None:
    layers = [m for n, m in lora_modules(model) if n in set(names) and m.r > 0]
    if not layers:
        return None
    keys = {(m.r, m.lora_alpha, m.lora_dropout, m.merge_weights) for m in layers}
    if len(keys) != 1:
        return None
    r, alpha, p, merge = keys.pop()
    return LoRAConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=p,
        merge_weights=merge,
        target_modules=["|".join(re.escape(n) for n in names)],
    )


def convert(model: nn.Module) -> nn.Module:
    """Replace every PEFT and loralib LoRA layer of ``model`` with the equivalent rvclora layer, in place.

    ``model`` may be a ``peft.PeftModel`` (then the model inside it is converted and returned), a
    plain module containing PEFT or loralib layers, or a single such layer (then its replacement is
    returned). Outputs are unchanged up to float rounding, in training and in eval mode. When every
    converted layer has the same rank, alpha, dropout and merge mode, the result carries a matching
    ``rvclora_config`` (for :func:`rvclora.save_lora_checkpoint`).

    Raises ``ValueError`` for adapters that have no exact rvclora equivalent (several adapters
    per layer, DoRA and other variants, LoRA biases, PEFT convolutions with dilation, group-mixing
    adapters, loralib Conv1d with ``kernel_size > 1``) and ``TypeError`` for LoRA layer kinds
    rvclora does not have (embeddings, 2-D/3-D convolutions, loralib ``MergedLinear``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    peft, lib = _peft_classes(), _loralib_classes()
    root = _unwrap_peft(model, peft)
    converters: list[tuple[tuple[type, ...], Callable[[str, nn.Module], LoRALayer]]] = []
    if peft is not None:
        converters.append(((peft["Linear"], peft["Conv1d"]), lambda n, m: _convert_peft(n, m, peft)))
    if lib is not None:
        converters.append(((lib["Linear"], lib["Conv1d"]), lambda n, m: _convert_loralib(n, m, lib)))
    foreign = tuple(c[k] for c, k in ((peft, "LoraLayer"), (lib, "LoRALayer")) if c is not None)

    replaced: dict[str, LoRALayer] = {}
    for kinds, fn in converters:
        if isinstance(root, kinds):
            return fn("<root>", root)
    for name, module in list(root.named_modules()):
        if any(name.startswith(done + ".") for done in replaced):
            continue  # inside a layer already converted (a PEFT layer's base_layer, lora_A, ...)
        for kinds, fn in converters:
            if isinstance(module, kinds):
                replaced[name] = fn(name, module)
                break
        else:
            if foreign and isinstance(module, foreign):
                raise TypeError(
                    f"convert: layer {name or '<root>'!r} is a {type(module).__module__}.{type(module).__name__}; "
                    "rvclora converts PEFT Linear/Conv1d and loralib Linear/Conv1d only"
                )
    for name, new in replaced.items():
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    if replaced:
        config = _single_config(root, list(replaced))
        if config is not None:
            root.rvclora_config = config
    return root
