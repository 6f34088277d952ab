"""Drop-in fidelity: a LoRA layer behaves like its base class wherever code uses the base class.

Layout (shape, dtype, device, strides on every dim of size > 1) of outputs and of the gradients
autograd returns, the forward signature, empty batches and zero-length inputs, refusal of layers
that cannot be adapted exactly, and training/merging/dtype conversions that must not lose work.
Run on every CPU backend that is available (``torch`` always; ``cpu`` once it is built).
"""

from __future__ import annotations

import copy
import inspect
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from oracle import assert_close_to_oracle
from torch.utils._python_dispatch import TorchDispatchMode

from rvclora import LoRAConfig, LoRAConv1d, LoRAConvTranspose1d, LoRALinear, inject_lora, merged_state_dict
from rvclora import reference as ref
from rvclora.ops import dispatch, set_backend
from rvclora.ops.backends import torch as tb

# the CPU backends whose outputs must be drop-ins (the compiled ``cpu`` backend joins when it is available)
CPU_BACKENDS = [
    row["backend"]
    for row in dispatch.backend_status()
    if row["backend"] in ("torch", "cpu") and row["unavailable"] is None
]
LORA = {nn.Linear: LoRALinear, nn.Conv1d: LoRAConv1d, nn.ConvTranspose1d: LoRAConvTranspose1d}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend(None)


def _pair(base: nn.Module, r: int = 2, **kw):
    """``(base, LoRA layer over a copy of it with non-zero B)``: the same function up to ΔW."""
    torch.manual_seed(0)
    lora = LORA[type(base)].from_base(copy.deepcopy(base), r=r, **kw)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.5)
    return base, lora


def _significant_strides(t: torch.Tensor):
    return tuple(st for st, n in zip(t.stride(), t.shape) if n > 1)


def _same_layout(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != base {tuple(want.shape)}"
    assert got.dtype == want.dtype and got.device == want.device, f"{what}: {got.dtype}/{got.device}"
    assert _significant_strides(got) == _significant_strides(want), (
        f"{what}: strides {got.stride()} != base {want.stride()} for shape {tuple(want.shape)}"
    )


def _linear_inputs():
    return {
        "2d": torch.randn(4, 10),
        "batch1": torch.randn(1, 10),
        "unbatched": torch.randn(10),
        "batch0": torch.randn(0, 10),
        "3d": torch.randn(3, 5, 10),
        "4d": torch.randn(2, 1, 3, 10),
        "3d_empty": torch.randn(3, 0, 10),
        "transposed": torch.randn(10, 4).t(),
        "3d_permuted": torch.randn(5, 3, 10).transpose(0, 1),
        "3d_inner_stride": torch.randn(3, 10, 5).transpose(1, 2),
        "sliced": torch.randn(4, 20)[:, ::2],
    }


def _conv_inputs(c: int):
    return {
        "batch2": torch.randn(2, c, 9),
        "batch1": torch.randn(1, c, 9),
        "unbatched": torch.randn(c, 9),
        "batch0": torch.randn(0, c, 9),
        "length1": torch.randn(2, c, 1),
        "channels_last": torch.randn(2, 9, c).transpose(1, 2),
        "batch_inner": torch.randn(c, 2, 9).transpose(0, 1),
        "unbatched_transposed": torch.randn(9, c).t(),
        "time_sliced": torch.randn(2, c, 18)[..., ::2],
    }


CASES = (
    [("linear", nn.Linear(10, 8), name, x) for name, x in _linear_inputs().items()]
    + [("linear_nobias", nn.Linear(10, 8, bias=False), "3d", torch.randn(3, 5, 10))]
    + [("conv1d", nn.Conv1d(4, 6, 3, padding=1), name, x) for name, x in _conv_inputs(4).items()]
    + [
        ("conv1d_reflect_same", nn.Conv1d(4, 6, 4, padding="same", padding_mode="reflect"), name, x)
        for name, x in _conv_inputs(4).items()
        if name not in ("batch0", "length1")
    ]  # the base refuses these
    + [("conv1d_groups", nn.Conv1d(4, 6, 3, padding=1, groups=2), name, x) for name, x in _conv_inputs(4).items()]
    + [("convt", nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1), name, x) for name, x in _conv_inputs(4).items()]
)


