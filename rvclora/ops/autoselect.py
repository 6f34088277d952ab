"""Measured backend choice for ``auto`` (CUDA and CPU): a fused kernel runs only where it is correct and faster.

The fused kernels were written and checked without a GPU (interpreter, CPU twin, compiled
resource checks); how fast they are on a given GPU and shape is only known by running them.
So on the first call of a *shape class* (op, layer geometry, dtypes, rows rounded up to a power
of two, dropout on/off, training or inference) on a CUDA device or the CPU, :class:`AutoSelector`:

1. builds random inputs of that class on the device (never the caller's tensors);
2. runs every capable fused backend and the torch path on them, forward and, when training,
   backward, and compares outputs and gradients with the oracle (computed once per class when
   there is no dropout) within the dtype's tolerance (:func:`tolerance`). A fused backend that
   disagrees (or raises) is disabled for that class, with one warning naming the op and shape.
   That first call is also each candidate's warm-up (compilation, autotuning, algorithm search);
3. times the correct candidates in interleaved rounds (CUDA events) and keeps the fastest.

Decisions are kept in memory and in a small JSON file (:func:`cache_path`), keyed by the GPU's
name and compute capability (on CPU: the CPU model, its vector ISA and the thread count), the
torch, triton and rvclora versions and the digest of the compiled kernels' sources, so a process
pays for a measurement once per shape class and machine, and a rebuilt extension measures again.
``rvclora info`` lists them.

On CPU the candidates are the compiled ``cpu`` backend and the torch path (each runs in CI through
the backend matrix, whatever is picked here). To keep the first training step cheap, a CPU class is
measured on at most :data:`CPU_MEASURE_LEN` samples of time (rows for Linear) and
:data:`CPU_ROUNDS` interleaved rounds, timed with ``time.perf_counter``; :func:`measure_note` says
how many classes were measured and what it cost (the 40k generator: about 40 classes).

No measurement happens inside a ``torch.compile`` trace or a CUDA-graph capture (it would run
real kernels where only recording is allowed): there the cached decision is used, and without
one the fixed rule. ``RVCLORA_AUTOSELECT=fixed`` uses the fixed rule everywhere, with no
measurement (deterministic choices): the fused backend's own ``prefer`` rule for Linear and
Conv1d, the torch path for ConvTranspose1d (its fused kernel's speed is unmeasured).
``RVCLORA_AUTOSELECT=measure`` (the default) measures. ``RVCLORA_AUTOSELECT_CACHE`` names the
JSON file (empty: no file, memory only).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import threading
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .spec import SPECS

__all__ = [
    "AutoSelector",
    "ClockTimer",
    "CudaEventTimer",
    "FIXED",
    "MEASURE",
    "cache_path",
    "decisions",
    "describe_cpu",
    "environment_key",
    "get_selector",
    "measure_note",
    "strategy_summary",
    "mode",
    "shape_class",
    "tolerance",
]

MEASURE, FIXED = "measure", "fixed"
_MODES = (MEASURE, FIXED)


def mode() -> str:
    """``$RVCLORA_AUTOSELECT``: ``measure`` (default) or ``fixed``."""
    value = os.environ.get("RVCLORA_AUTOSELECT", MEASURE).strip().lower() or MEASURE
    if value not in _MODES:
        raise ValueError(f"RVCLORA_AUTOSELECT must be one of {_MODES}, got {value!r}")
    return value


def cache_path() -> str | None:
    """The decisions file: ``$RVCLORA_AUTOSELECT_CACHE``, else ``$XDG_CACHE_HOME/rvclora/autoselect.json``
    (``~/.cache`` by default); ``None`` when ``$RVCLORA_AUTOSELECT_CACHE`` is set empty."""
    explicit = os.environ.get("RVCLORA_AUTOSELECT_CACHE")
    if explicit is not None:
        return explicit or None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rvclora", "autoselect.json")


def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted ``‖fused − torch‖ / ‖torch‖`` for ``dtype``.

    Both paths round differently (accumulation order, and for fp32 the torch path may run in
    TF32, which cuDNN and cuBLAS allow by default for convolutions); a wrong kernel (a bad index,
    a missing term) is off by far more, typically O(1).
    """
    return {torch.float64: 1e-9, torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}.get(dtype, 6e-2)


