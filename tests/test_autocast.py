"""Mixed precision: the layers under ``torch.autocast`` and a GradScaler training loop.

RVC trains with CUDA fp16 autocast + ``GradScaler`` and computes its losses outside autocast
(docs/rvc.md). The layers are built for that: under autocast they cast input, weight and bias like
``nn.Linear``/``nn.Conv1d`` do (same output dtype), while the LoRA factors stay float32 and
the LoRA path is accumulated in float32 and added to the base output once. So the optimizer
updates float32 factors with float32 gradients, and a ``ΔW`` smaller than the low-precision
resolution of ``W`` still reaches the output and the gradients, where folding it into a half
weight would round it away.

On this CPU-only machine the same code paths run with CPU autocast in bfloat16 and float16;
the CUDA fp16 case is at the end and skips (with its reason) without a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rvclora import LoRAConfig, LoRAConv1d, LoRAConvTranspose1d, LoRALinear, inject_lora
from rvclora import reference as ref

HALF_DTYPES = [torch.bfloat16, torch.float16]
KINDS = ["linear", "conv1d", "conv_transpose1d"]


def _make(kind: str, r: int = 2, lora_alpha: float = 2.0) -> tuple[nn.Module, nn.Module, tuple]:
    """(LoRA layer, plain base layer with the same weight and bias, input shape)."""
    if kind == "linear":
        base, shape = nn.Linear(4, 6), (3, 4)
        lora = LoRALinear.from_base(base, r=r, lora_alpha=lora_alpha)
    elif kind == "conv1d":
        base, shape = nn.Conv1d(4, 6, 3, padding=1), (2, 4, 7)
        lora = LoRAConv1d.from_base(base, r=r, lora_alpha=lora_alpha)
    else:
        base, shape = nn.ConvTranspose1d(4, 6, 4, stride=2, padding=1), (2, 4, 5)
        lora = LoRAConvTranspose1d.from_base(base, r=r, lora_alpha=lora_alpha)
    return lora, base, shape


def _reference(kind: str, layer: nn.Module, x, weight, bias, lora_A, lora_B):
    """The oracle for ``layer``'s kind and hyper-parameters, on the given tensors."""
    s = layer.scaling
    if kind == "linear":
        return ref.lora_linear_ref(x, weight, bias, lora_A, lora_B, s)
    if kind == "conv1d":
        p = layer.padding[0]
        return ref.lora_conv1d_ref(x, weight, bias, lora_A, lora_B, s, layer.stride[0], (p, p))
    return ref.lora_conv_transpose1d_ref(
        x, weight, bias, lora_A, lora_B, s, layer.stride[0], layer.padding[0], layer.output_padding[0]
    )


def _channel_dim(kind: str) -> int:
    return -1 if kind == "linear" else 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_layers_follow_autocast_and_keep_fp32_factors(kind, dtype):
    torch.manual_seed(0)
    lora, base, shape = _make(kind)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.2)
    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = lora(x)
        y_base = base(x)
    assert y.dtype == y_base.dtype == dtype
    assert lora.lora_A.dtype == lora.lora_B.dtype == torch.float32

    # the oracle on what autocast hands the layer: x, W, b rounded to `dtype`, factors in float32
    r64 = lambda t: t.detach().to(dtype).double()
    A64 = lora.lora_A.detach().double().requires_grad_(True)
    B64 = lora.lora_B.detach().double().requires_grad_(True)
    y_ref = _reference(kind, lora, r64(x), r64(lora.weight), r64(lora.bias), A64, B64)
    base_ref = _reference(kind, lora, r64(x), r64(lora.weight), r64(lora.bias), A64 * 0, B64)
    # tolerance: twice the rounding error of the plain layer at the same precision, plus one final rounding
    base_err = (y_base.double() - base_ref).abs().max().item()
    tol = 2 * base_err + torch.finfo(dtype).eps * y_ref.abs().detach()
    assert ((y.double() - y_ref).abs() <= tol).all()

    # the loss is computed outside autocast (RVC's setting); its gradient reaches the layer in `dtype`
    w = torch.randn(y.shape)
    (y.float() * w).sum().backward()
    assert lora.lora_A.grad.dtype == lora.lora_B.grad.dtype == torch.float32
    assert x.grad.dtype == x.dtype
    (y_ref * w.to(dtype).double()).sum().backward()
    # float32 accuracy, not `dtype`'s: the LoRA gradients are accumulated in float32 (inputs are exact)
    torch.testing.assert_close(lora.lora_A.grad.double(), A64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lora.lora_B.grad.double(), B64.grad, rtol=1e-5, atol=1e-6)


