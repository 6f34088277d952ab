"""The ``cuda`` backend (csrc/, rvclora._C) through its CPU twin, held to the oracle.

The CPU twin runs the very kernel bodies the GPU runs (lora_convt_kernel.cuh), block by block
and thread by thread, phase by phase between barriers; every buffer a kernel must write is
filled with NaN first (and shared memory too), so an index map that misses an element fails
these tests. Nothing here needs a GPU: the CUDA build is checked by test_cuda_compile.py.
"""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import assert_close_to_oracle

from rvclora import ops
from rvclora.ops import dispatch, extension
from rvclora.ops.backends import cuda as cuda_backend
from rvclora.reference import lora_conv_transpose1d_ref

SCALING = 0.75


@pytest.fixture(scope="session")
def ext():
    """Build (or load the cached build of) the extension once per session."""
    why = cuda_backend.unavailable_reason()
    if why is not None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler is present but the extension is unavailable: {why}")
        pytest.skip(f"no C++ compiler to build rvclora._C: {why}")
    return torch.ops.rvclora


@pytest.fixture
def cuda_selected(ext):
    ops.set_backend("cuda")
    yield ext
    ops.set_backend(None)


def _out_len(T, S, P, OP, D, K):
    return (T - 1) * S - 2 * P + D * (K - 1) + OP + 1


