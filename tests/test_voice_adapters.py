"""Whole-voice adapters: LoRA over RVC's whole synthesizer plus ``modules_to_save``.

Most tests use a tiny synthesizer (RVC's classes with small arguments: the same code paths, fast);
the shipped sizes appear only where the sizes are the point.
"""

from __future__ import annotations

import json

import pytest
import torch

from rvclora import LoRAConfig, inject_lora, save_lora_checkpoint
from rvclora.blend import BlendError, blend_adapters, layer_records
from rvclora.checkpoint import extract_lora_weights, load_lora_checkpoint, read_lora_file
from rvclora.fingerprint import SYNTH_PREFIX, base_fingerprint
from rvclora.inject import mark_only_lora_as_trainable
from rvclora.models.synthesizer import (
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
)

TINY_ARGS = [33, 4, 8, 16, 32, 2, 2, 3, 0.0, "1", [3, 5], [[1, 3], [1, 3]], [4, 2], 16, [8, 4], 5, 8, 8000]
VOICE = dict(target_modules=["enc_p", "flow", "dec"], modules_to_save=["emb_g"])


def tiny(version: str = "v1", f0: bool = True, seed: int = 0, weight_norm: str = "legacy"):
    cls = {("v1", True): SynthesizerTrnMs256NSFsid, ("v2", True): SynthesizerTrnMs768NSFsid,
           ("v1", False): SynthesizerTrnMs256NSFsid_nono, ("v2", False): SynthesizerTrnMs768NSFsid_nono}
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
    with pytest.raises(ValueError, match="modules_to_save entry 'emb_x' matches no module"):
        inject_lora(tiny(), LoRAConfig(target_modules=["dec"], modules_to_save=["emb_x"]))


@pytest.mark.parametrize("weight_norm", ["legacy", "parametrizations"])
def test_saved_modules_round_trip_through_a_file(tmp_path, weight_norm: str) -> None:
    cfg = LoRAConfig(target_modules=["enc_p"], modules_to_save=["emb_g", "flows.0.enc.cond_layer"])
    m = perturb_(inject_lora(tiny(weight_norm=weight_norm), cfg), 1)
    weights = extract_lora_weights(m)
    # saved keys in RVC's file form, whatever weight_norm the model uses
    assert {"emb_g.weight", "flow.flows.0.enc.cond_layer.weight_g", "flow.flows.0.enc.cond_layer.weight_v",
            "flow.flows.0.enc.cond_layer.bias"} <= set(weights)
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
        return {"weights": extract_lora_weights(m), "config": cfg, "base_fingerprint": m.rvclora_base_fingerprint,
                "metadata": {"layers": layer_records(m)}}

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
