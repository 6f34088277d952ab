"""Model definitions the LoRA layers are built for: RVC's generator (:mod:`rvclora.models.rvc`), its whole
synthesizer (:mod:`rvclora.models.synthesizer`) and its discriminator and losses
(:mod:`rvclora.models.discriminator`)."""

from .discriminator import (
    MultiPeriodDiscriminator,
    MultiPeriodDiscriminatorV2,
    build_discriminator,
    discriminator_loss,
    feature_loss,
    generator_loss,
    kl_loss,
)
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
from .synthesizer import (
    SYNTHESIZER_CONFIGS,
    SynthesizerConfig,
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
    build_synthesizer,
    get_synthesizer_config,
    synthesizer_class,
    synthesizer_from_rvc_config,
)

__all__ = [
    "CONFIG_ALIASES",
    "GENERATOR_CONFIGS",
    "SYNTHESIZER_CONFIGS",
    "Generator",
    "GeneratorConfig",
    "GeneratorNSF",
    "MultiPeriodDiscriminator",
    "MultiPeriodDiscriminatorV2",
    "SynthesizerConfig",
    "SynthesizerTrnMs256NSFsid",
    "SynthesizerTrnMs256NSFsid_nono",
    "SynthesizerTrnMs768NSFsid",
    "SynthesizerTrnMs768NSFsid_nono",
    "build_discriminator",
    "build_generator",
    "build_synthesizer",
    "discriminator_loss",
    "feature_loss",
    "generator_from_config",
    "generator_loss",
    "get_generator_config",
    "get_synthesizer_config",
    "kl_loss",
    "synthesizer_class",
    "synthesizer_from_rvc_config",
]
