"""Voice blending: mix LoRA adapters of one base model, exactly or at a chosen rank.

Adapters trained on the same base combine without approximation: per adapted layer the blend
with weights ``wᵢ`` is ``ΔW = Σ wᵢ·ΔWᵢ``, and since every ``ΔWᵢ = sᵢ·Lᵢ·Rᵢ`` is a product of its
two factors, concatenating the factors along the rank axis (scaling the left one by ``wᵢ·sᵢ``)
gives a LoRA of rank ``Σ rᵢ`` whose update is that sum exactly. With ``rank=R`` each layer's
blended ``ΔW`` is truncated to rank ``R`` by SVD instead (the best rank-``R`` approximation in the
Frobenius norm), and the relative error ``‖ΔW − ΔW_R‖ / ‖ΔW‖`` — the square root of the discarded
singular energy's share — is reported per layer.

Per group ``j`` of a layer with ``groups = g`` (rank ``r/g`` per group), the two factors are

* Linear, Conv1d and Conv2d: ``L = B[j]: (out/g, r/g)``, ``R = A[j]: (r/g, in/g·k)``;
* ConvTranspose1d: ``L = A[j]ᵀ: (in/g, r/g)``, ``R = B[j]: (r/g, out/g·k)``;

and ``ΔW[j] = s·L·R`` in the layout of :mod:`rvclora.reference`'s ``delta_weight_*`` functions (each kind's
:meth:`rvclora.ops.spec.OpSpec.factors`).
The result is an ordinary adapter (``lora_alpha = r``, so its scaling is 1, every ``wᵢ·sᵢ``
folded into the factors), usable everywhere an adapter is.

Weights may be negative and need not sum to 1. Biases that an adapter's bias mode trains, and the
tensors of its ``modules_to_save``, are stored whole (not as a difference from the base). They are
blended weighted against the base: ``T = base + Σ wᵢ·(Tᵢ − base) = Σ wᵢ·Tᵢ + (1 − Σ wᵢ)·base``, in
float64, exactly. When the weights sum to 1 the base drops out and no base is needed; otherwise
the base's tensors must be given (``base=``, a state dict in RVC's key form, as ``rvclora merge``
does), or the blend is refused. A weight-normed saved module blends its ``weight_g`` and
``weight_v`` each so (as RVC's model fusion does), which is not the blend of the effective weights.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .checkpoint import read_lora_file
from .config import LoRAConfig
from .io import RVCLoRAWarning
from .ops.spec import spec_of_kind
from .records import LayerRecord, layer_records, model_layer_records

__all__ = [
    "BlendError",
    "blend_adapters",
    "adapter_delta_weights",
    "layer_records",
    "model_layer_records",
    "parse_weighted",
]


class BlendError(ValueError):
    """Adapters that cannot be blended (different bases or layers, bad weights or rank)."""


def parse_weighted(text: str) -> tuple[str, float]:
    """``"PATH:WEIGHT"`` → ``(PATH, WEIGHT)``; a bare ``PATH`` means weight 1.

    Only the text after the last ``:`` is read as the weight, and only if it is a number, so
    paths containing ``:`` still work when they end in a weight (``C:/voices/a.safetensors:0.5``).
    Text after the last ``:`` that holds a path separator, or follows a drive letter, is part of
    the path (``C:\\missing.safetensors`` is then reported as not found).
    """
    if not isinstance(text, str) or not text:
        raise BlendError(f"an adapter must be given as PATH or PATH:WEIGHT, got {text!r}")
    path, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0
    if not path:
        raise BlendError(f"adapter {text!r}: the path before ':' is empty (expected PATH:WEIGHT)")
    try:
        w = float(tail)
    except ValueError:
        if os.path.exists(text) or any(c in tail for c in "/\\") or (len(path) == 1 and path.isalpha()):
            return text, 1.0  # a path holding ':' (C:\voices\a.safetensors): its reader says if it is missing
        raise BlendError(
            f"adapter {text!r}: the weight after ':' must be a number, got {tail!r} "
            "(expected PATH:WEIGHT, e.g. voice.safetensors:0.5)"
        ) from None
    if not math.isfinite(w):
        raise BlendError(f"adapter {text!r}: the weight must be a finite number, got {tail!r}")
    return path, w


# --------------------------------------------------------------------------- adapters


@dataclass
class _Source:
    label: str
    weights: dict[str, Tensor]
    config: LoRAConfig
    fingerprint: str | None
    records: dict[str, LayerRecord]


def _given_records(layers: Any) -> dict[str, LayerRecord] | None:
    """``layers=`` of :func:`blend_adapters`: ``None``, a model, or ``{name: {"kind", "groups"}}``."""
    if layers is None:
        return None
    if isinstance(layers, torch.nn.Module):
        layers = model_layer_records(layers)
    if not isinstance(layers, Mapping):
        raise BlendError(f"layers must be None, a model or {{name: {{'kind', 'groups'}}}}, got {type(layers).__name__}")
    from .validate import layer_records_of

    try:
        recs = layer_records_of("layers", {"layers": layers}, layers)
    except ValueError as e:
        raise BlendError(str(e)) from None
    return {name: LayerRecord(kind, groups) for name, (kind, groups) in (recs or {}).items()}


def _load(adapter: Any, index: int, given: dict[str, LayerRecord] | None = None) -> _Source:
    if isinstance(adapter, (str, os.PathLike)):
        data = read_lora_file(adapter)
        label = os.fspath(adapter)
    elif isinstance(adapter, Mapping) and "weights" in adapter and "config" in adapter:
        data = adapter
        meta = adapter.get("metadata")
        label = str(meta.get("name", f"adapter #{index}")) if isinstance(meta, Mapping) else f"adapter #{index}"
    else:
        raise BlendError(
            f"adapters[{index}] must be a path or an adapter read by read_lora_file, got {type(adapter).__name__}"
        )
    config = data["config"]
    if isinstance(config, Mapping):
        config = LoRAConfig.from_dict(dict(config))
    weights = dict(data["weights"])
    from .validate import check_adapter

    try:
        saved = check_adapter(label, weights, config, data.get("metadata"))
    except (TypeError, ValueError) as e:
        raise BlendError(str(e)) from None
    records = _records(label, weights, saved, given)
    return _Source(label, weights, config, data.get("base_fingerprint"), records)


def _records(
    label: str,
    weights: Mapping[str, Tensor],
    saved: dict[str, tuple[str, int]] | None,
    given: dict[str, LayerRecord] | None,
) -> dict[str, LayerRecord]:
    """Each layer's kind and groups: the file's layer records, else ``layers=``, else what the shapes tell for sure."""
    out: dict[str, LayerRecord] = {}
    for key in weights:
        if not key.endswith(".lora_A"):
            continue
        name = key[: -len(".lora_A")]
        if saved is not None:
            out[name] = LayerRecord(*saved[name])
            if given is not None and name in given and given[name] != out[name]:
                raise BlendError(
                    f"{label}: {name} is a {out[name]} in the file's layer records but a {given[name]} in layers="
                )
        elif given is not None:
            if name not in given:
                raise BlendError(f"{label}: layers= has no layer {name!r} (the file has no layer records)")
            out[name] = given[name]
        else:
            out[name] = _infer(label, name, weights[key], weights[f"{name}.lora_B"])
    if not out:
        raise BlendError(f"{label}: holds no LoRA factors (no '*.lora_A' keys)")
    return out


def _infer(label: str, name: str, A: Tensor, B: Tensor) -> LayerRecord:
    """Files without layer records: only a Linear/Conv1d's ``B: (out, r/g)`` tells its groups for sure.

    A ConvTranspose1d's ``B: (r, out/g·k)`` does not (neither does its ``A: (r, in/g)``), and
    a ``B`` that fits both kinds tells nothing: those are refused rather than guessed.
    """
    r = A.shape[0]
    if B.shape[0] == r:
        fits = (
            "fit both a Linear/Conv1d and a ConvTranspose1d"
            if r % B.shape[1] == 0
            else "are a ConvTranspose1d's, whose groups cannot be read off its factors"
        )
        raise BlendError(
            f"{label}: {name}'s factor shapes {tuple(A.shape)}, {tuple(B.shape)} {fits}, and the file has "
            "no layer records; re-save it with this rvclora, or pass layers= (the model, or "
            "{name: {'kind', 'groups'}}; rvclora mix --layers-from BASE.pth)"
        )
    return LayerRecord("conv1d", r // B.shape[1])  # Linear is Conv1d with k = 1, groups = 1: same maths


def _factors(rec: LayerRecord, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, R)``: ``(g, m, r/g)`` and ``(g, r/g, n)`` with ``ΔW[j] = s·L[j]·R[j]`` (the kind's spec's layout)."""
    r = A.shape[0]
    if r % rec.groups:
        raise BlendError(f"rank {r} is not a multiple of groups={rec.groups}")
    return spec_of_kind(rec.kind).factors(A, B, rec.groups)


