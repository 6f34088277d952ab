"""RVC's whole synthesizer: ``SynthesizerTrnMs256NSFsid`` (v1), ``SynthesizerTrnMs768NSFsid`` (v2) and
their ``_nono`` variants (no f0).

Written here from RVC's public code (``infer/lib/infer_pack/{models,modules,attentions,commons}.py``);
the facts it relies on are in ``docs/rvc.md``. The module tree, the state-dict keys, their order and
shapes are RVC's, so a checkpoint's ``model`` (or an export's ``weight`` plus an ``enc_q``) loads
strictly, and RVC's own inference loads what this writes. The decoder ``dec`` is
:class:`rvclora.models.rvc.GeneratorNSF` (f0) or :class:`~rvclora.models.rvc.Generator` (no f0).

Parts (v1 40k; v2 takes 768-dim phone features)::

    enc_p   TextEncoder: emb_phone Linear(256|768 → 192), emb_pitch Embedding(256, 192) (f0 only),
            encoder (6 × relative-position self-attention + FFN, channel LayerNorms), proj 1×1 → 2·192
    dec     the NSF-HiFiGAN generator (rvclora.models.rvc)
    enc_q   PosteriorEncoder: pre 1×1 (spec → 192), WN (16 layers, k 5), proj 1×1 → 2·192 (training only)
    flow    ResidualCouplingBlock: 4 × (ResidualCouplingLayer [pre, WN (3 layers, k 5), post], Flip)
    emb_g   Embedding(spk_embed_dim 109, gin 256): the speaker embedding

Every random draw (the posterior sample, the training slice, the prior sample in :meth:`infer`, the
decoder's harmonic source) takes an optional keyword ``generator`` (a :class:`torch.Generator`);
two calls, or two models, given generators seeded alike draw the same numbers.

``weight_norm="legacy"`` (RVC: ``weight_g``/``weight_v``) or ``"parametrizations"`` (Applio's form in
memory: ``parametrizations.weight.original0/1``) applies to every weight-normed layer (the decoder's
``ups`` and resblocks, the WN layers of ``enc_q`` and ``flow``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rvc import (
    WEIGHT_NORM_MODES,
    Generator,
    GeneratorConfig,
    GeneratorNSF,
    _rand,
    _randn,
    _weight_norm,
    get_generator_config,
)

__all__ = [
    "SYNTHESIZER_CONFIGS",
    "FFN",
    "Flip",
    "LayerNorm",
    "MultiHeadAttention",
    "PosteriorEncoder",
    "RelativeEncoder",
    "ResidualCouplingBlock",
    "ResidualCouplingLayer",
    "SynthesizerConfig",
    "SynthesizerTrnMs256NSFsid",
    "SynthesizerTrnMs256NSFsid_nono",
    "SynthesizerTrnMs768NSFsid",
    "SynthesizerTrnMs768NSFsid_nono",
    "TextEncoder",
    "WN",
    "build_synthesizer",
    "get_synthesizer_config",
    "rand_slice_segments",
    "sequence_mask",
    "slice_segments",
    "slice_segments2",
    "synthesizer_class",
    "synthesizer_from_rvc_config",
]

_SR_LABELS = {"32k": 32000, "40k": 40000, "48k": 48000}
# RVC passes these in **kwargs (``is_half`` from its config, ``use_spectral_norm`` in ``**hps.model``);
# neither changes the synthesizer.
_IGNORED_KWARGS = ("is_half", "use_spectral_norm")


# --------------------------------------------------------------------------- helpers (commons.py)


def sequence_mask(length: Tensor, max_length: int | None = None) -> Tensor:
    """``(B, T)`` bool mask, True where the position is below the sequence's length."""
    if max_length is None:
        max_length = int(length.max())
    x = torch.arange(max_length, dtype=length.dtype, device=length.device)
    return x.unsqueeze(0) < length.unsqueeze(1)


def slice_segments(x: Tensor, ids_str: Tensor, segment_size: int = 4) -> Tensor:
    """``x: (B, C, T)`` → ``(B, C, segment_size)`` starting at ``ids_str[b]``."""
    ret = torch.zeros_like(x[:, :, :segment_size])
    for i in range(x.size(0)):
        start = int(ids_str[i])
        ret[i] = x[i, :, start : start + segment_size]
    return ret


