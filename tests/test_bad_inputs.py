"""A sweep of bad and careless inputs: every one is refused with one clear line, or handled as documented.

Each case is ``(class, id, action, expected exception, message pattern)``. The classes:

* ``finite``: merges (in memory and to file) that would write NaN/Inf, in the dtype written;
* ``base``: adapters applied to another base model (its fingerprint);
* ``model``: files checked against the model (rank, alpha, bias mode, config, second injection);
* ``content``: what an adapter may hold (only LoRA factors and its bias mode's biases, floats);
* ``optimizer``: optimizer state that could not be read back safely;
* ``rvc``: RVC exports that contradict themselves;
* ``format``: formats judged by content, named in errors;
* ``path``: output paths validated before any work;
* ``message``: one line, naming the user's path and what was expected.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rvclora import (
    LoRAConfig,
    extract_lora_weights,
    inject_lora,
    load_lora_checkpoint,
    load_lora_weights,
    merge_lora_weights,
    merged_state_dict,
    save_lora_checkpoint,
)
from rvclora.checkpoint import read_lora_file, write_lora_file
from rvclora.inject import randomize_lora_
from rvclora.io import RVCLoRAWarning
from rvclora.models.rvc import build_generator, get_generator_config
from rvclora.rvc_files import AdapterFileError, RVCFileError, load_rvc_file, merge_adapter, write_exported_model

CFG = get_generator_config("40k")
LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=["ups.0", "resblocks.0"])


def small(base_seed: int = 0, bias: str = "none", r: int = 2, alpha: float = 4) -> tuple[nn.Module, LoRAConfig]:
    torch.manual_seed(base_seed)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.utils.weight_norm(nn.ConvTranspose1d(8, 6, 4, 2, padding=1)), nn.Linear(7, 5)
    )
    cfg = LoRAConfig(r=r, lora_alpha=alpha, target_modules=["1", "2"], bias=bias)
    inject_lora(model, cfg)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    return model, cfg


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("bad")
    emb = {"emb_g.weight": 0.1 * torch.randn(1, 256, generator=torch.Generator().manual_seed(1))}
    write_exported_model(build_generator(CFG, seed=0), d / "base.pth", CFG, extra_weights=emb)
    adapted = inject_lora(build_generator(CFG, seed=0), LORA)
    randomize_lora_(adapted, relative_norm=0.1, seed=2)
    save_lora_checkpoint(adapted, d / "adapter.safetensors")
    save_lora_checkpoint(adapted, d / "adapter.pth")
    model, cfg = small()
    save_lora_checkpoint(model, d / "small.pth")
    return {
        "dir": d,
        "cpt": torch.load(d / "base.pth", weights_only=True),
        "weights": extract_lora_weights(adapted),
        "small": model,
        "small_cfg": cfg,
    }


# --------------------------------------------------------------------------- helpers building bad files


def _adapter_with(env: dict, name: str, change: Callable[[dict], None], suffix: str = ".pth") -> Path:
    w = {k: v.clone() for k, v in env["weights"].items()}
    change(w)
    path = env["dir"] / f"{name}{suffix}"
    payload = {
        "format_version": 2,
        "config": LORA.to_dict(),
        "lora_weights": w,
        "epoch": None,
        "base_fingerprint": read_lora_file(env["dir"] / "adapter.pth")["base_fingerprint"],
        "metadata": None,
        "optimizer": None,
    }
    torch.save(payload, path)
    return path


def _export_with(env: dict, name: str, change: Callable[[dict], None]) -> Path:
    cpt = {k: (dict(v) if k == "weight" else (list(v) if k == "config" else v)) for k, v in env["cpt"].items()}
    change(cpt)
    path = env["dir"] / f"{name}.pth"
    torch.save(cpt, path)
    return path


def _merge(
    env: dict, base: Path | str | None = None, adapter: Path | str | None = None, out: str = "out.pth", **kw: Any
) -> Callable[[], Any]:
    d = env["dir"]
    target = d / out if out else out
    return lambda: merge_adapter(base or d / "base.pth", adapter or d / "adapter.safetensors", target, **kw)


def _set(key: str, fn: Callable[[torch.Tensor], None]) -> Callable[[dict], None]:
    def change(w: dict) -> None:
        fn(w[key])

    return change


def _nan(t: torch.Tensor) -> None:
    t.view(-1)[3] = float("nan")


def _inf(t: torch.Tensor) -> None:
    t.view(-1)[0] = float("-inf")


def _corrupt_safetensors(env: dict) -> Path:
    """Overwrite a stretch of the data region of a copy of the adapter with 0xFF bytes (NaN in any float)."""
    src = (env["dir"] / "adapter.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    data = bytearray(src)
    start = 8 + n + 64
    data[start : start + 64] = b"\xff" * 64
    path = env["dir"] / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    return path


def _half_model() -> nn.Module:
    model = nn.Sequential(nn.Conv1d(4, 4, 3)).half()
    inject_lora(model, LoRAConfig(r=1, lora_alpha=1, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_A.fill_(300.0)
        model[0].lora_B.fill_(300.0)  # ΔW = 9e4 > 65504
    return model


def _save_opt(env: dict, suffix: str, state: dict) -> Callable[[], None]:
    return lambda: save_lora_checkpoint(env["small"], env["dir"] / f"opt{suffix}", optimizer_state=state)


# --------------------------------------------------------------------------- the cases

CASES: list[tuple[str, str, Callable[[dict], Callable[[], Any]], type, str]] = [
    # finite: merges refuse what is not finite in the dtype written, naming the key and why
    (
        "finite",
        "adapter-nan",
        lambda e: _merge(e, adapter=_adapter_with(e, "nan", _set("ups.0.lora_B", _nan))),
        RVCFileError,
        r"nan\.pth: refusing to merge: the adapter's 'ups\.0\.lora_B' is not finite \(1 NaN of",
    ),
    (
        "finite",
        "adapter-inf",
        lambda e: _merge(e, adapter=_adapter_with(e, "inf", _set("ups.0.lora_A", _inf))),
        RVCFileError,
        r"'ups\.0\.lora_A' is not finite \(1 Inf",
    ),
    (
        "finite",
        "fp16-overflow",
        lambda e: _merge(
            e, adapter=_adapter_with(e, "big", _set("ups.0.lora_B", lambda t: t.view(-1).__setitem__(0, 1e6)))
        ),
        RVCFileError,
        r"merged 'dec\.ups\.0\.weight_[gv]' overflows float16 \(largest \|value\| .* > 65504\)",
    ),
    (
        "finite",
        "corrupt-safetensors",
        lambda e: _merge(e, adapter=_corrupt_safetensors(e)),
        RVCFileError,
        r"corrupt\.safetensors: refusing to merge: the adapter's '\S+' is not finite",
    ),
    (
        "finite",
        "base-nan",
        lambda e: _merge(
            e,
            base=_export_with(
                e,
                "base_nan",
                lambda c: c["weight"].__setitem__("dec.ups.0.weight_v", _with_nan(c["weight"]["dec.ups.0.weight_v"])),
            ),
        ),
        RVCFileError,
        r"base_nan\.pth: refusing to merge: the base model's 'dec\.ups\.0\.weight_v' is already not finite",
    ),
    (
        "finite",
        "base-inf-outside-decoder",
        lambda e: _merge(
            e,
            base=_export_with(
                e,
                "base_inf",
                lambda c: c["weight"].__setitem__("emb_g.weight", torch.full((1, 256), float("inf")).half()),
            ),
        ),
        RVCFileError,
        r"the base model's 'emb_g\.weight' is already not finite \(256 Inf",
    ),
    (
        "finite",
        "in-memory-merge-half",
        lambda e: lambda: merge_lora_weights(_half_model()),
        ValueError,
        r"merge_lora_weights: merged '0\.weight' would not be finite .*nothing was merged",
    ),
    (
        "finite",
        "merged-state-dict",
        lambda e: lambda: merged_state_dict(_half_model()),
        ValueError,
        r"merged_state_dict: merged '0\.weight' is not finite",
    ),
    (
        "finite",
        "write-export-overflow",
        lambda e: lambda: write_exported_model(_scaled(build_generator(CFG, seed=0), 1e5), e["dir"] / "huge.pth", CFG),
        ValueError,
        r"huge\.pth: refusing to write 'dec\.conv_pre\.weight': overflows float16 \(largest",
    ),
    (
        "finite",
        "save-nan-adapter",
        lambda e: lambda: save_lora_checkpoint(_nan_model(), e["dir"] / "n.pth"),
        ValueError,
        r"n\.pth': refusing to save '1\.lora_B': not finite \(1 NaN",
    ),
    (
        "finite",
        "load-nan-weights",
        lambda e: (
            lambda: load_lora_weights(
                small()[0], {**extract_lora_weights(e["small"]), "2.lora_A": torch.full((2, 7), float("nan"))}
            )
        ),
        ValueError,
        r"'2\.lora_A' is not finite \(14 NaN",
    ),
    # base: an adapter knows its base
    (
        "base",
        "merge-other-voice",
        lambda e: _merge(e, base=_other_base(e)),
        RVCFileError,
        r"trained on another base model \(fingerprint fp16-sha256:\w+, base model .*other\.pth has ",
    ),
    (
        "base",
        "load-other-base",
        lambda e: lambda: load_lora_checkpoint(small(base_seed=9)[0], e["dir"] / "small.pth"),
        ValueError,
        r"small\.pth': the adapter was trained on another base model .*force=True",
    ),
    (
        "base",
        "forged-fingerprint",
        lambda e: _call(read_lora_file, _forge_fp(e)),
        ValueError,
        r"base_fingerprint 'not-a-fingerprint' is not an rvclora fingerprint",
    ),
    # model: files are checked against the model
    (
        "model",
        "load-alpha-mismatch",
        lambda e: lambda: load_lora_checkpoint(small(alpha=16)[0], e["dir"] / "small.pth"),
        ValueError,
        r"the file has r=2, lora_alpha=4, but the model's layer '1' was injected with r=2, lora_alpha=16",
    ),
    (
        "model",
        "load-rank-mismatch",
        lambda e: lambda: load_lora_checkpoint(small(r=4, alpha=4)[0], e["dir"] / "small.pth"),
        ValueError,
        r"the file has r=2, .* injected with r=4",
    ),
    (
        "model",
        "load-bias-mismatch",
        lambda e: lambda: load_lora_checkpoint(small(bias="all")[0], e["dir"] / "small.pth"),
        ValueError,
        r"the file has bias='none', the model was injected with bias='all'",
    ),
    (
        "model",
        "save-alpha-mismatch",
        lambda e: (
            lambda: save_lora_checkpoint(
                e["small"], e["dir"] / "s.pth", LoRAConfig(r=2, lora_alpha=8, target_modules=["1", "2"])
            )
        ),
        ValueError,
        r"layer '1' has r=2, lora_alpha=4; the config says r=2, lora_alpha=8",
    ),
    (
        "model",
        "save-targets-too-few",
        lambda e: (
            lambda: save_lora_checkpoint(
                e["small"], e["dir"] / "s.pth", LoRAConfig(r=2, lora_alpha=4, target_modules=["1"])
            )
        ),
        ValueError,
        r"LoRA layer '2' is not selected by the config's target_modules \['1'\]",
    ),
    (
        "model",
        "save-targets-too-many",
        lambda e: (
            lambda: save_lora_checkpoint(
                e["small"], e["dir"] / "s.pth", LoRAConfig(r=2, lora_alpha=4, target_modules=["0", "1", "2"])
            )
        ),
        ValueError,
        r"select '0', which the model does not adapt",
    ),
    (
        "model",
        "save-drops-trained-bias",
        lambda e: (
            lambda: save_lora_checkpoint(
                small(bias="all")[0], e["dir"] / "s.pth", LoRAConfig(r=2, lora_alpha=4, target_modules=["1", "2"])
            )
        ),
        ValueError,
        r"config bias='none' but the model was injected with bias='all'",
    ),
    (
        "model",
        "save-trainable-not-saved",
        lambda e: lambda: save_lora_checkpoint(_unfrozen(), e["dir"] / "s.pth"),
        ValueError,
        r"parameter '0\.bias' is trainable but bias='none' does not save it",
    ),
    (
        "model",
        "inject-twice",
        lambda e: lambda: inject_lora(small()[0], LoRAConfig(r=2, target_modules=["0"])),
        ValueError,
        r"inject_lora: the model is already injected \(2 LoRA layers, e\.g\. \['1', '2'\]\)",
    ),
    (
        "model",
        "save-no-config",
        lambda e: lambda: save_lora_checkpoint(nn.Linear(2, 2), e["dir"] / "s.pth"),
        ValueError,
        r"s\.pth': the model has no rvclora_config",
    ),
    # content: an adapter holds only LoRA factors and its bias mode's biases, as floats
    (
        "content",
        "base-weight-in-adapter",
        lambda e: _call(
            read_lora_file,
            _adapter_with(e, "post", lambda w: w.__setitem__("conv_post.weight", torch.full((1, 32, 7), 7.0))),
        ),
        ValueError,
        r"post\.pth' is not a readable .*'conv_post\.weight' is not a LoRA factor, a bias that bias='none'",
    ),
    (
        "content",
        "base-weight-merge",
        lambda e: _merge(
            e,
            adapter=_adapter_with(e, "post2", lambda w: w.__setitem__("conv_post.weight", torch.full((1, 32, 7), 7.0))),
        ),
        ValueError,
        r"'conv_post\.weight' is not a LoRA factor",
    ),
    (
        "content",
        "base-weight-load-weights",
        lambda e: lambda: load_lora_weights(e["small"], {"1.weight": torch.zeros(8, 6, 4)}, strict=False),
        KeyError,
        r"'1\.weight' is a base weight, not a LoRA factor or bias",
    ),
    (
        "content",
        "bias-in-none-mode",
        lambda e: _call(
            read_lora_file, _adapter_with(e, "bias", lambda w: w.__setitem__("ups.0.bias", torch.zeros(256)))
        ),
        ValueError,
        r"'ups\.0\.bias' is not a LoRA factor, a bias that bias='none' trains",
    ),
    (
        "content",
        "integer-factor-file",
        lambda e: _call(
            read_lora_file,
            _adapter_with(e, "int", lambda w: w.__setitem__("ups.0.lora_A", w["ups.0.lora_A"].to(torch.int32))),
        ),
        ValueError,
        r"'ups\.0\.lora_A' has dtype int32; LoRA factors and biases must be floating point",
    ),
    (
        "content",
        "integer-factor-load-weights",
        lambda e: (
            lambda: load_lora_weights(e["small"], {"1.lora_A": torch.ones(2, 32, dtype=torch.int64)}, strict=False)
        ),
        TypeError,
        r"'1\.lora_A' has dtype int64",
    ),
    (
        "content",
        "unpaired-factor",
        lambda e: _call(read_lora_file, _adapter_with(e, "unpaired", lambda w: w.pop("ups.0.lora_B"))),
        ValueError,
        r"layer 'ups\.0' has no lora_B \(LoRA factors come in pairs\)",
    ),
    (
        "content",
        "rank-vs-config",
        lambda e: _call(
            read_lora_file, _adapter_with(e, "rank", lambda w: w.__setitem__("ups.0.lora_A", torch.zeros(3, 4096)))
        ),
        ValueError,
        r"'ups\.0\.lora_A' has rank 3, the config says r=2",
    ),
    (
        "content",
        "three-d-factor",
        lambda e: _call(
            read_lora_file, _adapter_with(e, "threed", lambda w: w.__setitem__("ups.0.lora_A", torch.zeros(2, 4096, 1)))
        ),
        ValueError,
        r"'ups\.0\.lora_A' has shape \(2, 4096, 1\); LoRA factors are 2-D",
    ),
    (
        "content",
        "weights-not-a-dict",
        lambda e: _call(read_lora_file, _raw(e, "list", lora_weights=[1, 2])),
        ValueError,
        r"list\.pth' is not a readable .*'lora_weights' is a list, expected a dict of tensors",
    ),
    (
        "content",
        "non-tensor-value",
        lambda e: _call(read_lora_file, _raw(e, "str", lora_weights={"a.lora_A": "x"})),
        ValueError,
        r"'a\.lora_A' must be a tensor, got str",
    ),
    (
        "content",
        "config-targets-none",
        lambda e: _call(read_lora_file, _raw(e, "cfgnone", config={**LORA.to_dict(), "target_modules": None})),
        ValueError,
        r"its config is invalid: LoRAConfig\.target_modules must be a list of module names .*None",
    ),
    (
        "content",
        "config-unknown-field",
        lambda e: _call(read_lora_file, _raw(e, "cfgx", config={"r": 2, "rank": 3})),
        ValueError,
        r"its config is invalid: .*unknown fields \['rank'\]",
    ),
    (
        "content",
        "config-not-a-dict",
        lambda e: _call(read_lora_file, _raw(e, "cfgl", config=[2, 4])),
        ValueError,
        r"its config is invalid: LoRAConfig\.from_dict expects a dict, got list",
    ),
    (
        "content",
        "version-string",
        lambda e: _call(read_lora_file, _raw(e, "ver", format_version="2")),
        ValueError,
        r"has format_version '2'; this rvclora reads versions \[1, 2\]",
    ),
    (
        "content",
        "metadata-not-a-dict",
        lambda e: _call(read_lora_file, _raw(e, "meta", metadata=[1])),
        ValueError,
        r"metadata is a list, expected a dict",
    ),
    (
        "content",
        "write-weights-not-dict",
        lambda e: lambda: write_lora_file(e["dir"] / "w.pth", [1], LORA, base_fingerprint=None),
        TypeError,
        r"w\.pth': weights must be a dict of tensors, got list",
    ),
    # optimizer: state that cannot be read back safely is refused at save, in both formats
    (
        "optimizer",
        "numpy-pth",
        lambda e: _save_opt(e, ".pth", {"state": {0: {"m": np.zeros(3)}}, "param_groups": []}),
        TypeError,
        r"optimizer state holds a numpy\.ndarray at s\.\S+; only tensors, dicts",
    ),
    (
        "optimizer",
        "numpy-safetensors",
        lambda e: _save_opt(e, ".safetensors", {"state": {0: {"m": np.zeros(3)}}}),
        TypeError,
        r"optimizer state holds a numpy\.ndarray",
    ),
    (
        "optimizer",
        "object-pth",
        lambda e: _save_opt(e, ".pth", {"state": {}, "param_groups": [{"fn": len}]}),
        TypeError,
        r"optimizer state holds a builtins\.builtin_function_or_method",
    ),
    (
        "optimizer",
        "set-pth",
        lambda e: _save_opt(e, ".pth", {"state": {}, "param_groups": [{"ids": {1, 2}}]}),
        TypeError,
        r"optimizer state holds a builtins\.set",
    ),
    ("optimizer", "not-a-dict", lambda e: _save_opt(e, ".pth", [1, 2]), TypeError, r"optimizer_state must be a dict"),
    # rvc: exports that contradict themselves
    (
        "rvc",
        "sr-vs-config",
        lambda e: _call(load_rvc_file, _export_with(e, "sr48", lambda c: c.__setitem__("sr", "48k"))),
        RVCFileError,
        r"sr48\.pth: sr '48k' but its config's sampling rate is 40000",
    ),
    (
        "rvc",
        "version-v9",
        lambda e: _call(load_rvc_file, _export_with(e, "v9", lambda c: c.__setitem__("version", "v9"))),
        RVCFileError,
        r"v9\.pth: version 'v9'; expected one of \['v1', 'v2'\]",
    ),
    (
        "rvc",
        "f0-flag-2",
        lambda e: _call(load_rvc_file, _export_with(e, "f02", lambda c: c.__setitem__("f0", 2))),
        RVCFileError,
        r"f0 2; expected 0 or 1",
    ),
    (
        "rvc",
        "f0-flag-vs-weights",
        lambda e: _call(load_rvc_file, _export_with(e, "f00", lambda c: c.__setitem__("f0", 0))),
        RVCFileError,
        r"f0=0 but the decoder has the harmonic source \(m_source\)",
    ),
    (
        "rvc",
        "48k-config-40k-weights",
        lambda e: _call(load_rvc_file, _export_with(e, "cfg48", lambda c: c.__setitem__("config", _config48(c)))),
        RVCFileError,
        r"cfg48\.pth: sr '40k' but its config's sampling rate is 48000",
    ),
    (
        "rvc",
        "48k-label-and-config-40k-weights",
        lambda e: _call(
            load_rvc_file,
            _export_with(e, "all48", lambda c: (c.__setitem__("config", _config48(c)), c.__setitem__("sr", "48k"))),
        ),
        RVCFileError,
        r"all48\.pth: .*(do not fit its config|has shape .* but its config) \(v1-48k",
    ),
    (
        "rvc",
        "missing-key",
        lambda e: _call(load_rvc_file, _export_with(e, "miss", lambda c: c["weight"].pop("dec.ups.1.weight_g"))),
        RVCFileError,
        r"decoder keys do not fit its config .*missing \['dec\.ups\.1\.weight_g'\]",
    ),
    (
        "rvc",
        "extra-key",
        lambda e: _call(
            load_rvc_file,
            _export_with(e, "extra", lambda c: c["weight"].__setitem__("dec.ups.9.weight", torch.zeros(1))),
        ),
        RVCFileError,
        r"unexpected \['dec\.ups\.9\.weight'\]",
    ),
    (
        "rvc",
        "lora-in-export",
        lambda e: _call(
            load_rvc_file,
            _export_with(e, "lora", lambda c: c["weight"].__setitem__("dec.ups.0.lora_A", torch.zeros(2, 2))),
        ),
        RVCFileError,
        r"holds LoRA factors .* merge the adapter",
    ),
    (
        "rvc",
        "checkpoint-as-base",
        lambda e: _merge(e, base=_checkpoint(e)),
        RVCFileError,
        r"G_1\.pth: its weights are not those of any shipped RVC synthesizer",
    ),
    (
        "rvc",
        "config-too-short",
        lambda e: _call(load_rvc_file, _export_with(e, "short", lambda c: c["config"].pop())),
        RVCFileError,
        r"short\.pth: config must be RVC's list of 18 synthesizer arguments, got 17",
    ),
    # format: judged by content, named in errors
    (
        "format",
        "safetensors-as-base",
        lambda e: _call(load_rvc_file, _copy(e, "adapter.safetensors", "looks.pth")),
        AdapterFileError,
        r"looks\.pth: a safetensors file \(an rvclora adapter\?\), not an RVC model file",
    ),
    (
        "format",
        "merge-to-safetensors",
        lambda e: _merge(e, out="m.safetensors"),
        ValueError,
        r"'.*m\.safetensors': an RVC model file is a torch\.save file, .* not \.safetensors",
    ),
    (
        "format",
        "export-to-safetensors",
        lambda e: lambda: write_exported_model(build_generator(CFG, seed=0), e["dir"] / "x.safetensors", CFG),
        ValueError,
        r"x\.safetensors'.*name it \.pth",
    ),
    (
        "format",
        "zip-not-torch",
        lambda e: _call(read_lora_file, _zip(e)),
        ValueError,
        r"plain\.zip' is not a readable .*a zip archive that is not a torch\.save file",
    ),
    (
        "format",
        "empty-adapter",
        lambda e: _call(read_lora_file, _bytes(e, "empty.pth", b"")),
        ValueError,
        r"empty\.pth' is not a readable rvclora LoRA checkpoint: it is an empty file; expected",
    ),
    (
        "format",
        "text-adapter",
        lambda e: _call(read_lora_file, _bytes(e, "text.safetensors", b"101\n")),
        ValueError,
        r"text\.safetensors' is not a readable .*: it is a text file",
    ),
    (
        "format",
        "truncated-safetensors",
        lambda e: _call(read_lora_file, _truncated(e, "adapter.safetensors")),
        ValueError,
        r"cut\.safetensors' is not a readable rvclora LoRA checkpoint",
    ),
    (
        "format",
        "truncated-pth",
        lambda e: _call(read_lora_file, _truncated(e, "adapter.pth")),
        ValueError,
        r"cut\.pth' is not a readable rvclora LoRA checkpoint",
    ),
    (
        "format",
        "safetensors-without-metadata",
        lambda e: _call(read_lora_file, _plain_safetensors(e)),
        ValueError,
        r"a safetensors file without rvclora's metadata",
    ),
    (
        "format",
        "rvc-model-as-adapter",
        lambda e: _merge(e, adapter=e["dir"] / "base.pth"),
        ValueError,
        r"base\.pth' is not a readable .*not a dict with 'format_version' and 'lora_weights'",
    ),
    # path: validated before any work (the base given here does not even exist)
    (
        "path",
        "empty-output",
        lambda e: _merge(e, base="missing.pth", out=""),
        ValueError,
        r"output path is empty; expected a file name",
    ),
    (
        "path",
        "directory-output",
        lambda e: _merge(e, base="missing.pth", out="."),
        IsADirectoryError,
        r"is a directory; expected a file name",
    ),
    (
        "path",
        "dev-null-output",
        lambda e: lambda: merge_adapter("missing.pth", "x", "/dev/null", overwrite=True),
        ValueError,
        r"output '/dev/null' exists and is not a regular file",
    ),
    (
        "path",
        "missing-dir-output",
        lambda e: _merge(e, base="missing.pth", out="nope/out.pth"),
        FileNotFoundError,
        r"directory '.*nope' does not exist",
    ),
    (
        "path",
        "output-is-input",
        lambda e: _merge(e, out="base.pth", overwrite=True),
        ValueError,
        r"is the base model file; write to a new path",
    ),
    (
        "path",
        "symlink-to-input",
        lambda e: _merge(e, out=_symlink(e)),
        ValueError,
        r"link\.pth' is the base model file",
    ),
    (
        "path",
        "exists-no-overwrite",
        lambda e: _merge(e, base="missing.pth", out="adapter.pth.bak"),
        FileExistsError,
        r"adapter\.pth\.bak' already exists; pass overwrite=True \(--overwrite\)",
    ),
    (
        "path",
        "adapter-dir",
        lambda e: _call(read_lora_file, e["dir"]),
        ValueError,
        r"LoRA checkpoint '.*' is not a regular file",
    ),
    (
        "path",
        "base-dir",
        lambda e: _call(load_rvc_file, e["dir"]),
        RVCFileError,
        r"not a regular file; expected an RVC model file",
    ),
    (
        "path",
        "adapter-output-dir",
        lambda e: lambda: save_lora_checkpoint(e["small"], e["dir"]),
        IsADirectoryError,
        r"adapter '.*' is a directory",
    ),
    # message: blocked pickles name the global, never advise turning safety off
    (
        "message",
        "blocked-global-adapter",
        lambda e: _call(read_lora_file, _evil(e)),
        ValueError,
        r"evil\.pth' is not a readable .*contains pickled code \(\S+\) that the safe loader refused to run",
    ),
    (
        "message",
        "blocked-numpy-export",
        lambda e: _call(load_rvc_file, _export_with(e, "numpy", lambda c: c.__setitem__("info", np.float64(1.0)))),
        RVCFileError,
        r"numpy\.pth: .*contains pickled code \(numpy\.\S+\) that the safe loader refused to run",
    ),
    (
        "message",
        "config-targets-none",
        lambda e: lambda: LoRAConfig(target_modules=None),
        TypeError,
        r"LoRAConfig\.target_modules must be a list of module names \(or one name\), got None",
    ),
    # found in a second sweep beyond the first list
    (
        "path",
        "dangling-symlink-output",
        lambda e: _merge(e, base="missing.pth", out=_dangling(e)),
        ValueError,
        r"dangling\.pth' exists and is not a regular file",
    ),
    ("path", "fifo-base", lambda e: _call(load_rvc_file, _fifo(e)), RVCFileError, r"fifo\.pth: not a regular file"),
    (
        "path",
        "trailing-slash-output",
        lambda e: lambda: save_lora_checkpoint(e["small"], str(e["dir"] / "new") + "/"),
        IsADirectoryError,
        r"new/' is a directory; expected a file name",
    ),
    (
        "model",
        "adapter-targets-absent-from-base",
        lambda e: _merge(e, adapter=_adapter_targets(e)),
        RVCFileError,
        r"targets\.pth: adapter does not fit the decoder of .*match no",
    ),
    (
        "model",
        "epoch-bool",
        lambda e: lambda: save_lora_checkpoint(e["small"], e["dir"] / "s.pth", epoch=True),
        TypeError,
        r"epoch must be an int or None, got True",
    ),
    (
        "content",
        "metadata-int-keys",
        lambda e: (
            lambda: write_lora_file(
                e["dir"] / "w.pth",
                extract_lora_weights(e["small"]),
                e["small_cfg"],
                base_fingerprint=None,
                metadata={1: "a"},
            )
        ),
        TypeError,
        r"metadata must be JSON-safe and survive a round trip",
    ),
    (
        "content",
        "mixed-dec-prefix",
        lambda e: _merge(
            e,
            adapter=_adapter_with(
                e,
                "mixed",
                lambda w: [w.__setitem__("dec.ups.0." + f, w.pop("ups.0." + f)) for f in ("lora_A", "lora_B")],
            ),
        ),
        RVCFileError,
        r"mixed\.pth: adapter keys mix names relative to the decoder \(e\.g\. '.*and to RVC's "
        r"synthesizer \(e\.g\. 'dec\.ups\.0\.lora_",
    ),
    (
        "format",
        "garbage-safetensors-header",
        lambda e: _call(
            read_lora_file, _bytes(e, "hdr.safetensors", struct.pack("<Q", 10) + b"{not json}" + b"\x00" * 20)
        ),
        ValueError,
        r"hdr\.safetensors' is not a readable .*an unrecognised binary file",
    ),
    (
        "format",
        "newer-pickle-protocol",
        lambda e: _call(read_lora_file, _proto(e, 5)),
        ValueError,
        r"proto5\.pth' is not a readable .*written with a newer pickle protocol",
    ),
    (
        "rvc",
        "version-uppercase",
        lambda e: _call(load_rvc_file, _export_with(e, "V1", lambda c: c.__setitem__("version", "V1"))),
        RVCFileError,
        r"version 'V1'; expected one of \['v1', 'v2'\]",
    ),
    (
        "rvc",
        "sr-unknown-label",
        lambda e: _call(load_rvc_file, _export_with(e, "sr44", lambda c: c.__setitem__("sr", "44k"))),
        RVCFileError,
        r"sr44\.pth: sampling rate must be an int \(40000\) or one of",
    ),
    (
        "rvc",
        "weight-not-a-state-dict",
        lambda e: _call(load_rvc_file, _export_with(e, "wlist", lambda c: c.__setitem__("weight", [1, 2]))),
        RVCFileError,
        r"wlist\.pth: field 'weight' must be a state dict",
    ),
]


def _dangling(e: dict) -> str:
    link = e["dir"] / "dangling.pth"
    if not link.is_symlink():
        link.symlink_to(e["dir"] / "nowhere" / "x.pth")
    return "dangling.pth"


def _fifo(e: dict) -> Path:
    path = e["dir"] / "fifo.pth"
    if not path.exists():
        os.mkfifo(path)
    return path


def _adapter_targets(e: dict) -> Path:
    path = _adapter_with(e, "targets", lambda w: None)
    raw = torch.load(path, weights_only=True)
    raw["config"]["target_modules"] = ["enc_p"]
    torch.save(raw, path)
    return path


def _proto(e: dict, protocol: int) -> Path:
    path = _adapter_with(e, f"proto{protocol}", lambda w: None)
    raw = torch.load(path, weights_only=True)
    torch.save(raw, path, pickle_protocol=protocol)
    return path


def _call(fn: Callable, *args: Any, **kw: Any) -> Callable[[], Any]:
    """``fn(*args)`` later: the bad file is made now, so that the action itself writes nothing."""
    return lambda: fn(*args, **kw)


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[7] = float("nan")
    return t


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    with torch.no_grad():
        model.conv_pre.weight.mul_(factor * 1e3)
    return model


def _nan_model() -> nn.Module:
    model, _ = small()
    with torch.no_grad():
        model[1].lora_B.view(-1)[0] = float("nan")
    return model


def _unfrozen() -> nn.Module:
    model, _ = small()
    model[0].bias.requires_grad_(True)
    return model


def _other_base(e: dict) -> Path:
    path = e["dir"] / "other.pth"
    if not path.exists():
        write_exported_model(
            build_generator(CFG, seed=4), path, CFG, extra_weights={"emb_g.weight": torch.zeros(1, 256)}
        )
    return path


def _forge_fp(e: dict) -> Path:
    path = _adapter_with(e, "forged", lambda w: None)
    raw = torch.load(path, weights_only=True)
    raw["base_fingerprint"] = "not-a-fingerprint"
    torch.save(raw, path)
    return path


def _raw(e: dict, name: str, **fields: Any) -> Path:
    raw = {
        "format_version": 2,
        "config": LORA.to_dict(),
        "lora_weights": dict(e["weights"]),
        "epoch": None,
        "base_fingerprint": None,
        "metadata": None,
        "optimizer": None,
        **fields,
    }
    path = e["dir"] / f"{name}.pth"
    torch.save(raw, path)
    return path


def _config48(c: dict) -> list:
    from rvclora.rvc_files import rvc_config_list

    return rvc_config_list(get_generator_config("v1-48k"))


def _checkpoint(e: dict) -> Path:
    path = e["dir"] / "G_1.pth"
    torch.save({"model": dict(e["cpt"]["weight"]), "iteration": 1, "optimizer": None, "learning_rate": 1e-4}, path)
    return path


def _copy(e: dict, src: str, dst: str) -> Path:
    path = e["dir"] / dst
    path.write_bytes((e["dir"] / src).read_bytes())
    return path


def _bytes(e: dict, name: str, data: bytes) -> Path:
    path = e["dir"] / name
    path.write_bytes(data)
    return path


def _zip(e: dict) -> Path:
    import zipfile

    path = e["dir"] / "plain.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    return path


def _truncated(e: dict, src: str) -> Path:
    data = (e["dir"] / src).read_bytes()
    path = e["dir"] / ("cut" + Path(src).suffix)
    path.write_bytes(data[: len(data) // 2])
    return path


def _plain_safetensors(e: dict) -> Path:
    from safetensors.torch import save_file

    path = e["dir"] / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    return path


def _symlink(e: dict) -> str:
    link = e["dir"] / "link.pth"
    if not link.is_symlink():
        link.symlink_to(e["dir"] / "base.pth")
    return "link.pth"


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def _evil(e: dict) -> Path:
    path = e["dir"] / "evil.pth"
    torch.save({"format_version": 2, "lora_weights": {}, "config": {}, "x": _Evil()}, path)
    return path


@pytest.mark.parametrize("cls,name,make,exc,pattern", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_input_is_refused_in_one_clear_line(
    env: dict, cls: str, name: str, make: Callable, exc: type, pattern: str
) -> None:
    (env["dir"] / "adapter.pth.bak").write_bytes(b"keep")
    action = make(env)
    outputs = {p.name: p.lstat().st_mtime_ns for p in env["dir"].iterdir()}
    with pytest.raises(exc) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        action()
    msg = info.value.args[0] if isinstance(info.value, KeyError) else str(info.value)
    assert re.search(pattern, msg), msg
    assert "\n" not in msg, msg
    assert "weights_only` set to `False" not in msg and "Re-running" not in msg, msg
    for p in env["dir"].iterdir():  # nothing written on refusal (and no temporary left behind)
        assert p.name in outputs, f"{p.name} appeared"
        assert p.lstat().st_mtime_ns == outputs[p.name], f"{p.name} was rewritten"


def test_the_sweep_covers_every_class() -> None:
    classes = {c[0] for c in CASES}
    assert classes == {"finite", "base", "model", "content", "optimizer", "rvc", "format", "path", "message"}
    assert len(CASES) >= 90
