"""The base fingerprint: one value for the fp32 checkpoint, the fp16 export and the injected model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rvclora import LoRAConfig, inject_lora
from rvclora.fingerprint import FINGERPRINT_PREFIX, base_fingerprint
from rvclora.models.rvc import build_generator, get_generator_config
from rvclora.rvc_files import build_generator_from_rvc, load_rvc_file, write_exported_model

LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=["ups", "resblocks"])


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    d: Path = tmp_path_factory.mktemp("fp")
    cfg = get_generator_config("40k")
    fp32 = build_generator(cfg, seed=0)
    emb = {"emb_g.weight": torch.randn(3, cfg.gin_channels)}
    write_exported_model(fp32, d / "export.pth", cfg, extra_weights=emb)
    checkpoint = {
        "model": {**{"dec." + k: v for k, v in fp32.state_dict().items()}, "enc_q.x": torch.ones(2)},
        "iteration": 7,
    }
    torch.save(checkpoint, d / "G_7.pth")
    return {"dir": d, "cfg": cfg, "fp32": fp32}


def test_same_value_for_checkpoint_export_and_injected_model(forms: dict) -> None:
    d = forms["dir"]
    expected = base_fingerprint(forms["fp32"])
    assert expected.startswith(FINGERPRINT_PREFIX)
    export = load_rvc_file(d / "export.pth")
    assert all(t.dtype == torch.float16 for t in export.state_dict.values())
    assert base_fingerprint(export.state_dict) == expected  # RVC's fp16 export, with dec. prefix and emb_g
    assert base_fingerprint(load_rvc_file(d / "G_7.pth").state_dict) == expected  # fp32 training checkpoint
    injected = inject_lora(build_generator(forms["cfg"], seed=0), LORA)
    assert injected.rvclora_base_fingerprint == expected
    assert base_fingerprint(injected) == expected
    # the generator rebuilt from the export (fp32 from half weights), injected: still the same base
    rebuilt = build_generator_from_rvc(export)
    assert base_fingerprint(rebuilt) == expected
    assert inject_lora(rebuilt, LORA).rvclora_base_fingerprint == expected


def test_parametrizations_names_give_the_same_value(forms: dict) -> None:
    legacy = forms["fp32"]
    param = build_generator(forms["cfg"], seed=0, weight_norm="parametrizations")
    param.load_state_dict(
        {
            k.replace("weight_g", "parametrizations.weight.original0").replace(
                "weight_v", "parametrizations.weight.original1"
            ): v
            for k, v in legacy.state_dict().items()
        }
    )
    assert base_fingerprint(param) == base_fingerprint(legacy)


def test_any_weight_change_changes_it_but_not_a_bias(forms: dict) -> None:
    sd = {k: v.clone() for k, v in forms["fp32"].state_dict().items()}
    ref = base_fingerprint(sd)
    assert base_fingerprint(build_generator(forms["cfg"], seed=1)) != ref  # another voice's base
    w = sd["ups.1.weight_v"]
    w.view(-1)[5] = w.view(-1)[5].half().float() * (1 + 2**-9)  # one half ulp on one element
    assert base_fingerprint(sd) != ref
    sd = {k: v.clone() for k, v in forms["fp32"].state_dict().items()}
    sd["ups.1.weight_v"].view(-1)[5] += 1e-12  # below half precision: the export could not tell either
    sd["conv_pre.bias"] += 1.0  # biases are left out: a bias mode may train them
    assert base_fingerprint(sd) == ref
    sd["ups.1.lora_A"] = torch.ones(2, 2)  # LoRA factors are left out
    assert base_fingerprint(sd) == ref


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module or a state dict, got int"):
        base_fingerprint(3)
    with pytest.raises(TypeError, match="'x' is a str, expected a tensor"):
        base_fingerprint({"x": "y"})
    with pytest.raises(ValueError, match="no floating-point weights"):
        base_fingerprint({"n": torch.zeros(2, dtype=torch.long)})
    normed = torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 2, 3)))
    injected = inject_lora(normed, LoRAConfig(r=1, target_modules=["0"]))
    del injected.rvclora_base_fingerprint
    with pytest.raises(ValueError, match="LoRA layers with folded weight_norm and no recorded"):
        base_fingerprint(injected)


def test_lora_layers_without_weight_norm_fingerprint_from_their_state_dict() -> None:
    base = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Conv1d(2, 2, 3))
    expected = base_fingerprint(base)
    injected = inject_lora(base, LoRAConfig(r=1, target_modules=["0", "1"]))
    del injected.rvclora_base_fingerprint  # as for a model converted from PEFT
    assert base_fingerprint(injected) == expected
