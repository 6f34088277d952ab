"""The ``rvclora`` command: ``demo``, ``merge``, ``mix``, ``info``.

Errors print one line on stderr (``rvclora: error: …``) and exit with status 1, whatever
raised them (``RVCLORA_TRACEBACK=1`` shows the traceback of an unexpected one); usage errors
are argparse's (status 2). rvclora's own warnings print one line each (``rvclora: warning:
…``); other libraries' warnings are kept out of the output. A closed output pipe (``… |
head``) ends the command quietly with status 141, as a shell tool killed by SIGPIPE would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .config import LoRAConfig
from .io import format_bytes as _fmt_bytes
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
        help="the main job on an embedded default: train a voice adapter on a generated RVC dataset, merge, check",
        description=(
            "Generate a small dataset in RVC's experiment-folder layout (harmonic voices with known f0, stand-in "
            "content features), take a random RVC v2 40k synthesizer as the pretrained G (and RVC's discriminator, "
            "narrowed, as D), run `rvclora train`'s trainer on it, merge the adapter into an RVC export and check "
            "that the export infers what the adapted model infers. It shows that the pipeline works and the losses "
            "fall, not voice quality (that needs a real pretrained base and real recordings). --teacher runs the "
            "earlier demo instead: LoRA of RVC's generator toward a teacher (the same base plus a hidden low-rank "
            "update), with the loss before/after, training steps/s of LoRA vs the frozen base vs full fine-tuning, "
            "file sizes and the merged-vs-unmerged difference."
        ),
    )
    demo.add_argument("--teacher", action="store_true", help="run the teacher demo (generator only) instead")
    demo.add_argument(
        "--epochs", type=_positive_int, default=None, help="training epochs of the voice demo (default: 8)"
    )
    demo.add_argument(
        "--out-dir",
        default=None,
        help="keep the files written (dataset, base, adapter, merged model) in this directory, "
        "replacing earlier demo files there; default: a temporary directory, removed",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for the base, the data and the LoRA init")
    teacher = demo.add_argument_group("teacher demo (--teacher) options")
    teacher.add_argument(
        "--config", type=_config_name, default=None, help=f"RVC generator config ({configs}); default: 40k"
    )
    teacher.add_argument("--rank", type=_positive_int, default=None, help="LoRA rank r (default: 8; alpha = 2r)")
    teacher.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default: 40)")
    teacher.add_argument(
        "--frames",
        type=_positive_int,
        default=None,
        help="input length in frames, batch 1 (default: 16; output = frames x hop samples)",
    )
    teacher.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate (default: 5e-4)")
    teacher.add_argument(
        "--bench-rounds",
        type=_positive_int,
        default=None,
        help="timed rounds per training mode, after one warm-up (default: 7)",
    )
    demo.set_defaults(func=_cmd_demo)

    merge = sub.add_parser(
        "merge",
        help="merge a LoRA adapter (decoder or whole voice) into an RVC model file, writing a new one",
        description=(
            "Merge ADAPTER (written by save_lora_checkpoint) into BASE (an RVC/Applio export, assets/weights/*.pth; "
            "a training checkpoint G_<step>.pth; or a pretrained generator such as pretrained_v2/f0G40k.pth) and "
            "write OUT, the same kind of file: every field and key of BASE kept in its form and dtype, the tensors "
            "the adapter changes replaced (W + dW in the base's weight_g/weight_v form; trained biases; "
            "modules_to_save), and an export's 'info' noting the adapter. --export writes an RVC export from a "
            "checkpoint. "
            "Refused: an adapter trained on another base model (unless --force), and any merged tensor that is "
            "not finite in the dtype written (NaN/Inf in the adapter or base, or an overflow of half)."
        ),
    )
    merge.add_argument("base", metavar="BASE.pth", help="RVC export, G_*.pth checkpoint or pretrained generator")
    merge.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER[:WEIGHT]",
        help="rvclora adapter (.pth or .safetensors); several, each with an optional weight "
        "(a bare ADAPTER means weight 1), are blended exactly first: dW = sum of w_i dW_i",
    )
    merge.add_argument("-o", "--output", required=True, metavar="OUT.pth", help="where to write the merged model")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT.pth if it exists")
    merge.add_argument(
        "--force", action="store_true", help="merge even if the adapter records a different base model's fingerprint"
    )
    merge.add_argument(
        "--export",
        action="store_true",
        help="BASE is a training checkpoint (G_*.pth) or pretrained generator: write an RVC export "
        "(half, no enc_q, config/sr/f0/version derived from BASE's shapes) instead of a checkpoint",
    )
    merge.set_defaults(func=_cmd_merge)

    mix = sub.add_parser(
        "mix",
        help="blend several adapters of one base into one adapter file (voice blending)",
        description=(
            "Blend adapters trained on the same base model with weights w_i (negative allowed, any sum): the "
            "result's update is exactly dW = sum of w_i dW_i, at rank sum r_i; with --rank R each layer's blended "
            "dW is truncated to rank R by SVD and its relative error is printed. Tensors stored whole (trained "
            "biases, modules_to_save such as emb_g) blend as base + sum of w_i (T_i - base): with weights that do "
            "not sum to 1 this needs --base. Refused: adapters of different base models (unless --force), of "
            "different layer sets, shapes or saved modules. The output is a normal adapter file."
        ),
    )
    mix.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER[:WEIGHT]",
        help="adapter file with an optional weight (default 1), e.g. alto.safetensors:0.6",
    )
    mix.add_argument("--rank", type=_positive_int, default=None, help="truncate every layer to rank R by SVD")
    mix.add_argument("-o", "--output", required=True, metavar="MIX.safetensors", help="where to write the blend")
    mix.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    mix.add_argument("--force", action="store_true", help="blend adapters recorded against different base models")
    mix.add_argument(
        "--layers-from",
        metavar="BASE.pth",
        default=None,
        help="an exported RVC model whose decoder gives each layer's kind and groups, for adapters saved "
        "without layer records (older files)",
    )
    mix.add_argument(
        "--base",
        metavar="BASE.pth",
        default=None,
        help="the RVC model the adapters were trained on (export, G_*.pth or pretrained): whole tensors "
        "(trained biases, modules_to_save) blend against it when the weights do not sum to 1",
    )
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

    from .train import command as train_command

    tr = sub.add_parser(
        "train",
        help="fine-tune a voice adapter from an RVC/Applio experiment folder, the way RVC trains",
        description=(
            "Train a LoRA voice adapter from the experiment folder RVC's or Applio's preprocessing wrote "
            "(filelist.txt, config.json), starting from RVC's pretrained G and D: RVC's GAN step (a D step, then a "
            "G step with adversarial, feature-matching, mel and KL losses), AdamW and lr decay from config.json. "
            "The folder is checked before training starts. Saves the training state and the adapter every "
            "--save-every epochs (atomically; --resume continues); with --export also writes the merged RVC model. "
            "Under torchrun every process takes a share of each step's batch (DDP); only rank 0 writes."
        ),
    )
    train_command.add_arguments(tr)
    tr.set_defaults(func=train_command.cmd)

    from . import selftest

    st = sub.add_parser(
        "selftest",
        help="check every op and backend against the oracle on this machine's devices and time the GPU path",
        description=selftest.__doc__.split("\n\n")[0],
    )
    selftest.build_parser(st)
    st.set_defaults(func=selftest.cmd)
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
        except Exception as e:  # noqa: BLE001 -- a library's own exception type: still one line, never a traceback
            if os.environ.get("RVCLORA_TRACEBACK"):
                raise
            msg = " ".join(str(e).split())[:500] or "(no message)"
            print(f"rvclora: error: {type(e).__name__}: {msg} (RVCLORA_TRACEBACK=1 shows where)", file=sys.stderr)
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


def _cmd_info(args: argparse.Namespace) -> int:
    if args.file is None:
        return _info_backends()
    path = args.file
    if not os.path.isfile(path):
        raise _not_a_file("FILE", path)
    from .checkpoint import read_lora_file
    from .rvc_files import AdapterFileError, load_rvc_file

    try:
        return _info_rvc(load_rvc_file(path))
    except AdapterFileError:
        return _info_adapter(path, read_lora_file(path))


def _not_a_file(what: str, path: str) -> OSError:
    """Why ``path`` cannot be read as a file, in one line: missing, a directory, or another kind of file."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.lexists(path):
            return FileNotFoundError(f"{what} {path!r} is a dangling symbolic link")
        return FileNotFoundError(f"{what} {path!r} does not exist")
    except OSError as e:
        return OSError(f"{what} {path!r} cannot be read: {e.strerror}")
    if stat.S_ISDIR(mode):
        return IsADirectoryError(f"{what} {path!r} is a directory; expected an adapter or RVC model file")
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a file"
    )
    return OSError(f"{what} {path!r} is {kind}, not a regular file; expected an adapter or RVC model file")


