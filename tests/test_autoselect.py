"""``auto`` on CUDA: validate, time, keep the faster correct backend, cache it (rvclora.ops.autoselect).

No GPU is needed: the selector's clock, device description and versions are injected. Fake
fused backends compute through the torch path (right or deliberately wrong) and advance a fake
clock by a cost of their own, so which one is "faster" is set by the test; one integration test
drives the real Triton kernels through the interpreter and the real dispatcher.
"""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

from rvclora.ops import autoselect, dispatch
from rvclora.ops.backends import torch as tb

FAKE_GPU = {"name": "Fake GPU 80GB", "capability": "9.0"}
VERSIONS = {"torch": "2.13.0", "triton": "3.9.0", "rvclora": "0.1.0"}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_backend(name, clock, cost, wrong=False, raises=False):
    calls = {"n": 0}

    def wrap(op):
        def run(*args):
            calls["n"] += 1
            if raises:
                raise RuntimeError("kernel launch failed")
            clock.now += cost
            y = getattr(tb, op)(*args)
            return y + 1.0 if wrong else y

        return run

    mod = types.SimpleNamespace(NAME=name, calls=calls, dropout_mask=tb.dropout_mask)
    for op in dispatch.OPS:
        setattr(mod, op, wrap(op))
    return mod


def _torch_timed(clock, cost):
    return _fake_backend("torch", clock, cost)


def _selector(tmp_path, clock, **kw):
    return autoselect.AutoSelector(
        str(tmp_path / "autoselect.json"),
        timer=autoselect.ClockTimer(clock),
        device_info=lambda d: dict(FAKE_GPU),
        versions=dict(VERSIONS),
        rounds=3,
        **kw,
    )


def _linear_call(rows=40, requires_grad=True, p=0.0):
    x = torch.randn(rows, 12)
    params = {"weight": torch.randn(10, 12), "lora_A": torch.randn(4, 12, requires_grad=requires_grad), "dropout_p": p}
    return x, params


@pytest.fixture(autouse=True)
def measure_mode(monkeypatch):
    monkeypatch.delenv("RVCLORA_AUTOSELECT", raising=False)


@pytest.mark.parametrize(("fused_cost", "expect"), [(1.0, "fused"), (3.0, "torch")])
def test_keeps_the_faster_correct_backend(tmp_path, fused_cost, expect):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, fused_cost), _torch_timed(clock, 2.0)
    sel = _selector(tmp_path, clock)
    x, params = _linear_call()
    got = sel.choose("lora_linear", x, params, [fused], torch_mod, fixed_choice=torch_mod)
    assert got.NAME == expect
    (entry,) = sel.entries()[autoselect.environment_key(FAKE_GPU, VERSIONS)].values()
    assert entry["choice"] == expect and entry["failed"] == {}
    assert entry["seconds"] == {"fused": fused_cost, "torch": 2.0}


def test_a_wrong_kernel_is_disabled_with_one_warning(tmp_path):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, 0.1, wrong=True), _torch_timed(clock, 2.0)
    sel = _selector(tmp_path, clock)
    x, params = _linear_call()
    match = r"fused backend's lora_linear failed validation for lora_linear w\(10, 12\)"
    with pytest.warns(RuntimeWarning, match=match):
        assert sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME == "torch"
    (entry,) = sel.entries()[autoselect.environment_key(FAKE_GPU, VERSIONS)].values()
    assert "relative error" in entry["failed"]["fused"]


def test_a_raising_kernel_is_disabled(tmp_path):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, 0.1, raises=True), _torch_timed(clock, 2.0)
    sel = _selector(tmp_path, clock)
    x, params = _linear_call()
    with pytest.warns(RuntimeWarning, match="raised RuntimeError: kernel launch failed"):
        assert sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME == "torch"


def test_decisions_persist_per_machine_and_versions(tmp_path):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, 1.0), _torch_timed(clock, 2.0)
    x, params = _linear_call()
    assert _selector(tmp_path, clock).choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME == "fused"
    data = json.loads((tmp_path / "autoselect.json").read_text())
    assert data["format"] == 1 and list(data["entries"]) == [autoselect.environment_key(FAKE_GPU, VERSIONS)]

    # a new process (a new selector) reads the decision: nothing is run again
    n = fused.calls["n"]
    again = _selector(tmp_path, clock)
    assert again.choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME == "fused"
    assert fused.calls["n"] == n
    # same class (rows 40 and 60 round to 64): cached; another GPU or another triton: measured anew
    assert again.choose("lora_linear", torch.randn(60, 12), params, [fused], torch_mod, torch_mod).NAME == "fused"
    assert fused.calls["n"] == n
    other = autoselect.AutoSelector(
        str(tmp_path / "autoselect.json"),
        timer=autoselect.ClockTimer(clock),
        device_info=lambda d: {"name": "Other GPU", "capability": "8.0"},
        versions={**VERSIONS, "triton": "3.6.0"},
        rounds=3,
    )
    other.choose("lora_linear", x, params, [fused], torch_mod, torch_mod)
    assert fused.calls["n"] > n
    assert len(json.loads((tmp_path / "autoselect.json").read_text())["entries"]) == 2


