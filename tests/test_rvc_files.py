"""RVC model files: safe reading, clear errors, and the merged export loading the way RVC inference does."""

from __future__ import annotations

import hashlib
import os
import pathlib
from pathlib import Path

import pytest
import torch
from torch import nn

from rvclora import LoRAConfig, inject_lora, save_lora_checkpoint
from rvclora.inject import randomize_lora_
from rvclora.models.rvc import Generator, GeneratorNSF, build_generator, get_generator_config
from rvclora.rvc_files import (
    EXPORTED_FIELDS,
    AdapterFileError,
    RVCFileError,
    build_generator_from_rvc,
    load_rvc_file,
    merge_adapter,
    write_exported_model,
)

CFG = get_generator_config("40k")
FRAMES = 4


def _extra() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "emb_g.weight": 0.1 * torch.randn(1, 256, generator=gen),
        "enc_p.emb_phone.weight": torch.randn(4, 3, generator=gen),
        "enc_p.emb_phone.bias": torch.randn(4, generator=gen),
    }


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class RVCStyleSynthesizer(nn.Module):
    """What RVC's inference builds from an export: the synthesizer from ``*config`` (only the parts the
    test file holds: decoder, speaker embedding, a stand-in text-encoder piece), positional arguments
    mapped as RVC's ``SynthesizerTrn…`` constructors map them, legacy weight_norm."""

    def __init__(self, *config: object, f0: bool) -> None:
        super().__init__()
        (
            _spec,
            _segment,
            inter,
            _hidden,
            _filter,
            _heads,
            _layers,
            _kernel,
            _p,
            resblock,
            res_kernels,
            res_dilations,
            up_rates,
            up_initial,
            up_kernels,
            spk_embed_dim,
            gin,
            sr,
        ) = config
        dec_args = (inter, resblock, res_kernels, res_dilations, up_rates, up_initial, up_kernels, gin)
        self.dec = GeneratorNSF(*dec_args, sr=sr) if f0 else Generator(*dec_args)
        self.emb_g = nn.Embedding(spk_embed_dim, gin)
        self.enc_p = nn.Module()
        self.enc_p.emb_phone = nn.Linear(3, 4)


def _load_like_rvc(path: Path) -> RVCStyleSynthesizer:
    cpt = torch.load(path, map_location="cpu", weights_only=True)
    net_g = RVCStyleSynthesizer(*cpt["config"], f0=bool(cpt["f0"]))
    result = net_g.load_state_dict(cpt["weight"], strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == [], result  # every key consumed, none left
    return net_g.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 192, FRAMES, generator=gen)
    f0 = 100 + 150 * torch.rand(1, FRAMES, generator=gen)
    return x, f0


def _run(model: nn.Module, g: torch.Tensor, f0_model: bool = True) -> torch.Tensor:
    x, f0 = _inputs()
    with torch.no_grad():
        if f0_model:
            return model(x, f0, g, generator=torch.Generator().manual_seed(9))
        return model(x, g)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("rvc")
    extra = _extra()
    base = build_generator("40k", seed=0).eval()
    write_exported_model(base, d / "base.pth", CFG, extra_weights=extra, info="200epoch")
    lora_cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["ups", "resblocks"])
    adapted = inject_lora(build_generator("40k", seed=0), lora_cfg)
    randomize_lora_(adapted, relative_norm=0.2, seed=1)
    save_lora_checkpoint(adapted, d / "adapter.pth", lora_cfg)
    return {"dir": d, "base": base, "adapted": adapted.eval(), "extra": extra, "lora_cfg": lora_cfg}


def test_exported_file_layout(files: dict) -> None:
    path = files["dir"] / "base.pth"
    cpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(cpt) == set(EXPORTED_FIELDS)
    assert (cpt["sr"], cpt["f0"], cpt["version"], cpt["info"]) == ("40k", 1, "v1", "200epoch")
    assert len(cpt["config"]) == 18 and cpt["config"][12] == [10, 10, 2, 2] and cpt["config"][17] == 40000
    assert cpt["config"][15] == 1  # spk_embed_dim follows emb_g, as RVC's export sets it
    assert all(v.dtype == torch.float16 for v in cpt["weight"].values())
    assert "dec.ups.0.weight_g" in cpt["weight"] and "dec.ups.0.weight_v" in cpt["weight"]
    assert not any("enc_q" in k for k in cpt["weight"])
    mf = load_rvc_file(path)
    assert mf.kind == "exported" and mf.f0 and mf.weight_norm == "legacy"
    assert isinstance(build_generator_from_rvc(mf), GeneratorNSF)


