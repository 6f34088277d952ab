"""Adapter weights and checkpoints: extract, load, save, read — safely.

A LoRA checkpoint holds only what LoRA training changed (the factors and the biases its bias
mode trains), the config, the base model's fingerprint, a format version, optional JSON
metadata, and optionally an optimizer state and the epoch.

* ``.safetensors`` paths are written with safetensors (config, epoch, fingerprint, metadata and
  the optimizer's non-tensor structure as JSON metadata); anything else with ``torch.save``,
  the optimizer state as a separate inner ``torch.save`` blob so that damage to it never
  makes the adapter weights unreadable.
* Reading decides the format from the file's content, never its name, and uses safetensors
  or ``torch.load(weights_only=True)``: no pickled code runs. A file holding anything but
  floating-point LoRA factors and the biases of its bias mode is refused.
* Writes go through :func:`rvclora.io.atomic_write`: a crash never leaves a half-written
  checkpoint over a good one, and files get the mode the umask gives.
* Saving refuses what could not be read back as it was meant: a config that does not
  describe the model, non-finite weights, optimizer state that the safe loader cannot read.
* Loading refuses an adapter recorded against another base model (see
  :mod:`rvclora.fingerprint`) unless ``force=True``.
"""

from __future__ import annotations

import io as _io
import json
import os
import warnings
from typing import Any, Union

import torch
import torch.nn as nn
from torch import Tensor

from .config import BIAS_MODES, LoRAConfig
from .fingerprint import FINGERPRINT_PREFIX, base_fingerprint, fingerprint_scope, short_fingerprint
from .inject import canonical_saved_key, lora_modules, saved_parameters, target_matches
from .io import (
    RVCLoRAWarning,
    atomic_write,
    check_output_path,
    check_torch_archive,
    describe_format,
    detect_format,
    first_nonfinite,
    torch_load_error,
)
from .layers import LORA_CLASSES, LoRALayer
from .records import layer_records

_ADAPTABLE = tuple(cls.base_class for cls in LORA_CLASSES)

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "extract_lora_weights",
    "load_lora_weights",
    "save_lora_checkpoint",
    "load_lora_checkpoint",
    "write_lora_file",
    "read_lora_file",
    "read_lora_config",
    "atomic_write",
]

#: The format this rvclora writes. 2 added the base fingerprint, metadata, and the ``.pth``
#: optimizer state as a separate blob.
FORMAT_VERSION = 2
#: The formats it reads.
READABLE_VERSIONS = (1, 2)
PathLike = Union[str, "os.PathLike[str]"]
_OPT_PREFIX = "__optimizer__."
_FACTORS = ("lora_A", "lora_B")


def _bias_mode(model: nn.Module, bias: str | None) -> str:
    if bias is None:
        cfg = getattr(model, "rvclora_config", None)
        bias = cfg.bias if isinstance(cfg, LoRAConfig) else "none"
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    return bias


