"""The ``rvclora`` command: ``demo``, ``merge``, ``mix``, ``info``.

Errors print one line on stderr (``rvclora: error: …``) and exit with status 1; usage errors
are argparse's (status 2). rvclora's own warnings print one line each (``rvclora: warning:
…``); other libraries' warnings are kept out of the output. A closed output pipe (``… |
head``) ends the command quietly with status 141, as a shell tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoRAConfig
from .models.rvc import CONFIG_ALIASES, GENERATOR_CONFIGS, get_generator_config

__all__ = ["build_parser", "main"]

_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _config_name(text: str) -> str:
    try:
        return get_generator_config(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rvclora`` command."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rvclora",
        description="Exact, fused LoRA for RVC voice models: fine-tune, merge, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"rvclora {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    configs = ", ".join(list(GENERATOR_CONFIGS) + list(CONFIG_ALIASES))
    demo = sub.add_parser(
        "demo",
        help="fine-tune an RVC generator with LoRA toward a teacher and report speed, sizes, merge error",
        description=(
            "Build an RVC generator with a deterministic random base, inject LoRA on ups+resblocks and fine-tune "
            "it toward a teacher (the same base plus a hidden low-rank update). Prints the loss before/after, "
            "training steps/s of LoRA vs the frozen base model vs full fine-tuning, the adapter file size vs "
            "the model file size, and the merged-vs-unmerged output difference."
        ),
    )
    demo.add_argument("--config", type=_config_name, default="40k", help=f"RVC generator config ({configs}); "
                      "default: 40k")
    demo.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default: 8; alpha = 2r)")
    demo.add_argument("--steps", type=_positive_int, default=40, help="fine-tuning steps (default: 40)")
    demo.add_argument("--frames", type=_positive_int, default=16,
                      help="input length in frames, batch 1 (default: 16; output = frames x hop samples)")
    demo.add_argument("--lr", type=_positive_float, default=5e-4, help="AdamW learning rate (default: 5e-4)")
    demo.add_argument("--bench-rounds", type=_positive_int, default=3,
                      help="timed rounds per training mode, after one warm-up (default: 3)")
    demo.add_argument("--out-dir", default=None,
                      help="keep the files written (base model, adapter, merged model) in this directory, "
                           "replacing earlier demo files there; default: a temporary directory, removed")
    demo.add_argument("--seed", type=int, default=0, help="seed for the base, teacher, inputs and LoRA init")
    demo.set_defaults(func=_cmd_demo)

    merge = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into an exported RVC model, writing a new RVC model file",
        description=(
            "Merge ADAPTER (written by save_lora_checkpoint) into BASE (an exported RVC model, "
            "assets/weights/*.pth) and write OUT: an RVC model with every field and key of BASE, the decoder "
            "weights replaced by W + dW in RVC's weight_g/weight_v form and dtype, and 'info' noting the adapter. "
            "Refused: an adapter trained on another base model (unless --force), and any merged tensor that is "
            "not finite in the dtype written (NaN/Inf in the adapter or base, or an overflow of half)."
        ),
    )
    merge.add_argument("base", metavar="BASE.pth", help="exported RVC model")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]",
                       help="rvclora adapter (.pth or .safetensors); several, each with an optional weight "
                            "(a bare ADAPTER means weight 1), are blended exactly first: dW = sum of w_i dW_i")
    merge.add_argument("-o", "--output", required=True, metavar="OUT.pth", help="where to write the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT.pth if it exists")
    merge.add_argument("--force", action="store_true",
                       help="merge even if the adapter records a different base model's fingerprint")
    merge.set_defaults(func=_cmd_merge)

    mix = sub.add_parser(
        "mix",
        help="blend several adapters of one base into one adapter file (voice blending)",
        description=(
            "Blend adapters trained on the same base model with weights w_i (negative allowed, any sum): the "
            "result's update is exactly dW = sum of w_i dW_i, at rank sum r_i; with --rank R each layer's blended "
            "dW is truncated to rank R by SVD and its relative error is printed. Refused: adapters of different "
            "base models (unless --force), of different layer sets or shapes, or trained biases whose weights "
            "do not sum to 1. The output is a normal adapter file."
        ),
    )
    mix.add_argument("adapters", nargs="+", metavar="ADAPTER[:WEIGHT]",
                     help="adapter file with an optional weight (default 1), e.g. alto.safetensors:0.6")
    mix.add_argument("--rank", type=_positive_int, default=None, help="truncate every layer to rank R by SVD")
    mix.add_argument("-o", "--output", required=True, metavar="MIX.safetensors", help="where to write the blend")
    mix.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    mix.add_argument("--force", action="store_true", help="blend adapters recorded against different base models")
    mix.set_defaults(func=_cmd_mix)

    info = sub.add_parser(
        "info",
        help="describe an adapter or RVC model file; without FILE, list the compute backends",
        description=(
            "With FILE: describe an rvclora adapter (config, base fingerprint, layers, ranks, parameter counts) "
            "or an RVC model file (kind, fields, decoder config, parameter counts, base fingerprint). Tensors "
            "holding NaN or Inf are flagged and make the exit status 1. Without FILE: list the backends and why "
            "any is unavailable here."
        ),
    )
    info.add_argument("file", nargs="?", metavar="FILE", help="adapter or RVC model file")
    info.set_defaults(func=_cmd_info)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .io import RVCLoRAWarning

    if issubclass(category, RVCLoRAWarning):
        print(f"rvclora: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rvclora`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        try:
            status = int(args.func(args) or 0)
            sys.stdout.flush()
            return status
        except BrokenPipeError:
            return _closed_pipe()
        except KeyboardInterrupt:
            print("rvclora: interrupted", file=sys.stderr)
            return 130
        except _ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            msg = " ".join(str(msg).split()) or type(e).__name__
            print(f"rvclora: error: {msg}", file=sys.stderr)
            return 1


def _closed_pipe() -> int:
    """The reader went away: say nothing, and keep Python from complaining at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