def _versions() -> dict[str, str]:
    from .. import __version__

    out = {"torch": torch.__version__, "rvclora": __version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "none"
    # the compiled kernels' sources: a rebuilt extension (same version, new kernels) measures again
    # instead of trusting decisions timed against the old ones
    from .extension import source_digest

    try:
        out["kernels"] = source_digest()
    except OSError:
        out["kernels"] = "unknown"
    return out


def _cuda_device_info(device: torch.device) -> dict[str, str]:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}"}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def _cpu_family() -> str:
    """`` family F model M`` from ``/proc/cpuinfo`` (a VM's model name can be as bare as "AMD EPYC"), or ``""``."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
    except OSError:
        return ""
    if "cpu family" in fields and "model" in fields:
        return f" family {fields['cpu family']} model {fields['model']}"
    return ""


@functools.lru_cache(maxsize=1)
def _cpu_isa() -> str:
    """The vector ISA torch's CPU kernels use here (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _cpu_device_info(device: torch.device) -> dict[str, str]:
    return {"name": cpu_model(), "capability": _cpu_isa(), "threads": str(torch.get_num_threads())}


def _device_info(device: torch.device) -> dict[str, str]:
    return _cpu_device_info(device) if device.type == "cpu" else _cuda_device_info(device)


def describe_cpu() -> str:
    """One line: the CPU model, its ISA, torch's thread count, and what runs the cpu backend's thin passes."""
    from . import dispatch

    line = f"{cpu_model()}{_cpu_family()} ({_cpu_isa()}, {torch.get_num_threads()} threads)"
    why = dispatch._unavailable("cpu")
    if why is None and hasattr(torch.ops.rvclora, "cpu_info"):
        line += f"; cpu backend: {torch.ops.rvclora.cpu_info()}"
    elif why is not None:
        line += f"; cpu backend unavailable ({why})"
    return line


def environment_key(info: dict[str, str], versions: dict[str, str]) -> str:
    """The cache section of one machine and software stack."""
    if "threads" in info:  # a CPU
        where = f"{info['name']} {info['capability']} threads={info['threads']}"
    else:
        where = f"{info['name']} sm{info['capability']}"
    key = f"{where} torch {versions['torch']} triton {versions['triton']} rvclora {versions['rvclora']}"
    return key + (f" kernels {versions['kernels']}" if "kernels" in versions else "")


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def rows_of(op: str, x: Tensor, weight: Tensor, params: dict[str, Any]) -> int:
    """The GEMM rows of a call: the leading elements of a Linear, ``N·T_out`` of a convolution."""
    if op == "lora_linear":
        return x.numel() // max(x.shape[-1], 1)
    return x.numel() // max(x.shape[1], 1)  # N·T (N·H·W of a Conv2d)


def shape_class(op: str, x: Tensor, params: dict[str, Any], training: bool) -> str:
    """A readable key: everything that changes the kernels' code or tiling, rows rounded up to a power of two."""
    weight, lora_A = params["weight"], params["lora_A"]
    p = float(params.get("dropout_p", 0.0))
    geo = [f"w{tuple(weight.shape)}", f"A{tuple(lora_A.shape)}"]
    for name in SPECS[op].option_names:
        if name in params:
            value = params[name]
            geo.append(f"{name}={tuple(value) if isinstance(value, (tuple, list)) else value}")
    dtypes = f"{str(x.dtype)[6:]}/{str(weight.dtype)[6:]}/{str(lora_A.dtype)[6:]}"
    t = "" if op == "lora_linear" else f" T~{_pow2(x.shape[-1])}"
    return (
        f"{op} {' '.join(geo)} rows~{_pow2(rows_of(op, x, weight, params))}{t} {dtypes} "
        f"dropout={'on' if p > 0 else 'off'} {'train' if training else 'infer'}"
    )


