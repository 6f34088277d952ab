"""Every backend available here against the oracle (rvclora.reference), through the public ops.

Option grids cover every option of each base layer; shapes are odd on purpose. Each op is run on
the backends that implement it (torch everywhere; triton for Linear and Conv1d; the cuda
extension's CPU twin for ConvTranspose1d); a backend that cannot run here is skipped with the
dispatcher's own reason.

The matrix every backend runs (``BACKEND_DTYPES`` is the one table to extend with a new backend):
each dtype it computes in; autocast-style mixes (activations, weight and bias in a dtype other
than float32, LoRA factors in float32, as the layers hand them over under ``torch.autocast``);
dropout on and off; batch 1 and more. On a machine without a GPU the triton backend runs through
Triton's interpreter (which computes bfloat16 wrongly, numpy having no bfloat16: its half path is
tested in float16) and the cuda backend through its CPU twin (float64 and float32).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from oracle import assert_close_to_oracle, compare_with_oracle, grads

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
# Ops a backend does not implement at all (it declines them in unsupported_reason); every other
# (backend, op) pair of BACKEND_DTYPES runs the whole matrix.
NOT_IMPLEMENTED = {"lora_linear": {"cuda"}, "lora_conv1d": {"cuda"}, "lora_conv_transpose1d": {"triton"}}


def _backends_for(op):
    return [name for name in BACKEND_DTYPES if name not in NOT_IMPLEMENTED[op]]


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


@pytest.mark.parametrize("backend", _backends_for("lora_linear"), indirect=True)
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
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_linear(
                x, weight, bias, lora_A, lora_B, 1.7, p, seed
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_linear_ref(
                x, weight, bias, lora_A, lora_B, 1.7, mask
            ),
            t,
            dt,
            gnames,
            f"{backend} linear {case} {dt}",
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


@pytest.mark.parametrize("backend", _backends_for("lora_conv1d"), indirect=True)
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
                x, weight, bias, lora_A, lora_B, 0.9, dropout_p=p, seed=seed, **kw
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv1d_ref(
                x, weight, bias, lora_A, lora_B, 0.9, dropout_mask=mask, **kw
            ),
            t,
            dt,
            gnames,
            f"{backend} conv1d {case} p={p} {dt}",
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


@pytest.mark.parametrize("backend", _backends_for("lora_conv_transpose1d"), indirect=True)
@pytest.mark.parametrize("case", CONVT_GRID, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("n", [1, 2])
def test_conv_transpose1d_matches_oracle(backend, case, p, n):
    cin, cout, k, stride, padding, opad, dil, g, has_bias, r = case
    _skip_big_for_interpreted(backend, cin, cout)
    torch.manual_seed(_case_seed(case) + n)
    t_len = 7
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
                x, weight, bias, lora_A, lora_B, 1.3, dropout_p=p, seed=seed, **kw
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv_transpose1d_ref(
                x, weight, bias, lora_A, lora_B, 1.3, dropout_mask=mask, **kw
            ),
            t,
            dt,
            gnames,
            f"{backend} convT {case} p={p} {dt}",
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
            lambda *t: ops.lora_conv1d(*t, 0.5, 2, (1, 2), 1, 2, "reflect", 0.3, seed), (x, w, b, a, bb)
        )
        w, a, bb = torch.randn(4, 3, 4, **d), torch.randn(2, 4, **d), torch.randn(2, 3 * 4, **d)
        b = torch.randn(3, **d)
        assert torch.autograd.gradcheck(
            lambda *t: ops.lora_conv_transpose1d(*t, 0.5, 2, 1, 1, 1, 1, 0.3, seed), (x, w, b, a, bb)
        )
    finally:
        ops.set_backend(None)


def test_dropout_mask_is_seeded_and_scaled():
    from rvclora.ops.backends.torch import dropout_mask

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
    from rvclora.ops.backends import torch as tb

    d = dict(dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(11)
    if name == "linear":
        args = (
            torch.randn(3, 5, **d),
            torch.randn(4, 5, **d),
            torch.randn(4, **d),
            torch.randn(2, 5, **d),
            torch.randn(4, 2, **d),
            1.5,
            0.2,
            seed,
        )
        op = tb._linear_fwd
    elif name == "conv1d":
        args = (
            torch.randn(2, 4, 9, **d),
            torch.randn(6, 4, 3, **d),
            torch.randn(6, **d),
            torch.randn(2, 12, **d),
            torch.randn(6, 2, **d),
            1.5,
            1,
            [1, 1],
            1,
            1,
            "zeros",
            0.0,
            None,
        )
        op = tb._conv1d_fwd
    else:
        args = (
            torch.randn(2, 4, 5, **d),
            torch.randn(4, 3, 4, **d),
            torch.randn(3, **d),
            torch.randn(2, 4, **d),
            torch.randn(2, 12, **d),
            1.5,
            2,
            1,
            0,
            1,
            1,
            0.0,
            None,
        )
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


def test_auto_on_cpu_runs_the_compiled_backend_where_it_can():
    # float32/float64 run the compiled cpu backend when it is built (it measured cheaper than the
    # torch path: README, "Measured CPU cost"); what it declines (bfloat16, CPU autocast) and a machine
    # without a compiler run the torch path
    want = "torch" if dispatch._unavailable("cpu") is not None else "cpu"
    assert dispatch.select_backend("lora_linear", torch.randn(2, 2)).NAME == want
    assert dispatch.select_backend("lora_conv1d", torch.randn(1, 2, 4).double()).NAME == want
    assert dispatch.select_backend("lora_linear", torch.randn(2, 2).bfloat16()).NAME == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dispatch.select_backend("lora_linear", torch.randn(2, 2)).NAME == "torch"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("conv", [False, True])
def test_merged_path_used_only_for_fp32_without_dropout(dtype, p, conv):
    from rvclora.ops.backends.torch import _merge_ok

    x = torch.randn(2, 2, dtype=dtype)
    assert _merge_ok(x, p, conv=conv) == (p == 0.0 and dtype in (torch.float32, torch.float64))


# --------------------------------------------------------------------------- mixed dtypes (autocast)


def _mixes(name):
    """(activation dtype, factor dtype) pairs: each non-fp32 dtype of the backend with fp32 factors."""
    return [(dt, torch.float32) for dt in _dtypes(name) if dt != torch.float32]


def _compare_mixed(run, oracle, tensors, act, fac, label):
    """``run`` with x/W/b in ``act`` and the factors in ``fac`` against the float64 oracle.

    The tolerance is that of plain PyTorch computing everything in ``act`` (factors rounded to
    ``act`` too, as a tile cast does); gradients must come back in each input's own dtype.
    """
    factor_names = ("lora_A", "lora_B")
    dtype_of = {k: (fac if k in factor_names else act) for k in tensors}
    rounded = {
        k: (v.to(dtype_of[k]).double() if v is not None and v.is_floating_point() else v) for k, v in tensors.items()
    }

    def copies(cast):
        out = {}
        for k, v in rounded.items():
            if v is None or not v.is_floating_point():
                out[k] = v
                continue
            c = v.to(cast(k)).clone()
            out[k] = c.requires_grad_(True) if k in GRAD_ALL else c
        return out

    c64 = copies(lambda k: torch.float64)
    cdt = copies(lambda k: act)
    cand = copies(lambda k: dtype_of[k])
    y64, ydt, y = oracle(**c64), oracle(**cdt), run(**cand)
    assert y.dtype == act, f"{label}: output dtype {y.dtype}, expected {act}"
    tiny = {torch.float64: 1e-12, torch.float32: 1e-6}.get(act, 1e-3)
    assert_close_to_oracle(y, y64, ydt, f"{label} forward", tiny)
    names = [n for n in GRAD_ALL if cand.get(n) is not None]
    g = torch.randn_like(y64).to(act).double()
    g64 = grads(y64, [c64[n] for n in names], g)
    gdt = grads(ydt, [cdt[n] for n in names], g.to(act))
    gc = grads(y, [cand[n] for n in names], g.to(act))
    for n, a, b, c in zip(names, gc, g64, gdt):
        assert a is not None, f"{label}: no gradient for {n}"
        assert a.dtype == cand[n].dtype, f"{label}: grad {n} dtype {a.dtype}, expected {cand[n].dtype}"
        # plain torch's gradient, as stored in the input's own dtype (fp32 factors round an fp64 result)
        assert_close_to_oracle(a, b, c.to(a.dtype), f"{label} grad_{n}", tiny)


def _mixed_params():
    out = []
    for op in NOT_IMPLEMENTED:
        for name in _backends_for(op):
            for act, fac in _mixes(name):
                for n, p in ((1, 0.0), (1, 0.25), (3, 0.0), (3, 0.25)):
                    out.append(
                        pytest.param(
                            name, op, act, fac, n, p, id=f"{name}-{op}-{str(act)[6:]}x-{str(fac)[6:]}AB-n{n}-p{p}"
                        )
                    )
    return out


@pytest.mark.parametrize(("backend", "op", "act", "fac", "n", "p"), _mixed_params(), indirect=["backend"])
def test_factor_dtype_differs_from_x(backend, op, act, fac, n, p):
    """Autocast hands a layer half x/W/b and fp32 factors: every backend computes it or declines cleanly."""
    torch.manual_seed(_case_seed((backend, op, str(act), n, p)))
    seed = torch.tensor(321)
    if op == "lora_linear":
        cin, cout, r = 9, 11, 4
        t = {
            "x": torch.randn(n, 2, cin, dtype=torch.float64),
            "weight": torch.randn(cout, cin, dtype=torch.float64),
            "bias": torch.randn(cout, dtype=torch.float64),
            "lora_A": torch.randn(r, cin, dtype=torch.float64),
            "lora_B": torch.randn(cout, r, dtype=torch.float64),
        }
        kw = {}
    elif op == "lora_conv1d":
        cin, cout, k, r = 4, 6, 3, 2
        t = {
            "x": torch.randn(n, cin, 11, dtype=torch.float64),
            "weight": torch.randn(cout, cin // 2, k, dtype=torch.float64),
            "bias": torch.randn(cout, dtype=torch.float64),
            "lora_A": torch.randn(r, cin // 2 * k, dtype=torch.float64),
            "lora_B": torch.randn(cout, r // 2, dtype=torch.float64),
        }
        kw = dict(stride=2, padding=(2, 1), dilation=1, groups=2, padding_mode="reflect")
    else:
        cin, cout, k, r = 4, 6, 4, 2
        t = {
            "x": torch.randn(n, cin, 7, dtype=torch.float64),
            "weight": torch.randn(cin, cout, k, dtype=torch.float64),
            "bias": torch.randn(cout, dtype=torch.float64),
            "lora_A": torch.randn(r, cin, dtype=torch.float64),
            "lora_B": torch.randn(r, cout * k, dtype=torch.float64),
        }
        kw = dict(stride=2, padding=1, output_padding=1, dilation=1, groups=1)
    x_act = t["x"].to(act)
    params = {k_: v for k_, v in kw.items() if k_ != "padding_mode" or op == "lora_conv1d"}
    why = dispatch.load_backend(backend).unsupported_reason(
        op, x_act, weight=t["weight"].to(act), lora_A=t["lora_A"].to(fac), dropout_p=p, **params
    )
    if why is not None:
        # declining is allowed, but then auto must run the call without raising
        ops.set_backend(None)
        y = getattr(ops, op)(
            x_act,
            t["weight"].to(act),
            t["bias"].to(act),
            t["lora_A"].to(fac),
            t["lora_B"].to(fac),
            0.7,
            dropout_p=p,
            seed=seed,
            **kw,
        )
        assert y.dtype == act
        pytest.skip(f"backend {backend} declines {op} with {act} x and {fac} factors: {why}")
    mask = (
        None
        if p == 0
        else dispatch.load_backend(backend).dropout_mask(seed, t["x"].shape, p, torch.device("cpu"), torch.float64)
    )
    oracle = {
        "lora_linear": ref.lora_linear_ref,
        "lora_conv1d": ref.lora_conv1d_ref,
        "lora_conv_transpose1d": ref.lora_conv_transpose1d_ref,
    }[op]
    _compare_mixed(
        lambda x, weight, bias, lora_A, lora_B: getattr(ops, op)(
            x, weight, bias, lora_A, lora_B, 0.7, dropout_p=p, seed=seed, **kw
        ),
        lambda x, weight, bias, lora_A, lora_B: oracle(
            x, weight, bias, lora_A, lora_B, 0.7, dropout_mask=None if mask is None else mask.to(x.dtype), **kw
        ),
        t,
        act,
        fac,
        f"{backend} {op} {act} x, {fac} factors, n={n}, p={p}",
    )


# --------------------------------------------------------------------------- the shared sample table


def _spec_sample_cases():
    from rvclora.ops.spec import SPECS

    dtypes = {"reference": (torch.float64,), "torch": BACKEND_DTYPES["torch"], "cpu": BACKEND_DTYPES["cpu"]}
    for op, spec in SPECS.items():
        for i, sample in enumerate(spec.samples):
            for name, dts in dtypes.items():
                yield pytest.param(name, op, i, dts, id=f"{name}-{op}-{sample.label}")


@pytest.mark.parametrize("backend, op, index, dtypes", list(_spec_sample_cases()))
def test_spec_samples_match_oracle(backend, op, index, dtypes):
    """Every sample of rvclora.ops.spec's table, through the public op, on every CPU backend that has the op."""
    from rvclora.ops.spec import SPECS, sample_tensors

    why = dispatch._unavailable(backend)
    if why is not None:
        pytest.skip(f"backend {backend} unavailable here: {why}")
    spec = SPECS[op]
    sample = spec.samples[index]
    t = sample_tensors(spec, sample, seed=_case_seed((op, sample.label)))
    seed = torch.tensor(4321)
    gnames = [n for n in GRAD_ALL if t[n] is not None]
    ops.set_backend(backend)
    try:
        for dt in dtypes:
            why = dispatch.unsupported(
                backend,
                op,
                t["x"].to(dt),
                weight=t["weight"].to(dt),
                lora_A=t["lora_A"],
                dropout_p=sample.dropout_p,
                **spec.full_options(sample.options),
            )
            if why is not None:
                assert backend != "torch" and backend != "reference", f"{backend} must run every op: {why}"
                continue  # declined (another op's backend, or a dtype it does not compute in): auto runs torch
            t["mask"] = _mask_for(backend, t["x"].shape, sample.dropout_p, seed, dt)
            compare_with_oracle(
                lambda x, weight, bias, lora_A, lora_B, mask: getattr(ops, op)(
                    x, weight, bias, lora_A, lora_B, 1.3, dropout_p=sample.dropout_p, seed=seed, **sample.options
                ),
                lambda x, weight, bias, lora_A, lora_B, mask: spec.run_reference(
                    x, weight, bias, lora_A, lora_B, 1.3, sample.options, mask
                ),
                t,
                dt,
                gnames,
                f"{backend} {op} {sample.label} {dt}",
            )
    finally:
        ops.set_backend(None)