def _report_nonfinite(tensors: dict[str, Tensor]) -> int:
    """Flag every tensor holding NaN or Inf (first few by name); returns the exit status."""
    from .io import first_nonfinite

    bad = [hit for k, t in tensors.items() if (hit := first_nonfinite([(k, t)])) is not None]
    if not bad:
        print("  all tensors finite")
        return 0
    print(
        f"  NOT FINITE: {len(bad)} tensors hold NaN or Inf: "
        + "; ".join(f"{k}: {why}" for k, why in bad[:5])
        + (" ..." if len(bad) > 5 else "")
    )
    print(f"rvclora: error: {len(bad)} tensors are not finite (first: {bad[0][0]})", file=sys.stderr)
    return 1


def _info_backends() -> int:
    from .ops import backend_status, get_backend

    print(f"rvclora backends (requested: {get_backend()}; set RVCLORA_BACKEND or rvclora.ops.set_backend)")
    for row in backend_status():
        reason = row["unavailable"]
        print(f"  {row['backend']:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        if reason is None and row["note"]:  # what it runs here, e.g. the cuda backend built without its CUDA part
            print(f"  {'':<10} note: {row['note']}")
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__}, CUDA device: {torch.cuda.get_device_name(0) if cuda else 'none'}, "
        f"CPU threads: {torch.get_num_threads()}"
    )
    _info_autoselect()
    return 0


