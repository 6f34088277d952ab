"""A small generated dataset in RVC's (or Applio's) experiment-folder layout.

What the embedded demo and the tests train on, since these machines have no recordings:

* **Voices**: harmonic "singers". Each speaker has a base pitch and a timbre (formant
  frequencies scaled by a vocal-tract factor); a clip is a sequence of vowels (each a pair of
  formants) sung on a pitch contour with vibrato and a glide, with short unvoiced gaps of
  filtered noise. The wave is the sum of the harmonics of f0 below Nyquist, each weighted by
  the formant envelope at its frequency, so the true f0 of every frame is known.
* **Pitch files**: the known f0 at the spectrogram rate (one value per hop), written as RVC
  writes its pitch features: ``f0nsf`` in Hz (0 = unvoiced) and the coarse mel-scale bins
  1…255 (``2a_f0``), with RVC's formula.
* **Content features**: a stand-in for HuBERT at 50 Hz, ``(frames, 256|768)``: a fixed random
  embedding of the vowel being sung (or of "unvoiced"), blended across transitions, plus a
  little noise. Like HuBERT's, they say *what* is sung, not *who* sings it.

Layouts: ``"rvc"`` (``0_gt_wavs/``, ``3_feature256|768/``, ``2a_f0/``, ``2b-f0nsf/``, absolute
paths, RVC's ``config.json``) and ``"applio"`` (``sliced_audios/``, ``extracted/``, ``f0/``,
``f0_voiced/``, paths relative to the folder two levels up, Applio's ``config.json``
spellings). Waves are float32 (as RVC writes them) or int16 (``wav_subtype="PCM_16"``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

from .config import config_json
from .data import FEATURE_DIMS

__all__ = ["SyntheticExperiment", "make_synthetic_experiment", "coarse_f0", "F0_MIN", "F0_MAX"]

#: RVC's pitch range for the coarse bins.
F0_MIN, F0_MAX = 50.0, 1100.0
_VOWELS = ((730, 1090), (270, 2290), (300, 870), (530, 1840), (640, 1190), (490, 1350))  # (F1, F2) Hz


def coarse_f0(f0: np.ndarray) -> np.ndarray:
    """RVC's coarse pitch: mel scale mapped to 1…255, 1 for unvoiced (``f0 = 0``)."""
    mel_min, mel_max = 1127 * math.log(1 + F0_MIN / 700), 1127 * math.log(1 + F0_MAX / 700)
    mel = 1127 * np.log(1 + f0 / 700)
    voiced = mel > 0
    mel[voiced] = (mel[voiced] - mel_min) * 254 / (mel_max - mel_min) + 1
    mel[mel <= 1] = 1
    mel[mel > 255] = 255
    return np.rint(mel).astype(np.int64)


@dataclass(frozen=True)
class SyntheticExperiment:
    path: str
    version: str
    f0: bool
    layout: str
    clips: int
    speakers: int
    sampling_rate: int
    seconds: float  # total audio


def _clip(
    rng: np.random.Generator, sr: int, hop: int, frames: int, base_f0: float, tract: float, embed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip: wave (frames·hop,), f0 per frame (frames,), features at 50 Hz (frames // 2, D)."""
    n = frames * hop
    t = np.arange(frames) * hop / sr
    # vowel segments of 15–30 frames; an unvoiced gap (id = len(_VOWELS)) now and then
    ids = np.empty(frames, dtype=np.int64)
    pos = 0
    while pos < frames:
        length = int(rng.integers(15, 31))
        ids[pos : pos + length] = len(_VOWELS) if rng.random() < 0.15 else rng.integers(len(_VOWELS))
        pos += length
    voiced = ids < len(_VOWELS)
    contour = (
        base_f0
        * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 2 * np.pi)))
        * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    )
    f0 = np.where(voiced, contour, 0.0)
    # per-sample f0 and formants (held per frame, phase continuous)
    f0_s = np.repeat(f0, hop)
    phase = 2 * np.pi * np.cumsum(f0_s) / sr
    wave = np.zeros(n)
    formants = np.array([_VOWELS[i] if i < len(_VOWELS) else (0, 0) for i in ids], dtype=np.float64) * tract
    f1_s, f2_s = np.repeat(formants[:, 0], hop), np.repeat(formants[:, 1], hop)
    top = int(sr / 2 / max(base_f0 * 0.8, 1.0))
    for k in range(1, min(top, 60) + 1):
        fk = k * f0_s
        amp = (
            np.where(fk < sr / 2 - 500, 1.0, 0.0)
            * (1 / (1 + ((fk - f1_s) / 90) ** 2) + 1 / (1 + ((fk - f2_s) / 120) ** 2))
            * np.exp(-fk / 4000)
        )
        wave += amp * np.sin(k * phase)
    noise = rng.standard_normal(n)
    smooth = np.convolve(noise, np.ones(8) / 8, mode="same")  # a soft hiss for the unvoiced frames
    wave += np.repeat(~voiced, hop) * 0.6 * smooth
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sr))
    wave *= fade
    wave = 0.5 * wave / max(np.abs(wave).max(), 1e-9)
    # features at 50 Hz: the content embedding of each pair of frames, smoothed, plus noise
    half = frames // 2
    feat = embed[ids[: 2 * half : 2]]
    feat = 0.5 * feat + 0.25 * np.roll(feat, 1, axis=0) + 0.25 * np.roll(feat, -1, axis=0)
    feat = feat + 0.05 * rng.standard_normal(feat.shape)
    return wave.astype(np.float32), f0, feat.astype(np.float32)


