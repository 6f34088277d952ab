"""The compiled ``cpu`` backend beyond the oracle matrix of test_ops.py: ``torch.library.opcheck`` on
every op (batch 1, dropout on, each dtype), the drop-in layout of outputs and gradients, its dropout
mask, and how ``auto`` falls back to the torch backend for what it declines."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rvclora import LoRAConv1d, LoRAConvTranspose1d, LoRALinear, ops
from rvclora.ops import dispatch

_WHY = dispatch._unavailable("cpu")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend unavailable here: {_WHY}")


@pytest.fixture
def cpu_backend():
    ops.set_backend("cpu")
    yield dispatch.load_backend("cpu")
    ops.set_backend(None)


def _op_args(name, n, dtype, p):
    d = dict(dtype=dtype, requires_grad=True)
    seed = torch.tensor(11) if p else None
    if name == "linear":
        return (
            torch.randn(n, 3, 5, **d),
            torch.randn(4, 5, **d),
            torch.randn(4, **d),
            torch.randn(2, 5, **d),
            torch.randn(4, 2, **d),
            1.5,
            p,
            seed,
        )
    if name == "conv1d":
        return (
            torch.randn(n, 4, 9, **d),
            torch.randn(6, 2, 3, **d),
            torch.randn(6, **d),
            torch.randn(2, 6, **d),
            torch.randn(6, 1, **d),
            1.5,
            1,
            [1, 2],
            2,
            2,
            "reflect",
            p,
            seed,
        )
    return (
        torch.randn(n, 4, 5, **d),
        torch.randn(4, 3, 4, **d),
        torch.randn(3, **d),
        torch.randn(2, 4, **d),
        torch.randn(2, 12, **d),
        1.5,
        2,
        1,
        1,
        1,
        1,
        p,
        seed,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("name", ["linear", "conv1d", "convt"])
def test_opcheck(cpu_backend, name, n, p, dtype):
    torch.manual_seed(0)
    args = _op_args(name, n, dtype, p)
    op = {"linear": "linear", "conv1d": "conv1d", "convt": "conv_transpose1d"}[name]
    fwd = getattr(torch.ops.rvclora, f"cpu_lora_{op}_fwd")
    torch.library.opcheck(fwd.default, args)
    x, w, _b, a, bb = args[:5]
    y, u = fwd(*args)
    needs = [True, True, True, True, True]
    bwd = getattr(torch.ops.rvclora, f"cpu_lora_{op}_bwd").default
    torch.library.opcheck(
        bwd,
        (torch.randn_like(y), x.detach(), u, w.detach(), a.detach(), bb.detach(), *args[5:], needs),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("n", [0, 1, 3])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "convt"])
def test_layout_matches_base_layer(cpu_backend, kind, n):
    torch.manual_seed(1)
    if kind == "linear":
        base, cls, x = nn.Linear(12, 10), LoRALinear, torch.randn(n, 7, 12)
    elif kind == "conv1d":
        base, cls, x = nn.Conv1d(8, 6, 3, padding=2, dilation=2), LoRAConv1d, torch.randn(n, 8, 20)
    else:
        base, cls, x = nn.ConvTranspose1d(8, 6, 4, 2, padding=1), LoRAConvTranspose1d, torch.randn(n, 8, 20)
    lora = cls.from_base(base, r=4, lora_alpha=8)
    nn.init.normal_(lora.lora_B)
    for xin in (x, x.transpose(-1, -2).contiguous().transpose(-1, -2)):
        xin = xin.detach().requires_grad_(True)
        y, yb = lora(xin), base(xin)
        assert y.shape == yb.shape and y.dtype == yb.dtype
        assert all(s == sb for s, sb, d in zip(y.stride(), yb.stride(), y.shape) if d > 1), (y.stride(), yb.stride())
        if n:
            y.sum().backward()
            assert xin.grad.stride() == xin.stride() or not xin.is_contiguous()
            assert lora.lora_A.grad.shape == lora.lora_A.shape


def test_dropout_mask_is_seeded_and_scaled(cpu_backend):
    s = torch.tensor(42)
    m1 = cpu_backend.dropout_mask(s, (64, 64), 0.25, "cpu", torch.float32)
    m2 = cpu_backend.dropout_mask(s, (64, 64), 0.25, "cpu", torch.float32)
    m3 = cpu_backend.dropout_mask(torch.tensor(43), (64, 64), 0.25, "cpu", torch.float32)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    values = m1.unique().tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75) and len(values) == 2
    assert abs((m1 == 0).float().mean().item() - 0.25) < 0.03


def test_declines_half_and_mixed_factors_so_auto_falls_back():
    be = dispatch.load_backend("cpu")
    x = torch.randn(2, 4, 8)
    assert be.unsupported_reason("lora_conv1d", x.bfloat16()) is not None
    assert "autocast" in be.unsupported_reason("lora_conv1d", x.double(), lora_A=torch.randn(2, 12))
    ops.set_backend("cpu")
    with pytest.raises(dispatch.BackendUnavailableError, match="bfloat16"):
        dispatch.select_backend("lora_conv1d", x.bfloat16())
    assert dispatch.select_backend("lora_conv1d", x).NAME == "cpu"
    ops.set_backend(None)
    assert dispatch.select_backend("lora_conv1d", x).NAME == "cpu"  # auto runs it where it can
    assert dispatch.select_backend("lora_conv1d", x.bfloat16()).NAME == "torch"  # and falls back where not


def test_gradcheck_float64(cpu_backend):
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(5)
    x, w, b = torch.randn(3, 5, **d), torch.randn(4, 5, **d), torch.randn(4, **d)
    a, bb = torch.randn(2, 5, **d), torch.randn(4, 2, **d)
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(*t, 1.5, 0.3, seed), (x, w, b, a, bb))
    x = torch.randn(2, 4, 6, **d)
    w, a, bb, b = torch.randn(6, 2, 3, **d), torch.randn(2, 6, **d), torch.randn(6, 1, **d), torch.randn(6, **d)
    for p in (0.0, 0.3):
        assert torch.autograd.gradcheck(
            lambda *t, p=p: ops.lora_conv1d(*t, 0.5, 2, (1, 2), 1, 2, "circular", p, seed), (x, w, b, a, bb)
        )
    w, a, bb, b = torch.randn(4, 3, 4, **d), torch.randn(2, 4, **d), torch.randn(2, 3 * 4, **d), torch.randn(3, **d)
    for p in (0.0, 0.3):
        assert torch.autograd.gradcheck(
            lambda *t, p=p: ops.lora_conv_transpose1d(*t, 0.5, 2, 1, 1, 1, 1, p, seed), (x, w, b, a, bb)
        )


def test_long_sequences_cross_time_blocks(cpu_backend):
    """Inputs longer than one time block, odd lengths, several threads' partial sums."""
    from oracle import compare_with_oracle

    from rvclora import reference as ref

    torch.manual_seed(3)
    t = {
        "x": torch.randn(2, 9, 700, dtype=torch.float64),
        "weight": torch.randn(11, 9, 5, dtype=torch.float64) / 7,
        "bias": None,
        "lora_A": torch.randn(4, 45, dtype=torch.float64) / 7,
        "lora_B": torch.randn(11, 4, dtype=torch.float64),
    }
    for p in (0.0, 0.2):
        t["mask"] = cpu_backend.dropout_mask(torch.tensor(9), t["x"].shape, p, "cpu", torch.float32) if p else None
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask, p=p: ops.lora_conv1d(
                x, weight, bias, lora_A, lora_B, 0.7, 1, (4, 4), 2, 1, "zeros", p, torch.tensor(9)
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv1d_ref(
                x, weight, bias, lora_A, lora_B, 0.7, 1, (4, 4), 2, 1, "zeros", mask
            ),
            t,
            torch.float32,
            ["x", "lora_A", "lora_B"],
            f"long conv1d p={p}",
        )
    # ConvTranspose1d: u at the input's rate, its blocks over input time (2 ranks per group)
    t = {
        "x": torch.randn(2, 12, 900, dtype=torch.float64),
        "weight": torch.randn(12, 5, 8, dtype=torch.float64) / 7,
        "bias": torch.randn(10, dtype=torch.float64),
        "lora_A": torch.randn(4, 6, dtype=torch.float64) / 7,
        "lora_B": torch.randn(4, 5 * 8, dtype=torch.float64),
    }
    for p in (0.0, 0.2):
        t["mask"] = cpu_backend.dropout_mask(torch.tensor(4), t["x"].shape, p, "cpu", torch.float32) if p else None
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask, p=p: ops.lora_conv_transpose1d(
                x, weight, bias, lora_A, lora_B, 0.7, 4, 2, 1, 1, 2, p, torch.tensor(4)
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv_transpose1d_ref(
                x, weight, bias, lora_A, lora_B, 0.7, 4, 2, 1, 1, 2, mask
            ),
            t,
            torch.float32,
            ["x", "weight", "bias", "lora_A", "lora_B"],
            f"long convT p={p}",
        )


