"""LoRA parameter counts and adapter file sizes of every preset on RVC's synthesizers, and how VOICE_CONFIG's
layer split and rank were chosen.

    PYTHONPATH=. python bench/voice_sizes.py            # the README table (markdown; --every: per config)
    PYTHONPATH=. python bench/voice_sizes.py --derive   # the per-layer split and the rank budget

Models are built on the "meta" device (shapes only, nothing allocated); each adapter is then written
for real (zeros of the adapter's shapes, fp32, safetensors, with rvclora's metadata) and its size on
disk measured. The export size is that of RVC's fp16 export of the same model (every key except
enc_q, two bytes each).

**The split** (``--derive``): for every Linear/Conv1d/ConvTranspose1d of ``enc_p``, ``enc_q``, ``flow``
and ``dec``, LoRA of rank r costs ``r·(in/g·k + out)`` parameters against ``in/g·out·k`` for the whole
layer; a layer goes to LoRA when that is smaller at the chosen rank in the v2-40k model, else it is
saved whole (``modules_to_save``). Embeddings (``emb_g``, ``enc_p.emb_pitch``) cannot take LoRA and are
saved whole. The script prints which layers each rule puts where, and the preset's size against the
per-layer optimum in every config.

**The rank**: the largest power of two whose VOICE adapter stays within one eighth of the fp16 export it
adapts, in every shipped config.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

from rvclora import LoRAConfig
from rvclora.blend import layer_records
from rvclora.checkpoint import write_lora_file
from rvclora.config import BALANCED_CONFIG, DECODER_CONFIG, FAST_CONFIG, HIGH_QUALITY_CONFIG, VOICE_CONFIG
from rvclora.inject import inject_lora, saved_parameters
from rvclora.models.synthesizer import SYNTHESIZER_CONFIGS, build_synthesizer

PRESETS = {
    "DEFAULT_CONFIG / DECODER_CONFIG": DECODER_CONFIG,
    "FAST_CONFIG": FAST_CONFIG,
    "BALANCED_CONFIG": BALANCED_CONFIG,
    "HIGH_QUALITY_CONFIG": HIGH_QUALITY_CONFIG,
    "VOICE_CONFIG": VOICE_CONFIG,
}
BUDGET = 1 / 8  # an adapter at most this share of the fp16 export (a choice: see the README)


def meta_model(name: str, f0: bool = True) -> nn.Module:
    with torch.device("meta"):
        return build_synthesizer(name, f0)


def export_bytes(name: str, f0: bool = True) -> int:
    sd = meta_model(name, f0).state_dict()
    return sum(2 * v.numel() for k, v in sd.items() if "enc_q" not in k)


def adapter_stats(name: str, config: LoRAConfig, f0: bool = True) -> tuple[int, int, int, int]:
    """(LoRA layers, LoRA parameters, saved parameters, adapter bytes on disk)."""
    model = inject_lora(meta_model(name, f0), config)
    factors = {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    saved = saved_parameters(model)
    weights = {k: torch.zeros(p.shape) for k, p in {**factors, **saved}.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a.safetensors")
        write_lora_file(
            path,
            weights,
            config,
            base_fingerprint="fp16-sha256:synth:" + "0" * 32,
            metadata={"layers": layer_records(model)},
        )
        size = os.path.getsize(path)
    return (len(factors) // 2, sum(p.numel() for p in factors.values()), sum(p.numel() for p in saved.values()), size)


def table(every: bool = False) -> None:
    """One row per preset (ranges over the six shipped configs, f0), or with ``every`` one row per config."""
    names = list(SYNTHESIZER_CONFIGS)
    print(
        "| preset | r | model | LoRA layers | LoRA params | saved whole | adapter file (fp32) | share of the "
        "fp16 export |"
    )
    print("|---|---|---|---|---|---|---|---|")

    def span(values, fmt):
        lo, hi = min(values), max(values)
        return fmt(lo) if lo == hi else f"{fmt(lo)} – {fmt(hi)}"

    for label, cfg in PRESETS.items():
        rows = [(name, *adapter_stats(name, cfg), export_bytes(name)) for name in names]
        if every:
            for name, layers, lora, saved, size, exp in rows:
                print(
                    f"| `{label}` | {cfg.r} | {name} | {layers} | {lora:,} | {saved:,} | {size / 2**20:.2f} MiB | "
                    f"{100 * size / exp:.1f} % |"
                )
            continue
        print(
            f"| `{label}` | {cfg.r} | all six | {span([r[1] for r in rows], str)} | "
            f"{span([r[2] for r in rows], '{:,}'.format)} | {span([r[3] for r in rows], '{:,}'.format)} | "
            f"{span([r[4] / 2**20 for r in rows], '{:.2f} MiB'.format)} | "
            f"{span([100 * r[4] / r[5] for r in rows], '{:.1f} %'.format)} |"
        )


def _adaptable(model: nn.Module):
    for n, m in model.named_modules():
        if type(m) in (nn.Linear, nn.Conv1d, nn.ConvTranspose1d) or (
            isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)) and hasattr(m, "parametrizations")
        ):
            if n.split(".")[0] in ("enc_p", "enc_q", "flow", "dec"):
                yield n, m


def _costs(m: nn.Module, r: int) -> tuple[int, int]:
    w = m.weight
    full = w.numel()
    if isinstance(m, nn.Linear):
        return full, r * (m.in_features + m.out_features)
    k, g = m.kernel_size[0], m.groups
    if isinstance(m, nn.ConvTranspose1d):
        return full, r * (m.in_channels // g) + r * (m.out_channels // g) * k
    return full, r * (m.in_channels // g) * k + m.out_channels * (r // g)


def derive() -> None:
    r = VOICE_CONFIG.r
    model = meta_model("v2-40k")
    print(f"rank {r}, v2-40k: layers where LoRA is not smaller than the whole layer (saved whole instead):")
    for n, m in _adaptable(model):
        full, lora = _costs(m, r)
        if lora >= full:
            print(f"  {n:<40} whole {full:>7,}  LoRA {lora:>7,}")
    print("\nVOICE_CONFIG against the per-layer optimum (each layer LoRA or whole, whichever is smaller):")
    for name in SYNTHESIZER_CONFIGS:
        m = meta_model(name)
        optimum = sum(min(_costs(mod, r)) for _, mod in _adaptable(m))
        optimum += sum(p.numel() for n, p in m.named_parameters() if n.startswith(("emb_g", "enc_p.emb_pitch")))
        _, lora, saved, _ = adapter_stats(name, VOICE_CONFIG)
        extra = 100 * (lora + saved) / optimum - 100
        print(f"  {name}: preset {lora + saved:,} parameters, optimum {optimum:,} ({extra:+.1f} %)")
    print(f"\nrank budget: VOICE adapter <= {100 * BUDGET:.1f} % of the fp16 export in every config")
    for rank in (4, 8, 16, 32):
        cfg = LoRAConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=VOICE_CONFIG.target_modules,
            modules_to_save=VOICE_CONFIG.modules_to_save,
        )
        shares = [adapter_stats(n, cfg)[3] / export_bytes(n) for n in SYNTHESIZER_CONFIGS]
        print(f"  r={rank:<3} worst share {100 * max(shares):.1f} %  {'within' if max(shares) <= BUDGET else 'over'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--derive", action="store_true", help="print the layer split and the rank budget")
    p.add_argument("--every", action="store_true", help="one table row per shipped config")
    args = p.parse_args(argv)
    derive() if args.derive else table(args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
