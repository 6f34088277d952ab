"""The benchmark harness of ``pytest bench/`` (imported by ``conftest.py``, which holds only the
pytest hooks and fixtures): variants, rows and plans, the interleaved measurement, saved-bytes
counts and their bound, the machine record, and the table."""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn as nn

#: Column order of the table and the JSON.
VARIANTS = ("base", "rvclora", "plain", "peft", "loralib", "full")

BENCH_DIR = Path(__file__).resolve().parent


def layer_floor(m: nn.Module, r: int) -> float:
    """docs/maths.md: LoRA's least extra flops as a fraction of the layer's frozen step."""
    if isinstance(m, nn.ConvTranspose1d):
        return r / m.in_channels + r / (m.out_channels * m.kernel_size[0])
    if isinstance(m, nn.Conv1d):
        return r / m.out_channels + r / (m.in_channels * m.kernel_size[0])
    return r / m.in_features + r / m.out_features


def lora_extra(m: nn.Module, in_shape: Sequence[int], r: int, itemsize: int = 4) -> tuple[float, float]:
    """``(flops, bytes)`` LoRA adds to one training step of layer ``m`` on an input of ``in_shape``
    (docs/maths.md, "The roofline floor"): the four rank-r passes, and the traffic of the fused
    design (``u`` written and read back, ``x`` read once more for ``grad_A``)."""
    n, t = int(in_shape[0]) if len(in_shape) > 1 else 1, int(in_shape[-1])
    if isinstance(m, nn.ConvTranspose1d):
        cin, cout, k, g = m.in_channels, m.out_channels, m.kernel_size[0], m.groups
        flops = 2.0 * n * t * r * (2 * cin / g + 2 * cout * k / g)
        return flops, float(itemsize * (2 * n * r * t + n * cin * t))
    if isinstance(m, nn.Conv1d):
        cin, cout, k, g = m.in_channels, m.out_channels, m.kernel_size[0], m.groups
        pad = m.padding[0] * 2 if isinstance(m.padding, tuple) else 0
        t_out = (t + pad - m.dilation[0] * (k - 1) - 1) // m.stride[0] + 1
        flops = 2.0 * n * t_out * r * (2 * cin * k / g + 2 * cout / g)
        return flops, float(itemsize * (2 * n * r * t_out + n * cin * t))
    rows = 1
    for d in in_shape[:-1]:
        rows *= int(d)
    flops = 2.0 * rows * r * (2 * m.in_features + 2 * m.out_features)
    return flops, float(itemsize * (2 * rows * r + rows * m.in_features))


_RATES: dict[str, float] = {}


def machine_rates(threads: int | None = None) -> dict[str, float]:
    """This machine's base-convolution rate (GFLOP/s: a 128-channel k=3 Conv1d over 3200 samples,
    forward and input gradient, the best of 15) and memory bandwidth (GB/s: a triad ``a = b + s·c``
    over three 16 MiB arrays, more than a core's caches, counting 3 × 16 MiB per triad, the best of 15).
    The best, not the median: the floor is what the machine can do. Measured once per process."""
    key = f"threads={threads or torch.get_num_threads()}"
    if key in _RATES:
        return {"conv_gflops": _RATES[key], "triad_gbs": _RATES[key + "bw"]}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 3200, generator=gen, requires_grad=True)
    w = torch.randn(128, 128, 3, generator=gen) / 20
    gy = torch.randn(1, 128, 3200, generator=gen)
    flops = 2 * 2.0 * 128 * 128 * 3 * 3200
    best = float("inf")
    for _ in range(15):
        t0 = time.perf_counter()
        torch.nn.functional.conv1d(x, w, padding=1).backward(gy)
        best = min(best, time.perf_counter() - t0)
    n = 4 * 2**20
    a, b, c = torch.empty(n), torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    bw = float("inf")
    for _ in range(15):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=1.5, out=a)
        bw = min(bw, time.perf_counter() - t0)
    _RATES[key], _RATES[key + "bw"] = flops / best / 1e9, 3 * 4 * n / bw / 1e9
    return {"conv_gflops": _RATES[key], "triad_gbs": _RATES[key + "bw"]}