# --------------------------------------------------------------------------- timers


class ClockTimer:
    """Times callables with a clock (``time.perf_counter``, or a fake one in tests), interleaved; each callable's
    fastest round (on a shared CPU, noise only ever adds time: another process, an interrupt, a page fault).

    ``sync`` waits for queued device work before each clock read (``torch.cuda.synchronize``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None):
        self.clock, self.sync = clock, sync

    def __call__(self, fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                self.sync()
                t0 = self.clock()
                fn()
                self.sync()
                times[name].append(self.clock() - t0)
        return {name: min(ts) for name, ts in times.items()}


class CudaEventTimer:
    """Median seconds per call from CUDA events, candidates interleaved round by round."""

    def __call__(self, fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
        events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events[name].append((start, end))
        torch.cuda.synchronize()
        return {name: statistics.median(s.elapsed_time(e) / 1e3 for s, e in pairs) for name, pairs in events.items()}


# --------------------------------------------------------------------------- inputs of a shape class


def _lora_B_shape(op: str, weight: Tensor, lora_A: Tensor, groups: int) -> tuple[int, ...]:
    return SPECS[op].lora_shapes(tuple(weight.shape), groups, lora_A.shape[0])[1]


#: On CPU a class is measured on at most this many samples of time (Conv1d, ConvTranspose1d) or rows
#: (Linear): per-sample costs scale with the length, the per-call costs do not, and the first step stays cheap.
CPU_MEASURE_LEN = 1024
#: Interleaved timing rounds per class on CPU (after one warm-up call of each candidate); the fastest round counts.
CPU_ROUNDS = 2


def _measure_shape(op: str, x: Tensor, params: dict[str, Any]) -> tuple[int, ...]:
    """The input shape a class is measured on: the call's, shortened on CPU (:data:`CPU_MEASURE_LEN`)."""
    shape = tuple(x.shape)
    if x.device.type != "cpu":
        return shape
    if op == "lora_linear":
        rows = x.numel() // max(x.shape[-1], 1)
        return (min(rows, CPU_MEASURE_LEN), x.shape[-1]) if rows > CPU_MEASURE_LEN else shape
    weight = params["weight"]
    reach = int(params.get("dilation", 1)) * (weight.shape[-1] - 1) + 1
    keep = max(CPU_MEASURE_LEN, reach * int(params.get("stride", 1)))
    return (*shape[:-1], min(shape[-1], keep))