@pytest.mark.parametrize("kind, base, name, x", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["p0", "dropout"])
def test_output_and_gradients_have_the_base_layout(backend, kind, base, name, x, dropout):
    base, lora = _pair(base, lora_dropout=dropout)
    lora.train()
    if kind == "linear_nobias":
        lora.bias = None
    params = [lora.weight, lora.lora_A, lora.lora_B] + ([lora.bias] if lora.bias is not None else [])
    base_params = [base.weight] + ([base.bias] if base.bias is not None else [])
    xb, xl = x.detach().requires_grad_(True), x.detach().requires_grad_(True)  # two leaves, x's exact strides
    yb, y = base(xb), lora(xl)
    _same_layout(y, yb, f"{kind}/{name} output")
    g = torch.randn_like(yb)
    gb = torch.autograd.grad(yb, [xb] + base_params, g)
    gl = torch.autograd.grad(y, [xl] + params, g)
    _same_layout(gl[0], gb[0], f"{kind}/{name} grad_input")
    for p, gp in zip(params, gl[1:]):
        assert gp.shape == p.shape and gp.dtype == p.dtype
        assert gp.is_contiguous(), f"{kind}/{name}: gradient of a parameter of shape {tuple(p.shape)} is strided"
    if x.numel() == 0:
        assert y.numel() == 0
        for gp in gl[1:]:
            assert not gp.any(), "an empty input must give zero parameter gradients"


def test_forward_signature_is_the_base_class_signature():
    for lora_cls, base_cls in (
        (LoRALinear, nn.Linear),
        (LoRAConv1d, nn.Conv1d),
        (LoRAConvTranspose1d, nn.ConvTranspose1d),
    ):
        want = list(inspect.signature(base_cls.forward).parameters)
        assert list(inspect.signature(lora_cls.forward).parameters) == want, lora_cls.__name__


def test_forward_by_keyword(backend):
    for base, x in (
        (nn.Linear(10, 8), torch.randn(3, 10)),
        (nn.Conv1d(4, 6, 3), torch.randn(2, 4, 9)),
        (nn.ConvTranspose1d(4, 6, 4, stride=2), torch.randn(2, 4, 9)),
    ):
        _, lora = _pair(base)
        torch.testing.assert_close(lora(input=x), lora(x))


@pytest.mark.parametrize(
    "x_shape, output_size",
    [
        ((2, 4, 9), [19]),
        ((2, 4, 9), [2, 6, 19]),
        ((2, 4, 9), (18,)),
        ((2, 4, 9), None),
        ((4, 9), [6, 19]),
        ((4, 9), [19]),
        ((4, 9), [18]),
    ],
    ids=str,
)
def test_conv_transpose1d_output_size_like_the_base(backend, x_shape, output_size):
    base, lora = _pair(nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1))
    x = torch.randn(x_shape)
    with torch.no_grad():
        lora_off = copy.deepcopy(lora)
        lora_off.lora_B.zero_()  # ΔW = 0: must equal the base exactly in shape and, up to rounding, values
    yb = base(x, output_size=output_size)
    y = lora_off(x, output_size=output_size)
    assert y.shape == yb.shape
    torch.testing.assert_close(y, yb)
    assert lora(x, output_size).shape == yb.shape


def test_conv_transpose1d_bad_output_size_raises_like_the_base():
    base, lora = _pair(nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1))
    x = torch.randn(2, 4, 9)
    with pytest.raises(ValueError) as eb:
        base(x, output_size=[30])
    with pytest.raises(ValueError) as el:
        lora(x, output_size=[30])
    assert str(el.value) == str(eb.value)


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv1d(4, 6, 3, padding=2), (2, 4, 0)),
        (lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 1)),
        (lambda: nn.ConvTranspose1d(4, 6, 4, stride=2), (2, 4, 0)),
        (lambda: nn.Linear(4, 6), (3, 5)),
    ],
    ids=["conv1d_t0", "conv1d_reflect_t1", "convt_t0", "linear_wrong_features"],
)
def test_inputs_the_base_refuses_are_refused(backend, make, shape):
    base, lora = _pair(make())
    x = torch.randn(shape)
    with pytest.raises((RuntimeError, ValueError)):
        base(x)
    with pytest.raises((RuntimeError, ValueError)):
        lora(x)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "convt"])
