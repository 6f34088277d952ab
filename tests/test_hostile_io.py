"""Untrusted sizes and failing writes: checked before allocating, reported in one line naming the path."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import rvclora.io as rio
from rvclora import LoRAConfig, inject_lora, save_lora_checkpoint
from rvclora.checkpoint import read_lora_file, write_lora_file
from rvclora.cli import main
from rvclora.models.rvc import GeneratorConfig, build_generator
from rvclora.rvc_files import RVCFileError, load_rvc_file, write_exported_model

ROOT = Path(__file__).resolve().parent.parent
CFG = GeneratorConfig(
    name="custom",
    version="v2",
    sampling_rate=40000,
    upsample_rates=(2, 2),
    upsample_kernel_sizes=(4, 4),
    segment_frames=8,
    inter_channels=8,
    upsample_initial_channel=16,
    resblock_kernel_sizes=(3,),
    resblock_dilation_sizes=((1, 3, 5),),
    gin_channels=8,
)
WEIGHTS = {"a.lora_A": torch.ones(2, 300), "a.lora_B": torch.ones(300, 2)}


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rvclora: error:") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- declared sizes


def _deflated(src: Path, dst: Path, extra_bytes: int = 0) -> None:
    """``src`` (a torch.save zip) rewritten with every member deflated, one storage padded with zeros."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        padded = False
        for info in zin.infolist():
            data = zin.read(info.filename)
            if not padded and "/data/" in info.filename and extra_bytes:
                data += bytes(extra_bytes)
                padded = True
            zout.writestr(info.filename, data)


def test_a_deflated_storage_is_refused_before_torch_load_inflates_it(tmp_path, capsys) -> None:
    """A 1 MB .pth holding a deflated 1 GiB storage made info peak at 2.4 GB: the declared size is checked first."""
    write_lora_file(tmp_path / "a.pth", WEIGHTS, LoRAConfig(r=2), base_fingerprint=None)
    _deflated(tmp_path / "a.pth", tmp_path / "bomb.pth", extra_bytes=40 << 20)
    assert os.path.getsize(tmp_path / "bomb.pth") < 1 << 20
    with pytest.raises(ValueError, match=r"bomb\.pth.*declare 40\.\d MiB uncompressed in a .* KiB file"):
        read_lora_file(tmp_path / "bomb.pth")
    write_exported_model(build_generator(CFG, seed=0), tmp_path / "base.pth", CFG)
    _deflated(tmp_path / "base.pth", tmp_path / "base_bomb.pth", extra_bytes=40 << 20)
    with pytest.raises(RVCFileError, match=r"base_bomb\.pth: its zip members declare"):
        load_rvc_file(tmp_path / "base_bomb.pth")
    assert "declare" in _one_line_error(capsys, ["info", str(tmp_path / "base_bomb.pth")])
    # deflated but not inflating beyond the slack: still read (the check is on sizes, not on compression)
    _deflated(tmp_path / "a.pth", tmp_path / "small_deflated.pth")
    assert read_lora_file(tmp_path / "small_deflated.pth")["config"].r == 2


def test_too_many_archive_members_are_not_even_listed(tmp_path, monkeypatch) -> None:
    write_lora_file(tmp_path / "a.pth", WEIGHTS, LoRAConfig(r=2), base_fingerprint=None)
    monkeypatch.setattr(rio, "MAX_ZIP_MEMBERS", 3)
    assert rio.detect_format(tmp_path / "a.pth") == "zip-huge"
    with pytest.raises(ValueError, match="more members than any torch.save file"):
        read_lora_file(tmp_path / "a.pth")
    with pytest.raises(ValueError, match="MAX_ZIP_MEMBERS"):
        rio.check_torch_archive(tmp_path / "a.pth")


def test_too_many_safetensors_tensors_are_refused_before_reading_them(tmp_path, monkeypatch) -> None:
    from safetensors.torch import save_file

    import rvclora.validate as val

    monkeypatch.setattr(val, "MAX_TENSORS", 10)
    tensors = {f"l{i}.lora_A": torch.zeros(1, 1) for i in range(11)}
    save_file(
        tensors,
        str(tmp_path / "many.safetensors"),
        metadata={"format_version": "2", "config": json.dumps(LoRAConfig(r=1).to_dict())},
    )
    with pytest.raises(ValueError, match=r"many\.safetensors.*11 tensors.*at most 10"):
        read_lora_file(tmp_path / "many.safetensors")


