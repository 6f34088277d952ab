"""Where rvclora's CPU overhead on the RVC generator goes: a timing-only attribution (not a test).

    python bench/attribution.py [--rounds 25] [--rank 8] [--batch 1] [--threads N]

Times one training step of the frozen 40k generator (the baseline) and of the same model with LoRA
on ``ups`` + ``resblocks``, interleaved, with pieces of the torch backend's Conv1d path switched off
one at a time by monkeypatching (their gradients become zeros: the numbers of those variants are
wrong on purpose, only their time matters):

* ``no u (forward)``  — the forward is the merged convolution only (``u`` is zeros);
* ``no grad_A``       — the tap-stacked GEMM for ``grad_A`` (and its ``g_u = Bᵀg``) skipped;
* ``no grad_B``       — the ``grad_B = s·g·uᵀ`` GEMM skipped;
* ``no LoRA maths``   — all three: what is left is the per-layer structure (autograd Function,
  Python, the merged weight, ConvTranspose1d's LoRA).

Each cost is the difference from the full rvclora step, as a percentage of the base step (paired:
the median over rounds of each round's ratio). It also measures the fixed per-layer cost of the
LoRA op at a tiny shape (dispatch and Python, no arithmetic to speak of).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn as nn

from rvclora import LoRAConfig, LoRAConv1d, inject_lora
from rvclora.models import build_generator
from rvclora.ops import autotune
from rvclora.ops import torch_backend as tb


@contextlib.contextmanager
def patched(**repl):
    old = {name: getattr(tb, name) for name in repl}
    for name, fn in repl.items():
        setattr(tb, name, fn)
    try:
        yield
    finally:
        for name, fn in old.items():
            setattr(tb, name, fn)


def _zero_u(xp, a3, stride, conv_pad, dilation, groups, t_out):
    return xp.new_zeros(xp.shape[0], a3.shape[0], t_out)


def _zero_grad_A(g2, x, B, scaling, pad, dilation, k):
    return g2.new_zeros(B.shape[1], x.shape[1] * k)


def _zero_thin_weight_grad(g_u, xdp, stride, conv_pad, dilation, groups, k):
    return g_u.new_zeros(g_u.shape[1], xdp.shape[1] // groups * k)


def _zero_grad_B(g2, u, scaling):
    return g2.new_zeros(g2.shape[0], u.shape[1])


class _SplitOnly:
    """Stands in for the tuner: always the forward's 'split' candidate (so _zero_u removes all of u's cost)."""

    def __getattr__(self, name):
        return getattr(autotune, name)

    @staticmethod
    def choose_and_run(key, candidates, default):
        return candidates["split"]() if "split" in candidates else candidates[default]()


NO_U = dict(_thin_conv1d=_zero_u, autotune=_SplitOnly())
NO_GA = dict(_lean_grad_A=_zero_grad_A, _thin_conv1d_weight_grad=_zero_thin_weight_grad)
NO_GB = dict(_lean_grad_B=_zero_grad_B)
VARIANTS = {
    "rvclora": {},
    "no u (forward)": NO_U,
    "no grad_A": NO_GA,
    "no grad_B": NO_GB,
    "no LoRA maths": {**NO_U, **NO_GA, **NO_GB},
}


def generator_attribution(rounds: int, r: int, batch: int) -> None:
    torch.manual_seed(0)
    base = build_generator("40k", seed=0).requires_grad_(False)
    lora = inject_lora(build_generator("40k", seed=0), LoRAConfig(r=r, lora_alpha=2 * r,
                                                                  target_modules=["ups", "resblocks"]))
    x = torch.randn(batch, 192, 32)
    f0 = torch.full((batch, 32), 220.0)
    g = torch.randn(batch, 256, 1)

    def step(model):
        xi = x.clone().requires_grad_(True)
        model(xi, f0, g, generator=torch.Generator().manual_seed(0)).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    configs = [("base", base, {})] + [(name, lora, repl) for name, repl in VARIANTS.items()]
    for _ in range(2):
        for _, model, repl in configs:
            with patched(**repl):
                step(model)
    while autotune.pending():
        step(lora)
    times = {name: [] for name, _, _ in configs}
    for i in range(rounds):
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        for name, model, repl in order:
            with patched(**repl):
                t0 = time.perf_counter()
                step(model)
                times[name].append(time.perf_counter() - t0)
    ratio = {name: statistics.median(a / b for a, b in zip(times[name], times["base"])) for name in times}
    print(f"40k generator, batch {batch}, r={r}, {torch.get_num_threads()} threads, {rounds} interleaved rounds; "
          f"base step {statistics.median(times['base']) * 1e3:.0f} ms")
    print(f"  {'variant':<18} {'overhead vs base':>16} {'cost of the piece':>18}")
    for name in VARIANTS:
        cost = "" if name == "rvclora" else f"{(ratio['rvclora'] - ratio[name]) * 100:+.1f} %"
        print(f"  {name:<18} {(ratio[name] - 1) * 100:>+15.1f}% {cost:>18}")


def fixed_cost(reps: int = 2000) -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(32, 32, 7, padding=3)
    lora = LoRAConv1d.from_base(conv, r=8, lora_alpha=16)
    base = nn.Conv1d(32, 32, 7, padding=3).requires_grad_(False)
    x = torch.randn(1, 32, 16, requires_grad=True)
    gy = torch.randn(1, 32, 16)

    def per_step(m):
        for _ in range(50):
            m(x).backward(gy)
        t0 = time.perf_counter()
        for _ in range(reps):
            m(x).backward(gy)
        return (time.perf_counter() - t0) / reps

    b, lo = per_step(base), per_step(lora)
    print(f"fixed cost per adapted layer (Conv1d 32->32 k7 at T=16: dispatch and Python): "
          f"{(lo - b) * 1e6:.0f} us per training step (base {b * 1e6:.0f} us, rvclora {lo * 1e6:.0f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fixed_cost()
    generator_attribution(args.rounds, args.rank, args.batch)


if __name__ == "__main__":
    main()
