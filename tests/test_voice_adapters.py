"""Whole-voice adapters: LoRA over RVC's whole synthesizer plus ``modules_to_save``.

Most tests use a tiny synthesizer (RVC's classes with small arguments: the same code paths, fast);
the shipped sizes appear only where the sizes are the point.
"""

from __future__ import annotations

import json

import pytest
import torch

from rvclora import DECODER_CONFIG, VOICE_CONFIG, LoRAConfig, inject_lora, save_lora_checkpoint
from rvclora.blend import BlendError, blend_adapters, layer_records
from rvclora.checkpoint import extract_lora_weights, load_lora_checkpoint, read_lora_file
from rvclora.fingerprint import SYNTH_PREFIX, base_fingerprint
from rvclora.inject import canonical_saved_key, mark_only_lora_as_trainable, randomize_lora_, saved_parameters
from rvclora.io import RVCLoRAWarning
from rvclora.models.discriminator import kl_loss
from rvclora.models.synthesizer import (
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
    build_synthesizer,
    synthesizer_from_rvc_config,
)
from rvclora.rvc_files import RVCFileError, merge_adapter

TINY_ARGS = [33, 4, 8, 16, 32, 2, 2, 3, 0.0, "1", [3, 5], [[1, 3], [1, 3]], [4, 2], 16, [8, 4], 5, 8, 8000]
VOICE = dict(target_modules=["enc_p", "flow", "dec"], modules_to_save=["emb_g"])