def test_empty_batch_backward_through_a_model(backend, kind):
    """A zero-size batch runs forward and backward like the base layer (empty output, zero gradients)."""
    base = {
        "linear": nn.Linear(6, 5),
        "conv1d": nn.Conv1d(6, 5, 3, padding=1),
        "convt": nn.ConvTranspose1d(6, 5, 4, stride=2),
    }[kind]
    _, lora = _pair(base)
    x = torch.randn((0, 6) if kind == "linear" else (0, 6, 7), requires_grad=True)
    y = lora(x)
    assert y.shape == base(x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(lora.lora_A.grad, torch.zeros_like(lora.lora_A))


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "wrap",
    [
        lambda m: nn.utils.spectral_norm(m),
        lambda m: prune.l1_unstructured(m, "weight", 0.5),
        lambda m: nn.utils.spectral_norm(m, name="weight", dim=0),
    ],
    ids=["spectral_norm", "prune", "spectral_norm_dim0"],
)
def test_layer_with_a_weight_rewriting_hook_is_refused(wrap):
    model = nn.Sequential(nn.Conv1d(4, 4, 3), wrap(nn.Conv1d(4, 4, 3)))
    with pytest.raises(ValueError, match=r"1 \(Conv1d\).*(forward pre-hook|not a parameter)"):
        inject_lora(model, LoRAConfig(r=2, target_modules=["0", "1"]))
    assert type(model[0]) is nn.Conv1d, "injection must refuse before replacing any layer"
    with pytest.raises(ValueError, match="forward pre-hook"):
        LoRAConv1d.from_base(model[1], r=2)


def test_weight_norm_and_plain_hooks_are_still_accepted():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3)), nn.Linear(4, 4))
    model[1].register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # touches the input, not the weight
    inject_lora(model, LoRAConfig(r=2, target_modules=["0", "1"]))
    assert isinstance(model[0], LoRAConv1d) and isinstance(model[1], LoRALinear)


# ------------------------------------------------------------------ training while merged


def test_train_unmerges_so_the_factors_get_gradients():
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0", "1"], bias="all"))
    model[1].merge()
    model.train()
    assert not model[1].merged
    model(torch.randn(4, 6)).sum().backward()
    assert model[1].lora_A.grad is not None and model[1].lora_B.grad is not None


def test_training_forward_while_merged_is_refused():
    """With bias="all" a merged layer would silently train only its bias: refused with a clear error."""
    model = nn.Sequential(nn.Linear(6, 3))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"], bias="all"))
    model.train()
    model[0].merge()
    with pytest.raises(RuntimeError, match="merged.*no gradient"):
        model(torch.randn(4, 6))
    with torch.no_grad():
        model(torch.randn(4, 6))  # inference while merged is fine
    model.eval()
    model(torch.randn(4, 6))


@pytest.mark.parametrize("layer", [LoRALinear(6, 4, r=2), LoRAConv1d(4, 6, 3, r=2)], ids=["linear", "conv1d"])
def test_optimizer_step_on_the_base_weight_while_merged_is_kept(layer):
    torch.manual_seed(3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.lora_A.requires_grad_(False)
    layer.lora_B.requires_grad_(False)
    w0 = layer.weight.detach().clone()
    layer.merge()
    opt = torch.optim.SGD([layer.weight], lr=0.1)
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    sd = layer.state_dict()
    torch.testing.assert_close(sd["weight"], w0 - 0.1)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1)


def test_unmerge_refuses_when_both_weight_and_factors_changed_while_merged():
    layer = LoRALinear(6, 4, r=2)
    layer.merge()
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.lora_A.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place while merged"):
        layer.unmerge()


def test_unmerge_is_bit_exact_without_a_step():
    layer = LoRAConv1d(4, 6, 3, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize(
    "convert",
    [
        lambda m: m.half(),
        lambda m: m.to(torch.float64),
        lambda m: m.to("cpu").bfloat16(),
    ],
    ids=["half", "double", "bfloat16"],
)
def test_state_dicts_follow_dtype_conversion_while_merged(convert):
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 6, 3)))
    inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B.normal_()
    w0 = model[0].weight.detach().clone()
    model.eval()
    model[0].merge()
    convert(model)
    dt = model[0].weight.dtype
    sd = model.state_dict()
    assert all(v.dtype == dt for v in sd.values() if v.is_floating_point()), {k: v.dtype for k, v in sd.items()}
    assert torch.equal(sd["0.weight"], w0.to(dt))
    msd = merged_state_dict(model)
    assert all(v.dtype == dt for v in msd.values())
    model[0].unmerge()
    assert torch.equal(model[0].weight.detach(), w0.to(dt))


# ------------------------------------------------------------------ factor dtype and the half path


