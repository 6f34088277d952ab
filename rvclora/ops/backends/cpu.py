"""The ``cpu`` backend: the three LoRA ops as compiled CPU code (csrc/lora_cpu*.cpp, in ``rvclora._C``).

Ops (``torch.ops.rvclora``; ``needs`` = which of ``(x, weight, bias, lora_A, lora_B)`` need a
gradient, an unneeded one comes back as an empty ``(0,)`` tensor)::

    cpu_lora_linear_fwd(x, weight, bias?, lora_A, lora_B, scaling, dropout_p, seed?) -> (y, u)
    cpu_lora_conv1d_fwd(x, weight, bias?, lora_A, lora_B, scaling, stride, padding[2], dilation, groups,
                        padding_mode, dropout_p, seed?) -> (y, u)
    cpu_lora_conv_transpose1d_fwd(x, weight, bias?, lora_A, lora_B, scaling, stride, padding, output_padding,
                                  dilation, groups, dropout_p, seed?) -> (y, u)
    cpu_lora_*_bwd(grad_y, x, u, weight, lora_A, lora_B, <the forward's scalars>, seed?, needs[5])
        -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)
    cpu_dropout_mask(like, seed, dropout_p) -> mask

One op call per layer and direction. The base-sized forward and input gradient run in the
convolution/GEMM library (with the merged weight ``W + s·ΔW`` where merging is cheaper than a thin
pass over the activation); the thin LoRA passes (``u``; ``g_u = s·Bᵀg`` with ``grad_B``; ``grad_A``)
are BLAS calls on time blocks, a dilated tap being a view of ``x`` (see csrc/lora_cpu.cpp and the per-op
files csrc/lora_cpu_{linear,conv1d,convt}.cpp).
``auto`` runs this backend on CPU for what it supports. Without a usable BLAS (this torch exports no
``sgemm_``/``dgemm_``, they fail a calling-convention check, or ``RVCLORA_CPU_BLAS=0``) the backend is
unavailable, and ``auto`` runs the torch backend.
Eager calls go to ``cpu_lora_<op>(<the forward's arguments>) -> y``, whose autograd is a C++ Function over
the same bodies (no Python per layer call but the call); under ``torch.compile`` the ``_fwd``/``_bwd``
pair runs, with its autograd registered by :func:`rvclora.ops.autograd.fused_op`.
Autograd keeps ``x``, ``u``, the parameters and the seed; the dropout mask is a hash of
(seed, element index of ``x``), regenerated in backward.

float32 and float64 only: half-precision inputs (CPU autocast's bfloat16) and factors of another
dtype than ``x`` are declined in :func:`unsupported_reason`, so ``auto`` runs the torch backend for
them. When the extension cannot be built (no compiler), the backend is unavailable and ``auto``
falls back to the torch backend; ``rvclora info`` shows the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import time
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor

from .. import extension
from ..autograd import fused_op, op_name, run_once
from ..geometry import conv1d_out_len, conv_transpose1d_out_len
from ..spec import SPECS

NAME = "cpu"

__all__ = ["conv1d_plans", "dropout_mask", "lora_linear", "lora_conv1d", "lora_conv_transpose1d"]

_DTYPES = (torch.float32, torch.float64)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --------------------------------------------------------------------------- availability


def _ops_present() -> bool:
    return hasattr(torch.ops.rvclora, "cpu_lora_conv1d_fwd")


_available = False  # once the checks below passed: they cannot fail later in the process


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """``None`` once the extension is built and its ops registered (builds it on the first call).

    A constant for ``torch.compile``: evaluated once at trace time, never traced (the first call
    may run the compiler). Eagerly it runs twice per layer call (backend choice, entry point), so a
    success is remembered: the loaded library, its ops and its BLAS check do not change afterwards.
    """
    global _available
    if _available:
        return None
    err = extension.load_error()
    if err is not None:
        return f"{err}; the torch backend runs instead"
    if not _ops_present():
        return (
            "the rvclora._C extension has no cpu_* ops (built ahead of time from older sources?); "
            "rebuild it, or the torch backend runs instead"
        )
    if not hasattr(torch.ops.rvclora, "cpu_blas_ok"):
        return "the rvclora._C extension has no cpu_blas_ok op (built from older sources?); rebuild it"
    if not torch.ops.rvclora.cpu_blas_ok():
        # the thin LoRA passes are BLAS calls: without torch's sgemm_/dgemm_ there is no cpu backend
        return f"{torch.ops.rvclora.cpu_info()}; the torch backend runs instead"
    _register_python_parts()
    _available = True
    _load_plans()
    return None


def status_note() -> str:
    passes = torch.ops.rvclora.cpu_info() if hasattr(torch.ops.rvclora, "cpu_info") else "thin LoRA passes: unknown"
    return (
        f"compiled C++ LoRA ops on {torch.get_num_threads()} thread(s), float32/float64 "
        f"(other dtypes run on the torch backend); {passes}"
    )


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    if op not in __all__:
        return f"the cpu backend has no {op} (it runs lora_linear, lora_conv1d and lora_conv_transpose1d)"
    if x.device.type != "cpu":
        return f"the cpu backend runs CPU tensors only, got device {x.device.type!r}"
    if x.dtype not in _DTYPES:
        return f"the cpu backend runs float32 and float64 only, got {x.dtype}"
    weight, lora_A = params.get("weight"), params.get("lora_A")
    if weight is not None and weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x's {x.dtype}"
    if lora_A is not None and lora_A.dtype != x.dtype:
        return (
            f"LoRA factors in {lora_A.dtype} with x in {x.dtype} (autocast): the cpu backend computes in one "
            "dtype; the torch backend keeps the LoRA path in float32"
        )
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on: the torch backend handles its dtype policy"
    mode = params.get("padding_mode", "zeros")
    if op == "lora_conv1d" and mode not in _PADDING_MODES:
        return f"padding_mode {mode!r} is not one of {_PADDING_MODES}"
    groups = int(params.get("groups", 1))
    if lora_A is not None and lora_A.shape[0] % groups != 0:
        return f"rank r={lora_A.shape[0]} must be divisible by groups={groups}"
    return None


# --------------------------------------------------------------------------- fakes (autograd: rvclora.ops.autograd)


def _linear_fwd_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    m = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((m, lora_A.shape[0]))


def _conv1d_fwd_fake(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, dilation, groups, padding_mode, dropout_p, seed
):
    t_out = conv1d_out_len(x.shape[-1], weight.shape[-1], stride, padding[0] + padding[1], dilation)
    return x.new_empty((x.shape[0], weight.shape[0], t_out)), x.new_empty((x.shape[0], lora_A.shape[0], t_out))


def _convt_fwd_fake(
    x, weight, bias, lora_A, lora_B, scaling, stride, padding, output_padding, dilation, groups, dropout_p, seed
):
    t_out = conv_transpose1d_out_len(x.shape[-1], weight.shape[-1], stride, padding, output_padding, dilation)
    return (
        x.new_empty((x.shape[0], weight.shape[1] * groups, t_out)),
        x.new_empty((x.shape[0], lora_A.shape[0], x.shape[-1])),
    )


@run_once
def _register_python_parts() -> None:
    """Fakes and autograd for the C++ ops (once, after the library is loaded)."""
    for op, fake in (
        ("lora_linear", _linear_fwd_fake),
        ("lora_conv1d", _conv1d_fwd_fake),
        ("lora_conv_transpose1d", _convt_fwd_fake),
    ):
        spec = SPECS[op]
        torch.library.register_fake(f"rvclora::{op_name(NAME, spec, 'fwd')}")(fake)
        # eagerly, rvclora::cpu_<op>: the same bodies with their autograd in C++ (csrc/lora_cpu.cpp), no
        # Python per layer call beyond the call itself; under torch.compile the _fwd/_bwd custom ops
        native = getattr(torch.ops.rvclora, f"{NAME}_{op}", None)
        _RUN[op] = fused_op(spec, NAME, below_autograd=True, eager_native=None if native is None else native.default)
    torch.library.register_fake("rvclora::cpu_dropout_mask")(
        lambda like, seed, dropout_p: torch.empty_like(like, memory_format=torch.contiguous_format)
    )


#: ``run(*args) -> y`` per op (:func:`rvclora.ops.autograd.fused_op`), once the extension is loaded.
_RUN: dict = {}


# --------------------------------------------------------------------------- the ops


def _entry_point(op: str):
    """``op``'s entry point in the one calling convention (options already normalised by the op spec)."""

    def entry(*args):
        why = unavailable_reason()
        if why is not None:
            raise RuntimeError(f"rvclora cpu backend unavailable: {why}")
        if args[-1] is not None and not args[-2] > 0:
            args = (*args[:-1], None)  # no seed without dropout
        return _RUN[op](*args)

    entry.__name__ = entry.__qualname__ = op
    return entry


