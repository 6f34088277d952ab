"""Conversion from PEFT and loralib models, and PEFT's on-disk adapter format.

Real PEFT / loralib models are built, given non-trivial adapters (``B != 0``), converted, and
held to their own outputs; exported adapters are loaded back by rvclora and by PEFT itself.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvclora import (
    LoRAConfig,
    LoRAConv1d,
    LoRAConvTranspose1d,
    LoRALinear,
    convert,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    lora_modules,
)

pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups > 1")

# Skip only where the package is absent. A package that is installed but fails to import (peft broke that way
# when a checkout shadowed a dependency of transformers) is an error, not a skip.
peft = pytest.importorskip(
    "peft", reason="peft is in the test extra: pip install -e .[test]", exc_type=ModuleNotFoundError
)
loralib = pytest.importorskip(
    "loralib", reason="loralib is in the test extra: pip install -e .[test]", exc_type=ModuleNotFoundError
)


class Net(nn.Module):
    """Linear and Conv1d layers the way RVC uses them: weight-normed, dilated, 1×1, grouped."""

    def __init__(self):
        super().__init__()
        self.pre = nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.dilated = nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.mix = nn.Conv1d(8, 6, 1)
        self.proj = nn.Linear(6, 5)
        self.up = nn.ConvTranspose1d(5, 3, 4, stride=2, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.pre(x), 0.1)
        x = x + self.dilated(x)
        x = x + self.grouped(x)
        x = self.proj(self.mix(x).transpose(1, 2)).transpose(1, 2)
        return self.up(x)


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _x() -> torch.Tensor:
    return torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(1))


def _randomise(model: nn.Module, seed: int = 2) -> None:
    """Random values in every LoRA factor, so that the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _zero_cross_group(peft_model: nn.Module, module_name: str, groups: int) -> None:
    """PEFT's Conv1d lora_A reads all input channels; make it read only its own group's."""
    layer = peft_model.base_model.model.get_submodule(module_name)
    w = layer.lora_A["default"].weight
    r, cin = w.shape[:2]
    with torch.no_grad():
        for a in range(groups):
            for b in range(groups):
                if a != b:
                    w[a * r // groups : (a + 1) * r // groups, b * cin // groups : (b + 1) * cin // groups] = 0


def _peft_model(**config):
    cfg = dict(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["pre", "grouped", "mix", "proj"],
        rank_pattern={"proj": 2},
        alpha_pattern={"mix": 3.0},
    )
    cfg.update(config)
    model = peft.get_peft_model(_net(), peft.LoraConfig(**cfg))
    _randomise(model)
    if "grouped" in cfg["target_modules"]:
        _zero_cross_group(model, "grouped", 2)
    return model


# --------------------------------------------------------------------------- PEFT → rvclora


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_convert_peft_model_keeps_outputs(use_rslora):
    pm = _peft_model(use_rslora=use_rslora).eval()
    x = _x()
    with torch.no_grad():
        expected = pm(x)
    converted = convert(pm)
    assert isinstance(converted, Net)
    kinds = {n: type(m) for n, m in lora_modules(converted)}
    assert kinds == {"pre": LoRAConv1d, "grouped": LoRAConv1d, "mix": LoRAConv1d, "proj": LoRALinear}
    assert converted.proj.r == 2 and converted.pre.r == 4
    assert converted.mix.scaling == 3.0 / (4**0.5 if use_rslora else 4)
    assert all(m.lora_dropout == pytest.approx(0.1) for _, m in lora_modules(converted))
    assert converted.pre.weight_norm_kind == "legacy"
    assert not converted.training
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected)
    # PEFT's trainability carries over: factors train, base weights stay frozen
    trainable = {n for n, p in converted.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in kinds for f in ("lora_A", "lora_B")}