def extract_lora_weights(model: nn.Module, bias: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter: every ``lora_A``/``lora_B``, the biases that ``bias`` trains, and every parameter of the
    config's ``modules_to_save`` (under RVC's key form: ``weight_g``/``weight_v`` for weight_norm).

    ``bias`` defaults to the mode of the config :func:`rvclora.inject_lora` used. Tensors are
    detached CPU copies.
    """
    bias = _bias_mode(model, bias)
    lora_owners = {name for name, m in lora_modules(model) if m.r > 0}
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf in _FACTORS or (leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in lora_owners))):
            out[name] = p.detach().to("cpu", copy=True).contiguous()
    for key, p in saved_parameters(model).items():  # modules_to_save: whole tensors, RVC's key form
        out[key] = p.detach().to("cpu", copy=True).contiguous()
    return out


def _check_tensor_values(where: str, weights: dict[str, Any]) -> None:
    """Keys are strings, values floating-point tensors (integer factors would be cast silently)."""
    for key, value in weights.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: key {key!r} must be a str, got {type(key).__name__}")
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {key!r} must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(
                f"{where}: {key!r} has dtype {str(value.dtype).replace('torch.', '')}; LoRA factors "
                "and biases must be floating point"
            )


def _validate_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool) -> None:
    if not isinstance(weights, dict):
        raise TypeError(f"load_lora_weights: weights must be a dict of tensors, got {type(weights).__name__}")
    _check_tensor_values("load_lora_weights", weights)
    params = dict(model.named_parameters())
    saved = saved_parameters(model)
    params.update(saved)
    for key, value in weights.items():
        if key not in params:
            raise KeyError(
                f"load_lora_weights: key {key!r} is not a parameter of the model "
                "(were the same target_modules and modules_to_save injected?)"
            )
        if key.rpartition(".")[2] not in _FACTORS + ("bias",) and key not in saved:
            raise KeyError(
                f"load_lora_weights: key {key!r} is a base weight, not a LoRA factor or bias; "
                "an adapter never replaces base weights"
            )
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(
                f"load_lora_weights: {key!r} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(params[key].shape)} (different rank or layer size?)"
            )
    bad = first_nonfinite(weights.items())
    if bad is not None:
        raise ValueError(f"load_lora_weights: {bad[0]!r} is not finite ({bad[1]})")
    if strict:
        for key in params:
            if key.rpartition(".")[2] in _FACTORS and key not in weights:
                raise KeyError(
                    f"load_lora_weights: the model's LoRA factor {key!r} is missing from the weights "
                    "(pass strict=False to load a partial adapter)"
                )
        for key in saved:
            if key not in weights:
                raise KeyError(
                    f"load_lora_weights: {key!r} of the model's modules_to_save is missing from the "
                    "weights (pass strict=False to load a partial adapter)"
                )


def load_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Copy adapter ``weights`` into ``model``.

    Every key must name a LoRA factor, a bias, or a parameter of a ``modules_to_save`` module of ``model``
    (in RVC's key form, :func:`rvclora.inject.canonical_saved_key`), with the same shape, as a finite
    floating-point tensor: an adapter never overwrites a base weight. With ``strict``, every
    LoRA factor of ``model`` must also be present. The first mismatch raises a ``KeyError``,
    ``TypeError`` or ``ValueError`` naming the key. Merged layers are unmerged, loaded and merged again.
    """
    _validate_lora_weights(model, weights, strict)
    saved = {key: p for key, p in saved_parameters(model).items() if key in weights}
    rest = {k: v for k, v in weights.items() if k not in saved}
    model.load_state_dict(rest, strict=False)
    with torch.no_grad():
        for key, p in saved.items():  # by parameter, whatever the model's weight_norm form names it
            p.copy_(weights[key])
    return model


def _saved_owner(key: str, patterns: list[str]) -> str | None:
    """The ``modules_to_save`` entry that a key's module (or one of its parents) matches, if any."""
    parts = key.split(".")[:-1]
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        for t in patterns:
            if target_matches(t, prefix):
                return t
    return None


