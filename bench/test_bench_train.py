"""The trainer's own step (``rvclora train``): LoRA against full fine-tuning with RVC's settings.

One step of :class:`rvclora.train.Trainer` on a generated experiment folder: the whole synthesizer's
training forward (``enc_p``, ``enc_q`` on the spectrogram, the flow, the decoder on a random slice),
a D step, a G step with RVC's four losses, AdamW on both. Variants, interleaved:

* ``rvclora``: LoRA with ``VOICE_CONFIG`` (rank 8 on enc_p, enc_q, flow and the decoder; emb_g,
  emb_pitch, conv_post, the later noise convs and m_source whole); D's parameter gradients are not
  computed in the G step (RVC discards them);
* ``full``: the same trainer training every parameter of G with RVC's settings: legacy weight_norm
  as the pretrained files hold it, and D's parameter gradients computed in the G step, as RVC does.

* ``base``: the same step with nothing in G training (weight_norm folded, every parameter frozen,
  the gradient taken with respect to G's inputs so the backward still runs through G), D's
  gradients skipped as in ``rvclora``.

The flop floor is LoRA's least extra work (docs/maths.md, per adapted layer) over the frozen
step's flops, counting G as forward + input gradient (2 × forward) and D as 8 × one forward on one
wave (as the GAN-step benchmark does); saved-whole modules are not in it. Before the timed run,
the same LoRA trainer with D's gradients computed (as a direct port of RVC's ``train.py`` would)
is timed against ``rvclora`` in a few paired rounds, and the bytes autograd saves in both are
counted: what skipping D's gradients saves (full mode only). Those figures go into the row's
params (JSON) and are printed.

Full mode: v2 40k, RVC's segment (32 frames, 12800 samples), full-width discriminator, batch 1,
clips of 1.0–1.2 s. Quick mode (CI smoke test): clips of 0.3 s, a 4-frame slice, D narrowed 16×.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from gan import discriminator_flops, fold_weight_norm
from harness import count_saved_bytes, layer_floor
from test_bench_generator import _forward_flops

from rvclora.models.discriminator import build_discriminator
from rvclora.models.rvc import get_generator_config
from rvclora.models.synthesizer import build_synthesizer
from rvclora.train.data import epoch_loader
from rvclora.train.loop import Trainer, TrainSettings
from rvclora.train.synthetic import make_synthetic_experiment

CASE_BUDGET_S = 150.0
PLAN_QUICK, PLAN_FULL = (1, 1, 1), (1, 3, 7)
DGRAD_ROUNDS = 5


def test_train_step(benchmark, bench_harness, tmp_path):
    h = bench_harness
    quick = h.quick
    seg, shrink, seconds, batch = (4, 16, (0.3, 0.3), 1) if quick else (32, 1, (1.0, 1.2), 1)
    exp = tmp_path / "logs" / "bench"
    make_synthetic_experiment(exp, get_generator_config("40k"), clips=2, seconds=seconds, segment_frames=seg)
    g, d = tmp_path / "G.pth", tmp_path / "D.pth"
    torch.save({"model": build_synthesizer("v2-40k", seed=1).state_dict()}, g)
    torch.save({"model": build_discriminator("v2", seed=2, shrink=shrink).state_dict()}, d)

    def trainer(name: str, **kw) -> Trainer:
        out = None if kw.get("full_finetune") else str(tmp_path / f"{name}.safetensors")
        return Trainer(
            TrainSettings(
                str(exp),
                str(g),
                str(d),
                output=out,
                run_dir=str(tmp_path / name),
                batch_size=batch,
                epochs=1,
                progress=False,
                plot=False,
                **kw,
            )
        )

    lora, full = trainer("lora"), trainer("full", full_finetune=True, skip_d_grads=False)
    frozen = trainer("frozen", full_finetune=True)
    fold_weight_norm(frozen.synth)
    frozen.synth.requires_grad_(False)  # after folding, which makes fresh parameters
    data = next(iter(epoch_loader(lora.dataset, lora.sampler, 1)))
    frozen_data = copy.copy(data)
    frozen_data.phone = data.phone.clone().requires_grad_(True)
    frozen_data.spec = data.spec.clone().requires_grad_(True)

    def step(tr: Trainer, batch=data):
        return lambda: tr.step(batch, 1)

    dgrad = (
        _d_grad_saving(lora, trainer("lora_rvc", skip_d_grads=False), data)
        if not quick
        else {"measured": "not in quick mode"}
    )
    variants = {
        "base": h.Variant(step=step(frozen, frozen_data)),
        "rvclora": h.Variant(step=step(lora)),
        "full": h.Variant(step=step(full)),
    }
    row = h.Row(
        case=f"train-step v2-40k b{batch} seg{seg} D/{shrink} VOICE_CONFIG",
        kind="train_step",
        floor=_floor(lora, data, seg),
        roles={"base": "base", "rvclora": "rvclora", "full": "full"},
        params={
            "synthesizer": "v2-40k",
            "batch": batch,
            "segment_frames": seg,
            "d_shrink": shrink,
            "clip_seconds": list(seconds),
            "lora_trainable": lora.trainable_count,
            "full_trainable": full.trainable_count,
            "d_grads": dgrad,
        },
    )
    h.run(benchmark, variants, [row], h.plan(PLAN_QUICK, PLAN_FULL))


def _d_grad_saving(lora: Trainer, lora_rvc: Trainer, data) -> dict:
    """LoRA steps with D's parameter gradients skipped vs computed (as RVC): paired time ratio, saved bytes."""
    saved = {k: count_saved_bytes(lambda tr=tr: tr.step(data, 1)) for k, tr in (("skip", lora), ("rvc", lora_rvc))}
    ratios = []
    for i in range(DGRAD_ROUNDS):
        t = {}
        for k, tr in (("skip", lora), ("rvc", lora_rvc)) if i % 2 == 0 else (("rvc", lora_rvc), ("skip", lora)):
            t0 = time.perf_counter()
            tr.step(data, 1)
            t[k] = time.perf_counter() - t0
        ratios.append(t["skip"] / t["rvc"])
    d_params = sum(p.numel() * p.element_size() for p in lora.disc.parameters())
    print(
        f"\nrvclora train step, D's parameter gradients skipped in the G step vs computed (as RVC): time "
        f"{statistics.median(ratios):.2f}x (median of {len(ratios)} paired rounds), autograd saves "
        f"{saved['skip'] / 2**20:.1f} MiB vs {saved['rvc'] / 2**20:.1f} MiB "
        f"({(saved['rvc'] - saved['skip']) / 2**20:.1f} MiB less); D holds {d_params / 2**20:.1f} MiB of parameters"
    )
    return {
        "time_skip_over_rvc": statistics.median(ratios),
        "rounds": len(ratios),
        "saved_bytes_skip": saved["skip"],
        "saved_bytes_rvc": saved["rvc"],
        "d_param_bytes": d_params,
    }


def _floor(tr: Trainer, data, seg: int) -> float:
    """LoRA's least extra flops over the frozen step's (see the module docstring)."""
    from rvclora import lora_modules

    lora_layers = {id(m) for _, m in lora_modules(tr.synth)}
    g_flops, extra = [0.0], [0.0]

    def hook(mod, args, out):
        f = _forward_flops(mod, args[0], out)
        g_flops[0] += f
        if id(mod) in lora_layers:
            extra[0] += layer_floor(mod, mod.r) * 2 * f

    hooks = [
        m.register_forward_hook(hook)
        for m in tr.synth.modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            ids, noise, gens = tr._draws(data, 1)
            tr.g_forward(data, ids, noise, gens)
    finally:
        for hk in hooks:
            hk.remove()
    wave = torch.zeros(1, 1, seg * tr.experiment.config.hop_length)
    d_flops = discriminator_flops(tr.disc, wave) * len(data)
    return extra[0] / (2 * g_flops[0] + 8 * d_flops)