# --------------------------------------------------------------------------- info


def _fmt_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def _cmd_info(args: argparse.Namespace) -> int:
    if args.file is None:
        return _info_backends()
    path = args.file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FILE {path!r} does not exist")
    from .checkpoint import read_lora_file
    from .rvc_files import AdapterFileError, load_rvc_file

    try:
        return _info_rvc(load_rvc_file(path))
    except AdapterFileError:
        return _info_adapter(path, read_lora_file(path))


def _report_nonfinite(tensors: dict[str, Tensor]) -> int:
    """Flag every tensor holding NaN or Inf (first few by name); returns the exit status."""
    from .io import first_nonfinite

    bad = [hit for k, t in tensors.items() if (hit := first_nonfinite([(k, t)])) is not None]
    if not bad:
        print("  all tensors finite")
        return 0
    print(f"  NOT FINITE: {len(bad)} tensors hold NaN or Inf: "
          + "; ".join(f"{k}: {why}" for k, why in bad[:5]) + (" ..." if len(bad) > 5 else ""))
    print(f"rvclora: error: {len(bad)} tensors are not finite (first: {bad[0][0]})", file=sys.stderr)
    return 1


def _info_backends() -> int:
    from .ops import backend_status, get_backend

    print(f"rvclora backends (requested: {get_backend()}; set RVCLORA_BACKEND or rvclora.ops.set_backend)")
    for row in backend_status():
        reason = row["unavailable"]
        print(f"  {row['backend']:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    from .ops import autotune

    print(f"CPU strategy tuner: {'on' if autotune.enabled() else 'off'} "
          "(opt-in: RVCLORA_CPU_AUTOTUNE=1; off under torch.use_deterministic_algorithms(True))")
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}, "
          f"CPU threads: {torch.get_num_threads()}")
    return 0


def _info_adapter(path: str, adapter: dict[str, Any]) -> int:
    cfg: LoRAConfig = adapter["config"]
    weights: dict[str, Tensor] = adapter["weights"]
    print(f"{path}: rvclora adapter (format {adapter['format_version']}, {_fmt_bytes(os.path.getsize(path))})")
    print(f"  config: r={cfg.r} lora_alpha={cfg.lora_alpha:g} (scaling {cfg.scaling:g}) "
          f"dropout={cfg.lora_dropout:g} bias={cfg.bias} targets={cfg.target_modules}")
    fp = adapter.get("base_fingerprint")
    print(f"  base fingerprint: {fp if fp is not None else 'none (written by an older rvclora: not checked)'}")
    meta = dict(adapter.get("metadata") or {})
    blend = meta.pop("blend", None)
    meta.pop("layers", None)
    if isinstance(blend, dict):
        kind = "exact" if blend.get("rank") is None else f"rank {blend['rank']} by SVD"
        print(f"  blend ({kind}) of:")
        for src in blend.get("sources", []):
            print(f"    {src.get('weight', float('nan')):+g} x {src.get('name')} (r={src.get('r')}, "
                  f"lora_alpha={src.get('lora_alpha')})")
        errors = blend.get("errors") or {}
        if errors:
            print(f"  truncation error per layer: max {max(errors.values()):.3g}, "
                  f"mean {sum(errors.values()) / len(errors):.3g}")
    if meta:
        print(f"  metadata: {json.dumps(meta)[:300]}")
    if adapter.get("optimizer_error"):
        print(f"  optimizer state: damaged ({adapter['optimizer_error']}); the weights are unaffected")
    if adapter.get("epoch") is not None:
        print(f"  epoch: {adapter['epoch']}")
    layers: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    for key, t in weights.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            layers.setdefault(owner, {})[leaf] = t
        else:
            other[key] = t
    width = max((len(n) for n in layers), default=5)
    print(f"  {'layer':<{width}}  {'rank':>4}  {'lora_A':<14} {'lora_B':<14} {'params':>8}")
    total = 0
    for name, f in layers.items():
        a, b = f.get("lora_A"), f.get("lora_B")
        n = sum(t.numel() for t in f.values())
        total += n
        shape = (lambda t: "x".join(map(str, t.shape)) if t is not None else "-")
        print(f"  {name:<{width}}  {a.shape[0] if a is not None else '-':>4}  {shape(a):<14} {shape(b):<14} {n:>8,}")
    print(f"  LoRA layers: {len(layers)}   LoRA parameters: {total:,}")
    if other:
        print(f"  trained biases: {len(other)} tensors, {sum(t.numel() for t in other.values()):,} parameters")
    return _report_nonfinite(weights)


