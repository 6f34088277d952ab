"""Build and load the ``rvclora._C`` extension (the C++/CUDA sources in ``csrc/``).

Order of attempts, once per process:

1. ``import rvclora._C`` — present when the package was installed with ``RVCLORA_BUILD_EXT=1``
   (setup.py builds it ahead of time);
2. ``torch.utils.cpp_extension.load`` with ninja — builds on first use and caches the result in
   torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
   CUDA sources are added only when torch itself was built with CUDA (``torch.version.cuda``),
   never because a GPU happens to be visible.

A missing compiler or a failed build is reported once as a warning; :func:`load_error` then
returns the reason, the ``cuda`` backend reports itself unavailable and ``auto`` falls back.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["CPU_SOURCES", "CUDA_SOURCES", "extension_name", "load_error", "source_dir", "sources"]

CPU_SOURCES = ["lora_convt_cpu.cpp", "lora_cpu.cpp"]
CUDA_SOURCES = ["lora_convt_cuda_ops.cpp", "lora_convt_cuda.cu"]
HEADERS = ["lora_convt_kernel.cuh", "lora_convt_ops.h", "lora_convt_cuda.h"]

_lock = threading.Lock()
_state: dict = {}


def source_dir() -> Path | None:
    """``csrc/``: next to the package in a checkout or editable install, inside it (package data) otherwise."""
    here = Path(__file__).resolve().parent.parent  # rvclora/
    for cand in (here.parent / "csrc", here / "csrc"):
        if (cand / CPU_SOURCES[0]).is_file():
            return cand
    return None


def with_cuda() -> bool:
    return torch.version.cuda is not None


def sources(cuda: bool | None = None) -> list[str]:
    """Source file names (relative to :func:`source_dir`) of the build for this torch."""
    cuda = with_cuda() if cuda is None else cuda
    return CPU_SOURCES + (CUDA_SOURCES if cuda else [])


def extension_name() -> str:
    # Distinct names for the two source sets: each keeps its own cached build.
    return "rvclora_C_cuda" if with_cuda() else "rvclora_C_cpu"


def _ops_registered() -> bool:
    return hasattr(torch.ops.rvclora, "lora_convt_fwd")


def _build() -> str | None:
    try:
        importlib.import_module("rvclora._C")
        if _ops_registered():
            return None
    except ImportError:
        pass
    src = source_dir()
    if src is None:
        return "the extension sources (csrc/) are not installed and rvclora._C was not built ahead of time"
    try:
        from torch.utils.cpp_extension import load

        load(
            name=extension_name(),
            sources=[str(src / f) for f in sources()],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            extra_include_paths=[str(src)],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - any build failure (no compiler, no ninja, compile error) disables us
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        detail = " | ".join(lines[-3:]) if lines else type(e).__name__
        return f"building the rvclora._C extension from {src} failed ({type(e).__name__}: {detail})"
    if not _ops_registered():
        return "the rvclora._C extension loaded but did not register torch.ops.rvclora.lora_convt_fwd"
    return None


def load_error() -> str | None:
    """Build/load the extension once; ``None`` when its ops are registered, else why not."""
    if "error" not in _state:
        with _lock:
            if "error" not in _state:
                err = _build()
                if err is not None:
                    warnings.warn(f"rvclora: {err}; the 'cuda' backend is unavailable", RuntimeWarning, stacklevel=3)
                _state["error"] = err
    return _state["error"]
