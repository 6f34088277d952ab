"""Every backend available here against the oracle (rvclora.reference), through the public ops.

Option grids cover every option of each base layer; shapes are odd on purpose. Each op is run on
the backends that implement it (torch everywhere; triton for Linear and Conv1d; the cuda
extension's CPU twin for ConvTranspose1d); a backend that cannot run here is skipped with the
dispatcher's own reason.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from oracle import compare_with_oracle

from rvclora import ops
from rvclora import reference as ref
from rvclora.ops import dispatch

BACKEND_DTYPES = {
    "torch": (torch.float64, torch.float32, torch.bfloat16),
    "cpu": (torch.float64, torch.float32),  # other dtypes are declined: auto runs torch for them
    "triton": (torch.float32, torch.float16),
    "cuda": (torch.float64, torch.float32),
}
GRAD_ALL = ("x", "weight", "bias", "lora_A", "lora_B")


@pytest.fixture
def backend(request):
    name = request.param
    why = dispatch._unavailable(name)
    if why is not None:
        pytest.skip(f"backend {name} unavailable here: {why}")
    ops.set_backend(name)
    yield name
    ops.set_backend(None)


def _skip_unsupported(name, op, x, **params):
    why = dispatch.load_backend(name).unsupported_reason(op, x, **params)
    if why is not None:
        pytest.skip(f"backend {name} does not run {op}: {why}")


def _mask_for(name, shape, p, seed, dtype=torch.float64):
    if p == 0:
        return None
    return dispatch.load_backend(name).dropout_mask(seed, shape, p, torch.device("cpu"), dtype)


def _case_seed(case) -> int:
    # Python's str hash changes per process; crc32 gives each case the same inputs on every run.
    return zlib.crc32(repr(case).encode())


def _dtypes(name):
    return BACKEND_DTYPES[name]


def _skip_big_for_interpreted(name, *channels):
    # Triton's interpreter and the CUDA CPU twin are slow; their own test files cover large shapes.
    if name not in ("torch", "cpu") and channels[0] * channels[1] > 1000:
        pytest.skip(f"{name} runs interpreted here: large shapes are covered by tests/test_{name}_*.py")


# --------------------------------------------------------------------------- Linear

LINEAR_CASES = [
    # (lead shape, in, out, r, bias, dropout)
    ((5,), 7, 6, 3, True, 0.0),
    ((2, 3), 37, 131, 4, False, 0.0),
    ((1,), 16, 16, 1, True, 0.25),
    ((3, 1, 5), 9, 11, 8, True, 0.1),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_matches_oracle(backend, case):
    lead, fin, fout, r, has_bias, p = case
    _skip_big_for_interpreted(backend, fin, fout)
    torch.manual_seed(_case_seed(case))
    t = {
        "x": torch.randn(*lead, fin, dtype=torch.float64),
        "weight": torch.randn(fout, fin, dtype=torch.float64) / fin**0.5,
        "bias": torch.randn(fout, dtype=torch.float64) if has_bias else None,
        "lora_A": torch.randn(r, fin, dtype=torch.float64) / fin**0.5,
        "lora_B": torch.randn(fout, r, dtype=torch.float64),
    }
    seed = torch.tensor(1234)
    for dt in _dtypes(backend):
        _skip_unsupported(backend, "lora_linear", t["x"].to(dt), dropout_p=p)
        t["mask"] = _mask_for(backend, t["x"].shape, p, seed, dt)
        gnames = [n for n in GRAD_ALL if t[n] is not None]
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.7, p,
                                                                          seed),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_linear_ref(x, weight, bias, lora_A, lora_B, 1.7,
                                                                              mask),
            t, dt, gnames, f"{backend} linear {case} {dt}",
        )


# --------------------------------------------------------------------------- Conv1d

CONV_GRID = [
    # (cin, cout, k, stride, padding(l, r), dilation, groups, bias, padding_mode, r)
    (4, 6, 3, 1, (1, 1), 1, 1, True, "zeros", 2),
    (5, 7, 3, 2, (0, 0), 1, 1, False, "zeros", 3),
    (6, 4, 5, 1, (4, 4), 2, 2, True, "zeros", 2),
    (4, 4, 4, 1, (1, 2), 1, 1, True, "zeros", 4),  # 'same' with an even kernel: asymmetric
    (3, 5, 3, 3, (2, 2), 3, 1, True, "zeros", 1),
    (4, 6, 3, 1, (2, 1), 1, 2, True, "reflect", 2),
    (4, 4, 3, 2, (1, 1), 1, 1, False, "replicate", 2),
    (6, 6, 3, 1, (2, 2), 2, 3, True, "circular", 3),
    (37, 131, 7, 1, (3, 3), 1, 1, True, "zeros", 8),
    (1, 3, 1, 1, (0, 0), 1, 1, True, "zeros", 1),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"], indirect=True)
@pytest.mark.parametrize("case", CONV_GRID, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 2])  # batch 1 takes the torch backend's lean backward where it applies
def test_conv1d_matches_oracle(backend, case, p, n):
    cin, cout, k, stride, padding, dil, g, has_bias, mode, r = case
    _skip_big_for_interpreted(backend, cin, cout)
    torch.manual_seed(_case_seed(case) + n)
    t_len = 13
    t = {
        "x": torch.randn(n, cin, t_len, dtype=torch.float64),
        "weight": torch.randn(cout, cin // g, k, dtype=torch.float64) / (cin * k) ** 0.5,
        "bias": torch.randn(cout, dtype=torch.float64) if has_bias else None,
        "lora_A": torch.randn(r, cin // g * k, dtype=torch.float64) / (cin * k) ** 0.5,
        "lora_B": torch.randn(cout, r // g, dtype=torch.float64),
    }
    seed = torch.tensor(99)
    kw = dict(stride=stride, padding=padding, dilation=dil, groups=g, padding_mode=mode)
    for dt in _dtypes(backend):
        _skip_unsupported(backend, "lora_conv1d", t["x"].to(dt), dropout_p=p, **kw)
        t["mask"] = _mask_for(backend, t["x"].shape, p, seed, dt)
        gnames = [nm for nm in GRAD_ALL if t[nm] is not None]
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_conv1d(
                x, weight, bias, lora_A, lora_B, 0.9, dropout_p=p, seed=seed, **kw),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv1d_ref(
                x, weight, bias, lora_A, lora_B, 0.9, dropout_mask=mask, **kw),
            t, dt, gnames, f"{backend} conv1d {case} p={p} {dt}",
        )


# --------------------------------------------------------------------------- ConvTranspose1d

CONVT_GRID = [
    # (cin, cout, k, stride, padding, output_padding, dilation, groups, bias, r)
    (4, 6, 4, 2, 1, 0, 1, 1, True, 2),
    (5, 3, 16, 10, 3, 0, 1, 1, True, 4),  # RVC's first upsampler shape, scaled down
    (6, 4, 3, 3, 1, 2, 1, 2, False, 2),
    (4, 4, 3, 2, 0, 1, 2, 1, True, 1),
    (6, 9, 5, 1, 2, 0, 2, 3, True, 3),
    (37, 13, 4, 2, 1, 1, 1, 1, True, 8),
    (3, 1, 1, 1, 0, 0, 1, 1, False, 1),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("case", CONVT_GRID, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_conv_transpose1d_matches_oracle(backend, case, p):
    cin, cout, k, stride, padding, opad, dil, g, has_bias, r = case
    _skip_big_for_interpreted(backend, cin, cout)
    torch.manual_seed(_case_seed(case))
    n, t_len = 2, 7
    t = {
        "x": torch.randn(n, cin, t_len, dtype=torch.float64),
        "weight": torch.randn(cin, cout // g, k, dtype=torch.float64) / (cin * k) ** 0.5,
        "bias": torch.randn(cout, dtype=torch.float64) if has_bias else None,
        "lora_A": torch.randn(r, cin // g, dtype=torch.float64) / cin**0.5,
        "lora_B": torch.randn(r, cout // g * k, dtype=torch.float64),
    }
    seed = torch.tensor(7)
    kw = dict(stride=stride, padding=padding, output_padding=opad, dilation=dil, groups=g)
    for dt in _dtypes(backend):
        _skip_unsupported(backend, "lora_conv_transpose1d", t["x"].to(dt), dropout_p=p, **kw)
        t["mask"] = _mask_for(backend, t["x"].shape, p, seed, dt)
        gnames = [nm for nm in GRAD_ALL if t[nm] is not None]
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_conv_transpose1d(
                x, weight, bias, lora_A, lora_B, 1.3, dropout_p=p, seed=seed, **kw),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv_transpose1d_ref(
                x, weight, bias, lora_A, lora_B, 1.3, dropout_mask=mask, **kw),
            t, dt, gnames, f"{backend} convT {case} p={p} {dt}",
        )


# --------------------------------------------------------------------------- gradcheck, masks, opcheck


def test_torch_backend_gradcheck_float64():
    ops.set_backend("torch")
    try:
        torch.manual_seed(0)
        d = dict(dtype=torch.float64, requires_grad=True)
        x, w, b = torch.randn(3, 5, **d), torch.randn(4, 5, **d), torch.randn(4, **d)
        a, bb = torch.randn(2, 5, **d), torch.randn(4, 2, **d)
        seed = torch.tensor(5)
        assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(*t, 1.5, 0.3, seed), (x, w, b, a, bb))
        x = torch.randn(2, 4, 6, **d)
        w, a, bb = torch.randn(6, 2, 3, **d), torch.randn(2, 2 * 3, **d), torch.randn(6, 1, **d)
        b = torch.randn(6, **d)
        assert torch.autograd.gradcheck(
            lambda *t: ops.lora_conv1d(*t, 0.5, 2, (1, 2), 1, 2, "reflect", 0.3, seed), (x, w, b, a, bb))
        w, a, bb = torch.randn(4, 3, 4, **d), torch.randn(2, 4, **d), torch.randn(2, 3 * 4, **d)
        b = torch.randn(3, **d)
        assert torch.autograd.gradcheck(
            lambda *t: ops.lora_conv_transpose1d(*t, 0.5, 2, 1, 1, 1, 1, 0.3, seed), (x, w, b, a, bb))
    finally:
        ops.set_backend(None)


def test_dropout_mask_is_seeded_and_scaled():
    from rvclora.ops.torch_backend import dropout_mask

    s = torch.tensor(42)
    m1 = dropout_mask(s, (64, 64), 0.25, "cpu", torch.float32)
    m2 = dropout_mask(s, (64, 64), 0.25, "cpu", torch.float32)
    m3 = dropout_mask(torch.tensor(43), (64, 64), 0.25, "cpu", torch.float32)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    values = m1.unique().tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75) and len(values) == 2
    assert abs((m1 == 0).float().mean().item() - 0.25) < 0.03


def test_dropout_draws_fresh_masks_and_respects_manual_seed():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    a, b = torch.randn(2, 16), torch.randn(4, 2)
    torch.manual_seed(3)
    y1 = ops.lora_linear(x, w, None, a, b, 1.0, 0.5)
    y2 = ops.lora_linear(x, w, None, a, b, 1.0, 0.5)
    torch.manual_seed(3)
    y3 = ops.lora_linear(x, w, None, a, b, 1.0, 0.5)
    assert not torch.equal(y1, y2)
    assert torch.equal(y1, y3)


def test_backward_saves_only_x_u_and_parameters():
    """Autograd keeps x, u and the parameters (plus the seed) — no dropped copy of x, no N×out×T tensor."""
    ops.set_backend("torch")
    saved = []

    def pack(t):
        saved.append(t)
        return t

    try:
        x = torch.randn(2, 16, 50)
        w = torch.randn(16, 16, 3)
        a = torch.randn(4, 16 * 3, requires_grad=True)
        b = torch.randn(16, 4, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ops.lora_conv1d(x, w, None, a, b, 1.0, 1, (1, 1), 1, 1, "zeros", 0.5)
    finally:
        ops.set_backend(None)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    u = [t for t in saved if tuple(t.shape) == (2, 4, 50)]
    assert len(u) == 1


@pytest.mark.parametrize("name", ["linear", "conv1d", "conv_transpose1d"])
def test_opcheck_torch_custom_ops(name):
    from rvclora.ops import torch_backend as tb

    d = dict(dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    if name == "linear":
        args = (torch.randn(3, 5, **d), torch.randn(4, 5, **d), torch.randn(4, **d), torch.randn(2, 5, **d),
                torch.randn(4, 2, **d), 1.5, 0.2, seed)
        op = tb._linear_fwd
    elif name == "conv1d":
        args = (torch.randn(2, 4, 9, **d), torch.randn(6, 4, 3, **d), torch.randn(6, **d), torch.randn(2, 12, **d),
                torch.randn(6, 2, **d), 1.5, 1, [1, 1], 1, 1, "zeros", 0.0, None)
        op = tb._conv1d_fwd
    else:
        args = (torch.randn(2, 4, 5, **d), torch.randn(4, 3, 4, **d), torch.randn(3, **d), torch.randn(2, 4, **d),
                torch.randn(2, 12, **d), 1.5, 2, 1, 0, 1, 1, 0.0, None)
        op = tb._convt_fwd
    torch.library.opcheck(op, args)


def test_explicit_backend_that_cannot_run_raises():
    ops.set_backend("cuda")
    try:
        x = torch.randn(2, 4)
        if dispatch._unavailable("cuda") is None:
            with pytest.raises(dispatch.BackendUnavailableError, match="lora_linear"):
                ops.lora_linear(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
        else:
            with pytest.raises(dispatch.BackendUnavailableError, match="RVCLORA_BACKEND=cuda"):
                ops.lora_linear(x, torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
    finally:
        ops.set_backend(None)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ops.set_backend("cudnn")


def test_auto_on_cpu_uses_the_compiled_backend_else_torch():
    expected = "cpu" if dispatch._unavailable("cpu") is None else "torch"
    assert dispatch.select_backend("lora_linear", torch.randn(2, 2)).NAME == expected
    assert dispatch.select_backend("lora_linear", torch.randn(2, 2).bfloat16()).NAME == "torch"


@pytest.mark.parametrize("combo", list(itertools.product([1, 2], [0, 3])))
def test_merged_path_used_only_for_fp32_without_dropout(combo):
    from rvclora.ops.torch_backend import _merge_ok

    _, p = combo
    x = torch.randn(2, 2)
    assert _merge_ok(x, p / 10, conv=False) == (p == 0)
    assert not _merge_ok(x.bfloat16(), 0.0, conv=True)
