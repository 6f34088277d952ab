"""Backend selection for the functional ops (docs/architecture.md).

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
    lora_conv2d(...)                               # optional: a backend may lack any op
    dropout_mask(seed, shape, p, device, dtype) -> Tensor   # the scaled mask it applies

``op`` is one of :data:`OPS`, each described by its :class:`rvclora.ops.spec.OpSpec` (the option names and
order of the calling convention ``op(x, weight, bias, lora_A, lora_B, scaling, *options, dropout_p, seed)``).
A backend without an entry point for an op is never chosen for it (``auto`` skips it; a named backend
raises :class:`BackendUnavailableError`). ``seed`` is a 0-dim int64 CPU tensor, or ``None`` when
``dropout_p == 0``. The backend functions are differentiable in every tensor argument
that requires grad.

``RVCLORA_BACKEND`` (or :func:`set_backend`) chooses: ``auto`` picks among the backends
that can run the call and falls back silently; a named backend that cannot run the call
raises :class:`BackendUnavailableError` saying why.

``auto`` on CUDA and CPU tensors does not bet on the fused kernels: :mod:`rvclora.ops.autoselect`
validates each capable fused backend against the oracle and times it against the torch path on the
first call of a shape class, and keeps the faster correct one (cached in memory and on disk).
``RVCLORA_AUTOSELECT=fixed``, and every call inside a ``torch.compile`` trace, take the first
capable backend of :data:`_AUTO_ORDER` whose ``prefer`` agrees.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .spec import SPECS

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "get_backend",
    "set_backend",
    "select_backend",
    "unsupported",
    "load_backend",
    "backend_status",
    "preload_backends",
]

BACKENDS = ("reference", "torch", "cpu", "triton", "cuda")
OPS = tuple(SPECS)

_MODULES = {
    "reference": "rvclora.ops.backends.reference",
    "torch": "rvclora.ops.backends.torch",
    "cpu": "rvclora.ops.backends.cpu",
    "triton": "rvclora.ops.backends.triton",
    "cuda": "rvclora.ops.backends.cuda",
}

# "auto" order per device type: fused backends first, the torch path last. On CPU the compiled ``cpu``
# backend runs what it supports (float32/float64, no autocast): ``pytest bench/`` measured it cheaper
# than the torch path on every layer of the 40k generator and on the whole training step (README,
# "Measured CPU cost"); without a compiler it is unavailable and the torch path runs.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


_override: str | None = None
_loaded: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


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


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns control to ``$RVCLORA_BACKEND``)."""
    global _override
    _override = None if name is None else _check_name(name, "backend")
    if _override not in (None, "auto"):
        load_backend(_override)  # now, not inside a torch.compile trace (see preload_backends)


def load_backend(name: str) -> ModuleType | None:
    """Import a backend module once; ``None`` (with the reason kept) if it cannot be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as e:
            _loaded[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _loaded[name]


def _module(name: str) -> ModuleType:
    """Backend ``name``'s module, once known to import (the torch backend always does)."""
    mod = load_backend(name)
    if mod is None:
        raise BackendUnavailableError(f"cannot import {_MODULES[name]} ({_import_errors[name]})")
    return mod


def _unavailable(name: str) -> str | None:
    mod = load_backend(name)
    if mod is None:
        return f"cannot import {_MODULES[name]} ({_import_errors[name]})"
    return mod.unavailable_reason()


def unsupported(name: str, op: str, x, **params) -> str | None:
    """Why backend ``name`` cannot run ``op`` on ``x`` with ``params`` (``None`` when it can): unavailable here,
    no entry point for ``op``, or declined by its ``unsupported_reason``."""
    why = _unavailable(name)
    if why is not None:
        return why
    mod = _module(name)
    if getattr(mod, op, None) is None:
        return f"the {name} backend has no {op}"
    return mod.unsupported_reason(op, x, **params)


def select_backend(op: str, x, **params) -> ModuleType:
    """The backend module that runs ``op`` on ``x`` with ``params``."""
    requested = get_backend()
    if requested != "auto":
        why = unsupported(requested, op, x, **params)
        if why is not None:
            raise BackendUnavailableError(f"RVCLORA_BACKEND={requested} cannot run {op}: {why}")
        return _module(requested)
    capable = []
    for name in _AUTO_ORDER.get(x.device.type, ("torch",)):
        if unsupported(name, op, x, **params) is None:
            capable.append(_module(name))
    fixed = _fixed_choice(op, x, params, capable)
    if not _measured(x) or _tracing():
        # Inside a torch.compile trace the fixed rule decides: the selector's cache and timers are
        # host-side machinery that dynamo cannot trace (a graph break, an error under fullgraph).
        return fixed
    from . import autoselect

    torch_mod = _module("torch")
    fused = [m for m in capable if m is not torch_mod]
    return autoselect.get_selector().choose(op, x, params, fused, torch_mod, fixed, _can_measure())


def _fixed_choice(op: str, x, params, capable: list[ModuleType]) -> ModuleType:
    """The rule without measurement: the first capable backend whose ``prefer`` agrees, the torch path
    last; on CUDA never a fused kernel for the ops whose speed is unmeasured (autoselect.FIXED_TORCH_OPS)."""
    for mod in capable:
        if x.device.type == "cuda" and mod.NAME != "torch" and op in _FIXED_TORCH_OPS:
            continue
        prefer = getattr(mod, "prefer", None)
        if prefer is not None and not prefer(op, x, **params):
            continue
        return mod
    return _module("torch")


_FIXED_TORCH_OPS = frozenset({"lora_conv_transpose1d"})


def _measured(x) -> bool:
    """Whether ``auto`` measures its choice for ``x`` (CUDA and CPU tensors; see rvclora.ops.autoselect)."""
    return x.device.type in ("cuda", "cpu")


def _tracing() -> bool:
    import torch

    return torch.compiler.is_compiling()


def _can_measure() -> bool:
    """Measuring runs real kernels, which a CUDA-graph capture forbids (the cached or fixed choice holds there)."""
    import torch

    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


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


def backend_status() -> list[dict[str, str | None]]:
    """One row per backend: its name, why it is unavailable here (``None`` if available) and, for an
    available backend that says so, what it runs here (``note``)."""
    rows = []
    for name in BACKENDS:
        why = _unavailable(name)
        note = getattr(load_backend(name), "status_note", None) if why is None else None
        rows.append({"backend": name, "unavailable": why, "note": note() if note else None})
    return rows
