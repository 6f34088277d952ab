"""Layer behaviour: the basic API tests, exactness against W + ΔW for every base option,
merging without drift, r=0, from_base, autocast and every bad-input error."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvclora import LoRAConv1d, LoRAConvTranspose1d, LoRALinear

# ------------------------------------------------- basic API: factor shapes, forward, merge_weights


def test_lora_linear_init():
    layer = LoRALinear(128, 256, r=8)
    assert layer.lora_A.shape == (8, 128)
    assert layer.lora_B.shape == (256, 8)
    assert torch.allclose(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_lora_forward():
    layer = LoRALinear(128, 256, r=8)
    x = torch.randn(4, 128)
    assert layer(x).shape == (4, 256)


def test_merge_weights():
    layer = LoRALinear(128, 256, r=8, merge_weights=True)
    layer.train()
    assert not layer.merged
    layer.eval()
    assert layer.merged


# --------------------------------------------------------------------------- construction


def _randomise(layer):
    """Give the layer a non-zero B (a fresh layer is exactly its base) — in place, returns it."""
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


def test_factor_shapes_and_isinstance():
    lin = LoRALinear(10, 6, r=4)
    conv = LoRAConv1d(8, 12, 5, r=4, groups=2)
    convt = LoRAConvTranspose1d(8, 6, 4, r=4, stride=2, groups=2)
    assert isinstance(lin, nn.Linear) and isinstance(conv, nn.Conv1d) and isinstance(convt, nn.ConvTranspose1d)
    assert conv.lora_A.shape == (4, 4 * 5) and conv.lora_B.shape == (12, 2)
    assert convt.lora_A.shape == (4, 4) and convt.lora_B.shape == (4, 3 * 4)
    assert set(lin.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert lin.scaling == 16 / 4


@pytest.mark.parametrize(
    "make",
    [
        lambda r: LoRALinear(9, 7, r=r),
        lambda r: LoRAConv1d(4, 6, 3, r=r, padding=1),
        lambda r: LoRAConvTranspose1d(4, 6, 4, r=r, stride=2, padding=1),
    ],
)
def test_fresh_layer_equals_base_and_r0_is_the_base(make):
    layer = make(4)
    base_cls = type(layer).base_class
    x = torch.randn(2, 4, 11) if base_cls is not nn.Linear else torch.randn(3, 9)
    base_out = base_cls.forward(layer, x)
    assert torch.allclose(layer(x), base_out, atol=1e-6, rtol=0)
    layer0 = make(0)
    assert not hasattr(layer0, "lora_A") or layer0.lora_A is None
    assert torch.equal(layer0(x), base_cls.forward(layer0, x))
    w = layer0.weight.clone()
    layer0.merge()
    assert torch.equal(layer0.weight, w) and not layer0.merged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=-1), "r must be an int >= 0"),
        (dict(r=2.0), "r must be an int >= 0"),
        (dict(lora_alpha=0), "lora_alpha must be a number > 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\)"),
        (dict(merge_weights=1), "merge_weights must be a bool"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(4, 4, **kwargs)


def test_groups_must_divide_rank():
    with pytest.raises(ValueError, match="r=3 must be a multiple of groups=2"):
        LoRAConv1d(4, 4, 3, r=3, groups=2)
    with pytest.raises(ValueError, match="r=5 must be a multiple of groups=2"):
        LoRAConvTranspose1d(4, 4, 3, r=5, groups=2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"last dim in_features=8, got \(2, 7\)"):
        LoRALinear(8, 4)(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"C_in=4"):
        LoRAConv1d(4, 4, 3)(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match=r"C_in=4"):
        LoRAConvTranspose1d(4, 4, 3)(torch.randn(1, 2, 4, 9))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match weight dtype torch.float32"):
        LoRALinear(8, 4)(torch.randn(2, 8, dtype=torch.float64))


# --------------------------------------------------------------------------- exactness vs W + ΔW

LINEAR_OPTS = [dict(bias=True), dict(bias=False)]
CONV_OPTS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=5, stride=2, padding=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=3),
    dict(kernel_size=4, padding="same"),
    dict(kernel_size=3, padding="valid", groups=2),
    dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, padding_mode="replicate", stride=2),
    dict(kernel_size=3, padding=2, padding_mode="circular", groups=2),
]
CONVT_OPTS = [
    dict(kernel_size=4, stride=2, padding=1),
    dict(kernel_size=16, stride=10, padding=3),
    dict(kernel_size=3, stride=3, padding=1, output_padding=2, bias=False),
    dict(kernel_size=3, stride=2, dilation=2, output_padding=1, groups=2),
    dict(kernel_size=5, padding=2, groups=2),
]


@pytest.mark.parametrize("opts", LINEAR_OPTS, ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 2, 4)], ids=str)
def test_linear_equals_base_with_delta_weight(opts, lead):
    torch.manual_seed(0)
    layer = _randomise(LoRALinear(13, 7, r=3, **opts))
    x = torch.randn(*lead, 13)
    want = F.linear(x, layer.weight + layer.get_delta_weight(), layer.bias)
    assert torch.allclose(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", CONV_OPTS, ids=str)
def test_conv1d_equals_base_with_delta_weight(opts):
    torch.manual_seed(1)
    layer = _randomise(LoRAConv1d(6, 8, r=4, **opts)).double()
    x = torch.randn(2, 6, 17, dtype=torch.float64)
    base = nn.Conv1d(6, 8, **opts).double()
    with torch.no_grad():
        base.weight.copy_(layer.weight + layer.get_delta_weight())
        if base.bias is not None:
            base.bias.copy_(layer.bias)
    assert torch.allclose(layer(x), base(x), atol=1e-10)
    # unbatched input, as nn.Conv1d accepts
    assert torch.allclose(layer(x[0]), base(x[0]), atol=1e-10)


@pytest.mark.parametrize("opts", CONVT_OPTS, ids=str)
def test_conv_transpose1d_equals_base_with_delta_weight(opts):
    torch.manual_seed(2)
    layer = _randomise(LoRAConvTranspose1d(6, 4, r=2, **opts)).double()
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    base = nn.ConvTranspose1d(6, 4, **opts).double()
    with torch.no_grad():
        base.weight.copy_(layer.weight + layer.get_delta_weight())
        if base.bias is not None:
            base.bias.copy_(layer.bias)
    assert torch.allclose(layer(x), base(x), atol=1e-10)


def test_conv_transpose1d_output_size_argument():
    torch.manual_seed(3)
    layer = _randomise(LoRAConvTranspose1d(4, 3, 3, r=2, stride=3, padding=1)).double()
    base = nn.ConvTranspose1d(4, 3, 3, stride=3, padding=1).double()
    with torch.no_grad():
        base.weight.copy_(layer.weight + layer.get_delta_weight())
        base.bias.copy_(layer.bias)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    for size in ([13], [14], [15]):
        y = layer(x, output_size=size)
        assert y.shape[-1] == size[0]
        assert torch.allclose(y, base(x, output_size=size), atol=1e-10)


@pytest.mark.parametrize(
    "layer",
    [
        LoRALinear(20, 30, r=3),
        LoRAConv1d(8, 12, 3, r=4, groups=2),
        LoRAConvTranspose1d(12, 8, 4, r=4, stride=2, groups=2),
    ],
    ids=["linear", "conv1d", "convT"],
)
def test_delta_weight_has_rank_at_most_r(layer):
    torch.manual_seed(4)
    _randomise(layer.double())
    dw = layer.get_delta_weight()
    assert dw.shape == layer.weight.shape
    assert torch.linalg.matrix_rank(dw.reshape(dw.shape[0], -1)).item() <= layer.r
    dw.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_non_contiguous_inputs():
    torch.manual_seed(5)
    conv = _randomise(LoRAConv1d(6, 4, 3, r=2, padding=1))
    x = torch.randn(2, 17, 6).transpose(1, 2)  # (2, 6, 17), non-contiguous
    assert not x.is_contiguous()
    assert torch.allclose(conv(x), conv(x.contiguous()), atol=1e-6)
    lin = _randomise(LoRALinear(6, 5, r=2))
    xs = torch.randn(4, 12)[:, ::2]
    assert torch.allclose(lin(xs), lin(xs.contiguous()), atol=1e-6)


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize(
    "layer, x",
    [
        (LoRALinear(16, 8, r=4), torch.randn(3, 16)),
        (LoRAConv1d(4, 6, 3, r=2, padding=1, groups=2), torch.randn(2, 4, 10)),
        (LoRAConvTranspose1d(4, 6, 4, r=2, stride=2, padding=1), torch.randn(2, 4, 10)),
    ],
    ids=["linear", "conv1d", "convT"],
)
def test_merge_unmerge_exact_and_no_drift(layer, x):
    torch.manual_seed(6)
    _randomise(layer)
    original = layer.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    with torch.no_grad():  # a merged layer refuses to train (its factors would get no gradient)
        assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, original)
    for _ in range(1000):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.weight, original)  # bit-identical, no drift


def test_state_dict_holds_unmerged_weight_and_reload_is_safe():
    torch.manual_seed(7)
    layer = _randomise(LoRALinear(8, 8, r=2, merge_weights=True))
    w0 = layer.weight.detach().clone()
    layer.eval()
    assert layer.merged
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], w0)
    other = LoRALinear(8, 8, r=2, merge_weights=True).eval()
    other.load_state_dict(sd)
    assert other.merged
    x = torch.randn(3, 8)
    assert torch.allclose(other(x), layer(x), atol=1e-6)
    other.train()
    assert torch.equal(other.weight, w0)


def test_eval_without_merge_weights_keeps_factors_separate():
    layer = LoRALinear(8, 8, r=2)
    layer.eval()
    assert not layer.merged


# --------------------------------------------------------------------------- from_base


def test_from_base_shares_weight_and_leaves_base_untouched():
    base = nn.Conv1d(4, 6, 3, padding=1)
    layer = LoRAConv1d.from_base(base, r=2, lora_alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not hasattr(base, "lora_A")
    x = torch.randn(2, 4, 9)
    assert torch.equal(layer(x), base(x))
    with pytest.raises(TypeError, match="expects an Conv1d, got Linear"):
        LoRAConv1d.from_base(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="already a LoRA layer"):
        LoRAConv1d.from_base(layer)


def test_from_base_folds_weight_norm_exactly():
    torch.manual_seed(8)
    legacy = nn.utils.weight_norm(nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1))
    param = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=1))
    x = torch.randn(2, 6, 7)
    for base, inp in ((legacy, x), (param, torch.randn(2, 4, 7))):
        want = base(inp)
        cls = LoRAConvTranspose1d if isinstance(base, nn.ConvTranspose1d) else LoRAConv1d
        layer = cls.from_base(copy.deepcopy(base) if base is param else base, r=2)
        assert layer.weight_norm_kind in ("legacy", "parametrizations")
        assert torch.equal(layer(inp), want)
        assert "weight_g" not in dict(layer.named_parameters())
    assert LoRAConvTranspose1d.from_base(nn.utils.weight_norm(nn.ConvTranspose1d(2, 2, 3)), r=2).weight_norm_dim == 0


# --------------------------------------------------------------------------- dropout, autocast, grads


def test_dropout_only_in_training():
    torch.manual_seed(9)
    layer = _randomise(LoRALinear(32, 16, r=4, lora_dropout=0.5))
    x = torch.randn(8, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_autocast_bf16_keeps_small_updates():
    """Under CPU bf16 autocast, a ΔW far below bf16's resolution of W still shows in the output.

    W = ±1 alternating, x constant: the base output cancels to 0, while ΔW = 1e-3 (below half
    a bf16 ulp at 1.0) adds 1e-3·in. Merging ΔW into a bf16 weight would lose it entirely.
    """
    fin = 64
    layer = LoRALinear(fin, 4, r=1, lora_alpha=1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([(-1.0) ** i for i in range(fin)]).expand(4, fin))
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1e-3)
    x = torch.ones(2, fin)
    merged_bf16 = (layer.weight + layer.get_delta_weight()).bfloat16()
    assert torch.equal(merged_bf16, layer.weight.bfloat16())  # the update rounds away when merged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), torch.full((2, 4), 1e-3 * fin), rtol=1e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_bias_gradient_when_bias_trains():
    torch.manual_seed(10)
    layer = _randomise(LoRAConv1d(4, 5, 3, r=2, padding=1))
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 4, 6)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert torch.allclose(layer.bias.grad, torch.full((5,), 12.0))