def test_merge_loads_like_rvc_inference(files: dict) -> None:
    d: Path = files["dir"]
    base_sha, adapter_sha = _sha(d / "base.pth"), _sha(d / "adapter.pth")
    result = merge_adapter(d / "base.pth", d / "adapter.pth", d / "merged.pth")
    assert result.merged_layers == 4 + 4 * 3 * 6
    assert _sha(d / "base.pth") == base_sha and _sha(d / "adapter.pth") == adapter_sha  # inputs untouched
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]

    base_cpt = torch.load(d / "base.pth", map_location="cpu", weights_only=True)
    cpt = torch.load(d / "merged.pth", map_location="cpu", weights_only=True)
    assert set(cpt) == set(base_cpt)
    for field in ("config", "sr", "f0", "version"):
        assert cpt[field] == base_cpt[field], field
    assert cpt["info"].startswith("200epoch + rvclora adapter adapter.pth") and "r=4" in cpt["info"]
    assert list(cpt["weight"]) == list(base_cpt["weight"])  # same keys, same order
    for k, v in cpt["weight"].items():
        assert v.dtype == base_cpt["weight"][k].dtype == torch.float16, k
        if not k.startswith("dec."):
            assert torch.equal(v, base_cpt["weight"][k]), k
    assert cpt["weight"]["dec.ups.0.weight_g"].shape == (512, 1, 1)  # per input channel
    changed = [k for k in cpt["weight"] if not torch.equal(cpt["weight"][k], base_cpt["weight"][k])]
    assert all(k.endswith(("weight_g", "weight_v")) for k in changed) and len(changed) >= 2 * 76 - 4

    g = files["extra"]["emb_g.weight"][:, :, None]
    want = _run(files["adapted"], g)
    got = _run(_load_like_rvc(d / "merged.pth").dec, g)
    # fp16 tolerance: twice what storing the *base* model in fp16 costs on the same input.
    base_err = (_run(_load_like_rvc(d / "base.pth").dec, g) - _run(files["base"], g)).abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 2 * base_err + 1e-6, (err, base_err)
    assert (want - _run(files["base"], g)).abs().max().item() > 10 * (2 * base_err + 1e-6)  # the merge mattered


def test_merge_no_f0_model_and_synthesizer_prefixed_adapter(tmp_path: Path) -> None:
    """A no-f0 export, and an adapter trained on RVC's whole synthesizer (keys ``dec.…``)."""
    base = build_generator("v2-32k", f0=False, seed=3).eval()
    cfg = get_generator_config("v2-32k")
    extra = _extra()
    write_exported_model(base, tmp_path / "nof0.pth", cfg, extra_weights=extra)
    synth = nn.Module()
    synth.dec = build_generator("v2-32k", f0=False, seed=3)
    synth.emb_g = nn.Embedding(1, 256)
    lora_cfg = LoRAConfig(r=2, lora_alpha=4, target_modules=["dec.ups"])
    inject_lora(synth, lora_cfg)
    randomize_lora_(synth, relative_norm=0.05, seed=2)
    save_lora_checkpoint(synth, tmp_path / "synth_adapter.safetensors", lora_cfg)
    result = merge_adapter(tmp_path / "nof0.pth", tmp_path / "synth_adapter.safetensors", tmp_path / "out.pth")
    assert result.merged_layers == 4
    cpt = torch.load(tmp_path / "out.pth", weights_only=True)
    assert cpt["f0"] == 0 and cpt["version"] == "v2" and cpt["sr"] == "32k"
    g = extra["emb_g.weight"][:, :, None]
    want = _run(synth.dec.eval(), g, f0_model=False)
    got = _run(_load_like_rvc(tmp_path / "out.pth").dec, g, f0_model=False)
    base_err = (_run(_load_like_rvc(tmp_path / "nof0.pth").dec, g, False) - _run(base, g, False)).abs().max().item()
    assert (got - want).abs().max().item() <= 2 * base_err + 1e-6


def test_refuses_to_overwrite(files: dict, tmp_path: Path) -> None:
    d: Path = files["dir"]
    out = tmp_path / "exists.pth"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
        merge_adapter(d / "base.pth", d / "adapter.pth", out)
    assert out.read_bytes() == b"keep me"
    for target in (d / "base.pth", d / "adapter.pth"):
        with pytest.raises(ValueError, match="is the (base model|adapter) file; write to a new path"):
            merge_adapter(d / "base.pth", d / "adapter.pth", target, overwrite=True)
    merge_adapter(d / "base.pth", d / "adapter.pth", out, overwrite=True)
    assert load_rvc_file(out).kind == "exported"
    assert sorted(os.listdir(tmp_path)) == ["exists.pth"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError, match=r"directory .* does not exist"):
        merge_adapter(d / "base.pth", d / "adapter.pth", tmp_path / "no" / "such" / "dir.pth")


