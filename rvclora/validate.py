"""One validation path for what rvclora reads: adapters and RVC decoder configs.

Every reader (``rvclora info``, ``mix``, ``merge``, :func:`rvclora.blend.blend_adapters`,
:func:`rvclora.load_lora_checkpoint`) and the adapter writer check what they handle with
the functions here, so a file that one of them accepts is never refused, or reinterpreted,
by another.

* :func:`check_adapter`: the tensors (string keys, :data:`DTYPES`, at most
  :data:`MAX_TENSORS`), the factor pairs (2-D, ``lora_A`` of the config's rank, ``lora_B``
  agreeing with it for the layer's kind and groups), the layer records (``metadata["layers"]``:
  one per adapted layer, a known kind, ``groups`` a positive int) and the blend record
  (``metadata["blend"]``) a blend writes.
* :func:`check_rvc_decoder_args`: the decoder hyper-parameters of an RVC export's ``config``
  list, before anything is built from them (positive ints, not bools or floats, within caps
  that keep a hostile file from asking for gigabytes).

Errors are ``ValueError`` in one line, prefixed with ``where`` (the caller names the path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .ops.spec import KINDS, spec_of_kind

__all__ = [
    "KINDS",
    "MAX_CHANNELS",
    "MAX_TENSORS",
    "check_adapter",
    "check_rvc_decoder_args",
    "layer_records_of",
]

#: The dtypes an adapter's tensors may have (float8 and complex would not merge or check as floats do).
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: At most this many tensors in an adapter file (an RVC decoder adapter holds a few hundred).
MAX_TENSORS = 100_000
#: The largest channel count an RVC config may declare (shipped configs use 512).
MAX_CHANNELS = 8192
_MAX_STAGES = 16
_MAX_RATE = 1024
_MAX_KERNEL = 4096
_FACTORS = ("lora_A", "lora_B")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def layer_records_of(where: str, metadata: Any, layers: Mapping[str, Any]) -> dict[str, tuple[str, int]] | None:
    """``{layer: (kind, groups)}`` from ``metadata["layers"]``, checked against the adapted ``layers``.

    ``None`` when the metadata holds no layer records (a format-1 file, or one written
    without metadata). Every adapted layer needs a record; records of other layers are ignored.
    """
    if not isinstance(metadata, Mapping) or "layers" not in metadata:
        return None
    saved = metadata["layers"]
    if not isinstance(saved, Mapping):
        raise ValueError(
            f"{where}: metadata 'layers' is a {type(saved).__name__}; expected a dict of layer records "
            "{name: {'kind', 'groups'}}"
        )
    out: dict[str, tuple[str, int]] = {}
    for name, rec in saved.items():
        if not isinstance(rec, Mapping):
            raise ValueError(
                f"{where}: layer record of {name!r} is {rec!r}; expected {{'kind': one of {KINDS}, 'groups': int >= 1}}"
            )
        kind, groups = rec.get("kind"), rec.get("groups", 1)
        if kind not in KINDS or isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(
                f"{where}: layer record of {name!r} is {dict(rec)!r}; expected kind in {KINDS} and groups an int >= 1"
            )
        if not spec_of_kind(kind).grouped and groups != 1:
            raise ValueError(
                f"{where}: layer record of {name!r} says a {kind} layer with groups={groups}; "
                f"{kind} layers have groups=1"
            )
        out[str(name)] = (kind, groups)
    missing = sorted(set(layers) - set(out))
    if missing:
        raise ValueError(
            f"{where}: layers {missing[:3]} have factors but no layer record (metadata 'layers' must "
            "record every adapted layer)"
        )
    return out


def _check_pair(where: str, name: str, A: Tensor, B: Tensor, r: int, record: tuple[str, int] | None) -> None:
    a, b = _shape(A), _shape(B)
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"{where}: {name}'s factors have shapes {a}, {b}; LoRA factors are 2-D")
    if a[0] != r:
        raise ValueError(f"{where}: {name + '.lora_A'!r} has rank {a[0]} (shape {a}), the config says r={r}")
    if min(a + b) < 1:
        raise ValueError(f"{where}: {name}'s factors have shapes {a}, {b}; every dimension must be >= 1")
    if record is None:  # no record: lora_B must fit one of the kinds
        if b[0] != r and r % b[1] != 0:
            raise ValueError(
                f"{where}: {name + '.lora_B'!r} has shape {b}, which fits rank r={r} for no layer kind "
                f"(expected (out, r/groups) or ({r}, out/groups*k))"
            )
        return
    kind, g = record
    if r % g:
        raise ValueError(f"{where}: {name}: rank r={r} is not a multiple of its layer's groups={g}")
    why = spec_of_kind(kind).lora_B_error(b, r, g)
    if why is not None:
        raise ValueError(f"{where}: {name + '.lora_B'!r} has shape {b}; {why}")


def _is_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _check_blend_record(where: str, blend: Any, layers: Mapping[str, Any]) -> None:
    expected = (
        "{'sources': [{'name', 'weight', 'r', 'lora_alpha', 'base_fingerprint'}], 'rank': int or None, "
        "'errors': {layer: number}}"
    )
    if not isinstance(blend, Mapping):
        raise ValueError(f"{where}: metadata 'blend' is a {type(blend).__name__}; expected {expected}")
    sources = blend.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, Mapping) for s in sources):
        raise ValueError(f"{where}: blend record 'sources' is {sources!r:.80}; expected a list of dicts")
    for i, s in enumerate(sources):
        if not _is_number(s.get("weight", 0.0)) or not isinstance(s.get("name", ""), str):
            raise ValueError(
                f"{where}: blend record sources[{i}] is {dict(s)!r:.120}; expected a str 'name' and a "
                "finite number 'weight'"
            )
        for key in ("r", "lora_alpha"):
            if key in s and s[key] is not None and not _is_number(s[key]):
                raise ValueError(f"{where}: blend record sources[{i}][{key!r}] is {s[key]!r:.40}; expected a number")
    rank = blend.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"{where}: blend record 'rank' is {rank!r:.40}; expected None or an int >= 1")
    for field in ("errors", "cast_errors"):
        table = blend.get(field, {})
        if not isinstance(table, Mapping) or not all(
            isinstance(k, str) and _is_number(v) and v >= 0 for k, v in table.items()
        ):
            raise ValueError(f"{where}: blend record {field!r} is {table!r:.80}; expected {{layer: number >= 0}}")


def check_adapter(where: str, weights: Any, config: Any, metadata: Any) -> dict[str, tuple[str, int]] | None:
    """Check an adapter's parts as every reader and the writer need them; returns its layer records (or ``None``).

    ``weights``: ``{key: tensor}``; ``config``: a :class:`rvclora.LoRAConfig`; ``metadata``:
    the file's metadata dict or ``None``. Raises ``ValueError`` (``TypeError`` for a wrong
    type) in one line starting with ``where``.
    """
    from .checkpoint import _check_adapter_content
    from .config import LoRAConfig

    if not isinstance(config, LoRAConfig):
        raise TypeError(f"{where}: config must be a LoRAConfig, got {type(config).__name__}")
    if not isinstance(weights, Mapping):
        raise TypeError(f"{where}: weights must be a dict of tensors, got {type(weights).__name__}")
    if len(weights) > MAX_TENSORS:
        raise ValueError(f"{where}: holds {len(weights)} tensors; an adapter holds at most {MAX_TENSORS} (MAX_TENSORS)")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"{where}: metadata is a {type(metadata).__name__}, expected a dict")
    record = metadata.get("modules_to_save") if isinstance(metadata, Mapping) else None
    _check_adapter_content(where, dict(weights), config, saved_shapes=record)
    for key, t in weights.items():
        if t.dtype not in DTYPES:
            raise ValueError(
                f"{where}: {key!r} has dtype {str(t.dtype).replace('torch.', '')}; adapter tensors are "
                "float16, bfloat16, float32 or float64"
            )
    layers: dict[str, dict[str, Tensor]] = {}
    for key, t in weights.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in _FACTORS:
            layers.setdefault(owner, {})[leaf] = t
    records = layer_records_of(where, metadata, layers)
    for name, pair in layers.items():
        _check_pair(where, name, pair["lora_A"], pair["lora_B"], config.r, None if records is None else records[name])
    if isinstance(metadata, Mapping) and "blend" in metadata:
        _check_blend_record(where, metadata["blend"], layers)
    return records


# --------------------------------------------------------------------------- RVC configs


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r:.60} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _ints(name: str, value: Any, lo: int, hi: int, max_len: int = _MAX_STAGES) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_len:
        raise ValueError(f"{name} must be a list of 1..{max_len} ints, got {value!r:.80}")
    return tuple(_int(f"{name}[{i}]", v, lo, hi) for i, v in enumerate(value))


def check_rvc_decoder_args(args: Any) -> dict[str, Any]:
    """The decoder hyper-parameters of an RVC export's ``config`` list (18 synthesizer arguments), checked.

    Returns ``{"upsample_rates", "upsample_kernel_sizes", "segment_frames", "inter_channels",
    "upsample_initial_channel", "resblock", "resblock_kernel_sizes", "resblock_dilation_sizes",
    "gin_channels"}``. Raises ``ValueError`` naming the first argument that RVC's decoder could
    not be built or run with: ints that are bools, floats, zero or negative; stage lists of
    different lengths; a kernel shorter than its stride; channels that the stages would halve
    below 1 or beyond :data:`MAX_CHANNELS`; an even resblock kernel; a resblock type other than ``"1"``.
    """
    if not isinstance(args, (list, tuple)) or len(args) != 18:
        n = len(args) if isinstance(args, (list, tuple)) else type(args).__name__
        raise ValueError(f"config must be RVC's list of 18 synthesizer arguments, got {n}")
    rates = _ints("upsample_rates (config[12])", args[12], 1, _MAX_RATE)
    kernels = _ints("upsample_kernel_sizes (config[14])", args[14], 1, _MAX_KERNEL)
    if len(rates) != len(kernels):
        raise ValueError(
            f"upsample_rates {list(rates)} and upsample_kernel_sizes {list(kernels)} must have equal length"
        )
    for i, (u, k) in enumerate(zip(rates, kernels)):
        if k < u:
            raise ValueError(
                f"upsample_kernel_sizes[{i}]={k} is shorter than upsample_rates[{i}]={u}; the stage's "
                "padding (k - u) // 2 would be negative"
            )
    initial = _int("upsample_initial_channel (config[13])", args[13], 1, MAX_CHANNELS)
    if initial % (2 ** len(rates)):
        raise ValueError(
            f"upsample_initial_channel (config[13])={initial} must be divisible by 2^{len(rates)} (it "
            f"is halved at each of the {len(rates)} stages)"
        )
    resblock = args[9]
    if isinstance(resblock, bool) or str(resblock) != "1":
        raise ValueError(
            f"resblock (config[9]) must be '1' (the type every shipped RVC config uses), got {resblock!r:.40}"
        )
    rk = _ints("resblock_kernel_sizes (config[10])", args[10], 1, _MAX_KERNEL)
    for i, k in enumerate(rk):
        if k % 2 == 0:
            raise ValueError(
                f"resblock_kernel_sizes[{i}] (config[10])={k} must be odd (a resblock keeps the length of its input)"
            )
    rd = args[11]
    if not isinstance(rd, (list, tuple)) or len(rd) != len(rk):
        raise ValueError(
            f"resblock_dilation_sizes (config[11]) must be a list of {len(rk)} lists (one per resblock "
            f"kernel), got {rd!r:.80}"
        )
    dil = tuple(_ints(f"resblock_dilation_sizes[{i}] (config[11])", d, 1, _MAX_KERNEL) for i, d in enumerate(rd))
    return {
        "upsample_rates": rates,
        "upsample_kernel_sizes": kernels,
        "segment_frames": _int("segment_size (config[1])", args[1], 1, 1 << 20),
        "inter_channels": _int("inter_channels (config[2])", args[2], 1, MAX_CHANNELS),
        "upsample_initial_channel": initial,
        "resblock": "1",
        "resblock_kernel_sizes": rk,
        "resblock_dilation_sizes": dil,
        "gin_channels": _int("gin_channels (config[16])", args[16], 1, MAX_CHANNELS),
    }