def roofline_s(flops: float, nbytes: float, rates: dict[str, float]) -> float:
    """``max(extra flops / conv rate, extra bytes / bandwidth)`` in seconds."""
    return max(flops / (rates["conv_gflops"] * 1e9), nbytes / (rates["triad_gbs"] * 1e9))


def base_step_flops(m: nn.Module, in_shape: Sequence[int]) -> float:
    """Flops of the frozen layer's training step (forward + input gradient: two base-sized ops)."""
    n, t = int(in_shape[0]) if len(in_shape) > 1 else 1, int(in_shape[-1])
    if isinstance(m, nn.ConvTranspose1d):
        return 2 * 2.0 * n * t * m.in_channels * (m.out_channels // m.groups) * m.kernel_size[0]
    if isinstance(m, nn.Conv1d):
        k = m.kernel_size[0]
        pad = m.padding[0] * 2 if isinstance(m.padding, tuple) else 0
        t_out = (t + pad - m.dilation[0] * (k - 1) - 1) // m.stride[0] + 1
        return 2 * 2.0 * n * t_out * m.out_channels * (m.in_channels // m.groups) * k
    rows = 1
    for d in in_shape[:-1]:
        rows *= int(d)
    return 2 * 2.0 * rows * m.in_features * m.out_features


def roofline_floor(m: nn.Module, in_shape: Sequence[int], r: int, rates: dict[str, float]) -> float:
    """The roofline floor as a fraction of the frozen step, both at this machine's rates:
    ``max(extra flops / conv rate, extra bytes / bandwidth) / (base flops / conv rate)``. It is the
    flop floor where the LoRA passes are compute-bound, more where they are bandwidth-bound, and
    does not move with the load on a shared machine (docs/maths.md)."""
    base_s = base_step_flops(m, in_shape) / (rates["conv_gflops"] * 1e9)
    return roofline_s(*lora_extra(m, in_shape, r), rates) / base_s


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


ALTERNATIVES = ("plain", "peft", "loralib", "full")


_RESULTS_KEY = pytest.StashKey[list]()


_STATE_KEY = pytest.StashKey[dict]()


@dataclass
class Variant:
    """One way of training the case: ``step()`` runs forward + backward once.

    ``params`` are the tensors whose ``.grad`` is reset before each step (as ``zero_grad(set_to_none=True)``
    does in training). ``reason`` is set (and ``step`` is ``None``) when the variant is unsupported.
    """

    step: Callable[[], None] | None = None
    params: Sequence[torch.Tensor] = ()
    reason: str | None = None

    @classmethod
    def unsupported(cls, reason: str) -> Variant:
        return cls(reason=reason)


@dataclass
class Row:
    """One line of the table: which measured variant plays which role, and the case's flop floor."""

    case: str
    kind: str
    floor: float
    roles: dict[str, str]  # role ("base", "rvclora", "plain", ...) -> variant key in the run
    params: dict[str, object] = field(default_factory=dict)
    #: bytes of ``x`` and ``u`` summed over the adapted layers: rvclora may save at most the base's plus this
    saved_allowance: int | None = None
    #: the roofline floor (docs/maths.md), a fraction of the frozen step at this machine's rates
    roof: float | None = None


@dataclass
class Plan:
    warmup: int
    min_rounds: int
    max_rounds: int


def _clear_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def count_saved_bytes(fn: Callable[[], None]) -> int:
    """Activation bytes autograd saves for backward while ``fn`` runs, counted once per underlying
    storage (parameters are not counted: saving one allocates nothing)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter):
            return t
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def saved_allowance(model: torch.nn.Module, run: Callable[[], object]) -> int:
    """Bytes of ``x`` and ``u`` summed over the rvclora layers of ``model`` while ``run()`` does a forward.

    ``u`` is the rank-``r`` projection autograd may keep per layer (float32 for half inputs):
    ``(N, r, T_out)`` for Conv1d, ``(N, r, T_in)`` for ConvTranspose1d, ``(M, r)`` for Linear.
    """
    from rvclora import LoRAConv1d, LoRAConvTranspose1d, LoRALinear

    total = [0]

    def hook(mod, args, out):
        x = args[0]
        lora_bytes = 4 if x.dtype in (torch.float16, torch.bfloat16) else x.element_size()
        if isinstance(mod, LoRALinear):
            rows = x.numel() // x.shape[-1]
        elif isinstance(mod, LoRAConvTranspose1d):
            rows = x.shape[0] * x.shape[-1]
        else:
            rows = out.shape[0] * out.shape[-1]
        total[0] += x.numel() * x.element_size() + rows * mod.r * lora_bytes

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (LoRALinear, LoRAConv1d, LoRAConvTranspose1d))
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return total[0]


class Harness:
    """Runs the interleaved measurement of one test (one or several table rows).

    The test modules reach the harness types through this fixture object (``h.Variant``,
    ``h.Row``), never by importing conftest.
    """

    Variant = Variant
    Row = Row
    saved_allowance = staticmethod(saved_allowance)

    def __init__(self, config, nodeid: str, case_budget_s: float) -> None:
        self.config = config
        self.state = config.stash[_STATE_KEY]
        self.nodeid = nodeid
        self.case_budget_s = case_budget_s

    @property
    def quick(self) -> bool:
        return self.state["quick"]

    def plan(self, quick: Sequence[int], full: Sequence[int]) -> Plan:
        """``(warm-up rounds, min rounds, max rounds)`` for the current mode."""
        return Plan(*(quick if self.quick else full))

    def _share_s(self) -> float:
        """This case's share of what is left of the budget, in proportion to its nominal budget."""
        pending = self.state["pending"]
        left = max(0.0, self.state["budget_s"] - self.state["timed_s"])
        weights = sum(pending.values()) or self.case_budget_s
        return min(self.case_budget_s, left * self.case_budget_s / weights)

    def run(self, benchmark, variants: dict[str, Variant], rows: list[Row], plan: Plan) -> None:
        runnable = {k: v for k, v in variants.items() if v.step is not None}
        names = list(runnable)
        times: dict[str, list[float]] = {k: [] for k in names}
        saved: dict[str, int] = {}
        gc.collect()
        # Warm-up: the first round also counts the bytes each variant saves for backward.
        round_s = 0.0
        for w in range(plan.warmup):
            t_round = time.perf_counter()
            for k in names:
                _clear_grads(runnable[k].params)
                if w == 0:
                    # one call first: what runs once per shape (auto's measurement) must not be counted
                    runnable[k].step()
                    _clear_grads(runnable[k].params)
                    saved[k] = count_saved_bytes(runnable[k].step)
                else:
                    runnable[k].step()
            round_s = time.perf_counter() - t_round
        if self.quick:
            rounds = plan.min_rounds
        else:
            fit = int(self._share_s() / max(round_s, 1e-9))
            rounds = max(plan.min_rounds, min(plan.max_rounds, fit))
        counter = [0]

        def one_round() -> None:
            # Rotate the order every round, so no variant always runs first or after the same one.
            i = counter[0] % max(len(names), 1)
            counter[0] += 1
            for k in names[i:] + names[:i]:
                _clear_grads(runnable[k].params)
                t = time.perf_counter()
                runnable[k].step()
                times[k].append(time.perf_counter() - t)

        t0 = time.perf_counter()
        benchmark.group = "rvclora: " + rows[0].case
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
        self.state["timed_s"] += time.perf_counter() - t0
        self.state["pending"].pop(self.nodeid, None)

        medians = {k: statistics.median(v) for k, v in times.items() if v}
        benchmark.extra_info["rounds"] = len(next(iter(times.values()), []))
        benchmark.extra_info["warmup_rounds"] = plan.warmup
        benchmark.extra_info["median_s"] = medians
        benchmark.extra_info["saved_bytes"] = saved
        for row in rows:
            self.config.stash[_RESULTS_KEY].append(
                _row_result(row, variants, medians, times, saved, plan.warmup, self.nodeid)
            )


def _paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """The median over rounds of ``num``'s time over ``den``'s in the same round.

    Both ran in every round, close in time, so a slow drift of the machine (a noisy neighbour, the
    clock) cancels in each round's ratio; the ratio of the two medians does not cancel it.
    """
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _row_result(row: Row, variants, medians, times, saved, warmup: int, nodeid: str) -> dict:
    out = {
        "case": row.case,
        "kind": row.kind,
        "params": row.params,
        "flop_floor": row.floor,
        "roof": row.roof,
        "warmup_rounds": warmup,
        "test": nodeid,
        "variants": {},
    }
    base_key, rv_key = row.roles.get("base"), row.roles.get("rvclora")
    base_t = medians.get(base_key)
    rv_t = medians.get(rv_key)
    for role in VARIANTS:
        key = row.roles.get(role)
        v = variants.get(key) if key is not None else None
        if v is None:
            out["variants"][role] = {"status": "not measured", "reason": "not part of this case"}
            continue
        if v.step is None:
            out["variants"][role] = {"status": "unsupported", "reason": v.reason}
            continue
        t = medians[key]
        entry = {
            "status": "ok",
            "variant": key,
            "median_s": t,
            "times_s": times[key],
            "rounds": len(times[key]),
            "saved_bytes": saved.get(key),
            "overhead_vs_base": _paired(times, key, base_key) - 1.0 if base_t else None,
            "overhead_vs_base_of_medians": (t / base_t - 1.0) if base_t else None,
        }
        if role in ALTERNATIVES and rv_t:
            entry["rvclora_over_this"] = _paired(times, rv_key, key)
            entry["rvclora_over_this_of_medians"] = rv_t / t
        if role == "rvclora" and row.roof and entry["overhead_vs_base"] is not None:
            entry["overhead_over_roof"] = entry["overhead_vs_base"] / row.roof
        if role == "rvclora" and row.saved_allowance is not None and saved.get(base_key) is not None:
            bound = saved[base_key] + row.saved_allowance
            entry["saved_bound_bytes"] = bound
            entry["saved_within_bound"] = saved.get(key, 0) <= bound
        out["variants"][role] = entry
    return out


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(state: dict) -> dict:
    from alternatives import library_version

    from rvclora import ops

    x = torch.empty(1, 1, 1)
    try:
        backend = ops.select_backend("lora_conv1d", x).NAME
    except Exception as e:  # noqa: BLE001 - recorded, not fatal: the info must never stop the report
        backend = f"unavailable ({e})"
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": _available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": library_version("triton"),
        "peft": library_version("peft"),
        "loralib": library_version("loralib"),
        "pytest_benchmark": library_version("pytest-benchmark"),
        "rvclora_backend_requested": ops.get_backend(),
        "rvclora_backend_cpu": backend,
        **machine_rates(),
        "mode": "quick" if state["quick"] else "full",
        "budget_s": state["budget_s"],
    }


def _ms(t: float | None) -> str:
    return "-" if t is None else (f"{t * 1e3:.1f}" if t < 10 else f"{t:.1f}s")


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 100:+.1f}%"


