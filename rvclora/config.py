"""LoRA configuration: :class:`LoRAConfig`, its validation and the four presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LoRAConfig",
    "BIAS_MODES",
    "MAX_RANK",
    "DEFAULT_CONFIG",
    "HIGH_QUALITY_CONFIG",
    "FAST_CONFIG",
    "BALANCED_CONFIG",
    "DECODER_CONFIG",
    "VOICE_CONFIG",
]

#: Which biases train: none, every bias in the model, or the biases of adapted layers.
BIAS_MODES = ("none", "all", "lora_only")

_DEFAULT_TARGETS = ("ups", "resblocks")
#: The largest rank a config may declare: far above any layer of an RVC model (512 channels), and
#: low enough that a file declaring a huge rank is refused before anything is allocated.
MAX_RANK = 8192


@dataclass
class LoRAConfig:
    """What to adapt and how.

    Attributes:
        r: LoRA rank (> 0, at most :data:`MAX_RANK`).
        lora_alpha: scaling numerator; the LoRA path is scaled by ``lora_alpha / r``.
        lora_dropout: dropout probability on the LoRA input, in ``[0, 1)``.
        target_modules: module names to adapt (at most :data:`rvclora.targets.MAX_TARGETS`).
            A plain dotted name matches a module whose qualified name contains it as a dotted
            component run (``"ups"`` matches ``dec.ups.0``); any other target is a regular
            expression that must match the whole qualified name, run by a linear-time engine
            (:mod:`rvclora.targets`: no backreferences or lookarounds).
        merge_weights: if True, ``eval()`` merges ΔW into the base weight and ``train()``
            unmerges it (the loralib convention).
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (see :data:`BIAS_MODES`).
        modules_to_save: modules trained in full and stored whole in the adapter (PEFT's name),
            matched like ``target_modules`` (``"emb_g"``): layers LoRA cannot express exactly
            (``nn.Embedding``) or too small to be worth factoring. A module may not be both a LoRA
            target and saved. Empty (the default) for a pure LoRA adapter; the file then records
            no such field, as earlier releases wrote it.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(_DEFAULT_TARGETS))
    merge_weights: bool = False
    bias: str = "none"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.modules_to_save is None:
            self.modules_to_save = []
        elif isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        elif isinstance(self.modules_to_save, (list, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        else:
            raise TypeError(
                f"LoRAConfig.modules_to_save must be a list of module names (or one name, or None), "
                f"got {self.modules_to_save!r} ({type(self.modules_to_save).__name__})"
            )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        elif isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        else:
            raise TypeError(
                f"LoRAConfig.target_modules must be a list of module names (or one name), got "
                f"{self.target_modules!r} ({type(self.target_modules).__name__})"
            )
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"LoRAConfig.r must be an int, got {self.r!r} ({type(self.r).__name__})")
        if self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be > 0, got {self.r}")
        if self.r > MAX_RANK:
            raise ValueError(f"LoRAConfig.r must be at most {MAX_RANK} (MAX_RANK), got {self.r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"LoRAConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"LoRAConfig.lora_alpha must be a finite number > 0, got {self.lora_alpha}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise TypeError(f"LoRAConfig.lora_dropout must be a number, got {self.lora_dropout!r}")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules must name at least one module, got []")
        from .targets import check_targets

        try:
            check_targets(self.target_modules)
        except ValueError as e:
            raise ValueError(f"LoRAConfig.{e}") from None
        if not isinstance(self.merge_weights, bool):
            raise TypeError(f"LoRAConfig.merge_weights must be a bool, got {self.merge_weights!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if not isinstance(self.modules_to_save, list):
            raise TypeError(f"LoRAConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.modules_to_save:
            try:
                check_targets(self.modules_to_save)
            except ValueError as e:
                raise ValueError("LoRAConfig." + str(e).replace("target_modules", "modules_to_save")) from None

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (plain ints, floats, strings, lists); ``modules_to_save`` only when non-empty."""
        d = dataclasses.asdict(self)
        if not d["modules_to_save"]:
            del d["modules_to_save"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        if not isinstance(d, dict):
            raise TypeError(f"LoRAConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoRAConfig.from_dict: unknown fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


DEFAULT_CONFIG = LoRAConfig(r=8, lora_alpha=16)
HIGH_QUALITY_CONFIG = LoRAConfig(r=16, lora_alpha=32)
FAST_CONFIG = LoRAConfig(r=4, lora_alpha=8)
BALANCED_CONFIG = LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05)

#: The decoder's upsamplers and resblocks (``DEFAULT_CONFIG``'s targets): on a bare generator or on a
#: synthesizer (``"ups"`` matches ``dec.ups.0``).
DECODER_CONFIG = LoRAConfig(r=8, lora_alpha=16, target_modules=["ups", "resblocks"])

#: A whole-voice adapter: everything an RVC fine-tune trains, as LoRA where LoRA is the smaller form and
#: whole elsewhere. LoRA (rank 8) on every Linear/Conv of the text encoder ``enc_p``, the posterior
#: encoder ``enc_q`` (training only; dropped by an export) and the ``flow``, and on the decoder's
#: ``conv_pre``, ``cond``, ``ups``, ``resblocks`` and first noise conv. Saved whole: the speaker
#: embedding ``emb_g`` and the pitch embedding ``enc_p.emb_pitch`` (embeddings take no LoRA), and the
#: decoder's ``conv_post``, later noise convs and ``m_source`` (each smaller whole than as rank-8
#: factors). Entries absent from a model (the f0 parts of a no-f0 model) are skipped. How the split
#: and the rank were chosen: ``bench/voice_sizes.py --derive`` and the README.
VOICE_CONFIG = LoRAConfig(
    r=8,
    lora_alpha=16,
    target_modules=[
        "enc_p",
        "enc_q",
        "flow",
        "dec.conv_pre",
        "dec.cond",
        "dec.ups",
        "dec.resblocks",
        "dec.noise_convs.0",
    ],
    modules_to_save=["emb_g", "enc_p.emb_pitch", "dec.conv_post", "dec.m_source", r"dec\.noise_convs\.[1-9]"],
)