def slice_segments2(x: Tensor, ids_str: Tensor, segment_size: int = 4) -> Tensor:
    """``x: (B, T)`` → ``(B, segment_size)`` starting at ``ids_str[b]`` (the pitch slice)."""
    ret = torch.zeros_like(x[:, :segment_size])
    for i in range(x.size(0)):
        start = int(ids_str[i])
        ret[i] = x[i, start : start + segment_size]
    return ret


def rand_slice_segments(
    x: Tensor,
    x_lengths: Tensor | int | None = None,
    segment_size: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A random ``segment_size`` slice of each sequence: ``(slices, start indices)``."""
    b, _, t = x.size()
    if x_lengths is None:
        x_lengths = t
    ids_str_max = x_lengths - segment_size + 1
    ids_str = (_rand((b,), generator, x.device) * ids_str_max).to(dtype=torch.long)
    return slice_segments(x, ids_str, segment_size), ids_str


def _fused_add_tanh_sigmoid_multiply(a: Tensor, b: Tensor, n_channels: int) -> Tensor:
    act = a + b
    return torch.tanh(act[:, :n_channels, :]) * torch.sigmoid(act[:, n_channels:, :])


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return _randn(tuple(x.shape), generator, x.device).to(x.dtype)


def _length(v: Tensor | int) -> int:
    return int(v.item()) if isinstance(v, Tensor) else int(v)


# --------------------------------------------------------------------------- text encoder (attentions.py)


class LayerNorm(nn.Module):
    """LayerNorm over the channel dim of ``(B, C, T)``: ``gamma``, ``beta``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, -1)
        x = F.layer_norm(x, (self.channels,), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


class MultiHeadAttention(nn.Module):
    """Self-attention with 1×1 Conv1d q/k/v/o and relative-position key/value embeddings (heads shared).

    ``emb_rel_k``/``emb_rel_v``: ``(1, 2·window + 1, channels / heads)``, drawn from
    normal(0, (channels/heads)^-½); ``conv_q``/``conv_k``/``conv_v`` Xavier-uniform.
    """

    def __init__(
        self, channels: int, out_channels: int, n_heads: int, p_dropout: float = 0.0, window_size: int | None = None
    ) -> None:
        super().__init__()
        if channels % n_heads:
            raise ValueError(f"channels={channels} must be a multiple of n_heads={n_heads}")
        self.channels = channels
        self.out_channels = out_channels
        self.n_heads = n_heads
        self.p_dropout = p_dropout
        self.window_size = window_size
        self.k_channels = channels // n_heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)
        if window_size is not None:
            std = self.k_channels**-0.5
            self.emb_rel_k = nn.Parameter(torch.randn(1, window_size * 2 + 1, self.k_channels) * std)
            self.emb_rel_v = nn.Parameter(torch.randn(1, window_size * 2 + 1, self.k_channels) * std)
        nn.init.xavier_uniform_(self.conv_q.weight)
        nn.init.xavier_uniform_(self.conv_k.weight)
        nn.init.xavier_uniform_(self.conv_v.weight)

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.conv_q(x), self.conv_k(c), self.conv_v(c)
        return self.conv_o(self._attention(q, k, v, attn_mask))

    def _attention(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        b, d, t_s = key.size()
        t_t = query.size(2)
        query = query.view(b, self.n_heads, self.k_channels, t_t).transpose(2, 3)
        key = key.view(b, self.n_heads, self.k_channels, t_s).transpose(2, 3)
        value = value.view(b, self.n_heads, self.k_channels, t_s).transpose(2, 3)
        query = query / math.sqrt(self.k_channels)
        scores = torch.matmul(query, key.transpose(-2, -1))
        if self.window_size is not None:
            if t_s != t_t:
                raise ValueError("relative attention is only available for self-attention")
            rel_k = self._relative_embeddings(self.emb_rel_k, t_s)
            rel_logits = torch.matmul(query, rel_k.unsqueeze(0).transpose(-2, -1))
            scores = scores + self._relative_to_absolute(rel_logits)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e4)
        p_attn = self.drop(F.softmax(scores, dim=-1))
        output = torch.matmul(p_attn, value)
        if self.window_size is not None:
            rel_v = self._relative_embeddings(self.emb_rel_v, t_s)
            output = output + torch.matmul(self._absolute_to_relative(p_attn), rel_v.unsqueeze(0))
        return output.transpose(2, 3).contiguous().view(b, d, t_t)

    def _relative_embeddings(self, emb: Tensor, length: int) -> Tensor:
        pad = max(length - (self.window_size + 1), 0)
        start = max((self.window_size + 1) - length, 0)
        if pad > 0:
            emb = F.pad(emb, [0, 0, pad, pad, 0, 0])
        return emb[:, start : start + 2 * length - 1]

    @staticmethod
    def _relative_to_absolute(x: Tensor) -> Tensor:
        """``(B, H, L, 2L−1)`` relative logits → ``(B, H, L, L)``."""
        batch, heads, length, _ = x.size()
        x = F.pad(x, [0, 1, 0, 0, 0, 0, 0, 0])
        x_flat = F.pad(x.view(batch, heads, length * 2 * length), [0, length - 1, 0, 0, 0, 0])
        return x_flat.view(batch, heads, length + 1, 2 * length - 1)[:, :, :length, length - 1 :]

    @staticmethod
    def _absolute_to_relative(x: Tensor) -> Tensor:
        """``(B, H, L, L)`` attention weights → ``(B, H, L, 2L−1)``."""
        batch, heads, length, _ = x.size()
        x = F.pad(x, [0, length - 1, 0, 0, 0, 0, 0, 0])
        x_flat = F.pad(x.view(batch, heads, length * length + length * (length - 1)), [length, 0, 0, 0, 0, 0])
        return x_flat.view(batch, heads, length, 2 * length)[:, :, :, 1:]


class FFN(nn.Module):
    """Two Conv1d (kernel ``k``, 'same' padding applied to the masked input) with ReLU between."""

    def __init__(
        self, in_channels: int, out_channels: int, filter_channels: int, kernel_size: int, p_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)
        self.drop = nn.Dropout(p_dropout)

    def _pad(self, x: Tensor) -> Tensor:
        if self.kernel_size == 1:
            return x
        return F.pad(x, [(self.kernel_size - 1) // 2, self.kernel_size // 2, 0, 0, 0, 0])

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        x = torch.relu(self.conv_1(self._pad(x * x_mask)))
        x = self.conv_2(self._pad(self.drop(x) * x_mask))
        return x * x_mask


class RelativeEncoder(nn.Module):
    """RVC's ``attentions.Encoder``: ``n_layers`` × (attention → LayerNorm, FFN → LayerNorm), residual."""

    def __init__(
        self,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int = 1,
        p_dropout: float = 0.0,
        window_size: int = 10,
    ) -> None:
        super().__init__()
        self.n_layers = int(n_layers)
        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList()
        self.norm_layers_1 = nn.ModuleList()
        self.ffn_layers = nn.ModuleList()
        self.norm_layers_2 = nn.ModuleList()
        for _ in range(self.n_layers):
            self.attn_layers.append(
                MultiHeadAttention(hidden_channels, hidden_channels, n_heads, p_dropout, window_size=window_size)
            )
            self.norm_layers_1.append(LayerNorm(hidden_channels))
            self.ffn_layers.append(FFN(hidden_channels, hidden_channels, filter_channels, kernel_size, p_dropout))
            self.norm_layers_2.append(LayerNorm(hidden_channels))

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        x = x * x_mask
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + self.drop(attn(x, x, attn_mask)))
            x = norm2(x + self.drop(ffn(x, x_mask)))
        return x * x_mask


class TextEncoder(nn.Module):
    """``enc_p``: phone features (+ coarse pitch) → prior mean and log-std ``(B, out, T)`` and the mask."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        p_dropout: float,
        f0: bool = True,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb_phone = nn.Linear(in_channels, hidden_channels)
        self.lrelu = nn.LeakyReLU(0.1, inplace=True)
        if f0:
            self.emb_pitch = nn.Embedding(256, hidden_channels)
        self.encoder = RelativeEncoder(
            hidden_channels, filter_channels, n_heads, n_layers, kernel_size, float(p_dropout)
        )
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(
        self, phone: Tensor, pitch: Tensor | None, lengths: Tensor, skip_head: Tensor | int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.emb_phone(phone)
        if pitch is not None:
            x = x + self.emb_pitch(pitch)
        x = self.lrelu(x * math.sqrt(self.hidden_channels)).transpose(1, -1)  # (B, H, T)
        x_mask = torch.unsqueeze(sequence_mask(lengths, x.size(2)), 1).to(x.dtype)
        x = self.encoder(x * x_mask, x_mask)
        if skip_head is not None:
            head = _length(skip_head)
            x, x_mask = x[:, :, head:], x_mask[:, :, head:]
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        return m, logs, x_mask


# --------------------------------------------------------------------------- flow and posterior (modules.py)


class WN(nn.Module):
    """WaveNet-style stack: weight-normed dilated ``in_layers``, ``res_skip_layers`` and one ``cond_layer``."""

    def __init__(
        self,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int = 0,
        p_dropout: float = 0.0,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"WN kernel_size must be odd, got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.gin_channels = gin_channels
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        self.drop = nn.Dropout(float(p_dropout))
        if gin_channels != 0:
            self.cond_layer = _weight_norm(
                nn.Conv1d(gin_channels, 2 * hidden_channels * n_layers, 1), weight_norm, None
            )
        for i in range(n_layers):
            dilation = dilation_rate**i
            padding = (kernel_size * dilation - dilation) // 2
            self.in_layers.append(
                _weight_norm(
                    nn.Conv1d(hidden_channels, 2 * hidden_channels, kernel_size, dilation=dilation, padding=padding),
                    weight_norm,
                    None,
                )
            )
            res_skip = 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            self.res_skip_layers.append(_weight_norm(nn.Conv1d(hidden_channels, res_skip, 1), weight_norm, None))

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        output = torch.zeros_like(x)
        if g is not None:
            g = self.cond_layer(g)
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            x_in = in_layer(x)
            if g is not None:
                off = i * 2 * self.hidden_channels
                g_l = g[:, off : off + 2 * self.hidden_channels, :]
            else:
                g_l = torch.zeros_like(x_in)
            acts = self.drop(_fused_add_tanh_sigmoid_multiply(x_in, g_l, self.hidden_channels))
            res_skip_acts = res_skip_layer(acts)
            if i < self.n_layers - 1:
                x = (x + res_skip_acts[:, : self.hidden_channels, :]) * x_mask
                output = output + res_skip_acts[:, self.hidden_channels :, :]
            else:
                output = output + res_skip_acts
        return output * x_mask


class ResidualCouplingLayer(nn.Module):
    """Affine coupling (mean-only in RVC): ``pre`` 1×1, :class:`WN`, ``post`` 1×1 zero-initialised."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        p_dropout: float = 0.0,
        gin_channels: int = 0,
        mean_only: bool = False,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"ResidualCouplingLayer channels must be even, got {channels}")
        self.half_channels = channels // 2
        self.mean_only = mean_only
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(
            hidden_channels,
            kernel_size,
            dilation_rate,
            n_layers,
            gin_channels=gin_channels,
            p_dropout=float(p_dropout),
            weight_norm=weight_norm,
        )
        self.post = nn.Conv1d(hidden_channels, self.half_channels * (2 - mean_only), 1)
        with torch.no_grad():
            self.post.weight.zero_()
            self.post.bias.zero_()

    def forward(
        self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        h = self.pre(x0) * x_mask
        h = self.enc(h, x_mask, g=g)
        stats = self.post(h) * x_mask
        if not self.mean_only:
            m, logs = torch.split(stats, [self.half_channels] * 2, 1)
        else:
            m, logs = stats, torch.zeros_like(stats)
        if not reverse:
            x1 = m + x1 * torch.exp(logs) * x_mask
            return torch.cat([x0, x1], 1), torch.sum(logs, [1, 2])
        x1 = (x1 - m) * torch.exp(-logs) * x_mask
        return torch.cat([x0, x1], 1), torch.zeros([1], device=x.device)


class Flip(nn.Module):
    """Reverses the channel order (no parameters)."""

    def forward(
        self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x = torch.flip(x, [1])
        if not reverse:
            return x, torch.zeros(x.size(0), dtype=x.dtype, device=x.device)
        return x, torch.zeros([1], device=x.device)


class ResidualCouplingBlock(nn.Module):
    """``flow``: ``n_flows`` × (mean-only :class:`ResidualCouplingLayer`, :class:`Flip`)."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        n_flows: int = 4,
        gin_channels: int = 0,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(
                ResidualCouplingLayer(
                    channels,
                    hidden_channels,
                    kernel_size,
                    dilation_rate,
                    n_layers,
                    gin_channels=gin_channels,
                    mean_only=True,
                    weight_norm=weight_norm,
                )
            )
            self.flows.append(Flip())

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False) -> Tensor:
        for flow in reversed(self.flows) if reverse else self.flows:
            x, _ = flow(x, x_mask, g=g, reverse=reverse)
        return x


class PosteriorEncoder(nn.Module):
    """``enc_q``: linear spectrogram → posterior sample ``z``, its mean and log-std, and the mask."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int = 0,
        weight_norm: str = "legacy",
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.pre = nn.Conv1d(in_channels, hidden_channels, 1)
        self.enc = WN(
            hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels, weight_norm=weight_norm
        )
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(
        self, x: Tensor, x_lengths: Tensor, g: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_mask = torch.unsqueeze(sequence_mask(x_lengths, x.size(2)), 1).to(x.dtype)
        x = self.pre(x) * x_mask
        x = self.enc(x, x_mask, g=g)
        stats = self.proj(x) * x_mask
        m, logs = torch.split(stats, self.out_channels, dim=1)
        z = (m + _randn_like(m, generator) * torch.exp(logs)) * x_mask
        return z, m, logs, x_mask


# --------------------------------------------------------------------------- the synthesizer (models.py)


class _SynthesizerBase(nn.Module):
    """What the four RVC synthesizer classes share. Construct one of them (or :func:`build_synthesizer`)."""

    phone_channels: int = 256
    f0: bool = True
    version: str = "v1"

    def __init__(
        self,
        spec_channels: int,
        segment_size: int,
        inter_channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        p_dropout: float,
        resblock: str,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        spk_embed_dim: int,
        gin_channels: int,
        sr: int | str | None = None,
        *,
        weight_norm: str = "legacy",
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected keyword arguments {unknown}")
        if weight_norm not in WEIGHT_NORM_MODES:
            raise ValueError(f"weight_norm must be one of {WEIGHT_NORM_MODES}, got {weight_norm!r}")
        if isinstance(sr, str):
            if sr not in _SR_LABELS:
                raise ValueError(f"sr must be an int or one of {sorted(_SR_LABELS)}, got {sr!r}")
            sr = _SR_LABELS[sr]
        if self.f0 and (isinstance(sr, bool) or not isinstance(sr, int) or sr <= 0):
            raise ValueError(f"{type(self).__name__}: sr must be the sampling rate (an int > 0 or '40k'), got {sr!r}")
        self.spec_channels = int(spec_channels)
        self.segment_size = int(segment_size)
        self.inter_channels = int(inter_channels)
        self.hidden_channels = int(hidden_channels)
        self.filter_channels = int(filter_channels)
        self.n_heads = int(n_heads)
        self.n_layers = int(n_layers)
        self.kernel_size = int(kernel_size)
        self.p_dropout = float(p_dropout)
        self.resblock = resblock
        self.resblock_kernel_sizes = resblock_kernel_sizes
        self.resblock_dilation_sizes = resblock_dilation_sizes
        self.upsample_rates = upsample_rates
        self.upsample_initial_channel = upsample_initial_channel
        self.upsample_kernel_sizes = upsample_kernel_sizes
        self.gin_channels = int(gin_channels)
        self.spk_embed_dim = int(spk_embed_dim)
        self.sampling_rate = sr if self.f0 else (int(sr) if isinstance(sr, int) else None)
        self.weight_norm = weight_norm

        def text_encoder() -> TextEncoder:
            return TextEncoder(
                self.phone_channels,
                inter_channels,
                hidden_channels,
                filter_channels,
                n_heads,
                n_layers,
                kernel_size,
                float(p_dropout),
                f0=self.f0,
            )

        # Registration order is RVC's, so state_dict() lists the keys as RVC's files do. The v2 classes
        # build a v1 enc_p, delete it and add a 768-dim one, which moves enc_p to the end of their keys.
        if self.phone_channels == 256:
            self.enc_p = text_encoder()
        dec_args = (
            inter_channels,
            resblock,
            resblock_kernel_sizes,
            resblock_dilation_sizes,
            upsample_rates,
            upsample_initial_channel,
            upsample_kernel_sizes,
            gin_channels,
        )
        if self.f0:
            self.dec = GeneratorNSF(*dec_args, sr=sr, weight_norm=weight_norm)
        else:
            self.dec = Generator(*dec_args, weight_norm=weight_norm)
        self.enc_q = PosteriorEncoder(
            spec_channels, inter_channels, hidden_channels, 5, 1, 16, gin_channels=gin_channels, weight_norm=weight_norm
        )
        self.flow = ResidualCouplingBlock(
            inter_channels, hidden_channels, 5, 1, 3, gin_channels=gin_channels, weight_norm=weight_norm
        )
        self.emb_g = nn.Embedding(self.spk_embed_dim, gin_channels)
        if self.phone_channels != 256:
            self.enc_p = text_encoder()

    @property
    def hop_length(self) -> int:
        """Output samples per frame (the product of the upsample rates)."""
        return math.prod(int(u) for u in self.upsample_rates)

    def rvc_config(self) -> list:
        """RVC's 18 constructor arguments, as an export's ``config`` list holds them."""
        return [
            self.spec_channels,
            self.segment_size,
            self.inter_channels,
            self.hidden_channels,
            self.filter_channels,
            self.n_heads,
            self.n_layers,
            self.kernel_size,
            self.p_dropout,
            self.resblock,
            list(self.resblock_kernel_sizes),
            [list(d) for d in self.resblock_dilation_sizes],
            list(self.upsample_rates),
            self.upsample_initial_channel,
            list(self.upsample_kernel_sizes),
            self.spk_embed_dim,
            self.gin_channels,
            self.sampling_rate,
        ]

    def _check_phone(self, phone: Tensor, phone_lengths: Tensor) -> None:
        if phone.dim() != 3 or phone.shape[2] != self.phone_channels:
            raise ValueError(f"phone must be (batch, frames, {self.phone_channels}), got shape {tuple(phone.shape)}")
        if phone_lengths.dim() != 1 or phone_lengths.shape[0] != phone.shape[0]:
            raise ValueError(f"phone_lengths must be ({phone.shape[0]},), got shape {tuple(phone_lengths.shape)}")

    def _train_forward(self, phone, phone_lengths, pitch, pitchf, y, y_lengths, ds, generator):
        self._check_phone(phone, phone_lengths)
        g = self.emb_g(ds).unsqueeze(-1)  # (B, gin, 1)
        m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
        z, m_q, logs_q, y_mask = self.enc_q(y, y_lengths, g=g, generator=generator)
        z_p = self.flow(z, y_mask, g=g)
        z_slice, ids_slice = rand_slice_segments(z, y_lengths, self.segment_size, generator=generator)
        if self.f0:
            pitchf = slice_segments2(pitchf, ids_slice, self.segment_size)
            o = self.dec(z_slice, pitchf, g=g, generator=generator)
        else:
            o = self.dec(z_slice, g=g)
        return o, ids_slice, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)

    def _infer(self, phone, phone_lengths, pitch, nsff0, sid, skip_head, return_length, return_length2, generator):
        self._check_phone(phone, phone_lengths)
        g = self.emb_g(sid).unsqueeze(-1)
        if skip_head is not None and return_length is not None:
            head, length = _length(skip_head), _length(return_length)
            flow_head = max(head - 24, 0)
            dec_head = head - flow_head
            m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths, flow_head)
            z_p = (m_p + torch.exp(logs_p) * _randn_like(m_p, generator) * 0.66666) * x_mask
            z = self.flow(z_p, x_mask, g=g, reverse=True)
            z = z[:, :, dec_head : dec_head + length]
            x_mask = x_mask[:, :, dec_head : dec_head + length]
            if nsff0 is not None:
                nsff0 = nsff0[:, head : head + length]
        else:
            m_p, logs_p, x_mask = self.enc_p(phone, pitch, phone_lengths)
            z_p = (m_p + torch.exp(logs_p) * _randn_like(m_p, generator) * 0.66666) * x_mask
            z = self.flow(z_p, x_mask, g=g, reverse=True)
        if return_length2 is not None and _length(return_length2) != z.shape[-1]:
            raise ValueError(
                f"return_length2={_length(return_length2)}: resampling the decoder input to another "
                f"length is not supported (the latent has {z.shape[-1]} frames)"
            )
        if self.f0:
            o = self.dec(z * x_mask, nsff0, g=g, generator=generator)
        else:
            o = self.dec(z * x_mask, g=g)
        return o, x_mask, (z, z_p, m_p, logs_p)


class SynthesizerTrnMs256NSFsid(_SynthesizerBase):
    """RVC v1 f0 synthesizer (256-dim HuBERT features, NSF decoder).

    ``forward(phone, phone_lengths, pitch, pitchf, y, y_lengths, ds)`` (training; ``y`` the linear
    spectrogram, ``ds`` the speaker ids) → ``(o, ids_slice, x_mask, z_mask, (z, z_p, m_p, logs_p, m_q,
    logs_q))``, ``o`` the decoder's output for a random ``segment_size``-frame slice.
    ``infer(phone, phone_lengths, pitch, nsff0, sid, skip_head=None, return_length=None,
    return_length2=None)`` → ``(o, x_mask, (z, z_p, m_p, logs_p))``.
    """

    phone_channels = 256
    f0 = True
    version = "v1"

    def forward(
        self,
        phone: Tensor,
        phone_lengths: Tensor,
        pitch: Tensor,
        pitchf: Tensor,
        y: Tensor,
        y_lengths: Tensor,
        ds: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        return self._train_forward(phone, phone_lengths, pitch, pitchf, y, y_lengths, ds, generator)

    def infer(
        self,
        phone: Tensor,
        phone_lengths: Tensor,
        pitch: Tensor,
        nsff0: Tensor,
        sid: Tensor,
        skip_head: Tensor | int | None = None,
        return_length: Tensor | int | None = None,
        return_length2: Tensor | int | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        return self._infer(phone, phone_lengths, pitch, nsff0, sid, skip_head, return_length, return_length2, generator)


class SynthesizerTrnMs768NSFsid(SynthesizerTrnMs256NSFsid):
    """RVC v2 f0 synthesizer: as v1 with 768-dim phone features (``enc_p`` registered last, as in RVC)."""

    phone_channels = 768
    version = "v2"


class SynthesizerTrnMs256NSFsid_nono(_SynthesizerBase):
    """RVC v1 synthesizer without f0 (HiFi-GAN decoder, no ``emb_pitch``).

    ``forward(phone, phone_lengths, y, y_lengths, ds)``; ``infer(phone, phone_lengths, sid, skip_head=None,
    return_length=None, return_length2=None)``; outputs as the f0 class.
    """

    phone_channels = 256
    f0 = False
    version = "v1"

    def forward(
        self,
        phone: Tensor,
        phone_lengths: Tensor,
        y: Tensor,
        y_lengths: Tensor,
        ds: Tensor,
        *,
        generator: torch.Generator | None = None,
    ):
        return self._train_forward(phone, phone_lengths, None, None, y, y_lengths, ds, generator)

    def infer(
        self,
        phone: Tensor,
        phone_lengths: Tensor,
        sid: Tensor,
        skip_head: Tensor | int | None = None,
        return_length: Tensor | int | None = None,
        return_length2: Tensor | int | None = None,
        *,
        generator: torch.Generator | None = None,
    ):
        return self._infer(phone, phone_lengths, None, None, sid, skip_head, return_length, return_length2, generator)


class SynthesizerTrnMs768NSFsid_nono(SynthesizerTrnMs256NSFsid_nono):
    """RVC v2 synthesizer without f0."""

    phone_channels = 768
    version = "v2"


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SynthesizerConfig:
    """One shipped RVC synthesizer config: the decoder's :class:`GeneratorConfig` plus the rest.

    ``segment_frames`` (the decoder's training slice, RVC's ``segment_size // hop``) comes from the
    decoder config.
    """

    name: str
    version: str
    generator: GeneratorConfig
    spec_channels: int
    hidden_channels: int = 192
    filter_channels: int = 768
    n_heads: int = 2
    n_layers: int = 6
    kernel_size: int = 3
    p_dropout: float = 0.0
    spk_embed_dim: int = 109

    @property
    def sampling_rate(self) -> int:
        return self.generator.sampling_rate

    @property
    def segment_frames(self) -> int:
        return self.generator.segment_frames

    @property
    def phone_channels(self) -> int:
        return 256 if self.version == "v1" else 768

    def rvc_args(self) -> list:
        """RVC's 18 positional constructor arguments (the training segment in frames)."""
        g = self.generator
        return [
            self.spec_channels,
            g.segment_frames,
            g.inter_channels,
            self.hidden_channels,
            self.filter_channels,
            self.n_heads,
            self.n_layers,
            self.kernel_size,
            self.p_dropout,
            g.resblock,
            list(g.resblock_kernel_sizes),
            [list(d) for d in g.resblock_dilation_sizes],
            list(g.upsample_rates),
            g.upsample_initial_channel,
            list(g.upsample_kernel_sizes),
            self.spk_embed_dim,
            g.gin_channels,
            g.sampling_rate,
        ]


_SPEC_CHANNELS = {32000: 513, 40000: 1025, 48000: 1025}  # filter_length // 2 + 1 of RVC's configs


def _synth(name: str) -> SynthesizerConfig:
    version, sr = name.split("-")
    gen = get_generator_config(name)
    return SynthesizerConfig(name, version, gen, _SPEC_CHANNELS[gen.sampling_rate])


#: The six shipped synthesizer configs. 40k uses the v1 decoder for v1 and v2.
SYNTHESIZER_CONFIGS: dict[str, SynthesizerConfig] = {
    n: _synth(n) for n in ("v1-32k", "v1-40k", "v1-48k", "v2-32k", "v2-40k", "v2-48k")
}


def get_synthesizer_config(name: str) -> SynthesizerConfig:
    """The :class:`SynthesizerConfig` named ``name`` (``"v1-40k"`` … ``"v2-48k"``)."""
    if not isinstance(name, str):
        raise TypeError(f"synthesizer config name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in SYNTHESIZER_CONFIGS:
        raise ValueError(f"unknown RVC synthesizer config {name!r}; expected one of {list(SYNTHESIZER_CONFIGS)}")
    return SYNTHESIZER_CONFIGS[key]


def synthesizer_class(version: str, f0: bool) -> type[_SynthesizerBase]:
    """RVC's class for ``(version, f0)``, as its inference picks it."""
    classes = {
        ("v1", True): SynthesizerTrnMs256NSFsid,
        ("v1", False): SynthesizerTrnMs256NSFsid_nono,
        ("v2", True): SynthesizerTrnMs768NSFsid,
        ("v2", False): SynthesizerTrnMs768NSFsid_nono,
    }
    if (version, bool(f0)) not in classes:
        raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
    return classes[(version, bool(f0))]


def synthesizer_from_rvc_config(
    config: Sequence, version: str, f0: bool, *, weight_norm: str = "legacy"
) -> _SynthesizerBase:
    """Build the synthesizer as RVC's inference does: ``cls(*config)`` for the class of ``(version, f0)``."""
    if not isinstance(config, (list, tuple)) or len(config) != 18:
        n = len(config) if isinstance(config, (list, tuple)) else type(config).__name__
        raise ValueError(f"config must be RVC's list of 18 synthesizer arguments, got {n}")
    return synthesizer_class(version, f0)(*config, weight_norm=weight_norm)


def build_synthesizer(
    name: str | SynthesizerConfig = "v2-40k", f0: bool = True, *, seed: int | None = None, weight_norm: str = "legacy"
) -> _SynthesizerBase:
    """A freshly initialised RVC synthesizer of config ``name`` (``v1-32k`` … ``v2-48k``).

    ``f0=False`` builds the ``_nono`` class. ``seed`` makes the initialisation reproducible without
    touching torch's global RNG.
    """
    cfg = name if isinstance(name, SynthesizerConfig) else get_synthesizer_config(name)
    if not isinstance(f0, bool):
        raise TypeError(f"f0 must be a bool, got {f0!r}")
    if seed is None:
        return synthesizer_from_rvc_config(cfg.rvc_args(), cfg.version, f0, weight_norm=weight_norm)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return synthesizer_from_rvc_config(cfg.rvc_args(), cfg.version, f0, weight_norm=weight_norm)
