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

Candidates differ only by floating-point rounding (they compute the same exact expression). The
tuner is off — and a fixed default is used — when ``torch.are_deterministic_algorithms_enabled()``
or ``RVCLORA_CPU_AUTOTUNE=0``. :func:`pending` counts shapes still being tuned (benchmarks warm
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
    """Whether shapes are tuned (else every call uses the default candidate)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return os.environ.get("RVCLORA_CPU_AUTOTUNE", "1").strip() not in ("0", "false", "off", "no")


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
