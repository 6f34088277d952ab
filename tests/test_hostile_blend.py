"""Blends that were silently wrong: layers whose groups were guessed, weights that nearly cancel."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rvclora import LoRAConfig, extract_lora_weights, inject_lora, load_lora_weights, lora_modules
from rvclora.blend import BlendError, blend_adapters, layer_records, model_layer_records
from rvclora.checkpoint import read_lora_file, write_lora_file
from rvclora.cli import main
from rvclora.inject import randomize_lora_
from rvclora.io import RVCLoRAWarning

TARGETS = ["lin", "conv", "up"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv1d(8, 6, 3, groups=2, padding=1)
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, groups=2)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _adapter(r: int, seed: int, records: bool = True) -> dict:
    model = inject_lora(_base(), LoRAConfig(r=r, lora_alpha=2.0 * r, target_modules=TARGETS))
    randomize_lora_(model, 0.1, seed)
    meta = {"layers": layer_records(model)} if records else None
    return {
        "weights": extract_lora_weights(model),
        "config": model.rvclora_config,
        "base_fingerprint": None,
        "metadata": meta,
    }


def _deltas(adapter: dict) -> dict[str, torch.Tensor]:
    cfg = adapter["config"]
    model = inject_lora(_base().double(), LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=TARGETS))
    load_lora_weights(model, {k: v.double() for k, v in adapter["weights"].items()})
    return {name: m.get_delta_weight().detach() for name, m in lora_modules(model)}


def test_a_grouped_conv_transpose_without_layer_records_is_refused_not_guessed(tmp_path) -> None:
    """Blending format-1 files assumed groups = 1: the grouped ConvTranspose1d's ΔW came out 106 % off."""
    a, b = _adapter(2, 1, records=False), _adapter(2, 2, records=False)
    with pytest.raises(BlendError, match=r"up's factor shapes .* groups cannot be read"):
        blend_adapters([a, b], [0.5, 0.5])
    write_lora_file(tmp_path / "a.safetensors", a["weights"], a["config"], base_fingerprint=None)
    write_lora_file(tmp_path / "b.safetensors", b["weights"], b["config"], base_fingerprint=None)
    assert read_lora_file(tmp_path / "a.safetensors")["metadata"] is None  # no records
    d = tmp_path
    assert main(["mix", f"{d}/a.safetensors", f"{d}/b.safetensors", "-o", f"{d}/m.safetensors"]) == 1


@pytest.mark.parametrize("layers", ["model", "records"])
def test_layers_given_by_the_caller_blend_exactly(layers) -> None:
    a, b = _adapter(2, 1, records=False), _adapter(4, 2, records=False)
    given = _base() if layers == "model" else model_layer_records(_base())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        mix = blend_adapters([a, b], [0.7, -0.4], layers=given)
    assert mix["metadata"]["layers"]["up"] == {"kind": "conv_transpose1d", "groups": 2}
    da, db, dm = _deltas(a), _deltas(b), _deltas(mix)
    for name in dm:
        want = 0.7 * da[name] - 0.4 * db[name]
        assert float((dm[name] - want).norm() / want.norm()) < 1e-6, name


def test_layers_contradicting_the_files_records_are_refused() -> None:
    a, b = _adapter(2, 1), _adapter(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        with pytest.raises(BlendError, match="in layers="):
            blend_adapters([a, b], [0.5, 0.5], layers={"up": {"kind": "conv_transpose1d", "groups": 1}})


def test_weights_that_nearly_cancel_lose_nothing_and_the_cast_is_reported() -> None:
    """``a:1e6 a:-999999`` lost 4.5 % to float32 factors with no word; computed in float64 it is ``a``."""
    a = _adapter(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        mix = blend_adapters([a, a], [1e6, -999999.0])
    assert mix["weights"]["up.lora_A"].dtype == torch.float32
    da, dm = _deltas(a), _deltas(mix)
    for name in dm:
        assert float((dm[name] - da[name]).norm() / da[name].norm()) < 1e-5, name
    cast = mix["metadata"]["blend"]["cast_errors"]
    assert set(cast) == set(TARGETS) and all(0 <= e < 1e-5 for e in cast.values())


def test_a_cast_that_loses_precision_warns_naming_the_layer() -> None:
    """Half factors of a tiny update fall into float16's subnormal range: the blend says what the cast cost."""
    a = _adapter(2, 1)
    tiny = {**a, "weights": {k: (v * 1e-5).half() for k, v in a["weights"].items()}}
    with pytest.warns(RVCLoRAWarning, match=r"casting the float64 blend back to float16 changes \w+'s update"):
        mix = blend_adapters([tiny, tiny], [0.5, 0.5])
    cast = mix["metadata"]["blend"]["cast_errors"]
    assert max(cast.values()) > 1.6e-2


def test_a_blend_that_overflows_is_refused_naming_the_layer() -> None:
    a = _adapter(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        with pytest.raises(BlendError, match=r"lin: the blended .* is not finite in float32"):
            blend_adapters([a, a], [1e300, 1e300])
