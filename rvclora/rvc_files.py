"""RVC's model files: read them safely, build their decoder, merge an adapter into an export.

Two kinds of file (``docs/rvc.md``):

* **training checkpoints** ``G_<step>.pth``: ``{"model": state_dict, "iteration", "optimizer",
  "learning_rate"}``;
* **exported inference models** ``assets/weights/<name>.pth``: ``{"weight": state_dict without
  enc_q (half), "config": [18 synthesizer arguments], "info", "sr", "f0", "version"}``.

Both are read with ``torch.load(weights_only=True)``: no pickled code runs. The decoder of
either lives under the ``dec.`` prefix of its state dict.

:func:`merge_adapter` writes a new exported model whose decoder weights are
``W + ΔW`` in RVC's own ``weight_g``/``weight_v`` form, cast back to each key's dtype, with
every other key and field kept. RVC's inference loads exports with
``load_state_dict(strict=False)`` and never checks the result, so a key in any other form
would load silently wrong; here the merged key set must equal the base's key set exactly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .io import atomic_write, check_output_path, describe_format, detect_format, first_nonfinite, torch_load_error
from .models.rvc import GENERATOR_CONFIGS, Generator, GeneratorConfig, GeneratorNSF, generator_from_config

__all__ = [
    "EXPORTED_FIELDS",
    "AdapterFileError",
    "MergeResult",
    "RVCFileError",
    "RVCModelFile",
    "build_generator_from_rvc",
    "check_exported_model",
    "decoder_layer_records",
    "generator_config_from_rvc",
    "load_rvc_file",
    "merge_adapter",
    "rvc_config_list",
    "write_exported_model",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The top-level fields of an exported RVC model.
EXPORTED_FIELDS = ("weight", "config", "info", "sr", "f0", "version")
_DEC = "dec."
_SR_LABELS = {"32k": 32000, "40k": 40000, "48k": 48000}
# spec_channels (filter_length // 2 + 1) of the shipped configs.
_SPEC_CHANNELS = {32000: 513, 40000: 1025, 48000: 1025}
# The synthesizer arguments around the decoder's, identical in every shipped config.
_TEXT_ENCODER = {"hidden": 192, "filter": 768, "heads": 2, "layers": 6, "kernel": 3, "p_dropout": 0}
_SPK_EMBED_DIM = 109


def _torch_output(path: PathLike) -> None:
    """RVC loads models with ``torch.load``: a model is never written under a safetensors name."""
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".safetensors"):
        raise ValueError(f"output {os.fspath(path)!r}: an RVC model file is a torch.save file, which RVC loads "
                         "with torch.load; name it .pth, not .safetensors")


class RVCFileError(ValueError):
    """A file is not an RVC model file, or not one that the operation can use."""


class AdapterFileError(RVCFileError):
    """The file given as an RVC model is an rvclora adapter."""


@dataclass
class RVCModelFile:
    """One RVC file as read from disk.

    Attributes:
        path: where it was read from.
        kind: ``"exported"`` (an inference model) or ``"checkpoint"`` (a ``G_*.pth``).
        data: the whole loaded dict (every field, untouched).
    """

    path: str
    kind: str
    data: dict[str, Any]

    @property
    def state_dict(self) -> dict[str, Tensor]:
        """The model weights: ``data["weight"]`` (exported) or ``data["model"]`` (checkpoint)."""
        return self.data["weight"] if self.kind == "exported" else self.data["model"]

    def decoder_state_dict(self) -> OrderedDict[str, Tensor]:
        """The ``dec.`` keys with the prefix stripped: a state dict of :class:`GeneratorNSF`/:class:`Generator`."""
        return OrderedDict((k[len(_DEC):], v) for k, v in self.state_dict.items() if k.startswith(_DEC))

    @property
    def f0(self) -> bool:
        """Whether the model is an f0 (NSF) model: the export's flag, else whether the decoder has ``m_source``."""
        if self.kind == "exported":
            return bool(int(self.data["f0"]))
        return any(k.startswith(_DEC + "m_source.") for k in self.state_dict)

    @property
    def weight_norm(self) -> str:
        """``"legacy"`` or ``"parametrizations"``: the weight_norm form of the decoder's keys."""
        return "parametrizations" if any(".parametrizations.weight." in k for k in self.state_dict) else "legacy"


