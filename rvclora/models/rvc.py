"""RVC's NSF-HiFiGAN generator (the decoder ``dec`` of RVC's ``SynthesizerTrn…`` models).

Written from RVC's published code; the facts it relies on are in ``docs/rvc.md``.
The parameter names and shapes are RVC's own,
so a state dict of RVC's decoder (the ``dec.`` keys, prefix stripped) loads strictly into
:class:`GeneratorNSF` (f0 models) or :class:`Generator` (no-f0 models), and back.

Layout (``c_i = upsample_initial_channel / 2^(i+1)``, legacy ``weight_norm``)::

    m_source.l_linear              Linear(harmonics + 1, 1)
    conv_pre                       Conv1d(inter_channels, 512, 7, padding=3)
    cond                           Conv1d(gin_channels, 512, 1)
    ups.{i}                        weight_norm(ConvTranspose1d(2·c_i, c_i, k_i, u_i, padding=(k_i-u_i)//2))
    noise_convs.{i}                Conv1d(1, c_i, 2·s_i, stride s_i, padding s_i//2), s_i = Π u_{i+1:}
                                   (a 1×1 conv for the last stage)
    resblocks.{3i+j}.convs1.{0,1,2}  weight_norm(Conv1d(c_i, c_i, k_j, dilation d, padding (k_j·d-d)/2))
    resblocks.{3i+j}.convs2.{0,1,2}  weight_norm(Conv1d(c_i, c_i, k_j, padding (k_j-1)/2))
    conv_post                      Conv1d(c_last, 1, 7, padding=3, bias=False)

The harmonic source (:class:`SineGen`) is random (additive noise, and a random initial phase
for harmonics above the fundamental). Every forward takes an optional ``generator``
(a :class:`torch.Generator`); passing generators seeded alike makes two calls, or two
models, see exactly the same source signal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONFIG_ALIASES",
    "GENERATOR_CONFIGS",
    "LRELU_SLOPE",
    "WEIGHT_NORM_MODES",
    "Generator",
    "GeneratorConfig",
    "GeneratorNSF",
    "ResBlock1",
    "SineGen",
    "SourceModuleHnNSF",
    "build_generator",
    "generator_from_config",
    "get_generator_config",
]

#: Leaky-ReLU slope between the layers (the one after the last stage uses PyTorch's 0.01).
LRELU_SLOPE = 0.1

#: ``"legacy"``: ``torch.nn.utils.weight_norm`` (keys ``weight_g``/``weight_v``, RVC's files);
#: ``"parametrizations"``: ``torch.nn.utils.parametrizations.weight_norm``
#: (keys ``parametrizations.weight.original0``/``original1``).
WEIGHT_NORM_MODES = ("legacy", "parametrizations")


@dataclass(frozen=True)
class GeneratorConfig:
    """The decoder hyper-parameters of one RVC config.

    ``segment_frames`` is the training segment length in frames (RVC's ``segment_size / hop``).
    """

    name: str
    version: str
    sampling_rate: int
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    segment_frames: int
    inter_channels: int = 192
    upsample_initial_channel: int = 512
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    gin_channels: int = 256

    @property
    def hop_length(self) -> int:
        """Output samples per input frame: the product of the upsample rates."""
        return math.prod(self.upsample_rates)

    @property
    def sr_label(self) -> str:
        """RVC's short sample-rate label (``"40k"``)."""
        return f"{self.sampling_rate // 1000}k"


def _cfg(
    name: str, version: str, sr: int, rates: Sequence[int], kernels: Sequence[int], frames: int
) -> GeneratorConfig:
    return GeneratorConfig(name, version, sr, tuple(rates), tuple(kernels), frames)


#: The shipped RVC configs (docs/rvc.md). 40k uses the v1 config for v1 and v2 models.
GENERATOR_CONFIGS: dict[str, GeneratorConfig] = {
    c.name: c
    for c in (
        _cfg("v1-32k", "v1", 32000, (10, 4, 2, 2, 2), (16, 16, 4, 4, 4), 40),
        _cfg("40k", "v1", 40000, (10, 10, 2, 2), (16, 16, 4, 4), 32),
        _cfg("v1-48k", "v1", 48000, (10, 6, 2, 2, 2), (16, 16, 4, 4, 4), 24),
        _cfg("v2-32k", "v2", 32000, (10, 8, 2, 2), (20, 16, 4, 4), 40),
        _cfg("v2-48k", "v2", 48000, (12, 10, 2, 2), (24, 20, 4, 4), 36),
    )
}

#: Other spellings accepted by :func:`get_generator_config`.
CONFIG_ALIASES: dict[str, str] = {"v1-40k": "40k", "v2-40k": "40k"}


def get_generator_config(name: str) -> GeneratorConfig:
    """The :class:`GeneratorConfig` named ``name`` (one of :data:`GENERATOR_CONFIGS` or an alias)."""
    if not isinstance(name, str):
        raise TypeError(f"config name must be a str, got {type(name).__name__}")
    key = CONFIG_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in GENERATOR_CONFIGS:
        known = sorted(GENERATOR_CONFIGS) + sorted(CONFIG_ALIASES)
        raise ValueError(f"unknown RVC generator config {name!r}; expected one of {known}")
    return GENERATOR_CONFIGS[key]


def _get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def _weight_norm(module: nn.Module, mode: str, init_std: float | None) -> nn.Module:
    # RVC applies normal(0, 0.01) to ``.weight`` *after* wrapping, which legacy weight_norm
    # recomputes from g and v on the next forward; initialising the plain weight first and
    # then deriving g and v from it is the init RVC's code intends.
    if init_std is not None:
        with torch.no_grad():
            module.weight.normal_(0.0, init_std)
    if mode == "legacy":
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*torch\.nn\.utils\.weight_norm.*deprecated", category=FutureWarning
            )
            return torch.nn.utils.weight_norm(module)
    if mode == "parametrizations":
        return torch.nn.utils.parametrizations.weight_norm(module)
    raise ValueError(f"weight_norm must be one of {WEIGHT_NORM_MODES}, got {mode!r}")


