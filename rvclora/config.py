"""LoRA configuration: :class:`LoRAConfig`, its validation and the four presets."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LoRAConfig",
    "BIAS_MODES",
    "DEFAULT_CONFIG",
    "HIGH_QUALITY_CONFIG",
    "FAST_CONFIG",
    "BALANCED_CONFIG",
]

#: Which biases train: none, every bias in the model, or the biases of adapted layers.
BIAS_MODES = ("none", "all", "lora_only")

_DEFAULT_TARGETS = ("ups", "resblocks")


@dataclass
class LoRAConfig:
    """What to adapt and how.

    Attributes:
        r: LoRA rank (> 0).
        lora_alpha: scaling numerator; the LoRA path is scaled by ``lora_alpha / r``.
        lora_dropout: dropout probability on the LoRA input, in ``[0, 1)``.
        target_modules: module names to adapt. A target matches a module whose qualified
            name equals it, ends with ``"." + target``, or contains it as a dotted component
            run (``"ups"`` matches ``dec.ups.0``); a target that is not a plain dotted name
            is treated as a regular expression matched with ``re.fullmatch`` against the
            qualified name.
        merge_weights: if True, ``eval()`` merges ΔW into the base weight and ``train()``
            unmerges it (the loralib convention).
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (see :data:`BIAS_MODES`).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(_DEFAULT_TARGETS))
    merge_weights: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        elif isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        else:
            raise TypeError(f"LoRAConfig.target_modules must be a list of module names (or one name), got "
                            f"{self.target_modules!r} ({type(self.target_modules).__name__})")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"LoRAConfig.r must be an int, got {self.r!r} ({type(self.r).__name__})")
        if self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be > 0, got {self.r}")
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
        for t in self.target_modules:
            if not isinstance(t, str) or not t:
                raise ValueError(f"LoRAConfig.target_modules entries must be non-empty strings, got {t!r}")
            try:
                re.compile(t)
            except re.error as e:
                raise ValueError(
                    f"LoRAConfig.target_modules entry {t!r} is not a valid regular expression: {e}"
                ) from None
        if not isinstance(self.merge_weights, bool):
            raise TypeError(f"LoRAConfig.merge_weights must be a bool, got {self.merge_weights!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoRAConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (plain ints, floats, strings, lists)."""
        return dataclasses.asdict(self)

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
