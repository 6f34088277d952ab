"""The fused Triton kernels (``rvclora.kernels``, the ``triton`` backend) against the oracle.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by ``tests/conftest.py`` before Triton is imported); with a GPU they run on CUDA tensors.
Every call goes through the public ops (``rvclora.ops.lora_linear`` / ``lora_conv1d``) with the
backend forced to ``triton``.

Tolerances (docs/verification.md, tests/oracle.py): the candidate's max error against a float64 oracle must stay within
2 × the error of plain PyTorch doing the same maths in the candidate's dtype, plus one ulp of
the largest reference value. bf16 is not run in the interpreter (numpy has no bf16, the
interpreter's bf16 results are garbage; the backend refuses it there): the dtype-generic code
paths bf16 would take are the fp16 ones tested here, and bf16 itself is compiled for sm_80/sm_90
by ``rvclora/checks/triton_compile.py``.

Every ``torch.empty`` during a kernel test returns NaN-filled memory, so an output element a
kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from oracle import assert_close_to_oracle  # noqa: E402

import rvclora.ops as rops  # noqa: E402
from rvclora import reference as ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA device or TRITON_INTERPRET=1 (set by tests/conftest.py on GPU-less machines)",
        allow_module_level=True,
    )

backend = pytest.importorskip("rvclora.ops.backends.triton")
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Force the triton backend and poison every fresh ``torch.empty`` with NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    rops.set_backend("triton")
    yield
    rops.set_backend(None)


def _grads(out, grad_out, tensors):
    out.backward(grad_out)
    return [t.grad for t in tensors if t is not None and t.requires_grad]


def _copies(tensors, dtype, factor_dtype=None):
    """Detached copies (same ``requires_grad``) in ``dtype``; LoRA factors (index 3, 4) in ``factor_dtype``."""
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        dt = factor_dtype if (factor_dtype is not None and i >= 3) else dtype
        out.append(t.detach().to(dt).requires_grad_(t.requires_grad))
    return out


def _assert_close(name, cand, ref64, torch_same):
    """The shared oracle tolerance (tests/oracle.py), with the eps of the compared dtype as its floor."""
    eps = torch.finfo(torch_same.dtype if torch_same.dtype != torch.float64 else torch.float32).eps
    assert_close_to_oracle(cand, ref64, torch_same, name, tiny=eps)


def _compare(run_candidate, run_reference, tensors, dropout_mask, dtype, factor_dtype=None):
    """Outputs and gradients of the candidate vs float64 oracle, with the same-dtype torch tolerance."""
    y = run_candidate(*tensors)
    assert y.dtype == tensors[0].dtype
    g = torch.randn_like(y)
    cand_grads = _grads(y, g, tensors)

    t64 = _copies(tensors, torch.float64)
    mask64 = None if dropout_mask is None else dropout_mask.double()
    y64 = run_reference(*t64, mask64)
    ref_grads = _grads(y64, g.double(), t64)

    # plain PyTorch in the candidate's dtype; factors rounded to it as autocast would
    ts = _copies(tensors, dtype, dtype)
    mask_s = None if dropout_mask is None else dropout_mask.to(dtype)
    ys = run_reference(*ts, mask_s)
    torch_grads = _grads(ys, g.to(dtype), ts)

    _assert_close("y", y.detach(), y64.detach(), ys.detach())
    wanted = [
        (n, t)
        for n, t in zip(("grad_x", "grad_W", "grad_b", "grad_A", "grad_B"), tensors)
        if t is not None and t.requires_grad
    ]
    assert len(cand_grads) == len(wanted)
    for (name, t), c, r, s in zip(wanted, cand_grads, ref_grads, torch_grads):
        assert c.dtype == t.dtype, f"{name} has dtype {c.dtype}, expected {t.dtype}"
        _assert_close(name, c, r, s)


def _seed(p):
    return None if p == 0 else torch.randint(0, 2**62, (), dtype=torch.int64)


def _mask(seed, x, p):
    return None if p == 0 else backend.dropout_mask(seed, x.shape, p, x.device, torch.float32)


def _linear_tensors(lead, k, o, r, dtype, factor_dtype=None, bias=True, base_grad=False):
    factor_dtype = factor_dtype or dtype
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(o, k, device=DEVICE, dtype=dtype) / k**0.5).requires_grad_(base_grad)
    b = torch.randn(o, device=DEVICE, dtype=dtype).requires_grad_(base_grad) if bias else None
    a = (torch.randn(r, k, device=DEVICE, dtype=factor_dtype) / k**0.5).requires_grad_()
    bb = torch.randn(o, r, device=DEVICE, dtype=factor_dtype).requires_grad_()
    return [x, w, b, a, bb]


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_linear_matches_oracle(dtype, p):
    torch.manual_seed(1)
    # 38 rows, in=45, out=70: several 32-wide tiles with ragged edges; base requires grad when dropping
    tensors = _linear_tensors((2, 19), 45, 70, 8, dtype, base_grad=p > 0)
    seed = _seed(p)
    mask = _mask(seed, tensors[0], p)

    def cand(x, w, b, a, bb):
        return rops.lora_linear(x, w, b, a, bb, 0.5, p, seed)

    def oracle(x, w, b, a, bb, m):
        return ref.lora_linear_ref(x, w, b, a, bb, 0.5, m)

    _compare(cand, oracle, tensors, mask, dtype)


def test_linear_below_one_tile_no_bias():
    torch.manual_seed(2)
    tensors = _linear_tensors((1,), 5, 3, 1, torch.float32, bias=False, base_grad=True)
    _compare(
        lambda *t: rops.lora_linear(*t, 2.0),
        lambda *t: ref.lora_linear_ref(*t[:5], 2.0, t[5]),
        tensors,
        None,
        torch.float32,
    )


def test_linear_non_contiguous_input_and_factors():
    torch.manual_seed(3)
    x_big = torch.randn(3, 40, 17, device=DEVICE)
    x = x_big.transpose(1, 2)[:, ::2, 1:38].detach().requires_grad_()  # (3, 9, 37), no unit stride
    assert not x.is_contiguous()
    w = torch.randn(37, 33, device=DEVICE).t()  # column-major (33, 37) weight
    a = torch.randn(37, 4, device=DEVICE).t().requires_grad_()  # (4, 37) transposed view
    bb = torch.randn(33, 4, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE)
    p = 0.25
    seed = _seed(p)
    mask = _mask(seed, x, p)
    _compare(
        lambda *t: rops.lora_linear(*t, 1.5, p, seed),
        lambda *t: ref.lora_linear_ref(*t[:5], 1.5, t[5]),
        [x, w, b, a, bb],
        mask,
        torch.float32,
    )


def test_linear_mixed_precision_fp32_factors():
    torch.manual_seed(4)
    tensors = _linear_tensors((37,), 45, 40, 8, torch.float16, factor_dtype=torch.float32, base_grad=True)
    _compare(
        lambda *t: rops.lora_linear(*t, 0.5),
        lambda *t: ref.lora_linear_ref(*t[:5], 0.5, t[5]),
        tensors,
        None,
        torch.float16,
    )


# --------------------------------------------------------------------------- Conv1d

# (stride, (pad_left, pad_right), dilation, groups, padding_mode, kernel_size, bias, dropout, base_grad)
CONV_CASES = [
    (1, (1, 1), 1, 1, "zeros", 3, True, 0.0, True),
    (2, (2, 1), 2, 2, "zeros", 3, True, 0.25, False),
    (3, (0, 2), 1, 1, "reflect", 3, False, 0.25, True),
    (2, (3, 1), 2, 2, "replicate", 3, True, 0.0, False),
    (1, (2, 3), 1, 2, "circular", 5, True, 0.25, True),
    (1, (0, 0), 3, 1, "zeros", 3, False, 0.0, False),
    (1, (0, 0), 1, 1, "zeros", 1, True, 0.25, False),
    (1, (1, 0), 1, 4, "zeros", 2, True, 0.0, True),
]


def _conv_tensors(n, c, t, o, r, k, groups, dtype, bias, base_grad):
    x = torch.randn(n, c, t, device=DEVICE, dtype=dtype, requires_grad=True)
    fan = c // groups * k
    w = (torch.randn(o, c // groups, k, device=DEVICE, dtype=dtype) / fan**0.5).requires_grad_(base_grad)
    b = torch.randn(o, device=DEVICE, dtype=dtype).requires_grad_(base_grad) if bias else None
    a = (torch.randn(r, fan, device=DEVICE, dtype=dtype) / fan**0.5).requires_grad_()
    bb = torch.randn(o, r // groups, device=DEVICE, dtype=dtype).requires_grad_()
    return [x, w, b, a, bb]


def _run_conv_case(case, dtype, n=2, c=12, t=31, o=40, r=4, x_transform=None):
    stride, padding, dilation, groups, mode, k, bias, p, base_grad = case
    tensors = _conv_tensors(n, c, t, o, r, k, groups, dtype, bias, base_grad)
    if x_transform is not None:
        tensors[0] = x_transform(tensors[0].detach()).requires_grad_()
    seed = _seed(p)
    mask = _mask(seed, tensors[0], p)

    def cand(x, w, b, a, bb):
        return rops.lora_conv1d(x, w, b, a, bb, 0.5, stride, padding, dilation, groups, mode, p, seed)

    def oracle(x, w, b, a, bb, m):
        return ref.lora_conv1d_ref(x, w, b, a, bb, 0.5, stride, padding, dilation, groups, mode, m)

    _compare(cand, oracle, tensors, mask, dtype)


@pytest.mark.parametrize(
    "case",
    CONV_CASES,
    ids=[
        f"s{c[0]}-p{c[1][0]}{c[1][1]}-d{c[2]}-g{c[3]}-{c[4]}-k{c[5]}"
        f"{'' if c[6] else '-nobias'}{'-drop' if c[7] else ''}"
        for c in CONV_CASES
    ],
)
def test_conv1d_matches_oracle_fp32(case):
    torch.manual_seed(5)
    _run_conv_case(case, torch.float32)


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2]], ids=["zeros-g2-drop", "reflect-s3-drop"])
def test_conv1d_matches_oracle_fp16(case):
    torch.manual_seed(6)
    _run_conv_case(case, torch.float16)


def test_conv1d_non_contiguous_and_tiny():
    torch.manual_seed(7)
    # x as a transposed (N, T, C) buffer: channel stride 1, time stride C
    _run_conv_case(
        (2, (1, 2), 1, 1, "zeros", 3, True, 0.25, True),
        torch.float32,
        x_transform=lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    )
    # smaller than one tile in every dimension, batch 1
    _run_conv_case((1, (1, 1), 1, 1, "reflect", 3, True, 0.0, True), torch.float32, n=1, c=3, t=5, o=2, r=1)


# --------------------------------------------------------------------------- dropout, dispatch, tracing


def test_dropout_mask_is_a_function_of_the_seed():
    shape = (3, 7, 50)
    s1, s2 = torch.tensor(123, dtype=torch.int64), torch.tensor(124, dtype=torch.int64)
    m1 = backend.dropout_mask(s1, shape, 0.3, DEVICE, torch.float32)
    assert torch.equal(m1, backend.dropout_mask(s1, shape, 0.3, DEVICE, torch.float32))
    assert not torch.equal(m1, backend.dropout_mask(s2, shape, 0.3, DEVICE, torch.float32))
    values = set(m1.unique().tolist())
    assert values == {0.0, torch.tensor(1 / 0.7, dtype=torch.float32).item()}
    kept = (m1 > 0).double().mean().item()
    assert abs(kept - 0.7) < 0.05, kept  # 1050 Bernoulli draws: 5 standard deviations is 0.07


def test_same_seed_same_output_through_forward_and_backward():
    torch.manual_seed(8)
    x, w, b, a, bb = _linear_tensors((33,), 20, 24, 4, torch.float32)
    seed = torch.tensor(77, dtype=torch.int64)
    y1 = rops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed)
    y1.sum().backward()
    ga = a.grad.clone()
    a.grad = None
    y2 = rops.lora_linear(x, w, b, a, bb, 1.0, 0.5, seed)
    y2.sum().backward()
    assert torch.equal(y1, y2) and torch.equal(ga, a.grad)
    y3 = rops.lora_linear(x, w, b, a, bb, 1.0, 0.5, torch.tensor(78, dtype=torch.int64))
    assert not torch.equal(y1, y3)


def test_conv_transpose1d_is_refused_with_a_reason():
    x = torch.randn(1, 4, 8, device=DEVICE)
    w, a, bb = torch.randn(4, 2, 3, device=DEVICE), torch.randn(2, 4, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    assert "ConvTranspose1d" in backend.unsupported_reason("lora_conv_transpose1d", x)
    with pytest.raises(rops.BackendUnavailableError, match="ConvTranspose1d"):
        rops.lora_conv_transpose1d(x, w, None, a, bb, 1.0)


def test_unsupported_inputs_have_reasons(monkeypatch):
    x = torch.randn(4, 8, device=DEVICE)
    assert backend.unsupported_reason("lora_linear", x) is None
    assert "float64" in backend.unsupported_reason("lora_linear", x.double())
    rank_too_big = torch.randn(65, 8, device=DEVICE)
    assert "rank" in backend.unsupported_reason("lora_linear", x, lora_A=rank_too_big)
    if INTERPRET:
        assert "bfloat16" in backend.unsupported_reason("lora_linear", x.bfloat16())
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "CUDA" in backend.unsupported_reason("lora_linear", x)
        if not torch.cuda.is_available():
            assert "CUDA" in backend.unavailable_reason()
            rops.set_backend("triton")
            with pytest.raises(rops.BackendUnavailableError, match="CUDA"):
                rops.lora_linear(x, torch.randn(3, 8), None, torch.randn(2, 8), torch.randn(3, 2), 1.0)


def test_auto_mode_rule_prefers_torch_for_tiny_row_counts():
    w = torch.empty(16, 8)
    assert not backend.prefer("lora_linear", torch.empty(2, 8), weight=w)
    assert backend.prefer("lora_linear", torch.empty(4, 16, 8), weight=w)
    wc = torch.empty(16, 8, 3)
    assert not backend.prefer("lora_conv1d", torch.empty(1, 8, 20), weight=wc, padding=(1, 1))
    assert backend.prefer("lora_conv1d", torch.empty(2, 8, 40), weight=wc, padding=(1, 1))


def test_torch_compile_fullgraph_traces_the_ops():
    if INTERPRET:
        pytest.skip(
            "under TRITON_INTERPRET, Dynamo's fake-tensor pass runs wrap_triton's interpreted kernel on fake "
            "tensors (no data pointer); this test needs a CUDA device"
        )
    torch.manual_seed(9)
    x, w, b, a, bb = _linear_tensors((2, 17), 20, 24, 4, torch.float32)
    seed = torch.tensor(5, dtype=torch.int64)

    def f(x, w, b, a, bb):
        y = rops.lora_linear(x, w, b, a, bb, 0.5, 0.25, seed)
        ones = torch.ones(3, 24, 2, device=DEVICE), torch.ones(2, 48, device=DEVICE), torch.ones(3, 2, device=DEVICE)
        return rops.lora_conv1d(y.transpose(1, 2), ones[0], None, ones[1], ones[2], 0.5, 1, (1, 0), 1, 1, "zeros")

    eager = f(x, w, b, a, bb)
    eager.sum().backward()
    ga = a.grad.clone()
    a.grad = None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b, a, bb)
    compiled.sum().backward()
    assert torch.equal(eager, compiled) and torch.equal(ga, a.grad)
