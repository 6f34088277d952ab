"""An RVC/Applio experiment folder: checked first, then read as RVC's training loaders read it.

The folder (``logs/<experiment>/``) holds ``config.json`` (:mod:`rvclora.train.config`) and
``filelist.txt``, one clip a line:

* ``wav|feature|f0|f0nsf|speaker`` for f0 models, ``wav|feature|speaker`` for no-f0 models;
* ``wav``: the sliced clip at the model's sample rate, mono (RVC writes float32, older releases
  int16; both are read as floats in [-1, 1]);
* ``feature``: ``(T50, 256)`` (v1) or ``(T50, 768)`` (v2) content features at 50 Hz, ``.npy``;
* ``f0``: coarse pitch ``(T100,)``, ints in 1…255 (1 = unvoiced); ``f0nsf``: pitch in Hz.

RVC writes absolute paths; Applio writes paths relative to its own folder (``logs/<exp>/…``).
A relative path is looked up under the experiment folder, then under the folder two levels up
(Applio's root, when the experiment sits in ``<root>/logs/<exp>``), then the current directory.

Reading a clip does what RVC's ``TextAudioLoaderMultiNSFsid`` / ``TextAudioLoader`` do: features
repeated twice (50 → 100 Hz, the spectrogram rate), capped at 900 frames, the spectrogram of the
whole wave, and everything cut to the shortest of features and spectrogram. The decoder's
random slice of ``segment_size`` samples is chosen by the trainer (per clip, from the seed, the
epoch and the clip's place in the epoch, so it does not depend on how a batch is split across
processes).

:func:`load_experiment` checks every line before any training starts and names the first bad
line and file in one line: a missing file, a wrong sample rate or channel count, a wrong
feature width, lengths that disagree, out-of-range pitch values, a bad speaker id.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..io import RVCLoRAWarning
from .config import ExperimentConfig, read_experiment_config
from .mel import spectrogram

__all__ = [
    "FEATURE_DIMS",
    "MAX_FRAMES",
    "LENGTH_TOLERANCE",
    "Batch",
    "Clip",
    "ClipDataset",
    "Experiment",
    "EpochSampler",
    "collate",
    "load_experiment",
]

#: Content-feature width by model version.
FEATURE_DIMS = {"v1": 256, "v2": 768}
#: RVC's loaders cap a clip at this many 100 Hz frames.
MAX_FRAMES = 900
#: The most frames the features (at the spectrogram rate) and the spectrogram may disagree by.
#: RVC's own extraction leaves them 1–3 frames apart; more means the files do not belong together.
LENGTH_TOLERANCE = 10


@dataclass(frozen=True)
class Clip:
    """One checked line of ``filelist.txt`` (``line`` is 1-based; paths are resolved)."""

    line: int
    wav: str
    feature: str
    f0: str | None
    f0nsf: str | None
    speaker: int
    frames: int  # frames used: min(2·T50, 900, wave samples // hop)


@dataclass(frozen=True)
class Experiment:
    """A checked experiment folder."""

    path: str
    filelist: str
    config: ExperimentConfig
    clips: tuple[Clip, ...]
    f0: bool
    version: str
    feature_dim: int
    skipped: tuple[tuple[int, str], ...]  # (line, why) of clips too short for one segment

    @property
    def speakers(self) -> list[int]:
        return sorted({c.speaker for c in self.clips})


class _Bad(ValueError):
    pass


def _resolve(exp_dir: str, text: str) -> tuple[str, list[str]]:
    if os.path.isabs(text):
        return text, [text]
    tried = [
        os.path.join(exp_dir, text),
        os.path.join(os.path.dirname(os.path.dirname(exp_dir)), text),
        os.path.abspath(text),
    ]
    for cand in tried:
        if os.path.isfile(cand):
            return cand, tried
    return tried[0], tried


def _npy_shape(path: str, what: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _Bad(f"{what} {path!r} is not a readable .npy array ({' '.join(str(e).split())[:120]})") from None
    return tuple(arr.shape), arr.dtype


def _check_clip(
    exp_dir: str, cfg: ExperimentConfig, line_no: int, parts: list[str], f0: bool, feature_dim: int | None
) -> tuple[Clip, int]:
    import soundfile as sf

    names = ["wav", "feature", "f0", "f0nsf"] if f0 else ["wav", "feature"]
    paths: dict[str, str] = {}
    for name, text in zip(names, parts):
        if not text.strip():
            raise _Bad(f"the {name} column is empty")
        path, tried = _resolve(exp_dir, text.strip())
        if not os.path.isfile(path):
            where = "" if len(tried) == 1 else f" (looked in {', '.join(repr(os.path.dirname(t)) for t in tried)})"
            raise _Bad(f"{name} file {text.strip()!r} does not exist{where}")
        paths[name] = path
    try:
        speaker = int(parts[-1].strip())
    except ValueError:
        raise _Bad(f"speaker id {parts[-1].strip()!r} is not an integer") from None
    n_spk = cfg.model.get("spk_embed_dim", 109)
    if not 0 <= speaker < n_spk:
        raise _Bad(f"speaker id {speaker} is outside 0…{n_spk - 1} (model.spk_embed_dim = {n_spk})")

    try:
        info = sf.info(paths["wav"])
    except (RuntimeError, sf.LibsndfileError) as e:
        raise _Bad(
            f"wav file {paths['wav']!r} is not a readable audio file ({' '.join(str(e).split())[:120]})"
        ) from None
    if info.samplerate != cfg.sampling_rate:
        raise _Bad(
            f"wav file {paths['wav']!r} is sampled at {info.samplerate} Hz; config.json says {cfg.sampling_rate} Hz"
        )
    if info.channels != 1:
        raise _Bad(f"wav file {paths['wav']!r} has {info.channels} channels; expected mono")
    spec_frames = info.frames // cfg.hop_length

    shape, dtype = _npy_shape(paths["feature"], "feature file")
    if len(shape) != 2 or not np.issubdtype(dtype, np.floating):
        raise _Bad(
            f"feature file {paths['feature']!r} holds a {dtype} array of shape {shape}; expected float "
            "(frames, 256) for v1 or (frames, 768) for v2"
        )
    if shape[1] not in FEATURE_DIMS.values():
        raise _Bad(f"feature file {paths['feature']!r} has width {shape[1]}; expected 256 (v1) or 768 (v2)")
    if feature_dim is not None and shape[1] != feature_dim:
        raise _Bad(
            f"feature file {paths['feature']!r} has width {shape[1]}; expected {feature_dim} like the lines "
            "before it (or the pretrained model)"
        )
    phone_frames = 2 * shape[0]
    if abs(phone_frames - spec_frames) > LENGTH_TOLERANCE:
        raise _Bad(
            f"lengths disagree: feature file {paths['feature']!r} has {shape[0]} frames at 50 Hz "
            f"({phone_frames} at the spectrogram rate), wav file {paths['wav']!r} has {info.frames} samples "
            f"({spec_frames} frames of {cfg.hop_length}); expected within {LENGTH_TOLERANCE} frames"
        )
    frames = min(phone_frames, MAX_FRAMES, spec_frames)
    if f0:
        for name in ("f0", "f0nsf"):
            try:
                arr = np.load(paths[name], allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise _Bad(
                    f"{name} file {paths[name]!r} is not a readable .npy array ({' '.join(str(e).split())[:120]})"
                ) from None
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.number)):
                raise _Bad(
                    f"{name} file {paths[name]!r} holds a {arr.dtype} array of shape {arr.shape}; expected a "
                    "1-D array of numbers"
                )
            if arr.shape[0] < frames or abs(arr.shape[0] - spec_frames) > LENGTH_TOLERANCE:
                raise _Bad(
                    f"lengths disagree: {name} file {paths[name]!r} has {arr.shape[0]} frames, the wav "
                    f"{spec_frames} and the features {phone_frames}; expected within {LENGTH_TOLERANCE} "
                    f"frames and at least {frames}"
                )
            if not np.isfinite(arr).all():
                raise _Bad(f"{name} file {paths[name]!r} holds NaN or Inf")
            if name == "f0" and (arr.min() < 1 or arr.max() > 255 or not np.array_equal(arr, np.round(arr))):
                raise _Bad(
                    f"f0 file {paths[name]!r} holds values in {arr.min()}…{arr.max()}; coarse pitch is an "
                    "integer in 1…255 (is it the f0nsf file?)"
                )
            if name == "f0nsf" and arr.min() < 0:
                raise _Bad(f"f0nsf file {paths[name]!r} holds negative pitch ({arr.min()} Hz)")
    clip = Clip(line_no, paths["wav"], paths["feature"], paths.get("f0"), paths.get("f0nsf"), speaker, frames)
    return clip, shape[1]


def load_experiment(
    exp_dir: str | os.PathLike[str],
    *,
    f0: bool | None = None,
    version: str | None = None,
    filelist: str | os.PathLike[str] | None = None,
) -> Experiment:
    """Check an experiment folder and every line of its ``filelist.txt``; nothing is trained yet.

    ``f0``/``version``: what the model expects (from the pretrained G), or ``None`` to take them
    from the folder. Raises ``FileNotFoundError``/``ValueError`` with one line naming the first
    bad line and file. Clips shorter than one training segment are skipped with one warning, as
    RVC's length buckets drop them.
    """
    exp_dir = os.path.abspath(os.fspath(exp_dir))
    if not os.path.isdir(exp_dir):
        raise FileNotFoundError(
            f"experiment folder {exp_dir!r} does not exist; expected the logs/<experiment> "
            "folder RVC's or Applio's preprocessing wrote"
        )
    if version is not None and version not in FEATURE_DIMS:
        raise ValueError(f"version must be one of {sorted(FEATURE_DIMS)}, got {version!r}")
    cfg = read_experiment_config(exp_dir)
    listing = os.fspath(filelist) if filelist is not None else os.path.join(exp_dir, "filelist.txt")
    if not os.path.isfile(listing):
        raise FileNotFoundError(
            f"filelist {listing!r} does not exist; run RVC's or Applio's feature extraction "
            "first (it writes filelist.txt)"
        )
    with open(listing, encoding="utf-8") as f:
        lines = f.read().splitlines()
    clips: list[Clip] = []
    skipped: list[tuple[int, str]] = []
    feature_dim = FEATURE_DIMS[version] if version is not None else None
    form: bool | None = f0
    for line_no, text in enumerate(lines, 1):
        if not text.strip():
            continue
        parts = text.split("|")
        if len(parts) not in (3, 5):
            raise ValueError(
                f"filelist {listing!r} line {line_no}: {len(parts)} columns; expected 5 "
                "(wav|feature|f0|f0nsf|speaker) or 3 (wav|feature|speaker)"
            )
        line_f0 = len(parts) == 5
        if form is None:
            form = line_f0
        elif line_f0 != form:
            want = "5 columns (an f0 model)" if form else "3 columns (a no-f0 model)"
            raise ValueError(
                f"filelist {listing!r} line {line_no}: {len(parts)} columns; expected {want}"
                + (" like the lines before it" if f0 is None else "")
            )
        try:
            clip, dim = _check_clip(exp_dir, cfg, line_no, parts, line_f0, feature_dim)
        except _Bad as e:
            raise ValueError(f"filelist {listing!r} line {line_no}: {e}") from None
        feature_dim = dim
        if clip.frames < cfg.segment_frames:
            skipped.append((line_no, f"{clip.frames} frames < segment of {cfg.segment_frames}"))
            continue
        clips.append(clip)
    if form is None:
        raise ValueError(f"filelist {listing!r} lists no clips")
    if not clips:
        raise ValueError(
            f"filelist {listing!r}: every clip is shorter than one training segment "
            f"({cfg.segment_frames} frames = {cfg.segment_size} samples); first: line {skipped[0][0]}"
        )
    if skipped:
        warnings.warn(
            f"{len(skipped)} of {len(skipped) + len(clips)} clips are shorter than one training segment "
            f"and are skipped, as RVC does (first: line {skipped[0][0]}, {skipped[0][1]})",
            RVCLoRAWarning,
            stacklevel=2,
        )
    assert feature_dim is not None
    found = next(v for v, d in FEATURE_DIMS.items() if d == feature_dim)
    return Experiment(exp_dir, listing, cfg, tuple(clips), bool(form), found, feature_dim, tuple(skipped))


# --------------------------------------------------------------------------- reading clips


def _read_wave(path: str) -> np.ndarray:
    import soundfile as sf

    wave, _ = sf.read(path, dtype="float32", always_2d=False)  # int16 is scaled to [-1, 1); float stays as is
    return np.ascontiguousarray(wave, dtype=np.float32)


@dataclass
class Item:
    spec: Tensor  # (spec_channels, frames)
    wave: Tensor  # (1, frames * hop)
    phone: Tensor  # (frames, feature_dim)
    pitch: Tensor | None  # (frames,) long
    pitchf: Tensor | None  # (frames,) float
    speaker: int


class ClipDataset(torch.utils.data.Dataset):
    """The clips of an :class:`Experiment`, read as RVC reads them (see the module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        self.experiment = experiment
        self.clips = experiment.clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Item:
        cfg = self.experiment.config
        clip = self.clips[index]
        wave = torch.from_numpy(_read_wave(clip.wav))
        phone = np.repeat(np.load(clip.feature, allow_pickle=False), 2, axis=0)[:MAX_FRAMES]
        spec = spectrogram(wave[None], cfg.filter_length, cfg.hop_length, cfg.win_length)[0]
        n = clip.frames
        item = Item(
            spec[:, :n].contiguous(),
            wave[None, : n * cfg.hop_length].contiguous(),
            torch.from_numpy(np.ascontiguousarray(phone[:n], dtype=np.float32)),
            None,
            None,
            clip.speaker,
        )
        if clip.f0 is not None:
            item.pitch = torch.from_numpy(np.load(clip.f0, allow_pickle=False)[:n].astype(np.int64))
            item.pitchf = torch.from_numpy(np.load(clip.f0nsf, allow_pickle=False)[:n].astype(np.float32))
        return item


@dataclass
class Batch:
    """A zero-padded batch, as RVC's collate functions build it (``pitch``/``pitchf`` ``None`` without f0)."""

    phone: Tensor  # (B, T, D)
    lengths: Tensor  # (B,) frames
    pitch: Tensor | None  # (B, T) long
    pitchf: Tensor | None  # (B, T)
    spec: Tensor  # (B, spec_channels, T)
    wave: Tensor  # (B, 1, T * hop)
    speaker: Tensor  # (B,) long
    positions: Tensor  # (B,) long: each clip's place in its epoch's order (seeds its random slice)

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            mv(self.phone),
            mv(self.lengths),
            mv(self.pitch),
            mv(self.pitchf),
            mv(self.spec),
            mv(self.wave),
            mv(self.speaker),
            self.positions,
        )

    def __len__(self) -> int:
        return self.phone.shape[0]


