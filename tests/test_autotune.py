"""The CPU tuner (rvclora/ops/autotune.py): its choice logic on a fake clock, its off switches, and that
every candidate it may pick for Conv1d gives the oracle's result (forward and gradients)."""

from __future__ import annotations

import itertools

import pytest
import torch

from rvclora import reference as ref
from rvclora.ops import autotune, torch_backend


@pytest.fixture(autouse=True)
def _fresh_tuner(monkeypatch):
    monkeypatch.setenv("RVCLORA_CPU_AUTOTUNE", "1")  # opt-in; the test that it is off by default unsets it
    autotune.reset()
    yield
    autotune.reset()


class FakeClock:
    """``perf_counter`` for the tuner: each candidate call 'takes' the cost the test gives it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _candidates(clock, costs, calls):
    def make(name):
        def run():
            calls.append(name)
            clock.now += costs[name]
            return name
        return run
    return {name: make(name) for name in costs}


def test_tuner_picks_the_fastest_after_warmup_and_timed_calls(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(autotune.time, "perf_counter", clock)
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []
    cands = _candidates(clock, costs, calls)
    n_tuning = (1 + autotune.TIMED) * len(costs)
    results = [autotune.choose_and_run("k", cands, default="a") for _ in range(n_tuning)]
    # while tuning, every call runs exactly one candidate, in turn: no extra work
    assert calls == list(itertools.islice(itertools.cycle("abc"), n_tuning))
    assert results == calls
    assert autotune.pending() == 0 and autotune.plans() == {"k": "b"}
    calls.clear()
    assert [autotune.choose_and_run("k", cands, default="a") for _ in range(4)] == ["b"] * 4
    assert calls == ["b"] * 4


def test_tuner_ignores_each_candidates_warmup_call(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(autotune.time, "perf_counter", clock)
    calls = []
    costs = {"a": 100.0, "b": 1.0}  # "a" is slow only on its first (warm-up) call
    cands = _candidates(clock, costs, calls)
    autotune.choose_and_run("k", cands, default="b")
    costs["a"] = 0.5
    for _ in range((1 + autotune.TIMED) * 2 - 1):
        autotune.choose_and_run("k", cands, default="b")
    assert autotune.plans() == {"k": "a"}


def test_tuner_keys_are_independent(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(autotune.time, "perf_counter", clock)
    fast_a = _candidates(clock, {"a": 1.0, "b": 2.0}, [])
    fast_b = _candidates(clock, {"a": 2.0, "b": 1.0}, [])
    for _ in range((1 + autotune.TIMED) * 2):
        autotune.choose_and_run("k1", fast_a, default="b")
        autotune.choose_and_run("k2", fast_b, default="a")
    assert autotune.plans() == {"k1": "a", "k2": "b"}


@pytest.mark.parametrize("setting", [None, "0", "off"])
def test_tuner_off_uses_the_default(monkeypatch, setting):
    """Off unless asked for (so a seeded run is repeatable bit for bit): every call runs the default."""
    calls = []
    cands = _candidates(FakeClock(), {"a": 1.0, "b": 0.0}, calls)
    if setting is None:
        monkeypatch.delenv("RVCLORA_CPU_AUTOTUNE")
    else:
        monkeypatch.setenv("RVCLORA_CPU_AUTOTUNE", setting)
    assert not autotune.enabled()
    assert [autotune.choose_and_run("k", cands, default="a") for _ in range(8)] == ["a"] * 8
    assert autotune.pending() == 0 and autotune.plans() == {}
    monkeypatch.setenv("RVCLORA_CPU_AUTOTUNE", "1")
    assert autotune.enabled()


def test_tuner_off_under_deterministic_algorithms():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not autotune.enabled()
        calls = []
        cands = _candidates(FakeClock(), {"a": 1.0, "b": 0.0}, calls)
        assert autotune.choose_and_run("k", cands, default="a") == "a"
    finally:
        torch.use_deterministic_algorithms(was)


def test_tuner_rejects_an_unknown_default():
    with pytest.raises(ValueError, match="default='z'"):
        autotune.choose_and_run("k", {"a": lambda: 1}, default="z")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 8, 40, 3, 2), (2, 6, 33, 5, 1)])
def test_every_conv1d_forward_candidate_matches_the_oracle(shape, bias, dtype):
    """While tuning, the calls alternate between the candidates: each one's output and gradients must be
    the oracle's."""
    n, c, t, k, d = shape
    r, s = 4, 1.5
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, t, generator=g, dtype=dtype)
    w = torch.randn(c + 2, c, k, generator=g, dtype=dtype)
    b = torch.randn(c + 2, generator=g, dtype=dtype) if bias else None
    A = torch.randn(r, c * k, generator=g, dtype=dtype)
    B = torch.randn(c + 2, r, generator=g, dtype=dtype)
    pad = (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
    gy_shape = ref.lora_conv1d_ref(x, w, b, A, B, s, 1, pad, d, 1, "zeros").shape
    gy = torch.randn(gy_shape, generator=g, dtype=dtype)

    leaves = [t_.detach().double().requires_grad_(True) for t_ in (x, A, B)]
    b64 = None if b is None else b.double()
    want = ref.lora_conv1d_ref(leaves[0], w.double(), b64, leaves[1], leaves[2], s, 1, pad, d, 1, "zeros")
    want_grads = torch.autograd.grad(want, leaves, gy.double())

    tol = 1e-4 if dtype == torch.float32 else 1e-10
    seen = set()
    for _ in range((1 + autotune.TIMED) * 2):
        xs, As, Bs = (t_.detach().clone().requires_grad_(True) for t_ in (x, A, B))
        y = torch_backend.lora_conv1d(xs, w, b, As, Bs, s, 1, pad, d, 1, "zeros", 0.0, None)
        grads = torch.autograd.grad(y, (xs, As, Bs), gy)
        for got, ref_ in zip((y, *grads), (want, *want_grads)):
            err = (got.double() - ref_).abs().max().item() / max(ref_.abs().max().item(), 1.0)
            assert err <= tol
        trials = next(iter(autotune._trials.values()), None)
        if trials is not None:
            seen |= {name for name, v in trials.items() if v}
    # batch > 1 always runs "split" (the joint output's y would be strided), so there is nothing to tune
    want = {"joint", "split"} if n == 1 else set()
    assert seen == want, f"tuning should have run {want or 'nothing'}, ran {seen}"
    assert autotune.pending() == 0 and set(autotune.plans().values()) <= {"joint", "split"}
