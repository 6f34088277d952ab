"""``rvclora train``: the command line over :class:`rvclora.train.loop.Trainer`."""

from __future__ import annotations

import argparse
import os

from ..cli import _positive_float, _positive_int

__all__ = ["add_arguments", "cmd", "summary_lines"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    from .loop import PRECISIONS

    p.add_argument(
        "exp_dir",
        metavar="EXP_DIR",
        help="the experiment folder RVC's or Applio's preprocessing wrote (logs/<name>: filelist.txt, "
        "config.json and the files they list)",
    )
    p.add_argument(
        "--pretrained-g",
        required=True,
        metavar="G.pth",
        help="RVC's pretrained synthesizer checkpoint, e.g. pretrained_v2/f0G40k.pth (its version and f0 "
        "decide the model)",
    )
    p.add_argument("--pretrained-d", required=True, metavar="D.pth", help="the matching discriminator, e.g. f0D40k.pth")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="VOICE.safetensors",
        help="the adapter to write (.safetensors or .pth); rewritten at every save",
    )
    p.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="BASE_EXPORT.pth",
        help="also write the merged RVC model: merged into BASE_EXPORT.pth (an exported model of the "
        "same base), or, with no value, exported from --pretrained-g",
    )
    p.add_argument(
        "--export-output",
        default=None,
        metavar="OUT.pth",
        help="where the merged model goes (default: the adapter's name with .pth)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        metavar="DIR",
        help="training state, loss log (losses.jsonl) and plot (losses.png); default: EXP_DIR/rvclora",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="clips per step over all processes (default: config.json's, else 4)",
    )
    p.add_argument("--epochs", type=_positive_int, default=None, help="total epochs (default: config.json's)")
    p.add_argument(
        "--save-every",
        type=_positive_int,
        default=1,
        metavar="N",
        help="save the training state and the adapter every N epochs (default: 1), and at the end",
    )
    p.add_argument("--seed", type=int, default=None, help="default: config.json's train.seed")
    p.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate (default: config.json's)")
    p.add_argument(
        "--rank", type=_positive_int, default=None, help="LoRA rank (default: VOICE_CONFIG's 8; alpha = 2 x rank)"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (default: cpu; under torchrun, cuda uses the process's local rank)",
    )
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: fp16 with a GradScaler on CUDA when config.json's fp16_run says so, else fp32; fp16/bf16 need CUDA",
    )
    p.add_argument(
        "--log-every",
        type=_positive_int,
        default=1,
        metavar="N",
        help="append the losses of every Nth step to RUN_DIR/losses.jsonl (default: 1)",
    )
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue from the training state in the run folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing adapter/merged model and start over an existing run folder",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="no losses.png")


def _settings(args: argparse.Namespace):
    from ..config import VOICE_CONFIG, LoRAConfig
    from .loop import TrainSettings

    lora = None
    if args.rank is not None:
        d = VOICE_CONFIG.to_dict()
        d.update(r=args.rank, lora_alpha=2 * args.rank)
        lora = LoRAConfig.from_dict(d)
    export = export_output = None
    if args.export is not None:
        export = args.export or args.pretrained_g
        export_output = args.export_output
    return TrainSettings(
        exp_dir=args.exp_dir,
        pretrained_g=args.pretrained_g,
        pretrained_d=args.pretrained_d,
        output=args.output,
        export=export,
        export_output=export_output,
        run_dir=args.run_dir,
        lora=lora,
        batch_size=args.batch_size,
        epochs=args.epochs,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        precision=args.precision,
        learning_rate=args.lr,
        log_every=args.log_every,
        resume=args.resume,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.no_progress,
        plot=not args.no_plot,
    )


def summary_lines(trainer, result) -> list[str]:
    """What a run did, for people."""
    from ..io import format_bytes

    lines = []
    first, last = result.first_epoch, result.last
    if first and last:
        keys = (
            ("loss_mel", "mel"),
            ("loss_kl", "kl"),
            ("loss_fm", "fm"),
            ("loss_gen", "gen"),
            ("loss_disc", "disc"),
            ("loss_gen_all", "G total"),
        )
        lines.append(
            "losses, mean of the first epoch -> the last: "
            + ", ".join(f"{name} {first[k]:.3g} -> {last[k]:.3g}" for k, name in keys)
        )
    rate = result.steps / result.seconds if result.seconds > 0 else float("nan")
    lines.append(
        f"{result.steps} steps in {result.seconds:.1f} s ({rate:.2f} steps/s), {trainer.world} "
        f"process{'es' if trainer.world > 1 else ''}, {trainer.precision} on {trainer.device}; trained "
        f"{result.trainable:,} of {result.total:,} parameters"
    )
    if result.adapter:
        lines.append(f"adapter: {result.adapter} ({format_bytes(os.path.getsize(result.adapter))})")
    if result.export:
        lines.append(f"merged RVC model: {result.export} ({format_bytes(os.path.getsize(result.export))})")
    lines.append(
        f"run folder: {result.run_dir} (losses.jsonl"
        + (", losses.png" if os.path.isfile(os.path.join(result.run_dir, "losses.png")) else "")
        + ", train_state.pt for --resume)"
    )
    lines.extend(f"note: {n}" for n in result.notes)
    return lines


def cmd(args: argparse.Namespace) -> int:
    from .loop import Trainer

    trainer = Trainer(_settings(args))
    exp = trainer.experiment
    trainer.log(
        f"rvclora train: {exp.path}: {len(exp.clips)} clips, RVC {trainer.synth_name} "
        f"{'f0' if trainer.f0 else 'no-f0'}, segment {exp.config.segment_size} samples, batch "
        f"{trainer.batch_size}, epochs {trainer.epoch_done + 1}..{trainer.epochs}, lr {trainer.learning_rate:g}"
        + (f", resuming at step {trainer.resumed_from}" if trainer.resumed_from is not None else "")
    )
    result = trainer.train()
    if trainer.rank == 0:
        for line in summary_lines(trainer, result):
            print(line)
    return 0
