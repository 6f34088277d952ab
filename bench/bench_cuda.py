"""GPU benchmarks of the fused ConvTranspose1d + LoRA kernel (``cuda`` backend, csrc/).

One training step of one RVC 40k-generator upsampler stage (batch 4, 32 input frames at the
first stage), forward + backward, for

* ``base``:  the frozen base layer, ``conv_transpose1d`` + grad w.r.t. x (the baseline, docs/maths.md);
* ``torch``: the LoRA layer through the ``torch`` backend (grads for x, A, B);
* ``cuda``:  the same through the fused kernel (grads for x, A, B).

Run with ``pytest bench/bench_cuda.py`` on a machine with a CUDA GPU; compare the groups'
medians (pytest-benchmark prints them side by side). Without a GPU every case is skipped
with the reason; nothing here queries a device at import time. No GPU figures are recorded
in this repository unless measured with this file on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rvclora import ops

# (in, out, kernel, stride, input frames): the four upsamplers of the 40k generator, batch 4
STAGES = [(512, 256, 16, 10, 32), (256, 128, 16, 10, 320), (128, 64, 4, 2, 3200), (64, 32, 4, 2, 6400)]
BATCH = 4
RANKS = [8]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the fused kernel's timings need one")
    from rvclora.ops.backends import cuda as cuda_backend

    why = cuda_backend.unavailable_reason()
    if why is not None:
        pytest.skip(f"the cuda backend is unavailable: {why}")


def _case(stage, rank, dtype):
    cin, cout, k, s, T = stage
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(BATCH, cin, T, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    w = torch.randn(cin, cout, k, device=dev, dtype=dtype, generator=gen) / (cin * k) ** 0.5
    b = torch.randn(cout, device=dev, dtype=dtype, generator=gen)
    a = (torch.randn(rank, cin, device=dev, dtype=dtype, generator=gen) / cin**0.5).requires_grad_(True)
    bb = (torch.randn(rank, cout * k, device=dev, dtype=dtype, generator=gen) * 0.01).requires_grad_(True)
    padding = (k - s) // 2
    return x, w, b, a, bb, padding, s


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("rank", RANKS, ids=lambda r: f"r{r}")
@pytest.mark.parametrize("stage", STAGES, ids=lambda st: f"{st[0]}to{st[1]}_k{st[2]}_s{st[3]}_T{st[4]}")
@pytest.mark.parametrize("path", ["base", "torch", "cuda"])
def test_upsampler_step(benchmark, path, stage, rank, dtype):
    _gpu_or_skip()
    x, w, b, a, bb, padding, s = _case(stage, rank, DTYPES[dtype])
    benchmark.group = f"{stage} r{rank} {dtype}"
    benchmark.extra_info.update(
        {"path": path, "device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": BATCH}
    )
    grad_y = None

    def step():
        nonlocal grad_y
        if path == "base":
            y = F.conv_transpose1d(x, w, b, stride=s, padding=padding)
            inputs = [x]
        else:
            ops.set_backend(path)
            try:
                y = ops.lora_conv_transpose1d(x, w, b, a, bb, 1.0, stride=s, padding=padding)
            finally:
                ops.set_backend(None)
            inputs = [x, a, bb]
        if grad_y is None:
            grad_y = torch.randn_like(y)
        torch.autograd.grad(y, inputs, grad_y)
        torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=3, rounds=20, iterations=1)
