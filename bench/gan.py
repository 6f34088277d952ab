"""Bench-only: RVC's multi-period discriminator, its losses and one GAN training step (v1, 40k).

Written from the public description of RVC's training code, for timing a whole training step
the way a user runs it: the decoder's forward, a discriminator step on (real, generated.detach()),
then a generator step with the adversarial, feature-matching and mel losses. D trains in every
setup (AdamW, lr 1e-4, betas (0.8, 0.99), eps 1e-9, as RVC), and during the G step D's parameter
gradients are computed too (RVC zeroes them before the next D step).

Not included: RVC's KL term, which belongs to the posterior/prior encoders and the flow — parts
of the synthesizer this package does not model; the decoder's input latent requires grad, as it
does in RVC (the posterior encoder before it trains), so every setup back-propagates through the
decoder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MultiPeriodDiscriminator", "MelSpectrogram", "fold_weight_norm", "gan_step", "discriminator_flops"]

PERIODS_V1 = (2, 3, 5, 7, 11, 17)
LRELU = 0.1


def _wn(m: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*weight_norm.*deprecated", category=FutureWarning)
        return torch.nn.utils.weight_norm(m)


def _narrow(c: int, shrink: int) -> int:
    return max(1, c // shrink)


class DiscriminatorS(nn.Module):
    def __init__(self, shrink: int = 1) -> None:
        super().__init__()
        spec = [(1, 16, 15, 1, 1, 7), (16, 64, 41, 4, 4, 20), (64, 256, 41, 4, 16, 20), (256, 1024, 41, 4, 64, 20),
                (1024, 1024, 41, 4, 256, 20), (1024, 1024, 5, 1, 1, 2)]
        n = functools.partial(_narrow, shrink=shrink)
        self.convs = nn.ModuleList(_wn(nn.Conv1d(n(i) if i > 1 else 1, n(o), k, s, groups=n(g) if i > 1 else 1,
                                                 padding=p))
                                   for i, o, k, s, g, p in spec)
        self.conv_post = _wn(nn.Conv1d(n(1024), 1, 3, 1, padding=1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        fmap = []
        for c in self.convs:
            x = F.leaky_relu(c(x), LRELU)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class DiscriminatorP(nn.Module):
    def __init__(self, period: int, shrink: int = 1) -> None:
        super().__init__()
        self.period = period
        n = functools.partial(_narrow, shrink=shrink)
        chans = [(1, n(32)), (n(32), n(128)), (n(128), n(512)), (n(512), n(1024))]
        self.convs = nn.ModuleList(_wn(nn.Conv2d(i, o, (5, 1), (3, 1), padding=(2, 0))) for i, o in chans)
        self.convs.append(_wn(nn.Conv2d(n(1024), n(1024), (5, 1), 1, padding=(2, 0))))
        self.conv_post = _wn(nn.Conv2d(n(1024), 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            pad = self.period - t % self.period
            x = F.pad(x, (0, pad), "reflect")
            t = t + pad
        x = x.view(b, c, t // self.period, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class MultiPeriodDiscriminator(nn.Module):
    """One DiscriminatorS and one DiscriminatorP per period; every conv weight-normed (legacy).

    ``shrink`` divides every channel count (and group count): the smoke test's tiny version.
    """

    def __init__(self, periods: Sequence[int] = PERIODS_V1, shrink: int = 1) -> None:
        super().__init__()
        self.discriminators = nn.ModuleList([DiscriminatorS(shrink)] + [DiscriminatorP(p, shrink) for p in periods])

    def forward(self, y: Tensor, y_hat: Tensor):
        rs, gs, frs, fgs = [], [], [], []
        for d in self.discriminators:
            r, fr = d(y)
            g, fg = d(y_hat)
            rs.append(r), gs.append(g), frs.append(fr), fgs.append(fg)
        return rs, gs, frs, fgs


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


def discriminator_loss(real: list[Tensor], fake: list[Tensor]) -> Tensor:
    return sum(torch.mean((1 - r) ** 2) + torch.mean(g**2) for r, g in zip(real, fake))


def generator_loss(fake: list[Tensor]) -> Tensor:
    return sum(torch.mean((1 - g) ** 2) for g in fake)


def feature_loss(fmap_r, fmap_g) -> Tensor:
    return 2 * sum(torch.mean(torch.abs(r.detach() - g)) for dr, dg in zip(fmap_r, fmap_g) for r, g in zip(dr, dg))


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
        loss_d = discriminator_loss(rs, gs)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G step (D's gradients are computed too, as in RVC)
        _, gs, frs, fgs = D(wave, y_hat)
        loss_g = generator_loss(gs) + feature_loss(frs, fgs) + 45.0 * F.l1_loss(mel(y_hat), mel(wave))
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
