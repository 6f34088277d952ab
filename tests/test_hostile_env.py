"""The machine's own state: files rvclora writes for itself (the autoselect cache) and the extension build's lock."""

from __future__ import annotations

import json
import os
import threading
import time
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from rvclora.io import RVCLoRAWarning
from rvclora.ops import autoselect, dispatch, extension
from rvclora.ops.backends import torch as tb

FAKE_GPU = {"name": "Fake GPU 80GB", "capability": "9.0"}
VERSIONS = {"torch": "2.13.0", "triton": "3.9.0", "rvclora": "0.1.0"}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _backend(name: str, clock: _Clock, cost: float):
    import types

    def wrap(op):
        def run(*args):
            clock.now += cost
            return getattr(tb, op)(*args)

        return run

    mod = types.SimpleNamespace(NAME=name, dropout_mask=tb.dropout_mask)
    for op in dispatch.OPS:
        setattr(mod, op, wrap(op))
    return mod


def _selector(path, clock):
    return autoselect.AutoSelector(
        str(path),
        timer=autoselect.ClockTimer(clock),
        device_info=lambda d: dict(FAKE_GPU),
        versions=dict(VERSIONS),
        rounds=3,
    )


def _choose(sel, clock):
    x = torch.randn(40, 12)
    params = {"weight": torch.randn(10, 12), "lora_A": torch.randn(4, 12, requires_grad=True), "dropout_p": 0.0}
    fused, torch_mod = _backend("fused", clock, 1.0), _backend("torch", clock, 2.0)
    return sel.choose("lora_linear", x, params, [fused], torch_mod, torch_mod).NAME


@pytest.fixture(autouse=True)
def _measure(monkeypatch):
    monkeypatch.delenv("RVCLORA_AUTOSELECT", raising=False)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links on this platform")
def test_the_cache_writer_never_follows_a_planted_symlink(tmp_path) -> None:
    """It wrote ``<cache>.<pid>.tmp`` with a plain open(), following a symlink planted at that name."""
    cache = tmp_path / "autoselect.json"
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, f"{cache}.{os.getpid()}.tmp")  # the name the old writer used
    clock = _Clock()
    assert _choose(_selector(cache, clock), clock) == "fused"
    assert victim.read_text() == "precious"
    assert not cache.is_symlink() and json.loads(cache.read_text())["format"] == 1


def _bad_cache(path) -> dict:
    env = autoselect.environment_key(FAKE_GPU, VERSIONS)
    good = {"choice": "torch", "seconds": {"torch": 1e-5}, "failed": {}, "tolerance": 1e-4, "measured_at": "x"}
    data = {
        "format": 1,
        "entries": {
            env: {
                "good": good,
                "no-choice": {"seconds": {}},
                "choice-int": {"choice": 3},
                "seconds-str": {**good, "seconds": {"torch": "fast"}},
                "failed-list": {**good, "failed": ["fused"]},
                "not-a-dict": "torch",
            },
            "other-env": ["not", "a", "table"],
        },
    }
    path.write_text(json.dumps(data))
    return data


def test_malformed_cache_entries_are_dropped_with_one_warning_and_rewritten(tmp_path) -> None:
    """They gave tracebacks in rvclora info and in AutoSelector.choose (the CUDA forward path)."""
    cache = tmp_path / "autoselect.json"
    _bad_cache(cache)
    clock = _Clock()
    sel = _selector(cache, clock)
    with pytest.warns(RVCLoRAWarning, match="6 malformed entries; ignored") as record:
        entries = sel.entries()
    assert len(record) == 1
    assert [list(t) for t in entries.values()] == [["good"]]
    assert _choose(sel, clock) == "fused"  # a new measurement, then the file holds only valid decisions
    data = json.loads(cache.read_text())
    assert all(autoselect._valid_entry(hit) for table in data["entries"].values() for hit in table.values())
    assert sum(len(t) for t in data["entries"].values()) == 2


def test_a_cached_key_with_a_malformed_decision_is_measured_again(tmp_path) -> None:
    cache = tmp_path / "autoselect.json"
    clock = _Clock()
    _choose(_selector(cache, clock), clock)
    data = json.loads(cache.read_text())
    for table in data["entries"].values():
        for hit in table.values():
            hit["failed"] = "everything"  # choose() iterated .items() of this
    cache.write_text(json.dumps(data))
    sel = _selector(cache, clock)
    with pytest.warns(RVCLoRAWarning, match="1 malformed entries"):
        assert _choose(sel, clock) == "fused"