def _mib(b: int | None) -> str:
    if b is None:
        return "-"
    mib = b / 2**20
    return f"{mib:.2f}" if mib < 10 else f"{mib:.0f}"


def _cell(entry: dict, what: str) -> str:
    if entry["status"] == "unsupported":
        return "unsup."
    if entry["status"] != "ok":
        return "-"
    if what == "ms":
        return _ms(entry["median_s"])
    if what == "ms+ovh":
        return f"{_ms(entry['median_s'])} {_pct(entry['overhead_vs_base'])}"
    if what == "ratio":
        r = entry.get("rvclora_over_this")
        return "-" if r is None else f"{r:.2f}"
    if what == "mib":
        return _mib(entry.get("saved_bytes"))
    raise ValueError(what)


def format_table(results: list[dict], info: dict) -> list[str]:
    """The comparison table, one line per case, and the legend of unsupported cells."""
    head = ["case", "floor", "roof", "base ms", "rvclora ms ovh", "ovh/roof"]
    for alt in ALTERNATIVES:
        head += [f"{alt} ms ovh", "rv/" + alt]
    head += ["saved MiB: base", "rvclora", "bound", "plain", "peft", "loralib", "full"]
    lines_cells = []
    reasons: dict[str, list[str]] = {}
    for res in results:
        v = res["variants"]
        roof, over_roof = res.get("roof"), v["rvclora"].get("overhead_over_roof")
        cells = [
            res["case"],
            f"{res['flop_floor'] * 100:.1f}%",
            "-" if roof is None else f"{roof * 100:.1f}%",
            _cell(v["base"], "ms"),
            _cell(v["rvclora"], "ms+ovh"),
            "-" if over_roof is None else f"{over_roof:.1f}x",
        ]
        for alt in ALTERNATIVES:
            cells += [_cell(v[alt], "ms+ovh"), _cell(v[alt], "ratio")]
        cells += [_cell(v[k], "mib") for k in VARIANTS[:2]]
        ok = v["rvclora"].get("saved_within_bound")
        cells.append("-" if ok is None else ("ok" if ok else "OVER"))
        cells += [_cell(v[k], "mib") for k in VARIANTS[2:]]
        lines_cells.append(cells)
        for role in VARIANTS:
            if v[role]["status"] == "unsupported":
                reasons.setdefault(f"{role}: {v[role]['reason']}", []).append(res["case"])
    widths = [max(len(str(c[i])) for c in [head] + lines_cells) for i in range(len(head))]

    def fmt(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(fmt(head))
    out = [
        f"machine: {info.get('cpu_model')} · {info.get('cpus_available')} CPUs · torch {info.get('torch')} · "
        f"{info.get('torch_threads')} threads · triton {info.get('triton')} · peft {info.get('peft')} · "
        f"loralib {info.get('loralib')} · conv {info.get('conv_gflops', 0):.0f} GFLOP/s · "
        f"triad {info.get('triad_gbs', 0):.0f} GB/s · commit {(info.get('git_commit') or '?')[:10]}"
        f"{' (dirty)' if info.get('git_dirty') else ''} · backend {info.get('rvclora_backend_cpu')} · "
        f"mode {info.get('mode')} · {info.get('date')}",
        "ms = median per training step (forward + backward) over interleaved rounds after warm-up; "
        "ovh = vs the frozen base (median over rounds of the ratio within each round); "
        "floor = flop floor, roof = roofline floor at this machine's rates, ovh/roof = rvclora's overhead ÷ roof "
        "(docs/maths.md); rv/x = rvclora time / x time, paired the same way (< 1: rvclora "
        "faster); saved MiB = activation bytes autograd saves for backward; bound = rvclora's within the base's "
        "+ x + u per adapted layer; '-' = not run in this case",
        rule,
        fmt(head),
        rule,
    ]
    out += [fmt(c) for c in lines_cells]
    out.append(rule)
    for reason, cases in reasons.items():
        shown = ", ".join(cases[:3]) + (f", … ({len(cases)} cases)" if len(cases) > 3 else "")
        out.append(f"unsup. = {reason}: {shown}")
    return out