@pytest.mark.subprocess
def test_without_blas_the_backend_is_unavailable_and_auto_runs_torch(cpu_backend):
    """The thin passes are calls to torch's BLAS (sgemm_/dgemm_, exported by every x86 wheel); there is
    no other path. Without a usable one (RVCLORA_CPU_BLAS=0 stands in for a torch that exports none)
    the backend reports itself unavailable with the reason, `rvclora info` shows it, and `auto` runs
    the torch backend, which still matches the oracle (a fresh process: the switch is read once)."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    info = torch.ops.rvclora.cpu_info()  # this process: what the rest of the suite tests
    assert "thin LoRA passes: BLAS" in info, info
    assert torch.ops.rvclora.cpu_blas_ok()
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, RVCLORA_CPU_BLAS="0")
    env.pop("RVCLORA_BACKEND", None)
    code = textwrap.dedent(
        """
        import torch
        from rvclora import ops, reference as ref
        from rvclora.ops import dispatch
        print("WHY", dispatch._unavailable("cpu"))
        torch.manual_seed(0)
        d = dict(dtype=torch.float64, requires_grad=True)
        x, w, b = torch.randn(2, 6, 50, **d), torch.randn(8, 6, 3, **d), torch.randn(8, **d)
        A, B = torch.randn(4, 18, **d), torch.randn(8, 4, **d)
        print("PICK", dispatch.select_backend("lora_conv1d", x).NAME)
        args = (x, w, b, A, B, 0.5, 1, (2, 2), 2, 1, "zeros")
        y, yr = ops.lora_conv1d(*args, 0.0, None), ref.lora_conv1d_ref(*args, None)
        g = torch.randn_like(yr)
        got = torch.autograd.grad(y, (x, w, b, A, B), g)
        want = torch.autograd.grad(yr, (x, w, b, A, B), g)
        for a, e in zip((y, *got), (yr, *want)):
            torch.testing.assert_close(a, e)
        print("MATCHES")
        """
    )
    probe = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    out = probe.stdout + probe.stderr
    assert probe.returncode == 0, out
    assert "WHY no usable BLAS for the thin LoRA passes: RVCLORA_CPU_BLAS=0" in probe.stdout, out
    assert "PICK torch" in probe.stdout and "MATCHES" in probe.stdout, out
    cli = subprocess.run(
        [sys.executable, "-m", "rvclora", "info"], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "unavailable: no usable BLAS for the thin LoRA passes: RVCLORA_CPU_BLAS=0" in cli.stdout, cli.stdout


# The SIMD thin passes (csrc/lora_cpu_simd.cpp) run float32 Conv1d with groups 1, stride 1, zero
# padding and no dropout: edges of every kind (time shorter than a vector, padding wider than the
# kernel's reach, valid convolutions, dilation, ranks that are not a multiple of the register tile),
# and weights larger than x, where the input gradient keeps W unmerged and adds the LoRA term by a
# SIMD pass from g_u (RVC's 256-channel stage at 32 frames).
SIMD_EDGES = [
    # (n, cin, cout, T, k, (padl, padr), dilation, r)
    (1, 3, 5, 1, 1, (0, 0), 1, 1),
    (2, 4, 6, 7, 3, (1, 1), 1, 3),
    (3, 5, 4, 50, 3, (5, 2), 3, 12),
    (1, 8, 8, 17, 4, (1, 2), 1, 8),
    (2, 6, 9, 100, 5, (0, 0), 2, 16),
    (1, 16, 7, 333, 7, (9, 9), 5, 5),
    (2, 33, 31, 1601, 11, (25, 25), 5, 8),
    (1, 40, 36, 30, 11, (10, 10), 2, 8),  # unmerged input gradient
    (2, 24, 20, 45, 7, (9, 3), 3, 5),  # unmerged, asymmetric padding
    # x of 20 MB: past u_first_bytes (twice the threads' L2) on any machine CI runs, so the forward runs u first
    (2, 64, 64, 40000, 3, (1, 1), 1, 8),
]


# Each Conv1d plan of the SIMD path (csrc/lora_cpu_conv1d.cpp): ``library`` (oneDNN for the convolution, thin
# passes for the LoRA terms) and ``direct`` (the microkernel for y and u and for the input gradient, with the
# merged weight). The suite runs with RVCLORA_AUTOSELECT=fixed (library); this forces each.
@pytest.mark.parametrize("plan", ["library", "direct"])
@pytest.mark.parametrize("case", SIMD_EDGES, ids=str)
def test_simd_thin_passes_edges(cpu_backend, case, plan, monkeypatch):
    from oracle import compare_with_oracle

    from rvclora import reference as ref

    monkeypatch.setenv("RVCLORA_CPU_CONV1D", plan)
    n, cin, cout, T, k, pad, dil, r = case
    gen = torch.Generator().manual_seed(sum(case[:5]))
    t = {
        "x": torch.randn(n, cin, T, generator=gen, dtype=torch.float64),
        "weight": torch.randn(cout, cin, k, generator=gen, dtype=torch.float64) / (cin * k) ** 0.5,
        "bias": torch.randn(cout, generator=gen, dtype=torch.float64),
        "lora_A": torch.randn(r, cin * k, generator=gen, dtype=torch.float64) / (cin * k) ** 0.5,
        "lora_B": torch.randn(cout, r, generator=gen, dtype=torch.float64),
        "mask": None,
    }
    for names in (["x", "lora_A", "lora_B"], ["lora_A"], ["lora_B"], ["x", "weight", "bias", "lora_A", "lora_B"]):
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_conv1d(
                x, weight, bias, lora_A, lora_B, 0.7, 1, pad, dil, 1, "zeros", 0.0, None
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv1d_ref(
                x, weight, bias, lora_A, lora_B, 0.7, 1, pad, dil, 1, "zeros", mask
            ),
            t,
            torch.float32,
            names,
            f"simd conv1d {case} grads {names}",
        )


def _need_simd():
    if "kernels" not in torch.ops.rvclora.cpu_info():
        pytest.skip("this CPU runs no SIMD kernels (no AVX2+FMA): the Conv1d plans are choices of the SIMD path")


def _conv1d_call(n=1, cin=6, cout=5, T=40, k=3, r=4, bias=True):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, cin, T, generator=gen)
    w = torch.randn(cout, cin, k, generator=gen)
    b = torch.randn(cout, generator=gen) if bias else None
    A, B = torch.randn(r, cin * k, generator=gen), torch.randn(cout, r, generator=gen)
    return x, w, b, A, B


def test_conv1d_plan_measured_and_listed(cpu_backend, monkeypatch):
    """Measure mode times both plans on a layer's first call and keeps the faster one per geometry and direction;
    the result matches the forced plans' (both are exact), and the choice is listed with both times."""
    from rvclora.ops.backends import cpu

    _need_simd()
    x, w, b, A, B = _conv1d_call(cin=7, T=1237)  # a geometry no other test runs, so this call measures
    pad = [1, 1]
    results = {}
    for plan in ("library", "direct", ""):
        monkeypatch.setenv("RVCLORA_CPU_CONV1D", plan)
        monkeypatch.setenv("RVCLORA_AUTOSELECT", "measure")
        y, u = torch.ops.rvclora.cpu_lora_conv1d_fwd(x, w, b, A, B, 0.5, 1, pad, 1, 1, "zeros", 0.0, None)
        g = torch.ops.rvclora.cpu_lora_conv1d_bwd(
            y, x, u, w, A, B, 0.5, 1, pad, 1, 1, "zeros", 0.0, None, [True, False, False, True, True]
        )
        results[plan] = (y, u, g[0], g[3], g[4])
    for got, lib, direct in zip(results[""], results["library"], results["direct"]):
        torch.testing.assert_close(lib, direct, rtol=1e-4, atol=1e-4)
        assert torch.equal(got, lib) or torch.equal(got, direct)
    seconds, plans = cpu.conv1d_plans()
    mine = [p for p in plans if "Cin=7 Cout=5 k=3 dil=1 pad=1,1 T<=2048 " in p["key"]]
    assert sorted(p["key"].split()[0] for p in mine) == ["backward", "forward"], plans
    for p in mine:
        assert p["plan"] == ("direct" if p["direct_ms"] < p["library_ms"] else "library"), p
        assert p["library_ms"] > 0 and p["direct_ms"] > 0
    assert seconds > 0


