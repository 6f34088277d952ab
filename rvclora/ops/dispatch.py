"""Backend selection for the functional ops (DESIGN.md §2).

A backend is a module that defines::

    NAME: str
    unavailable_reason() -> Optional[str]          # None when the backend can run at all
    unsupported_reason(op, x, **params) -> Optional[str]   # None when it handles this call
    prefer(op, x, **params) -> bool                # optional: used by "auto" only
    lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> Tensor
    lora_conv1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation,
                groups, padding_mode, dropout_p, seed) -> Tensor
    lora_conv_transpose1d(x, weight, bias, lora_A, lora_B, scaling, stride, padding,
                          output_padding, dilation, groups, dropout_p, seed) -> Tensor
    dropout_mask(seed, shape, p, device, dtype) -> Tensor   # the scaled mask it applies

``op`` is one of :data:`OPS`. ``seed`` is a 0-dim int64 CPU tensor, or ``None`` when
``dropout_p == 0``. The backend functions are differentiable in every tensor argument
that requires grad.

``RVCLORA_BACKEND`` (or :func:`set_backend`) chooses: ``auto`` picks the first backend
that can run the call and falls back silently; a named backend that cannot run the call
raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "select_backend",
    "load_backend",
    "backend_status",
    "preload_backends",
]

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
OPS = ("lora_linear", "lora_conv1d", "lora_conv_transpose1d")

_MODULES = {
    "reference": "rvclora.ops.reference_backend",
    "torch": "rvclora.ops.torch_backend",
    "cpu": "rvclora.ops.cpu_backend",
    "triton": "rvclora.kernels.backend",
    "cuda": "rvclora.ops.cuda_backend",
}

# "auto" order per device type: fused GPU backends first, the torch path last.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

_override: Optional[str] = None
_loaded: Dict[str, Optional[ModuleType]] = {}
_import_errors: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call."""


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what} must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend: :func:`set_backend`'s value, else ``$RVCLORA_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("RVCLORA_BACKEND", "auto").strip().lower() or "auto", "RVCLORA_BACKEND")


def set_backend(name: Optional[str]) -> None:
    """Force a backend for this process (``None`` returns control to ``$RVCLORA_BACKEND``)."""
    global _override
    _override = None if name is None else _check_name(name, "backend")
    if _override not in (None, "auto"):
        load_backend(_override)  # now, not inside a torch.compile trace (see preload_backends)


def load_backend(name: str) -> Optional[ModuleType]:
    """Import a backend module once; ``None`` (with the reason kept) if it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:
            _loaded[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _loaded[name]


def _unavailable(name: str) -> Optional[str]:
    mod = load_backend(name)
    if mod is None:
        return f"cannot import {_MODULES[name]} ({_import_errors[name]})"
    return mod.unavailable_reason()


def select_backend(op: str, x, **params) -> ModuleType:
    """The backend module that runs ``op`` on ``x`` with ``params``."""
    requested = get_backend()
    if requested != "auto":
        why = _unavailable(requested) or load_backend(requested).unsupported_reason(op, x, **params)
        if why is not None:
            raise BackendUnavailableError(f"RVCLORA_BACKEND={requested} cannot run {op}: {why}")
        return load_backend(requested)
    for name in _AUTO_ORDER.get(x.device.type, ("torch",)):
        if _unavailable(name) is not None:
            continue
        mod = load_backend(name)
        if mod.unsupported_reason(op, x, **params) is not None:
            continue
        prefer = getattr(mod, "prefer", None)
        if prefer is not None and not prefer(op, x, **params):
            continue
        return mod
    return load_backend("torch")


def preload_backends() -> None:
    """Import every backend a call in this process may pick, before any call is traced.

    :func:`select_backend` runs inside ``torch.compile`` traces, and dynamo refuses to trace
    ``importlib.import_module`` (a graph break, an error under ``fullgraph=True``); so the
    imports happen here, at ``import rvclora.ops``: the always-present ``torch`` and
    ``reference`` backends, the one ``$RVCLORA_BACKEND`` names, and the GPU backends of the
    ``auto`` order when a CUDA device exists. Inside a trace :func:`load_backend` then only
    reads the cache.
    """
    names = ["torch", "reference", *_AUTO_ORDER["cpu"]]
    requested = os.environ.get("RVCLORA_BACKEND", "").strip().lower()
    if requested in BACKENDS:
        names.append(requested)
    import torch

    if torch.cuda.is_available():
        names.extend(_AUTO_ORDER["cuda"])
    for name in dict.fromkeys(names):
        load_backend(name)


def backend_status() -> List[Dict[str, Optional[str]]]:
    """One row per backend: its name, why it is unavailable here (``None`` if available) and, for an
    available backend that says so, what it runs here (``note``)."""
    rows = []
    for name in BACKENDS:
        why = _unavailable(name)
        note = getattr(load_backend(name), "status_note", None) if why is None else None
        rows.append({"backend": name, "unavailable": why, "note": note() if note else None})
    return rows
