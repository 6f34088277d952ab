"""The ``rvclora`` command, run as a subprocess (``python -m rvclora``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rvclora.ops import BACKENDS

REPO = Path(__file__).resolve().parents[1]


def rvclora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "rvclora", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or REPO, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rvclora: error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("args", [[], ["demo"], ["merge"], ["info"]], ids=["top", "demo", "merge", "info"])
def test_help(args: list[str]) -> None:
    proc = rvclora(*args, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: rvclora")


def test_info_lists_backends() -> None:
    proc = rvclora("info")
    assert proc.returncode == 0, proc.stderr
    for name in BACKENDS:
        assert re.search(rf"^\s+{name}\s+(available|unavailable: \S.*)$", proc.stdout, re.M), proc.stdout
    assert "torch" in proc.stdout and "available" in proc.stdout


def test_demo_merge_info_end_to_end(tmp_path: Path) -> None:
    proc = rvclora("demo", "--steps", "3", "--frames", "2", "--rank", "4", "--bench-rounds", "1",
                   "--seed", "3", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    m = re.search(r"before (\S+), after (\S+)", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) >= 0, out
    assert re.search(r"frozen base \d+\.\d+\s+LoRA \d+\.\d+ .*full fine-tuning \d+\.\d+", out), out
    assert re.search(r"files: adapter [\d.]+ \w+ vs model [\d.]+ MiB", out), out
    diffs = re.search(r"in memory \(fp32\) (\S+); RVC export .* does\) (\S+);", out)
    assert diffs and float(diffs.group(1)) < 1e-4 and float(diffs.group(2)) < 1e-2, out
    assert "LoRA fine-tune" in proc.stderr  # the tqdm progress bar

    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["rvclora-demo-40k-r4.adapter.pth", "rvclora-demo-40k-r4.merged.pth", "rvclora-demo-40k.pth"]
    adapter, base = tmp_path / files[0], tmp_path / files[2]

    info = rvclora("info", str(adapter))
    assert info.returncode == 0, info.stderr
    assert "rvclora adapter" in info.stdout and "r=4 lora_alpha=8" in info.stdout
    assert re.search(r"LoRA layers: 76\s+LoRA parameters: [\d,]+", info.stdout), info.stdout
    info = rvclora("info", str(tmp_path / files[1]))
    assert info.returncode == 0, info.stderr
    assert "exported RVC model" in info.stdout and "decoder config: 40k" in info.stdout
    assert "rvclora adapter rvclora-demo-40k-r4.adapter.pth merged" in info.stdout

    out_path = tmp_path / "merged_again.pth"
    merged = rvclora("merge", str(base), str(adapter), "-o", str(out_path))
    assert merged.returncode == 0, merged.stderr
    assert out_path.exists() and "76 LoRA layers merged" in merged.stdout
    assert_one_line_error(rvclora("merge", str(base), str(adapter), "-o", str(out_path)),
                          r"already exists; pass overwrite=True \(--overwrite\)")
    assert rvclora("merge", str(base), str(adapter), "-o", str(out_path), "--overwrite").returncode == 0
    assert_one_line_error(rvclora("merge", str(base), str(adapter), "-o", str(base), "--overwrite"),
                          r"is the base model file")
    assert_one_line_error(rvclora("merge", str(adapter), str(adapter), "-o", str(tmp_path / "x.pth")),
                          r"rvclora adapter, not an RVC model file")


def test_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(rvclora("info", str(junk)), r"junk\.pth: an unrecognised binary file, not an RVC model file")
    assert_one_line_error(rvclora("info", str(tmp_path / "missing.pth")), r"'.*missing\.pth' does not exist")
    assert_one_line_error(rvclora("demo", "--out-dir", str(tmp_path / "nope")), r"--out-dir .* not an existing")
    usage = rvclora("demo", "--rank", "0")
    assert usage.returncode == 2 and "expected a positive integer, got 0" in usage.stderr
    assert "Traceback" not in usage.stderr
    usage = rvclora("demo", "--config", "44k")
    assert usage.returncode == 2 and "unknown RVC generator config '44k'" in usage.stderr
    assert rvclora().returncode == 2  # a command is required