def _sign(n: int) -> torch.Tensor:
    return 1.0 - 2.0 * (torch.arange(n) % 2)  # +1, -1, +1, ...


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_update_below_half_resolution_is_not_rounded_away(kind, dtype):
    """``W = 1`` everywhere and ``|ΔW| = eps/8``: ``W + ΔW`` rounds back to ``W`` in ``dtype``.

    Input and output gradient alternate in sign over the channels, so the base layer's output
    and input gradient cancel to exactly zero and what remains is ΔW's contribution alone.
    """
    eps = torch.finfo(dtype).eps
    r = 2
    lora, base, shape = _make(kind, r=r, lora_alpha=r)  # scaling 1
    cin, cout = (lora.in_features, lora.out_features) if kind == "linear" else (lora.in_channels, lora.out_channels)
    k = 1 if kind == "linear" else lora.kernel_size[0]
    delta = eps / 8 / r  # every |ΔW| entry is r·delta = eps/8
    with torch.no_grad():
        lora.weight.fill_(1.0)
        lora.bias = None
        if kind == "conv_transpose1d":  # A: (r, in), B: (r, out·k)
            lora.lora_A.copy_(_sign(cin).expand(r, cin))
            lora.lora_B.copy_(delta * _sign(cout).repeat_interleave(k).expand(r, cout * k))
        else:  # A: (r, in·k), B: (out, r)
            lora.lora_A.copy_(_sign(cin).repeat_interleave(k).expand(r, cin * k))
            lora.lora_B.copy_(delta * _sign(cout)[:, None].expand(cout, r))
    dw = lora.get_delta_weight().detach()
    assert dw.abs().max().item() == pytest.approx(eps / 8)
    merged = lora.weight.detach() + dw
    assert torch.equal(merged.to(dtype), lora.weight.detach().to(dtype)), "premise: W + ΔW rounds to W"

    c_shape = list(shape)
    c_shape[_channel_dim(kind)] = 1  # the same magnitude in every channel: the signs cancel exactly
    c = (torch.randint(1, 4, c_shape) * 0.5).to(torch.float32)
    x_shape = [1] * len(shape)
    x_shape[_channel_dim(kind)] = cin
    x = (c * _sign(cin).reshape(x_shape)).requires_grad_(True)
    g_shape = [1] * len(shape)
    g_shape[_channel_dim(kind)] = cout
    g_pattern = _sign(cout).reshape(g_shape)

    with torch.autocast("cpu", dtype=dtype):
        y = lora(x)
        # what a merged-weight implementation would compute: ΔW is lost
        base.weight, base.bias = nn.Parameter(merged), None
        y_merged = base(x)
    assert y.dtype == dtype
    assert not y_merged.any(), "premise: the merged half-precision layer outputs exactly zero"
    (y.float() * g_pattern).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    y_ref = _reference(
        kind,
        lora,
        x64,
        lora.weight.detach().double(),
        None,
        lora.lora_A.detach().double(),
        lora.lora_B.detach().double(),
    )
    (y_ref * g_pattern.double()).sum().backward()
    assert y_ref.abs().min() > 0 and x64.grad.abs().min() > 0, "the test must see ΔW everywhere"
    torch.testing.assert_close(y.double(), y_ref, rtol=eps, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=eps, atol=0)


class _TinyDecoder(nn.Module):
    """One of each adapted kind, weight-normed like RVC's convolutions."""

    def __init__(self):
        super().__init__()
        self.pre = nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.up = nn.utils.weight_norm(nn.ConvTranspose1d(8, 6, 4, stride=2, padding=1))
        self.proj = nn.Linear(6, 6)
        self.post = nn.Conv1d(6, 1, 3, padding=1)

    def forward(self, x):
        x = F.leaky_relu(self.pre(x), 0.1)
        x = F.leaky_relu(self.up(x), 0.1)
        x = self.proj(x.transpose(1, 2)).transpose(1, 2)
        return torch.tanh(self.post(x))


def _train_with_grad_scaler(device: str, dtype: torch.dtype, steps: int = 12):
    torch.manual_seed(0)
    model = _TinyDecoder()
    inject_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["pre", "up", "proj"]))
    model.to(device).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # RVC's optimizer gets every parameter; frozen ones simply have no gradient
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    x = torch.randn(4, 4, 8, device=device)
    target = 0.5 * torch.sin(torch.linspace(0, 6.0, 16, device=device)).expand(4, 1, 16)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            y = model(x)
        loss = F.mse_loss(y.float(), target)  # outside autocast, as RVC does
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
            assert p.grad is None
        else:
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall: {losses}"

    # an overflowing step (non-finite input) must reach the factors' gradients as inf/nan so that
    # the scaler skips the step and lowers the scale instead of applying garbage
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    scale = scaler.get_scale()
    opt.zero_grad(set_to_none=True)
    bad = x.clone()
    bad[0, 0, 3] = float("inf")
    with torch.autocast(device, dtype=dtype):
        y = model(bad)
    scaler.scale(F.mse_loss(y.float(), target)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), f"{n} was updated by a step with non-finite gradients"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_grad_scaler_training_loop_cpu(dtype):
    _train_with_grad_scaler("cpu", dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (RVC's fp16 + GradScaler setting)")
def test_grad_scaler_training_loop_cuda_fp16():
    _train_with_grad_scaler("cuda", torch.float16)
