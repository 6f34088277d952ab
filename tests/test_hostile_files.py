"""Files that lie: every reader (info, mix, merge, blend, load) checks an adapter or an RVC config the same way.

Each case is a file that today's readers disagreed on, or took for fine: a ``lora_B`` whose rank
disagrees with ``lora_A`` and the config, malformed layer and blend records, an RVC export whose
decoder arguments RVC could not run. Every reader refuses it in one line naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rvclora import LoRAConfig, inject_lora, load_lora_checkpoint, save_lora_checkpoint
from rvclora.blend import blend_adapters
from rvclora.checkpoint import read_lora_file
from rvclora.cli import main
from rvclora.inject import randomize_lora_
from rvclora.models.rvc import GeneratorConfig, build_generator
from rvclora.rvc_files import load_rvc_file, merge_adapter, write_exported_model

# a tiny custom RVC decoder: every reader runs in milliseconds
CFG = GeneratorConfig(
    name="custom",
    version="v2",
    sampling_rate=40000,
    upsample_rates=(2, 2),
    upsample_kernel_sizes=(4, 4),
    segment_frames=8,
    inter_channels=8,
    upsample_initial_channel=16,
    resblock_kernel_sizes=(3,),
    resblock_dilation_sizes=((1, 3, 5),),
    gin_channels=8,
)
LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=["ups", "resblocks"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("hostile_files")
    write_exported_model(build_generator(CFG, seed=0), d / "base.pth", CFG)
    adapted = inject_lora(build_generator(CFG, seed=0), LORA)
    randomize_lora_(adapted, relative_norm=0.1, seed=1)
    save_lora_checkpoint(adapted, d / "good.safetensors")
    save_lora_checkpoint(adapted, d / "good.pth")
    return {"dir": d, "good": read_lora_file(d / "good.pth"), "cpt": torch.load(d / "base.pth", weights_only=True)}


def _adapter(files: dict, name: str, *, weights=None, metadata: Any = "keep", config=None) -> Path:
    good = files["good"]
    w = {k: v.clone() for k, v in (weights or good["weights"]).items()}
    payload = {
        "format_version": 2,
        "config": (config or good["config"]).to_dict(),
        "lora_weights": w,
        "epoch": None,
        "base_fingerprint": good["base_fingerprint"],
        "metadata": good["metadata"] if metadata == "keep" else metadata,
        "optimizer": None,
    }
    path = files["dir"] / f"{name}.pth"
    torch.save(payload, path)
    return path


def _every_reader_refuses(files: dict, path: Path, pattern: str, capsys) -> None:
    d = files["dir"]
    name = path.name
    with pytest.raises(ValueError, match=pattern) as e:
        read_lora_file(path)
    assert name in str(e.value) and "\n" not in str(e.value)
    for argv in (
        ["info", str(path)],
        ["mix", str(path), f"{d}/good.pth:0.5", "-o", f"{d}/mix_out.safetensors", "--overwrite"],
        ["merge", f"{d}/base.pth", str(path), "-o", f"{d}/merge_out.pth", "--overwrite"],
    ):
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and name in err and "Traceback" not in err, (argv, err)
    with pytest.raises(ValueError, match=pattern):
        blend_adapters([path, d / "good.pth"], [0.5, 0.5])
    model = inject_lora(build_generator(CFG, seed=0), LORA)
    with pytest.raises(ValueError, match=pattern):
        load_lora_checkpoint(model, path)


def test_the_good_files_pass_every_reader(files, capsys) -> None:
    d = files["dir"]
    assert main(["info", f"{d}/good.pth"]) == 0
    assert main(["mix", f"{d}/good.pth:0.5", f"{d}/good.safetensors:0.5", "-o", f"{d}/ok.safetensors"]) == 0
    assert main(["merge", f"{d}/base.pth", f"{d}/ok.safetensors", "-o", f"{d}/ok.pth"]) == 0


def test_a_lora_B_whose_rank_disagrees_is_refused_by_every_reader(files, capsys) -> None:
    """info passed it and mix wrote a reinterpreted adapter; only merge refused."""
    w = dict(files["good"]["weights"])
    key = next(k for k in w if k.startswith("resblocks.") and k.endswith("lora_B"))  # a Conv1d: (out, r)
    w[key] = torch.randn(w[key].shape[0], 1)  # rank 1 against lora_A's and the config's 2
    _every_reader_refuses(files, _adapter(files, "rank_b", weights=w), "lora_B.*rank|lora_B", capsys)


def test_a_lora_B_fitting_no_layer_kind_is_refused_without_records(files, capsys) -> None:
    w = dict(files["good"]["weights"])
    key = next(k for k in w if k.startswith("resblocks.") and k.endswith("lora_B"))
    w[key] = torch.randn(w[key].shape[0], 3)  # r=2 is not a multiple of 3, and 8 rows are not r
    _every_reader_refuses(files, _adapter(files, "rank_b_norec", weights=w, metadata=None), "fits rank", capsys)


@pytest.mark.parametrize(
    "layers",
    [
        "not a dict",
        {"ups.0": "conv_transpose1d"},
        {"ups.0": {"kind": "conv3d", "groups": 1}},
        {"ups.0": {"kind": "conv_transpose1d", "groups": True}},
        {"ups.0": {"kind": "conv_transpose1d", "groups": 0}},
        {"ups.0": {"kind": "linear", "groups": 2}},
    ],
)
def test_malformed_layer_records_are_refused_in_one_line(files, capsys, layers) -> None:
    meta = dict(files["good"]["metadata"])
    meta["layers"] = {**meta["layers"], **layers} if isinstance(layers, dict) else layers
    _every_reader_refuses(files, _adapter(files, "bad_layers", metadata=meta), "layer", capsys)


def test_a_layer_record_contradicting_the_factors_is_refused(files, capsys) -> None:
    meta = json.loads(json.dumps(files["good"]["metadata"]))
    meta["layers"]["ups.0"]["groups"] = 2  # ConvTranspose1d lora_B is (r, out/g·k): r=2 fits, but the blend would
    meta["layers"]["resblocks.0.convs1.0"] = {"kind": "conv_transpose1d", "groups": 1}  # split it wrongly
    _every_reader_refuses(files, _adapter(files, "contradicting", metadata=meta), "ConvTranspose1d's lora_B", capsys)


@pytest.mark.parametrize(
    "blend",
    [
        "x",
        {"sources": "abc"},
        {"sources": [{"name": "a", "weight": "heavy"}]},
        {"sources": [], "rank": "2"},
        {"sources": [], "errors": {"ups.0": "big"}},
        {"sources": [], "errors": [1, 2]},
    ],
)
def test_malformed_blend_records_are_refused_in_one_line(files, capsys, blend) -> None:
    meta = {**files["good"]["metadata"], "blend": blend}
    _every_reader_refuses(files, _adapter(files, "bad_blend", metadata=meta), "blend record|'blend'", capsys)


def _export(files: dict, name: str, index: int, value: Any) -> Path:
    cpt = dict(files["cpt"])
    cpt["config"] = list(cpt["config"])
    cpt["config"][index] = value
    path = files["dir"] / f"{name}.pth"
    torch.save(cpt, path)
    return path


@pytest.mark.parametrize(
    "index,value,pattern",
    [
        (12, [10.5, 2], r"upsample_rates.*must be an int"),
        (12, [True, 2], r"upsample_rates.*must be an int"),
        (12, [0, 2], r"upsample_rates.*in 1\.\."),
        (12, [-10, 2], r"upsample_rates.*in 1\.\."),
        (12, [2], "equal length"),
        (14, [1, 4], "shorter than upsample_rates"),
        (9, "3", "resblock"),
        (13, 0, "upsample_initial_channel"),
        (13, -16, "upsample_initial_channel"),
        (13, 10**12, "upsample_initial_channel"),
        (13, 18, "divisible"),
        (2, 0, "inter_channels"),
        (16, 10**9, "gin_channels"),
        (10, [4], "odd"),
        (11, [[1, 0, 5]], "dilation"),
        (11, "abc", "dilation"),
    ],
)
def test_export_configs_rvc_cannot_run_are_refused_naming_the_path(files, capsys, index, value, pattern) -> None:
    """upsample_rates 10.5, True, 0 or -10 passed the consistency check and merged; channel counts gave C++ text."""
    path = _export(files, "bad_config", index, value)
    with pytest.raises(ValueError, match=pattern) as e:
        load_rvc_file(path)
    assert "bad_config.pth" in str(e.value) and "\n" not in str(e.value)
    d = files["dir"]
    with pytest.raises(ValueError, match=pattern):
        merge_adapter(path, d / "good.safetensors", d / "never.pth")
    assert not (d / "never.pth").exists()
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rvclora: error:") and "bad_config.pth" in err and "\n" not in err


def test_factors_a_file_only_declares_are_never_allocated(files, monkeypatch) -> None:
    """A few-KB file declaring a large rank for every targeted layer made the readers inject (allocate) first."""
    from rvclora.layers import LoRALayer

    d = files["dir"]
    config = LoRAConfig(r=512, lora_alpha=4, target_modules=["ups", "resblocks"])
    w = {"ups.0.lora_A": torch.zeros(512, 1), "ups.0.lora_B": torch.zeros(512, 1)}  # tiny, for one layer only
    path = _adapter(files, "declares", weights=w, metadata=None, config=config)

    def never(*a, **k):
        raise AssertionError("LoRA factors were allocated before the file was checked against the model")

    monkeypatch.setattr(LoRALayer, "_init_lora", never)
    model = build_generator(CFG, seed=0)
    with pytest.raises(ValueError, match=r"declares\.pth.*'ups\.0\.lora_A' has shape \(512, 1\), the model's layer"):
        load_lora_checkpoint(model, path)
    with pytest.raises(ValueError, match=r"'ups\.0\.lora_A' has shape \(512, 1\)"):
        merge_adapter(d / "base.pth", path, d / "never.pth")
    w = {k: v for k, v in files["good"]["weights"].items() if not k.startswith("resblocks.0.")}
    path = _adapter(files, "partial", weights=w, metadata=None)
    with pytest.raises(ValueError, match=r"select 'resblocks\.0\.convs1\.0', which the file has no lora_A"):
        load_lora_checkpoint(build_generator(CFG, seed=0), path)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.complex64])
def test_tensor_dtypes_outside_the_float_family_are_refused(files, capsys, dtype) -> None:
    w = dict(files["good"]["weights"])
    key = next(iter(w))
    w[key] = w[key].to(dtype)
    path = _adapter(files, "dtype", weights=w)
    with pytest.raises(ValueError, match=r"dtype\.pth.*dtype (float8_e4m3fn|complex64)"):
        read_lora_file(path)
    assert main(["info", str(path)]) == 1
    assert "dtype.pth" in capsys.readouterr().err
