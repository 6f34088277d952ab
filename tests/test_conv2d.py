"""LoRAConv2d: a drop-in for nn.Conv2d (RVC's multi-period discriminator), exact against the oracle.

Every base option (stride, padding as int / tuple / 'same' / 'valid', dilation, groups, bias, each
padding_mode) against nn.Conv2d and rvclora.reference; gradients of the input, the factors and a
trainable weight and bias; the drop-in layout (state-dict keys, signature, repr, output and gradient
strides); injection into nn.Conv2d (weight_norm folded), merge, checkpoints, blends and ``rvclora info``.
The backends other than torch and reference decline the op, and ``auto`` runs it on torch.
"""

from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvclora import (
    LoRAConfig,
    LoRAConv2d,
    blend_adapters,
    inject_lora,
    load_lora_checkpoint,
    merge_lora_weights,
    merged_state_dict,
    ops,
    read_lora_file,
    save_lora_checkpoint,
)
from rvclora.models.discriminator import DiscriminatorP
from rvclora.ops import dispatch

PADDINGS = [0, 1, (2, 0), (1, 2), "same", "valid"]
MODES = ["zeros", "reflect", "replicate", "circular"]


def _pair(base: nn.Conv2d, r: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    lora = LoRAConv2d.from_base(copy.deepcopy(base), r=r, **kw)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    return lora


def _option_grid():
    for padding, mode in itertools.product(PADDINGS, MODES):
        yield dict(kernel_size=(3, 2), padding=padding, padding_mode=mode)
    yield dict(kernel_size=(5, 1), stride=(3, 1), padding=(2, 0))  # RVC's DiscriminatorP layer
    yield dict(kernel_size=3, stride=2, dilation=(2, 1), groups=2, padding=1, padding_mode="reflect")
    yield dict(kernel_size=(2, 3), dilation=2, padding="same", padding_mode="circular", bias=False)
    yield dict(kernel_size=(4, 2), groups=2, padding="same")  # even kernels: 'same' puts the odd pixel last


@pytest.mark.parametrize("opts", list(_option_grid()), ids=str)
def test_every_base_option_matches_the_base_and_the_oracle(opts):
    """B = 0: the layer is nn.Conv2d. B ≠ 0: float64 result and every gradient equal the merged conv's."""
    torch.manual_seed(1)
    base = nn.Conv2d(4, 6, **opts).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    lora = LoRAConv2d.from_base(copy.deepcopy(base), r=2)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=1e-12)
    lora = _pair(base)
    lora.weight.requires_grad_(True)
    xl, xm = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = lora(xl)
    # the merged base: W + ΔW through nn.Conv2d's own forward (its padding rules, not ours)
    merged = copy.deepcopy(base)
    w = lora.weight.detach().clone().requires_grad_(True)
    dw_in = (lora.lora_A.detach().clone().requires_grad_(True), lora.lora_B.detach().clone().requires_grad_(True))
    dw = lora.spec.delta_weight(*dw_in, lora.scaling, lora.groups, w.shape)
    del merged.weight
    merged.weight = w + dw
    ym = merged(xm)
    torch.testing.assert_close(y, ym, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ym)
    params = [xl, lora.weight, lora.lora_A, lora.lora_B] + ([lora.bias] if lora.bias is not None else [])
    want = [xm, w, *dw_in] + ([merged.bias] if merged.bias is not None else [])
    for name, a, b in zip(
        ["x", "weight", "lora_A", "lora_B", "bias"], torch.autograd.grad(y, params, g), torch.autograd.grad(ym, want, g)
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_low_precision_is_held_to_the_oracle_tolerance(dt):
    from oracle import compare_with_oracle

    from rvclora.ops.spec import SPECS, sample_tensors

    spec = SPECS["lora_conv2d"]
    sample = spec.samples[1]
    t = sample_tensors(spec, sample, seed=3)
    compare_with_oracle(
        lambda x, weight, bias, lora_A, lora_B: ops.lora_conv2d(x, weight, bias, lora_A, lora_B, 0.7, **sample.options),
        lambda x, weight, bias, lora_A, lora_B: spec.run_reference(
            x, weight, bias, lora_A, lora_B, 0.7, sample.options
        ),
        t,
        dt,
        ["x", "weight", "bias", "lora_A", "lora_B"],
        f"conv2d {sample.label} {dt}",
    )


def test_dropout_mask_is_the_seeds_and_regenerated_in_backward():
    from rvclora import reference as ref
    from rvclora.ops.backends import torch as tb

    lora = _pair(nn.Conv2d(3, 4, (3, 1), padding=(1, 0)).double(), lora_dropout=0.4).train()
    x = torch.randn(2, 3, 6, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    seed = ops.draw_seed(0.4)
    torch.manual_seed(5)
    y = lora(x)
    mask = tb.dropout_mask(seed, x.shape, 0.4, x.device, x.dtype)
    assert (mask == 0).any() and (mask != 0).any()
    x2 = x.detach().clone().requires_grad_(True)
    want = ref.lora_conv2d_ref(
        x2, lora.weight, lora.bias, lora.lora_A, lora.lora_B, lora.scaling, padding=(1, 1, 0, 0), dropout_mask=mask
    )
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(want, x2, g)[0])


# --------------------------------------------------------------------------- drop-in layout


def test_state_dict_signature_and_repr_are_the_base_classs():
    base = nn.Conv2d(4, 6, (5, 1), (3, 1), padding=(2, 0))
    lora = LoRAConv2d.from_base(copy.deepcopy(base), r=2)
    assert list(lora.state_dict()) == list(base.state_dict()) + ["lora_A", "lora_B"]
    assert tuple(lora.lora_A.shape) == (2, 4 * 5) and tuple(lora.lora_B.shape) == (6, 2)
    want = list(inspect.signature(nn.Conv2d.forward).parameters)
    assert list(inspect.signature(LoRAConv2d.forward).parameters) == want
    assert repr(lora) == "LoRA" + repr(base)[:-1] + ", r=2, lora_alpha=16)"
    fresh = LoRAConv2d(4, 6, (5, 1), stride=(3, 1), padding=(2, 0), r=2)
    assert isinstance(fresh, nn.Conv2d) and fresh.kind == "conv2d"
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in lora.state_dict().items()}