def test_conv1d_plan_fixed_mode_and_bad_value(cpu_backend, monkeypatch):
    """RVCLORA_AUTOSELECT=fixed runs the library plan without timing anything; a bad RVCLORA_CPU_CONV1D is a
    one-line error naming the variable and the value."""
    from rvclora.ops.backends import cpu

    _need_simd()
    x, w, b, A, B = _conv1d_call(cin=9, T=2351)
    monkeypatch.delenv("RVCLORA_CPU_CONV1D", raising=False)
    monkeypatch.setenv("RVCLORA_AUTOSELECT", "fixed")
    torch.ops.rvclora.cpu_lora_conv1d_fwd(x, w, b, A, B, 0.5, 1, [1, 1], 1, 1, "zeros", 0.0, None)
    assert not [p for p in cpu.conv1d_plans()[1] if "Cin=9 Cout=5 k=3 dil=1 pad=1,1 " in p["key"]]
    monkeypatch.setenv("RVCLORA_CPU_CONV1D", "fastest")
    with pytest.raises(RuntimeError, match="RVCLORA_CPU_CONV1D must be 'library' or 'direct'.*got 'fastest'"):
        torch.ops.rvclora.cpu_lora_conv1d_fwd(x, w, b, A, B, 0.5, 1, [1, 1], 1, 1, "zeros", 0.0, None)