def _fail(path: str, why: str) -> RVCFileError:
    return RVCFileError(f"{path}: {why}")


def load_rvc_file(path: PathLike, *, validate: bool = True) -> RVCModelFile:
    """Read an RVC training checkpoint or exported model safely (``weights_only=True``).

    The format is judged by content. Raises ``FileNotFoundError`` for a missing file and
    :class:`RVCFileError` saying what the file is instead (a safetensors file or an rvclora
    adapter, text, a pickle holding code, a dict without the expected keys). With ``validate``
    (the default) an export must also agree with itself: :func:`check_exported_model`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"RVC model file {path!r} does not exist")
    if not os.path.isfile(path):
        raise _fail(path, "not a regular file; expected an RVC model file (.pth)")
    fmt = detect_format(path)
    if fmt == "safetensors":
        raise AdapterFileError(f"{path}: a safetensors file (an rvclora adapter?), not an RVC model file "
                               "(a torch.save .pth)")
    if fmt not in ("torch-zip", "pickle"):
        raise _fail(path, f"{describe_format(fmt)}, not an RVC model file (expected a torch.save .pth)")
    if fmt == "torch-zip":
        from .io import check_torch_archive

        try:
            check_torch_archive(path)
        except ValueError as e:
            raise _fail(path, str(e)) from None
    try:
        with open(path, "rb") as f:  # a file object: torch.load never guesses the format from the name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch.load raises many types; each means "not a safe torch file"
        raise _fail(path, f"not readable as a torch file with weights_only=True: {torch_load_error(e)}") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"expected a dict (an RVC export or G_*.pth checkpoint), got {type(obj).__name__}")
    if "lora_weights" in obj and "format_version" in obj:
        raise AdapterFileError(f"{path}: this is an rvclora adapter, not an RVC model file")
    if "weight" in obj:
        missing = [f for f in EXPORTED_FIELDS if f not in obj]
        if missing:
            raise _fail(path, f"looks like an exported RVC model but lacks the field(s) {missing}; "
                              f"expected {list(EXPORTED_FIELDS)}")
        kind, weights = "exported", obj["weight"]
    elif "model" in obj:
        kind, weights = "checkpoint", obj["model"]
    else:
        raise _fail(path, f"neither an exported RVC model (keys {list(EXPORTED_FIELDS)}) nor a training "
                          f"checkpoint (key 'model'); its keys are {sorted(map(str, obj))[:10]}")
    field = "weight" if kind == "exported" else "model"
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                   for k, v in weights.items()):
        raise _fail(path, f"field {field!r} must be a state dict (str -> tensor)")
    if not any(str(k).startswith(_DEC) for k in weights):
        raise _fail(path, "its state dict has no decoder ('dec.' keys)")
    model_file = RVCModelFile(path, kind, obj)
    if validate and kind == "exported":
        check_exported_model(model_file)
    return model_file


_VERSIONS = ("v1", "v2")


def check_exported_model(model_file: RVCModelFile) -> GeneratorConfig:
    """An export must agree with itself; returns its decoder config.

    ``version`` is ``"v1"``/``"v2"``, ``f0`` is 0/1 and matches whether the decoder has the
    harmonic source (``m_source``), ``sr`` names the config's sampling rate, and the decoder's
    keys and shapes are exactly those its config builds. Raises :class:`RVCFileError` naming
    the path and the first contradiction.
    """
    path, d = model_file.path, model_file.data
    if d["version"] not in _VERSIONS:
        raise _fail(path, f"version {d['version']!r}; expected one of {list(_VERSIONS)}")
    if not isinstance(d["f0"], (int, bool)) or d["f0"] not in (0, 1):
        raise _fail(path, f"f0 {d['f0']!r}; expected 0 or 1")
    try:
        cfg = generator_config_from_rvc(d["config"], d["version"])
        sr = _sr_to_int(d["sr"])
    except RVCFileError as e:
        raise _fail(path, str(e)) from None
    if sr != cfg.sampling_rate:
        raise _fail(path, f"sr {d['sr']!r} but its config's sampling rate is {cfg.sampling_rate}")
    dec = model_file.decoder_state_dict()
    has_source = any(k.startswith("m_source.") for k in dec)
    if bool(d["f0"]) != has_source:
        raise _fail(path, f"f0={d['f0']} but the decoder {'has' if has_source else 'lacks'} the harmonic source "
                          "(m_source) of an f0 model")
    lora = [k for k in dec if k.endswith((".lora_A", ".lora_B"))]
    if lora:
        raise _fail(path, f"its decoder holds LoRA factors ({_DEC + lora[0]!r}, an unmerged training state); "
                          "RVC would ignore them: merge the adapter with rvclora merge")
    with torch.device("meta"):
        expected = generator_from_config(cfg, f0=bool(d["f0"]), weight_norm=model_file.weight_norm).state_dict()
    extra, missing = sorted(set(dec) - set(expected)), sorted(set(expected) - set(dec))
    if extra or missing:
        raise _fail(path, f"its decoder keys do not fit its config ({cfg.name}, f0={d['f0']}): unexpected "
                          f"{[_DEC + k for k in extra[:3]]}, missing {[_DEC + k for k in missing[:3]]}")
    for k, t in expected.items():
        if tuple(dec[k].shape) != tuple(t.shape):
            raise _fail(path, f"{_DEC + k!r} has shape {tuple(dec[k].shape)} but its config ({cfg.name}, "
                              f"sampling rate {cfg.sampling_rate}) gives {tuple(t.shape)}")
    return cfg


def _sr_to_int(sr: Any) -> int:
    if isinstance(sr, str) and sr.lower() in _SR_LABELS:
        return _SR_LABELS[sr.lower()]
    if isinstance(sr, int) and not isinstance(sr, bool) and sr > 0:
        return sr
    raise RVCFileError(f"sampling rate must be an int (40000) or one of {sorted(_SR_LABELS)}, got {sr!r}")


def generator_config_from_rvc(config: list[Any], version: str = "v1") -> GeneratorConfig:
    """The decoder hyper-parameters in an exported model's ``config`` list (18 synthesizer arguments).

    Returns the named shipped config when the hyper-parameters equal one, else a config named ``"custom"``.
    """
    from .validate import check_rvc_decoder_args

    try:
        args = check_rvc_decoder_args(config)
        cfg = GeneratorConfig(name="custom", version=str(version), sampling_rate=_sr_to_int(config[17]), **args)
    except (TypeError, ValueError) as e:
        raise RVCFileError(str(e)) from None
    for named in GENERATOR_CONFIGS.values():
        if _same_decoder(named, cfg):
            return GeneratorConfig(**{**cfg.__dict__, "name": named.name, "segment_frames": named.segment_frames})
    return cfg


def _same_decoder(a: GeneratorConfig, b: GeneratorConfig) -> bool:
    fields = ("sampling_rate", "upsample_rates", "upsample_kernel_sizes", "inter_channels", "upsample_initial_channel",
              "resblock", "resblock_kernel_sizes", "resblock_dilation_sizes", "gin_channels")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


def rvc_config_list(config: GeneratorConfig, spk_embed_dim: int = _SPK_EMBED_DIM) -> list[Any]:
    """RVC's exported ``config`` list for a decoder config (the text-encoder arguments as shipped)."""
    return [
        _SPEC_CHANNELS.get(config.sampling_rate, 1025),
        config.segment_frames,
        config.inter_channels,
        _TEXT_ENCODER["hidden"],
        _TEXT_ENCODER["filter"],
        _TEXT_ENCODER["heads"],
        _TEXT_ENCODER["layers"],
        _TEXT_ENCODER["kernel"],
        _TEXT_ENCODER["p_dropout"],
        config.resblock,
        list(config.resblock_kernel_sizes),
        [list(d) for d in config.resblock_dilation_sizes],
        list(config.upsample_rates),
        config.upsample_initial_channel,
        list(config.upsample_kernel_sizes),
        spk_embed_dim,
        config.gin_channels,
        config.sampling_rate,
    ]


