"""Adapter checkpoints: round trips in both formats, safety, atomicity and every error."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from rvclora import (
    LoRAConfig,
    extract_lora_weights,
    inject_lora,
    load_lora_checkpoint,
    load_lora_weights,
    read_lora_config,
    save_lora_checkpoint,
)
from rvclora.checkpoint import atomic_write, read_lora_file, write_lora_file
from rvclora.io import RVCLoRAWarning, detect_format


def make_model(r=2, bias="none", seed=0, base_seed=0):
    """A small injected model: base weights from ``base_seed``, LoRA factors (and LoRA A init) from ``seed``."""
    torch.manual_seed(base_seed)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.utils.weight_norm(nn.ConvTranspose1d(8, 6, 4, 2, padding=1)),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.Linear(7, 5),
    )
    cfg = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["1", "2", "3"], bias=bias)
    torch.manual_seed(seed)
    inject_lora(model, cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    return model, cfg


def _train_step(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model[:3](torch.randn(2, 4, 5)).sum().backward()
    model[3](torch.randn(2, 7)).sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_with_optimizer(tmp_path, suffix):
    model, cfg = make_model(bias="lora_only")
    opt = _train_step(model)
    path = tmp_path / f"adapter{suffix}"
    save_lora_checkpoint(model, path, cfg, optimizer_state=opt.state_dict(), epoch=100)
    other, _ = make_model(bias="lora_only", seed=1)
    _, opt_state, epoch, cfg2 = load_lora_checkpoint(other, path, load_optimizer=True)
    assert epoch == 100 and cfg2 == cfg
    for (n, a), b in zip(model.named_parameters(), other.parameters()):
        if "lora_" in n or (n.endswith("bias") and n[0] in "123"):
            assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(opt_state)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state_dict()["state"][k][name]))
    assert read_lora_config(path) == cfg
    _, no_opt, _, _ = load_lora_checkpoint(other, path)
    assert no_opt is None


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_holds_only_what_training_changed(tmp_path, suffix):
    model, cfg = make_model()
    path = tmp_path / f"a{suffix}"
    save_lora_checkpoint(model, path, cfg)
    data = read_lora_file(path)
    assert set(data["weights"]) == {f"{i}.lora_{ab}" for i in (1, 2, 3) for ab in "AB"}
    assert data["format_version"] == 2 and data["epoch"] is None


def test_bias_modes_in_extract():
    model, _ = make_model(bias="all")
    assert {k for k in extract_lora_weights(model) if k.endswith("bias")} == {"0.bias", "1.bias", "2.bias", "3.bias"}
    assert not any(k.endswith("bias") for k in extract_lora_weights(model, bias="none"))
    with pytest.raises(ValueError, match="bias must be one of"):
        extract_lora_weights(model, bias="x")


def test_pth_is_loaded_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"format_version": 1, "lora_weights": {}, "config": {}, "x": Evil()}, path)
    with pytest.raises(ValueError, match="not a readable rvclora LoRA checkpoint"):
        read_lora_file(path)


def test_errors_name_the_first_mismatch(tmp_path):
    model, cfg = make_model(r=2)
    path = tmp_path / "a.pth"
    save_lora_checkpoint(model, path, cfg)
    bigger, _ = make_model(r=4)
    with pytest.raises(
        ValueError,
        match=r"the file has r=2, lora_alpha=4, but the model's layer '1' was injected "
        r"with r=4, lora_alpha=8",
    ):
        load_lora_checkpoint(bigger, path)
    weights = extract_lora_weights(model)
    with pytest.raises(ValueError, match=r"'1.lora_A' has shape \(2, 8\), the model expects \(4, 8\)"):
        load_lora_weights(bigger, weights)
    partial = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ConvTranspose1d(8, 6, 4, 2, padding=1))
    inject_lora(partial, LoRAConfig(r=2, lora_alpha=4, target_modules=["1"]))
    with pytest.raises(KeyError, match="'2.lora_A' is not a parameter of the model"):
        load_lora_checkpoint(partial, path)
    weights = extract_lora_weights(model)
    del weights["3.lora_B"]
    with pytest.raises(KeyError, match="'3.lora_B' is missing"):
        load_lora_weights(model, weights)
    load_lora_weights(model, weights, strict=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lora_checkpoint(model, tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable rvclora LoRA checkpoint"):
        load_lora_checkpoint(model, tmp_path / "junk.safetensors")
    torch.save({"format_version": 99, "lora_weights": {}, "config": cfg.to_dict()}, tmp_path / "v99.pth")
    with pytest.raises(ValueError, match="format_version 99"):
        load_lora_checkpoint(model, tmp_path / "v99.pth")
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        save_lora_checkpoint(model, tmp_path / "b.pth", cfg.to_dict())
    with pytest.raises(ValueError, match="has no LoRA weights"):
        save_lora_checkpoint(nn.Linear(2, 2), tmp_path / "c.pth", cfg)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    model, cfg = make_model()
    path = tmp_path / "a.pth"
    save_lora_checkpoint(model, path, cfg)
    good = path.read_bytes()

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["a.pth"]  # no temp file left behind


def test_loading_into_a_merged_model(tmp_path):
    model, cfg = make_model()
    path = tmp_path / "a.safetensors"
    save_lora_checkpoint(model, path, cfg)
    other, _ = make_model(seed=3)
    w = other[1].weight.detach().clone()
    other[1].merge()
    load_lora_checkpoint(other, path)
    assert other[1].merged
    other[1].unmerge()
    assert torch.equal(other[1].weight, w)
    assert torch.equal(other[1].lora_B, model[1].lora_B)


# --------------------------------------------------------------------------- base fingerprint and low-level writer


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_write_lora_file_needs_no_model_and_round_trips_metadata(tmp_path, suffix):
    model, cfg = make_model()
    weights = extract_lora_weights(model)
    meta = {"sources": [{"path": "a.pth", "weight": 0.25}, {"path": "b.pth", "weight": 0.75}], "note": "blend"}
    path = tmp_path / f"blend{suffix}"
    assert write_lora_file(path, weights, cfg, base_fingerprint=model.rvclora_base_fingerprint, metadata=meta) == str(
        path
    )
    data = read_lora_file(path)
    assert data["metadata"] == meta and data["base_fingerprint"] == model.rvclora_base_fingerprint
    assert data["config"] == cfg and set(data["weights"]) == set(weights)
    assert all(torch.equal(data["weights"][k], v) for k, v in weights.items())
    write_lora_file(path, weights, cfg, base_fingerprint=None)  # an adapter of unknown base
    assert read_lora_file(path)["base_fingerprint"] is None and read_lora_file(path)["metadata"] is None
    for bad, pattern in [
        ((1, 2), "survive a round trip"),
        ({"x": float("nan")}, "JSON-safe"),
        ({"x": object()}, "JSON-safe"),
        ([1], "must be a dict"),
    ]:
        with pytest.raises(TypeError, match=pattern):
            write_lora_file(path, weights, cfg, base_fingerprint=None, metadata={"k": bad} if bad != [1] else bad)
    with pytest.raises(ValueError, match="base_fingerprint must be a string from"):
        write_lora_file(path, weights, cfg, base_fingerprint="abc")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_adapter_of_another_base_is_refused_unless_forced(tmp_path, suffix):
    model, cfg = make_model()
    path = tmp_path / f"a{suffix}"
    save_lora_checkpoint(model, path, cfg)
    assert read_lora_file(path)["base_fingerprint"] == model.rvclora_base_fingerprint
    other_base, _ = make_model(base_seed=5)
    before = other_base[1].lora_B.detach().clone()
    with pytest.raises(ValueError, match="trained on another base model .* pass force=True"):
        load_lora_checkpoint(other_base, path)
    assert torch.equal(other_base[1].lora_B, before)  # nothing loaded
    with pytest.warns(RVCLoRAWarning, match="mismatch"):
        load_lora_checkpoint(other_base, path, force=True)
    assert torch.equal(other_base[1].lora_B, model[1].lora_B)


def test_old_files_without_fingerprint_load_with_a_warning(tmp_path):
    model, cfg = make_model()
    path = tmp_path / "v1.pth"
    torch.save(
        {
            "format_version": 1,
            "config": cfg.to_dict(),
            "lora_weights": extract_lora_weights(model),
            "epoch": 3,
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )
    data = read_lora_file(path)
    assert data["base_fingerprint"] is None and data["format_version"] == 1 and data["optimizer"]["state"] == {}
    fresh, _ = make_model(seed=2)
    with pytest.warns(RVCLoRAWarning, match="records no base fingerprint"):
        _, _, epoch, _ = load_lora_checkpoint(fresh, path)
    assert epoch == 3 and torch.equal(fresh[3].lora_A, model[3].lora_A)


def test_loading_into_a_plain_model_injects_the_files_config(tmp_path):
    model, cfg = make_model(r=3)
    path = tmp_path / "a.safetensors"
    save_lora_checkpoint(model, path)  # config defaults to the one injected
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),
        nn.utils.weight_norm(nn.ConvTranspose1d(8, 6, 4, 2, padding=1)),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.Linear(7, 5),
    )
    _, _, _, got = load_lora_checkpoint(plain, path)
    assert got == cfg and plain.rvclora_config == cfg and plain[1].r == 3 and plain[1].lora_alpha == 6
    assert torch.equal(plain[2].lora_B, model[2].lora_B)


# --------------------------------------------------------------------------- files on disk


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask_and_overwrites_keep_the_mode(tmp_path, umask):
    model, cfg = make_model()
    old = os.umask(umask)
    try:
        save_lora_checkpoint(model, tmp_path / "a.pth")
        save_lora_checkpoint(model, tmp_path / "a.safetensors")
        for name in ("a.pth", "a.safetensors"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
        os.chmod(tmp_path / "a.pth", 0o640)
        save_lora_checkpoint(model, tmp_path / "a.pth")  # replacing a file keeps its mode
        assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.subprocess
def test_a_killed_write_leaves_a_recognisable_temporary_that_the_next_write_removes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "a.pth"
    script = (
        "import sys, time\n"
        "from rvclora.io import atomic_write\n"
        "def write(tmp):\n"
        "    open(tmp, 'wb').write(b'x' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".a.pth.rvclora-tmp-{proc.pid}-"), left
    assert not target.exists()
    # a live writer's temporary (ours, here) is never touched; a dead one's is
    live = tmp_path / f".a.pth.rvclora-tmp-{os.getpid()}-00000000"
    live.write_bytes(b"busy")
    time.sleep(0.01)
    model, cfg = make_model()
    save_lora_checkpoint(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.pth", live.name])
    assert read_lora_file(target)["config"] == cfg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_stay_readable_when_the_optimizer_section_is_damaged(tmp_path, suffix):
    model, cfg = make_model()
    opt = _train_step(model)
    path = tmp_path / f"a{suffix}"
    save_lora_checkpoint(model, path, cfg, optimizer_state=opt.state_dict())
    if suffix == ".pth":
        raw = torch.load(path, weights_only=True)
        raw["optimizer"] = torch.frombuffer(bytearray(b"PK\x03\x04 damaged"), dtype=torch.uint8)
        torch.save(raw, path)
    else:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta["optimizer"] = meta["optimizer"][: len(meta["optimizer"]) // 2]  # cut JSON
        save_file(tensors, str(path), metadata=meta)
    data = read_lora_file(path)
    assert data["optimizer"] is None and data["optimizer_error"]
    fresh, _ = make_model(seed=4)
    load_lora_checkpoint(fresh, path)  # the weights load
    assert torch.equal(fresh[1].lora_A, model[1].lora_A)
    with pytest.raises(ValueError, match=r"the optimizer state is damaged .* load with load_optimizer=False"):
        load_lora_checkpoint(fresh, path, load_optimizer=True)


def test_format_is_judged_by_content(tmp_path):
    model, cfg = make_model()
    save_lora_checkpoint(model, tmp_path / "a.safetensors")
    save_lora_checkpoint(model, tmp_path / "a.pth")
    assert detect_format(tmp_path / "a.safetensors") == "safetensors"
    assert detect_format(tmp_path / "a.pth") == "torch-zip"
    os.rename(tmp_path / "a.safetensors", tmp_path / "named.pth")  # safetensors content, .pth name
    os.rename(tmp_path / "a.pth", tmp_path / "named.safetensors")  # and the other way round
    for name in ("named.pth", "named.safetensors"):
        assert read_lora_file(tmp_path / name)["config"] == cfg
    with open(tmp_path / "named.safetensors", "rb") as f:
        raw = torch.load(f, weights_only=True)
    torch.save(raw, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert detect_format(tmp_path / "legacy.pt") == "pickle"
    assert read_lora_file(tmp_path / "legacy.pt")["config"] == cfg
    write_lora_file(tmp_path / "w.ckpt", extract_lora_weights(model), cfg, base_fingerprint=None)
    assert detect_format(tmp_path / "w.ckpt") == "torch-zip"