def test_conv1d_plans_cached_per_machine_and_held_while_auto_measures(cpu_backend, monkeypatch, tmp_path):
    """A plan timed in one process is saved with auto's decisions (same environment key) and handed to the op by
    the next; while auto times the backend on its shortened input, nothing is timed or recorded."""
    from rvclora.ops import autoselect
    from rvclora.ops.backends import cpu

    _need_simd()
    monkeypatch.delenv("RVCLORA_CPU_CONV1D", raising=False)
    monkeypatch.setenv("RVCLORA_AUTOSELECT", "measure")
    mine = "Cin=13 Cout=5 k=3 dil=1 pad=1,1 "
    x, w, b, A, B = _conv1d_call(cin=13, T=3001)
    with cpu.measuring():
        torch.ops.rvclora.cpu_lora_conv1d_fwd(x, w, b, A, B, 0.5, 1, [1, 1], 1, 1, "zeros", 0.0, None)
    assert not [p for p in cpu.conv1d_plans()[1] if mine in p["key"]]  # held: library, nothing recorded
    torch.ops.rvclora.cpu_lora_conv1d_fwd(x, w, b, A, B, 0.5, 1, [1, 1], 1, 1, "zeros", 0.0, None)
    (timed,) = [p for p in cpu.conv1d_plans()[1] if mine in p["key"]]
    assert timed["measured"]

    sel = autoselect.AutoSelector(str(tmp_path / "as.json"))
    env = sel.env_key(torch.device("cpu"))
    cpu._save_plans(sel, env)
    saved = autoselect.AutoSelector(str(tmp_path / "as.json")).entries()[env]
    hit = saved[cpu.PLAN_KEY_PREFIX + timed["key"]]
    assert hit["choice"] == timed["plan"] and hit["seconds"]["direct"] * 1e3 == pytest.approx(timed["direct_ms"])

    # the next process: a plan in the file (here one for a geometry this process never ran) reaches the op
    other = "forward Cin=17 Cout=3 k=5 dil=2 pad=4,4 T<=64 N=1 r=2 threads=1 #0"
    sel.record(env, {cpu.PLAN_KEY_PREFIX + other: dict(hit, choice="direct")})
    monkeypatch.setattr(autoselect, "_selector", autoselect.AutoSelector(str(tmp_path / "as.json")))
    cpu._load_plans()
    (loaded,) = [p for p in cpu.conv1d_plans()[1] if p["key"] == other]
    assert loaded["plan"] == "direct" and not loaded["measured"]
    with pytest.raises(RuntimeError, match="a Conv1d plan must be 'library' or 'direct', got 'fast'"):
        torch.ops.rvclora.cpu_conv1d_plan_set("k", "fast", 1.0, 1.0)


