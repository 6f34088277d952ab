"""One training step of the 40k generator, the frozen base against LoRA on two or more backends, in one
interleaved run (timing only, not a test).

    python bench/compare_backends.py [--rank 8] [--batch 1] [--rounds 11] [--backends torch,cpu] [--threads 2]

The base is the frozen generator with weight_norm folded (frozen after folding), as in ``pytest bench/``;
the LoRA model adapts ``ups`` + ``resblocks`` (``lora_alpha = 2r``, a non-zero ``B``) and runs each
backend in turn within every round. Each figure is the median over rounds of that round's
``LoRA step / base step``: the before/after comparison of two backends on one machine at one time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gan import fold_weight_norm

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
    lora = inject_lora(build_generator(cfg, seed=0),
                       LoRAConfig(r=r, lora_alpha=2 * r, target_modules=["ups", "resblocks"]))
    for n, p in lora.named_parameters():
        p.requires_grad_("lora_" in n)
    with torch.no_grad():
        for _, m in lora_modules(lora):
            m.lora_B.normal_(0, 0.01)
    return base, lora, (x, f0, g)


def compare(r: int, batch: int, rounds: int, backends) -> None:
    base, lora, (x, f0, g) = generator_pair(r, batch)
    xi = x.clone().requires_grad_(True)
    with torch.no_grad():
        gy = torch.randn_like(base(x, f0, g, generator=torch.Generator().manual_seed(0)))

    def step(model, backend=None):
        set_backend(backend)
        model(xi, f0, g, generator=torch.Generator().manual_seed(0)).backward(gy)

    variants = {"base": lambda: step(base), **{be: (lambda be=be: step(lora, be)) for be in backends}}
    for f in variants.values():
        f()
        f()
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    set_backend(None)
    b = times["base"]
    print(f"40k generator b{batch} ups+resblocks r={r}, {torch.get_num_threads()} threads, {rounds} rounds: "
          f"base {statistics.median(b) * 1e3:.0f} ms; "
          + ", ".join(f"{be} {(statistics.median([t / u for t, u in zip(times[be], b)]) - 1) * 100:+.1f} %"
                      for be in backends))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--backends", default="torch,cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compare(args.rank, args.batch, args.rounds, [b.strip() for b in args.backends.split(",") if b.strip()])


if __name__ == "__main__":
    main()