def _significant(t):
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


INPUTS = {
    "batch2": lambda: torch.randn(2, 4, 7, 5),
    "batch1": lambda: torch.randn(1, 4, 7, 5),
    "unbatched": lambda: torch.randn(4, 7, 5),
    "channels_last": lambda: torch.randn(2, 4, 7, 5).contiguous(memory_format=torch.channels_last),
    "sliced": lambda: torch.randn(2, 4, 7, 10)[..., ::2],
    "batch0": lambda: torch.randn(0, 4, 7, 5),
}


LAYOUT_CASES = [(name, padding, mode) for name in INPUTS for padding, mode in [((2, 0), "zeros"), ("same", "reflect")]]


@pytest.mark.parametrize("name, padding, mode", LAYOUT_CASES, ids=[f"{n}-{m}" for n, _, m in LAYOUT_CASES])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "dropout"])
def test_outputs_and_gradients_have_the_base_layout(name, padding, mode, dropout):
    base = nn.Conv2d(4, 6, (3, 2), padding=padding, padding_mode=mode)
    lora = _pair(base, lora_dropout=dropout).train()
    x = INPUTS[name]()
    xb, xl = x.detach().requires_grad_(True), x.detach().requires_grad_(True)
    yb, y = base(xb), lora(xl)
    assert y.shape == yb.shape and _significant(y) == _significant(yb), f"{name}: {y.stride()} != {yb.stride()}"
    g = torch.randn_like(yb)
    gb = torch.autograd.grad(yb, [xb], g)[0]
    gl = torch.autograd.grad(y, [xl, lora.lora_A, lora.lora_B, lora.bias], g)
    assert _significant(gl[0]) == _significant(gb), f"{name} grad_input: {gl[0].stride()} != {gb.stride()}"
    assert all(t.is_contiguous() for t in gl[1:])


