"""rvclora: exact, fused LoRA layers for RVC voice models (Linear, Conv1d, ConvTranspose1d, Conv2d).

The public API; see README.md and docs/.
"""

# first: in a source checkout, rvclora.kernels is the top-level kernels/ (see _checkout.py)
from . import _checkout  # noqa: F401
from .blend import blend_adapters
from .checkpoint import (
    extract_lora_weights,
    load_lora_checkpoint,
    load_lora_weights,
    read_lora_config,
    read_lora_file,
    save_lora_checkpoint,
    write_lora_file,
)
from .config import (
    BALANCED_CONFIG,
    DECODER_CONFIG,
    DEFAULT_CONFIG,
    FAST_CONFIG,
    HIGH_QUALITY_CONFIG,
    VOICE_CONFIG,
    LoRAConfig,
)
from .convert import convert, export_peft_adapter, import_peft_adapter
from .inject import (
    count_lora_parameters,
    get_lora_parameters,
    inject_lora,
    lora_modules,
    mark_only_lora_as_trainable,
    merge_lora_weights,
    merged_state_dict,
    print_lora_info,
    unmerge_lora_weights,
)
from .layers import LoRAConv1d, LoRAConv2d, LoRAConvTranspose1d, LoRALayer, LoRALinear

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig",
    "DEFAULT_CONFIG",
    "HIGH_QUALITY_CONFIG",
    "FAST_CONFIG",
    "BALANCED_CONFIG",
    "DECODER_CONFIG",
    "VOICE_CONFIG",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv1d",
    "LoRAConvTranspose1d",
    "LoRAConv2d",
    "inject_lora",
    "lora_modules",
    "mark_only_lora_as_trainable",
    "get_lora_parameters",
    "count_lora_parameters",
    "extract_lora_weights",
    "load_lora_weights",
    "merge_lora_weights",
    "unmerge_lora_weights",
    "merged_state_dict",
    "print_lora_info",
    "save_lora_checkpoint",
    "write_lora_file",
    "read_lora_file",
    "blend_adapters",
    "load_lora_checkpoint",
    "read_lora_config",
    "convert",
    "export_peft_adapter",
    "import_peft_adapter",
]
