"""RVC's multi-period discriminator and its training losses.

Written here from RVC's public code (``infer/lib/infer_pack/models.py``, ``train/losses.py``; facts in
``docs/rvc.md``). :class:`MultiPeriodDiscriminator` (v1 models, periods 2, 3, 5, 7, 11, 17) and
:class:`MultiPeriodDiscriminatorV2` (v2 models, adds 23 and 37) have RVC's keys and shapes, so a
pretrained ``f0D40k.pth``'s ``model`` loads strictly. Every conv is weight-normed (legacy by default;
``weight_norm="parametrizations"`` for Applio's in-memory form; ``use_spectral_norm=True`` as RVC's flag).

``shrink`` (default 1, RVC's sizes) divides every channel and group count: a tiny discriminator with the
same structure, for fast tests of training code. A shrunk discriminator does not load RVC's files.

Losses (RVC's return values): :func:`discriminator_loss` → ``(loss, r_losses, g_losses)``,
:func:`generator_loss` → ``(loss, gen_losses)``, :func:`feature_loss` → ``2·Σ mean|fmap_r − fmap_g|``
(``fmap_r`` detached), :func:`kl_loss` → the masked KL term of the posterior against the prior.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rvc import LRELU_SLOPE, WEIGHT_NORM_MODES, _weight_norm

__all__ = [
    "PERIODS_V1",
    "PERIODS_V2",
    "DiscriminatorP",
    "DiscriminatorS",
    "MultiPeriodDiscriminator",
    "MultiPeriodDiscriminatorV2",
    "build_discriminator",
    "discriminator_loss",
    "feature_loss",
    "generator_loss",
    "kl_loss",
]

PERIODS_V1 = (2, 3, 5, 7, 11, 17)
PERIODS_V2 = (2, 3, 5, 7, 11, 17, 23, 37)


def _norm(module: nn.Module, use_spectral_norm: bool, weight_norm: str) -> nn.Module:
    if use_spectral_norm:
        return torch.nn.utils.spectral_norm(module)
    return _weight_norm(module, weight_norm, None)


def _check(shrink: int, weight_norm: str) -> None:
    if isinstance(shrink, bool) or not isinstance(shrink, int) or shrink < 1:
        raise ValueError(f"shrink must be an int >= 1, got {shrink!r}")
    if weight_norm not in WEIGHT_NORM_MODES:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORM_MODES}, got {weight_norm!r}")


def _narrow(c: int, shrink: int) -> int:
    return max(1, c // shrink)


class DiscriminatorS(nn.Module):
    """The scale discriminator on the raw wave ``(B, 1, T)`` → ``(scores (B, N), feature maps)``."""

    def __init__(self, use_spectral_norm: bool = False, *, weight_norm: str = "legacy", shrink: int = 1) -> None:
        super().__init__()
        _check(shrink, weight_norm)

        def n(c: int) -> int:
            return _narrow(c, shrink)

        spec = [
            (1, 16, 15, 1, 1, 7),
            (16, 64, 41, 4, 4, 20),
            (64, 256, 41, 4, 16, 20),
            (256, 1024, 41, 4, 64, 20),
            (1024, 1024, 41, 4, 256, 20),
            (1024, 1024, 5, 1, 1, 2),
        ]
        self.convs = nn.ModuleList(
            _norm(
                nn.Conv1d(1 if i == 1 else n(i), n(o), k, s, groups=1 if g == 1 else n(g), padding=p),
                use_spectral_norm,
                weight_norm,
            )
            for i, o, k, s, g, p in spec
        )
        self.conv_post = _norm(nn.Conv1d(n(1024), 1, 3, 1, padding=1), use_spectral_norm, weight_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class DiscriminatorP(nn.Module):
    """The period-``p`` discriminator: the wave reflect-padded to a multiple of ``p``, viewed as ``(T/p, p)``."""

    def __init__(
        self,
        period: int,
        kernel_size: int = 5,
        stride: int = 3,
        use_spectral_norm: bool = False,
        *,
        weight_norm: str = "legacy",
        shrink: int = 1,
    ) -> None:
        super().__init__()
        _check(shrink, weight_norm)
        self.period = int(period)
        pad = (kernel_size - 1) // 2

        def n(c: int) -> int:
            return _narrow(c, shrink)

        chans = [
            (1, n(32), stride),
            (n(32), n(128), stride),
            (n(128), n(512), stride),
            (n(512), n(1024), stride),
            (n(1024), n(1024), 1),
        ]
        self.convs = nn.ModuleList(
            _norm(nn.Conv2d(i, o, (kernel_size, 1), (s, 1), padding=(pad, 0)), use_spectral_norm, weight_norm)
            for i, o, s in chans
        )
        self.conv_post = _norm(nn.Conv2d(n(1024), 1, (3, 1), 1, padding=(1, 0)), use_spectral_norm, weight_norm)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        b, c, t = x.shape
        if t % self.period:
            n_pad = self.period - t % self.period
            x = F.pad(x, (0, n_pad), "reflect")
            t = t + n_pad
        x = x.view(b, c, t // self.period, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), LRELU_SLOPE)
            fmap.append(x)
        x = self.conv_post(x)
        fmap.append(x)
        return torch.flatten(x, 1, -1), fmap


class MultiPeriodDiscriminator(nn.Module):
    """v1: one :class:`DiscriminatorS` and one :class:`DiscriminatorP` per period of ``PERIODS_V1``.

    ``forward(y, y_hat)`` → ``(y_d_rs, y_d_gs, fmap_rs, fmap_gs)``: each sub-discriminator's scores and
    feature maps on the real and on the generated wave.
    """

    periods: tuple[int, ...] = PERIODS_V1

    def __init__(self, use_spectral_norm: bool = False, *, weight_norm: str = "legacy", shrink: int = 1) -> None:
        super().__init__()
        kw = {"weight_norm": weight_norm, "shrink": shrink}
        discs: list[nn.Module] = [DiscriminatorS(use_spectral_norm, **kw)]
        discs += [DiscriminatorP(p, use_spectral_norm=use_spectral_norm, **kw) for p in self.periods]
        self.discriminators = nn.ModuleList(discs)

    def forward(
        self, y: Tensor, y_hat: Tensor
    ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[list[Tensor]]]:
        y_d_rs, y_d_gs, fmap_rs, fmap_gs = [], [], [], []
        for d in self.discriminators:
            y_d_r, fmap_r = d(y)
            y_d_g, fmap_g = d(y_hat)
            y_d_rs.append(y_d_r)
            y_d_gs.append(y_d_g)
            fmap_rs.append(fmap_r)
            fmap_gs.append(fmap_g)
        return y_d_rs, y_d_gs, fmap_rs, fmap_gs


class MultiPeriodDiscriminatorV2(MultiPeriodDiscriminator):
    """v2: as :class:`MultiPeriodDiscriminator` with the periods of ``PERIODS_V2``."""

    periods = PERIODS_V2


def build_discriminator(
    version: str = "v2", *, weight_norm: str = "legacy", shrink: int = 1, seed: int | None = None
) -> MultiPeriodDiscriminator:
    """RVC's discriminator for ``version`` (``"v1"`` or ``"v2"``); ``seed`` makes the init reproducible."""
    classes = {"v1": MultiPeriodDiscriminator, "v2": MultiPeriodDiscriminatorV2}
    if version not in classes:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    if seed is None:
        return classes[version](weight_norm=weight_norm, shrink=shrink)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return classes[version](weight_norm=weight_norm, shrink=shrink)