def test_bad_input_is_refused_in_one_line():
    lora = LoRAConv2d(4, 6, 3, r=2)
    with pytest.raises(ValueError, match=r"LoRAConv2d: input must be \(N, C_in=4, H, W\).*got \(2, 3, 5, 5\)"):
        lora(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="r=3 must be a multiple of groups=2"):
        LoRAConv2d(4, 6, 3, r=3, groups=2)


# --------------------------------------------------------------------------- backends


def test_auto_runs_torch_and_the_other_backends_decline():
    x = torch.randn(1, 2, 5, 3)
    w, a = torch.randn(3, 2, 3, 1), torch.randn(2, 6)
    assert dispatch.select_backend("lora_conv2d", x, weight=w, lora_A=a, dropout_p=0.0).NAME == "torch"
    for name in ("cpu", "cuda", "triton"):
        why = dispatch.unsupported(name, "lora_conv2d", x, weight=w, lora_A=a, dropout_p=0.0)
        assert why, f"{name} does not decline lora_conv2d"
    lora = _pair(nn.Conv2d(2, 3, (3, 1), padding=(1, 0)))
    want = lora(x)
    ops.set_backend("reference")
    try:
        torch.testing.assert_close(lora(x), want)
    finally:
        ops.set_backend(None)
    ops.set_backend("cpu")
    try:
        with pytest.raises(dispatch.BackendUnavailableError, match="RVCLORA_BACKEND=cpu cannot run lora_conv2d"):
            lora(x)
    finally:
        ops.set_backend(None)


def test_a_backend_without_the_op_is_skipped(monkeypatch):
    import types

    def fake_unsupported(op, x, **params):
        raise AssertionError("a backend lacking the op must not even be asked")

    fake = types.SimpleNamespace(NAME="cpu", unavailable_reason=lambda: None, unsupported_reason=fake_unsupported)
    monkeypatch.setitem(dispatch._loaded, "cpu", fake)
    x = torch.randn(1, 2, 5, 3)
    be = dispatch.select_backend(
        "lora_conv2d", x, weight=torch.randn(3, 2, 3, 1), lora_A=torch.randn(2, 6), dropout_p=0.0
    )
    assert be.NAME == "torch"


# --------------------------------------------------------------------------- models, files, blends


def _disc(seed: int = 0):
    torch.manual_seed(seed)
    return DiscriminatorP(2, shrink=32)


CONFIG = LoRAConfig(r=2, lora_alpha=4, target_modules=["convs.*", "conv_post"])


def _adapted(seed: int):
    model = inject_lora(_disc(), CONFIG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAConv2d):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    return model


def test_inject_wraps_the_discriminators_conv2d_exactly():
    base = _disc()
    model = inject_lora(_disc(), CONFIG)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert kinds == {LoRAConv2d}
    assert all(m.weight_norm_kind == "legacy" for m in model.modules() if isinstance(m, LoRAConv2d))
    x = torch.randn(1, 1, 50)
    torch.testing.assert_close(model(x)[0], base(x)[0], rtol=1e-5, atol=1e-6)


def test_merge_and_merged_state_dict_equal_the_adapted_model():
    model = _adapted(1).eval()
    x = torch.randn(1, 1, 50)
    with torch.no_grad():
        want = model(x)[0]
        merged = _disc()
        merged.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(merged(x)[0], want, rtol=1e-5, atol=1e-6)
        merge_lora_weights(model)
        torch.testing.assert_close(model(x)[0], want, rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip_and_layer_records(tmp_path):
    model = _adapted(2)
    path = tmp_path / "d.safetensors"
    save_lora_checkpoint(model, path, CONFIG)
    data = read_lora_file(path)
    assert all(rec == {"kind": "conv2d", "groups": 1} for rec in data["metadata"]["layers"].values())
    assert len(data["metadata"]["layers"]) == 6
    fresh = inject_lora(_disc(), CONFIG)
    load_lora_checkpoint(fresh, path)
    x = torch.randn(1, 1, 50)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], model(x)[0])


