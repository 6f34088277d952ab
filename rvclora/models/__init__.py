"""Model definitions the LoRA layers are built for: RVC's generator (:mod:`rvclora.models.rvc`)."""

from .rvc import (
    CONFIG_ALIASES,
    GENERATOR_CONFIGS,
    Generator,
    GeneratorConfig,
    GeneratorNSF,
    build_generator,
    generator_from_config,
    get_generator_config,
)

__all__ = [
    "CONFIG_ALIASES",
    "GENERATOR_CONFIGS",
    "Generator",
    "GeneratorConfig",
    "GeneratorNSF",
    "build_generator",
    "generator_from_config",
    "get_generator_config",
]