def _check_adapter_content(
    where: str, weights: dict[str, Tensor], config: LoRAConfig, saved_shapes: Any = None
) -> None:
    """An adapter holds LoRA factor pairs of rank ``config.r``, the biases ``config.bias`` trains and the tensors of
    ``config.modules_to_save``, nothing else. ``saved_shapes`` (the file's record, when reading) must list exactly
    those tensors with their shapes."""
    _check_tensor_values(where, weights)
    saved_keys = {
        k
        for k in weights
        if config.modules_to_save
        and k.rpartition(".")[2] not in _FACTORS
        and _saved_owner(k, config.modules_to_save) is not None
    }
    if config.modules_to_save:
        if not saved_keys:
            raise ValueError(
                f"{where}: the config names modules_to_save {config.modules_to_save} but the adapter "
                "holds no tensor of them"
            )
        if saved_shapes is not None:
            if not isinstance(saved_shapes, dict):
                raise ValueError(
                    f"{where}: its record of modules_to_save is a {type(saved_shapes).__name__}, "
                    "expected {key: shape}"
                )
            if set(saved_shapes) != saved_keys:
                odd = sorted(set(saved_shapes) ^ saved_keys)
                raise ValueError(f"{where}: its modules_to_save tensors and their record disagree (e.g. {odd[0]!r})")
            for k in saved_keys:
                if list(weights[k].shape) != list(saved_shapes[k]):
                    raise ValueError(
                        f"{where}: {k!r} has shape {tuple(weights[k].shape)}, its record says {tuple(saved_shapes[k])}"
                    )
    factors: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in _FACTORS:
            if t.dim() != 2:
                raise ValueError(f"{where}: {key!r} has shape {tuple(t.shape)}; LoRA factors are 2-D")
            factors.setdefault(owner, {})[leaf] = t
    for key in weights:
        owner, _, leaf = key.rpartition(".")
        if leaf in _FACTORS or key in saved_keys:
            continue
        if leaf == "bias" and (config.bias == "all" or (config.bias == "lora_only" and owner in factors)):
            continue
        raise ValueError(
            f"{where}: key {key!r} is not a LoRA factor, a bias that bias={config.bias!r} trains, or "
            f"part of the modules_to_save {config.modules_to_save}; an adapter holds only those"
        )
    if not factors:
        raise ValueError(f"{where}: holds no LoRA factors (lora_A/lora_B)")
    for owner, pair in factors.items():
        for leaf in _FACTORS:
            if leaf not in pair:
                raise ValueError(f"{where}: layer {owner!r} has no {leaf} (LoRA factors come in pairs)")
        if pair["lora_A"].shape[0] != config.r:
            raise ValueError(
                f"{where}: {owner + '.lora_A'!r} has rank {pair['lora_A'].shape[0]}, the config says r={config.r}"
            )