def _make(N, cin, cout, T, K, r, groups, bias, gen):
    """float64 masters, fresh random (never zeros): x, W, b, A, B."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return {
        "x": rnd(N, cin, T),
        "weight": rnd(cin, cout // groups, K) / (cin * K) ** 0.5,
        "bias": rnd(cout) if bias else None,
        "lora_A": rnd(r, cin // groups),
        "lora_B": rnd(r, cout // groups * K),
    }


def _check_case(masters, dtype, conv, dropout_p=0.0, seed=None, grad_names=("x", "weight", "bias", "lora_A", "lora_B")):
    """Fused op (cuda backend, CPU twin) vs the oracle in float64 and in ``dtype``: output and gradients."""
    S, P, OP, D, G = conv
    mask64 = None
    if dropout_p > 0:
        mask64 = cuda_backend.dropout_mask(seed, masters["x"].shape, dropout_p, "cpu", torch.float64)

    def leaves(dt):
        out = {}
        for k, v in masters.items():
            out[k] = None if v is None else v.to(dt).requires_grad_(k in grad_names)
        return out

    cand, ref, same = leaves(dtype), leaves(torch.float64), leaves(dtype)
    y = ops.lora_conv_transpose1d(
        **cand,
        scaling=SCALING,
        stride=S,
        padding=P,
        output_padding=OP,
        dilation=D,
        groups=G,
        dropout_p=dropout_p,
        seed=seed,
    )
    y_ref = lora_conv_transpose1d_ref(
        **ref, scaling=SCALING, stride=S, padding=P, output_padding=OP, dilation=D, groups=G, dropout_mask=mask64
    )
    y_same = lora_conv_transpose1d_ref(
        **same,
        scaling=SCALING,
        stride=S,
        padding=P,
        output_padding=OP,
        dilation=D,
        groups=G,
        dropout_mask=None if mask64 is None else mask64.to(dtype),
    )
    tiny = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype]
    label = (
        f"conv={conv} p={dropout_p} dtype={dtype} shapes={[tuple(v.shape) for v in masters.values() if v is not None]}"
    )
    assert_close_to_oracle(y, y_ref, y_same, f"y [{label}]", tiny)
    g = torch.randn(y_ref.shape, dtype=torch.float64)
    names = [k for k in grad_names if masters.get(k) is not None]
    gc = torch.autograd.grad(y, [cand[k] for k in names], g.to(dtype))
    gr = torch.autograd.grad(y_ref, [ref[k] for k in names], g)
    gs = torch.autograd.grad(y_same, [same[k] for k in names], g.to(dtype))
    for k, a, b, c in zip(names, gc, gr, gs):
        assert_close_to_oracle(a, b, c, f"grad {k} [{label}]", tiny)
    return y


# ------------------------------------------------------------------ the option grid


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_option_grid_matches_oracle(cuda_selected, stride, dilation, groups, dtype):
    """Every padding, output_padding < max(stride, dilation), bias; odd shapes (T=1/7, in=3/5, out=6, r=1..4)."""
    gen = torch.Generator().manual_seed(1000 * stride + 100 * dilation + groups)
    shapes = itertools.cycle(
        [(2, 3, 6, 7, 3, 1), (1, 5, 6, 1, 4, 2), (2, 5, 6, 7, 2, 3), (1, 3, 6, 7, 5, 4)]
        if groups == 1
        else [(2, 6, 6, 7, 3, 2), (1, 2, 6, 1, 4, 4), (2, 10, 6, 7, 2, 2)]
    )
    checked = 0
    for padding, bias in itertools.product([0, 1, 3], [False, True]):
        for output_padding in range(max(stride, dilation)):
            N, cin, cout, T, K, r = next(shapes)
            if _out_len(T, stride, padding, output_padding, dilation, K) < 1:
                continue  # not a valid ConvTranspose1d: nothing to compare
            masters = _make(N, cin, cout, T, K, r, groups, bias, gen)
            _check_case(masters, dtype, (stride, padding, output_padding, dilation, groups))
            checked += 1
    assert checked >= 4  # guards against a grid that silently checks nothing


@pytest.mark.parametrize(
    "shape, conv",
    [
        # several output-channel tiles (32), input-channel tiles (32) and q-tiles (64); split reductions
        ((2, 40, 70, 150, 3, 8), (1, 1, 0, 1, 1)),
        # RVC-like upsampler: stride 10, kernel 16, padding 3; groups 2 with a rank of 3 per group
        ((2, 12, 8, 40, 16, 6), (10, 3, 0, 1, 2)),
        # span longer than a tile (M = (K-1)·D/S = 75 > 64): u for t' < 0 and the stretched last tile
        ((1, 4, 5, 140, 16, 2), (1, 2, 0, 5, 1)),
        # padding >= stride (first q-tile starts at q > 0), output_padding via dilation
        ((3, 5, 7, 33, 5, 3), (2, 7, 2, 3, 1)),
    ],
)
def test_tiles_and_edges_match_oracle(cuda_selected, shape, conv):
    N, cin, cout, T, K, r = shape
    gen = torch.Generator().manual_seed(7)
    masters = _make(N, cin, cout, T, K, r, conv[4], True, gen)
    for dtype in (torch.float64, torch.float32):
        _check_case(masters, dtype, conv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dropout_matches_oracle_with_materialised_mask(cuda_selected, dtype):
    gen = torch.Generator().manual_seed(3)
    for shape, conv in [((2, 6, 6, 9, 4, 2), (2, 1, 1, 1, 1)), ((2, 12, 8, 40, 16, 6), (10, 3, 0, 1, 2))]:
        masters = _make(*shape, conv[4], True, gen)
        _check_case(masters, dtype, conv, dropout_p=0.3, seed=torch.tensor(987654321, dtype=torch.int64))


def test_only_some_gradients_required(cuda_selected):
    """Frozen base (only A, B train), and only x (LoRA frozen): each need-flag combination of the backward op."""
    gen = torch.Generator().manual_seed(11)
    masters = _make(2, 6, 6, 9, 4, 2, 2, True, gen)
    for names in [("lora_A", "lora_B"), ("x",), ("weight", "bias"), ("lora_B",), ("x", "lora_A")]:
        _check_case(masters, torch.float64, (3, 1, 2, 1, 2), dropout_p=0.2, seed=torch.tensor(5), grad_names=names)


def test_non_contiguous_inputs(cuda_selected):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 4, 2, generator=gen, dtype=torch.float64).transpose(0, 2)  # (2, 4, 9), non-contiguous
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64).permute(1, 0, 2)  # (4, 3, 5)
    a = torch.randn(4, 2, generator=gen, dtype=torch.float64).t()  # (2, 4)
    b = torch.randn(2, 30, generator=gen, dtype=torch.float64)[:, ::2]  # (2, 15)
    y = ops.lora_conv_transpose1d(x, w, None, a, b, SCALING, stride=2, padding=1)
    ref = lora_conv_transpose1d_ref(x, w, None, a, b, SCALING, stride=2, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(cuda_selected):
    gen = torch.Generator().manual_seed(2)
    m = _make(2, 4, 4, 5, 3, 2, 2, True, gen)
    seed = torch.tensor(42)

    def f(x, w, b, a, bb):
        return ops.lora_conv_transpose1d(
            x,
            w,
            b,
            a,
            bb,
            SCALING,
            stride=2,
            padding=1,
            output_padding=1,
            dilation=2,
            groups=2,
            dropout_p=0.25,
            seed=seed,
        )

    args = [m[k].clone().requires_grad_(True) for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8)


# ------------------------------------------------------------------ dropout mask


def test_same_seed_is_bitwise_reproducible(cuda_selected):
    gen = torch.Generator().manual_seed(9)
    m = _make(2, 6, 6, 20, 4, 2, 1, True, gen)
    leaves = [m[k].float().requires_grad_(True) for k in ("x", "weight", "bias", "lora_A", "lora_B")]

    def run(seed):
        y = ops.lora_conv_transpose1d(*leaves, SCALING, stride=3, padding=1, dropout_p=0.4, seed=seed)
        return (y, *torch.autograd.grad(y.square().sum(), leaves))

    first, second = run(torch.tensor(77)), run(torch.tensor(77))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other = run(torch.tensor(78))
    assert not torch.equal(first[0], other[0]), "a different seed must give a different mask"


def test_dropout_mask_values_rate_and_index_contract(ext):
    p, seed = 0.3, torch.tensor(123456789)
    mask = cuda_backend.dropout_mask(seed, (4, 50, 1000), p, "cpu", torch.float32)
    values = set(torch.unique(mask).tolist())
    assert values == {0.0, torch.tensor(1 / (1 - p), dtype=torch.float32).item()}, values
    keep = (mask > 0).double().mean().item()
    assert abs(keep - (1 - p)) < 0.005, keep  # 200k Bernoulli draws: std 0.001
    # a function of (seed, flat element index) only: any shape with the same numel gives the same values
    flat = cuda_backend.dropout_mask(seed, (200000,), p, "cpu", torch.float64)
    assert torch.equal(mask.flatten() > 0, flat > 0)
    assert torch.equal(cuda_backend.dropout_mask(None, (3, 4), 0.0, "cpu", torch.float64), torch.ones(3, 4).double())


# ------------------------------------------------------------------ torch.library


def _op_args(dtype=torch.float64, bias=True, p=0.2, requires_grad=True):
    gen = torch.Generator().manual_seed(4)
    m = _make(2, 4, 6, 7, 3, 2, 2, bias, gen)
    t = {k: (None if v is None else v.to(dtype).requires_grad_(requires_grad)) for k, v in m.items()}
    seed = torch.tensor(31) if p > 0 else None
    return (t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], SCALING, 2, 1, 1, 1, 2, p, seed)


@pytest.mark.parametrize("bias, p", [(True, 0.2), (False, 0.0)])
def test_opcheck_fwd(ext, bias, p):
    torch.library.opcheck(ext.cuda_lora_conv_transpose1d_fwd.default, _op_args(bias=bias, p=p))
    torch.library.opcheck(
        ext.cuda_lora_conv_transpose1d_fwd.default, _op_args(dtype=torch.float32, bias=bias, p=p, requires_grad=False)
    )


@pytest.mark.parametrize(
    "needs",
    [
        [True, True, True, True, True],
        [False, False, False, True, True],
        [True, False, False, False, False],
        [False, False, True, False, False],
    ],
)
def test_opcheck_bwd(ext, needs):
    args = _op_args(requires_grad=False)
    x, w, _, a, b = args[:5]
    y, u = ext.cuda_lora_conv_transpose1d_fwd(*args)
    g = torch.randn_like(y)
    torch.library.opcheck(ext.cuda_lora_conv_transpose1d_bwd.default, (g, x, u, w, a, b, *args[5:], needs))


def test_opcheck_dropout_mask(ext):
    torch.library.opcheck(ext.cuda_dropout_mask.default, (torch.empty(3, 4, 5), torch.tensor(3), 0.5))


def test_fwd_returns_u_for_backward(ext):
    """u = A·D(x) over every input position (also those that reach no output), unscaled."""
    args = list(_op_args(requires_grad=False, p=0.3))
    args[7] = 6  # padding 6 > (K-1)·D: the first and last inputs reach no output at all
    x, a, seed = args[0], args[3], args[12]
    _, u = ext.cuda_lora_conv_transpose1d_fwd(*args)
    mask = cuda_backend.dropout_mask(seed, x.shape, 0.3, "cpu", x.dtype)
    u_ref = F.conv1d(x * mask, a.unsqueeze(-1), groups=2)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ dispatch and errors


def test_layer_path_runs_cpu_twin_when_backend_is_cuda(cuda_selected, monkeypatch):
    """RVCLORA_BACKEND=cuda on CPU tensors goes through the extension op (no silent fallback)."""
    calls = []
    real = cuda_backend.lora_conv_transpose1d
    monkeypatch.setattr(cuda_backend, "lora_conv_transpose1d", lambda *a: calls.append(1) or real(*a))
    ops.set_backend(None)
    monkeypatch.setenv("RVCLORA_BACKEND", "cuda")
    m = _make(1, 3, 6, 5, 3, 2, 1, True, torch.Generator().manual_seed(0))
    ops.lora_conv_transpose1d(*m.values(), SCALING, stride=2)
    assert calls == [1]


def test_refusals_name_the_reason(cuda_selected):
    x = torch.randn(1, 4, 5, dtype=torch.float16)
    w, a, b = torch.randn(4, 3, 3).half(), torch.randn(2, 4).half(), torch.randn(2, 9).half()
    with pytest.raises(dispatch.BackendUnavailableError, match="float32 and float64 only"):
        ops.lora_conv_transpose1d(x, w, None, a, b, SCALING)
    with pytest.raises(dispatch.BackendUnavailableError, match="the cuda backend has no lora_linear"):
        ops.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2), 1.0)
    with pytest.raises(dispatch.BackendUnavailableError, match="divisible by groups"):
        ops.lora_conv_transpose1d(
            x.float(), torch.randn(4, 3, 3), None, torch.randn(3, 2), torch.randn(3, 9), SCALING, groups=2
        )
    with pytest.raises(RuntimeError, match="lora_B must be"):
        ops.lora_conv_transpose1d(x.float(), w.float(), None, a.float(), torch.randn(2, 8), SCALING)


def test_failed_build_warns_and_makes_backend_unavailable(ext, monkeypatch, tmp_path):
    """A broken compiler: one warning, a reason, auto is unaffected, an explicit request raises with the reason."""
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "build_plan", lambda: extension.BuildPlan(cuda=False))  # the C++ compiler's failure
    monkeypatch.setattr(extension, "extension_name", lambda cuda=None: "rvclora_C_broken_compiler_test")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(extension, "_ops_registered", lambda: False)  # the real ops are loaded in this process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        why = cuda_backend.unavailable_reason()
    assert why is not None and "building the rvclora._C extension" in why, why
    assert [w for w in caught if "'cuda' backend is unavailable" in str(w.message)]
    ops.set_backend("cuda")
    m = _make(1, 3, 6, 5, 3, 2, 1, False, torch.Generator().manual_seed(0))
    with pytest.raises(dispatch.BackendUnavailableError, match="building the rvclora._C extension"):
        ops.lora_conv_transpose1d(*m.values(), SCALING)


def test_torch_compile_fullgraph_traces_the_ops(cuda_selected):
    """Fake kernels + autograd registration let the fused op trace without graph breaks (aot_eager: no codegen)."""
    m = _make(2, 4, 6, 9, 4, 2, 2, True, torch.Generator().manual_seed(6))
    leaves = [m[k].requires_grad_(True) for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    seed = torch.tensor(8)

    def step(x, w, b, a, bb):
        y = ops.lora_conv_transpose1d(
            x, w, b, a, bb, SCALING, stride=3, padding=1, output_padding=2, groups=2, dropout_p=0.1, seed=seed
        )
        return y.square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(step(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ what gets built where


@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend this torch was built with CUDA 13.0 (the build plan reads only torch.version.cuda and CUDA_HOME)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)


def _fake_toolkit(root, nvcc=True, headers=True):
    if nvcc:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def test_cpu_torch_builds_the_cpu_sources_without_a_note(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    plan = extension.build_plan()
    assert not plan.cuda and plan.note is None and plan.arch_flags == ()
    assert extension.sources(plan.cuda) == extension.CPU_SOURCES


@pytest.mark.parametrize(
    "toolkit, why",
    [
        (None, "no CUDA toolkit (nvcc not found"),
        ({"nvcc": False}, "no CUDA toolkit (no nvcc in CUDA_HOME="),
        ({"headers": False}, "has no include/cuda_runtime.h"),
    ],
    ids=["no-cuda-home", "no-nvcc", "no-headers"],
)
def test_cuda_torch_without_a_toolkit_plans_the_cpu_sources(cuda_torch, monkeypatch, tmp_path, toolkit, why):
    from torch.utils import cpp_extension

    home = None if toolkit is None else _fake_toolkit(tmp_path / "cuda", **toolkit)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", home)
    plan = extension.build_plan()
    assert not plan.cuda and plan.arch_flags == ()
    assert plan.note is not None and why in plan.note, plan.note
    assert plan.note.endswith("built the CPU twin only; ConvTranspose1d uses the torch path on GPU"), plan.note
    assert "\n" not in plan.note


@pytest.mark.parametrize("env", [None, "native"])
def test_no_visible_device_gets_the_kernels_target_archs(cuda_torch, monkeypatch, tmp_path, env):
    """torch alone derives the archs from the visible devices: with none, its build fails with an IndexError."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_toolkit(tmp_path / "cuda"))
    if env is not None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", env)
    plan = extension.build_plan()
    assert plan.cuda and plan.note is None
    assert plan.arch_flags == (
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    )
    assert "sm_80, sm_90" in plan.archs and "no CUDA device visible" in plan.archs
    assert extension.sources(plan.cuda) == extension.CPU_SOURCES + extension.CUDA_SOURCES