def _info_rvc(model_file: Any) -> int:
    from .rvc_files import generator_config_from_rvc

    sd = model_file.state_dict
    dec = model_file.decoder_state_dict()
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
    size = _fmt_bytes(os.path.getsize(model_file.path))
    if model_file.kind == "exported":
        d = model_file.data
        print(f"{model_file.path}: exported RVC model ({size})")
        print(f"  version={d['version']} sr={d['sr']} f0={d['f0']} info={d['info']!r}")
        cfg = generator_config_from_rvc(d["config"], str(d["version"]))
        print(f"  decoder config: {cfg.name} (upsample_rates {list(cfg.upsample_rates)}, kernels "
              f"{list(cfg.upsample_kernel_sizes)}, hop {cfg.hop_length}, sampling rate {cfg.sampling_rate})")
        extra = sorted(set(d) - {"weight", "config", "info", "sr", "f0", "version"})
        if extra:
            print(f"  other fields: {extra}")
    else:
        d = model_file.data
        print(f"{model_file.path}: RVC training checkpoint ({size})")
        print(f"  iteration={d.get('iteration')} learning_rate={d.get('learning_rate')} "
              f"optimizer state: {'yes' if d.get('optimizer') else 'no'}")
    print(f"  decoder: {'GeneratorNSF (f0)' if model_file.f0 else 'Generator (no f0)'}, "
          f"{model_file.weight_norm} weight_norm, {len(dec)} tensors, {sum(t.numel() for t in dec.values()):,} "
          "parameters")
    print(f"  all weights: {len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} parameters, dtype {dtypes}")
    lora_keys = [k for k in sd if k.endswith((".lora_A", ".lora_B"))]
    if lora_keys:
        print(f"  LoRA factors present: {len(lora_keys)} tensors (an unmerged training state)")
    else:
        from .fingerprint import base_fingerprint

        print(f"  base fingerprint: {base_fingerprint(sd)}")
    return _report_nonfinite(dict(sd))


# --------------------------------------------------------------------------- merge


def _weighted_adapters(items: Sequence[str]) -> list[tuple[str, float]]:
    from .blend import parse_weighted

    return [parse_weighted(item) for item in items]


def _cmd_merge(args: argparse.Namespace) -> int:
    from .rvc_files import merge_adapter

    sources = _weighted_adapters(args.adapters)
    adapter = sources[0][0] if len(sources) == 1 and sources[0][1] == 1.0 else sources
    result = merge_adapter(args.base, adapter, args.output, overwrite=args.overwrite, force=args.force)
    print(f"wrote {result.path}: {result.merged_layers} LoRA layers merged into {result.decoder_keys} decoder "
          f"tensors; info: {result.info!r}")
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from .blend import blend_adapters
    from .checkpoint import write_lora_file
    from .io import check_output_path

    sources = _weighted_adapters(args.adapters)
    out = check_output_path(args.output, what="adapter", overwrite=args.overwrite,
                            inputs=tuple(("adapter", p) for p, _ in sources))
    mix = blend_adapters([p for p, _ in sources], [w for _, w in sources], rank=args.rank, force=args.force)
    write_lora_file(out, mix["weights"], mix["config"], base_fingerprint=mix["base_fingerprint"],
                    metadata=mix["metadata"], overwrite=args.overwrite)
    kind = "exact" if args.rank is None else f"rank {args.rank} by SVD"
    print(f"wrote {out}: blend of {len(sources)} adapters ({kind}), r={mix['config'].r}, "
          f"{len(mix['metadata']['layers'])} layers")
    errors = mix["metadata"]["blend"]["errors"]
    if errors:
        worst = max(errors, key=errors.get)
        print(f"  relative error per layer (discarded singular energy): max {errors[worst]:.3g} ({worst}), "
              f"mean {sum(errors.values()) / len(errors):.3g}")
    return 0


