"""Build and load the ``rvclora._C`` extension (the C++/CUDA sources in ``csrc/``).

The extension has two parts: the CPU sources (:data:`CPU_SOURCES`, among them the CPU twin of
the ConvTranspose1d kernel) need only a C++ compiler and build with any torch; the CUDA
sources (:data:`CUDA_SOURCES`) need a CUDA build of torch *and* a CUDA toolkit (``nvcc``).
The usual GPU user has the first without the second (pip's torch brings the CUDA runtime, not
``nvcc``), so a missing toolkit is not an error: the CPU part is built alone, the ``cuda``
backend then declines CUDA tensors and ``auto`` runs ConvTranspose1d on the torch path, and
:func:`cuda_note` says why in one line (``rvclora info`` shows it).

Order of attempts, once per process:

1. ``import rvclora._C`` — present when the package was installed with ``RVCLORA_BUILD_EXT=1``
   (setup.py builds it ahead of time, from the same :func:`build_plan`);
2. ``torch.utils.cpp_extension.load`` with ninja — builds on first use and caches the result in
   torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
   under a name per source set, source contents and torch version (:func:`extension_name`), so a CPU-only build,
   a CUDA build and builds for another torch never share a cache entry. When the CUDA build
   fails (a toolkit that does not match torch, a compile error), the CPU part is built alone and
   the failure becomes the note.

Target architectures of the CUDA build: ``$TORCH_CUDA_ARCH_LIST`` when set; else the visible
GPUs'; else, with no GPU visible (a build machine, a container without the device),
:data:`CUDA_ARCHS`, the architectures the kernels are tuned and resource-checked for, plus PTX
for newer GPUs. torch alone would derive the list from the visible devices and fail with an
``IndexError`` when there are none.

torch's builder serialises builds with a ``lock`` file in the build directory. Up to torch 2.13
that file is a baton whose mere existence blocks: torch waits for it to vanish forever, and a build
killed half-way leaves it behind. There, before building, rvclora waits for that file at most
``$RVCLORA_BUILD_LOCK_TIMEOUT`` seconds (default 120), then gives up with a message naming the
directory: the build counts as failed and ``auto`` falls back. (A lock taken and abandoned in the
instant between that wait and torch's own is not covered.) From torch 2.14 the file holds an OS
advisory lock instead: it stays on disk after every build, the kernel releases it when its holder
dies, and torch's own wait only ever waits for a live build, so rvclora does not wait on it.

A failed build of the CPU part (no C++ compiler, no ninja) is reported once as a warning;
:func:`load_error` then returns the reason, the ``cuda`` backend reports itself unavailable and
``auto`` falls back.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CPU_SOURCES",
    "CUDA_ARCHS",
    "CUDA_SOURCES",
    "BuildPlan",
    "build_plan",
    "cuda_note",
    "extension_name",
    "has_cuda_kernels",
    "load_error",
    "source_dir",
    "sources",
]

CPU_SOURCES = [
    "lora_convt_cpu.cpp",
    "lora_cpu.cpp",
    "lora_cpu_linear.cpp",
    "lora_cpu_conv1d.cpp",
    "lora_cpu_convt.cpp",
    "lora_cpu_simd.cpp",
]
CUDA_SOURCES = ["lora_convt_cuda_ops.cpp", "lora_convt_cuda.cu"]
HEADERS = [
    "lora_convt_kernel.cuh",
    "lora_convt_ops.h",
    "lora_convt_cuda.h",
    "lora_cpu_common.h",
    "lora_cpu_ops.h",
    "lora_cpu_simd.h",
    "lora_cpu_simd_body.h",
]
# What the kernels' tiles are sized for and what rvclora.checks.cuda_compile verifies.
CUDA_ARCHS = ("8.0", "9.0")
# One op the CPU sources define: its registration tells whether the library is loaded.
_PROBE_OP = "rvclora::cuda_lora_conv_transpose1d_fwd"
_NOT_REGISTERED = (
    "the rvclora._C extension loaded but did not register torch.ops.rvclora.cuda_lora_conv_transpose1d_fwd"
)

_lock = threading.Lock()
_state: dict = {}


def source_dir() -> Path | None:
    """``csrc/``: next to the package in a checkout or editable install, inside it (package data) otherwise."""
    here = Path(__file__).resolve().parent.parent  # rvclora/
    for cand in (here.parent / "csrc", here / "csrc"):
        if all((cand / f).is_file() for f in CPU_SOURCES):
            return cand
    return None


@dataclass(frozen=True)
class BuildPlan:
    """What this process builds: the CUDA sources or not, for which architectures, and why."""

    cuda: bool
    #: nvcc ``-gencode`` flags, explicit so that the build never depends on torch guessing (and
    #: so that they are part of the build arguments: another arch list is another cache entry).
    arch_flags: tuple[str, ...] = ()
    #: the target architectures in words (``rvclora info``)
    archs: str = ""
    #: why the CUDA sources are not built (None when they are)
    note: str | None = None


def _nvcc_name() -> str:
    return "nvcc.exe" if sys.platform == "win32" else "nvcc"


def cuda_toolkit() -> tuple[str | None, str | None]:
    """``(CUDA_HOME, None)`` when the CUDA sources can be compiled here, else ``(None, why not)``.

    ``CUDA_HOME`` is torch's (``torch.utils.cpp_extension.CUDA_HOME``: ``$CUDA_HOME``, else
    derived from ``nvcc`` on ``PATH``, else ``/usr/local/cuda``): the build uses that one, so
    that is the one checked — for ``bin/nvcc`` and the runtime headers, since a ``PATH`` entry
    that is a wrapper script makes torch guess a root that has neither.
    """
    if torch.version.cuda is None:
        return None, "this torch was built without CUDA"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not home:
        return None, "no CUDA toolkit (nvcc not found; set CUDA_HOME to the toolkit's root)"
    if not (Path(home) / "bin" / _nvcc_name()).is_file():
        return None, f"no CUDA toolkit (no {_nvcc_name()} in CUDA_HOME={home}/bin; set CUDA_HOME to the toolkit's root)"
    if not (Path(home) / "include" / "cuda_runtime.h").is_file():
        return None, f"CUDA_HOME={home} has no include/cuda_runtime.h (set CUDA_HOME to the CUDA toolkit's root)"
    return home, None


def _gencode(archs) -> list[str]:
    nums = [a.replace(".", "") for a in archs]
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    return flags + [f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}"]  # PTX: runs on newer GPUs


def _torch_arch_flags() -> list[str]:
    """torch's own translation of ``$TORCH_CUDA_ARCH_LIST`` / the visible devices into nvcc flags."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    return list(get()) if get is not None else []