def test_a_deeply_nested_safetensors_header_is_one_value_error(tmp_path, capsys) -> None:
    """It raised RecursionError, where read_lora_file documents ValueError."""
    header = ('{"__metadata__": {"format_version": "2"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match=r"deep\.safetensors' is not a readable") as e:
        read_lora_file(path)
    assert "\n" not in str(e.value)
    assert "deep.safetensors" in _one_line_error(capsys, ["info", str(path)])


# --------------------------------------------------------------------------- what is not a file


def test_info_on_things_that_are_not_files_says_what_they_are(tmp_path, capsys) -> None:
    """A directory, /dev/zero or a FIFO were all reported as "does not exist"."""
    assert "is a directory" in _one_line_error(capsys, ["info", str(tmp_path)])
    if os.path.exists("/dev/zero"):
        assert "is a character device" in _one_line_error(capsys, ["info", "/dev/zero"])
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        t0 = time.perf_counter()
        assert "is a FIFO" in _one_line_error(capsys, ["info", str(tmp_path / "fifo")])
        assert time.perf_counter() - t0 < 5  # never opened (opening a FIFO blocks)
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert "dangling symbolic link" in _one_line_error(capsys, ["info", str(tmp_path / "dangling")])
    assert "does not exist" in _one_line_error(capsys, ["info", str(tmp_path / "missing.safetensors")])


def test_a_windows_path_in_mix_is_reported_missing_not_a_bad_weight(tmp_path, capsys) -> None:
    err = _one_line_error(capsys, ["mix", r"C:\missing.safetensors", "-o", str(tmp_path / "m.safetensors")])
    assert "does not exist" in err and "must be a number" not in err


# --------------------------------------------------------------------------- failing writes

_WRITER = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    import torch
    from rvclora.cli import main
    from rvclora.checkpoint import write_lora_file
    from rvclora import LoRAConfig
    out = sys.argv[1]
    w = {"a.lora_A": torch.ones(2, 300), "a.lora_B": torch.ones(300, 2)}
    for suffix in (".safetensors", ".pth"):
        try:
            write_lora_file(out + suffix, w, LoRAConfig(r=2), base_fingerprint=None)
        except OSError as e:
            print("OSError", str(e))
        else:
            print("WROTE", suffix)
    small = out + "_small.safetensors"
    sys.exit(main(["mix", small + ":0.5", small + ":0.5", "-o", out + "_mix.safetensors", "--overwrite"]))
""")


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="file size limits (RLIMIT_FSIZE) are POSIX")
def test_a_write_that_hits_a_file_size_limit_is_one_line_and_replaces_nothing(tmp_path) -> None:
    """EFBIG gave a SafetensorError traceback, or torch's "enforce fail at inline_container.cc"."""
    out = tmp_path / "out"
    for suffix in (".safetensors", ".pth"):
        Path(f"{out}{suffix}").write_bytes(b"old")
    small = inject_lora(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoRAConfig(r=4, target_modules=["0"]))
    save_lora_checkpoint(small, f"{out}_small.safetensors")
    Path(f"{out}_mix.safetensors").write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("OSError writing") for line in lines), proc.stdout + proc.stderr
    assert all("File too large" in line and "nothing was replaced" in line for line in lines)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("rvclora: error: writing") and "\n" not in err and "File too large" in err, err
    for suffix in (".safetensors", ".pth", "_mix.safetensors"):
        assert Path(f"{out}{suffix}").read_bytes() == b"old"
    assert not [p for p in os.listdir(tmp_path) if rio.TMP_MARK in p]


def test_a_failing_writer_of_any_type_becomes_one_oserror(tmp_path) -> None:
    def boom(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 982\nframe #0 ...")

    (tmp_path / "t.pth").write_bytes(b"old")
    with pytest.raises(OSError, match=r"writing '.*t\.pth' failed: .*nothing was replaced") as e:
        rio.atomic_write(tmp_path / "t.pth", boom)
    assert "\n" not in str(e.value)
    assert (tmp_path / "t.pth").read_bytes() == b"old"
