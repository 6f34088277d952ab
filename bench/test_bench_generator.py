"""The whole RVC 40k generator (GeneratorNSF, legacy weight_norm), one training step in fp32.

One test per batch size (1 and 4, 32 frames; quick mode: batch 1, 2 frames of a shrunk
generator, :data:`QUICK_CONFIG`, r = 8 only, one round). Each test is one
interleaved run of every variant at that batch, and gives four table rows, LoRA on:
``ups`` + ``resblocks`` at r = 4, 8, 16, and ``ups`` only at r = 8 (``lora_alpha = 2r``).
Those rows share the run's ``base`` (frozen generator with weight_norm folded like the LoRA model's,
gradient w.r.t. the latent input only)
and ``full`` (every parameter trains: ``weight_g``/``weight_v`` included, as RVC trains).

The plain unfused modules wrap the weight-normed layers as they are. At batch 4 in full mode
only r = 8 (``ups`` + ``resblocks``) gets a plain variant, to keep ``pytest bench/`` within its
10 minutes on a 2-core machine. PEFT and loralib are tried on the same targets and reported
unsupported with their reason (PEFT has no ConvTranspose1d; loralib neither, and its Conv1d
fails for kernels > 1). Before timing, the plain variant must reproduce rvclora's output with
the same factors (a non-zero ``B``).

The flop floor of a row is the per-layer floor of docs/maths.md weighted by each layer's share of the
frozen base step's flops (forward, plus the input gradient where the layer's input needs one),
measured on the model with forward hooks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from alternatives import Unsupported, copy_factors, inject_plain_lora, loralib_lora, peft_lora
from gan import fold_weight_norm
from harness import base_step_flops, layer_floor, lora_extra, machine_rates, roofline_s

from rvclora import LoRAConfig, inject_lora, lora_modules
from rvclora.inject import target_matches
from rvclora.models import GENERATOR_CONFIGS, GeneratorConfig, build_generator

#: Nominal seconds of timed rounds per batch size (it still runs at least the plan's min rounds).
CASE_BUDGET_S = 120.0
# (warm-up rounds, min rounds, max rounds); batch 1 steps are short enough for more rounds (less noise)
PLAN_QUICK, PLAN_FULL, PLAN_FULL_B1 = (1, 1, 1), (1, 3, 5), (1, 5, 15)
CONFIG = "40k"
FRAMES_FULL, FRAMES_QUICK = 32, 2
#: Quick mode: the 40k layout shrunk (32 channels, two ×2 upsamplers), so the smoke test stays fast.
QUICK_CONFIG = GeneratorConfig(
    "tiny", "v1", 40000, (2, 2), (4, 4), FRAMES_QUICK, inter_channels=16, upsample_initial_channel=32, gin_channels=16
)
#: (row label, LoRA targets, rank)
LORA_CASES = [
    ("ups+resblocks", ("ups", "resblocks"), 4),
    ("ups+resblocks", ("ups", "resblocks"), 8),
    ("ups+resblocks", ("ups", "resblocks"), 16),
    ("ups", ("ups",), 8),
]
QUICK_LORA_CASES = [LORA_CASES[1]]
#: Which LoRA cases get a plain-module variant at batch 4 in full mode (all of them otherwise).
PLAIN_AT_BATCH4 = {("ups+resblocks", 8)}
REL_TOL = 1e-3  # fp32 through ~40 layers; weight_norm folded (rvclora) vs recomputed (plain)

BENCH_PARAMS = {"batch": ([1, 4], [1], lambda b: f"b{b}")}

_LAYERS = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear)


def _forward_flops(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if isinstance(m, nn.ConvTranspose1d):
        return 2.0 * x.numel() * (m.out_channels // m.groups) * m.kernel_size[0]
    if isinstance(m, nn.Conv1d):
        return 2.0 * y.numel() * (m.in_channels // m.groups) * m.kernel_size[0]
    return 2.0 * y.numel() * m.in_features


def generator_floor(model: nn.Module, inputs, targets, r: int) -> float:
    """The flop floor of LoRA on ``targets`` at rank ``r``, weighted by each layer's base-step flops."""
    layers = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):

            def hook(mod, args, out, name=name):
                x = args[0]
                # the frozen step computes the input gradient only where the input needs one
                layers[name] = (mod, _forward_flops(mod, x, out) * (2 if x.requires_grad else 1))

            hooks.append(m.register_forward_hook(hook))
    try:
        x, f0, g = inputs
        model(x.detach().requires_grad_(True), f0, g, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    total = sum(f for _, f in layers.values())
    extra = sum(
        layer_floor(m, r) * f for name, (m, f) in layers.items() if any(target_matches(t, name) for t in targets)
    )
    return extra / total


def generator_roof(model: nn.Module, inputs, targets, r: int) -> float:
    """The roofline floor (docs/maths.md) of LoRA on ``targets``: the adapted layers' roofline times over
    the frozen step's base-sized flops at this machine's convolution rate."""
    rates, layers, hooks = machine_rates(), {}, []
    for name, m in model.named_modules():
        if isinstance(m, _LAYERS):

            def hook(mod, args, out, name=name):
                flops = base_step_flops(mod, args[0].shape) * (1 if args[0].requires_grad else 0.5)
                layers[name] = (mod, tuple(args[0].shape), flops)

            hooks.append(m.register_forward_hook(hook))
    try:
        x, f0, g = inputs
        model(x.detach().requires_grad_(True), f0, g, generator=torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    base_s = sum(f for _, _, f in layers.values()) / (rates["conv_gflops"] * 1e9)
    extra_s = sum(
        roofline_s(*lora_extra(m, shape, r), rates)
        for name, (m, shape, _) in layers.items()
        if any(target_matches(t, name) for t in targets)
    )
    return extra_s / base_s


def _variant(h, model: nn.Module, inputs, gy, trainable):
    model.train()
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    x, f0, g = inputs
    xi = x.detach().clone().requires_grad_(True)
    params = [xi] + [p for p in model.parameters() if p.requires_grad]

    def step():
        # a fresh seeded generator: every variant and step sees the same harmonic source
        model(xi, f0, g, generator=torch.Generator().manual_seed(0)).backward(gy)

    return h.Variant(step=step, params=params)


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _output(model, inputs):
    x, f0, g = inputs
    with torch.no_grad():
        return model(x, f0, g, generator=torch.Generator().manual_seed(0))


def _target_regex(targets) -> str:
    # PEFT matches a plain string by suffix; a regex names exactly the layers rvclora adapts.
    parts = {"ups": r"ups\.\d+", "resblocks": r"resblocks\.\d+\.convs[12]\.\d+"}
    return "(" + "|".join(parts[t] for t in targets) + ")"


def _library_attempt(h, build):
    try:
        build()
    except Unsupported as e:
        return h.Variant.unsupported(str(e))
    # Both libraries are known to reject these layers; if a future version accepts them it must
    # first be checked against rvclora's output before it can be timed here.
    return h.Variant.unsupported("unsupported here (accepted, but this benchmark has no output check for it yet)")


def _loralib_whole(model, names, r, alpha):
    for name in names:
        loralib_lora(model.get_submodule(name), r, alpha)


def test_generator_step(benchmark, bench_harness, batch):
    h = bench_harness
    config = QUICK_CONFIG if h.quick else GENERATOR_CONFIGS[CONFIG]
    frames = config.segment_frames
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.inter_channels, frames, generator=gen)
    f0 = 100.0 + 200.0 * torch.rand(batch, frames, generator=gen)
    g = torch.randn(batch, config.gin_channels, 1, generator=gen)
    inputs = (x, f0, g)

    def build():
        return build_generator(config, seed=0)

    # The baseline is the frozen base with weight_norm folded, as in the LoRA model (legacy weight_norm
    # recomputes each weight every forward); frozen after folding, since remove_weight_norm makes a new
    # Parameter that requires grad.
    base = fold_weight_norm(build())
    gy = torch.randn_like(_output(base, inputs))
    variants = {
        "base": _variant(h, base, inputs, gy, lambda n: False),
        "full": _variant(h, build(), inputs, gy, lambda n: True),
    }
    rows = []
    for label, targets, r in QUICK_LORA_CASES if h.quick else LORA_CASES:
        key = f"{label}-r{r}"
        alpha = 2 * r
        rv = inject_lora(build(), LoRAConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
        names = [n for n, _ in lora_modules(rv)]
        with torch.no_grad():
            for _, m in lora_modules(rv):
                m.lora_B.normal_(0.0, 0.01)  # non-zero, so the output check sees the LoRA path
        variants[f"rvclora {key}"] = _variant(h, rv, inputs, gy, _is_lora)
        roles = {"base": "base", "full": "full", "rvclora": f"rvclora {key}"}

        if h.quick or batch == 1 or (label, r) in PLAIN_AT_BATCH4:
            plain = inject_plain_lora(build(), names, r, alpha)
            for name, m in lora_modules(rv):
                copy_factors(m, plain.get_submodule(name))
            want, got = _output(rv, inputs), _output(plain, inputs)
            err = float((got - want).norm() / want.norm())
            assert err <= REL_TOL, f"plain LoRA generator differs from rvclora's ({key}): rel. error {err:.2e}"
            variants[f"plain {key}"] = _variant(h, plain, inputs, gy, _is_lora)
            roles["plain"] = f"plain {key}"
        variants[f"peft {key}"] = _library_attempt(
            h, lambda t=targets, r=r, a=alpha: peft_lora(build(), _target_regex(t), r, a)
        )
        variants[f"loralib {key}"] = _library_attempt(h, lambda n=names, r=r, a=alpha: _loralib_whole(build(), n, r, a))
        roles["peft"], roles["loralib"] = f"peft {key}", f"loralib {key}"
        floor = generator_floor(base, inputs, targets, r)
        rows.append(
            h.Row(
                case=f"gen{config.name} b{batch} {label} r{r}",
                kind="generator",
                floor=floor,
                roles=roles,
                params={
                    "config": config.name,
                    "batch": batch,
                    "frames": frames,
                    "targets": list(targets),
                    "r": r,
                    "lora_alpha": alpha,
                    "lora_layers": len(names),
                },
                saved_allowance=h.saved_allowance(rv, lambda m=rv: _output(m, inputs)),
                roof=generator_roof(base, inputs, targets, r),
            )
        )
    h.run(benchmark, variants, rows, h.plan(PLAN_QUICK, PLAN_FULL_B1 if batch == 1 else PLAN_FULL))