def test_convert_peft_model_trains_like_peft():
    """Dropout off, training mode: one gradient of the converted model equals PEFT's."""
    pm = _peft_model(lora_dropout=0.0).train()
    x = _x()
    pm(x).square().sum().backward()
    expected = {
        n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    model = convert(pm)
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    for name, grad in expected.items():
        got = model.get_submodule(name.rsplit(".", 2)[0]).get_parameter(name.rsplit(".", 2)[1]).grad
        if name.startswith("grouped") or name.startswith("pre") or name.startswith("mix"):
            if name.endswith("lora_A.weight"):  # PEFT (r, in, k) vs rvclora (r, in/g·k)
                got_full = torch.zeros_like(grad)
                m = model.get_submodule(name.rsplit(".", 2)[0])
                g, r, k = m.groups, m.r, m.kernel_size[0]
                cin_g = m.in_channels // g
                for a in range(g):
                    rows = slice(a * r // g, (a + 1) * r // g)
                    got_full[rows, a * cin_g : (a + 1) * cin_g] = got[rows].reshape(-1, cin_g, k)
                # PEFT also trains the cross-group entries (zero here); rvclora has none: compare the blocks
                mask = got_full != 0
                torch.testing.assert_close(got_full[mask], grad[mask])
                continue
            got = got.unsqueeze(-1)
        torch.testing.assert_close(got, grad, msg=lambda msg, n=name: f"{n}: {msg}")


def test_convert_peft_rejects_what_is_not_exact():
    with pytest.raises(ValueError, match=r"'dilated'.*dilation=\(1,\) \(base: \(2,\)\)"):
        convert(_peft_model(target_modules=["dilated"]))
    pm = peft.get_peft_model(_net(), peft.LoraConfig(r=4, target_modules=["grouped"]))
    _randomise(pm)  # PEFT's full lora_A now mixes the two groups
    with pytest.raises(ValueError, match="'grouped'.*other groups"):
        convert(pm)
    pm = _peft_model()
    pm.add_adapter("second", peft.LoraConfig(r=2, target_modules=["proj"]))
    with pytest.raises(ValueError, match=r"'proj' has adapters \['default', 'second'\]"):
        convert(pm)
    with pytest.raises(ValueError, match="use_dora=True"):
        convert(_peft_model(target_modules=["proj"], use_dora=True, rank_pattern={}, alpha_pattern={}))


# --------------------------------------------------------------------------- loralib → rvclora


class LoralibNet(nn.Module):
    def __init__(self, fan_in_fan_out: bool, groups: int, dropout: float):
        super().__init__()
        self.a = loralib.Linear(6, 8, r=2, lora_alpha=4, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out)
        self.c = loralib.Conv1d(8, 6, 1, r=2, lora_alpha=3, groups=groups)
        self.plain = nn.Linear(6, 6)

    def forward(self, x):
        x = self.a(x).transpose(1, 2)
        return self.plain(self.c(x).transpose(1, 2))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["out_in", "fan_in_fan_out"])
def test_convert_loralib_model_keeps_outputs(fan_in_fan_out, groups):
    torch.manual_seed(0)
    model = LoralibNet(fan_in_fan_out, groups, dropout=0.0)
    _randomise(model)
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        expected_train = model.train()(x)
        expected_eval = model.eval()(x)  # loralib merges ΔW into the weights here (merge_weights=True)
    convert(model)
    assert isinstance(model.a, LoRALinear) and isinstance(model.c, LoRAConv1d)
    assert type(model.plain) is nn.Linear
    assert model.c.r == groups * groups * 2  # a grouped loralib Conv1d needs a higher rank to be exact
    assert model.a.weight.shape == (8, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected_eval)
        torch.testing.assert_close(model.train()(x), expected_train)
    assert getattr(model, "rvclora_config", None) is None  # alphas differ: no single LoRAConfig describes it


def test_convert_loralib_keeps_dropout_and_rejects_k3():
    torch.manual_seed(0)
    model = LoralibNet(False, 1, dropout=0.2)
    convert(model)
    assert model.a.lora_dropout == pytest.approx(0.2)
    assert model.c.lora_dropout == 0.0  # loralib's ConvLoRA never applies its dropout
    bad = nn.Sequential(loralib.Conv1d(4, 4, 3, r=2))
    with pytest.raises(ValueError, match="kernel_size=3.*k×k kernel"):
        convert(bad)
    with pytest.raises(TypeError, match="loralib.layers.MergedLinear"):
        convert(nn.Sequential(loralib.MergedLinear(4, 6, r=2, enable_lora=[True, False, True])))


# --------------------------------------------------------------------------- PEFT's on-disk format


def _rvclora_net(seed: int = 0) -> Net:
    model = inject_lora(_net(seed), LoRAConfig(r=4, lora_alpha=8, target_modules=["pre", "grouped", "mix", "proj"]))
    return model


def test_export_import_round_trip(tmp_path):
    model = _rvclora_net()
    _randomise(model)
    model.proj.lora_alpha, model.proj.scaling = 2.0, 0.5  # a per-layer alpha → alpha_pattern
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["alpha_pattern"] == {"proj": 2.0}
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.grouped.lora_A.weight" in keys and "base_model.model.proj.lora_B.weight" in keys
    fresh = _rvclora_net()
    fresh.proj.lora_alpha, fresh.proj.scaling = 2.0, 0.5
    import_peft_adapter(fresh, tmp_path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_loads_exported_adapter(tmp_path, use_rslora):
    """PEFT's own PeftModel.from_pretrained on the same base model gives the rvclora model's outputs."""
    model = convert(_peft_model(lora_dropout=0.0, use_rslora=use_rslora)).eval()  # per-layer ranks and alphas
    export_peft_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_net(), tmp_path).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    adapted = {
        n.removeprefix("base_model.model.")
        for n, m in loaded.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert adapted == {"pre", "grouped", "mix", "proj"}


def test_import_adapter_saved_by_peft(tmp_path):
    pm = _peft_model(lora_dropout=0.0, rank_pattern={}, alpha_pattern={}).eval()
    pm.save_pretrained(tmp_path)
    model = _rvclora_net().eval()
    import_peft_adapter(model, tmp_path)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x))
    wrong_rank = inject_lora(_net(), LoRAConfig(r=2, lora_alpha=8, target_modules=["pre", "grouped", "mix", "proj"]))
    with pytest.raises(ValueError, match=r"layer '\w+' has r=2, scaling=4.0; the adapter has r=4"):
        import_peft_adapter(wrong_rank, tmp_path)


def test_export_rejects_layers_peft_lacks(tmp_path):
    model = inject_lora(_net(), LoRAConfig(r=2, target_modules=["up", "proj"]))
    with pytest.raises(ValueError, match="'up' is a ConvTranspose1d; PEFT has no LoRA layer for nn.ConvTranspose1d"):
        export_peft_adapter(model, tmp_path)
    assert isinstance(model.up, LoRAConvTranspose1d)
    model = inject_lora(_net(), LoRAConfig(r=2, target_modules=["dilated"]))
    with pytest.raises(ValueError, match="'dilated' has dilation=2"):
        export_peft_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