def _synthetic_call(op: str, x: Tensor, params: dict[str, Any], training: bool, seed: int = 1234):
    """Fresh random inputs with the call's shapes (:func:`_measure_shape`), dtypes and device, and the
    op's keyword options."""
    weight, lora_A = params["weight"], params["lora_A"]
    x_shape = _measure_shape(op, x, params)
    spec = SPECS[op]
    groups = spec.groups_of(params)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=x.device, dtype=dtype)

    fan = max(weight[0].numel(), 1) if not spec.transposed else max(weight.shape[0] // groups, 1)
    out_ch = spec.out_channels(weight.shape, groups)
    tensors = {
        "x": rand(x_shape, x.dtype),
        "weight": rand(weight.shape, weight.dtype, fan**-0.5),
        "bias": rand((out_ch,), weight.dtype),
        "lora_A": rand(lora_A.shape, lora_A.dtype, max(lora_A.shape[1], 1) ** -0.5),
        "lora_B": rand(_lora_B_shape(op, weight, lora_A, groups), lora_A.dtype, 0.5),
    }
    if training:
        for name in ("x", "lora_A", "lora_B"):
            tensors[name].requires_grad_(True)
    kw = {k: params[k] for k in spec.option_names if k in params}
    p = float(params.get("dropout_p", 0.0))
    kw.update(dropout_p=p, seed=torch.tensor(seed, dtype=torch.int64) if p > 0 else None)
    return tensors, kw


def _run(
    backend,
    op: str,
    tensors: dict[str, Tensor],
    kw: dict[str, Any],
    grad_out: Tensor | Callable[[Tensor], Tensor] | None,
):
    """One call of ``backend``'s ``op``; returns the output and, when ``grad_out`` is given, the gradients.

    ``grad_out`` may be a function of the output (it makes the output's gradient once its shape is known)."""
    t = {k: (v.detach().requires_grad_(v.requires_grad) if v is not None else None) for k, v in tensors.items()}
    y = SPECS[op].call(
        getattr(backend, op),
        t["x"],
        t["weight"],
        t["bias"],
        t["lora_A"],
        t["lora_B"],
        0.75,
        kw,
        kw["dropout_p"],
        kw["seed"],
    )
    if grad_out is None:
        return [y]
    leaves = [t[k] for k in ("x", "lora_A", "lora_B") if t[k].requires_grad]
    return [y, *torch.autograd.grad(y, leaves, grad_out(y) if callable(grad_out) else grad_out)]


def _rel_err(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    a64, b64 = a.detach().double(), b.detach().double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return (a64 - b64).norm().item() / max(b64.norm().item(), 1e-30)


# --------------------------------------------------------------------------- the selector


class AutoSelector:
    """Validates, times and remembers the fused-vs-torch choice per shape class (see the module docstring).

    ``timer``, ``device_info`` and ``versions`` are injectable so that the logic is tested
    without a GPU (a fake clock, a fake device).
    """

    def __init__(
        self,
        path: str | None = None,
        timer: Callable | None = None,
        device_info: Callable[[torch.device], dict[str, str]] = _device_info,
        versions: dict[str, str] | None = None,
        rounds: int = 7,
    ):
        self.path = path
        self.timer = timer
        self.device_info = device_info
        self.versions = versions or _versions()
        self.rounds = rounds
        self._lock = threading.RLock()
        self._memory: dict[str, dict[str, dict[str, Any]]] = {}
        self._file_loaded = False
        self._warned: set = set()
        #: what was wrong with the cache file when it was read (``None``: nothing), for ``rvclora info``
        self.cache_problem: str | None = None
        self.measured: list[tuple[str, float]] = []  # (shape class, seconds spent measuring it)
        self._memo: dict[tuple, str] = {}
        self.chosen: dict[str, str] = {}  # shape class (or "fixed rule <op>") -> the backend it ran, this process

    # -- cache ----------------------------------------------------------------

    def _load_file(self) -> None:
        if self._file_loaded:
            return
        self._file_loaded = True
        if not self.path or not os.path.isfile(self.path):
            return
        entries, bad = _read_cache(self.path)
        for env, table in entries.items():
            self._memory.setdefault(env, {}).update(table)
        if bad:
            # what is bad is dropped: the next decision rewrites the file without it
            self.cache_problem = bad
            from ..io import RVCLoRAWarning

            warnings.warn(
                f"autoselect cache {self.path}: {bad}; ignored (it is rewritten without them at the next measurement)",
                RVCLoRAWarning,
                stacklevel=4,
            )

    def _save_file(self) -> None:
        if not self.path:
            return
        from ..io import RVCLoRAWarning, atomic_write

        text = json.dumps({"format": 1, "entries": self._memory}, indent=1, sort_keys=True)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            atomic_write(self.path, write)  # O_EXCL | O_NOFOLLOW temporary, then an atomic rename
        except OSError as e:
            warnings.warn(f"cannot write the autoselect cache {self.path}: {e}", RVCLoRAWarning, stacklevel=3)

    def cached(self, env: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            self._load_file()
            return self._memory.get(env, {}).get(key)

    def entries(self) -> dict[str, dict[str, dict[str, Any]]]:
        with self._lock:
            self._load_file()
            return {env: dict(table) for env, table in self._memory.items()}

    def record(self, env: str, entries: dict[str, dict[str, Any]]) -> None:
        """Add decisions measured elsewhere (the cpu backend's Conv1d plans) to memory and the file."""
        with self._lock:
            self._load_file()
            self._memory.setdefault(env, {}).update(entries)
            self._save_file()

    # -- choice ---------------------------------------------------------------

    def env_key(self, device: torch.device) -> str:
        return environment_key(self.device_info(device), self.versions)

    def choose(
        self,
        op: str,
        x: Tensor,
        params: dict[str, Any],
        fused: Sequence,
        torch_backend,
        fixed_choice,
        can_measure: bool = True,
    ):
        """The backend module to run ``op``: one of ``fused`` (capable fused backends) or ``torch_backend``.

        ``fixed_choice`` is the module the fixed rule picks; it is used when measuring is off or
        not possible here (``can_measure`` False: inside a trace or a graph capture) and no
        decision is cached.
        """
        if not fused:
            return torch_backend
        if "weight" not in params or "lora_A" not in params:
            return fixed_choice  # a query without the layer's shapes (which backend would run?): nothing to measure
        if mode() == FIXED:
            self.chosen[f"fixed rule {op}"] = fixed_choice.NAME
            return fixed_choice
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, params.get("weight"), params.get("lora_A"))
        )
        by_name = {m.NAME: m for m in (*fused, torch_backend)}
        # per-call fast path: the exact call signature seen before in this process (the shape class,
        # its environment key and the cache lookup cost tens of microseconds, per layer and step)
        weight, lora_A = params["weight"], params["lora_A"]
        memo = (
            op,
            tuple(x.shape),
            x.dtype,
            x.device,
            tuple(weight.shape),
            weight.dtype,
            tuple(lora_A.shape),
            lora_A.dtype,
            training,
            torch.get_num_threads(),
            tuple(by_name),
            tuple(
                (k, tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in params.items()
                if not isinstance(v, Tensor)
            ),
        )
        name = self._memo.get(memo)
        if name is not None:
            return by_name[name]
        key = shape_class(op, x, params, training)
        env = self.env_key(x.device)
        hit = self.cached(env, key)
        if hit is not None and hit.get("choice") in by_name:
            self.chosen[key] = hit["choice"]
            self._memo[memo] = hit["choice"]
            return by_name[hit["choice"]]
        if not can_measure:
            return fixed_choice
        with self._lock:
            hit = self.cached(env, key)  # another thread may have measured it meanwhile
            if hit is None or hit.get("choice") not in by_name:
                t0 = time.perf_counter()
                hit = self._measure(op, x, params, training, fused, torch_backend)
                self.measured.append((key, time.perf_counter() - t0))
                self._memory.setdefault(env, {})[key] = hit
                self._save_file()
        for name, why in hit.get("failed", {}).items():
            if (env, key, name) not in self._warned:
                self._warned.add((env, key, name))
                warnings.warn(
                    f"rvclora: the {name} backend's {op} failed validation for {key} and is disabled "
                    f"for it ({why}); using {hit['choice']}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        self.chosen[key] = hit["choice"]
        self._memo[memo] = hit["choice"]
        return by_name[hit["choice"]]

    def _measure(self, op, x, params, training, fused, torch_backend) -> dict[str, Any]:
        tensors, kw = _synthetic_call(op, x, params, training)
        cpu = x.device.type == "cpu"
        grads: list[Tensor] = []

        def grad_out(y: Tensor) -> Tensor:
            # the output's gradient, made once from the first call's output shape; fixed, so every candidate
            # and the oracle see the same one
            if not grads:
                gen = torch.Generator().manual_seed(7)
                grads.append(torch.randn(y.shape, generator=gen).to(device=x.device, dtype=x.dtype))
            return grads[0]

        with (
            contextlib.ExitStack() as hooks,
            torch.autocast(x.device.type, enabled=False),
            torch.enable_grad() if training else torch.no_grad(),
        ):
            for be in fused:  # a backend's own measuring hook (the cpu backend holds its Conv1d plan timing)
                if callable(getattr(be, "measuring", None)):
                    hooks.enter_context(be.measuring())
            # Each candidate's first call is both its check against the oracle and its warm-up (Triton's
            # autotuner and compilation, cuDNN's algorithm search, oneDNN's primitive cache); without dropout
            # the oracle runs once for all of them. The torch path's own distance to the oracle widens the
            # tolerance where it must (TF32).
            oracles: dict[str, list[Tensor]] = {}
            torch_err = _validate(torch_backend, op, tensors, kw, grad_out if training else None, oracles)
            tol = max(tolerance(x.dtype), 4 * torch_err) if torch_err == torch_err else tolerance(x.dtype)
            failed: dict[str, str] = {}
            good = [torch_backend]
            for be in fused:
                try:
                    err = _validate(be, op, tensors, kw, grad_out if training else None, oracles)
                except Exception as e:  # noqa: BLE001 - any failure disables the kernel for this class
                    failed[be.NAME] = f"raised {type(e).__name__}: {str(e)[:200]}"
                    continue
                if not err <= tol:
                    failed[be.NAME] = f"relative error {err:.3g} > {tol:.3g} against the oracle"
                    continue
                good.append(be)
            timer = self.timer or (ClockTimer() if cpu else CudaEventTimer())
            g = grads[0] if grads else None
            fns: dict[str, Callable[[], None]] = {
                be.NAME: functools.partial(_run, be, op, tensors, kw, g) for be in good
            }
            times = timer(fns, min(self.rounds, CPU_ROUNDS) if cpu else self.rounds) if len(fns) > 1 else {}
        choice = min(times, key=lambda n: (times[n], n != torch_backend.NAME)) if times else torch_backend.NAME
        return {
            "choice": choice,
            "seconds": dict(times),
            "failed": failed,
            "tolerance": tol,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _oracle(op: str, args: Sequence, kw: dict[str, Any], mask: Tensor | None):
    """The oracle (rvclora.reference) on ``args = (x, weight, bias, lora_A, lora_B, scaling)``."""
    x, weight, bias, lora_A, lora_B, scaling = args
    return SPECS[op].run_reference(x, weight, bias, lora_A, lora_B, scaling, kw, dropout_mask=mask)


def _validate(
    backend,
    op: str,
    tensors: dict[str, Tensor],
    kw: dict[str, Any],
    grad_out: Tensor | Callable[[Tensor], Tensor] | None,
    oracles: dict[str, list[Tensor]] | None = None,
) -> float:
    """Worst relative error of ``backend``'s output (and gradients) against the oracle, evaluated in
    fp32 (fp64 for fp64 inputs) on the same inputs with the backend's own dropout mask.

    ``oracles`` keeps the oracle's result between candidates when there is no dropout mask (the oracle then
    does not depend on the backend)."""
    got = _run(backend, op, tensors, kw, grad_out)
    x = tensors["x"]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    p = kw["dropout_p"]
    mask = backend.dropout_mask(kw["seed"], tuple(x.shape), p, x.device, acc) if p > 0 else None
    expect = oracles.get("unmasked") if oracles is not None and mask is None else None
    if expect is None:
        t_acc = {
            k: (v.detach().to(acc).requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in tensors.items()
        }
        oracle = types.SimpleNamespace(**{op: lambda *a: _oracle(op, a[:6], kw, mask)})
        g = grad_out(got[0]) if callable(grad_out) else grad_out
        expect = _run(oracle, op, t_acc, kw, None if g is None else g.to(acc))
        if oracles is not None and mask is None:
            oracles["unmasked"] = expect
    if len(got) != len(expect):
        return float("inf")
    return max(_rel_err(a, b) for a, b in zip(got, expect))


#: A cache file larger than this is not read (a decision is ~300 bytes).
MAX_CACHE_BYTES = 16 << 20


def _valid_entry(hit: Any) -> bool:
    """A decision as :meth:`AutoSelector._measure` writes it (what ``choose`` and ``rvclora info`` read)."""
    if not isinstance(hit, dict) or not isinstance(hit.get("choice"), str):
        return False
    seconds, failed = hit.get("seconds", {}), hit.get("failed", {})
    if not isinstance(seconds, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in seconds.items()
    ):
        return False
    if not isinstance(failed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in failed.items()):
        return False
    tol = hit.get("tolerance", 0.0)
    return isinstance(tol, (int, float)) and not isinstance(tol, bool)


def _read_cache(path: str) -> tuple[dict[str, dict[str, dict[str, Any]]], str | None]:
    """The valid decisions of the cache file, and what was wrong with the rest (``None``: nothing)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CACHE_BYTES:
            return {}, f"{size} bytes, over the {MAX_CACHE_BYTES} a cache may have"
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested beyond the parser's depth
        return {}, f"unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("entries"), dict):
        return {}, "not an rvclora autoselect cache (expected {'format': 1, 'entries': {...}})"
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    bad = 0
    for env, table in data["entries"].items():
        if not isinstance(table, dict):
            bad += 1
            continue
        for key, hit in table.items():
            if _valid_entry(hit):
                entries.setdefault(env, {})[key] = hit
            else:
                bad += 1
    return entries, (f"{bad} malformed entries" if bad else None)


_selector: AutoSelector | None = None
_selector_lock = threading.Lock()


def get_selector() -> AutoSelector:
    """The process-wide selector (its cache file from :func:`cache_path` at first use)."""
    global _selector
    with _selector_lock:
        if _selector is None:
            _selector = AutoSelector(cache_path())
        return _selector


def _cpu_conv1d_plans() -> tuple[float, list[dict]]:
    """The cpu backend's measured Conv1d plans in this process (nothing when its extension is not loaded)."""
    if not hasattr(torch.ops.rvclora, "cpu_conv1d_plans"):
        return 0.0, []
    from .backends import cpu

    return cpu.conv1d_plans()


def measure_note() -> str | None:
    """One line on what ``auto`` measured in this process (``None`` when it measured nothing)."""
    sel = _selector
    plan_s, plans = _cpu_conv1d_plans()
    parts = []
    if sel is not None and sel.measured:
        total = sum(s for _, s in sel.measured)
        parts.append(
            f"auto measured {len(sel.measured)} new layer shape(s) in {total:.2f} s (once per machine; cached in "
            f"{sel.path or 'memory only'})"
        )
    timed = sum(p["measured"] for p in plans)
    if timed:
        parts.append(
            f"the cpu backend timed {timed} Conv1d plan(s) in {plan_s:.2f} s (cached with auto's decisions at exit)"
        )
    return "; ".join(parts) or None


def strategy_summary() -> str | None:
    """One line: which backend ``auto`` ran on how many layer shapes in this process (``None``: none yet)."""
    sel = _selector
    if sel is None or not sel.chosen:
        return None
    counts: dict[str, int] = {}
    for name in sel.chosen.values():
        counts[name] = counts.get(name, 0) + 1
    if all(k.startswith("fixed rule") for k in sel.chosen):
        return "auto (fixed rule) ran " + ", ".join(
            f"{name} for {k[len('fixed rule ') :]}" for k, name in sorted(sel.chosen.items())
        )
    line = "auto (measured per layer shape) ran " + ", ".join(
        f"{name} on {n} shape(s)" for name, n in sorted(counts.items())
    )
    _, plans = _cpu_conv1d_plans()
    if plans:
        direct = sum(p["plan"] == "direct" for p in plans)
        line += (
            f"; cpu Conv1d plans known to this process (timed here or read from the per-machine cache, per layer "
            f"and direction): direct kernel {direct}, oneDNN + thin passes {len(plans) - direct}"
        )
    return line


def decisions() -> list[tuple[str, str, dict[str, Any]]]:
    """``(environment, shape class, decision)`` for every cached decision, for ``rvclora info``."""
    out = []
    for env, table in sorted(get_selector().entries().items()):
        for key, hit in sorted(table.items()):
            out.append((env, key, hit))
    return out
