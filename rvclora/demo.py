"""``rvclora demo``: the trainer end to end on a generated dataset; ``--teacher``: the generator-only demo.

``rvclora demo`` (:func:`run_voice_demo`) writes a small dataset in RVC's experiment-folder layout
(harmonic voices with known f0 and stand-in content features, :mod:`rvclora.train.synthetic`), a
random RVC v2 40k synthesizer as the "pretrained" G and RVC's v2 discriminator (narrowed 8×) as D,
runs :class:`rvclora.train.Trainer` on it as ``rvclora train`` would, merges the adapter into an RVC
export, and checks that the export infers what the adapted model infers.

``rvclora demo --teacher`` (:func:`run_teacher_demo`) fine-tunes a LoRA of RVC's generator toward a
teacher (the same base plus a hidden low-rank update), then reports speed, sizes and merging.
The teacher demo's speed report times training steps of three setups in interleaved rounds (the order rotates),
and reports medians of per-round ratios, so a drifting machine cancels out:

* frozen base: the same generator with weight_norm folded (as the LoRA model's is) and every
  parameter frozen after folding; forward + backward w.r.t. the input only;
* LoRA: forward + backward + AdamW step over the LoRA factors;
* full fine-tuning: forward + backward + AdamW step over every parameter, legacy weight_norm
  kept as RVC trains it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .io import format_bytes as _fmt_bytes
from .models.rvc import get_generator_config

__all__ = ["run_demo", "run_teacher_demo", "run_voice_demo", "TEACHER_DEFAULTS"]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _demo_inputs(frames: int, seed: int) -> tuple[Tensor, Tensor]:
    """A latent ``(1, 192, frames)`` and a pitch glide 120→240 Hz with one unvoiced frame."""
    x = torch.randn(1, 192, frames, generator=_seeded(seed))
    f0 = torch.linspace(120.0, 240.0, frames)[None]
    f0[:, frames // 2] = 0.0
    return x, f0


#: The teacher demo's own options and their defaults (``None`` on the command line means "not given").
TEACHER_DEFAULTS = {"config": "40k", "rank": 8, "steps": 40, "frames": 16, "lr": 5e-4, "bench_rounds": 7}


def run_demo(args: argparse.Namespace) -> int:
    """The ``rvclora demo`` command (``args``: its parsed options); returns the exit status."""
    if args.out_dir is not None and not os.path.isdir(args.out_dir):
        raise FileNotFoundError(f"--out-dir {args.out_dir!r} is not an existing directory")
    if args.teacher:
        for key, default in TEACHER_DEFAULTS.items():
            if getattr(args, key, None) is None:
                setattr(args, key, default)
        return run_teacher_demo(args)
    given = [key for key in TEACHER_DEFAULTS if getattr(args, key, None) is not None]
    if given:
        raise ValueError(
            f"--{given[0].replace('_', '-')} is an option of the teacher demo; run 'rvclora demo --teacher' to use it"
        )
    return run_voice_demo(args)


def run_teacher_demo(args: argparse.Namespace) -> int:
    """``rvclora demo --teacher``: LoRA of RVC's generator toward a teacher; speed, sizes, merging."""
    from tqdm import tqdm

    from .checkpoint import save_lora_checkpoint
    from .inject import (
        count_lora_parameters,
        inject_lora,
        mark_only_lora_as_trainable,
        merge_lora_weights,
        randomize_lora_,
        unmerge_lora_weights,
    )
    from .models.rvc import build_generator
    from .rvc_files import build_generator_from_rvc, load_rvc_file, merge_adapter, write_exported_model

    started = time.perf_counter()
    cfg = get_generator_config(args.config)
    lora_cfg = LoRAConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["ups", "resblocks"])
    print(
        f"rvclora demo: RVC {cfg.name} generator (hop {cfg.hop_length}), LoRA r={lora_cfg.r} "
        f"alpha={lora_cfg.lora_alpha:g} on {lora_cfg.target_modules}, {args.frames} frames "
        f"({args.frames * cfg.hop_length} samples), batch 1, {torch.get_num_threads()} CPU threads"
    )

    torch.manual_seed(args.seed)  # LoRA A init
    student = build_generator(cfg, seed=args.seed)
    n_params = sum(p.numel() for p in student.parameters())  # RVC's count, weight_g/weight_v separate
    mark_only_lora_as_trainable(inject_lora(student, lora_cfg), lora_cfg.bias)
    teacher = inject_lora(build_generator(cfg, seed=args.seed), lora_cfg)
    randomize_lora_(teacher, relative_norm=0.2, seed=args.seed + 1)
    teacher.eval()
    x, f0 = _demo_inputs(args.frames, args.seed + 2)
    emb_g = 0.1 * torch.randn(1, cfg.gin_channels, generator=_seeded(args.seed + 3))  # one speaker
    g = emb_g[:, :, None]
    noise_seed = args.seed + 4

    def run(model: nn.Module, inp: Tensor = x) -> Tensor:
        return model(inp, f0, g, generator=_seeded(noise_seed))

    with torch.no_grad():
        target = run(teacher)
        loss_before = F.mse_loss(run(student), target).item()
    n_lora = count_lora_parameters(student)
    print(f"parameters: base {n_params:,}, LoRA {n_lora:,} ({100 * n_lora / n_params:.2f} % of the base)")

    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    student.train()
    bar = tqdm(range(args.steps), desc="LoRA fine-tune", unit="step", file=sys.stderr, dynamic_ncols=True)
    for _ in bar:
        loss = F.mse_loss(run(student), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3e}")
    bar.close()
    student.eval()
    with torch.no_grad():
        unmerged_out = run(student)
    loss_after = F.mse_loss(unmerged_out, target).item()
    print(
        f"loss (MSE to the teacher's waveform): before {loss_before:.4e}, after {loss_after:.4e} "
        f"({loss_before / max(loss_after, 1e-30):.1f}x lower)"
    )

    print(_speed_report(cfg, student, x, f0, g, noise_seed, args))
    print(_strategy_report())

    with tempfile.TemporaryDirectory(prefix="rvclora-demo-") as tmp:
        out_dir = args.out_dir or tmp
        adapter_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}-r{lora_cfg.r}.adapter.pth")
        base_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}.pth")
        merged_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}-r{lora_cfg.r}.merged.pth")
        save_lora_checkpoint(student, adapter_path, lora_cfg, epoch=args.steps)
        base = build_generator(cfg, seed=args.seed)
        write_exported_model(base, base_path, cfg, extra_weights={"emb_g.weight": emb_g}, info="0epoch", overwrite=True)
        del base
        merge_adapter(base_path, adapter_path, merged_path, overwrite=True)
        adapter_size, model_size = os.path.getsize(adapter_path), os.path.getsize(base_path)
        print(
            f"files: adapter {_fmt_bytes(adapter_size)} vs model {_fmt_bytes(model_size)} (RVC export, fp16, "
            f"decoder + emb_g) = {100 * adapter_size / model_size:.2f} %"
        )

        with torch.no_grad():
            # Both outputs from the same weights: the speed report's optimizer steps moved them since the
            # loss above was measured.
            unmerged_out = run(student)
            merge_lora_weights(student)
            merged_out = run(student)
            unmerge_lora_weights(student)
            exported = build_generator_from_rvc(load_rvc_file(merged_path)).eval()
            exported_out = run(exported)
        print(
            f"merged vs unmerged output, max |diff|: in memory (fp32) "
            f"{(merged_out - unmerged_out).abs().max().item():.2e}; RVC export (fp16 weights, loaded as RVC "
            f"does) {(exported_out - unmerged_out).abs().max().item():.2e}; output peak "
            f"{unmerged_out.abs().max().item():.3f}"
        )
        if args.out_dir:
            print(f"kept: {base_path}, {adapter_path}, {merged_path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _speed_report(
    cfg: Any, student: nn.Module, x: Tensor, f0: Tensor, g: Tensor, noise_seed: int, args: argparse.Namespace
) -> str:
    """Training steps/s of the frozen base (weight_norm folded), LoRA and full fine-tuning, interleaved."""
    from .models.rvc import build_generator

    frozen = build_generator(cfg, seed=args.seed)
    _fold_weight_norm(frozen)
    frozen.requires_grad_(False)  # after folding: folding makes fresh Parameters that require grad
    full = build_generator(cfg, seed=args.seed)
    full_opt = torch.optim.AdamW(full.parameters(), lr=1e-9)
    lora_params = [p for p in student.parameters() if p.requires_grad]
    lora_opt = torch.optim.AdamW(lora_params, lr=1e-9)
    student.train()

    def frozen_step() -> None:
        inp = x.clone().requires_grad_(True)
        frozen(inp, f0, g, generator=_seeded(noise_seed)).square().mean().backward()

    def trained_step(model: nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model(x, f0, g, generator=_seeded(noise_seed)).square().mean().backward()
            opt.step()

        return step

    steps = {"frozen base": frozen_step, "LoRA": trained_step(student, lora_opt), "full": trained_step(full, full_opt)}
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(args.bench_rounds + 1):  # round 0 warms up (allocator, oneDNN primitives)
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            if round_:
                times[name].append(time.perf_counter() - t0)
    student.eval()
    rate = {k: 1.0 / statistics.median(v) for k, v in times.items()}

    def overhead(name: str) -> float:
        return 100 * (statistics.median(a / b for a, b in zip(times[name], times["frozen base"])) - 1)

    return (
        f"training speed (steps/s, medians of {args.bench_rounds} interleaved rounds after one warm-up; overheads are "
        f"medians of the per-round time ratios to the frozen base):\n"
        f"  frozen base {rate['frozen base']:.2f}   LoRA {rate['LoRA']:.2f} ({overhead('LoRA'):+.0f} % time vs "
        f"frozen)   full fine-tuning {rate['full']:.2f} ({overhead('full'):+.0f} %)\n"
        f"  frozen base = forward + backward w.r.t. the input, weight_norm folded like the LoRA model's, nothing "
        f"trains; LoRA = forward + backward + AdamW step on the LoRA factors ({_backend_name()} backend); full "
        f"fine-tuning = the same over every parameter, weight_norm kept as RVC trains"
    )


def _strategy_report() -> str:
    """The CPU (or GPU) this ran on and what ``auto`` chose for the LoRA layers, with the cost of measuring."""
    from .ops import autoselect

    where = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU {autoselect.describe_cpu()}"
    lines = [f"ran on: {where}"]
    summary = autoselect.strategy_summary()
    if summary:
        lines.append(f"  {summary}")
    note = autoselect.measure_note()
    if note:
        lines.append(f"  {note}")
    return "\n".join(lines)


def _backend_name() -> str:
    from .ops import select_backend

    return select_backend("lora_conv1d", torch.empty(1, 1, 1)).NAME


def _fold_weight_norm(model: nn.Module) -> None:
    """Replace every weight_norm (legacy or parametrization) by its plain weight, in place."""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if hasattr(m, "weight_g") and hasattr(m, "weight_v"):
            torch.nn.utils.remove_weight_norm(m)
        elif parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


#: The voice demo's dataset and run (sized for about two minutes on 2 CPU cores, build included).
VOICE_DEMO = {
    "synthesizer": "v2-40k",
    "clips": 10,
    "seconds": (0.8, 1.0),
    "segment_frames": 8,
    "batch_size": 4,
    "epochs": 8,
    "learning_rate": 1e-3,
    "d_shrink": 16,
}


def run_voice_demo(args: argparse.Namespace) -> int:
    """``rvclora demo``: the trainer end to end on a generated RVC dataset from a random base, merged and checked."""
    from .io import format_bytes
    from .models.discriminator import build_discriminator
    from .models.synthesizer import build_synthesizer, get_synthesizer_config
    from .train.command import summary_lines
    from .train.loop import Trainer, TrainSettings
    from .train.synthetic import make_synthetic_experiment

    started = time.perf_counter()
    d = VOICE_DEMO
    epochs = args.epochs or d["epochs"]
    spec = get_synthesizer_config(d["synthesizer"])
    print(
        f"rvclora demo: trains a voice adapter with `rvclora train`'s trainer on a generated dataset, from a random "
        f"base; {torch.get_num_threads()} CPU threads"
    )
    with tempfile.TemporaryDirectory(prefix="rvclora-demo-") as tmp:
        out_dir = os.path.abspath(args.out_dir or tmp)
        exp = os.path.join(out_dir, "logs", "rvclora-demo-voice")
        if os.path.exists(exp):
            import shutil

            shutil.rmtree(exp)  # an earlier demo's folder in --out-dir: the demo replaces its own files
        ds = make_synthetic_experiment(
            exp,
            spec.generator,
            version=spec.version,
            f0=True,
            clips=d["clips"],
            seconds=d["seconds"],
            segment_frames=d["segment_frames"],
            batch_size=d["batch_size"],
            epochs=epochs,
            learning_rate=d["learning_rate"],
            seed=args.seed,
        )
        print(
            f"dataset: {ds.clips} clips, {ds.seconds:.1f} s of harmonic 'singing' at {ds.sampling_rate} Hz with "
            f"known f0 and stand-in {768 if spec.version == 'v2' else 256}-dim content features, in RVC's folder "
            f"layout (0_gt_wavs/, 3_feature768/, 2a_f0/, 2b-f0nsf/, filelist.txt, config.json)"
        )
        g_path = os.path.join(out_dir, "rvclora-demo-G.pth")
        d_path = os.path.join(out_dir, "rvclora-demo-D.pth")
        synth = build_synthesizer(spec, f0=True, seed=args.seed)
        disc = build_discriminator(spec.version, shrink=d["d_shrink"], seed=args.seed + 1)
        n_g, n_d = sum(p.numel() for p in synth.parameters()), sum(p.numel() for p in disc.parameters())
        torch.save({"model": synth.state_dict()}, g_path)
        torch.save({"model": disc.state_dict()}, d_path)
        del synth, disc
        print(
            f"base: RVC's {spec.name} f0 synthesizer with random weights ({n_g / 1e6:.1f} M parameters; there is no "
            f"pretrained model on this machine) and RVC's {spec.version} discriminator narrowed {d['d_shrink']}x "
            f"({n_d / 1e6:.1f} M parameters) to fit the time"
        )
        adapter = os.path.join(out_dir, "rvclora-demo-voice.safetensors")
        export = os.path.join(out_dir, "rvclora-demo-voice.pth")
        settings = TrainSettings(
            exp,
            g_path,
            d_path,
            output=adapter,
            export=g_path,
            export_output=export,
            overwrite=True,
            seed=args.seed,
            plot=True,
        )
        trainer = Trainer(settings)
        cfg = trainer.experiment.config
        print(
            f"training: RVC's step (D step, then G step: adversarial + feature matching + {cfg.c_mel:g} x mel L1 + "
            f"{cfg.c_kl:g} x KL), AdamW lr {trainer.learning_rate:g} (RVC uses 1e-4 from a pretrained base), "
            f"batch {trainer.batch_size}, {epochs} epochs of {trainer.sampler.steps_per_epoch()} steps, "
            f"{cfg.segment_frames}-frame decoder slices; LoRA r={trainer.lora_config.r} on "
            f"{len(trainer.lora_config.target_modules)} target groups, "
            f"{len(trainer.lora_config.modules_to_save)} saved whole (VOICE_CONFIG)"
        )
        result = trainer.train()
        for line in summary_lines(trainer, result):
            print(line)
        print(_strategy_report())

        adapted = trainer.synth.eval()
        exported = _load_like_rvc(export)
        clip = trainer.dataset[0]
        with torch.no_grad():
            outs = [_infer_clip(m, clip) for m in (adapted, exported)]
        diff = (outs[0] - outs[1]).abs().max().item()
        size_a, size_e = os.path.getsize(adapter), os.path.getsize(export)
        print(
            f"merged export vs adapted model, infer() on a training clip: max |diff| {diff:.2e} (the export stores "
            f"half precision, as RVC's do), output peak {outs[0].abs().max().item():.3f}"
        )
        print(
            f"files: adapter {format_bytes(size_a)} vs the merged RVC export {format_bytes(size_e)} "
            f"({100 * size_a / size_e:.1f} %)"
        )
        print(
            "what this shows: the pipeline runs end to end (RVC's folder -> checked -> trained as RVC trains -> "
            "adapter -> merged RVC model) and the losses fall. What it cannot show: voice quality, which needs "
            "RVC's real pretrained G/D and real recordings (rvclora train EXP_DIR --pretrained-g … --pretrained-d …)"
        )
        if args.out_dir:
            print(
                f"kept in {out_dir}: {os.path.relpath(exp, out_dir)}/ (with rvclora/: losses, plot, state), "
                f"{os.path.basename(adapter)}, {os.path.basename(export)}, {os.path.basename(g_path)}, "
                f"{os.path.basename(d_path)}"
            )
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _load_like_rvc(path: str) -> nn.Module:
    """An exported model loaded as RVC's inference loads it: ``cls(*config)``, drop ``enc_q``, ``strict=False``."""
    from .models.synthesizer import synthesizer_from_rvc_config

    cpt = torch.load(path, map_location="cpu", weights_only=True)
    model = synthesizer_from_rvc_config(cpt["config"], cpt["version"], bool(cpt["f0"]))
    del model.enc_q
    model.load_state_dict({k: v.float() for k, v in cpt["weight"].items()}, strict=False)
    return model.eval()


def _infer_clip(model: nn.Module, clip: Any) -> Tensor:
    n = clip.phone.shape[0]
    out = model.infer(
        clip.phone[None],
        torch.tensor([n]),
        clip.pitch[None],
        clip.pitchf[None],
        torch.tensor([clip.speaker]),
        generator=_seeded(0),
    )
    return out[0]
