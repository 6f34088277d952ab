"""``rvclora selftest`` on a machine without a GPU, and from a plain checkout with nothing installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rvclora import selftest

ROOT = Path(__file__).resolve().parent.parent

# Runs the selftest as `PYTHONPATH=. python3 -m rvclora.selftest` would on a machine where this
# package is not installed: the editable install's import hook of this venv is removed first.
_BARE = r"""
import sys, runpy
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (type(f).__module__ + repr(f)).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path.insert(0, ".")
import rvclora, rvclora.ops
import rvclora.checks.triton_compile as cc
import rvclora.kernels.ops as kops
print("RESOLVED", rvclora.__file__, kops.__file__, cc.__file__)
sys.argv = ["rvclora.selftest"] + sys.argv[1:]
runpy.run_module("rvclora.selftest", run_name="__main__")
"""


@pytest.mark.subprocess
def test_selftest_runs_from_a_plain_checkout_without_a_gpu(tmp_path):
    tree = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "results", ".pytest_cache", "build"),
    )
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["PYTHONPATH"] = "."
    # the copy's extension build must not replace the build of this checkout's sources
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "ext")
    proc = subprocess.run(
        [sys.executable, "-c", _BARE, "--out", str(out), "--no-timing"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    resolved = next(line for line in proc.stdout.splitlines() if line.startswith("RESOLVED")).split()
    assert resolved[1].startswith(str(tree)) and resolved[2].startswith(str(tree / "kernels")), resolved
    assert resolved[3].startswith(str(tree / "rvclora" / "checks")), resolved
    if not torch.cuda.is_available():
        assert "NOT RUN: timing table (no CUDA device" in proc.stdout
        assert "NOT RUN: inductor fullgraph compile on a GPU" in proc.stdout
    (report_path,) = out.glob("selftest-*.json")
    report = json.loads(report_path.read_text())
    ran = [c for c in report["checks"] if c.get("ok") is not None]
    assert ran and all(c["ok"] for c in ran) and report["failed"] == 0
    assert {c["backend"] for c in ran} >= {"torch"}
    assert {c["op"] for c in ran} == set(selftest.OPS)


def test_a_wrong_backend_fails_its_check(monkeypatch):
    from rvclora.ops.backends import torch as torch_backend

    real = torch_backend.lora_linear
    monkeypatch.setattr(torch_backend, "lora_linear", lambda *a: real(*a) * (1 + 1e-3))
    bad = selftest.check_case("torch", "lora_linear", torch.device("cpu"), torch.float64, torch.float64, 0.0)
    assert bad["ok"] is False and any(p.startswith("y:") for p in bad["problems"]), bad
    monkeypatch.setattr(torch_backend, "lora_linear", real)
    good = selftest.check_case("torch", "lora_linear", torch.device("cpu"), torch.float64, torch.float32, 0.2)
    assert good["ok"] is True, good