# --------------------------------------------------------------------------- demo


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _demo_inputs(frames: int, seed: int) -> tuple[Tensor, Tensor]:
    """A latent ``(1, 192, frames)`` and a pitch glide 120→240 Hz with one unvoiced frame."""
    x = torch.randn(1, 192, frames, generator=_seeded(seed))
    f0 = torch.linspace(120.0, 240.0, frames)[None]
    f0[:, frames // 2] = 0.0
    return x, f0


def _median_rate(times: list[float]) -> float:
    return 1.0 / statistics.median(times)


def _cmd_demo(args: argparse.Namespace) -> int:
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
    if args.out_dir is not None and not os.path.isdir(args.out_dir):
        raise FileNotFoundError(f"--out-dir {args.out_dir!r} is not an existing directory")
    print(f"rvclora demo: RVC {cfg.name} generator (hop {cfg.hop_length}), LoRA r={lora_cfg.r} "
          f"alpha={lora_cfg.lora_alpha:g} on {lora_cfg.target_modules}, {args.frames} frames "
          f"({args.frames * cfg.hop_length} samples), batch 1, {torch.get_num_threads()} CPU threads")

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
    print(f"loss (MSE to the teacher's waveform): before {loss_before:.4e}, after {loss_after:.4e} "
          f"({loss_before / max(loss_after, 1e-30):.1f}x lower)")

    print(_speed_report(cfg, student, x, f0, g, noise_seed, args))

    with tempfile.TemporaryDirectory(prefix="rvclora-demo-") as tmp:
        out_dir = args.out_dir or tmp
        adapter_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}-r{lora_cfg.r}.adapter.pth")
        base_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}.pth")
        merged_path = os.path.join(out_dir, f"rvclora-demo-{cfg.name}-r{lora_cfg.r}.merged.pth")
        save_lora_checkpoint(student, adapter_path, lora_cfg, epoch=args.steps)
        base = build_generator(cfg, seed=args.seed)
        write_exported_model(base, base_path, cfg, extra_weights={"emb_g.weight": emb_g}, info="0epoch",
                             overwrite=True)
        del base
        merge_adapter(base_path, adapter_path, merged_path, overwrite=True)
        adapter_size, model_size = os.path.getsize(adapter_path), os.path.getsize(base_path)
        print(f"files: adapter {_fmt_bytes(adapter_size)} vs model {_fmt_bytes(model_size)} (RVC export, fp16, "
              f"decoder + emb_g) = {100 * adapter_size / model_size:.2f} %")

        with torch.no_grad():
            merge_lora_weights(student)
            merged_out = run(student)
            unmerge_lora_weights(student)
            exported = build_generator_from_rvc(load_rvc_file(merged_path)).eval()
            exported_out = run(exported)
        print(f"merged vs unmerged output, max |diff|: in memory (fp32) "
              f"{(merged_out - unmerged_out).abs().max().item():.2e}; RVC export (fp16 weights, loaded as RVC "
              f"does) {(exported_out - unmerged_out).abs().max().item():.2e}; output peak "
              f"{unmerged_out.abs().max().item():.3f}")
        if args.out_dir:
            print(f"kept: {base_path}, {adapter_path}, {merged_path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _speed_report(
    cfg: Any, student: nn.Module, x: Tensor, f0: Tensor, g: Tensor, noise_seed: int, args: argparse.Namespace
) -> str:
    """Training steps/s, interleaved (base, LoRA, full per round), medians after one warm-up round."""
    from .models.rvc import build_generator

    frozen = build_generator(cfg, seed=args.seed).requires_grad_(False)
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
    times: dict[str, list[float]] = {k: [] for k in steps}
    for round_ in range(args.bench_rounds + 1):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
    student.eval()
    rate = {k: _median_rate(v) for k, v in times.items()}
    base = rate["frozen base"]
    return (
        f"training speed (steps/s, median of {args.bench_rounds} interleaved rounds; frozen base = forward + "
        f"backward w.r.t. the input only; LoRA/full include the AdamW step):\n"
        f"  frozen base {base:.2f}   LoRA {rate['LoRA']:.2f} ({100 * (base / rate['LoRA'] - 1):+.0f} % time vs "
        f"frozen)   full fine-tuning {rate['full']:.2f} ({100 * (base / rate['full'] - 1):+.0f} %)"
    )