def _info_autoselect() -> None:
    from .ops import autoselect

    rows = autoselect.decisions()
    selector = autoselect.get_selector()
    print(
        f"auto (CUDA and CPU): {autoselect.mode()} (RVCLORA_AUTOSELECT=measure|fixed); "
        f"decisions cached in {selector.path or 'memory only'}: {len(rows)}"
    )
    if selector.cache_problem:
        print(f"  cache file: {selector.cache_problem}; ignored, rewritten at the next measurement")
    forced = os.environ.get("RVCLORA_CPU_CONV1D", "").strip()
    print(
        "cpu backend Conv1d plan (library: oneDNN + thin LoRA passes; direct: one microkernel for y and u): "
        + (
            f"{forced} (RVCLORA_CPU_CONV1D)"
            if forced
            else "library (fixed rule)"
            if autoselect.mode() == autoselect.FIXED
            else "timed per layer and direction on its first call in each process"
        )
    )
    for env, key, hit in rows:
        secs = ", ".join(f"{n} {t * 1e6:.1f} us" for n, t in sorted(hit.get("seconds", {}).items()) if t == t)
        failed = "; ".join(f"{n} disabled: {why}" for n, why in sorted(hit.get("failed", {}).items()))
        print(
            f"  [{env}] {key} -> {hit.get('choice')}"
            + (f" ({secs})" if secs else "")
            + (f" [{failed}]" if failed else "")
        )