# The SIMD passes of ConvTranspose1d (float32, groups 1, no dropout): g split by phase (t mod stride),
# strides below, equal to and above the kernel size, dilation, output padding, ranks off the register tile,
# and weights larger than x·k, where the LoRA term stays unmerged (col2im forward, Aᵀ·g_u input gradient).
SIMD_CONVT_EDGES = [
    # (n, cin, cout, T, k, stride, padding, output_padding, dilation, r)
    (1, 3, 5, 1, 1, 1, 0, 0, 1, 1),
    (2, 6, 4, 11, 5, 3, 2, 1, 2, 5),
    (1, 9, 3, 40, 7, 4, 6, 2, 1, 12),
    (2, 16, 8, 70, 4, 2, 1, 0, 1, 8),
    (1, 7, 6, 33, 3, 5, 0, 4, 1, 3),
    (1, 40, 24, 6, 16, 10, 3, 0, 1, 8),  # unmerged: RVC's first upsampler, smaller
    (2, 6, 5, 2, 5, 2, 1, 1, 2, 3),  # unmerged, two samples
]


@pytest.mark.parametrize("case", SIMD_CONVT_EDGES, ids=str)
def test_simd_convt_passes_edges(cpu_backend, case):
    from oracle import compare_with_oracle

    from rvclora import reference as ref

    n, cin, cout, T, k, stride, pad, opad, dil, r = case
    gen = torch.Generator().manual_seed(sum(case))
    t = {
        "x": torch.randn(n, cin, T, generator=gen, dtype=torch.float64),
        "weight": torch.randn(cin, cout, k, generator=gen, dtype=torch.float64) / (cin * k) ** 0.5,
        "bias": torch.randn(cout, generator=gen, dtype=torch.float64),
        "lora_A": torch.randn(r, cin, generator=gen, dtype=torch.float64) / cin**0.5,
        "lora_B": torch.randn(r, cout * k, generator=gen, dtype=torch.float64),
        "mask": None,
    }
    for names in (
        ["x", "lora_A", "lora_B"],
        ["lora_A"],
        ["lora_B"],
        ["x"],
        ["x", "weight", "bias", "lora_A", "lora_B"],
    ):
        compare_with_oracle(
            lambda x, weight, bias, lora_A, lora_B, mask: ops.lora_conv_transpose1d(
                x, weight, bias, lora_A, lora_B, 0.7, stride, pad, opad, dil, 1, 0.0, None
            ),
            lambda x, weight, bias, lora_A, lora_B, mask: ref.lora_conv_transpose1d_ref(
                x, weight, bias, lora_A, lora_B, 0.7, stride, pad, opad, dil, 1, mask
            ),
            t,
            torch.float32,
            names,
            f"simd conv_transpose1d {case} grads {names}",
        )


