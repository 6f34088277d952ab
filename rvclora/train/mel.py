"""RVC's training spectrogram and mel (``infer/lib/train/mel_processing.py`` of RVC, same settings).

* :func:`spectrogram`: ``|STFT|`` with ``n_fft = filter_length``, the wave reflect-padded by
  ``(n_fft - hop) / 2`` on both sides, ``center=False``, a Hann window of ``win_length``, then
  ``sqrt(re² + im² + 1e-6)``. A wave of ``N`` samples gives ``N // hop`` frames when ``N`` is a
  multiple of ``hop``. This is what the posterior encoder ``enc_q`` reads (1025 channels).
* :func:`spec_to_mel`: librosa's slaney mel filterbank (librosa's defaults: slaney scale and
  area normalisation) on that magnitude, then ``log(clamp(x, 1e-5))``.
* :func:`mel_spectrogram`: both, for the generated wave (the real one's mel comes from its
  spectrogram, sliced, as RVC does).

Always computed in float32, outside autocast, as RVC does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["spectrogram", "spec_to_mel", "mel_spectrogram", "mel_filterbank"]


@functools.lru_cache(maxsize=16)
def _filterbank(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> Tensor:
    from librosa.filters import mel

    return torch.from_numpy(mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)).float()


def mel_filterbank(
    sr: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The slaney mel filterbank ``(n_mels, n_fft // 2 + 1)``, float32 (librosa, cached)."""
    return _filterbank(int(sr), int(n_fft), int(n_mels), float(fmin), None if fmax is None else float(fmax)).to(
        device or "cpu"
    )


@functools.lru_cache(maxsize=16)
def _window(win: int, device: str) -> Tensor:
    return torch.hann_window(win, device=device)


def spectrogram(wave: Tensor, n_fft: int, hop: int, win: int) -> Tensor:
    """``wave: (B, T)`` or ``(B, 1, T)`` → magnitude ``(B, n_fft // 2 + 1, frames)``, float32."""
    if wave.dim() == 3:
        wave = wave.squeeze(1)
    if wave.dim() != 2:
        raise ValueError(f"wave must be (batch, samples) or (batch, 1, samples), got shape {tuple(wave.shape)}")
    pad = (n_fft - hop) // 2
    with torch.autocast(wave.device.type, enabled=False):
        y = F.pad(wave.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            y,
            n_fft,
            hop_length=hop,
            win_length=win,
            window=_window(win, str(wave.device)),
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        return torch.sqrt(spec.real.square() + spec.imag.square() + 1e-6)


def spec_to_mel(spec: Tensor, sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """``spec: (B, n_fft // 2 + 1, frames)`` → log mel ``(B, n_mels, frames)``, float32."""
    with torch.autocast(spec.device.type, enabled=False):
        fb = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, spec.device)
        return torch.log(torch.clamp(torch.matmul(fb, spec.float()), min=1e-5))


def mel_spectrogram(
    wave: Tensor, sr: int, n_fft: int, hop: int, win: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> Tensor:
    """``wave: (B, T)`` or ``(B, 1, T)`` → log mel ``(B, n_mels, frames)``: RVC's ``mel_spectrogram_torch``."""
    return spec_to_mel(spectrogram(wave, n_fft, hop, win), sr, n_fft, n_mels, fmin, fmax)
