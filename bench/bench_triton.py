"""GPU benchmarks of the fused Triton LoRA kernels (``pytest bench/bench_triton.py``).

For each case, one training step (forward + backward w.r.t. the input and the LoRA factors) of:
``base`` (the frozen base layer: forward + grad_x), ``fused`` (the triton backend), ``torch``
(the torch backend) and ``unfused`` (plain LoRA as separate modules: base + dropout + two thin
layers, plain autograd). Every result records TFLOP/s (the flops of the LoRA step) and GB/s (the
bytes that step must move at least) in ``extra_info``, plus the overhead over ``base``.

Needs a CUDA GPU: every benchmark skips with a reason otherwise (nothing queries a device at
import). No GPU figures are written down here: run it on a GPU and read pytest-benchmark's table.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rvclora.ops as rops

# (name, lead rows / (N, T), in, out, r, kernel_size) — Linear shapes of a transformer block, Conv1d of an RVC
# resblock (192 channels, k=3) and an early upsampling stage (512 channels, k=7).
LINEAR_CASES = [("linear-8k-1024-r8", 8192, 1024, 1024, 8), ("linear-8k-4096-r16", 8192, 4096, 4096, 16)]
CONV_CASES = [("conv-192-k3-r8", (4, 8192), 192, 192, 8, 3), ("conv-512-k7-r16", (4, 2048), 512, 512, 16, 7)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ["base", "fused", "torch", "unfused"]


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernel benchmarks need a CUDA GPU (torch.cuda.is_available() is False)")
    pytest.importorskip("triton")
    return torch.device("cuda")


def _step(fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        y = fn()
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()

    return run


def _bench(benchmark, run, flops, nbytes):
    for _ in range(3):
        run()
    benchmark.pedantic(run, rounds=20, iterations=5, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(tflops=flops / t / 1e12, gbps=nbytes / t / 1e9)


def _linear_fn(impl, x, w, b, a, bb, s):
    if impl == "base":
        return lambda: F.linear(x, w, b)
    if impl == "unfused":
        return lambda: F.linear(x, w, b) + s * F.linear(F.linear(F.dropout(x, 0.0), a), bb)
    return lambda: rops.lora_linear(x, w, b, a, bb, s)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_step(benchmark, cuda, case, impl, dtype):
    _, m, k, o, r = case
    dt = DTYPES[dtype]
    x = torch.randn(m, k, device=cuda, dtype=dt, requires_grad=True)
    w, b = torch.randn(o, k, device=cuda, dtype=dt) / k**0.5, torch.randn(o, device=cuda, dtype=dt)
    a = (torch.randn(r, k, device=cuda, dtype=dt) / k**0.5).requires_grad_()
    bb = torch.randn(o, r, device=cuda, dtype=dt, requires_grad=True)
    rops.set_backend(None if impl in ("base", "unfused") else ("triton" if impl == "fused" else "torch"))
    try:
        fn = _linear_fn(impl, x, w, b, a, bb, 0.5)
        # base step: forward + grad_x (2 GEMMs); LoRA adds u, y-update, g_u, grad_x-update, grad_A, grad_B
        flops = 2 * 2 * m * k * o + (0 if impl == "base" else 2 * m * r * (3 * k + 3 * o))
        nbytes = x.element_size() * (2 * m * k + 2 * m * o + k * o)
        _bench(benchmark, _step(fn, [x, a, bb]), flops, nbytes)
    finally:
        rops.set_backend(None)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv1d_step(benchmark, cuda, case, impl, dtype):
    _, (n, t), c, o, r, ks = case
    dt = DTYPES[dtype]
    pad = (ks // 2, ks // 2)
    x = torch.randn(n, c, t, device=cuda, dtype=dt, requires_grad=True)
    w, b = torch.randn(o, c, ks, device=cuda, dtype=dt) / (c * ks) ** 0.5, torch.randn(o, device=cuda, dtype=dt)
    a = (torch.randn(r, c * ks, device=cuda, dtype=dt) / (c * ks) ** 0.5).requires_grad_()
    bb = torch.randn(o, r, device=cuda, dtype=dt, requires_grad=True)
    rops.set_backend(None if impl in ("base", "unfused") else ("triton" if impl == "fused" else "torch"))
    try:
        if impl == "base":

            def fn():
                return F.conv1d(x, w, b, padding=pad[0])
        elif impl == "unfused":

            def fn():
                u = F.conv1d(F.dropout(x, 0.0), a.reshape(r, c, ks), padding=pad[0])
                return F.conv1d(x, w, b, padding=pad[0]) + 0.5 * F.conv1d(u, bb.unsqueeze(-1))
        else:

            def fn():
                return rops.lora_conv1d(x, w, b, a, bb, 0.5, 1, pad, 1, 1, "zeros")

        flops = 2 * 2 * n * t * c * ks * o + (0 if impl == "base" else 2 * n * t * r * (3 * c * ks + 3 * o))
        nbytes = x.element_size() * (2 * n * c * t + 2 * n * o * t + o * c * ks)
        _bench(benchmark, _step(fn, [x, a, bb]), flops, nbytes)
    finally:
        rops.set_backend(None)