def _unfactors(rec: LayerRecord, L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`_factors`: ``(lora_A, lora_B)``."""
    return spec_of_kind(rec.kind).unfactors(L, R)


def adapter_delta_weights(adapter: Any, layers: Any = None) -> dict[str, Tensor]:
    """``{layer name: ΔW}`` of an adapter (float64), each as the per-group matrices ``(g, m, n)``.

    ``layers`` as in :func:`blend_adapters`, for files without layer records.
    """
    src = _load(adapter, 0, _given_records(layers))
    out = {}
    for name, rec in src.records.items():
        L, R = _factors(rec, src.weights[f"{name}.lora_A"].double(), src.weights[f"{name}.lora_B"].double())
        out[name] = src.config.scaling * torch.bmm(L, R)
    return out


# --------------------------------------------------------------------------- blending


def _check_compatible(sources: Sequence[_Source], force: bool) -> None:
    first = sources[0]
    for src in sources[1:]:
        if set(src.records) != set(first.records):
            only_a = sorted(set(first.records) - set(src.records))[:3]
            only_b = sorted(set(src.records) - set(first.records))[:3]
            raise BlendError(
                f"{src.label} adapts other layers than {first.label} (only in the first: {only_a}; "
                f"only in the second: {only_b}); blended adapters must share their layer set"
            )
        for name, rec in first.records.items():
            if src.records[name] != rec:
                raise BlendError(f"{name} is a {rec} in {first.label} but a {src.records[name]} in {src.label}")
            L0, R0 = _factors(rec, first.weights[f"{name}.lora_A"], first.weights[f"{name}.lora_B"])
            L1, R1 = _factors(rec, src.weights[f"{name}.lora_A"], src.weights[f"{name}.lora_B"])
            if L0.shape[:2] != L1.shape[:2] or R0.shape[::2] != R1.shape[::2]:
                shape0, shape1 = tuple(L0.shape[:2]) + (R0.shape[2],), tuple(L1.shape[:2]) + (R1.shape[2],)
                raise BlendError(
                    f"{name}: {src.label} is for a layer of another shape than {first.label} "
                    f"(ΔW per group {shape1} vs {shape0})"
                )
        if src.config.bias != first.config.bias:
            raise BlendError(f"{src.label} trains biases {src.config.bias!r} but {first.label} {first.config.bias!r}")
        if sorted(src.config.modules_to_save) != sorted(first.config.modules_to_save):
            raise BlendError(
                f"{src.label} saves modules {src.config.modules_to_save} but {first.label} "
                f"{first.config.modules_to_save}; blended adapters must save the same modules"
            )
    prints = {s.fingerprint for s in sources}
    missing = [s.label for s in sources if s.fingerprint is None]
    known = prints - {None}
    if len(known) > 1:
        detail = ", ".join(f"{s.label}: {s.fingerprint}" for s in sources)
        if not force:
            raise BlendError(
                f"the adapters were trained on different base models ({detail}); a blend is only "
                "meaningful on one shared base (force=True / --force to blend anyway)"
            )
        warnings.warn(
            f"blending adapters of different base models ({detail}) because force=True", RVCLoRAWarning, stacklevel=3
        )
    if missing:
        warnings.warn(
            f"{', '.join(missing)}: no base fingerprint recorded (written by an older rvclora); "
            "cannot check that the adapters share a base",
            RVCLoRAWarning,
            stacklevel=3,
        )


def _check_rank(rank: Any, sources: Sequence[_Source]) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BlendError(f"rank must be None (exact blend) or an int >= 1, got {rank!r}")
    for name, rec in sources[0].records.items():
        L, R = _factors(rec, sources[0].weights[f"{name}.lora_A"], sources[0].weights[f"{name}.lora_B"])
        if rank % rec.groups:
            raise BlendError(f"rank={rank} is not a multiple of {name}'s groups={rec.groups}")
        most = min(L.shape[1], R.shape[2])
        if rank // rec.groups > most:
            raise BlendError(
                f"rank={rank} exceeds what {name} can hold (at most {most * rec.groups}: its ΔW is "
                f"{L.shape[1]}×{R.shape[2]} per group)"
            )


def _truncate(L: Tensor, R: Tensor, rg: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``rg`` factors of each ``L[j]·R[j]`` (QR of both factors, SVD of the small core).

    Returns the new ``(L, R)``, the discarded and the total singular energy (``Σσ²``)."""
    q1, r1 = torch.linalg.qr(L)  # (g, m, k), (g, k, k)
    q2, r2 = torch.linalg.qr(R.transpose(1, 2))  # (g, n, k), (g, k, k)
    u, s, vh = torch.linalg.svd(r1 @ r2.transpose(1, 2))
    energy = s.square()
    total = float(energy.sum())
    kept_n = min(rg, s.shape[-1])
    discarded = float(energy[:, kept_n:].sum())
    root = s[:, :kept_n].sqrt()
    new_L = (q1 @ u[:, :, :kept_n]) * root.unsqueeze(1)
    new_R = root.unsqueeze(2) * (vh[:, :kept_n, :] @ q2.transpose(1, 2))
    if kept_n < rg:  # the blend's exact rank is below R: pad with zero directions
        g, m, _ = new_L.shape
        new_L = torch.cat([new_L, new_L.new_zeros(g, m, rg - kept_n)], dim=2)
        new_R = torch.cat([new_R, new_R.new_zeros(g, rg - kept_n, new_R.shape[2])], dim=1)
    return new_L, new_R, discarded, total


def blend_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float],
    rank: int | None = None,
    *,
    force: bool = False,
    layers: Any = None,
    base: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Blend ``adapters`` (paths, or dicts from :func:`rvclora.checkpoint.read_lora_file`) with ``weights``.

    ``rank=None`` is exact: rank ``Σ rᵢ`` (adapters with weight 0 are left out). ``rank=R`` truncates
    each layer's blended ``ΔW`` by SVD; ``metadata["blend"]["errors"]`` then holds each layer's relative
    error. The adapters must share layer set, layer shapes, bias mode and base (their recorded base
    fingerprints; ``force=True`` blends different bases with a warning). Ranks and alphas may differ.
    Whole tensors (trained biases, ``modules_to_save``) blend as ``base + Σ wᵢ·(Tᵢ − base)``; ``base``
    (the base model's state dict, RVC's key form) is needed only when the weights do not sum to 1.

    Each layer's kind and groups come from the files' layer records. For files without them
    (format 1, or written without metadata), ``layers`` gives them: the model (base or
    injected) or ``{name: {"kind", "groups"}}``; without it only layers whose factors tell for
    sure (Linear, Conv1d) are accepted and any other is refused.

    The blend is computed in float64 (the concatenated factors re-factored by QR and SVD into
    balanced ones, so weights that nearly cancel lose nothing to the cast), then cast back to
    the first adapter's dtype: ``metadata["blend"]["cast_errors"]`` holds each layer's relative
    error ``‖ΔW_cast − ΔW‖ / ‖ΔW‖`` against the float64 blend, and a warning names the worst
    layer when it exceeds ``max(1e-3, 16·eps)`` of that dtype.

    Returns an adapter in :func:`read_lora_file`'s form (``weights``, ``config``, ``base_fingerprint``,
    ``metadata``), ready for :func:`rvclora.checkpoint.write_lora_file` or a merge.
    """
    if isinstance(adapters, (str, os.PathLike, Mapping)) or not isinstance(adapters, Sequence):
        raise BlendError(f"adapters must be a list of paths or adapters, got {type(adapters).__name__}")
    if len(adapters) == 0:
        raise BlendError("adapters is empty: give at least one adapter to blend")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(adapters):
        raise BlendError(f"weights must be a list of {len(adapters)} numbers (one per adapter), got {weights!r}")
    ws = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise BlendError(f"weights[{i}] must be a finite number, got {w!r}")
        ws.append(float(w))
    given = _given_records(layers)
    sources = [_load(a, i, given) for i, a in enumerate(adapters)]
    _check_compatible(sources, force)
    _check_rank(rank, sources)
    first = sources[0]
    bias_mode = first.config.bias
    whole_keys = [k for k in first.weights if not k.endswith((".lora_A", ".lora_B"))]
    for src in sources[1:]:
        if sorted(k for k in src.weights if not k.endswith((".lora_A", ".lora_B"))) != sorted(whole_keys):
            raise BlendError(f"{src.label} stores other whole tensors (biases, modules_to_save) than {first.label}")
        for k in whole_keys:
            if src.weights[k].shape != first.weights[k].shape:
                raise BlendError(
                    f"{k}: {tuple(src.weights[k].shape)} in {src.label} but "
                    f"{tuple(first.weights[k].shape)} in {first.label}"
                )
    sums_to_one = abs(sum(ws) - 1.0) <= 1e-6
    if whole_keys and not sums_to_one:
        what = (
            (f"modules {first.config.modules_to_save}" if first.config.modules_to_save else "")
            + (" and " if first.config.modules_to_save and bias_mode != "none" else "")
            + (f"biases (bias={bias_mode!r})" if bias_mode != "none" else "")
        )
        if base is None:
            raise BlendError(
                f"the adapters store {what} whole, and these weights sum to {sum(ws):g}, not 1: the blend "
                "base + sum w_i (T_i - base) needs the base model's tensors (pass base=, as rvclora "
                "merge does)"
            )
        missing = [k for k in whole_keys if k not in base]
        if missing:
            raise BlendError(f"base has no tensor {missing[0]!r} to blend the adapters' {what} against")
        for k in whole_keys:
            if tuple(base[k].shape) != tuple(first.weights[k].shape):
                raise BlendError(
                    f"base's {k!r} has shape {tuple(base[k].shape)}, the adapters' {tuple(first.weights[k].shape)}"
                )
    active = [(s, w) for s, w in zip(sources, ws) if w != 0.0] or [(first, 0.0)]

    out_w: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    cast_errors: dict[str, float] = {}
    for name, rec in first.records.items():
        dtype = first.weights[f"{name}.lora_A"].dtype
        Ls, Rs = [], []
        for src, w in active:
            L, R = _factors(rec, src.weights[f"{name}.lora_A"].double(), src.weights[f"{name}.lora_B"].double())
            Ls.append(L * (w * src.config.scaling))
            Rs.append(R)
        L, R = torch.cat(Ls, dim=2), torch.cat(Rs, dim=1)
        # re-factored in float64 even when exact: concatenated factors of weights that nearly cancel
        # would each round to dtype at their own (huge) scale and the cancellation would keep the error
        L, R, discarded, total = _truncate(L, R, (rank if rank is not None else L.shape[2] * rec.groups) // rec.groups)
        if rank is not None:
            errors[name] = math.sqrt(discarded / total) if total > 0 else 0.0
        A, B = _unfactors(rec, L, R)
        A, B = A.to(dtype), B.to(dtype)
        exact = torch.bmm(L, R)
        for what, t in (("update", exact), ("lora_A", A), ("lora_B", B)):
            if not bool(torch.isfinite(t).all()):
                raise BlendError(
                    f"{name}: the blended {what} is not finite in "
                    f"{str(t.dtype).replace('torch.', '')} (weights too large for these adapters?)"
                )
        Lc, Rc = _factors(rec, A.double(), B.double())
        norm = float(exact.norm())
        cast_errors[name] = float((torch.bmm(Lc, Rc) - exact).norm()) / norm if norm > 0 else 0.0
        out_w[f"{name}.lora_A"], out_w[f"{name}.lora_B"] = A, B
    if cast_errors:
        worst = max(cast_errors, key=cast_errors.get)
        limit = max(1e-3, 16 * torch.finfo(first.weights[f"{worst}.lora_A"].dtype).eps)
        if cast_errors[worst] > limit:
            warnings.warn(
                f"blend: casting the float64 blend back to "
                f"{str(first.weights[f'{worst}.lora_A'].dtype).replace('torch.', '')} changes {worst}'s "
                f"update by {cast_errors[worst]:.3g} (relative); metadata['blend']['cast_errors'] has every "
                "layer's",
                RVCLoRAWarning,
                stacklevel=2,
            )
    for key in whole_keys:  # biases and modules_to_save: base + sum w_i (T_i - base), exactly
        acc = sum(w * src.weights[key].double() for src, w in zip(sources, ws))
        if not sums_to_one:
            acc = acc + (1.0 - sum(ws)) * base[key].double()
        out_w[key] = acc.to(first.weights[key].dtype)

    total_rank = rank if rank is not None else sum(s.config.r for s, _ in active)
    config = LoRAConfig(
        r=total_rank,
        lora_alpha=float(total_rank),
        lora_dropout=0.0,
        target_modules=list(first.config.target_modules),
        merge_weights=first.config.merge_weights,
        bias=bias_mode,
        modules_to_save=list(first.config.modules_to_save),
    )
    known = [s.fingerprint for s in sources if s.fingerprint is not None]
    fingerprint = known[0] if known and len(set(known)) == 1 else None
    blend_meta = {
        "sources": [
            {
                "name": s.label,
                "weight": w,
                "r": s.config.r,
                "lora_alpha": s.config.lora_alpha,
                "base_fingerprint": s.fingerprint,
            }
            for s, w in zip(sources, ws)
        ],
        "rank": rank,
        "errors": errors,
        "cast_errors": cast_errors,
    }
    if whole_keys:
        blend_meta["whole_tensors"] = "sum w_i T_i (weights sum to 1)" if sums_to_one else "base + sum w_i (T_i - base)"
    layers = {name: {"kind": rec.kind, "groups": rec.groups} for name, rec in first.records.items()}
    return {
        "weights": out_w,
        "config": config,
        "base_fingerprint": fingerprint,
        "metadata": {"blend": blend_meta, "layers": layers},
        "epoch": None,
        "optimizer": None,
    }