def test_torch_cuda_arch_list_is_honoured(cuda_torch, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_toolkit(tmp_path / "cuda"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    plan = extension.build_plan()
    assert plan.cuda and plan.archs == "TORCH_CUDA_ARCH_LIST=8.6"
    assert plan.arch_flags == ("-gencode=arch=compute_86,code=sm_86",), plan.arch_flags


def test_source_sets_and_torch_builds_have_distinct_cache_names(monkeypatch):
    cpu, cuda = extension.extension_name(False), extension.extension_name(True)
    assert cpu != cuda and cpu.isidentifier() and cuda.isidentifier()
    monkeypatch.setattr(torch, "__version__", "9.9.9+cu999")
    assert extension.extension_name(False) not in (cpu, cuda)


def test_a_changed_source_tree_is_another_cache_entry(tmp_path):
    """Two trees sharing torch's extension cache (an upgrade, two checkouts) never load each other's build."""
    src = extension.source_dir()
    tree = tmp_path / "csrc"
    tree.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (tree / f.name).write_bytes(f.read_bytes())
    same = extension.source_digest(tree)
    assert same == extension.source_digest(src)
    header = next(f for f in sorted(tree.iterdir()) if f.suffix == ".h")
    header.write_bytes(header.read_bytes() + b"\n// changed\n")
    assert extension.source_digest(tree) != same


def test_failed_cuda_build_falls_back_to_the_cpu_sources(ext, monkeypatch):
    """A toolkit that cannot build the CUDA part (wrong version, compile error): CPU part, a warning, a note."""
    built = []

    def fake_load(src, cuda, plan):
        built.append(cuda)
        if cuda:
            raise RuntimeError("nvcc fatal : Unsupported gpu architecture 'compute_80'")

    plan = extension.BuildPlan(cuda=True, arch_flags=("-gencode=arch=compute_80,code=sm_80",), archs="sm_80")
    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "build_plan", lambda: plan)
    monkeypatch.setattr(extension, "_jit_load", fake_load)
    monkeypatch.setattr(extension, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(importlib, "import_module", _no_ahead_of_time_build(importlib.import_module))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert extension.load_error() is None
    assert built == [True, False]
    note = extension.cuda_note()
    assert note.startswith("building the CUDA sources for sm_80 failed (RuntimeError: nvcc fatal"), note
    assert note.endswith("ConvTranspose1d uses the torch path on GPU"), note
    assert [w for w in caught if "building the CUDA sources" in str(w.message)]


def _no_ahead_of_time_build(real):
    def import_module(name, *args):
        if name == "rvclora._C":
            raise ImportError("no ahead-of-time build in this test")
        return real(name, *args)

    return import_module


def test_loaded_extension_matches_the_plan(ext):
    """What this machine built: the CUDA kernels exactly when the plan said so; otherwise a one-line note."""
    plan = extension.build_plan()
    note = cuda_backend.status_note()
    gpu_tensor = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    if torch.version.cuda is None:
        assert not extension.has_cuda_kernels() and "this torch has no CUDA" in note
    elif plan.cuda and extension.cuda_note() is None:
        assert extension.has_cuda_kernels() and note == "CUDA kernels and their CPU twin"
        assert cuda_backend.unsupported_reason("lora_conv_transpose1d", gpu_tensor) is None
    else:
        assert not extension.has_cuda_kernels()
        assert note == extension.cuda_note() and "ConvTranspose1d uses the torch path on GPU" in note, note
        assert cuda_backend.unsupported_reason("lora_conv_transpose1d", gpu_tensor) == note


@pytest.mark.subprocess
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no CUDA: its only build is the CPU one")
def test_cuda_torch_without_toolkit_builds_the_cpu_twin(tmp_path):
    """The usual GPU user's install (CUDA torch from pip, no nvcc), in a fresh process: CPU twin, note, no error."""
    script = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from rvclora.ops import extension\n"
        "    from rvclora.ops.backends import cuda as cuda_backend\n"
        "    why = cuda_backend.unavailable_reason()\n"
        "assert why is None, why\n"
        "assert not [w for w in caught if 'rvclora' in str(w.message)], [str(w.message) for w in caught]\n"
        "assert not extension.has_cuda_kernels()\n"
        "print(cuda_backend.status_note())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_PATH", "PYTORCH_NVCC")}
    env["CUDA_HOME"] = str(tmp_path / "no-cuda-toolkit")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("no CUDA toolkit (no nvcc in CUDA_HOME="), proc.stdout
    assert "built the CPU twin only; ConvTranspose1d uses the torch path on GPU" in proc.stdout


@pytest.mark.subprocess
def test_rvclora_info_shows_what_the_cuda_backend_runs(ext):
    """`rvclora info` prints the status note: on a CUDA torch without a toolkit, the one-line reason."""
    proc = subprocess.run([sys.executable, "-m", "rvclora", "info"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["cuda"])
    assert lines[at].split() == ["cuda", "available"], proc.stdout
    assert lines[at + 1].strip() == f"note: {cuda_backend.status_note()}", proc.stdout