def build_generator_from_rvc(
    model_file: RVCModelFile, dtype: torch.dtype = torch.float32, load_weights: bool = True
) -> GeneratorNSF | Generator:
    """The decoder of an exported model, built from its ``config`` and (by default) loaded strictly.

    Weights are cast to ``dtype`` (exports store half). A decoder that does not fit its own
    config raises :class:`RVCFileError`.
    """
    if model_file.kind != "exported":
        raise RVCFileError(f"{model_file.path}: a training checkpoint has no config to build the decoder from; "
                           "export it with RVC first (or use rvclora.models.build_generator with its config name)")
    cfg = generator_config_from_rvc(model_file.data["config"], str(model_file.data["version"]))
    model = generator_from_config(cfg, f0=model_file.f0, weight_norm=model_file.weight_norm).to(dtype)
    if load_weights:
        dec = OrderedDict((k, v.to(dtype)) for k, v in model_file.decoder_state_dict().items())
        try:
            model.load_state_dict(dec, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise RVCFileError(f"{model_file.path}: the decoder weights do not fit the file's own config "
                               f"({cfg.name}, f0={model_file.f0}): {' '.join(x.strip() for x in first[:3])}") from None
    return model


def decoder_layer_records(model_file: RVCModelFile) -> dict[str, dict[str, Any]]:
    """The kind and groups of every layer of an export's decoder, named both ways an adapter may name them.

    Keys relative to the decoder (``ups.0``) and to RVC's synthesizer (``dec.ups.0``): the
    ``layers=`` of :func:`rvclora.blend.blend_adapters` for adapters saved without layer records.
    """
    from .blend import model_layer_records

    with torch.device("meta"):
        generator = build_generator_from_rvc(model_file, load_weights=False)
    return {**model_layer_records(generator), **model_layer_records(generator, prefix=_DEC)}


def _write_torch(obj: Any, path: str, overwrite: bool) -> None:
    """``torch.save`` through the package's atomic writer, checked to read back as a torch file."""

    def verify(tmp: str) -> None:
        if detect_format(tmp) != "torch-zip":
            raise OSError(f"{path}: the written file does not read back as a torch.save file")

    atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=overwrite, verify=verify)


