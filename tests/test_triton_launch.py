"""How the Triton ops launch their kernels: on the tensors' device, with the dropout seed by value.

Triton launches on the *current* CUDA device, so each op must enter its tensors' device first;
and the dropout seed (a CPU tensor) must reach the kernels as a scalar argument, not through a
host-to-device copy that would block on every call and be illegal during CUDA-graph capture.
Neither needs a GPU to check: the launches are observed here through a recording
``wrap_triton`` (the kernels themselves run in the interpreter), and the guard's device choice
through a mocked ``torch.cuda.device``.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton")

import rvclora.ops as rops  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA device or TRITON_INTERPRET=1 (set by tests/conftest.py on GPU-less machines)",
        allow_module_level=True,
    )

kops = pytest.importorskip("rvclora.kernels.ops")
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture
def launches(monkeypatch):
    """Record every kernel launch: its kernel, its seed argument and the guard active at the time."""
    state = {"guard": [], "launches": []}
    real_guard, real_wrap = kops._device_guard, kops.wrap_triton

    @contextlib.contextmanager
    def recording_guard(t):
        state["guard"].append(t.device)
        try:
            with real_guard(t):
                yield
        finally:
            state["guard"].pop()

    def recording_wrap(kernel):
        launcher = real_wrap(kernel)

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner or a JITFunction
                    names = jit.arg_names
                    bound = dict(zip(names, args))
                    state["launches"].append(
                        {
                            "kernel": jit.__name__,
                            "guard": list(state["guard"]),
                            "seed": bound.get("seed"),
                            "seed_is_ptr": kwargs.get("SEED_IS_PTR"),
                        }
                    )
                    return launcher[grid](*args, **kwargs)

                return launch

        return _Grid()

    monkeypatch.setattr(kops, "_device_guard", recording_guard)
    monkeypatch.setattr(kops, "wrap_triton", recording_wrap)
    rops.set_backend("triton")
    yield state
    rops.set_backend(None)


def _linear_and_conv(p: float):
    torch.manual_seed(0)
    seed = torch.tensor(2**40 + 7, dtype=torch.int64)
    x = torch.randn(70, 12, device=DEVICE, requires_grad=True)
    w, b = torch.randn(10, 12, device=DEVICE), torch.randn(10, device=DEVICE)
    a = torch.randn(4, 12, device=DEVICE, requires_grad=True)
    bb = torch.randn(10, 4, device=DEVICE, requires_grad=True)
    rops.lora_linear(x, w, b, a, bb, 0.5, p, seed).sum().backward()
    xc = torch.randn(2, 6, 40, device=DEVICE, requires_grad=True)
    wc = torch.randn(8, 6, 3, device=DEVICE, requires_grad=True)
    ac = torch.randn(2, 18, device=DEVICE, requires_grad=True)
    bc = torch.randn(8, 2, device=DEVICE, requires_grad=True)
    rops.lora_conv1d(xc, wc, None, ac, bc, 0.5, 1, (1, 1), 1, 1, "reflect", p, seed).sum().backward()
    return seed


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_every_launch_runs_inside_the_device_guard_of_its_tensors(launches, p):
    _linear_and_conv(p)
    kernels = {rec["kernel"] for rec in launches["launches"]}
    assert {"lora_forward_kernel", "lora_grad_u_kernel", "lora_grad_input_kernel", "lora_weight_grad_kernel"} <= kernels
    for rec in launches["launches"]:
        assert rec["guard"] and rec["guard"][-1].type == DEVICE, rec


def test_dropout_seed_reaches_the_kernels_by_value(launches, monkeypatch):
    moved = []
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        if self.dtype == torch.int64 and self.dim() == 0:
            moved.append((args, kwargs))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    seed = _linear_and_conv(0.3)
    seeded = [rec for rec in launches["launches"] if rec["seed_is_ptr"] is not None]
    assert seeded, "no launch took a seed argument"
    for rec in seeded:
        assert rec["seed_is_ptr"] is False and isinstance(rec["seed"], int), rec
    assert {rec["seed"] for rec in seeded} == {int(seed)}
    assert not moved, f"the seed tensor was copied: {moved}"
    mask = rops.dispatch.load_backend("triton").dropout_mask(seed, (3, 5), 0.3, torch.device(DEVICE), torch.float32)
    assert launches["launches"][-1]["kernel"] == "dropout_mask_kernel"
    assert launches["launches"][-1]["seed"] == int(seed) and mask.shape == (3, 5)


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    """A tensor on ``cuda:1`` (mocked: no GPU here) makes the guard enter device 1, whatever is current."""
    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class FakeCudaTensor:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(kops, "is_fake", lambda t: False)
    with kops._device_guard(FakeCudaTensor()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with kops._device_guard(torch.empty(1)):  # CPU tensors (the interpreter) need no guard
        pass
    assert entered == [torch.device("cuda", 1)]


def test_inside_a_trace_the_seed_is_read_on_the_device():
    """A traced call has no seed value on the host: it is moved to the kernels' device and read there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        seed = mode.from_tensor(torch.tensor(5, dtype=torch.int64))
        like = torch.empty(3)
        arg, is_ptr = kops._seed_arg(seed, 0.3, like)
        assert is_ptr is True and arg.shape == (1,) and arg.dtype == torch.int64
    assert kops._seed_arg(torch.tensor(5), 0.3, torch.empty(3)) == (5, False)
    assert kops._seed_arg(None, 0.0, torch.empty(3)) == (0, False)


def test_base_dots_use_tf32_only_where_pytorch_would(monkeypatch):
    """fp32 base dots follow PyTorch's flags for the base op (cuDNN for Conv1d, cuBLAS for Linear);
    half inputs, CPU tensors (the interpreter) and the LoRA dots never use TF32."""

    class FakeCuda:
        def __init__(self, dtype):
            self.dtype, self.device = dtype, torch.device("cuda", 0)

    prec = torch.get_float32_matmul_precision()
    try:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        torch.set_float32_matmul_precision("highest")
        assert kops.base_precision(FakeCuda(torch.float32), is_linear=False) == "tf32"
        assert kops.base_precision(FakeCuda(torch.float32), is_linear=True) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert kops.base_precision(FakeCuda(torch.float32), is_linear=True) == "tf32"
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        assert kops.base_precision(FakeCuda(torch.float32), is_linear=False) == "ieee"
        assert kops.base_precision(FakeCuda(torch.float16), is_linear=True) == "ieee"
        assert kops.base_precision(torch.empty(2), is_linear=True) == "ieee"
    finally:
        torch.set_float32_matmul_precision(prec)