def test_shape_class_separates_what_changes_the_kernels():
    x, params = _linear_call(rows=40)
    key = autoselect.shape_class("lora_linear", x, params, training=True)
    assert key == autoselect.shape_class("lora_linear", torch.randn(33, 12), params, training=True)
    assert key != autoselect.shape_class("lora_linear", torch.randn(65, 12), params, training=True)
    assert key != autoselect.shape_class("lora_linear", x, params, training=False)
    assert key != autoselect.shape_class("lora_linear", x, {**params, "dropout_p": 0.1}, training=True)
    assert key != autoselect.shape_class("lora_linear", x.half(), params, training=True)
    assert "rows~64" in key and "float32/float32/float32" in key and "dropout=off train" in key


def test_fixed_mode_measures_nothing(tmp_path, monkeypatch):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, 1.0), _torch_timed(clock, 2.0)
    monkeypatch.setenv("RVCLORA_AUTOSELECT", "fixed")
    sel = _selector(tmp_path, clock)
    x, params = _linear_call()
    assert sel.choose("lora_linear", x, params, [fused], torch_mod, fixed_choice=fused).NAME == "fused"
    assert sel.choose("lora_linear", x, params, [fused], torch_mod, fixed_choice=torch_mod).NAME == "torch"
    assert fused.calls["n"] == 0 and torch_mod.calls["n"] == 0 and not (tmp_path / "autoselect.json").exists()
    monkeypatch.setenv("RVCLORA_AUTOSELECT", "sometimes")
    with pytest.raises(ValueError, match="RVCLORA_AUTOSELECT must be one of"):
        sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod)


def test_where_measuring_is_impossible_the_cache_or_the_fixed_rule_decides(tmp_path):
    clock = Clock()
    fused, torch_mod = _fake_backend("fused", clock, 1.0), _torch_timed(clock, 2.0)
    sel = _selector(tmp_path, clock)
    x, params = _linear_call()
    assert sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod, can_measure=False).NAME == "torch"
    assert fused.calls["n"] == 0
    sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod)  # measured: fused wins
    assert sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod, can_measure=False).NAME == "fused"


def test_unreadable_cache_is_ignored_with_a_warning(tmp_path):
    (tmp_path / "autoselect.json").write_text("{not json")
    clock = Clock()
    sel = _selector(tmp_path, clock)
    with pytest.warns(UserWarning, match="autoselect cache .*unreadable"):
        assert sel.entries() == {}


def _use_selector(monkeypatch, sel):
    monkeypatch.setattr(autoselect, "_selector", sel)


def test_dispatcher_measures_cpu_and_cuda_tensors_and_never_inside_a_trace(tmp_path, monkeypatch):
    clock = Clock()
    sel = _selector(tmp_path, clock)
    _use_selector(monkeypatch, sel)
    called = []
    monkeypatch.setattr(sel, "choose", lambda *a, **k: called.append(a) or dispatch.load_backend("torch"))
    x, params = _linear_call()
    assert dispatch._measured(x) and dispatch._measured(types.SimpleNamespace(device=torch.device("cuda", 0)))
    assert not dispatch._measured(types.SimpleNamespace(device=torch.device("meta")))
    dispatch.select_backend("lora_linear", x, **params)
    assert len(called) == 1
    monkeypatch.setattr(dispatch, "_tracing", lambda: True)
    fixed = "torch" if dispatch._unavailable("cpu") is not None else "cpu"
    assert dispatch.select_backend("lora_linear", x, **params).NAME == fixed  # the fixed CPU order
    assert len(called) == 1, "the selector ran inside a trace"


def test_fixed_rule_keeps_conv_transpose1d_on_the_torch_path_on_cuda():
    cuda_mod = types.SimpleNamespace(NAME="cuda")
    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    torch_mod = dispatch.load_backend("torch")
    assert dispatch._fixed_choice("lora_conv_transpose1d", x, {}, [cuda_mod, torch_mod]) is torch_mod
    assert dispatch._fixed_choice("lora_linear", x, {}, [cuda_mod, torch_mod]) is cuda_mod