def write_exported_model(
    generator: nn.Module,
    path: PathLike,
    config: GeneratorConfig,
    *,
    version: str | None = None,
    info: str = "0epoch",
    extra_weights: Mapping[str, Tensor] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``generator`` as an RVC exported model (decoder under ``dec.``, every tensor half).

    RVC's exports hold the whole synthesizer minus ``enc_q``; this holds the decoder plus
    ``extra_weights`` (e.g. ``emb_g.weight``), so it is a complete file only for what it holds.
    A generator with LoRA layers is written merged (:func:`rvclora.merged_state_dict`).
    Returns the path written.
    """
    from .inject import lora_modules, merged_state_dict

    _torch_output(path)
    path = check_output_path(path, overwrite=overwrite)
    if not isinstance(config, GeneratorConfig):
        raise TypeError(f"config must be a GeneratorConfig, got {type(config).__name__}")
    is_nsf = hasattr(generator, "m_source")
    state = merged_state_dict(generator) if any(True for _ in lora_modules(generator)) else generator.state_dict()
    bad = first_nonfinite([(_DEC + k, v) for k, v in state.items()] + list((extra_weights or {}).items()),
                          dtype=torch.half)
    if bad is not None:
        raise ValueError(f"{path}: refusing to write {bad[0]!r}: {bad[1]}")
    weight: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in state.items():
        weight[_DEC + k] = v.detach().to("cpu", torch.half).clone()
    for k, v in (extra_weights or {}).items():
        if k.startswith(_DEC) or "enc_q" in k:
            raise ValueError(f"extra_weights key {k!r}: decoder and enc_q keys are not extra weights")
        weight[k] = v.detach().to("cpu", torch.half).clone()
    spk = extra_weights["emb_g.weight"].shape[0] if extra_weights and "emb_g.weight" in extra_weights else None
    cpt = {
        "weight": weight,
        "config": rvc_config_list(config, spk if spk is not None else _SPK_EMBED_DIM),
        "info": info,
        "sr": config.sr_label,
        "f0": 1 if is_nsf else 0,
        "version": version or config.version,
    }
    _write_torch(cpt, path, overwrite)
    return path


@dataclass
class MergeResult:
    """What :func:`merge_adapter` wrote: the output path, how many decoder keys changed, the info string."""

    path: str
    merged_layers: int
    decoder_keys: int
    info: str


class _Synthesizer(nn.Module):
    """Holds a decoder as ``dec`` so adapters trained on RVC's whole synthesizer keep their key names."""

    def __init__(self, dec: nn.Module) -> None:
        super().__init__()
        self.dec = dec


def _adapter_sources(adapter_path: Any) -> list[tuple[str, float]]:
    """``adapter_path`` as ``[(path, weight), ...]``: one path (weight 1) or a list of paths / (path, weight) pairs."""
    if isinstance(adapter_path, (str, os.PathLike)):
        return [(os.fspath(adapter_path), 1.0)]
    if isinstance(adapter_path, (list, tuple)) and adapter_path:
        out = []
        for item in adapter_path:
            if isinstance(item, (str, os.PathLike)):
                out.append((os.fspath(item), 1.0))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
                out.append((os.fspath(item[0]), item[1]))
            else:
                raise TypeError(f"merge_adapter: each adapter must be a path or a (path, weight) pair, got {item!r}")
        return out
    raise TypeError(f"merge_adapter: adapter_path must be a path or a non-empty list of (path, weight) pairs, "
                    f"got {adapter_path!r}")


def merge_adapter(
    base_path: PathLike, adapter_path: Any, out_path: PathLike, *, overwrite: bool = False, force: bool = False
) -> MergeResult:
    """Merge the LoRA adapter at ``adapter_path`` into the exported model at ``base_path``; write ``out_path``.

    ``adapter_path`` may also be a list of ``(path, weight)`` pairs: the adapters are blended
    exactly first (:func:`rvclora.blend.blend_adapters`, ``ΔW = Σ wᵢ·ΔWᵢ``), then merged in one pass.

    The output is an RVC exported model: every field and every non-decoder key of the base
    kept as is, the decoder weights replaced by ``W + ΔW`` in the base's own weight_norm form
    (``weight_g``/``weight_v``) and dtype, and ``info`` noting the adapter. Adapter keys may be
    relative to the decoder (``ups.0.lora_A``) or to RVC's synthesizer (``dec.ups.0.lora_A``).

    Refused before any work: an ``out_path`` that is one of the inputs, a directory, not a
    regular file, in a missing or read-only directory, named ``.safetensors`` (RVC loads
    ``torch.save`` files), or existing without ``overwrite``. Refused after reading: an
    adapter trained on another base (its fingerprint; ``force=True`` merges anyway), and any
    tensor of the output that is not finite in the dtype it is written in, naming the first
    key and why (NaN or Inf in the adapter, in the base, or an overflow of half). The write is
    atomic.
    """
    from .checkpoint import check_base_fingerprint, check_fits_before_injecting, load_lora_weights, read_lora_file
    from .fingerprint import base_fingerprint
    from .inject import inject_lora, lora_modules, merged_state_dict

    base_path = os.fspath(base_path)
    sources = _adapter_sources(adapter_path)
    _torch_output(out_path)
    out_path = check_output_path(out_path, overwrite=overwrite,
                                 inputs=(("base model", base_path),) + tuple(("adapter", p) for p, _ in sources))
    base = load_rvc_file(base_path)
    if base.kind != "exported":
        raise RVCFileError(f"{base_path}: is an RVC training checkpoint (G_*.pth); merge needs an exported model, "
                           "which stores the config")
    if len(sources) == 1 and sources[0][1] == 1.0:
        adapter_path = sources[0][0]
        adapter = read_lora_file(adapter_path)
        adapter_label = os.path.basename(adapter_path)
    else:
        from .blend import BlendError, blend_adapters

        adapter_path = " + ".join(f"{p}:{w:g}" for p, w in sources)
        adapter_label = "blend " + " + ".join(f"{os.path.basename(p)}:{w:g}" for p, w in sources)
        try:
            adapter = blend_adapters([p for p, _ in sources], [w for _, w in sources], force=force,
                                     layers=decoder_layer_records(base))
        except BlendError as e:
            raise RVCFileError(f"cannot blend {adapter_path}: {e}") from None
    weights: dict[str, Tensor] = adapter["weights"]
    lora_config = adapter["config"]
    bad = first_nonfinite(weights.items())
    if bad is not None:
        raise RVCFileError(f"{adapter_path}: refusing to merge: the adapter's {bad[0]!r} is not finite ({bad[1]})")
    base_weights = base.state_dict
    bad = first_nonfinite(base_weights.items())
    if bad is not None:
        raise RVCFileError(f"{base_path}: refusing to merge: the base model's {bad[0]!r} is already not finite "
                           f"({bad[1]})")

    generator = build_generator_from_rvc(base, dtype=torch.float32)
    on_synth = bool(weights) and all(k.startswith(_DEC) for k in weights)
    outside = [k for k in weights if k.startswith(_DEC) != on_synth]
    if outside:
        raise RVCFileError(f"{adapter_path}: adapter keys mix decoder-relative and 'dec.'-prefixed names "
                           f"(e.g. {outside[0]!r}); only decoder adapters can be merged")
    model: nn.Module = _Synthesizer(generator) if on_synth else generator
    try:
        check_fits_before_injecting("", model, lora_config, weights)
        inject_lora(model, lora_config)
        load_lora_weights(model, {k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    except (KeyError, ValueError) as e:
        msg = str(e.args[0] if e.args else e).removeprefix("load_lora_weights: ")
        raise RVCFileError(f"{adapter_path}: adapter does not fit the decoder of {base_path}: {msg}") from None
    try:
        check_base_fingerprint(adapter_path, adapter["base_fingerprint"], base_fingerprint(base_weights), force,
                               base_name=f"base model {base_path}", stacklevel=2)
    except ValueError as e:
        raise RVCFileError(str(e)) from None

    merged = merged_state_dict(model, safe_merge=False)  # checked below, in the dtype written
    if not on_synth:
        merged = OrderedDict((_DEC + k, v) for k, v in merged.items())
    base_dec = {k for k in base_weights if k.startswith(_DEC)}
    if set(merged) != base_dec:
        extra, missing = sorted(set(merged) - base_dec), sorted(base_dec - set(merged))
        raise RVCFileError(f"merged decoder keys differ from the base's: new {extra[:3]}, missing {missing[:3]}")
    new_weights: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in base_weights.items():
        if k in merged:
            bad = first_nonfinite([(k, merged[k])], dtype=v.dtype)
            if bad is not None:
                raise RVCFileError(f"{adapter_path}: refusing to write a broken model: merged {k!r} "
                                   f"{bad[1]} (the adapter's update is too large for this base)")
            new_weights[k] = merged[k].to(v.dtype).contiguous()
        else:
            new_weights[k] = v

    n_layers = sum(1 for _ in lora_modules(model))
    note = (f"rvclora adapter {adapter_label} merged (r={lora_config.r}, "
            f"alpha={lora_config.lora_alpha:g}, targets={','.join(lora_config.target_modules)}, {n_layers} layers)")
    base_info = str(base.data.get("info", ""))
    info = f"{base_info} + {note}" if base_info else note
    out = dict(base.data)
    out["weight"] = new_weights
    out["info"] = info
    _write_torch(out, out_path, overwrite)
    return MergeResult(out_path, n_layers, len(base_dec), info)