def _op_case(op: str, x_dtype, factor_dtype):
    torch.manual_seed(5)
    if op == "linear":
        x, w, b = torch.randn(3, 5, 12), torch.randn(10, 12), torch.randn(10)
        a, bb = torch.randn(3, 12), torch.randn(10, 3)
        fn, oracle, extra = tb.lora_linear, ref.lora_linear_ref, ()
    elif op == "conv1d":
        x, w, b = torch.randn(2, 6, 11), torch.randn(8, 6, 3), torch.randn(8)
        a, bb = torch.randn(3, 18), torch.randn(8, 3)
        fn, oracle, extra = tb.lora_conv1d, ref.lora_conv1d_ref, (1, (1, 1), 1, 1, "zeros")
    else:
        x, w, b = torch.randn(2, 6, 7), torch.randn(6, 8, 4), torch.randn(8)
        a, bb = torch.randn(3, 6), torch.randn(3, 32)
        fn, oracle, extra = tb.lora_conv_transpose1d, ref.lora_conv_transpose1d_ref, (2, 1, 0, 1, 1)
    acts = [t.to(x_dtype).requires_grad_(True) for t in (x, w, b)]
    facs = [(t * 0.3).to(factor_dtype).requires_grad_(True) for t in (a, bb)]
    return fn, oracle, extra, acts, facs


@pytest.mark.parametrize("op", ["linear", "conv1d", "convt"])
@pytest.mark.parametrize(
    "x_dtype, factor_dtype",
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float64),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
    ],
    ids=["x64_f32", "x32_f64", "x16_f32", "xbf16_f32"],
)
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "dropout"])
def test_factors_of_another_dtype_are_accepted(op, x_dtype, factor_dtype, dropout):
    """Autocast keeps the factors fp32 while x, W, b follow the autocast dtype; a float64 model may carry
    float32 factors. Each gradient comes back in its own input's dtype, and the result is the oracle's."""
    fn, oracle, extra, (x, w, b), (a, bb) = _op_case(op, x_dtype, factor_dtype)
    seed = torch.tensor(1234, dtype=torch.int64) if dropout else None
    y = fn(x, w, b, a, bb, 0.7, *extra, dropout, seed)
    assert y.dtype == x_dtype
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w, b, a, bb], g)
    for t, gt in zip((x, w, b, a, bb), grads):
        assert gt.dtype == t.dtype and gt.shape == t.shape
    mask = tb.dropout_mask(seed, x.shape, dropout, x.device, torch.float64) if dropout else None
    ins64 = [t.detach().double().requires_grad_(True) for t in (x, w, b, a, bb)]
    y64 = oracle(*ins64[:3], *ins64[3:], 0.7, *extra, mask)
    g64 = torch.autograd.grad(y64, ins64, g.double())
    # the oracle in the activation dtype (factors cast to it) sets the tolerance scale
    low = torch.float32 if x_dtype == torch.float64 else x_dtype
    insl = [t.detach().to(low).requires_grad_(True) for t in (x, w, b, a, bb)]
    maskl = mask.to(low) if mask is not None else None
    yl = oracle(*insl[:3], *insl[3:], 0.7, *extra, maskl)
    gll = torch.autograd.grad(yl, insl, g.to(low))
    assert_close_to_oracle(y, y64, yl, f"{op} forward")
    for name, c, r64, rl in zip(("x", "W", "b", "A", "B"), grads, g64, gll):
        assert_close_to_oracle(c, r64, rl, f"{op} grad_{name}")