def collate(samples: Sequence[tuple[int, Item]]) -> Batch:
    """``(position, item)`` pairs → a zero-padded :class:`Batch`."""
    items = [it for _, it in samples]
    n = len(items)
    t_max = max(it.spec.shape[1] for it in items)
    hop = items[0].wave.shape[1] // items[0].spec.shape[1]
    spec = torch.zeros(n, items[0].spec.shape[0], t_max)
    wave = torch.zeros(n, 1, t_max * hop)
    phone = torch.zeros(n, t_max, items[0].phone.shape[1])
    f0 = items[0].pitch is not None
    pitch = torch.zeros(n, t_max, dtype=torch.long) if f0 else None
    pitchf = torch.zeros(n, t_max) if f0 else None
    lengths = torch.zeros(n, dtype=torch.long)
    for i, it in enumerate(items):
        t = it.spec.shape[1]
        spec[i, :, :t] = it.spec
        wave[i, :, : it.wave.shape[1]] = it.wave
        phone[i, :t] = it.phone
        lengths[i] = t
        if f0:
            pitch[i, :t] = it.pitch
            pitchf[i, :t] = it.pitchf
    speaker = torch.tensor([it.speaker for it in items], dtype=torch.long)
    positions = torch.tensor([p for p, _ in samples], dtype=torch.long)
    return Batch(phone, lengths, pitch, pitchf, spec, wave, speaker, positions)


