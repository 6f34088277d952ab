"""Where rvclora's CPU overhead on the RVC generator goes, layer by layer (timing only, not a test).

    python bench/attribution.py [--rank 8] [--batch 1] [--rounds 7] [--backends cpu,torch] [--threads 2]

For every distinct adapted layer shape of the 40k generator (``ups`` + ``resblocks``: kind, channels,
kernel, dilation, input length at 32 frames), one training step of that layer alone (forward and
backward, the input needs a gradient, only the LoRA factors train) is timed against the same layer of
the frozen base with weight_norm folded, interleaved round by round; the overhead is the difference
of the medians. Each row is weighted by how many layers share the shape, and the sum is set against
the sum of the base layers' times, with the flop floor of docs/maths.md per row and the roofline floor
``roof = max(extra flops / conv rate, extra bytes / bandwidth) / (base flops / conv rate)`` (rates
measured here first, by ``harness.machine_rates``); ``/roof`` is the overhead (a fraction of the base
layer's time) ÷ roof. The rows' sum leaves
out what is not a layer (activations, the source module, residual adds), so it reads higher than the
whole-model overhead of ``pytest bench/``; it shows which layers carry the cost.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
import torch.nn as nn
from compare_backends import generator_pair
from harness import layer_floor, machine_rates, roofline_floor

from rvclora import lora_modules
from rvclora.ops import set_backend


def attribution(r: int, batch: int, rounds: int, backends) -> None:
    base, lora, (x, f0, g) = generator_pair(r, batch)
    gen = torch.Generator().manual_seed(1)
    lora.train()
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: shapes.__setitem__(n, tuple(a[0].shape)))
        for n, m in base.named_modules()
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))
    ]
    with torch.no_grad():
        base(x, f0, g, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    groups = collections.defaultdict(list)
    for n, _ in lora_modules(lora):
        bm = base.get_submodule(n)
        kind = "ConvT" if isinstance(bm, nn.ConvTranspose1d) else "Conv1d"
        groups[(kind, bm.in_channels, bm.out_channels, bm.kernel_size[0], bm.dilation[0], shapes[n][-1])].append(n)

    rates = machine_rates()
    print(
        f"40k generator layers, batch {batch}, r={r}, {torch.get_num_threads()} threads, {rounds} rounds; "
        "ms per step of one layer (median), overhead over the frozen folded base layer; "
        f"conv {rates['conv_gflops']:.0f} GFLOP/s, triad {rates['triad_gbs']:.0f} GB/s"
    )
    head = f"{'kind':<7}{'in':>5}{'out':>5}{'k':>4}{'dil':>4}{'T':>7}{'n':>4}{'base':>9}{'floor':>8}{'roof':>8}"
    print(head + "".join(f"{be + ' (/roof)':>26}" for be in backends))
    total = collections.Counter()
    for key, names in sorted(groups.items(), key=lambda kv: -kv[0][5]):
        bm, lm = base.get_submodule(names[0]), lora.get_submodule(names[0])
        xi = torch.randn(shapes[names[0]], generator=gen).requires_grad_(True)
        with torch.no_grad():
            gy = torch.randn_like(bm(xi))

        def run_base(bm=bm, xi=xi, gy=gy):
            bm(xi).backward(gy)

        def run(be, lm=lm, xi=xi, gy=gy):
            set_backend(be)
            lm(xi).backward(gy)

        fns = {"base": run_base, **{be: (lambda be=be: run(be)) for be in backends}}
        for f in fns.values():
            f()
            f()
        times = collections.defaultdict(list)
        for _ in range(rounds):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        floor = layer_floor(bm, r)
        roof = roofline_floor(bm, xi.shape, r, rates)
        line = f"{key[0]:<7}{key[1]:>5}{key[2]:>5}{key[3]:>4}{key[4]:>4}{key[5]:>7}{len(names):>4}"
        line += f"{med['base']:>9.3f}{floor * 100:>7.1f}%{roof * 100:>7.1f}%"
        for be in backends:
            over = med[be] - med["base"]
            total[be] += over * len(names)
            line += f"{over:>+9.3f} ({over / med['base'] * 100:>4.0f}%) {over / med['base'] / roof:>5.1f}x"
        total["base"] += med["base"] * len(names)
        total["floor"] += floor * med["base"] * len(names)
        total["roof"] += roof * med["base"] * len(names)
        print(line, flush=True)
    set_backend(None)
    print(
        f"sum of the layers: base {total['base']:.1f} ms, floor +{total['floor']:.1f} ms "
        f"({total['floor'] / total['base'] * 100:.1f} %), roof +{total['roof']:.1f} ms "
        f"({total['roof'] / total['base'] * 100:.1f} %); "
        + "; ".join(f"{be} +{total[be]:.1f} ms ({total[be] / total['base'] * 100:.1f} %)" for be in backends)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--backends", default="cpu,torch")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    attribution(args.rank, args.batch, args.rounds, [b.strip() for b in args.backends.split(",") if b.strip()])


if __name__ == "__main__":
    main()