_INIT_STD = 0.01


class SineGen(nn.Module):
    """Harmonic sine source of NSF: sines at ``f0·(1..H+1)`` on voiced samples, noise elsewhere.

    No parameters. ``f0: (B, T)`` in Hz at the frame rate → ``(B, T·upp, H+1)`` at the sample
    rate. The frequency is held per frame; the phase runs continuously across frames (computed
    per frame, then within the frame, so float32 stays exact for long inputs). Voiced samples
    (``f0 > voiced_threshold``) get ``sine_amp·sin(φ) + N(0, noise_std²)``, unvoiced ones
    ``N(0, (sine_amp/3)²)``. The fundamental starts at phase 0, higher harmonics at a random one.
    """

    def __init__(
        self,
        sampling_rate: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        noise_std: float = 0.003,
        voiced_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.sampling_rate = int(sampling_rate)
        self.harmonic_num = int(harmonic_num)
        self.dim = self.harmonic_num + 1
        self.sine_amp = float(sine_amp)
        self.noise_std = float(noise_std)
        self.voiced_threshold = float(voiced_threshold)

    def forward(self, f0: Tensor, upp: int, generator: torch.Generator | None = None) -> Tensor:
        batch, frames = f0.shape
        with torch.no_grad():
            f0 = f0.to(torch.float32)
            harmonics = torch.arange(1, self.dim + 1, device=f0.device, dtype=torch.float32)
            inc = torch.remainder(f0[:, :, None] * harmonics / self.sampling_rate, 1.0)  # cycles/sample (B,T,H)
            frame_adv = torch.remainder(inc * upp, 1.0)
            start = torch.cumsum(frame_adv, dim=1) - frame_adv  # phase at each frame's start
            init_phase = _rand((batch, 1, self.dim), generator, f0.device)
            init_phase[:, :, 0] = 0.0
            start = torch.remainder(start + init_phase, 1.0)
            steps = torch.arange(1, upp + 1, device=f0.device, dtype=torch.float32)
            phase = start[:, :, None, :] + steps[None, None, :, None] * inc[:, :, None, :]  # (B,T,upp,H)
            sine = self.sine_amp * torch.sin(2 * math.pi * torch.remainder(phase, 1.0))
            sine = sine.reshape(batch, frames * upp, self.dim)
            uv = (f0 > self.voiced_threshold).to(torch.float32).repeat_interleave(upp, dim=1)[:, :, None]
            noise_amp = uv * self.noise_std + (1.0 - uv) * (self.sine_amp / 3)
            noise = noise_amp * _randn(sine.shape, generator, f0.device)
            return sine * uv + noise


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: :class:`SineGen` → ``l_linear`` → tanh. ``(B, T)`` → ``(B, T·upp, 1)``."""

    def __init__(
        self,
        sampling_rate: int,
        harmonic_num: int = 0,
        sine_amp: float = 0.1,
        add_noise_std: float = 0.003,
        voiced_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.l_sin_gen = SineGen(sampling_rate, harmonic_num, sine_amp, add_noise_std, voiced_threshold)
        self.l_linear = nn.Linear(harmonic_num + 1, 1)
        self.l_tanh = nn.Tanh()

    def forward(self, f0: Tensor, upp: int, generator: torch.Generator | None = None) -> Tensor:
        sine = self.l_sin_gen(f0, upp, generator).to(self.l_linear.weight.dtype)
        return self.l_tanh(self.l_linear(sine))


class ResBlock1(nn.Module):
    """HiFi-GAN ResBlock type 1: three (lrelu → dilated conv → lrelu → conv) + residual steps."""

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        dilation: Sequence[int] = (1, 3, 5),
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            _weight_norm(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=_get_padding(kernel_size, d)),
                weight_norm,
                _INIT_STD,
            )
            for d in dilation
        )
        self.convs2 = nn.ModuleList(
            _weight_norm(
                nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=_get_padding(kernel_size, 1)),
                weight_norm,
                _INIT_STD,
            )
            for _ in dilation
        )

    def forward(self, x: Tensor) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class _HiFiGANBody(nn.Module):
    """What :class:`Generator` and :class:`GeneratorNSF` share: conv_pre, cond, ups, resblocks, conv_post."""

    def __init__(
        self,
        initial_channel: int,
        resblock: str,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        gin_channels: int,
        weight_norm: str,
        sr: int | None,
    ) -> None:
        super().__init__()
        if str(resblock) != "1":
            raise ValueError(f"resblock must be '1' (the type every shipped RVC config uses), got {resblock!r}")
        if len(upsample_rates) != len(upsample_kernel_sizes) or not upsample_rates:
            raise ValueError(
                f"upsample_rates {list(upsample_rates)} and upsample_kernel_sizes {list(upsample_kernel_sizes)} "
                "must be non-empty and of equal length"
            )
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes):
            raise ValueError(
                f"resblock_kernel_sizes {list(resblock_kernel_sizes)} and resblock_dilation_sizes "
                f"{[list(d) for d in resblock_dilation_sizes]} must have equal length"
            )
        if weight_norm not in WEIGHT_NORM_MODES:
            raise ValueError(f"weight_norm must be one of {WEIGHT_NORM_MODES}, got {weight_norm!r}")
        self.initial_channel = int(initial_channel)
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_rates = tuple(int(u) for u in upsample_rates)
        self.upp = math.prod(self.upsample_rates)
        self.gin_channels = int(gin_channels)

        # Registration order follows RVC's, so state_dict() lists the keys in RVC's order.
        if sr is not None:
            self.sampling_rate = int(sr)
            self.m_source = SourceModuleHnNSF(sampling_rate=self.sampling_rate, harmonic_num=0)
            self.noise_convs = nn.ModuleList()
            for i in range(self.num_upsamples):
                c_cur = upsample_initial_channel // (2 ** (i + 1))
                if i + 1 < self.num_upsamples:
                    stride_f0 = math.prod(self.upsample_rates[i + 1 :])
                    conv = nn.Conv1d(1, c_cur, kernel_size=stride_f0 * 2, stride=stride_f0, padding=stride_f0 // 2)
                else:
                    conv = nn.Conv1d(1, c_cur, kernel_size=1)
                self.noise_convs.append(conv)
        self.conv_pre = nn.Conv1d(initial_channel, upsample_initial_channel, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            conv = nn.ConvTranspose1d(
                upsample_initial_channel // (2**i),
                upsample_initial_channel // (2 ** (i + 1)),
                k,
                u,
                padding=(k - u) // 2,
            )
            self.ups.append(_weight_norm(conv, weight_norm, _INIT_STD))
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for i in range(self.num_upsamples):
            ch = upsample_initial_channel // (2 ** (i + 1))
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(ch, k, d, weight_norm))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        if gin_channels != 0:
            self.cond = nn.Conv1d(gin_channels, upsample_initial_channel, 1)

    def _check_inputs(self, x: Tensor, g: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[1] != self.initial_channel:
            raise ValueError(f"x must be (batch, {self.initial_channel}, frames), got shape {tuple(x.shape)}")
        if g is not None:
            if self.gin_channels == 0:
                raise ValueError("g was given but this generator has no speaker conditioning (gin_channels=0)")
            if g.dim() != 3 or g.shape[0] != x.shape[0] or g.shape[1] != self.gin_channels:
                raise ValueError(
                    f"g must be ({x.shape[0]}, {self.gin_channels}, 1 or frames), got shape {tuple(g.shape)}"
                )

    def _decode(self, x: Tensor, g: Tensor | None, source: Tensor | None) -> Tensor:
        """The shared forward; ``source: (B, 1, T·hop)`` is the harmonic source (NSF) or ``None``."""
        x = self.conv_pre(x)
        if g is not None:
            x = x + self.cond(g)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            if source is not None:
                x = x + self.noise_convs[i](source)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(i * self.num_kernels + 1, (i + 1) * self.num_kernels):
                xs = xs + self.resblocks[j](x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        return torch.tanh(x)


class GeneratorNSF(_HiFiGANBody):
    """RVC's NSF-HiFiGAN decoder for f0 models.

    ``forward(x, f0, g=None)``: ``x: (B, initial_channel, T)`` latent frames, ``f0: (B, T)`` pitch
    in Hz (0 = unvoiced), ``g: (B, gin_channels, 1)`` speaker embedding → ``(B, 1, T·hop)``.
    """

    def __init__(
        self,
        initial_channel: int,
        resblock: str,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        gin_channels: int,
        sr: int,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__(
            initial_channel,
            resblock,
            resblock_kernel_sizes,
            resblock_dilation_sizes,
            upsample_rates,
            upsample_initial_channel,
            upsample_kernel_sizes,
            gin_channels,
            weight_norm,
            sr,
        )

    def forward(
        self, x: Tensor, f0: Tensor, g: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """``generator`` seeds the harmonic source's noise (default: torch's global RNG)."""
        self._check_inputs(x, g)
        if f0.dim() != 2 or f0.shape[0] != x.shape[0] or f0.shape[1] != x.shape[2]:
            raise ValueError(f"f0 must be (batch, frames) = ({x.shape[0]}, {x.shape[2]}), got shape {tuple(f0.shape)}")
        source = self.m_source(f0, self.upp, generator).transpose(1, 2)
        return self._decode(x, g, source)


class Generator(_HiFiGANBody):
    """RVC's HiFi-GAN decoder for no-f0 models. ``forward(x, g=None)`` → ``(B, 1, T·hop)``."""

    def __init__(
        self,
        initial_channel: int,
        resblock: str,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        gin_channels: int = 0,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__(
            initial_channel,
            resblock,
            resblock_kernel_sizes,
            resblock_dilation_sizes,
            upsample_rates,
            upsample_initial_channel,
            upsample_kernel_sizes,
            gin_channels,
            weight_norm,
            None,
        )

    def forward(self, x: Tensor, g: Tensor | None = None) -> Tensor:
        self._check_inputs(x, g)
        return self._decode(x, g, None)


def generator_from_config(
    config: GeneratorConfig, f0: bool = True, weight_norm: str = "legacy"
) -> GeneratorNSF | Generator:
    """A freshly initialised decoder for ``config`` (:class:`GeneratorNSF` if ``f0`` else :class:`Generator`)."""
    args = (
        config.inter_channels,
        config.resblock,
        config.resblock_kernel_sizes,
        config.resblock_dilation_sizes,
        config.upsample_rates,
        config.upsample_initial_channel,
        config.upsample_kernel_sizes,
        config.gin_channels,
    )
    if f0:
        return GeneratorNSF(*args, sr=config.sampling_rate, weight_norm=weight_norm)
    return Generator(*args, weight_norm=weight_norm)


def build_generator(
    name: str | GeneratorConfig = "40k",
    f0: bool = True,
    seed: int | None = None,
    weight_norm: str = "legacy",
) -> GeneratorNSF | Generator:
    """The decoder of the RVC config ``name`` (e.g. ``"40k"``, ``"v2-48k"``).

    ``seed`` makes the random initialisation reproducible without touching torch's global RNG.
    """
    config = name if isinstance(name, GeneratorConfig) else get_generator_config(name)
    if not isinstance(f0, bool):
        raise TypeError(f"f0 must be a bool, got {f0!r}")
    if seed is None:
        return generator_from_config(config, f0, weight_norm)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generator_from_config(config, f0, weight_norm)
