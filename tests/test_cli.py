"""The ``rvclora`` command, run as a subprocess (``python -m rvclora``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rvclora.ops import BACKENDS

pytestmark = pytest.mark.subprocess  # every test here runs rvclora or pytest in a child process

REPO = Path(__file__).resolve().parents[1]


def rvclora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "rvclora", *args], capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=300
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rvclora: error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    "args", [[], ["demo"], ["merge"], ["info"], ["train"]], ids=["top", "demo", "merge", "info", "train"]
)
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
    proc = rvclora(
        "demo",
        "--teacher",
        "--steps",
        "3",
        "--frames",
        "2",
        "--rank",
        "4",
        "--bench-rounds",
        "1",
        "--seed",
        "3",
        "--out-dir",
        str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    m = re.search(r"before (\S+), after (\S+)", out)
    assert m and float(m.group(1)) > 0 and float(m.group(2)) >= 0, out
    assert re.search(r"frozen base \d+\.\d+\s+LoRA \d+\.\d+ .*full fine-tuning \d+\.\d+", out), out
    assert re.search(r"files: adapter [\d.]+ \w+ vs model [\d.]+ MiB", out), out
    # the machine and what auto ran there (the suite runs auto's fixed rule, tests/conftest.py)
    assert re.search(r"ran on: (CPU|GPU) .+\n  auto \(fixed rule\) ran \w+ for lora_conv", out), out
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
    assert_one_line_error(
        rvclora("merge", str(base), str(adapter), "-o", str(out_path)),
        r"already exists; pass overwrite=True \(--overwrite\)",
    )
    assert rvclora("merge", str(base), str(adapter), "-o", str(out_path), "--overwrite").returncode == 0
    assert_one_line_error(
        rvclora("merge", str(base), str(adapter), "-o", str(base), "--overwrite"), r"is the base model file"
    )
    assert_one_line_error(
        rvclora("merge", str(adapter), str(adapter), "-o", str(tmp_path / "x.pth")),
        r"rvclora adapter, not an RVC model file",
    )


def test_errors_are_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00" * 100)
    assert_one_line_error(rvclora("info", str(junk)), r"junk\.pth: an unrecognised binary file, not an RVC model file")
    assert_one_line_error(rvclora("info", str(tmp_path / "missing.pth")), r"'.*missing\.pth' does not exist")
    assert_one_line_error(rvclora("demo", "--out-dir", str(tmp_path / "nope")), r"--out-dir .* not an existing")
    assert_one_line_error(
        rvclora("demo", "--steps", "3"),
        r"--steps is an option of the teacher demo; run "
        r"'rvclora demo --teacher'",
    )
    usage = rvclora("demo", "--rank", "0")
    assert usage.returncode == 2 and "expected a positive integer, got 0" in usage.stderr
    assert "Traceback" not in usage.stderr
    usage = rvclora("demo", "--config", "44k")
    assert usage.returncode == 2 and "unknown RVC generator config '44k'" in usage.stderr
    assert rvclora().returncode == 2  # a command is required


def test_version() -> None:
    from rvclora import __version__

    proc = rvclora("--version")
    assert proc.returncode == 0 and proc.stdout.strip().startswith(f"rvclora {__version__} (torch "), proc.stdout


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from rvclora import LoRAConfig, inject_lora, save_lora_checkpoint
    from rvclora.inject import randomize_lora_
    from rvclora.models.rvc import build_generator, get_generator_config
    from rvclora.rvc_files import write_exported_model

    d = tmp_path_factory.mktemp("cli")
    cfg = get_generator_config("40k")
    emb = {"emb_g.weight": torch.zeros(1, 256)}
    write_exported_model(build_generator(cfg, seed=0), d / "base.pth", cfg, extra_weights=emb)
    write_exported_model(build_generator(cfg, seed=1), d / "other.pth", cfg, extra_weights=emb)
    lora = LoRAConfig(r=2, lora_alpha=4, target_modules=["ups.0"])
    model = inject_lora(build_generator(cfg, seed=0), lora)
    randomize_lora_(model, relative_norm=0.1, seed=3)
    save_lora_checkpoint(model, d / "adapter.safetensors")
    from rvclora.checkpoint import read_lora_file

    data = read_lora_file(d / "adapter.safetensors")
    raw = {
        "format_version": 2,
        "config": lora.to_dict(),
        "lora_weights": data["weights"],
        "epoch": None,
        "base_fingerprint": data["base_fingerprint"],
        "metadata": None,
        "optimizer": None,
    }
    torch.save(raw, d / "proto3.pth", pickle_protocol=3)  # loads, with a torch warning about the protocol
    nan = {k: v.clone() for k, v in data["weights"].items()}
    nan["ups.0.lora_B"][0, 0] = float("nan")
    torch.save({**raw, "lora_weights": nan}, d / "nan.pth")
    with open(d / "base.pth", "rb") as f:
        cpt = torch.load(f, weights_only=True)
    cpt["weight"]["dec.conv_post.weight"][0, 0, 0] = float("inf")
    torch.save(cpt, d / "inf_model.pth")
    return {"dir": d}


def test_info_shows_fingerprints_and_keeps_library_warnings_out(files: dict) -> None:
    d = files["dir"]
    base = rvclora("info", str(d / "base.pth"))
    adapter = rvclora("info", str(d / "proto3.pth"))
    for proc in (base, adapter):
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # torch's protocol warning stays out
        assert "all tensors finite" in proc.stdout
    fp = re.search(r"base fingerprint: (fp16-sha256:\w+)", base.stdout).group(1)
    assert f"base fingerprint: {fp}" in adapter.stdout  # the adapter belongs to this base


def test_info_flags_non_finite_tensors(files: dict) -> None:
    d = files["dir"]
    for name, key in (("nan.pth", "ups.0.lora_B: 1 NaN"), ("inf_model.pth", "dec.conv_post.weight: 1 Inf")):
        proc = rvclora("info", str(d / name))
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert re.search(rf"NOT FINITE: 1 tensors hold NaN or Inf: {re.escape(key)}", proc.stdout), proc.stdout
        assert proc.stderr.startswith("rvclora: error: 1 tensors are not finite"), proc.stderr


def test_merge_refuses_another_base_and_force_warns_in_one_line(files: dict) -> None:
    d = files["dir"]
    out = d / "merged.pth"
    assert_one_line_error(
        rvclora("merge", str(d / "other.pth"), str(d / "adapter.safetensors"), "-o", str(out)),
        r"adapter\.safetensors: the adapter was trained on another base model .*--force",
    )
    assert not out.exists()
    forced = rvclora("merge", str(d / "other.pth"), str(d / "adapter.safetensors"), "-o", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr.startswith("rvclora: warning: ") and len(forced.stderr.strip().splitlines()) == 1
    assert "used anyway" in forced.stderr and out.exists()
    assert_one_line_error(
        rvclora("merge", str(d / "base.pth"), str(d / "nan.pth"), "-o", str(d / "m2.pth")),
        r"nan\.pth: refusing to merge: the adapter's 'ups\.0\.lora_B' is not finite",
    )
    assert_one_line_error(
        rvclora("merge", str(d / "base.pth"), str(d / "nan.pth"), "-o", str(d / "m.safetensors")),
        r"name it \.pth, not \.safetensors",
    )
    assert not (d / "m2.pth").exists() and not (d / "m.safetensors").exists()


def test_a_closed_pipe_is_quiet(files: dict) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rvclora", "info", str(files["dir"] / "base.pth")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    proc.stdout.close()  # the reader goes away before the first line (as `| head -0` would)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err