def _check_metadata(where: str, metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise TypeError(f"{where}: metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        back = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{where}: metadata must be JSON-safe (dict, list, str, int, finite float, bool, None): {e}"
        ) from None
    if back != metadata:
        raise TypeError(
            f"{where}: metadata must be JSON-safe and survive a round trip unchanged (str keys, lists not tuples)"
        )
    return metadata


def _flatten_optimizer(where: str, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Split an optimizer state dict into tensors and a JSON skeleton.

    Raises ``TypeError`` for anything ``torch.load(weights_only=True)`` (or JSON) could not give
    back as it was: only tensors, dicts, lists, tuples, str, int, float, bool and None pass.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            key = _OPT_PREFIX + path
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {
                "__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]
            }
        if type(obj) in (list, tuple):
            kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
            return {kind: [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if obj is None or type(obj) in (bool, int, float, str):
            return obj
        raise TypeError(
            f"{where}: optimizer state holds a {type(obj).__module__}.{type(obj).__qualname__} at "
            f"{path}; only tensors, dicts, lists, tuples, str, int, float, bool and None can be read "
            "back safely (convert it, e.g. to a tensor)"
        )

    if not isinstance(state, dict):
        raise TypeError(f"{where}: optimizer_state must be a dict (optimizer.state_dict()), got {type(state).__name__}")
    return tensors, json.dumps(walk(state, "s"))


def _unflatten_optimizer(skeleton: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    def build(obj):
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__dict__" in obj:
                return {build(k): build(v) for k, v in obj["__dict__"]}
            if "__tuple__" in obj:
                return tuple(build(v) for v in obj["__tuple__"])
            return [build(v) for v in obj["__list__"]]
        return obj

    return build(json.loads(skeleton))


def _is_safetensors(path: PathLike) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _verify_format(expected: str, where: str):
    def verify(tmp: str) -> None:
        got = detect_format(tmp)
        if got != expected:
            raise OSError(
                f"{where}: the written file reads back as {describe_format(got)}, not {describe_format(expected)}"
            )

    return verify


def write_lora_file(
    path: PathLike,
    weights: dict[str, Tensor],
    config: LoRAConfig,
    *,
    base_fingerprint: str | None,
    metadata: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    epoch: int | None = None,
    overwrite: bool = True,
) -> str:
    """Write an adapter file from its parts, no model needed; returns the path.

    ``weights``: LoRA factors (and the biases ``config.bias`` trains), finite floating-point
    tensors. ``base_fingerprint``: :func:`rvclora.fingerprint.base_fingerprint` of the base it
    belongs to (``None`` only for an adapter of unknown base). ``metadata``: any JSON-safe dict,
    given back by :func:`read_lora_file` under ``"metadata"``. A path ending in ``.safetensors``
    gets safetensors, any other a ``torch.save`` file; the written file is checked to read back
    as that format before it replaces anything. The write is atomic and follows the umask.
    """
    where = f"adapter {os.fspath(path)!r}" if isinstance(path, (str, os.PathLike)) else "adapter"
    path = check_output_path(path, what="adapter", overwrite=overwrite)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"{where}: config must be a LoRAConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(weights, dict):
        raise TypeError(f"{where}: weights must be a dict of tensors, got {type(weights).__name__}")
    from .validate import check_adapter

    metadata = _check_metadata(where, metadata)
    if config.modules_to_save:  # the file records each saved tensor's shape; reading checks them
        saved = {
            k: list(getattr(v, "shape", ()))
            for k, v in weights.items()
            if isinstance(k, str)
            and k.rpartition(".")[2] not in _FACTORS
            and _saved_owner(k, config.modules_to_save) is not None
        }
        metadata = {**(metadata or {}), "modules_to_save": saved}
    check_adapter(where, weights, config, metadata)
    bad = first_nonfinite(weights.items())
    if bad is not None:
        raise ValueError(f"{where}: refusing to save {bad[0]!r}: not finite ({bad[1]})")
    if base_fingerprint is not None and (
        not isinstance(base_fingerprint, str) or not base_fingerprint.startswith(FINGERPRINT_PREFIX)
    ):
        raise ValueError(
            f"{where}: base_fingerprint must be a string from rvclora.fingerprint.base_fingerprint "
            f"or None, got {base_fingerprint!r}"
        )
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise TypeError(f"{where}: epoch must be an int or None, got {epoch!r}")
    opt_tensors: dict[str, Tensor] = {}
    skeleton = None
    if optimizer_state is not None:
        opt_tensors, skeleton = _flatten_optimizer(where, optimizer_state)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    if _is_safetensors(path):
        from safetensors.torch import save_file

        meta = {
            "format": "pt",
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(config.to_dict()),
            "epoch": json.dumps(epoch),
        }
        if base_fingerprint is not None:
            meta["base_fingerprint"] = base_fingerprint
        if metadata is not None:
            meta["metadata"] = json.dumps(metadata)
        if skeleton is not None:
            meta["optimizer"] = skeleton
            tensors.update(opt_tensors)
        atomic_write(
            path, lambda tmp: save_file(tensors, tmp, metadata=meta), verify=_verify_format("safetensors", where)
        )
    else:
        blob = None
        if optimizer_state is not None:
            buf = _io.BytesIO()
            torch.save(optimizer_state, buf)
            blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        payload = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "lora_weights": tensors,
            "epoch": epoch,
            "base_fingerprint": base_fingerprint,
            "metadata": metadata,
            "optimizer": blob,
        }
        atomic_write(path, lambda tmp: torch.save(payload, tmp), verify=_verify_format("torch-zip", where))
    return path


def _check_config_matches_model(where: str, model: nn.Module, config: LoRAConfig) -> None:
    """The config must rebuild the model: same adapted layers, ranks, alpha, dropout and bias mode."""
    layers = [(n, m) for n, m in lora_modules(model) if m.r > 0]
    if not layers:
        raise ValueError(f"{where}: the model has no LoRA weights (was inject_lora called?)")
    for name, m in layers:
        if m.r != config.r or m.lora_alpha != config.lora_alpha:
            raise ValueError(
                f"{where}: layer {name!r} has r={m.r}, lora_alpha={m.lora_alpha:g}; the config says "
                f"r={config.r}, lora_alpha={config.lora_alpha:g}"
            )
        if not any(target_matches(t, name) for t in config.target_modules):
            raise ValueError(
                f"{where}: LoRA layer {name!r} is not selected by the config's target_modules {config.target_modules}"
            )
    for name, m in model.named_modules():
        if (
            name
            and not isinstance(m, LoRALayer)
            and isinstance(m, _ADAPTABLE)
            and any(target_matches(t, name) for t in config.target_modules)
        ):
            raise ValueError(
                f"{where}: the config's target_modules {config.target_modules} select {name!r}, "
                "which the model does not adapt"
            )
    model_cfg = getattr(model, "rvclora_config", None)
    if isinstance(model_cfg, LoRAConfig):
        for f in ("lora_dropout", "bias"):
            if getattr(model_cfg, f) != getattr(config, f):
                raise ValueError(
                    f"{where}: config {f}={getattr(config, f)!r} but the model was injected with "
                    f"{f}={getattr(model_cfg, f)!r}"
                )
    saved = set(extract_lora_weights(model, config.bias))
    model_saved = getattr(model_cfg, "modules_to_save", []) if isinstance(model_cfg, LoRAConfig) else []
    if sorted(model_saved) != sorted(config.modules_to_save):
        raise ValueError(
            f"{where}: config modules_to_save={config.modules_to_save} but the model was injected with {model_saved}"
        )
    for name, p in model.named_parameters():
        if p.requires_grad and name not in saved and canonical_saved_key(name) not in saved:
            raise ValueError(
                f"{where}: parameter {name!r} is trainable but bias={config.bias!r} does not save it; "
                "save with the bias mode the model was trained with"
            )


def save_lora_checkpoint(
    model: nn.Module,
    path: PathLike,
    config: LoRAConfig | None = None,
    optimizer_state: dict[str, Any] | None = None,
    epoch: int | None = None,
    *,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write the adapter of ``model`` (with ``config``, and optionally optimizer state and epoch) to ``path``.

    ``config`` defaults to the one :func:`rvclora.inject_lora` recorded, and must describe the
    model: its adapted layers, rank, alpha, dropout and bias mode, with every trainable parameter
    saved. The base fingerprint recorded at injection goes into the file. ``path`` ending in
    ``.safetensors`` writes safetensors; anything else ``torch.save``. See :func:`write_lora_file`.
    """
    where = f"adapter {os.fspath(path)!r}" if isinstance(path, (str, os.PathLike)) else "adapter"
    check_output_path(path, what="adapter", overwrite=True)
    if config is None:
        config = getattr(model, "rvclora_config", None)
        if not isinstance(config, LoRAConfig):
            raise ValueError(f"{where}: the model has no rvclora_config (was inject_lora called?); pass config")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"save_lora_checkpoint: config must be a LoRAConfig, got {type(config).__name__}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise TypeError(f"save_lora_checkpoint: epoch must be an int or None, got {epoch!r}")
    _check_config_matches_model(where, model, config)
    fingerprint = getattr(model, "rvclora_base_fingerprint", None)
    if fingerprint is None:
        try:
            fingerprint = base_fingerprint(model)
        except ValueError:
            pass
    if fingerprint is None:
        warnings.warn(
            f"{where}: the model has no recorded base fingerprint (it was not injected with "
            "rvclora.inject_lora); the adapter cannot be checked against its base later",
            RVCLoRAWarning,
            stacklevel=2,
        )
    # each layer's kind and groups: what a blend needs to read the factors without the model
    metadata = {"layers": layer_records(model), **(metadata or {})}
    write_lora_file(
        path,
        extract_lora_weights(model, config.bias),
        config,
        base_fingerprint=fingerprint,
        metadata=metadata,
        optimizer_state=optimizer_state,
        epoch=epoch,
    )


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import safe_open

    from .validate import MAX_TENSORS

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        if len(keys) > MAX_TENSORS:
            raise ValueError(f"it holds {len(keys)} tensors; an adapter holds at most {MAX_TENSORS} (MAX_TENSORS)")
        weights = {k: f.get_tensor(k) for k in keys if not k.startswith(_OPT_PREFIX)}
        opt, opt_error = None, None
        if "optimizer" in meta:
            try:
                opt_tensors = {k: f.get_tensor(k) for k in keys if k.startswith(_OPT_PREFIX)}
                opt = _unflatten_optimizer(meta["optimizer"], opt_tensors)
            except Exception as e:  # noqa: BLE001 -- any damage to the optimizer section leaves the weights usable
                opt_error = f"{type(e).__name__}: {e}"
    if "format_version" not in meta or "config" not in meta:
        raise ValueError("a safetensors file without rvclora's metadata (format_version, config)")
    try:
        version = int(meta["format_version"])
        config = json.loads(meta["config"])
        epoch = json.loads(meta.get("epoch", "null"))
        metadata = json.loads(meta["metadata"]) if "metadata" in meta else None
    except ValueError as e:
        raise ValueError(f"its metadata is not valid JSON ({e})") from None
    return {
        "format_version": version,
        "config": config,
        "weights": weights,
        "epoch": epoch,
        "optimizer": opt,
        "optimizer_error": opt_error,
        "base_fingerprint": meta.get("base_fingerprint"),
        "metadata": metadata,
    }


def _read_torch(path: str) -> dict[str, Any]:
    if detect_format(path) == "torch-zip":
        check_torch_archive(path)
    try:
        with open(path, "rb") as f:  # a file object: torch.load never guesses the format from the name
            raw = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types; each means "not a safe torch file"
        raise ValueError(torch_load_error(e)) from None
    if not isinstance(raw, dict) or "lora_weights" not in raw or "format_version" not in raw:
        what = f"a dict with keys {sorted(map(str, raw))[:8]}" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise ValueError(f"a torch file holding {what}, not a dict with 'format_version' and 'lora_weights'")
    if not isinstance(raw["lora_weights"], dict):
        raise ValueError(f"'lora_weights' is a {type(raw['lora_weights']).__name__}, expected a dict of tensors")
    opt, opt_error = raw.get("optimizer"), None
    if isinstance(opt, Tensor):  # format 2: an inner torch.save blob
        try:
            opt = torch.load(_io.BytesIO(opt.numpy().tobytes()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- the weights stay usable
            opt, opt_error = None, torch_load_error(e)
    return {
        "format_version": raw["format_version"],
        "config": raw.get("config"),
        "weights": raw["lora_weights"],
        "epoch": raw.get("epoch"),
        "optimizer": opt,
        "optimizer_error": opt_error,
        "base_fingerprint": raw.get("base_fingerprint"),
        "metadata": raw.get("metadata"),
    }


def read_lora_file(path: PathLike) -> dict[str, Any]:
    """Read an adapter file safely.

    Returns ``{"weights", "config", "epoch", "optimizer", "optimizer_error", "format_version",
    "base_fingerprint", "metadata"}``: ``base_fingerprint`` is ``None`` for files written before
    rvclora recorded it, ``metadata`` the dict given to :func:`write_lora_file` (or ``None``),
    ``optimizer_error`` says why a damaged optimizer section could not be read (the weights are
    fine then). The format is taken from the content. Anything else raises ``ValueError`` in
    one line naming ``path``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"LoRA checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"LoRA checkpoint {path!r} is not a regular file")
    prefix = f"{path!r} is not a readable rvclora LoRA checkpoint"
    fmt = detect_format(path)
    try:
        if fmt == "safetensors":
            data = _read_safetensors(path)
        elif fmt in ("torch-zip", "pickle"):
            data = _read_torch(path)
        else:
            raise ValueError(
                f"it is {describe_format(fmt)}; expected a safetensors or torch.save file written by "
                "rvclora.save_lora_checkpoint"
            )
    except Exception as e:  # noqa: BLE001 -- safetensors, unpickling and format errors all mean "not a checkpoint"
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{prefix}: {msg}") from None
    if data["format_version"] not in READABLE_VERSIONS:
        raise ValueError(
            f"{path!r} has format_version {data['format_version']!r}; this rvclora reads "
            f"versions {list(READABLE_VERSIONS)}"
        )
    try:
        data["config"] = LoRAConfig.from_dict(data["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{prefix}: its config is invalid: {e}") from None
    fp = data["base_fingerprint"]
    if fp is not None and (not isinstance(fp, str) or not fp.startswith(FINGERPRINT_PREFIX)):
        raise ValueError(f"{prefix}: base_fingerprint {fp!r} is not an rvclora fingerprint")
    from .validate import check_adapter

    try:
        record = data["metadata"].get("modules_to_save") if isinstance(data["metadata"], dict) else None
        if data["config"].modules_to_save and record is None:
            raise ValueError(
                f"{prefix}: its config names modules_to_save {data['config'].modules_to_save} but the "
                "file has no record of their tensors (metadata 'modules_to_save')"
            )
        check_adapter(prefix, data["weights"], data["config"], data["metadata"])
    except TypeError as e:
        raise ValueError(str(e)) from None
    return data


def read_lora_config(path: PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in a LoRA checkpoint."""
    return read_lora_file(path)["config"]


def check_base_fingerprint(
    where: str,
    adapter_fp: str | None,
    base_fp: str | None,
    force: bool,
    base_name: str = "this model",
    stacklevel: int = 3,
) -> None:
    """Refuse an adapter recorded against another base (unless ``force``); warn when either side is unknown."""
    if adapter_fp is None:
        warnings.warn(
            f"{where}: the adapter records no base fingerprint (written by an older rvclora); "
            f"cannot check that it belongs to {base_name}",
            RVCLoRAWarning,
            stacklevel=stacklevel,
        )
    elif base_fp is None:
        warnings.warn(
            f"{where}: {base_name} has no recorded base fingerprint; cannot check that the adapter belongs to it",
            RVCLoRAWarning,
            stacklevel=stacklevel,
        )
    elif adapter_fp != base_fp:
        if not force:
            raise ValueError(
                f"{where}: the adapter was trained on another base model (fingerprint "
                f"{short_fingerprint(adapter_fp)}, {base_name} has {short_fingerprint(base_fp)}); "
                "pass force=True (--force) to use it anyway"
            )
        warnings.warn(
            f"{where}: base fingerprint mismatch ({short_fingerprint(adapter_fp)} vs "
            f"{short_fingerprint(base_fp)}), used anyway (force)",
            RVCLoRAWarning,
            stacklevel=stacklevel,
        )


def check_fits_before_injecting(where: str, model: nn.Module, config: LoRAConfig, weights: dict[str, Tensor]) -> None:
    """The file's factors must be exactly those injecting ``config`` into ``model`` creates, checked before it does.

    Raises ``ValueError`` (prefixed with ``where`` unless it is empty) naming the first layer the
    config selects that the file has no, or other-shaped, factors for: injecting first would
    allocate what the file only declares (a few KB declaring a rank of 8192 for every layer).
    """
    from .inject import planned_lora_shapes

    prefix = f"{where}: " if where else ""
    try:
        planned = planned_lora_shapes(model, config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{prefix}{e}") from None
    for name, shapes in planned.items():
        for leaf, shape in zip(_FACTORS, shapes):
            t = weights.get(f"{name}.{leaf}")
            if t is None:
                raise ValueError(
                    f"{prefix}the config's target_modules select {name!r}, which the file has no {leaf} "
                    "for (is it for this model?)"
                )
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{prefix}{name + '.' + leaf!r} has shape {tuple(t.shape)}, the model's layer needs "
                    f"{shape} (different rank or layer size?)"
                )


def _undo_injection(model: nn.Module):
    """A function that puts ``model`` back as it is now, after an :func:`rvclora.inject_lora` of it.

    Injection replaces layers (the originals are left untouched), sets requires_grad and the
    ``rvclora_*`` attributes; the function reverts exactly those.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    grads = [(p, p.requires_grad) for p in model.parameters()]
    missing = object()
    attrs = {
        a: model.__dict__.get(a, missing)
        for a in ("rvclora_config", "rvclora_base_fingerprint", "rvclora_base_fingerprints")
    }

    def undo() -> None:
        for name, original in modules:
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if parent._modules.get(child) is not original:
                setattr(parent, child, original)
        for p, flag in grads:
            p.requires_grad_(flag)
        for a, value in attrs.items():
            if value is missing:
                model.__dict__.pop(a, None)
            else:
                model.__dict__[a] = value

    return undo


def _model_fingerprint(model: nn.Module, adapter_fp: str | None) -> str | None:
    """The fingerprint ``inject_lora`` recorded for ``model``, in the scope of the adapter's (decoder or synth)."""
    recorded = getattr(model, "rvclora_base_fingerprint", None)
    if adapter_fp is None:
        return recorded
    scope = fingerprint_scope(adapter_fp)
    by_scope = getattr(model, "rvclora_base_fingerprints", None) or {}
    if scope in by_scope:
        return by_scope[scope]
    return recorded if recorded is not None and fingerprint_scope(recorded) == scope else None


def load_lora_checkpoint(
    model: nn.Module, path: PathLike, load_optimizer: bool = False, *, force: bool = False
) -> tuple[nn.Module, dict[str, Any] | None, int | None, LoRAConfig]:
    """Load an adapter into ``model``: returns ``(model, optimizer_state, epoch, config)``.

    A model without LoRA layers is first injected with the file's config. An injected model
    must have been injected with the file's rank, alpha and bias mode (else ``ValueError``:
    an alpha mismatch would silently rescale the update). The adapter must have been trained
    on this model's base (its fingerprint), unless ``force``. Layers or shapes that don't
    match raise an error naming the first mismatching key. ``optimizer_state`` is ``None``
    unless ``load_optimizer`` is set (and the file has one); a damaged optimizer section then
    raises, while ``load_optimizer=False`` still loads the weights. A load that raises leaves
    ``model`` exactly as it was (a model it injected is un-injected again).
    """
    from .inject import inject_lora

    data = read_lora_file(path)
    where = f"adapter {os.fspath(path)!r}"
    cfg: LoRAConfig = data["config"]
    if load_optimizer and data["optimizer_error"] is not None:
        raise ValueError(
            f"{where}: the optimizer state is damaged ({data['optimizer_error']}); the adapter "
            "weights are fine: load with load_optimizer=False"
        )
    layers = [(n, m) for n, m in lora_modules(model)]
    undo = None
    if not layers:
        check_fits_before_injecting(where, model, cfg, data["weights"])
        undo = _undo_injection(model)
        inject_lora(model, cfg)
        layers = list(lora_modules(model))
    try:
        owners = {k.rpartition(".")[0] for k in data["weights"] if k.rpartition(".")[2] in _FACTORS}
        for name, m in layers:
            if name in owners and (m.r != cfg.r or m.lora_alpha != cfg.lora_alpha):
                raise ValueError(
                    f"{where}: the file has r={cfg.r}, lora_alpha={cfg.lora_alpha:g}, but the model's "
                    f"layer {name!r} was injected with r={m.r}, lora_alpha={m.lora_alpha:g}; inject with "
                    "the file's config (rvclora.read_lora_config)"
                )
        model_cfg = getattr(model, "rvclora_config", None)
        if isinstance(model_cfg, LoRAConfig) and model_cfg.bias != cfg.bias:
            raise ValueError(
                f"{where}: the file has bias={cfg.bias!r}, the model was injected with "
                f"bias={model_cfg.bias!r}; inject with the file's config (rvclora.read_lora_config)"
            )
        try:
            _validate_lora_weights(model, data["weights"], strict=True)
        except (KeyError, TypeError, ValueError) as e:
            msg = str(e.args[0] if e.args else e).removeprefix("load_lora_weights: ")
            raise type(e)(f"{where}: {msg}") from None
        check_base_fingerprint(
            where, data["base_fingerprint"], _model_fingerprint(model, data["base_fingerprint"]), force
        )
        params = {**dict(model.named_parameters()), **saved_parameters(model)}
        before = {k: params[k].detach().clone() for k in data["weights"] if k in params}
        try:
            load_lora_weights(model, data["weights"], strict=True)
        except BaseException:
            with torch.no_grad():
                for k, v in before.items():
                    params[k].copy_(v)
            raise
    except BaseException:
        if undo is not None:
            undo()
        raise
    opt = data["optimizer"] if load_optimizer else None
    return model, opt, data["epoch"], cfg