def _info_adapter(path: str, adapter: dict[str, Any]) -> int:
    cfg: LoRAConfig = adapter["config"]
    weights: dict[str, Tensor] = adapter["weights"]
    print(f"{path}: rvclora adapter (format {adapter['format_version']}, {_fmt_bytes(os.path.getsize(path))})")
    print(
        f"  config: r={cfg.r} lora_alpha={cfg.lora_alpha:g} (scaling {cfg.scaling:g}) "
        f"dropout={cfg.lora_dropout:g} bias={cfg.bias} targets={cfg.target_modules}"
    )
    if cfg.modules_to_save:
        print(f"  modules_to_save: {cfg.modules_to_save}")
    fp = adapter.get("base_fingerprint")
    if fp is None:
        print("  base fingerprint: none (written by an older rvclora: not checked)")
    else:
        from .fingerprint import fingerprint_scope

        scope = "the whole synthesizer but enc_q" if fingerprint_scope(fp) == "synth" else "the decoder"
        print(f"  base fingerprint: {fp} (of {scope})")
    meta = dict(adapter.get("metadata") or {})
    blend = meta.pop("blend", None)
    meta.pop("layers", None)
    meta.pop("modules_to_save", None)
    if isinstance(blend, dict):
        kind = "exact" if blend.get("rank") is None else f"rank {blend['rank']} by SVD"
        print(f"  blend ({kind}) of:")
        for src in blend.get("sources", []):
            print(
                f"    {src.get('weight', float('nan')):+g} x {src.get('name')} (r={src.get('r')}, "
                f"lora_alpha={src.get('lora_alpha')})"
            )
        errors = blend.get("errors") or {}
        if errors:
            print(
                f"  truncation error per layer: max {max(errors.values()):.3g}, "
                f"mean {sum(errors.values()) / len(errors):.3g}"
            )
    if meta:
        print(f"  metadata: {json.dumps(meta)[:300]}")
    if adapter.get("optimizer_error"):
        print(f"  optimizer state: damaged ({adapter['optimizer_error']}); the weights are unaffected")
    if adapter.get("epoch") is not None:
        print(f"  epoch: {adapter['epoch']}")
    from .checkpoint import _saved_owner

    layers: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    saved: dict[str, Tensor] = {}
    for key, t in weights.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            layers.setdefault(owner, {})[leaf] = t
        elif cfg.modules_to_save and _saved_owner(key, cfg.modules_to_save) is not None:
            saved[key] = t
        else:
            other[key] = t
    width = max((len(n) for n in layers), default=5)
    print(f"  {'layer':<{width}}  {'rank':>4}  {'lora_A':<14} {'lora_B':<14} {'params':>8}")
    total = 0
    for name, f in layers.items():
        a, b = f.get("lora_A"), f.get("lora_B")
        n = sum(t.numel() for t in f.values())
        total += n
        shape = lambda t: "x".join(map(str, t.shape)) if t is not None else "-"
        print(f"  {name:<{width}}  {a.shape[0] if a is not None else '-':>4}  {shape(a):<14} {shape(b):<14} {n:>8,}")
    print(f"  LoRA layers: {len(layers)}   LoRA parameters: {total:,}")
    if other:
        print(f"  trained biases: {len(other)} tensors, {sum(t.numel() for t in other.values()):,} parameters")
    if saved:
        print(
            f"  saved whole (modules_to_save): {len(saved)} tensors, {sum(t.numel() for t in saved.values()):,} "
            f"parameters: {', '.join(list(saved)[:6])}{' ...' if len(saved) > 6 else ''}"
        )
    parts = sorted({n.split(".")[0] for n in list(layers) + list(saved)})
    if any(p in ("enc_p", "enc_q", "flow", "emb_g") for p in parts):
        print(
            f"  whole-voice adapter: changes {', '.join(parts)} (merge into an export, G_*.pth or pretrained "
            "file of its base)"
        )
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
        print(
            f"  decoder config: {cfg.name} (upsample_rates {list(cfg.upsample_rates)}, kernels "
            f"{list(cfg.upsample_kernel_sizes)}, hop {cfg.hop_length}, sampling rate {cfg.sampling_rate})"
        )
        extra = sorted(set(d) - {"weight", "config", "info", "sr", "f0", "version"})
        if extra:
            print(f"  other fields: {extra}")
    else:
        d = model_file.data
        if set(d) == {"model"}:
            print(f"{model_file.path}: RVC pretrained generator, {{'model': state_dict}} ({size})")
        else:
            print(f"{model_file.path}: RVC training checkpoint ({size})")
            print(
                f"  iteration={d.get('iteration')} learning_rate={d.get('learning_rate')} "
                f"optimizer state: {'yes' if d.get('optimizer') else 'no'}"
            )
    print(
        f"  decoder: {'GeneratorNSF (f0)' if model_file.f0 else 'Generator (no f0)'}, "
        f"{model_file.weight_norm} weight_norm, {len(dec)} tensors, {sum(t.numel() for t in dec.values()):,} "
        "parameters"
    )
    print(f"  all weights: {len(sd)} tensors, {sum(t.numel() for t in sd.values()):,} parameters, dtype {dtypes}")
    parts = sorted({k.split(".")[0] for k in sd})
    print(f"  parts: {', '.join(parts)}")
    if model_file.kind != "exported":
        from .rvc_files import RVCFileError, synthesizer_spec_of

        try:
            name, f0, wn = synthesizer_spec_of(model_file)
            print(f"  synthesizer: {name}{'' if f0 else ' (no f0)'}, {wn} weight_norm")
        except RVCFileError as e:
            print(f"  synthesizer: not a shipped RVC config ({str(e).split(': ', 1)[-1]})")
    lora_keys = [k for k in sd if k.endswith((".lora_A", ".lora_B"))]
    if lora_keys:
        print(f"  LoRA factors present: {len(lora_keys)} tensors (an unmerged training state)")
    else:
        from .fingerprint import base_fingerprint, fingerprint_scopes

        print(f"  base fingerprint: {base_fingerprint(sd)} (decoder adapters)")
        if "synth" in fingerprint_scopes(sd):
            print(f"  base fingerprint: {base_fingerprint(sd, scope='synth')} (whole-voice adapters)")
    return _report_nonfinite(dict(sd))


