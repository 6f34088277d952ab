"""An experiment's ``config.json``, as RVC and Applio write it: its ``train``, ``data`` and ``model`` sections.

RVC copies ``configs/<v1|v2>/<sr>.json`` into ``logs/<experiment>/config.json``; Applio copies
``rvc/configs/<sr>.json``. The two differ in small ways this reader accepts both of:

* the sample rate is ``data.sampling_rate`` (RVC) or ``data.sample_rate`` (Applio);
* RVC's ``train`` section carries ``epochs``, ``batch_size`` and ``fp16_run``; Applio's does not
  (its command line does), so they default to RVC's values (20000 epochs, batch 4, fp32);
* Applio's ``model`` section adds ``text_enc_hidden_dim`` (256 for v1, 768 for v2).

Neither file says whether the model is v1 or v2: that comes from the feature width (the
dataset and the pretrained G agree on it, or training is refused).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExperimentConfig", "N_MELS", "read_experiment_config", "config_json"]


@dataclass(frozen=True)
class ExperimentConfig:
    """What ``config.json`` says, checked. Field names follow RVC's keys."""

    path: str
    # train
    seed: int
    epochs: int
    learning_rate: float
    betas: tuple[float, float]
    eps: float
    batch_size: int
    fp16_run: bool
    lr_decay: float
    segment_size: int
    c_mel: float
    c_kl: float
    log_interval: int
    # data
    max_wav_value: float
    sampling_rate: int
    filter_length: int
    hop_length: int
    win_length: int
    n_mel_channels: int
    mel_fmin: float
    mel_fmax: float | None
    # model: the synthesizer's arguments, as written
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def segment_frames(self) -> int:
        """The decoder's training slice in spectrogram frames (RVC's ``segment_size // hop_length``)."""
        return self.segment_size // self.hop_length

    @property
    def spec_channels(self) -> int:
        return self.filter_length // 2 + 1


def _fail(path: str, what: str) -> ValueError:
    return ValueError(f"config {path!r}: {what}")


def _get(
    path: str,
    section: dict[str, Any],
    name: str,
    key: str,
    kind: type | tuple[type, ...],
    default: Any = ...,
    *,
    positive: bool = False,
    allow_none: bool = False,
) -> Any:
    if key not in section:
        if default is ...:
            raise _fail(path, f"{name}.{key} is missing")
        return default
    value = section[key]
    if value is None and allow_none:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise _fail(path, f"{name}.{key} is {value!r}; expected {names}" + (" or null" if allow_none else ""))
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, f"{name}.{key} is {value!r}; expected a finite number")
    if positive and value <= 0:
        raise _fail(path, f"{name}.{key} is {value!r}; expected a number > 0")
    return value