lora_linear = _entry_point("lora_linear")
lora_conv1d = _entry_point("lora_conv1d")
lora_conv_transpose1d = _entry_point("lora_conv_transpose1d")


def conv1d_plans() -> tuple[float, list[dict]]:
    """The Conv1d plans of this process: (seconds spent timing them here, one ``{"key", "plan", "library_ms",
    "direct_ms", "measured"}`` per layer geometry and direction). ``library`` runs the convolution in oneDNN and
    the LoRA terms in the thin passes; ``direct`` runs y and u (and the input gradient) in the thin passes' own
    microkernel with the merged weight (csrc/lora_cpu_conv1d.cpp). ``measured`` is False for a plan read from
    the per-machine cache (:func:`_load_plans`). Empty before the extension is loaded."""
    if not hasattr(torch.ops.rvclora, "cpu_conv1d_plans"):
        return 0.0, []
    lines = torch.ops.rvclora.cpu_conv1d_plans().splitlines()
    seconds = float(lines[0].split("\t")[1])
    plans = []
    for line in lines[1:]:
        key, plan, lib_ms, dir_ms, how = line.split("\t")
        plans.append(
            {
                "key": key,
                "plan": plan,
                "library_ms": float(lib_ms),
                "direct_ms": float(dir_ms),
                "measured": how == "measured",
            }
        )
    return seconds, plans


