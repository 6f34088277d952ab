"""Model-level utilities: injection (targets, weight_norm), trainability, merging, info."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

from rvclora import (
    LoRAConfig,
    LoRAConv1d,
    LoRAConvTranspose1d,
    LoRALinear,
    count_lora_parameters,
    get_lora_parameters,
    inject_lora,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    merged_state_dict,
    ops,
    print_lora_info,
    unmerge_lora_weights,
)
from rvclora.inject import target_matches


class Block(nn.Module):
    def __init__(self, c, wn):
        super().__init__()
        self.convs1 = nn.ModuleList([wn(nn.Conv1d(c, c, 3, padding=d, dilation=d)) for d in (1, 3)])
        self.proj = nn.Linear(c, c)

    def forward(self, x):
        for conv in self.convs1:
            x = x + conv(torch.nn.functional.leaky_relu(x, 0.1))
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


class TinyGen(nn.Module):
    """A miniature of RVC's generator: weight-normed upsamplers and resblocks."""

    def __init__(self, wn=nn.utils.weight_norm):
        super().__init__()
        self.conv_pre = nn.Conv1d(4, 8, 3, padding=1)
        self.ups = nn.ModuleList(
            [wn(nn.ConvTranspose1d(8, 6, 4, 2, padding=1)), wn(nn.ConvTranspose1d(6, 4, 4, 2, padding=1))]
        )
        self.resblocks = nn.ModuleList([Block(6, wn), Block(4, wn)])
        self.conv_post = nn.Conv1d(4, 1, 3, padding=1, bias=False)

    def forward(self, x):
        x = self.conv_pre(x)
        for up, rb in zip(self.ups, self.resblocks):
            x = rb(up(x))
        return torch.tanh(self.conv_post(x))


def _randomise_b(model):
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)


@pytest.mark.parametrize(
    "target, name, hit",
    [
        ("ups", "dec.ups.0", True),
        ("ups", "dec.upsample", False),
        ("convs1.0", "resblocks.2.convs1.0", True),
        ("convs1.0", "resblocks.2.convs1.01", False),
        ("resblocks", "resblocks.0.convs2.1", True),
        (r"ups\.[01]", "ups.1", True),
        (r"ups\.[01]", "dec.ups.1", False),
        (r".*convs2\.\d", "resblocks.0.convs2.1", True),
    ],
)
def test_target_matching(target, name, hit):
    assert target_matches(target, name) is hit


@pytest.mark.parametrize("wn", [nn.utils.weight_norm, parametrizations.weight_norm], ids=["legacy", "parametrize"])
def test_injection_is_exact_at_step_zero_and_folds_weight_norm(wn):
    """The folded weight is bit-identical to what weight_norm computed, so the injected model's
    output is bit-identical through the reference backend (base + s·B(Ax) with B = 0). The fast
    torch backend computes y and u in one fused GEMM/convolution, whose summation order differs
    from the plain base op's: equal to float32 rounding, not bitwise."""
    torch.manual_seed(0)
    model = TinyGen(wn)
    x = torch.randn(2, 4, 5)
    # Frozen like the injected base: PyTorch itself picks different linear kernels for weights that
    # require grad, whose float32 results differ in the last bit.
    model.requires_grad_(False)
    with torch.no_grad():
        before = model(x)
        adaptable = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)
        folded_before = {
            name: m.weight.detach().clone()
            for name, m in model.named_modules()
            if name.startswith(("ups.", "resblocks.")) and isinstance(m, adaptable)
        }
    inject_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["ups", "resblocks"]))
    for name, w in folded_before.items():
        assert torch.equal(model.get_submodule(name).weight, w), name
    with torch.no_grad():
        after = model(x)
        ops.set_backend("reference")
        try:
            after_reference = model(x)
        finally:
            ops.set_backend(None)
    assert torch.equal(before, after_reference)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-6)
    assert isinstance(model.ups[0], LoRAConvTranspose1d)
    assert isinstance(model.resblocks[0].convs1[1], LoRAConv1d)
    assert isinstance(model.resblocks[1].proj, LoRALinear)
    assert type(model.conv_pre) is nn.Conv1d and type(model.conv_post) is nn.Conv1d
    kind = "legacy" if wn is nn.utils.weight_norm else "parametrizations"
    assert model.ups[1].weight_norm_kind == kind and model.ups[1].weight_norm_dim == 0
    assert model.resblocks[0].proj.weight_norm_kind is None
    names = dict(model.named_parameters())
    assert not any("weight_g" in n or "original0" in n for n in names)
    assert {n for n, p in names.items() if p.requires_grad} == {n for n in names if "lora_" in n}


