"""One training step of the 40k generator, the frozen base against LoRA on two or more backends, in one
interleaved run (timing only, not a test).

    python bench/compare_backends.py [--rank 8] [--batch 1] [--rounds 11] [--backends torch,cpu] [--threads 2]
                                     [--full]

The base is the frozen generator with weight_norm folded (frozen after folding), as in ``pytest bench/``;
the LoRA model adapts ``ups`` + ``resblocks`` (``lora_alpha = 2r``, a non-zero ``B``) and runs each
backend in turn within every round. Each figure is the median over rounds of that round's
``LoRA step / base step``: the before/after comparison of two backends on one machine at one time;
the spread in brackets is the interquartile range of those per-round ratios. ``--full`` adds full
fine-tuning of the same folded model (every weight trains: weight_norm is folded for it too, so it
does not recompute the norm), and each backend's overhead as a fraction of full fine-tuning's. The
roofline floor (``harness.machine_rates``, ``harness.lora_extra``) sums the adapted layers' floors.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
from gan import fold_weight_norm
from harness import base_step_flops, lora_extra, machine_rates, roofline_s

from rvclora import LoRAConfig, inject_lora, lora_modules
from rvclora.models import GENERATOR_CONFIGS, build_generator
from rvclora.ops import set_backend


def generator_pair(r: int, batch: int):
    """(frozen folded base, LoRA model on ups + resblocks with a non-zero B, (x, f0, g)) at 32 frames."""
    cfg = GENERATOR_CONFIGS["40k"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.inter_channels, 32, generator=gen)
    f0 = 100 + 200 * torch.rand(batch, 32, generator=gen)
    g = torch.randn(batch, cfg.gin_channels, 1, generator=gen)
    base = fold_weight_norm(build_generator(cfg, seed=0)).requires_grad_(False)
    lora = inject_lora(
        build_generator(cfg, seed=0), LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["ups", "resblocks"])
    )
    for n, p in lora.named_parameters():
        p.requires_grad_("lora_" in n)
    with torch.no_grad():
        for _, m in lora_modules(lora):
            m.lora_B.normal_(0, 0.01)
    return base, lora, (x, f0, g)


def _quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return q[0], q[2]


def generator_roof(base, x, f0, g, r: int) -> float:
    """The roofline floor of LoRA on ups + resblocks as a fraction of the frozen generator step, both at
    this machine's rates: the adapted layers' roofline times over the step's base-sized flops / conv rate."""
    rates, shapes, total = machine_rates(), {}, [0.0]

    def hook(mod, a, o, n):
        shapes[n] = (mod, tuple(a[0].shape))
        total[0] += base_step_flops(mod, a[0].shape)

    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n))
        for n, m in base.named_modules()
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d, nn.Linear))
    ]
    with torch.no_grad():
        base(x, f0, g, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    roof = sum(
        roofline_s(*lora_extra(m, shape, r), rates)
        for n, (m, shape) in shapes.items()
        if n.startswith("ups.") or n.startswith("resblocks.")
    )
    return roof / (total[0] / (rates["conv_gflops"] * 1e9))


def compare(r: int, batch: int, rounds: int, backends, full: bool = False) -> dict:
    base, lora, (x, f0, g) = generator_pair(r, batch)
    xi = x.clone().requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn_like(base(x, f0, g, generator=torch.Generator().manual_seed(0)))
    roof = generator_roof(base, x, f0, g, r)
    full_model = None
    if full:
        full_model = fold_weight_norm(build_generator(GENERATOR_CONFIGS["40k"], seed=0)).requires_grad_(True)

    def step(model, backend=None):
        set_backend(backend)
        model(xi, f0, g, generator=torch.Generator().manual_seed(0)).backward(gy)
        if model is full_model:
            for p in model.parameters():
                p.grad = None

    variants = {
        "base": lambda: step(base),
        **({"full FT": lambda: step(full_model)} if full else {}),
        **{be: (lambda be=be: step(lora, be)) for be in backends},
    }
    for f in variants.values():
        f()
        f()
    times = {k: [] for k in variants}
    names = list(variants)
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: nobody always runs first
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    set_backend(None)
    b = times["base"]
    ratios = {k: [t / u - 1 for t, u in zip(times[k], b)] for k in names if k != "base"}
    med = {k: statistics.median(v) for k, v in ratios.items()}
    parts = []
    for k in names[1:]:
        lo, hi = _quartiles(ratios[k])
        part = f"{k} {med[k] * 100:+.1f} % [{lo * 100:+.1f}, {hi * 100:+.1f}]"
        if full and k != "full FT" and med["full FT"] > 0:
            part += f" = {med[k] / med['full FT']:.2f}x full FT's"
        parts.append(part)
    base_ms = statistics.median(b) * 1e3
    print(
        f"40k generator b{batch} ups+resblocks r={r}, {torch.get_num_threads()} threads, {rounds} rounds: "
        f"base {base_ms:.0f} ms; roofline floor +{roof * 100:.1f} %; " + ", ".join(parts),
        flush=True,
    )
    return {"base_ms": base_ms, "roof": roof, "overhead": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--backends", default="torch,cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--full", action="store_true", help="also time full fine-tuning of the folded model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compare(
        args.rank, args.batch, args.rounds, [b.strip() for b in args.backends.split(",") if b.strip()], full=args.full
    )


if __name__ == "__main__":
    main()