@pytest.mark.parametrize(
    "content,why",
    [
        ('{"format": 2, "entries": {}}', "not an rvclora autoselect cache"),
        ("[1, 2, 3]", "not an rvclora autoselect cache"),
        ("{not json", "unreadable"),
        ("[" * 100_000 + "]" * 100_000, "unreadable"),
    ],
)
def test_a_cache_file_that_is_not_one_is_reported_not_shown_as_zero_decisions(
    tmp_path, monkeypatch, capsys, content, why
) -> None:
    from rvclora import cli

    cache = tmp_path / "autoselect.json"
    cache.write_text(content)
    monkeypatch.setattr(autoselect, "_selector", _selector(cache, _Clock()))
    assert cli.main(["info"]) == 0
    captured = capsys.readouterr()
    assert f"cache file: {why}" in captured.out
    assert "rvclora: warning: autoselect cache" in captured.err and "Traceback" not in captured.err


_BATON_TORCH = extension.lock_file_is_a_baton(cpp_extension)


@pytest.mark.skipif(
    not _BATON_TORCH,
    reason="this torch holds an advisory lock on the file (torch >= 2.14): a "
    "killed build's lock is released by the kernel, so no stale lock exists to time out on "
    "(test_a_finished_builds_advisory_lock_file_is_not_waited_on covers that regime)",
)
def test_a_stale_build_lock_times_out_naming_the_directory(tmp_path, monkeypatch) -> None:
    """A lock left by a killed build made the first LoRA forward and rvclora info wait forever."""
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "build_plan", lambda: extension.BuildPlan(cuda=False))
    monkeypatch.setattr(extension, "extension_name", lambda cuda=None: "rvclora_C_stale_lock_test")
    monkeypatch.setattr(extension, "_ops_registered", lambda: False)  # the real ops may be loaded in this process
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RVCLORA_BUILD_LOCK_TIMEOUT", "0.3")
    from torch.utils.cpp_extension import _get_build_directory

    build_dir = _get_build_directory("rvclora_C_stale_lock_test", False)
    open(os.path.join(build_dir, "lock"), "w").close()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = extension.load_error()
    assert time.perf_counter() - t0 < 10
    assert err is not None and build_dir in err and "is locked" in err and "RVCLORA_BUILD_LOCK_TIMEOUT" in err, err
    assert [w for w in caught if "'cuda' backend is unavailable" in str(w.message)]


class _Namespace:
    def __init__(self, **names) -> None:
        self.__dict__.update(names)


def test_which_torch_treats_the_lock_file_as_held() -> None:
    """torch <= 2.13: FileBaton (existence = held); torch >= 2.14: FileLock (an advisory lock on a file that stays)."""
    assert extension.lock_file_is_a_baton(_Namespace(FileBaton=object))
    assert not extension.lock_file_is_a_baton(_Namespace(FileLock=object))
    assert not extension.lock_file_is_a_baton(_Namespace(FileBaton=object, FileLock=object))


def test_a_finished_builds_advisory_lock_file_is_not_waited_on(tmp_path, monkeypatch) -> None:
    """Under torch 2.14 the lock file outlives every build; waiting for it to vanish failed every later process."""
    lock = tmp_path / "lock"
    lock.write_text("")
    waited = []
    monkeypatch.setattr(extension, "wait_for_build_lock", lambda *a, **k: waited.append(a))
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path), raising=False)
    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: loaded.append(kw["name"]))
    monkeypatch.setitem(vars(cpp_extension), "FileLock", object)
    monkeypatch.delitem(vars(cpp_extension), "FileBaton", raising=False)
    extension._jit_load(tmp_path, False, extension.BuildPlan(cuda=False))
    assert loaded and not waited and lock.exists()
    monkeypatch.delitem(vars(cpp_extension), "FileLock")
    monkeypatch.setitem(vars(cpp_extension), "FileBaton", object)
    extension._jit_load(tmp_path, False, extension.BuildPlan(cuda=False))
    assert waited == [(str(tmp_path),)]


def test_the_build_waits_for_a_lock_that_goes_away(tmp_path) -> None:
    lock = tmp_path / "lock"
    lock.write_text("")
    threading.Timer(0.2, lock.unlink).start()
    t0 = time.perf_counter()
    extension.wait_for_build_lock(str(tmp_path), timeout=10)
    assert 0.15 < time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "value,want",
    [("", 120.0), ("2.5", 2.5), ("0", 0.0), ("-1", 120.0), ("soon", 120.0), ("inf", 120.0), ("nan", 120.0)],
)
def test_the_build_lock_timeout_comes_from_the_environment(monkeypatch, value, want) -> None:
    monkeypatch.setenv("RVCLORA_BUILD_LOCK_TIMEOUT", value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert extension.build_lock_timeout() == want