# --------------------------------------------------------------------------- losses (train/losses.py)


def feature_loss(fmap_r: Sequence[Sequence[Tensor]], fmap_g: Sequence[Sequence[Tensor]]) -> Tensor:
    """Feature matching: ``2 · Σ mean|fmap_r.detach() − fmap_g|`` over every sub-discriminator's maps (fp32)."""
    loss = 0
    for dr, dg in zip(fmap_r, fmap_g):
        for rl, gl in zip(dr, dg):
            loss = loss + torch.mean(torch.abs(rl.float().detach() - gl.float()))
    return loss * 2


def discriminator_loss(
    disc_real_outputs: Sequence[Tensor], disc_generated_outputs: Sequence[Tensor]
) -> tuple[Tensor, list[float], list[float]]:
    """LSGAN discriminator loss ``Σ mean((1 − D(real))²) + mean(D(fake)²)``, with each term as a float."""
    loss = 0
    r_losses, g_losses = [], []
    for dr, dg in zip(disc_real_outputs, disc_generated_outputs):
        r_loss = torch.mean((1 - dr.float()) ** 2)
        g_loss = torch.mean(dg.float() ** 2)
        loss = loss + r_loss + g_loss
        r_losses.append(r_loss.item())
        g_losses.append(g_loss.item())
    return loss, r_losses, g_losses


def generator_loss(disc_outputs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """LSGAN generator loss ``Σ mean((1 − D(fake))²)`` and each term."""
    loss = 0
    gen_losses = []
    for dg in disc_outputs:
        term = torch.mean((1 - dg.float()) ** 2)
        gen_losses.append(term)
        loss = loss + term
    return loss, gen_losses


def kl_loss(z_p: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, z_mask: Tensor) -> Tensor:
    """``Σ (logs_p − logs_q − ½ + ½ (z_p − m_p)² e^(−2 logs_p)) · mask / Σ mask`` (fp32)."""
    z_p, logs_q, m_p, logs_p, z_mask = (t.float() for t in (z_p, logs_q, m_p, logs_p, z_mask))
    kl = logs_p - logs_q - 0.5
    kl = kl + 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask) / torch.sum(z_mask)