def test_blend_is_exact_for_conv2d_layers(tmp_path):
    paths = []
    for seed in (3, 4):
        paths.append(tmp_path / f"a{seed}.safetensors")
        save_lora_checkpoint(_adapted(seed), paths[-1], CONFIG)
    out = blend_adapters([str(p) for p in paths], [0.25, 0.75])
    assert all(rec["kind"] == "conv2d" for rec in out["metadata"]["layers"].values())
    a, b = _adapted(3), _adapted(4)
    layers = dict(a.named_modules())
    for name, m in b.named_modules():
        if isinstance(m, LoRAConv2d):
            want = 0.25 * layers[name].get_delta_weight() + 0.75 * m.get_delta_weight()
            s = out["config"].scaling
            got = m.spec.delta_weight(
                out["weights"][f"{name}.lora_A"], out["weights"][f"{name}.lora_B"], s, 1, m.weight.shape
            )
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-7)


def test_rvclora_info_reads_a_conv2d_adapter(tmp_path, capsys):
    from rvclora.cli import main

    path = tmp_path / "d.safetensors"
    save_lora_checkpoint(_adapted(5), path, CONFIG)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "convs.0" in out


def test_peft_export_refuses_conv2d(tmp_path):
    from rvclora import export_peft_adapter

    with pytest.raises(ValueError, match=r"'convs.0' is a LoRAConv2d; PEFT supports Linear and Conv1d LoRA layers"):
        export_peft_adapter(_adapted(6), tmp_path / "peft")


def test_saving_a_layer_of_an_unknown_kind_fails_loudly(tmp_path):
    from rvclora.layers import LoRALinear
    from rvclora.records import layer_records

    class Odd(LoRALinear):
        spec = None  # a LoRA layer no op spec describes

    model = nn.Sequential(nn.Linear(3, 3))
    inject_lora(model, LoRAConfig(r=1, lora_alpha=1, target_modules=["0"]))
    model[0].__class__ = Odd
    with pytest.raises(TypeError, match=r"'0' is a Odd of kind None; a saved layer's kind must be one of"):
        layer_records(model)
    with pytest.raises(TypeError, match="kind must be one of"):
        save_lora_checkpoint(model, tmp_path / "x.safetensors", LoRAConfig(r=1, lora_alpha=1, target_modules=["0"]))


def test_functional_op_strides_of_a_channels_last_input_match_conv2d():
    x = torch.randn(2, 3, 6, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3)
    y = ops.lora_conv2d(x, w, None, torch.randn(2, 27), torch.randn(5, 2), 0.5, padding=(1, 1, 1, 1))
    assert y.stride() == F.conv2d(x, w, padding=1).stride()


def test_autocast_gives_the_base_dtype_and_float32_factor_gradients():
    lora = _pair(nn.Conv2d(4, 6, (5, 1), (3, 1), padding=(2, 0))).train()
    x = torch.randn(2, 4, 23, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora(x)
        want_dtype = nn.Conv2d.forward(lora, x).dtype
    assert y.dtype == want_dtype == torch.bfloat16
    gA, gB = torch.autograd.grad(y.float().square().sum(), [lora.lora_A, lora.lora_B])
    assert gA.dtype == gB.dtype == torch.float32
    d = {
        k: v.detach().double()
        for k, v in (("w", lora.weight), ("b", lora.bias), ("A", lora.lora_A), ("B", lora.lora_B))
    }
    from rvclora import reference as ref

    want = ref.lora_conv2d_ref(
        x.double(), d["w"], d["b"], d["A"], d["B"], lora.scaling, stride=(3, 1), padding=(2, 2, 0, 0)
    )
    err = (y.double() - want).abs().max().item()
    assert err <= 2e-2 * want.abs().max().item(), f"bf16 autocast error {err:.3g}"
