"""Bench-only: one GAN training step of the decoder (v1, 40k), with rvclora.models' RVC discriminator and losses.

Written from the public description of RVC's training code, for timing a whole training step
the way a user runs it: the decoder's forward, a discriminator step on (real, generated.detach()),
then a generator step with the adversarial, feature-matching and mel losses. D trains in every
setup (AdamW, lr 1e-4, betas (0.8, 0.99), eps 1e-9, as RVC), and during the G step D's parameter
gradients are computed too (RVC zeroes them before the next D step).

Not included: RVC's KL term, which belongs to the posterior/prior encoders and the flow, outside
this decoder-only step (bench/test_bench_train.py times the whole synthesizer's step, KL
included); the decoder's input latent requires grad, as it does in RVC (the posterior encoder
before it trains), so every setup back-propagates through the decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rvclora.models.discriminator import MultiPeriodDiscriminator, discriminator_loss, feature_loss, generator_loss

__all__ = ["MultiPeriodDiscriminator", "MelSpectrogram", "fold_weight_norm", "gan_step", "discriminator_flops"]


def _mel_filters(sr: int, n_fft: int, n_mels: int) -> Tensor:
    """Triangular mel filters (Slaney mel scale, area-normalised), ``(n_mels, n_fft/2 + 1)``."""

    def hz_to_mel(f):
        f = torch.as_tensor(f, dtype=torch.float64)
        lin = f / (200.0 / 3)
        log = 15.0 + torch.log(torch.clamp(f, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
        return torch.where(f >= 1000.0, log, lin)

    def mel_to_hz(m):
        lin = m * (200.0 / 3)
        log = 1000.0 * torch.exp((math.log(6.4) / 27.0) * (m - 15.0))
        return torch.where(m >= 15.0, log, lin)

    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    pts = mel_to_hz(torch.linspace(hz_to_mel(0.0).item(), hz_to_mel(sr / 2).item(), n_mels + 2, dtype=torch.float64))
    lower = (freqs[None] - pts[:-2, None]) / (pts[1:-1, None] - pts[:-2, None])
    upper = (pts[2:, None] - freqs[None]) / (pts[2:, None] - pts[1:-1, None])
    fb = torch.clamp(torch.minimum(lower, upper), min=0.0)
    fb = fb * (2.0 / (pts[2:] - pts[:-2]))[:, None]
    return fb.float()


class MelSpectrogram(nn.Module):
    """RVC's training mel: reflect-pad (n_fft − hop)/2, STFT (no centering), magnitude, mel, log."""

    def __init__(self, sr: int = 40000, n_fft: int = 2048, hop: int = 400, win: int = 2048, n_mels: int = 125):
        super().__init__()
        self.n_fft, self.hop, self.win = n_fft, hop, win
        self.register_buffer("window", torch.hann_window(win), persistent=False)
        self.register_buffer("fb", _mel_filters(sr, n_fft, n_mels), persistent=False)

    def forward(self, y: Tensor) -> Tensor:
        p = (self.n_fft - self.hop) // 2
        y = F.pad(y, (p, p), mode="reflect").squeeze(1)
        spec = torch.stft(y, self.n_fft, self.hop, self.win, self.window, center=False, return_complex=True)
        mag = torch.sqrt(spec.real.square() + spec.imag.square() + 1e-6)
        return torch.log(torch.clamp(self.fb @ mag, min=1e-5))


def adamw(params) -> torch.optim.Optimizer | None:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.8, 0.99), eps=1e-9) if params else None


def gan_step(G: nn.Module, D: nn.Module, mel: MelSpectrogram, opt_g, opt_d, inputs, wave: Tensor) -> Callable[[], None]:
    """One RVC training step (D step, then G step) as a closure; ``opt_g`` is ``None`` for a frozen G."""
    x, f0, g = inputs

    def step() -> None:
        z = x.detach().clone().requires_grad_(True)  # the posterior encoder's output: it trains in RVC
        y_hat = G(z, f0, g, generator=torch.Generator().manual_seed(0))
        # D step
        rs, gs, _, _ = D(wave, y_hat.detach())
        loss_d = discriminator_loss(rs, gs)[0]
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G step (D's gradients are computed too, as in RVC)
        _, gs, frs, fgs = D(wave, y_hat)
        loss_g = generator_loss(gs)[0] + feature_loss(frs, fgs) + 45.0 * F.l1_loss(mel(y_hat), mel(wave))
        if opt_g is not None:
            opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        if opt_g is not None:
            opt_g.step()

    return step


def fold_weight_norm(model: nn.Module) -> nn.Module:
    """Fold every weight_norm (legacy or parametrization) into a plain ``weight``, in place."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if hasattr(m, "weight_g") and hasattr(m, "weight_v"):
            torch.nn.utils.remove_weight_norm(m)
        elif parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


def discriminator_flops(D: nn.Module, wave: Tensor) -> float:
    """Forward flops of ``D`` on one wave (its Conv1d/Conv2d layers)."""
    total = [0.0]

    def hook(mod, args, out):
        k = math.prod(mod.kernel_size)
        total[0] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * k

    hooks = [m.register_forward_hook(hook) for m in D.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    try:
        with torch.no_grad():
            for d in D.discriminators:
                d(wave)
    finally:
        for h in hooks:
            h.remove()
    return total[0]