#: The prefix of a Conv1d plan's key in auto's per-machine cache (rvclora.ops.autoselect), beside its decisions.
PLAN_KEY_PREFIX = "cpu conv1d plan: "


def _load_plans() -> None:
    """Hand the plans earlier processes timed on this machine (auto's cache file, same environment key) to the
    op, and save the ones this process times when it exits. Only when auto measures (not with
    ``RVCLORA_AUTOSELECT=fixed``, where the op runs the library plan anyway)."""
    from .. import autoselect

    if autoselect.mode() != autoselect.MEASURE or not hasattr(torch.ops.rvclora, "cpu_conv1d_plan_set"):
        return
    sel = autoselect.get_selector()
    env = sel.env_key(torch.device("cpu"))
    for key, hit in sel.entries().get(env, {}).items():
        choice, secs = hit.get("choice"), hit.get("seconds", {})
        if key.startswith(PLAN_KEY_PREFIX) and choice in ("library", "direct"):
            torch.ops.rvclora.cpu_conv1d_plan_set(
                key[len(PLAN_KEY_PREFIX) :],
                choice,
                float(secs.get("library", 0.0)) * 1e3,
                float(secs.get("direct", 0.0)) * 1e3,
            )
    atexit.register(_save_plans, sel, env)


def _save_plans(sel, env: str) -> None:
    """At exit: the plans timed in this process into auto's cache file (one atomic write). A process killed
    before it exits loses only these timings; the next one times them again."""
    from .. import autoselect

    try:
        if autoselect.mode() != autoselect.MEASURE:
            return
        new = [p for p in conv1d_plans()[1] if p["measured"]]
        if not new:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sel.record(
            env,
            {
                PLAN_KEY_PREFIX + p["key"]: {
                    "choice": p["plan"],
                    "seconds": {"library": p["library_ms"] / 1e3, "direct": p["direct_ms"] / 1e3},
                    "failed": {},
                    "tolerance": 0.0,
                    "measured_at": stamp,
                }
                for p in new
            },
        )
    except Exception as e:  # noqa: BLE001 - at exit: a failure to cache must not turn into a traceback
        warnings.warn(f"rvclora: could not cache the cpu backend's Conv1d plans: {e}", RuntimeWarning, stacklevel=1)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """While ``auto`` times this backend on a shortened synthetic input (rvclora.ops.autoselect), Conv1d
    geometries without a plan run the library plan and time nothing: the plans are timed on the model's own
    first call, at its real length."""
    hold = getattr(torch.ops.rvclora, "cpu_conv1d_plan_hold", None) if _available else None
    if hold is None:
        yield
        return
    hold(True)
    try:
        yield
    finally:
        hold(False)


def dropout_mask(seed: Tensor | None, shape: list[int], p: float, device, dtype) -> Tensor:
    """The mask ``D`` applies to an ``x`` of ``shape``: 0 or ``1/(1-p)``, a hash of (seed, element index)."""
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"rvclora cpu backend unavailable: {why}")
    if seed is None:
        if p != 0.0:
            raise ValueError(f"dropout_mask: p={p} > 0 needs a seed")
        seed = torch.zeros((), dtype=torch.int64)
    if dtype not in _DTYPES:
        return dropout_mask(seed, shape, p, device, torch.float64).to(dtype)
    like = torch.empty(tuple(shape), device="cpu", dtype=dtype)
    return torch.ops.rvclora.cpu_dropout_mask(like, seed, float(p)).to(device)