def test_training_checkpoint(files: dict, tmp_path: Path) -> None:
    base = files["base"]
    sd = {f"dec.{k}": v for k, v in base.state_dict().items()}
    sd["enc_q.pre.weight"] = torch.zeros(2, 2)
    torch.save(
        {"model": sd, "iteration": 7, "optimizer": {"state": {}, "param_groups": []}, "learning_rate": 1e-4},
        tmp_path / "G_7.pth",
    )
    mf = load_rvc_file(tmp_path / "G_7.pth")
    assert mf.kind == "checkpoint" and mf.f0 and mf.data["iteration"] == 7
    fresh = build_generator("40k", seed=9)
    fresh.load_state_dict(mf.decoder_state_dict(), strict=True)
    assert torch.equal(fresh.ups[0].weight_v, base.ups[0].weight_v)
    # a checkpoint records no config: merging needs RVC's whole synthesizer to tell which one it is
    with pytest.raises(RVCFileError, match=r"G_7\.pth: its weights are not those of any shipped RVC synthesizer"):
        merge_adapter(tmp_path / "G_7.pth", files["dir"] / "adapter.pth", tmp_path / "out.pth")
    with pytest.raises(RVCFileError, match="no config"):
        build_generator_from_rvc(mf)


class _Touch:
    """Unpickling this would create a file: a safe loader must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_bad_files_give_clear_errors(files: dict, tmp_path: Path) -> None:
    d: Path = files["dir"]
    (tmp_path / "noise.pth").write_bytes(os.urandom(4096))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a model\n")
    marker = tmp_path / "pwned"
    torch.save({"weight": _Touch(str(marker))}, tmp_path / "evil.pth")
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cpt = torch.load(d / "base.pth", weights_only=True)
    del cpt["config"], cpt["sr"]
    torch.save(cpt, tmp_path / "partial.pth")
    torch.save({"model": {"enc_p.x": torch.zeros(1)}}, tmp_path / "nodec.pth")

    cases = {
        "noise.pth": r"an unrecognised binary file, not an RVC model file",
        "empty.pth": r"an empty file, not an RVC model file",
        "text.pth": r"a text file, not an RVC model file",
        "evil.pth": r"contains pickled code \(getattr\) that the safe loader refused to run",
        "other.pth": r"neither an exported RVC model .* nor a training checkpoint .*'hello'",
        "list.pth": r"expected a dict .* got list",
        "partial.pth": r"lacks the field\(s\) \['config', 'sr'\]",
        "nodec.pth": r"no decoder \('dec\.' keys\)",
    }
    for name, pattern in cases.items():
        with pytest.raises(RVCFileError, match=pattern) as info:
            load_rvc_file(tmp_path / name)
        assert "\n" not in str(info.value) and "weights_only` set to `False" not in str(info.value)
    assert not marker.exists()  # the pickled call never ran
    with pytest.raises(AdapterFileError, match="rvclora adapter, not an RVC model"):
        load_rvc_file(d / "adapter.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rvc_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not a readable rvclora LoRA checkpoint"):
        merge_adapter(d / "base.pth", d / "base.pth", tmp_path / "out.pth")


def test_adapter_for_another_config_is_refused(files: dict, tmp_path: Path) -> None:
    lora_cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=["ups", "resblocks"])
    other = inject_lora(build_generator("v2-48k", seed=0), lora_cfg)
    save_lora_checkpoint(other, tmp_path / "v2_48k.pth", lora_cfg)
    with pytest.raises(RVCFileError, match=r"adapter does not fit the decoder of .*base\.pth.*shape"):
        merge_adapter(files["dir"] / "base.pth", tmp_path / "v2_48k.pth", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()


def test_decoder_not_fitting_its_config(files: dict, tmp_path: Path) -> None:
    cpt = torch.load(files["dir"] / "base.pth", weights_only=True)
    cpt["config"][12] = [10, 8, 2, 2]  # v2-32k's upsampling in a 40k file: kernel and noise-conv shapes differ
    cpt["config"][14] = [20, 16, 4, 4]
    torch.save(cpt, tmp_path / "wrong.pth")
    with pytest.raises(RVCFileError, match=r"wrong\.pth: 'dec\.\S+' has shape .* but its config \(custom"):
        load_rvc_file(tmp_path / "wrong.pth")
    with pytest.raises(RVCFileError, match=r"do not fit the file's own config \(custom, f0=True\).*ups\.0\.weight_v"):
        build_generator_from_rvc(load_rvc_file(tmp_path / "wrong.pth", validate=False))


def test_merge_refuses_an_adapter_of_another_base_unless_forced(files: dict, tmp_path: Path) -> None:
    d: Path = files["dir"]
    other = build_generator("40k", seed=3)  # another voice's model, same config
    write_exported_model(other, tmp_path / "other.pth", CFG, extra_weights=files["extra"])
    with pytest.raises(RVCFileError, match=r"adapter\.pth: the adapter was trained on another base model .*--force"):
        merge_adapter(tmp_path / "other.pth", d / "adapter.pth", tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    with pytest.warns(UserWarning, match="used anyway"):
        merge_adapter(tmp_path / "other.pth", d / "adapter.pth", tmp_path / "out.pth", force=True)
    assert load_rvc_file(tmp_path / "out.pth").kind == "exported"