def read_experiment_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read and check ``config.json`` (a path to the file or to the experiment folder).

    Raises ``FileNotFoundError``/``ValueError`` with one line naming the file and the key.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config {path!r} does not exist; an RVC/Applio experiment folder holds a "
            "config.json written by their preprocessing"
        )
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"holds a {type(raw).__name__}; expected an object with train, data and model")
    for section in ("train", "data", "model"):
        if not isinstance(raw.get(section), dict):
            raise _fail(path, f"has no {section!r} section (an object)")
    t, d, m = raw["train"], raw["data"], raw["model"]
    betas = _get(path, t, "train", "betas", list, [0.8, 0.99])
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise _fail(path, f"train.betas is {betas!r}; expected two numbers in [0, 1)")
    if "sampling_rate" in d:
        sr = _get(path, d, "data", "sampling_rate", int, positive=True)
    else:
        sr = _get(path, d, "data", "sample_rate", int, positive=True)  # Applio's spelling
    cfg = ExperimentConfig(
        path=path,
        seed=_get(path, t, "train", "seed", int, 1234),
        epochs=_get(path, t, "train", "epochs", int, 20000, positive=True),
        learning_rate=_get(path, t, "train", "learning_rate", float, positive=True),
        betas=(float(betas[0]), float(betas[1])),
        eps=_get(path, t, "train", "eps", float, 1e-9, positive=True),
        batch_size=_get(path, t, "train", "batch_size", int, 4, positive=True),
        fp16_run=_get(path, t, "train", "fp16_run", bool, False),
        lr_decay=_get(path, t, "train", "lr_decay", float, 0.999875, positive=True),
        segment_size=_get(path, t, "train", "segment_size", int, positive=True),
        c_mel=_get(path, t, "train", "c_mel", float, 45.0),
        c_kl=_get(path, t, "train", "c_kl", float, 1.0),
        log_interval=_get(path, t, "train", "log_interval", int, 200, positive=True),
        max_wav_value=_get(path, d, "data", "max_wav_value", float, 32768.0, positive=True),
        sampling_rate=sr,
        filter_length=_get(path, d, "data", "filter_length", int, positive=True),
        hop_length=_get(path, d, "data", "hop_length", int, positive=True),
        win_length=_get(path, d, "data", "win_length", int, positive=True),
        n_mel_channels=_get(path, d, "data", "n_mel_channels", int, positive=True),
        mel_fmin=_get(path, d, "data", "mel_fmin", float, 0.0),
        mel_fmax=_get(path, d, "data", "mel_fmax", float, None, allow_none=True),
        model=dict(m),
    )
    if cfg.lr_decay > 1:
        raise _fail(path, f"train.lr_decay is {cfg.lr_decay!r}; expected a number in (0, 1]")
    if cfg.segment_size % cfg.hop_length:
        raise _fail(
            path, f"train.segment_size {cfg.segment_size} is not a multiple of data.hop_length {cfg.hop_length}"
        )
    if cfg.win_length > cfg.filter_length:
        raise _fail(path, f"data.win_length {cfg.win_length} exceeds data.filter_length {cfg.filter_length}")
    if (cfg.filter_length - cfg.hop_length) % 2:
        raise _fail(
            path,
            f"data.filter_length - data.hop_length = {cfg.filter_length - cfg.hop_length} must be "
            "even (RVC pads the wave by half of it on each side)",
        )
    rates = m.get("upsample_rates")
    if not isinstance(rates, list) or not rates or not all(isinstance(r, int) and r > 0 for r in rates):
        raise _fail(path, f"model.upsample_rates is {rates!r}; expected a list of positive ints")
    if math.prod(rates) != cfg.hop_length:
        raise _fail(
            path, f"model.upsample_rates {rates} multiply to {math.prod(rates)}, not data.hop_length {cfg.hop_length}"
        )
    return cfg


#: ``data.n_mel_channels`` of RVC's shipped configs, by sample rate.
N_MELS = {32000: 80, 40000: 125, 48000: 128}


def config_json(
    generator: Any,
    *,
    segment_frames: int | None = None,
    batch_size: int = 4,
    epochs: int = 20000,
    learning_rate: float = 1e-4,
    seed: int = 1234,
    log_interval: int = 200,
) -> dict[str, Any]:
    """A ``config.json`` in RVC's layout (``configs/<version>/<sr>.json``) for a decoder config.

    ``generator``: a :class:`rvclora.models.rvc.GeneratorConfig`; ``segment_frames`` defaults to
    its own (RVC's ``segment_size / hop``).
    """
    frames = generator.segment_frames if segment_frames is None else segment_frames
    return {
        "train": {
            "log_interval": log_interval,
            "seed": seed,
            "epochs": epochs,
            "learning_rate": learning_rate,
            "betas": [0.8, 0.99],
            "eps": 1e-9,
            "batch_size": batch_size,
            "fp16_run": False,
            "lr_decay": 0.999875,
            "segment_size": frames * generator.hop_length,
            "init_lr_ratio": 1,
            "warmup_epochs": 0,
            "c_mel": 45,
            "c_kl": 1.0,
        },
        "data": {
            "max_wav_value": 32768.0,
            "sampling_rate": generator.sampling_rate,
            "filter_length": 2048,
            "hop_length": generator.hop_length,
            "win_length": 2048,
            "n_mel_channels": N_MELS.get(generator.sampling_rate, 128),
            "mel_fmin": 0.0,
            "mel_fmax": None,
        },
        "model": {
            "inter_channels": generator.inter_channels,
            "hidden_channels": 192,
            "filter_channels": 768,
            "n_heads": 2,
            "n_layers": 6,
            "kernel_size": 3,
            "p_dropout": 0,
            "resblock": generator.resblock,
            "resblock_kernel_sizes": list(generator.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in generator.resblock_dilation_sizes],
            "upsample_rates": list(generator.upsample_rates),
            "upsample_initial_channel": generator.upsample_initial_channel,
            "upsample_kernel_sizes": list(generator.upsample_kernel_sizes),
            "use_spectral_norm": False,
            "gin_channels": generator.gin_channels,
            "spk_embed_dim": 109,
        },
    }