def tiny(version: str = "v1", f0: bool = True, seed: int = 0, weight_norm: str = "legacy"):
    cls = {
        ("v1", True): SynthesizerTrnMs256NSFsid,
        ("v2", True): SynthesizerTrnMs768NSFsid,
        ("v1", False): SynthesizerTrnMs256NSFsid_nono,
        ("v2", False): SynthesizerTrnMs768NSFsid_nono,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls[(version, f0)](*TINY_ARGS, weight_norm=weight_norm)


def perturb_(model, seed: int, scale: float = 0.05):
    """Train-like change of every trainable tensor (LoRA factors and saved modules), seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------- modules_to_save


def test_config_field_round_trips_and_is_left_out_when_empty() -> None:
    cfg = LoRAConfig(**VOICE)
    assert LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert "modules_to_save" not in LoRAConfig().to_dict()  # decoder adapters read by earlier releases
    assert LoRAConfig(modules_to_save=None).modules_to_save == []
    with pytest.raises(ValueError, match="modules_to_save entries must be non-empty strings"):
        LoRAConfig(modules_to_save=[""])


def test_inject_keeps_saved_modules_trainable() -> None:
    m = inject_lora(tiny(), LoRAConfig(**VOICE))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "emb_g.weight" in trainable
    assert all(n == "emb_g.weight" or n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert any(n.startswith("flow.") for n in trainable) and any(n.startswith("enc_p.") for n in trainable)
    mark_only_lora_as_trainable(m)  # the recorded config's modules_to_save stay trainable
    assert m.emb_g.weight.requires_grad
    mark_only_lora_as_trainable(m, modules_to_save=[])
    assert not m.emb_g.weight.requires_grad


def test_inject_refuses_overlap_and_unmatched_entries() -> None:
    with pytest.raises(ValueError, match=r"'dec.conv_post' is both a LoRA target .* and saved whole"):
        inject_lora(tiny(), LoRAConfig(target_modules=["dec"], modules_to_save=["conv_post"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['emb_x'\] match no module with parameters"):
        inject_lora(tiny(), LoRAConfig(target_modules=["dec"], modules_to_save=["emb_x"]))


@pytest.mark.parametrize("weight_norm", ["legacy", "parametrizations"])
def test_saved_modules_round_trip_through_a_file(tmp_path, weight_norm: str) -> None:
    cfg = LoRAConfig(target_modules=["enc_p"], modules_to_save=["emb_g", "flows.0.enc.cond_layer"])
    m = perturb_(inject_lora(tiny(weight_norm=weight_norm), cfg), 1)
    weights = extract_lora_weights(m)
    # saved keys in RVC's file form, whatever weight_norm the model uses
    assert {
        "emb_g.weight",
        "flow.flows.0.enc.cond_layer.weight_g",
        "flow.flows.0.enc.cond_layer.weight_v",
        "flow.flows.0.enc.cond_layer.bias",
    } <= set(weights)
    path = tmp_path / "voice.safetensors"
    save_lora_checkpoint(m, path)
    data = read_lora_file(path)
    assert data["metadata"]["modules_to_save"]["emb_g.weight"] == [5, 8]
    assert data["base_fingerprint"].startswith(SYNTH_PREFIX)
    fresh, *_ = load_lora_checkpoint(tiny(weight_norm=weight_norm), path)
    for k, v in extract_lora_weights(m).items():
        assert torch.equal(extract_lora_weights(fresh)[k], v), k


def test_reading_checks_the_saved_record(tmp_path) -> None:
    from safetensors.torch import save_file

    m = perturb_(inject_lora(tiny(), LoRAConfig(**VOICE)), 1)
    path = tmp_path / "voice.safetensors"
    save_lora_checkpoint(m, path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(meta)
    md = json.loads(bad["metadata"])
    md["modules_to_save"]["emb_g.weight"] = [5, 9]
    bad["metadata"] = json.dumps(md)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match=r"'emb_g.weight' has shape \(5, 8\), its record says \(5, 9\)"):
        read_lora_file(tmp_path / "bad.safetensors")
    # a whole tensor the config does not name is refused
    cfg = json.loads(meta["config"])
    cfg["modules_to_save"] = []
    save_file(tensors, str(tmp_path / "unnamed.safetensors"), metadata={**meta, "config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="key 'emb_g.weight' is not a LoRA factor"):
        read_lora_file(tmp_path / "unnamed.safetensors")


def test_blend_of_saved_modules_is_weighted_against_the_base() -> None:
    base = tiny()
    base_emb = base.emb_g.weight.detach().clone()
    cfg = LoRAConfig(**VOICE)
    a = perturb_(inject_lora(tiny(), cfg), 1)
    b = perturb_(inject_lora(tiny(), cfg), 2)

    def adapter(m):
        return {
            "weights": extract_lora_weights(m),
            "config": cfg,
            "base_fingerprint": m.rvclora_base_fingerprint,
            "metadata": {"layers": layer_records(m)},
        }

    ta, tb = a.emb_g.weight.detach(), b.emb_g.weight.detach()
    mix = blend_adapters([adapter(a), adapter(b)], [0.25, 0.75])  # sums to 1: no base needed
    assert torch.allclose(mix["weights"]["emb_g.weight"], 0.25 * ta + 0.75 * tb, atol=1e-6)
    with pytest.raises(BlendError, match="sum to 1.5, not 1: .* needs the base model's tensors"):
        blend_adapters([adapter(a), adapter(b)], [0.5, 1.0])
    mix = blend_adapters([adapter(a), adapter(b)], [0.5, 1.0], base={"emb_g.weight": base_emb})
    want = base_emb + 0.5 * (ta - base_emb) + 1.0 * (tb - base_emb)
    assert torch.allclose(mix["weights"]["emb_g.weight"], want, atol=1e-6)
    assert mix["config"].modules_to_save == ["emb_g"]
    assert mix["metadata"]["blend"]["whole_tensors"] == "base + sum w_i (T_i - base)"


def test_synth_fingerprint_sees_the_flow() -> None:
    a, b = tiny(), tiny()
    with torch.no_grad():
        b.flow.flows[2].enc.in_layers[1].weight_v.add_(0.01)
    assert base_fingerprint(a) == base_fingerprint(b)  # the decoder scope: decoder only, as before
    assert base_fingerprint(a, scope="synth") != base_fingerprint(b, scope="synth")
    enc_q_changed = tiny()
    with torch.no_grad():
        enc_q_changed.enc_q.pre.weight.add_(1.0)  # not in RVC's exports, so not in the fingerprint
    assert base_fingerprint(a, scope="synth") == base_fingerprint(enc_q_changed, scope="synth")
    dec_only = inject_lora(tiny(), LoRAConfig(target_modules=["dec.ups"]))
    assert not dec_only.rvclora_base_fingerprint.startswith(SYNTH_PREFIX)


# --------------------------------------------------------------------------- merging whole-voice adapters


def _voice_ready(model, seed: int = 1):
    """``model`` injected with VOICE_CONFIG, with a known non-zero update on every LoRA layer and saved module."""
    inject_lora(model, VOICE_CONFIG)
    randomize_lora_(model, 0.05, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(saved_parameters(model).items()):
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


def _export(model, path, sr, info: str = "9epoch") -> None:
    """What RVC's export writes for ``model``: every key but enc_q's, in half, and the fields."""
    sd = model.state_dict()
    cfg = model.rvc_config()
    cfg[1] = 32
    torch.save(
        {
            "weight": {k: v.half() for k, v in sd.items() if "enc_q" not in k},
            "config": cfg,
            "info": info,
            "sr": sr,
            "f0": int(model.f0),
            "version": model.version,
        },
        path,
    )


def _load_like_rvc(path):
    """RVC's inference: the class from (version, f0) with *config, enc_q deleted, load_state_dict(strict=False)."""
    cpt = torch.load(path, weights_only=True)
    wn = "parametrizations" if any(".parametrizations." in k for k in cpt["weight"]) else "legacy"
    with torch.device("meta"):  # no random init to wait for: every tensor comes from the file (checked below)
        net = synthesizer_from_rvc_config(cpt["config"], cpt["version"], bool(cpt["f0"]), weight_norm=wn)
    del net.enc_q
    result = net.load_state_dict({k: v.float() for k, v in cpt["weight"].items()}, strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return net


def _infer(model, frames: int = 3):
    g = torch.Generator().manual_seed(0)
    phone = torch.randn(1, frames, model.phone_channels, generator=g)
    lengths = torch.tensor([frames])
    pitch = torch.randint(1, 256, (1, frames), generator=g)
    f0 = torch.rand(1, frames, generator=g) * 300 + 80
    sid = torch.tensor([0])
    with torch.no_grad():
        model.eval()
        if model.f0:
            return model.infer(phone, lengths, pitch, f0, sid, generator=torch.Generator().manual_seed(1))[0]
        return model.infer(phone, lengths, sid, generator=torch.Generator().manual_seed(1))[0]


def _check_same_form(base_sd, out_sd) -> None:
    """Every key of the base, in its order, form and dtype."""
    assert list(out_sd) == list(base_sd)
    assert all(out_sd[k].dtype == v.dtype and out_sd[k].shape == v.shape for k, v in base_sd.items())


@pytest.mark.parametrize("weight_norm", ["legacy", "parametrizations"])
def test_voice_adapter_merges_into_an_export(tmp_path, weight_norm: str) -> None:
    """A tiny synthesizer (custom config): merged export infers as the adapted model, within half rounding."""
    base = tiny("v2", True, seed=3, weight_norm=weight_norm)
    _export(base, tmp_path / "base.pth", 8000)
    adapted = _voice_ready(tiny("v2", True, seed=3, weight_norm=weight_norm))
    save_lora_checkpoint(adapted, tmp_path / "voice.safetensors")
    result = merge_adapter(tmp_path / "base.pth", tmp_path / "voice.safetensors", tmp_path / "out.pth")
    assert result.kind == "exported" and result.dropped_layers > 0  # enc_q is not in an export
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    _check_same_form(torch.load(tmp_path / "base.pth", weights_only=True)["weight"], out["weight"])
    assert "rvclora adapter voice.safetensors merged" in out["info"] and out["info"].startswith("9epoch")
    o_adapted, o_merged = _infer(adapted), _infer(_load_like_rvc(tmp_path / "out.pth"))
    o_base = _infer(_load_like_rvc(tmp_path / "base.pth"))
    moved = float((o_adapted - o_base).abs().max())
    assert moved > 1e-3  # the adapter changes the output ...
    assert float((o_merged - o_adapted).abs().max()) < 0.05 * moved  # ... and the merge carries the change


def test_base_with_another_flow_is_refused(tmp_path) -> None:
    adapted = _voice_ready(tiny(seed=3))
    save_lora_checkpoint(adapted, tmp_path / "voice.pth")
    other = tiny(seed=3)
    with torch.no_grad():
        other.flow.flows[0].enc.in_layers[0].weight_v.mul_(1.01)
    _export(other, tmp_path / "other.pth", 8000)
    with pytest.raises(RVCFileError, match=r"trained on another base model \(fingerprint fp16-sha256:synth:"):
        merge_adapter(tmp_path / "other.pth", tmp_path / "voice.pth", tmp_path / "out.pth")
    with pytest.warns(RVCLoRAWarning, match="used anyway"):
        merge_adapter(tmp_path / "other.pth", tmp_path / "voice.pth", tmp_path / "out.pth", force=True)


def test_decoder_adapter_of_a_bare_generator_merges_into_a_full_export(tmp_path) -> None:
    """Adapters written on the bare decoder (keys 'ups.0.lora_A', decoder fingerprint) keep merging."""
    base = tiny(seed=4)
    _export(base, tmp_path / "base.pth", 8000)
    dec = tiny(seed=4).dec
    inject_lora(dec, DECODER_CONFIG)
    randomize_lora_(dec, 0.05, 2)
    save_lora_checkpoint(dec, tmp_path / "dec.safetensors")
    assert not read_lora_file(tmp_path / "dec.safetensors")["base_fingerprint"].startswith(SYNTH_PREFIX)
    result = merge_adapter(tmp_path / "base.pth", tmp_path / "dec.safetensors", tmp_path / "out.pth")
    out = torch.load(tmp_path / "out.pth", weights_only=True)["weight"]
    base_sd = torch.load(tmp_path / "base.pth", weights_only=True)["weight"]
    changed = {k for k in base_sd if not torch.equal(base_sd[k], out[k])}
    assert changed and all(k.startswith(("dec.ups.", "dec.resblocks.")) for k in changed)
    assert result.changed_keys == 2 * result.merged_layers  # weight_g and weight_v of each layer


def test_whole_voice_adapter_needs_the_whole_synthesizer(tmp_path) -> None:
    base = tiny(seed=5)
    _export(base, tmp_path / "dec_only.pth", 8000)
    cpt = torch.load(tmp_path / "dec_only.pth", weights_only=True)
    cpt["weight"] = {k: v for k, v in cpt["weight"].items() if k.startswith("dec.")}  # a decoder-only file
    torch.save(cpt, tmp_path / "dec_only.pth")
    save_lora_checkpoint(_voice_ready(tiny(seed=5)), tmp_path / "voice.pth")
    with pytest.raises(RVCFileError, match=r"whole-voice adapter .* holds only a decoder"):
        merge_adapter(tmp_path / "dec_only.pth", tmp_path / "voice.pth", tmp_path / "out.pth", force=True)


def _train_step(model) -> dict[str, torch.Tensor]:
    """One AdamW step of RVC's losses (KL + mel-free L1 on the slice) on a short input; returns the state before."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.segment_size = 2  # a short decoder slice keeps the step cheap; the code path is RVC's
    g = torch.Generator().manual_seed(0)
    frames = 6
    phone = torch.randn(1, frames, model.phone_channels, generator=g)
    lengths = torch.tensor([frames])
    spec = torch.rand(1, model.spec_channels, frames, generator=g)
    sid = torch.tensor([0])
    if model.f0:
        pitch = torch.randint(1, 256, (1, frames), generator=g)
        f0 = torch.rand(1, frames, generator=g) * 300 + 80
        out = model(phone, lengths, pitch, f0, spec, lengths, sid, generator=g)
    else:
        out = model(phone, lengths, spec, lengths, sid, generator=g)
    o, _, _, z_mask, (_, z_p, m_p, logs_p, _, logs_q) = out
    loss = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) + o.abs().mean()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss.backward()
    opt.step()
    return before


SLOW_SHIPPED = [
    ("v1-32k", True, "legacy"),
    ("v1-40k", False, "legacy"),
    ("v1-48k", True, "legacy"),
    ("v2-32k", True, "legacy"),
    ("v2-40k", True, "legacy"),
]


@pytest.mark.parametrize("version,f0", [("v1", True), ("v2", False)])
def test_voice_config_trains_only_lora_and_saved_modules(version: str, f0: bool) -> None:
    adapted = inject_lora(tiny(version, f0), VOICE_CONFIG)
    before = _train_step(adapted)
    trainable = set(extract_lora_weights(adapted))
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(canonical_saved_key(k) in trainable for k in changed), changed - trainable
    assert "emb_g.weight" in changed and any(k.startswith("flow.") for k in changed)


def test_voice_adapter_of_a_shipped_config_merges_into_every_kind_of_file(tmp_path) -> None:
    """v2-48k, trained with parametrizations weight_norm (Applio), merged into legacy files (as both save them)."""
    _merges_into_every_kind_of_file(tmp_path, "v2-48k", True, "parametrizations", train=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,f0,weight_norm", SLOW_SHIPPED, ids=[f"{n}-{'f0' if f else 'nono'}-{w}" for n, f, w in SLOW_SHIPPED]
)
def test_voice_config_trains_and_merges_per_shipped_config(tmp_path, name: str, f0: bool, weight_norm: str) -> None:
    _merges_into_every_kind_of_file(tmp_path, name, f0, weight_norm, train=True)


def _merges_into_every_kind_of_file(tmp_path, name: str, f0: bool, weight_norm: str, train: bool) -> None:
    """VOICE_CONFIG (optionally after a training step that changes only LoRA and modules_to_save) merged into an
    export, a G_*.pth and a pretrained file, and exported from the G_*.pth: every result infers as the adapted
    model (within half rounding for exports)."""
    base = build_synthesizer(name, f0, seed=0)  # the files are legacy weight_norm, as RVC and Applio save them
    adapted = build_synthesizer(name, f0, seed=0, weight_norm=weight_norm)
    inject_lora(adapted, VOICE_CONFIG)
    if train:
        before = _train_step(adapted)
        trainable = set(extract_lora_weights(adapted))
        for k, v in adapted.state_dict().items():
            if not torch.equal(before[k], v):
                assert canonical_saved_key(k) in trainable, f"{k} changed but is neither LoRA nor saved"
    _voice_ready_again(adapted)
    save_lora_checkpoint(adapted, tmp_path / "voice.safetensors")

    sd = base.state_dict()
    _export(base, tmp_path / "base.pth", name.split("-")[1])
    torch.save({"model": sd, "iteration": 12, "optimizer": None, "learning_rate": 1e-4}, tmp_path / "G_12.pth")
    torch.save({"model": sd}, tmp_path / "pretrained.pth")
    o_adapted = _infer(adapted)
    moved = float((o_adapted - _infer(base)).abs().max())
    assert moved > 1e-3

    merge_adapter(tmp_path / "base.pth", tmp_path / "voice.safetensors", tmp_path / "m_export.pth")
    o = _infer(_load_like_rvc(tmp_path / "m_export.pth"))
    assert float((o - o_adapted).abs().max()) < 0.05 * moved  # half rounding of an fp16 export
    _check_same_form(
        torch.load(tmp_path / "base.pth", weights_only=True)["weight"],
        torch.load(tmp_path / "m_export.pth", weights_only=True)["weight"],
    )
    for src in ("G_12.pth", "pretrained.pth"):
        res = merge_adapter(tmp_path / src, tmp_path / "voice.safetensors", tmp_path / f"m_{src}")
        out = torch.load(tmp_path / f"m_{src}", weights_only=True)
        assert res.kind == "checkpoint" and set(out) == set(torch.load(tmp_path / src, weights_only=True))
        _check_same_form(sd, out["model"])
        with torch.device("meta"):
            merged = build_synthesizer(name, f0)
        merged.load_state_dict(out["model"], strict=True, assign=True)
        assert float((_infer(merged) - o_adapted).abs().max()) < 1e-4 * max(moved, 1.0)  # fp32 throughout
    merge_adapter(tmp_path / "G_12.pth", tmp_path / "voice.safetensors", tmp_path / "x.pth", export=True)
    cpt = torch.load(tmp_path / "x.pth", weights_only=True)
    assert (cpt["sr"], cpt["f0"], cpt["version"]) == (name.split("-")[1], int(f0), name.split("-")[0])
    assert cpt["config"][1] == 32 and cpt["config"][15] == 109 and cpt["info"].startswith("12epoch + rvclora")
    assert all(v.dtype == torch.half for v in cpt["weight"].values()) and not any("enc_q" in k for k in cpt["weight"])
    assert float((_infer(_load_like_rvc(tmp_path / "x.pth")) - o_adapted).abs().max()) < 0.05 * moved


def _voice_ready_again(model, seed: int = 1) -> None:
    """A known, non-zero update on top of the trained step (the step alone moves LoRA B from zero only a little)."""
    randomize_lora_(model, 0.05, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(saved_parameters(model).items()):
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- mix, info, PEFT


def test_mix_info_and_peft_with_whole_voice_adapters(tmp_path, capsys) -> None:
    from rvclora.cli import main
    from rvclora.peft_format import export_peft_adapter

    base = tiny(seed=6)
    _export(base, tmp_path / "base.pth", 8000)
    for i in (1, 2):
        save_lora_checkpoint(_voice_ready(tiny(seed=6), seed=i), tmp_path / f"v{i}.safetensors")
    args = [
        "mix",
        str(tmp_path / "v1.safetensors:0.5"),
        str(tmp_path / "v2.safetensors:1.0"),
        "-o",
        str(tmp_path / "mix.safetensors"),
    ]
    assert main(args) == 1
    assert "sum to 1.5, not 1" in capsys.readouterr().err
    assert main(args + ["--base", str(tmp_path / "base.pth")]) == 0
    assert "blended as base + sum w_i (T_i - base)" in capsys.readouterr().out
    mix = read_lora_file(tmp_path / "mix.safetensors")
    b = torch.load(tmp_path / "base.pth", weights_only=True)["weight"]["emb_g.weight"].double()
    t1, t2 = (read_lora_file(tmp_path / f"v{i}.safetensors")["weights"]["emb_g.weight"].double() for i in (1, 2))
    assert torch.allclose(mix["weights"]["emb_g.weight"].double(), b + 0.5 * (t1 - b) + (t2 - b), atol=1e-6)
    # the blend merges like any adapter, in one pass
    assert (
        main(["merge", str(tmp_path / "base.pth"), str(tmp_path / "mix.safetensors"), "-o", str(tmp_path / "out.pth")])
        == 0
    )
    assert "enc_q layers left out" in capsys.readouterr().out

    assert main(["info", str(tmp_path / "v1.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "(of the whole synthesizer but enc_q)" in out and "saved whole (modules_to_save): " in out
    assert "whole-voice adapter: changes dec, emb_g, enc_p, enc_q, flow" in out
    assert main(["info", str(tmp_path / "base.pth")]) == 0
    assert "fp16-sha256:synth:" in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"saves modules whole \(modules_to_save=\['emb_g'"):
        export_peft_adapter(_voice_ready(tiny(seed=6)), tmp_path / "peft")


def test_lora_conv_on_rvcs_transposed_source_view() -> None:
    """RVC's noise convs get the harmonic source as ``(B, T, 1).transpose(1, 2)``: strides that read as
    channels-last. A LoRA conv on it must give nn.Conv1d's result (a no-grad batch-1 path once did not)."""
    from rvclora.layers import LoRAConv1d

    torch.manual_seed(0)
    layer = LoRAConv1d.from_base(torch.nn.Conv1d(1, 8, 4, stride=2, padding=1), r=8, lora_alpha=16)
    torch.nn.init.normal_(layer.lora_B)
    w = layer.weight + layer.get_delta_weight()
    x = torch.randn(1, 24, 1).transpose(1, 2)
    with torch.no_grad():
        want = torch.nn.functional.conv1d(x, w, layer.bias, 2, 1)
        assert torch.allclose(layer(x), want, atol=1e-5)