@pytest.mark.skipif(dispatch._unavailable("triton") is not None, reason="the triton backend cannot run here")
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_real_triton_kernels_validate_through_the_dispatcher(tmp_path, monkeypatch, p):
    """The real fused Linear (interpreted on CPU here) passes validation against the torch path; with
    a fake clock that makes it faster the dispatcher then returns it."""
    if not torch.cuda.is_available():
        monkeypatch.setitem(dispatch._AUTO_ORDER, "cpu", ("triton", "torch"))
        monkeypatch.setattr(dispatch, "_measured", lambda t: True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = Clock()
    triton_mod = dispatch.load_backend("triton")

    class SlowTorchClock(autoselect.ClockTimer):
        def __call__(self, fns, rounds):
            return {name: (1.0 if name == "triton" else 2.0) for name in fns}

    sel = autoselect.AutoSelector(
        str(tmp_path / "a.json"),
        timer=SlowTorchClock(clock),
        device_info=lambda d: dict(FAKE_GPU),
        versions=dict(VERSIONS),
        rounds=1,
    )
    _use_selector(monkeypatch, sel)
    x = torch.randn(3, 30, 20, device=device)
    w = torch.randn(24, 20, device=device)
    a = torch.randn(4, 20, device=device, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert dispatch.select_backend("lora_linear", x, weight=w, lora_A=a, dropout_p=p) is triton_mod
    (entry,) = sel.entries()[autoselect.environment_key(FAKE_GPU, VERSIONS)].values()
    assert entry["choice"] == "triton" and entry["failed"] == {}


def test_info_lists_the_cached_decisions(tmp_path, monkeypatch, capsys):
    from rvclora import cli

    clock = Clock()
    sel = _selector(tmp_path, clock)
    fused, torch_mod = _fake_backend("fused", clock, 1.0), _torch_timed(clock, 2.0)
    x, params = _linear_call()
    sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod)
    _use_selector(monkeypatch, sel)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto (CUDA and CPU)" in out and "Fake GPU 80GB" in out
    assert "lora_linear w(10, 12)" in out and "-> fused" in out


def test_auto_measures_on_cpu_and_caches_per_cpu_model_isa_and_threads(tmp_path, monkeypatch):
    """On CPU tensors ``auto`` validates and times the compiled cpu backend against the torch path once
    per shape class (on a shortened input), keyed by the CPU model, its ISA and the thread count."""
    why = dispatch._unavailable("cpu")
    if why is not None:
        pytest.skip(f"cpu backend unavailable here: {why}")
    monkeypatch.setenv("RVCLORA_AUTOSELECT_CACHE", str(tmp_path / "autoselect.json"))
    monkeypatch.setattr(autoselect, "_selector", None)
    x = torch.randn(1, 8, 5000, requires_grad=True)
    params = dict(
        weight=torch.randn(8, 8, 3),
        lora_A=torch.randn(4, 24, requires_grad=True),
        stride=1,
        padding=(1, 1),
        dilation=1,
        groups=1,
        padding_mode="zeros",
        dropout_p=0.0,
    )
    assert autoselect._measure_shape("lora_conv1d", x, params) == (1, 8, autoselect.CPU_MEASURE_LEN)
    assert dispatch.select_backend("lora_conv1d", x, **params).NAME in ("cpu", "torch")
    ((env, key, hit),) = autoselect.decisions()
    assert autoselect.cpu_model() in env and f"threads={torch.get_num_threads()}" in env
    assert key.startswith("lora_conv1d w(8, 8, 3)") and key.endswith("train")
    assert hit["failed"] == {} and set(hit["seconds"]) == {"cpu", "torch"}
    assert autoselect.measure_note().startswith("auto measured 1 new layer shape(s) in ")
    dispatch.select_backend("lora_conv1d", x, **params)  # the same class: cached, nothing measured again
    assert len(autoselect.get_selector().measured) == 1
    monkeypatch.setenv("RVCLORA_AUTOSELECT", "fixed")
    assert dispatch.select_backend("lora_conv1d", x, **params).NAME == "cpu"


def test_a_rebuilt_extension_is_another_environment(tmp_path):
    """Decisions timed against one build of the kernels are not reused by another (same versions,
    changed csrc/): the digest of the compiled sources is part of the environment key."""
    from rvclora.ops import extension

    versions = autoselect._versions()
    assert versions["kernels"] == extension.source_digest()
    (tmp_path / "a.cpp").write_text("int a;\n")
    other = dict(versions, kernels=extension.source_digest(tmp_path))
    assert other["kernels"] != versions["kernels"]
    info = {"name": "cpu", "capability": "AVX2", "threads": "2"}
    assert autoselect.environment_key(info, versions) != autoselect.environment_key(info, other)