class _Positioned(torch.utils.data.Dataset):
    def __init__(self, dataset: ClipDataset, order: list[int]) -> None:
        self.dataset, self.order = dataset, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[int, Item]:
        return position, self.dataset[self.order[position]]


class EpochSampler:
    """Which clips each step of an epoch trains on, for every process of a run.

    Each epoch shuffles the clips with a generator seeded by ``(seed, epoch)`` and wraps around
    to fill the last global batch (RVC's bucket sampler pads its buckets the same way), so every
    step sees ``global_batch`` clips. Process ``rank`` of ``world`` takes its contiguous share
    of each global batch: the union over processes is the same whatever ``world`` is.
    """

    def __init__(self, n_clips: int, global_batch: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if global_batch % world:
            raise ValueError(
                f"--batch-size {global_batch} is not a multiple of the {world} processes; each process "
                "takes an equal share of a step's batch"
            )
        self.n, self.global_batch, self.seed, self.rank, self.world = n_clips, global_batch, seed, rank, world
        self.local_batch = global_batch // world

    def steps_per_epoch(self) -> int:
        return -(-self.n // self.global_batch)

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.steps_per_epoch() * self.global_batch
        return [perm[i % self.n] for i in range(total)]

    def local_batches(self) -> Iterator[list[int]]:
        """Positions (into :meth:`order`) of this process's share of each step."""
        for step in range(self.steps_per_epoch()):
            start = step * self.global_batch + self.rank * self.local_batch
            yield list(range(start, start + self.local_batch))


def epoch_loader(
    dataset: ClipDataset, sampler: EpochSampler, epoch: int, workers: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over one epoch of this process's batches."""
    return torch.utils.data.DataLoader(
        _Positioned(dataset, sampler.order(epoch)),
        batch_sampler=list(sampler.local_batches()),
        collate_fn=collate,
        num_workers=workers,
    )