def make_synthetic_experiment(
    path: str | os.PathLike[str],
    generator_config: object,
    *,
    version: str = "v2",
    f0: bool = True,
    layout: str = "rvc",
    clips: int = 8,
    speakers: int = 1,
    seconds: tuple[float, float] = (1.0, 1.6),
    segment_frames: int | None = None,
    batch_size: int = 4,
    epochs: int = 20000,
    learning_rate: float = 1e-4,
    wav_subtype: str = "FLOAT",
    seed: int = 0,
) -> SyntheticExperiment:
    """Write a generated experiment folder at ``path`` (created; must not hold a filelist.txt yet).

    ``generator_config``: a :class:`rvclora.models.rvc.GeneratorConfig` (sample rate, hop,
    decoder). ``seconds``: the range of clip lengths. ``segment_frames``, ``batch_size``,
    ``epochs`` and ``learning_rate`` go into ``config.json``.
    """
    import soundfile as sf

    if version not in FEATURE_DIMS:
        raise ValueError(f"version must be one of {sorted(FEATURE_DIMS)}, got {version!r}")
    if layout not in ("rvc", "applio"):
        raise ValueError(f"layout must be 'rvc' or 'applio', got {layout!r}")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(os.path.join(path, "filelist.txt")):
        raise FileExistsError(f"{path!r} already holds a filelist.txt; choose a new folder")
    cfg = generator_config
    sr, hop = cfg.sampling_rate, cfg.hop_length
    dim = FEATURE_DIMS[version]
    if layout == "rvc":
        dirs = {"wav": "0_gt_wavs", "feature": f"3_feature{dim}", "f0": "2a_f0", "f0nsf": "2b-f0nsf"}
    else:
        dirs = {"wav": "sliced_audios", "feature": "extracted", "f0": "f0", "f0nsf": "f0_voiced"}
    for key, d in dirs.items():
        if f0 or key in ("wav", "feature"):
            os.makedirs(os.path.join(path, d), exist_ok=True)
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((len(_VOWELS) + 1, dim)) / math.sqrt(dim) * 4.0
    voices = [(float(rng.uniform(110, 260)), float(rng.uniform(0.85, 1.2))) for _ in range(speakers)]
    root = os.path.dirname(os.path.dirname(path))
    lines = []
    total = 0.0
    for i in range(clips):
        spk = i % speakers
        frames = int(rng.uniform(*seconds) * sr / hop) // 2 * 2
        wave, f0_hz, feat = _clip(rng, sr, hop, frames, voices[spk][0], voices[spk][1], embed)
        total += len(wave) / sr
        name = f"{spk}_{i}"
        files = {
            "wav": os.path.join(path, dirs["wav"], f"{name}.wav"),
            "feature": os.path.join(path, dirs["feature"], f"{name}.npy"),
        }
        sf.write(files["wav"], wave, sr, subtype=wav_subtype)
        np.save(files["feature"], feat)
        if f0:
            # RVC's pitch extractors give one more frame than the spectrogram has
            f0_ext = np.concatenate([f0_hz, f0_hz[-1:]]).astype(np.float32)
            files["f0"] = os.path.join(path, dirs["f0"], f"{name}.wav.npy")
            files["f0nsf"] = os.path.join(path, dirs["f0nsf"], f"{name}.wav.npy")
            np.save(files["f0"], coarse_f0(f0_ext.astype(np.float64)))
            np.save(files["f0nsf"], f0_ext)
        cols = [files[k] for k in (("wav", "feature", "f0", "f0nsf") if f0 else ("wav", "feature"))]
        if layout == "applio":
            cols = [os.path.relpath(c, root).replace(os.sep, "/") for c in cols]
        lines.append("|".join(cols + [str(spk)]))
    config = config_json(
        cfg, segment_frames=segment_frames, batch_size=batch_size, epochs=epochs, learning_rate=learning_rate, seed=seed
    )
    if layout == "applio":  # Applio's spellings: sample_rate, no epochs/batch_size/fp16_run, text_enc_hidden_dim
        config["data"]["sample_rate"] = config["data"].pop("sampling_rate")
        for key in ("epochs", "batch_size", "fp16_run", "init_lr_ratio", "warmup_epochs"):
            config["train"].pop(key)
        config["model"]["text_enc_hidden_dim"] = dim
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "filelist.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return SyntheticExperiment(path, version, f0, layout, clips, speakers, sr, total)