def arch_flags() -> tuple[list[str], str]:
    """nvcc arch flags for the CUDA build and their description."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    visible = torch.cuda.device_count()
    if env and (env != "native" or visible):
        return _torch_arch_flags(), f"TORCH_CUDA_ARCH_LIST={env}"
    if visible:
        return _torch_arch_flags(), "the visible GPUs' architectures"
    names = ", ".join("sm_" + a.replace(".", "") for a in CUDA_ARCHS)
    why = "TORCH_CUDA_ARCH_LIST=native" if env else "TORCH_CUDA_ARCH_LIST unset"
    return _gencode(CUDA_ARCHS), f"{names} + PTX (no CUDA device visible, {why})"


def _cpu_only_note(why: str) -> str:
    return f"{why}: built the CPU twin only; ConvTranspose1d uses the torch path on GPU"


def build_plan() -> BuildPlan:
    """Decide what to build from this torch and this machine (never from whether a GPU is visible alone)."""
    home, why = cuda_toolkit()
    if home is None:
        note = None if torch.version.cuda is None else _cpu_only_note(why or "no CUDA toolkit")
        return BuildPlan(cuda=False, note=note)
    flags, archs = arch_flags()
    return BuildPlan(cuda=True, arch_flags=tuple(flags), archs=archs)


def sources(cuda: bool | None = None) -> list[str]:
    """Source file names (relative to :func:`source_dir`) of the build with or without the CUDA part."""
    cuda = build_plan().cuda if cuda is None else cuda
    return CPU_SOURCES + (CUDA_SOURCES if cuda else [])


def source_digest(src: Path | None = None) -> str:
    """A short hash of every C++/CUDA source and header in ``csrc/`` (and of the OpenMP flag): a changed tree is
    another build.

    torch's own check (ninja's timestamps against one ``build.ninja`` per name) does not tell two
    trees apart that share the cache (an upgrade beside an old install, two checkouts): without the
    digest one of them could load the other's library.
    """
    src = source_dir() if src is None else src
    if src is None:
        return "nosrc"
    h = hashlib.sha256(" ".join(openmp_flags()).encode() + b"\0")  # the flags that change the code built
    for f in sorted(src.iterdir()):
        if f.suffix in (".cpp", ".cu", ".h", ".cuh") and f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def extension_name(cuda: bool | None = None) -> str:
    """The cache name of a build: one per source tree (:func:`source_digest`) and per torch build
    (an extension is tied to its torch's ABI)."""
    cuda = build_plan().cuda if cuda is None else cuda
    tag = re.sub(r"\W", "_", torch.__version__)
    return f"rvclora_C_{'cuda' if cuda else 'cpu'}_torch{tag}_{source_digest()}"


def _ops_registered() -> bool:
    return hasattr(torch.ops.rvclora, _PROBE_OP.split("::")[1])


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered kernels for CUDA tensors (not just the CPU twin).

    Known once :func:`load_error` has run (kept, since ops ask it per call, possibly while traced).
    """
    if "cuda_kernels" in _state:
        return _state["cuda_kernels"]
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, "CUDA"))
    except RuntimeError:  # the op is not registered at all
        return False


def _describe(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[-3:]) if lines else type(e).__name__}"


#: Seconds to wait for another build's lock file before giving up (``$RVCLORA_BUILD_LOCK_TIMEOUT``).
BUILD_LOCK_TIMEOUT = 120.0


def build_lock_timeout() -> float:
    """``$RVCLORA_BUILD_LOCK_TIMEOUT`` in seconds (>= 0), else :data:`BUILD_LOCK_TIMEOUT`."""
    text = os.environ.get("RVCLORA_BUILD_LOCK_TIMEOUT", "").strip()
    if not text:
        return BUILD_LOCK_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        warnings.warn(
            f"rvclora: RVCLORA_BUILD_LOCK_TIMEOUT={text!r} is not a number of seconds >= 0; using "
            f"{BUILD_LOCK_TIMEOUT:g}",
            RuntimeWarning,
            stacklevel=2,
        )
        return BUILD_LOCK_TIMEOUT
    return value


def lock_file_is_a_baton(cpp_extension_module) -> bool:
    """Whether this torch's builder treats the build directory's ``lock`` file as held while it exists.

    torch <= 2.13 uses ``FileBaton`` (existence = held; a killed build leaves it held forever);
    torch >= 2.14 holds an advisory lock on the file (``FileLock``), which outlives every build as a
    plain file and is released by the kernel when its holder dies.
    """
    names = vars(cpp_extension_module)
    return "FileBaton" in names and "FileLock" not in names


def wait_for_build_lock(build_dir: str, timeout: float | None = None) -> None:
    """Wait until ``build_dir`` holds no ``lock`` file; ``TimeoutError`` naming it after ``timeout`` seconds.

    torch's builder waits on that file forever, and a build killed half-way leaves it behind:
    the first LoRA forward (and ``rvclora info``) would hang without a word.
    """
    import time

    timeout = build_lock_timeout() if timeout is None else timeout
    lock = os.path.join(build_dir, "lock")
    deadline = time.monotonic() + timeout
    while os.path.exists(lock):
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the extension build directory {build_dir} is locked ({lock} has existed for "
                f"{timeout:g} s; a build killed half-way leaves it: delete it if no build is running, "
                "RVCLORA_BUILD_LOCK_TIMEOUT sets the wait)"
            )
        time.sleep(0.05)


def openmp_flags() -> list[str]:
    """``["-fopenmp"]`` on Linux when this torch parallelises with OpenMP, else ``[]`` (passes then run on one thread).

    ``at::parallel_for`` is a header template whose OpenMP build is a ``#pragma omp parallel``: an
    extension compiled without ``-fopenmp`` silently runs every parallel_for on one thread. The
    flag links the extension against ``libgomp.so.1``, the soname torch itself loads (the wheels
    ship it in ``torch/lib``), so the process keeps one OpenMP runtime and one thread pool.
    """
    if not sys.platform.startswith("linux"):  # Apple clang has no -fopenmp; MSVC spells it /openmp
        return []
    info = torch.__config__.parallel_info()
    return ["-fopenmp"] if "parallel backend: OpenMP" in info else []


def _jit_load(src: Path, cuda: bool, plan: BuildPlan) -> None:
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import load

    get_dir = getattr(cpp_extension, "_get_build_directory", None)
    if get_dir is not None and lock_file_is_a_baton(cpp_extension):  # torch's rule for where the lock lives
        wait_for_build_lock(get_dir(extension_name(cuda), False))
    load(
        name=extension_name(cuda),
        sources=[str(src / f) for f in sources(cuda)],
        extra_cflags=["-O3", *openmp_flags()],
        extra_ldflags=openmp_flags(),
        extra_cuda_cflags=["-O3", *plan.arch_flags] if cuda else None,
        extra_include_paths=[str(src)],
        with_cuda=cuda,
        is_python_module=False,
        verbose=False,
    )


def _build() -> tuple[str | None, str | None]:
    """``(error, note)``: why the extension is unavailable (None when loaded), why it has no CUDA kernels."""
    plan = build_plan()
    try:
        importlib.import_module("rvclora._C")
        if _ops_registered():
            if has_cuda_kernels() or torch.version.cuda is None:
                return None, None
            return None, plan.note or _cpu_only_note("rvclora._C was built ahead of time without its CUDA sources")
    except ImportError:
        pass
    src = source_dir()
    if src is None:
        return "the extension sources (csrc/) are not installed and rvclora._C was not built ahead of time", None
    note = plan.note
    if plan.cuda:
        try:
            _jit_load(src, True, plan)
        except Exception as e:  # noqa: BLE001 - a toolkit that cannot build the CUDA part leaves the CPU part
            note = _cpu_only_note(f"building the CUDA sources for {plan.archs} failed ({_describe(e)})")
            warnings.warn(f"rvclora: {note}", RuntimeWarning, stacklevel=4)
        else:
            if not _ops_registered():
                return _NOT_REGISTERED, None
            return None, None
    try:
        _jit_load(src, False, plan)
    except Exception as e:  # noqa: BLE001 - any build failure (no compiler, no ninja, compile error) disables us
        return f"building the rvclora._C extension from {src} failed ({_describe(e)})", note
    if not _ops_registered():
        return _NOT_REGISTERED, note
    return None, note


def _ensure_loaded() -> None:
    if "error" not in _state:
        with _lock:
            if "error" not in _state:
                err, note = _build()
                if err is not None:
                    warnings.warn(f"rvclora: {err}; the 'cuda' backend is unavailable", RuntimeWarning, stacklevel=4)
                _state["note"] = note
                _state["cuda_kernels"] = err is None and has_cuda_kernels()
                _state["error"] = err


def load_error() -> str | None:
    """Build/load the extension once; ``None`` when its ops are registered, else why not."""
    _ensure_loaded()
    return _state["error"]


def cuda_note() -> str | None:
    """After loading: why this CUDA torch's extension has no CUDA kernels (one line), else ``None``."""
    _ensure_loaded()
    return _state.get("note")
