"""Smoke test of the benchmarks: ``pytest bench/`` in quick mode runs, prints the table, writes the JSON.

It checks that the harness works and its output is well formed, never how fast anything is
(speeds live in the benchmark output, not in asserts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess  # every test here runs rvclora or pytest in a child process

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("base", "rvclora", "plain", "peft", "loralib", "full")
HEADER = [
    "case",
    "floor",
    "base ms",
    "rvclora ms ovh",
    "plain ms ovh",
    "rv/plain",
    "peft ms ovh",
    "rv/peft",
    "loralib ms ovh",
    "rv/loralib",
    "full ms ovh",
    "rv/full",
    "saved MiB: base",
]
MACHINE_KEYS = ("cpu_model", "cpu_count", "torch_threads", "torch", "triton", "git_commit", "date", "mode")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark (the 'bench' extra)")
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, RVCLORA_BENCH_QUICK="1", RVCLORA_BENCH_JSON=str(out))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def test_quick_bench_runs(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_quick_bench_prints_the_table(quick_run):
    proc, _ = quick_run
    text = proc.stdout
    assert "rvclora benchmark" in text, text[-4000:]
    header = next((line for line in text.splitlines() if line.startswith("case ")), None)
    assert header is not None, text[-4000:]
    for column in HEADER:
        assert column in header, f"column {column!r} missing from {header!r}"
    for kind in ("conv1d ", "convT ", "linear ", "gen"):
        assert any(line.startswith(kind) for line in text.splitlines()), f"no {kind!r} row in the table"


def test_quick_bench_writes_the_json(quick_run):
    _, path = quick_run
    data = json.loads(path.read_text())
    for key in MACHINE_KEYS:
        assert key in data["machine"], key
    assert data["machine"]["mode"] == "quick"
    assert data["machine"]["torch_threads"] >= 1
    results = data["results"]
    assert {r["kind"] for r in results} >= {"Conv1d", "ConvTranspose1d", "Linear", "generator"}
    for res in results:
        assert 0 < res["flop_floor"] < 1, res["case"]
        assert set(res["variants"]) == set(VARIANTS), res["case"]
        for role in ("base", "rvclora", "full"):
            entry = res["variants"][role]
            assert entry["status"] == "ok", (res["case"], role, entry)
            assert entry["median_s"] > 0 and entry["rounds"] >= 1
            assert entry["saved_bytes"] > 0
        for role, entry in res["variants"].items():
            assert entry["status"] in ("ok", "unsupported", "not measured"), (res["case"], role)
            if entry["status"] == "unsupported":
                assert entry["reason"], (res["case"], role)
            if entry["status"] == "ok" and role != "base":
                assert entry["overhead_vs_base"] is not None
