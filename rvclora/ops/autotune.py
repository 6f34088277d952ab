"""Per-shape choice between equivalent CPU strategies, measured in place (the torch backend's tuner).

The CPU convolution library's speed jumps with the channel count in ways no rule predicts: on
one 2-core machine a Conv1d with 40 output channels ran faster than the same one with 32, and one
with 136 up to twice as slow as with 128. Where the torch backend has two exact ways to compute
the same result (for Conv1d's forward: one convolution over ``[W + s·ΔW; A]``, or the base-sized
convolution plus a thin GEMM for ``u``), it times them on the real calls and keeps the faster:

* the first ``(1 + TIMED) · len(candidates)`` calls of a shape run the candidates in turn (one per
  call, so tuning costs no extra work); each candidate's first call is a warm-up, not timed;
* then the candidate with the least time (the minimum over its timed calls, robust to a noisy
  neighbour) is used for that shape for the rest of the process.

Candidates differ only by floating-point rounding (they compute the same exact expression), but
which one a shape gets depends on timings, so two runs with the same seed may then differ in the
last bits. The tuner is therefore **opt-in**: ``RVCLORA_CPU_AUTOTUNE=1`` turns it on; otherwise,
and always under ``torch.use_deterministic_algorithms(True)``, every call uses the fixed default
and a seeded run is bit-for-bit repeatable. (On the RVC 40k generator on a 2-core machine its gain
was within the run-to-run noise; on single layers where the default hits a slow channel count of
the convolution library it is up to ~0.7 ms per step.) :func:`pending` counts shapes still being tuned (benchmarks warm
up until it is zero); :func:`plans` shows the choices; :func:`reset` forgets them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, Hashable, List, Mapping, TypeVar

import torch

__all__ = ["enabled", "choose_and_run", "pending", "plans", "reset", "TIMED"]

T = TypeVar("T")

#: Timed calls per candidate (after one untimed warm-up call each).
TIMED = 3

_lock = threading.Lock()
_plans: Dict[Hashable, str] = {}
_trials: Dict[Hashable, Dict[str, List[float]]] = {}


def enabled() -> bool:
    """Whether shapes are tuned (``RVCLORA_CPU_AUTOTUNE=1``; else every call uses the default candidate)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("RVCLORA_CPU_AUTOTUNE", "0").strip().lower() in ("1", "true", "on", "yes")


def choose_and_run(key: Hashable, candidates: Mapping[str, Callable[[], T]], default: str) -> T:
    """Run the chosen candidate for ``key`` (tuning it first if needed) and return its result."""
    if default not in candidates:
        raise ValueError(f"default={default!r} is not one of the candidates {sorted(candidates)}")
    plan = _plans.get(key)
    if plan is None and (len(candidates) == 1 or not enabled()):
        plan = default
    if plan is not None:
        return candidates[plan]()
    with _lock:
        trials = _trials.setdefault(key, {name: [] for name in candidates})
        name = min(trials, key=lambda n: len(trials[n]))  # the candidate with the fewest calls so far
    t0 = time.perf_counter()
    out = candidates[name]()
    dt = time.perf_counter() - t0
    with _lock:
        if key in _plans:  # another thread finished tuning this key meanwhile
            return out
        trials[name].append(dt)
        if all(len(v) >= 1 + TIMED for v in trials.values()):
            _plans[key] = min(trials, key=lambda n: min(trials[n][1:]))
            del _trials[key]
    return out


def pending() -> int:
    """How many shapes are still being tuned."""
    return len(_trials)


def plans() -> Dict[Hashable, str]:
    """A copy of the choices made so far: ``{key: candidate name}``."""
    return dict(_plans)


def reset() -> None:
    """Forget every choice and trial (the next calls tune again)."""
    with _lock:
        _plans.clear()
        _trials.clear()
