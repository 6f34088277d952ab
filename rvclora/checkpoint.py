"""Adapter weights and checkpoints: extract, load, save, read — safely.

A LoRA checkpoint holds only what LoRA training changed (the factors and the trainable
biases), the config and a format version; optionally an optimizer state and the epoch.

* ``.safetensors`` paths are written with safetensors (config, epoch and the optimizer's
  non-tensor structure as JSON metadata); anything else with ``torch.save``.
* Reading uses safetensors or ``torch.load(weights_only=True)``: no pickled code runs.
* Writes are atomic: a temporary file in the target directory, fsync, then ``os.replace``.
  A crash never leaves a half-written checkpoint over a good one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import BIAS_MODES, LoRAConfig
from .inject import lora_modules

__all__ = [
    "FORMAT_VERSION",
    "extract_lora_weights",
    "load_lora_weights",
    "save_lora_checkpoint",
    "load_lora_checkpoint",
    "read_lora_file",
    "read_lora_config",
    "atomic_write",
]

FORMAT_VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]
_OPT_PREFIX = "__optimizer__."


def _bias_mode(model: nn.Module, bias: Optional[str]) -> str:
    if bias is None:
        cfg = getattr(model, "rvclora_config", None)
        bias = cfg.bias if isinstance(cfg, LoRAConfig) else "none"
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    return bias


def extract_lora_weights(model: nn.Module, bias: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The adapter: every ``lora_A``/``lora_B`` plus the biases that ``bias`` trains.

    ``bias`` defaults to the mode of the config :func:`rvclora.inject_lora` used. Tensors are
    detached CPU copies.
    """
    bias = _bias_mode(model, bias)
    lora_owners = {name for name, m in lora_modules(model) if m.r > 0}
    out: Dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") or (
            leaf == "bias" and (bias == "all" or (bias == "lora_only" and owner in lora_owners))
        ):
            out[name] = p.detach().to("cpu", copy=True).contiguous()
    return out


def load_lora_weights(model: nn.Module, weights: Dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Copy adapter ``weights`` into ``model``.

    Every key must name a parameter of ``model`` with the same shape. With ``strict``, every
    LoRA factor of ``model`` must also be present. The first mismatch raises a ``KeyError`` or
    ``ValueError`` naming the key. Merged layers are unmerged, loaded and merged again.
    """
    if not isinstance(weights, dict):
        raise TypeError(f"load_lora_weights: weights must be a dict of tensors, got {type(weights).__name__}")
    params = dict(model.named_parameters())
    for key, value in weights.items():
        if key not in params:
            raise KeyError(f"load_lora_weights: key {key!r} is not a parameter of the model "
                           "(were the same target_modules injected?)")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_lora_weights: {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"load_lora_weights: {key!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(params[key].shape)} (different rank or layer size?)")
    if strict:
        for key in params:
            if key.rpartition(".")[2] in ("lora_A", "lora_B") and key not in weights:
                raise KeyError(f"load_lora_weights: the model's LoRA factor {key!r} is missing from the weights "
                               "(pass strict=False to load a partial adapter)")
    model.load_state_dict(weights, strict=False)
    return model


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then atomically move ``tmp_path`` to ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_safetensors(path: PathLike) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Split an optimizer state dict into tensors (for safetensors) and a JSON skeleton."""
    tensors: Dict[str, torch.Tensor] = {}

    def walk(obj, path):
        if isinstance(obj, torch.Tensor):
            key = _OPT_PREFIX + path
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in
                                 enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
            return {kind: [walk(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"save_lora_checkpoint: cannot store optimizer state value of type {type(obj).__name__}")

    return tensors, json.dumps(walk(state, "s"))


def _unflatten_optimizer(skeleton: str, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
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


def save_lora_checkpoint(
    model: nn.Module,
    path: PathLike,
    config: LoRAConfig,
    optimizer_state: Optional[Dict[str, Any]] = None,
    epoch: Optional[int] = None,
) -> None:
    """Write the adapter of ``model`` (with ``config``, and optionally optimizer state and epoch) to ``path``.

    ``path`` ending in ``.safetensors`` writes safetensors; anything else ``torch.save``.
    The write is atomic.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"save_lora_checkpoint: config must be a LoRAConfig, got {type(config).__name__}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise TypeError(f"save_lora_checkpoint: epoch must be an int or None, got {epoch!r}")
    weights = extract_lora_weights(model, config.bias)
    if not weights:
        raise ValueError("save_lora_checkpoint: the model has no LoRA weights (was inject_lora called?)")
    if _is_safetensors(path):
        from safetensors.torch import save_file

        tensors = dict(weights)
        meta = {"format_version": str(FORMAT_VERSION), "config": json.dumps(config.to_dict()),
                "epoch": json.dumps(epoch)}
        if optimizer_state is not None:
            opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer_state)
            tensors.update(opt_tensors)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        payload = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "lora_weights": weights,
                   "epoch": epoch, "optimizer": optimizer_state}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_lora_file(path: PathLike) -> Dict[str, Any]:
    """Read a LoRA checkpoint safely: ``{"weights", "config", "epoch", "optimizer", "format_version"}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA checkpoint {path!r} does not exist")
    try:
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if "format_version" not in meta or "config" not in meta:
                raise ValueError("its metadata has no format_version/config")
            version = int(meta["format_version"])
            opt = None
            if "optimizer" in meta:
                opt = _unflatten_optimizer(meta["optimizer"], tensors)
            weights = {k: v for k, v in tensors.items() if not k.startswith(_OPT_PREFIX)}
            data = {"format_version": version, "config": json.loads(meta["config"]), "weights": weights,
                    "epoch": json.loads(meta.get("epoch", "null")), "optimizer": opt}
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(raw, dict) or "lora_weights" not in raw or "format_version" not in raw:
                raise ValueError("it is not a dict with 'format_version' and 'lora_weights'")
            data = {"format_version": raw["format_version"], "config": raw.get("config"),
                    "weights": raw["lora_weights"], "epoch": raw.get("epoch"), "optimizer": raw.get("optimizer")}
    except Exception as e:  # safetensors, unpickling and format errors all mean "not a checkpoint"
        raise ValueError(f"{path!r} is not a readable rvclora LoRA checkpoint: {e}") from None
    if data["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path!r} has format_version {data['format_version']!r}; this rvclora reads "
                         f"version {FORMAT_VERSION}")
    data["config"] = LoRAConfig.from_dict(data["config"])
    return data


def read_lora_config(path: PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` stored in a LoRA checkpoint."""
    return read_lora_file(path)["config"]


def load_lora_checkpoint(
    model: nn.Module, path: PathLike, load_optimizer: bool = False
) -> Tuple[nn.Module, Optional[Dict[str, Any]], Optional[int], LoRAConfig]:
    """Load an adapter into an injected ``model``: returns ``(model, optimizer_state, epoch, config)``.

    ``optimizer_state`` is ``None`` unless ``load_optimizer`` is set (and the file has one).
    Layers, ranks or shapes that don't match raise an error naming the first mismatching key.
    """
    data = read_lora_file(path)
    load_lora_weights(model, data["weights"], strict=True)
    opt = data["optimizer"] if load_optimizer else None
    return model, opt, data["epoch"], data["config"]
