"""Voice blending (rvclora.blend): exact blends, SVD truncation, and refusals.

Every layer kind is covered, grouped convolutions included, with adapters of different ranks
and alphas. ΔW comparisons are made against each layer's own ``get_delta_weight`` (the
definition merging uses), never against the blend code's own factorisation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from rvclora import LoRAConfig, extract_lora_weights, inject_lora, load_lora_weights, lora_modules
from rvclora.blend import BlendError, blend_adapters, layer_records, parse_weighted
from rvclora.inject import randomize_lora_


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv1d(8, 6, 3, groups=2, padding=1)
        self.up = nn.ConvTranspose1d(6, 4, 4, stride=2, groups=2)


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _Net().double()


def _adapter(r: int, alpha: float, seed: int, bias: str = "none", fingerprint: str | None = "base-0") -> dict:
    model = inject_lora(_base(), LoRAConfig(r=r, lora_alpha=alpha, target_modules=["lin", "conv", "up"], bias=bias))
    randomize_lora_(model, 0.1, seed)
    if bias != "none":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=p.dtype))
    return {
        "weights": extract_lora_weights(model),
        "config": model.rvclora_config,
        "base_fingerprint": fingerprint,
        "metadata": {"layers": layer_records(model), "name": f"ad{seed}"},
    }


def _deltas(adapter: dict) -> dict:
    model = inject_lora(
        _base(),
        LoRAConfig(
            r=adapter["config"].r,
            lora_alpha=adapter["config"].lora_alpha,
            target_modules=["lin", "conv", "up"],
            bias=adapter["config"].bias,
        ),
    )
    load_lora_weights(model, adapter["weights"])
    return {name: m.get_delta_weight().detach() for name, m in lora_modules(model)}


def test_exact_blend_is_the_weighted_sum_of_delta_weights():
    a, b = _adapter(2, 4.0, 1), _adapter(4, 1.5, 2)
    mix = blend_adapters([a, b], [0.7, -0.4])
    assert mix["config"].r == 6 and mix["config"].scaling == 1.0
    da, db, dm = _deltas(a), _deltas(b), _deltas(mix)
    assert set(dm) == {"lin", "conv", "up"}
    for name in dm:
        want = 0.7 * da[name] - 0.4 * db[name]
        torch.testing.assert_close(dm[name], want, rtol=1e-12, atol=1e-14)
    assert mix["metadata"]["blend"]["errors"] == {}
    assert [s["weight"] for s in mix["metadata"]["blend"]["sources"]] == [0.7, -0.4]
    assert mix["base_fingerprint"] == "base-0"


@pytest.mark.parametrize("rank", [2, 4])
def test_svd_blend_error_is_the_discarded_energy(rank):
    a, b = _adapter(2, 4.0, 1), _adapter(4, 1.5, 2)
    exact = _deltas(blend_adapters([a, b], [0.5, 0.5]))
    trunc = blend_adapters([a, b], [0.5, 0.5], rank=rank)
    assert trunc["config"].r == rank
    got = _deltas(trunc)
    groups = {"lin": 1, "conv": 2, "up": 2}
    for name, dw in exact.items():
        err = float((got[name] - dw).norm() / dw.norm())
        assert math.isclose(trunc["metadata"]["blend"]["errors"][name], err, rel_tol=1e-9, abs_tol=1e-12)
        # ... and it is the best rank-R approximation: the discarded singular values of each group's ΔW
        g = groups[name]
        mats = dw.reshape(g, dw.shape[0] // g, -1)  # (out/g, in/g·k) for Conv1d, (in/g, out/g·k) for ConvT
        s = torch.linalg.svdvals(mats)
        want = math.sqrt(float(s[:, rank // g :].square().sum() / s.square().sum()))
        assert math.isclose(err, want, rel_tol=1e-9, abs_tol=1e-12)
    assert any(e > 1e-3 for e in trunc["metadata"]["blend"]["errors"].values())  # a real truncation happened


def test_weights_one_and_zero_reproduce_the_single_adapter():
    a, b = _adapter(2, 4.0, 1), _adapter(4, 1.5, 2)
    mix = blend_adapters([a, b], [1.0, 0.0])
    assert mix["config"].r == 2  # the zero-weight adapter adds no rank
    da, dm = _deltas(a), _deltas(mix)
    for name in da:
        torch.testing.assert_close(dm[name], da[name], rtol=1e-12, atol=1e-14)


def test_biases_blend_only_when_the_weights_sum_to_one():
    a, b = _adapter(2, 4.0, 1, bias="lora_only"), _adapter(2, 4.0, 2, bias="lora_only")
    mix = blend_adapters([a, b], [0.25, 0.75])
    for key in ("lin.bias", "conv.bias", "up.bias"):
        torch.testing.assert_close(mix["weights"][key], 0.25 * a["weights"][key] + 0.75 * b["weights"][key])
    with pytest.raises(BlendError, match="sum to 1"):
        blend_adapters([a, b], [0.5, 0.7])


def test_refuses_a_mismatched_base_unless_forced():
    a, b = _adapter(2, 4.0, 1), _adapter(2, 4.0, 2, fingerprint="base-1")
    with pytest.raises(BlendError, match="different base models"):
        blend_adapters([a, b], [0.5, 0.5])
    with pytest.warns(UserWarning, match="different base models"):
        mix = blend_adapters([a, b], [0.5, 0.5], force=True)
    assert mix["base_fingerprint"] is None


def test_missing_fingerprint_warns():
    a, b = _adapter(2, 4.0, 1), _adapter(2, 4.0, 2, fingerprint=None)
    with pytest.warns(UserWarning, match="no base fingerprint"):
        blend_adapters([a, b], [0.5, 0.5])


def test_refuses_mismatched_layers():
    a, b = _adapter(2, 4.0, 1), _adapter(2, 4.0, 2)
    del b["weights"]["lin.lora_A"], b["weights"]["lin.lora_B"]
    with pytest.raises(BlendError, match="other layers"):
        blend_adapters([a, b], [0.5, 0.5])


def test_refuses_other_layer_shapes():
    a = _adapter(2, 4.0, 1)
    b = _adapter(2, 4.0, 2)
    b["weights"]["lin.lora_A"] = torch.zeros(2, 13, dtype=torch.float64)
    with pytest.raises(BlendError, match="another shape"):
        blend_adapters([a, b], [0.5, 0.5])


@pytest.mark.parametrize(
    "adapters, weights, match",
    [
        ([], [], "empty"),
        (None, [1.0], "list of paths"),
        ("voice.safetensors", [1.0], "list of paths"),
        ([{"weights": {}, "config": LoRAConfig()}], [1.0, 2.0], "one per adapter"),
        ([{"weights": {}, "config": LoRAConfig()}], ["x"], "finite number"),
        ([{"weights": {}, "config": LoRAConfig()}], [float("nan")], "finite number"),
        ([{"weights": {}, "config": LoRAConfig()}], [1.0], "no LoRA factors"),
        ([3], [1.0], "must be a path or an adapter"),
    ],
)
def test_bad_inputs(adapters, weights, match):
    with pytest.raises(BlendError, match=match):
        blend_adapters(adapters, weights)


@pytest.mark.parametrize("rank, match", [(0, "int >= 1"), (2.5, "int >= 1"), (3, "multiple of"), (1000, "exceeds")])
def test_bad_rank(rank, match):
    a = _adapter(2, 4.0, 1)
    with pytest.raises(BlendError, match=match):
        blend_adapters([a], [1.0], rank=rank)


def test_rank_above_the_exact_rank_pads_with_zero_directions():
    a = _adapter(2, 4.0, 1)
    mix = blend_adapters([a], [1.0], rank=4)
    da, dm = _deltas(a), _deltas(mix)
    for name in da:
        torch.testing.assert_close(dm[name], da[name], rtol=1e-10, atol=1e-12)
        assert mix["metadata"]["blend"]["errors"][name] < 1e-12


def test_shapes_are_inferred_for_files_without_layer_records():
    a, b = _adapter(2, 4.0, 1), _adapter(4, 1.5, 2)
    # ungrouped layers only: groups of a ConvTranspose1d cannot be read off its factors
    for ad in (a, b):
        del ad["metadata"]["layers"]
        for key in [k for k in ad["weights"] if k.startswith(("conv.", "up."))]:
            del ad["weights"][key]
    mix = blend_adapters([a, b], [0.3, 0.6])
    assert mix["metadata"]["layers"] == {"lin": {"kind": "conv1d", "groups": 1}}


@pytest.mark.parametrize(
    "text, want",
    [
        ("a.safetensors:0.6", ("a.safetensors", 0.6)),
        ("a.safetensors", ("a.safetensors", 1.0)),
        ("a.safetensors:-1.5", ("a.safetensors", -1.5)),
        ("C:/v/a.safetensors:0.5", ("C:/v/a.safetensors", 0.5)),
        ("a.safetensors:1e-2", ("a.safetensors", 0.01)),
    ],
)
def test_parse_weighted(text, want):
    assert parse_weighted(text) == want


@pytest.mark.parametrize("text", ["a.safetensors:", "a.safetensors:x", ":0.5", "", "a.pth:nan", "a.pth:inf"])
def test_parse_weighted_refuses_bad_syntax(text):
    with pytest.raises(BlendError):
        parse_weighted(text)