# --------------------------------------------------------------------------- merge


def _weighted_adapters(items: Sequence[str]) -> list[tuple[str, float]]:
    from .blend import parse_weighted

    return [parse_weighted(item) for item in items]


def _cmd_merge(args: argparse.Namespace) -> int:
    from .rvc_files import merge_adapter

    sources = _weighted_adapters(args.adapters)
    adapter = sources[0][0] if len(sources) == 1 and sources[0][1] == 1.0 else sources
    result = merge_adapter(
        args.base, adapter, args.output, overwrite=args.overwrite, force=args.force, export=args.export
    )
    kind = "RVC export" if result.kind == "exported" else "checkpoint"
    dropped = (
        f"; {result.dropped_layers} enc_q layers left out (an export has no enc_q)" if result.dropped_layers else ""
    )
    print(
        f"wrote {result.path} ({kind}): {result.merged_layers} LoRA layers merged, {result.changed_keys} tensors "
        f"changed{dropped}; info: {result.info!r}"
    )
    return 0


def _cmd_mix(args: argparse.Namespace) -> int:
    from .blend import blend_adapters
    from .checkpoint import write_lora_file
    from .io import check_output_path

    sources = _weighted_adapters(args.adapters)
    out = check_output_path(
        args.output, what="adapter", overwrite=args.overwrite, inputs=tuple(("adapter", p) for p, _ in sources)
    )
    layers = None
    if args.layers_from is not None:
        from .rvc_files import decoder_layer_records, load_rvc_file

        layers = decoder_layer_records(load_rvc_file(args.layers_from))
    base = None
    if args.base is not None:
        from .rvc_files import blend_base_tensors, load_rvc_file

        base = blend_base_tensors(load_rvc_file(args.base))
    mix = blend_adapters(
        [p for p, _ in sources], [w for _, w in sources], rank=args.rank, force=args.force, layers=layers, base=base
    )
    write_lora_file(
        out,
        mix["weights"],
        mix["config"],
        base_fingerprint=mix["base_fingerprint"],
        metadata=mix["metadata"],
        overwrite=args.overwrite,
    )
    kind = "exact" if args.rank is None else f"rank {args.rank} by SVD"
    print(
        f"wrote {out}: blend of {len(sources)} adapters ({kind}), r={mix['config'].r}, "
        f"{len(mix['metadata']['layers'])} layers"
    )
    cast = mix["metadata"]["blend"]["cast_errors"]
    if cast:
        worst = max(cast, key=cast.get)
        print(
            f"  computed in float64; cast back to the adapters' dtype: relative change max {cast[worst]:.3g} ({worst})"
        )
    errors = mix["metadata"]["blend"]["errors"]
    if errors:
        worst = max(errors, key=errors.get)
        print(
            f"  relative error per layer (discarded singular energy): max {errors[worst]:.3g} ({worst}), "
            f"mean {sum(errors.values()) / len(errors):.3g}"
        )
    whole = mix["metadata"]["blend"].get("whole_tensors")
    if whole:
        n = sum(1 for k in mix["weights"] if not k.endswith((".lora_A", ".lora_B")))
        print(f"  {n} tensors stored whole (biases, modules_to_save) blended as {whole}")
    return 0


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