@pytest.mark.subprocess
@pytest.mark.parametrize("variant", ["avx2", "0"])
def test_every_simd_variant_matches_the_oracle(cpu_backend, variant):
    """The widest SIMD variant this CPU runs is what the rest of the suite tests; RVCLORA_CPU_SIMD
    narrows it (read once per process): the AVX2 kernels, and none (the BLAS passes), in a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, RVCLORA_CPU_SIMD=variant)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rvclora.ops.backends import cpu as c; c.unavailable_reason();"
            "import torch; print(torch.ops.rvclora.cpu_info())",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    info = probe.stdout
    if variant == "avx2" and "AVX2+FMA kernels" not in info:
        pytest.skip(f"this CPU has no AVX2+FMA ({info.strip() or probe.stderr[-300:]})")
    if variant == "0":
        assert "kernels" not in info, info + probe.stderr
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_cpu_backend.py",
            "-k",
            "simd_thin_passes_edges or simd_convt_passes_edges or long_sequences",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def test_the_parallel_passes_run_on_every_thread(cpu_backend):
    """at::parallel_for is a header template: an extension built without -fopenmp ran every parallel pass of
    the cpu backend on one thread (the backend's whole-generator overhead was +45 % instead of +31 % on
    2 threads). The build passes the flag; the extension reports how many threads one of its regions used."""
    from rvclora.ops import extension

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here: there is no second thread to use")
    if not extension.openmp_flags() and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        pytest.skip(
            "this platform's build has no -fopenmp (not Linux): the passes run on one thread, as rvclora info says"
        )
    assert torch.ops.rvclora.cpu_parallel_threads() == torch.get_num_threads()
    assert f"parallel passes on {torch.get_num_threads()} threads" in torch.ops.rvclora.cpu_info()