def test_targets_that_match_nothing_raise_with_candidates():
    with pytest.raises(
        ValueError,
        match=r"match no Linear/Conv1d/ConvTranspose1d/Conv2d module; adaptable modules "
        r"are: conv_pre, ups.0",
    ):
        inject_lora(TinyGen(), LoRAConfig(target_modules=["upsamplers"]))
    with pytest.raises(TypeError, match="config must be a LoRAConfig"):
        inject_lora(TinyGen(), {"r": 8})


def test_injection_refuses_subclass_with_own_forward():
    class MyConv(nn.Conv1d):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyConv(2, 2, 1))
    with pytest.raises(TypeError, match="MyConv subclasses Conv1d with its own forward"):
        inject_lora(m, LoRAConfig(target_modules=["0"]))


def test_groups_not_dividing_rank_is_refused_at_injection():
    m = nn.Sequential(nn.Conv1d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="r=2 must be a multiple of groups=4"):
        inject_lora(m, LoRAConfig(r=2, target_modules=["0"]))


@pytest.mark.parametrize(
    "bias, trainable_biases",
    [
        ("none", set()),
        (
            "all",
            {
                "conv_pre.bias",
                "ups.0.bias",
                "ups.1.bias",
                "resblocks.0.convs1.0.bias",
                "resblocks.0.convs1.1.bias",
                "resblocks.0.proj.bias",
                "resblocks.1.convs1.0.bias",
                "resblocks.1.convs1.1.bias",
                "resblocks.1.proj.bias",
            },
        ),
        ("lora_only", {"ups.0.bias", "ups.1.bias"}),
    ],
)
def test_bias_modes(bias, trainable_biases):
    model = inject_lora(TinyGen(), LoRAConfig(r=2, target_modules=["ups"], bias=bias))
    got = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert got == trainable_biases
    with pytest.raises(ValueError, match="bias must be one of"):
        mark_only_lora_as_trainable(model, "some")


def test_parameter_counting():
    model = inject_lora(TinyGen(), LoRAConfig(r=2, target_modules=["ups"]))
    # ups.0: A (2, 8), B (2, 6·4); ups.1: A (2, 6), B (2, 4·4)
    assert count_lora_parameters(model) == 2 * 8 + 2 * 24 + 2 * 6 + 2 * 16
    assert len(get_lora_parameters(model)) == 4


@pytest.mark.parametrize("wn", [nn.utils.weight_norm, parametrizations.weight_norm], ids=["legacy", "parametrize"])
def test_merged_state_dict_loads_into_original_class(wn):
    torch.manual_seed(1)
    model = inject_lora(TinyGen(wn), LoRAConfig(r=2, target_modules=["ups", "resblocks"]))
    _randomise_b(model)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        want = model(x)
    sd = merged_state_dict(model)
    assert not any("lora_" in k for k in sd)
    fresh = TinyGen(wn)
    fresh.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = fresh(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert fresh.ups[0].weight_g.shape == (8, 1, 1) if wn is nn.utils.weight_norm else True


def test_merge_and_unmerge_whole_model():
    torch.manual_seed(2)
    model = inject_lora(TinyGen(), LoRAConfig(r=2, target_modules=["ups", "resblocks"]))
    _randomise_b(model)
    x = torch.randn(1, 4, 6)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        want = model(x)
        merge_lora_weights(model)
        assert all(m.merged for m in model.modules() if hasattr(m, "merged"))
        assert torch.allclose(model(x), want, atol=1e-5)
        unmerge_lora_weights(model)
    for n, p in model.named_parameters():
        if n.endswith("weight"):
            assert torch.equal(p, originals[n]), n


def test_print_lora_info_table():
    model = inject_lora(TinyGen(), LoRAConfig(r=2, target_modules=["ups"]))
    buf = io.StringIO()
    text = print_lora_info(model, file=buf)
    assert buf.getvalue().strip() == text.strip()
    lines = text.splitlines()
    assert lines[0].split() == [
        "layer",
        "kind",
        "weight",
        "lora_A",
        "lora_B",
        "r",
        "lora_params",
        "merged",
        "weight_norm",
    ]
    assert lines[2].split()[:2] == ["ups.0", "ConvTranspose1d"]
    assert "LoRA parameters: 108" in text


def test_training_step_only_moves_lora_factors():
    torch.manual_seed(3)
    model = inject_lora(TinyGen(), LoRAConfig(r=2, target_modules=["ups", "resblocks"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(torch.randn(2, 4, 5)).pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        if "lora_" not in n:
            assert not moved and p.grad is None, n  # frozen base: untouched, no gradient computed
        elif "lora_B" in n:
            assert moved, n  # B gets a gradient at step 0 (A does not, since B = 0)
