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
from .records import model_layer_records

__all__ = [
    "EXPORTED_FIELDS",
    "AdapterFileError",
    "MergeResult",
    "RVCFileError",
    "RVCModelFile",
    "SYNTH_PARTS",
    "blend_base_tensors",
    "build_generator_from_rvc",
    "check_exported_model",
    "decoder_layer_records",
    "generator_config_from_rvc",
    "load_rvc_file",
    "merge_adapter",
    "rvc_config_list",
    "synthesizer_spec_of",
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
        raise ValueError(
            f"output {os.fspath(path)!r}: an RVC model file is a torch.save file, which RVC loads "
            "with torch.load; name it .pth, not .safetensors"
        )


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
        return OrderedDict((k[len(_DEC) :], v) for k, v in self.state_dict.items() if k.startswith(_DEC))

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
        raise AdapterFileError(
            f"{path}: a safetensors file (an rvclora adapter?), not an RVC model file (a torch.save .pth)"
        )
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
            raise _fail(
                path,
                f"looks like an exported RVC model but lacks the field(s) {missing}; expected {list(EXPORTED_FIELDS)}",
            )
        kind, weights = "exported", obj["weight"]
    elif "model" in obj:
        kind, weights = "checkpoint", obj["model"]
    else:
        raise _fail(
            path,
            f"neither an exported RVC model (keys {list(EXPORTED_FIELDS)}) nor a training "
            f"checkpoint (key 'model'); its keys are {sorted(map(str, obj))[:10]}",
        )
    field = "weight" if kind == "exported" else "model"
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
    ):
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
        raise _fail(
            path,
            f"f0={d['f0']} but the decoder {'has' if has_source else 'lacks'} the harmonic source "
            "(m_source) of an f0 model",
        )
    lora = [k for k in dec if k.endswith((".lora_A", ".lora_B"))]
    if lora:
        raise _fail(
            path,
            f"its decoder holds LoRA factors ({_DEC + lora[0]!r}, an unmerged training state); "
            "RVC would ignore them: merge the adapter with rvclora merge",
        )
    with torch.device("meta"):
        expected = generator_from_config(cfg, f0=bool(d["f0"]), weight_norm=model_file.weight_norm).state_dict()
    extra, missing = sorted(set(dec) - set(expected)), sorted(set(expected) - set(dec))
    if extra or missing:
        raise _fail(
            path,
            f"its decoder keys do not fit its config ({cfg.name}, f0={d['f0']}): unexpected "
            f"{[_DEC + k for k in extra[:3]]}, missing {[_DEC + k for k in missing[:3]]}",
        )
    for k, t in expected.items():
        if tuple(dec[k].shape) != tuple(t.shape):
            raise _fail(
                path,
                f"{_DEC + k!r} has shape {tuple(dec[k].shape)} but its config ({cfg.name}, "
                f"sampling rate {cfg.sampling_rate}) gives {tuple(t.shape)}",
            )
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
    fields = (
        "sampling_rate",
        "upsample_rates",
        "upsample_kernel_sizes",
        "inter_channels",
        "upsample_initial_channel",
        "resblock",
        "resblock_kernel_sizes",
        "resblock_dilation_sizes",
        "gin_channels",
    )
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
        raise RVCFileError(
            f"{model_file.path}: a training checkpoint has no config to build the decoder from; "
            "export it with RVC first (or use rvclora.models.build_generator with its config name)"
        )
    cfg = generator_config_from_rvc(model_file.data["config"], str(model_file.data["version"]))
    model = generator_from_config(cfg, f0=model_file.f0, weight_norm=model_file.weight_norm).to(dtype)
    if load_weights:
        dec = OrderedDict((k, v.to(dtype)) for k, v in model_file.decoder_state_dict().items())
        try:
            model.load_state_dict(dec, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise RVCFileError(
                f"{model_file.path}: the decoder weights do not fit the file's own config "
                f"({cfg.name}, f0={model_file.f0}): {' '.join(x.strip() for x in first[:3])}"
            ) from None
    return model


def decoder_layer_records(model_file: RVCModelFile) -> dict[str, dict[str, Any]]:
    """The kind and groups of every layer of an export's decoder, named both ways an adapter may name them.

    Keys relative to the decoder (``ups.0``) and to RVC's synthesizer (``dec.ups.0``): the
    ``layers=`` of :func:`rvclora.blend.blend_adapters` for adapters saved without layer records.
    """
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
    bad = first_nonfinite(
        [(_DEC + k, v) for k, v in state.items()] + list((extra_weights or {}).items()), dtype=torch.half
    )
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
    """What :func:`merge_adapter` wrote.

    Attributes:
        path: the output path.
        merged_layers: LoRA layers merged.
        decoder_keys: decoder tensors in the output.
        info: the note describing the merge (the output's ``info`` for an export).
        kind: ``"exported"`` or ``"checkpoint"``: the kind of file written.
        changed_keys: tensors of the output that the adapter changed (LoRA layers' weights, trained
            biases, ``modules_to_save``); every other tensor is the base's, untouched.
        dropped_layers: LoRA layers of the adapter left out because the output has no such module
            (``enc_q`` in an export, which RVC's inference never runs).
    """

    path: str
    merged_layers: int
    decoder_keys: int
    info: str
    kind: str = "exported"
    changed_keys: int = 0
    dropped_layers: int = 0


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
    raise TypeError(
        f"merge_adapter: adapter_path must be a path or a non-empty list of (path, weight) pairs, got {adapter_path!r}"
    )


#: The top-level modules of RVC's synthesizer: an adapter key starting with one of these is synthesizer-relative.
SYNTH_PARTS = ("enc_p", "dec", "enc_q", "flow", "emb_g")
#: RVC's export writes this as the segment (index 1 of ``config``) for every sampling rate.
_EXPORT_SEGMENT = 32


def synthesizer_spec_of(model_file: RVCModelFile) -> tuple[str, bool, str]:
    """``(shipped synthesizer config name, f0, weight_norm)`` of a checkpoint or pretrained file, from its shapes.

    A ``G_*.pth`` or pretrained ``{"model": …}`` records no config, so its state dict is compared with
    every shipped config (v1/v2, 32k/40k/48k, f0 or not): exactly one must give the same keys and shapes,
    else :class:`RVCFileError` says which came closest.
    """
    from .models.synthesizer import SYNTHESIZER_CONFIGS, build_synthesizer

    sd = model_file.state_dict
    wn = model_file.weight_norm
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    f0 = any(k.startswith("dec.m_source.") for k in sd)
    phone = shapes.get("enc_p.emb_phone.weight", (0, 0))[-1]
    version = {256: "v1", 768: "v2"}.get(phone)
    best: tuple[int, str] | None = None
    for name in SYNTHESIZER_CONFIGS:
        if version is not None and not name.startswith(version):
            continue  # the phone features tell v1 (256) from v2 (768): no need to build the others
        with torch.device("meta"):
            ref = {k: tuple(v.shape) for k, v in build_synthesizer(name, f0, weight_norm=wn).state_dict().items()}
        if ref == shapes:
            return name, f0, wn
        wrong = len(set(ref) ^ set(shapes)) + sum(1 for k in set(ref) & set(shapes) if ref[k] != shapes[k])
        if best is None or wrong < best[0]:
            best = (wrong, name)
    raise RVCFileError(
        f"{model_file.path}: its weights are not those of any shipped RVC synthesizer (v1/v2, "
        f"32k/40k/48k, f0={int(f0)}); closest: {best[1] if best else '-'} with {best[0] if best else 0} "
        "keys missing, extra or of another shape"
    )


def _export_fields(spec: tuple[str, bool, str], weights: Mapping[str, Tensor], info: str) -> dict[str, Any]:
    """RVC's export fields (``config``, ``info``, ``sr``, ``f0``, ``version``) for a checkpoint of config ``spec``."""
    from .models.synthesizer import get_synthesizer_config

    cfg = get_synthesizer_config(spec[0])
    config = cfg.rvc_args()
    config[1] = _EXPORT_SEGMENT  # as RVC's export writes it
    config[15] = int(weights["emb_g.weight"].shape[0])  # spk_embed_dim: the trained speaker table
    return {
        "config": config,
        "info": info,
        "sr": cfg.generator.sr_label,
        "f0": 1 if spec[1] else 0,
        "version": cfg.version,
    }


def _adapter_form(adapter_path: str, weights: Mapping[str, Tensor]) -> str:
    """``"decoder"`` (keys relative to the decoder, ``ups.0.lora_A``) or ``"synth"`` (``dec.ups.0.lora_A``,
    ``flow.flows.0.pre.lora_A``, ``emb_g.weight``)."""
    synth = [k for k in weights if k.split(".")[0] in SYNTH_PARTS]
    rel = [k for k in weights if k.split(".")[0] not in SYNTH_PARTS]
    if synth and rel:
        raise RVCFileError(
            f"{adapter_path}: adapter keys mix names relative to the decoder (e.g. {rel[0]!r}) and to "
            f"RVC's synthesizer (e.g. {synth[0]!r}); an adapter is trained on one model or the other"
        )
    return "synth" if synth else "decoder"


def merge_adapter(
    base_path: PathLike,
    adapter_path: Any,
    out_path: PathLike,
    *,
    overwrite: bool = False,
    force: bool = False,
    export: bool = False,
) -> MergeResult:
    """Merge the LoRA adapter at ``adapter_path`` into the RVC model at ``base_path``; write ``out_path``.

    ``base_path``: an RVC/Applio export (``assets/weights/*.pth``), a training checkpoint
    (``G_<step>.pth``) or a pretrained generator (``{"model": state_dict}``, ``pretrained_v2/f0G40k.pth``).
    The output is the same kind of file, with every field and every key of the base kept as it
    was, in its form (``weight_g``/``weight_v``, Applio's names) and dtype (half in an export),
    except the tensors the adapter changes: each LoRA layer's weight, re-expressed as ``W + ΔW``
    in the base's weight_norm form, the biases the adapter trains and its ``modules_to_save``,
    each cast to the base key's dtype. An export's ``info`` notes the adapter.

    ``export=True`` (a checkpoint or pretrained base only) writes an RVC export instead: every key
    but ``enc_q``'s in half, and ``config``, ``sr``, ``f0``, ``version`` derived from the base's
    shapes (which must be those of a shipped config) and checked by building RVC's synthesizer
    from them and loading the weights strictly; ``info`` is ``"<iteration>epoch"`` plus the note.

    ``adapter_path``: one adapter file, or a list of ``(path, weight)`` pairs blended exactly first
    (:func:`rvclora.blend.blend_adapters`, ``ΔW = Σ wᵢ·ΔWᵢ``; whole tensors weighted against this base).
    Adapter keys may be relative to the decoder (``ups.0.lora_A``, a decoder adapter) or to RVC's
    synthesizer (``dec.ups.0.lora_A``, ``flow.flows.0.enc.in_layers.0.lora_A``, ``emb_g.weight``).
    LoRA layers of ``enc_q`` are left out of an export (RVC's exports drop ``enc_q``).

    Refused before any work: an ``out_path`` that is one of the inputs, a directory, not a
    regular file, in a missing or read-only directory, named ``.safetensors`` (RVC loads
    ``torch.save`` files), or existing without ``overwrite``. Refused after reading: an
    adapter trained on another base (its fingerprint, of the decoder or of the whole synthesizer;
    ``force=True`` merges anyway), an adapter that does not fit the base, and any tensor of the
    output that is not finite in the dtype it is written in, naming the first key and why (NaN
    or Inf in the adapter, in the base, or an overflow of half). The write is atomic.
    """
    from .checkpoint import check_base_fingerprint, check_fits_before_injecting, load_lora_weights, read_lora_file
    from .fingerprint import base_fingerprint, fingerprint_scope
    from .inject import canonical_saved_key, inject_lora, lora_modules, merged_state_dict

    base_path = os.fspath(base_path)
    sources = _adapter_sources(adapter_path)
    if not isinstance(export, bool):
        raise TypeError(f"merge_adapter: export must be a bool, got {export!r}")
    _torch_output(out_path)
    out_path = check_output_path(
        out_path, overwrite=overwrite, inputs=(("base model", base_path),) + tuple(("adapter", p) for p, _ in sources)
    )
    base = load_rvc_file(base_path)
    if export and base.kind == "exported":
        raise RVCFileError(
            f"{base_path}: is already an exported model; --export writes an export from a training "
            "checkpoint (G_*.pth) or a pretrained generator"
        )
    base_weights = base.state_dict
    bad = first_nonfinite(base_weights.items())
    if bad is not None:
        raise RVCFileError(
            f"{base_path}: refusing to merge: the base model's {bad[0]!r} is already not finite ({bad[1]})"
        )

    synth, spec = _base_model(base)
    records = {**model_layer_records(synth), **model_layer_records(synth.dec)}
    if len(sources) == 1 and sources[0][1] == 1.0:
        adapter_path = sources[0][0]
        adapter = read_lora_file(adapter_path)
        adapter_label = os.path.basename(adapter_path)
    else:
        from .blend import BlendError, blend_adapters

        adapter_path = " + ".join(f"{p}:{w:g}" for p, w in sources)
        adapter_label = "blend " + " + ".join(f"{os.path.basename(p)}:{w:g}" for p, w in sources)
        try:
            adapter = blend_adapters(
                [p for p, _ in sources],
                [w for _, w in sources],
                force=force,
                layers=records,
                base=blend_base_tensors(base),
            )
        except BlendError as e:
            raise RVCFileError(f"cannot blend {adapter_path}: {e}") from None
    weights: dict[str, Tensor] = dict(adapter["weights"])
    lora_config = adapter["config"]
    bad = first_nonfinite(weights.items())
    if bad is not None:
        raise RVCFileError(f"{adapter_path}: refusing to merge: the adapter's {bad[0]!r} is not finite ({bad[1]})")

    form = _adapter_form(adapter_path, weights)
    target: nn.Module = synth.dec if form == "decoder" else synth
    if form == "synth" and isinstance(synth, _Synthesizer):
        outside = sorted({k.split(".")[0] for k in weights if not k.startswith(_DEC)})
        if outside:
            raise RVCFileError(
                f"{adapter_path}: a whole-voice adapter (it changes {outside}) but {base_path} holds "
                "only a decoder (and keys that are not RVC's whole synthesizer): merge it into the "
                "model's full export, G_*.pth or pretrained file"
            )
    dropped = 0
    if base.kind == "exported":  # RVC's export has no enc_q: its LoRA layers have nothing to merge into
        enc_q = {k for k in weights if k.startswith("enc_q.")}
        dropped = len({k.rpartition(".")[0] for k in enc_q if k.endswith(".lora_A")})
        weights = {k: v for k, v in weights.items() if k not in enc_q}
    try:
        check_fits_before_injecting("", target, lora_config, weights)
        inject_lora(target, lora_config)
        load_lora_weights(target, {k: v.to(torch.float32) for k, v in weights.items()}, strict=True)
    except (KeyError, ValueError) as e:
        msg = str(e.args[0] if e.args else e).removeprefix("load_lora_weights: ").removeprefix("inject_lora: ")
        part = "the decoder" if form == "decoder" else "the synthesizer"
        raise RVCFileError(f"{adapter_path}: adapter does not fit {part} of {base_path}: {msg}") from None
    fp = adapter["base_fingerprint"]
    scope = fingerprint_scope(fp) if fp is not None else "decoder"
    try:
        check_base_fingerprint(
            adapter_path,
            fp,
            base_fingerprint(base_weights, scope=scope),
            force,
            base_name=f"base model {base_path}",
            stacklevel=2,
        )
    except ValueError as e:
        raise RVCFileError(str(e)) from None

    merged = merged_state_dict(synth, safe_merge=False)  # checked below, in the dtype written
    expected = {k for k in base_weights if not isinstance(synth, _Synthesizer) or k.startswith(_DEC)}
    if set(merged) != expected:
        extra, missing = sorted(set(merged) - expected), sorted(expected - set(merged))
        raise RVCFileError(f"merged keys differ from the base's: new {extra[:3]}, missing {missing[:3]}")
    prefix = _DEC if form == "decoder" else ""
    layers = {prefix + n for n, m in lora_modules(target) if m.r > 0}
    changed = {k for k in merged if _owner(k) in layers and not k.endswith(".bias")}  # W + dW, re-expressed
    whole = {canonical_saved_key(prefix + k) for k in weights if not k.endswith((".lora_A", ".lora_B"))}
    changed |= {k for k in merged if canonical_saved_key(k) in whole}
    new_weights: OrderedDict[str, Tensor] = OrderedDict()
    for k, v in base_weights.items():
        if k in changed:
            bad = first_nonfinite([(k, merged[k])], dtype=v.dtype)
            if bad is not None:
                raise RVCFileError(
                    f"{adapter_path}: refusing to write a broken model: merged {k!r} "
                    f"{bad[1]} (the adapter's update is too large for this base)"
                )
            new_weights[k] = merged[k].to(v.dtype).contiguous()
        else:
            new_weights[k] = v

    n_layers = len(layers)
    saved = f", saved {','.join(lora_config.modules_to_save)}" if lora_config.modules_to_save else ""
    note = (
        f"rvclora adapter {adapter_label} merged (r={lora_config.r}, alpha={lora_config.lora_alpha:g}, "
        f"targets={','.join(lora_config.target_modules)}{saved}, {n_layers} layers)"
    )
    if base.kind == "exported":
        base_info = str(base.data.get("info", ""))
        info = f"{base_info} + {note}" if base_info else note
        out = dict(base.data)
        out["weight"] = new_weights
        out["info"] = info
        kind = "exported"
    elif export:
        info = f"{base.data.get('iteration', 0)}epoch + {note}"
        weight = OrderedDict((k, v.to(torch.half).contiguous()) for k, v in new_weights.items() if "enc_q" not in k)
        bad = first_nonfinite(weight.items(), dtype=torch.half)
        if bad is not None:
            raise RVCFileError(f"{adapter_path}: refusing to write a broken export: {bad[0]!r} {bad[1]} in half")
        out = {"weight": weight, **_export_fields(spec, weight, info)}
        _check_export_loads(out, out_path)
        kind = "exported"
    else:
        info = note
        out = dict(base.data)
        out["model"] = new_weights
        kind = "checkpoint"
    _write_torch(out, out_path, overwrite)
    return MergeResult(
        out_path, n_layers, sum(1 for k in new_weights if k.startswith(_DEC)), info, kind, len(changed), dropped
    )


def _base_model(base: RVCModelFile) -> tuple[nn.Module, tuple[str, bool, str] | None]:
    """The base as a model with its weights (fp32 copies), and for a checkpoint its ``(config, f0, weight_norm)``.

    An export whose keys are those of RVC's synthesizer for its config (less ``enc_q``) gives the whole
    synthesizer, built as RVC's inference builds it; an export holding only a decoder plus other keys
    gives that decoder (in a holder, as ``dec``), loaded strictly, the other keys left alone. A checkpoint
    or pretrained file gives the synthesizer of the shipped config its shapes match.
    """
    from .models.synthesizer import build_synthesizer, synthesizer_from_rvc_config

    path = base.path
    sd = base.state_dict
    spec = None
    try:
        with torch.device("meta"):
            if base.kind == "exported":  # load_rvc_file checked that it agrees with itself
                synth = synthesizer_from_rvc_config(
                    base.data["config"], str(base.data["version"]), base.f0, weight_norm=base.weight_norm
                )
                del synth.enc_q
            else:
                spec = synthesizer_spec_of(base)
                synth = build_synthesizer(spec[0], spec[1], weight_norm=spec[2])
    except RVCFileError:
        raise
    except (TypeError, ValueError) as e:
        raise RVCFileError(f"{path}: cannot build RVC's synthesizer from it: {' '.join(str(e).split())}") from None
    if base.kind == "exported" and set(sd) != set(synth.state_dict()):
        return _Synthesizer(build_generator_from_rvc(base, dtype=torch.float32)), None
    try:
        synth.load_state_dict(
            {k: v.detach().to(torch.float32, copy=True) for k, v in sd.items()}, strict=True, assign=True
        )
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise RVCFileError(
            f"{path}: its weights do not fit RVC's synthesizer for its own config: "
            f"{' '.join(x.strip() for x in lines[:3])}"
        ) from None
    return synth, spec


def blend_base_tensors(model_file: RVCModelFile) -> dict[str, Tensor]:
    """An RVC file's tensors under the names adapters use, for ``base=`` of :func:`rvclora.blend.blend_adapters`.

    Every key in RVC's form (``weight_g``/``weight_v``), and the decoder's also relative to the decoder
    (``ups.0.bias`` beside ``dec.ups.0.bias``), so decoder and whole-voice adapters both find theirs.
    """
    from .inject import canonical_saved_key

    out = {canonical_saved_key(k): v for k, v in model_file.state_dict.items()}
    out.update({k[len(_DEC) :]: v for k, v in list(out.items()) if k.startswith(_DEC)})
    return out


def _owner(key: str) -> str:
    """The module a state-dict key belongs to (``…parametrizations.weight.original0`` → the layer)."""
    if ".parametrizations.weight." in key:
        return key.split(".parametrizations.weight.")[0]
    return key.rpartition(".")[0]


def _check_export_loads(cpt: dict[str, Any], out_path: str) -> None:
    """An export written from a checkpoint must load the way RVC's inference loads it, with no key missing or extra."""
    from .models.synthesizer import synthesizer_from_rvc_config

    with torch.device("meta"):
        net = synthesizer_from_rvc_config(
            cpt["config"],
            cpt["version"],
            bool(cpt["f0"]),
            weight_norm="parametrizations" if any(".parametrizations." in k for k in cpt["weight"]) else "legacy",
        )
        del net.enc_q
    result = net.load_state_dict(cpt["weight"], strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise RVCFileError(
            f"{out_path}: the export would not load in RVC: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    check_exported_model(RVCModelFile(out_path, "exported", cpt))
