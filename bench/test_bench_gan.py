"""One whole RVC GAN training step (v1 40k decoder + multi-period discriminator + RVC's losses), fp32.

What a user feels: the discriminator trains in every setup and is most of the step's work, so
LoRA's share of the step is smaller than in the generator-only benchmark. Setups, interleaved:

* ``base``: frozen generator (weight_norm folded, frozen after folding); the latent input
  requires grad (the posterior encoder before the decoder trains in RVC);
* ``rvclora``: LoRA on ``ups`` + ``resblocks``, r = 8, alpha 16 (``RVCLORA_BACKEND``, default auto);
* ``plain``: the textbook unfused LoRA modules on the same layers (weight-normed bases as they are);
* ``full``: RVC's usual fine-tuning of every generator parameter (legacy weight_norm, as RVC trains).

Each step: decoder forward, D step on (real, generated.detach()), G step with adversarial +
feature-matching + 45·mel-L1 losses; AdamW on D always and on G's trainable parameters
(bench/gan.py; RVC's KL term is not part of it: no encoders here).

The flop floor is an estimate: the generator's LoRA floor (weighted as in the generator
benchmark) times the generator's share of the frozen step's flops, counting the frozen G as
forward + input gradient (2 × forward) and D as 8 × one forward on one wave (D step: forward on
two waves, weight gradients of both; G step: forward on two waves, weight and input gradients
of the generated one).
"""

from __future__ import annotations

import torch
from alternatives import copy_factors, inject_plain_lora
from gan import MelSpectrogram, MultiPeriodDiscriminator, adamw, discriminator_flops, fold_weight_norm, gan_step
from test_bench_generator import QUICK_CONFIG, generator_floor

from rvclora import LoRAConfig, inject_lora, lora_modules
from rvclora.models import GENERATOR_CONFIGS, build_generator

CASE_BUDGET_S = 60.0
PLAN_QUICK, PLAN_FULL = (1, 1, 1), (1, 3, 7)
R, TARGETS = 8, ("ups", "resblocks")
BENCH_PARAMS = {"batch": ([1], [1], lambda b: f"b{b}")}
QUICK_FRAMES = 8  # 32 samples: long enough for the period-17 discriminator's reflect padding


def test_gan_step(benchmark, bench_harness, batch):
    h = bench_harness
    config = QUICK_CONFIG if h.quick else GENERATOR_CONFIGS["40k"]
    frames = QUICK_FRAMES if h.quick else config.segment_frames
    samples = frames * config.hop_length
    mel = MelSpectrogram(n_fft=16, hop=4, win=16, n_mels=8) if h.quick else MelSpectrogram()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.inter_channels, frames, generator=gen)
    f0 = 100.0 + 200.0 * torch.rand(batch, frames, generator=gen)
    g = torch.randn(batch, config.gin_channels, 1, generator=gen)
    wave = 0.3 * torch.randn(batch, 1, samples, generator=gen)
    inputs = (x, f0, g)

    def build():
        return build_generator(config, seed=0)

    def disc():
        torch.manual_seed(1)
        d = MultiPeriodDiscriminator(shrink=16 if h.quick else 1)
        d.train()
        return d

    variants = {}

    def add(name, G, trainable):
        G.train()
        for n, p in G.named_parameters():
            p.requires_grad_(trainable(n))
        D = disc()
        opt_d, opt_g = adamw(D.parameters()), adamw(G.parameters())
        params = [p for p in G.parameters() if p.requires_grad] + list(D.parameters())
        variants[name] = h.Variant(step=gan_step(G, D, mel, opt_g, opt_d, inputs, wave), params=params)

    base = fold_weight_norm(build())  # freeze after folding: remove_weight_norm makes a fresh trainable Parameter
    add("base", base, lambda n: False)
    rv = inject_lora(build(), LoRAConfig(r=R, lora_alpha=2 * R, target_modules=list(TARGETS)))
    with torch.no_grad():
        for _, m in lora_modules(rv):
            m.lora_B.normal_(0.0, 0.01)
    names = [n for n, _ in lora_modules(rv)]
    plain = inject_plain_lora(build(), names, R, 2 * R)
    for name, m in lora_modules(rv):
        copy_factors(m, plain.get_submodule(name))
    add("rvclora", rv, lambda n: "lora_" in n)
    add("plain", plain, lambda n: "lora_" in n)
    add("full", build(), lambda n: True)

    gen_floor = generator_floor(base, inputs, TARGETS, R)
    g_flops = _generator_forward_flops(base, inputs)
    d_flops = discriminator_flops(disc(), wave)
    floor = gen_floor * 2 * g_flops / (2 * g_flops + 8 * d_flops)
    row = h.Row(
        case=f"gan-step gen{config.name} b{batch} {'+'.join(TARGETS)} r{R}",
        kind="gan_step",
        floor=floor,
        roles={"base": "base", "rvclora": "rvclora", "plain": "plain", "full": "full"},
        params={
            "config": config.name,
            "batch": batch,
            "frames": frames,
            "samples": samples,
            "targets": list(TARGETS),
            "r": R,
            "lora_alpha": 2 * R,
            "generator_floor": gen_floor,
            "generator_share_of_flops": 2 * g_flops / (2 * g_flops + 8 * d_flops),
        },
    )
    h.run(benchmark, variants, [row], h.plan(PLAN_QUICK, PLAN_FULL))


def _generator_forward_flops(model, inputs) -> float:
    import torch.nn as nn
    from test_bench_generator import _forward_flops

    total = [0.0]

    def hook(mod, args, out):
        total[0] += _forward_flops(mod, args[0], out)

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear))
    ]
    try:
        x, f0, g = inputs
        with torch.no_grad():
            model(x, f0, g, generator=torch.Generator().manual_seed(0))
    finally:
        for hk in hooks:
            hk.remove()
    return total[0]
