import json

import pytest

from rvclora import BALANCED_CONFIG, DEFAULT_CONFIG, FAST_CONFIG, HIGH_QUALITY_CONFIG, LoRAConfig


def test_defaults_and_scaling():
    c = LoRAConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.merge_weights, c.bias) == (8, 16, 0.0, False, "none")
    assert c.scaling == 2.0
    assert c.target_modules == ["ups", "resblocks"]


def test_presets():
    assert DEFAULT_CONFIG.r == 8
    assert HIGH_QUALITY_CONFIG.r == 16
    assert FAST_CONFIG.r == 4
    assert BALANCED_CONFIG.r == 8 and BALANCED_CONFIG.lora_dropout == 0.05
    for c in (DEFAULT_CONFIG, HIGH_QUALITY_CONFIG, FAST_CONFIG, BALANCED_CONFIG):
        assert c.scaling == 2.0  # lora_alpha = 2r, the usual choice


def test_dict_round_trip_is_json_safe():
    c = LoRAConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["ups", r"dec\.conv_\w+"],
        merge_weights=True,
        bias="lora_only",
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert LoRAConfig.from_dict(d) == c


def test_string_target_becomes_list():
    assert LoRAConfig(target_modules="ups").target_modules == ["ups"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(r=0), ValueError, "r must be > 0, got 0"),
        (dict(r=-2), ValueError, "r must be > 0"),
        (dict(r=2.5), TypeError, "r must be an int"),
        (dict(r=True), TypeError, "r must be an int"),
        (dict(lora_alpha=0), ValueError, "lora_alpha must be a finite number > 0, got 0"),
        (dict(lora_alpha=float("nan")), ValueError, "lora_alpha"),
        (dict(lora_alpha="16"), TypeError, "lora_alpha must be a number"),
        (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\), got 1.0"),
        (dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
        (dict(bias="some"), ValueError, "bias must be one of"),
        (dict(target_modules=[]), ValueError, "target_modules must name at least one module"),
        (dict(target_modules=[""]), ValueError, "non-empty strings"),
        (dict(target_modules=["ups("]), ValueError, "not a valid regular expression"),
        (dict(merge_weights="yes"), TypeError, "merge_weights must be a bool"),
    ],
)
def test_validation_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRAConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields \\['rank'\\]"):
        LoRAConfig.from_dict({"rank": 8})
    with pytest.raises(TypeError, match="expects a dict"):
        LoRAConfig.from_dict([("r", 8)])