class _RecordGemms(TorchDispatchMode):
    """Records the input dtypes of every GEMM / convolution that runs."""

    GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "convolution_backward", "addmm_", "baddbmm_"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.GEMMS or name.startswith(("mkldnn_conv", "_convolution", "mkldnn_linear")):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
            self.calls.append((name, shapes, dtypes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op", ["linear", "conv1d", "convt"])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_path_runs_base_sized_work_in_the_activation_dtype(op, dt):
    """Every GEMM/convolution that touches the base weight (the base-sized work: y, grad_x, grad_W) has
    half operands: none is upcast to float32. The thin LoRA GEMMs run in float32."""
    fn, _, extra, (x, w, b), (a, bb) = _op_case(op, dt, torch.float32)
    with _RecordGemms() as rec:
        y = fn(x, w, b, a, bb, 0.7, *extra, 0.0, None)
        torch.autograd.grad(y, [x, w, b, a, bb], torch.randn_like(y))
    weight_shapes = {tuple(w.shape), tuple(w.shape[::-1]), (w.shape[0], w.numel() // w.shape[0])}
    base = [c for c in rec.calls if weight_shapes & set(c[1])]
    assert base, f"no base-sized op recorded: {rec.calls}"
    for name, shapes, dtypes in base:
        assert all(d == dt for d in dtypes), f"{op}: base-sized {name}{shapes} ran with {dtypes}, expected {dt}"
    thin = [c for c in rec.calls if c not in base]
    assert any(torch.float32 in c[2] for c in thin), f"{op}: the LoRA term did not run in float32: {thin}"


class _RecordCasts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("_to_copy", "to", "copy_"):
            self.casts.append((tuple(args[0].shape), args[0].dtype, getattr(out, "dtype", None)))
        return out


@pytest.mark.parametrize("op", ["linear", "conv1d", "convt"])
def test_half_forward_does_not_round_trip_the_output_through_float32(op):
    fn, _, extra, (x, w, b), (a, bb) = _op_case(op, torch.bfloat16, torch.float32)
    with torch.no_grad():
        y_numel = fn(x, w, b, a, bb, 0.7, *extra, 0.0, None).numel()
        with _RecordCasts() as rec:
            fn(x, w, b, a, bb, 0.7, *extra, 0.0, None)
    ups = [c for c in rec.casts if math.prod(c[0]) == y_numel and c[1] == torch.bfloat16 and c[2] == torch.float32]
    assert not ups, f"{op}: the output was copied to float32: {ups}"


# ------------------------------------------------------------------ precision follows the base layer

_CUDA32 = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)


def _flags(matmul="none", cudnn_conv="none", cudnn="none", glob="none", legacy_mm=False, legacy_cudnn=True):
    return {
        "matmul": types.SimpleNamespace(fp32_precision=matmul, allow_tf32=legacy_mm),
        "cudnn": types.SimpleNamespace(
            conv=types.SimpleNamespace(fp32_precision=cudnn_conv), fp32_precision=cudnn, allow_tf32=legacy_cudnn
        ),
        "glob": glob,
    }


@pytest.mark.parametrize(
    "flags, want_linear, want_conv",
    [
        (_flags(cudnn_conv="tf32"), True, False),  # PyTorch's defaults: matmuls IEEE fp32, cuDNN convolutions TF32
        (_flags(matmul="tf32", cudnn_conv="tf32"), False, False),
        (_flags(cudnn_conv="ieee"), True, True),
        (_flags(legacy_mm=True), False, False),  # torch.set_float32_matmul_precision("high"), old flags only
        (_flags(legacy_cudnn=False), True, True),
        (_flags(glob="tf32"), False, False),
        (_flags(cudnn="ieee"), True, True),
    ],
    ids=["defaults", "matmul_tf32", "conv_ieee", "legacy_matmul", "legacy_cudnn_off", "global_tf32", "cudnn_ieee"],
)
def test_merged_weight_only_where_the_base_op_is_true_fp32(monkeypatch, flags, want_linear, want_conv):
    """Where PyTorch would run the base op in TF32 on CUDA, the torch backend runs it so too and keeps the
    LoRA term separate (the merged ``W + ΔW`` only for true fp32/fp64 maths). The settings are stand-ins here:
    the real ones are process-wide, and once their old and new forms are mixed, reads of the old raise."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", flags["matmul"])
    monkeypatch.setattr(torch.backends, "cudnn", flags["cudnn"])
    monkeypatch.setattr(torch.backends, "fp32_precision", flags["glob"], raising=False)
    assert tb._merge_ok(_CUDA32, 0.0, conv=False) is want_linear
    assert tb._merge_ok(_CUDA32, 0.0, conv=True) is want_conv
    assert tb._merge_ok(types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32), 0.0, conv=True)
    assert not tb._merge_ok(types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16), 0.0, conv=False)


@pytest.mark.subprocess
def test_tf32_settings_read_from_the_real_flags_in_a_fresh_process():
    """With the new-style settings in use (where reading the old flags raises), the check still answers."""
    probe = (
        "import types, torch\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "from rvclora.ops.backends.torch import _merge_ok\n"
        "x = types.SimpleNamespace(device=torch.device('cuda'), dtype=torch.float32)\n"
        "print(_merge_ok(x, 0.0, conv=False), _merge_ok(x, 0.0, conv=True))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().split("\n")[-1] == "False True", out.stdout
