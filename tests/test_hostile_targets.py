"""Target patterns from downloaded files: matched in bounded time, capped, refused in one line naming the entry."""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from rvclora import LoRAConfig, inject_lora
from rvclora.checkpoint import read_lora_file
from rvclora.targets import MAX_TARGETS, compile_target, target_matches

NAMES = [
    "dec.ups.0",
    "ups.1",
    "resblocks.2.convs1.0",
    "conv_pre",
    "m_source.l_linear",
    "a",
    "",
    "abc\n",
    "x_y",
    "dec.ups.10",
    "0ups",
    "dec.resblocks.11.convs2.2",
]
PATTERNS = [
    r"ups\.\d",
    r".*ups.*",
    r"(dec\.)?ups\.[0-9]+",
    r"^dec.*$",
    r"resblocks\.\d+\.convs[12]\.\d",
    r"[^.]+",
    r"\w+",
    r"\W?\w*",
    r"a|b|conv_pre",
    r"(a*)*",
    r"x{1,3}_y",
    r"\bups\b.*",
    r".*\B.*",
    r"(?s).*",
    r".*",
    r"abc$",
    r"dec\.ups\.1{0,2}0?",
    r"[a-c]+",
    r"(?x) a # c",
    r"(?:dec\.)??ups\.\d+?",
    r"[\d.]+\D*",
    r"\S+\s?",
    r"ups|dec\.ups\.1|resblocks\..*",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_targets_select_what_re_fullmatch_selects(pattern: str) -> None:
    match = compile_target(pattern)
    for name in NAMES:
        assert match(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


def test_plain_names_match_component_runs() -> None:
    assert target_matches("ups", "dec.ups.0") and target_matches("convs1.0", "resblocks.2.convs1.0")
    assert not target_matches("ups", "dec.upsample.0") and not target_matches("convs1.0", "convs1.01")


@pytest.mark.parametrize(
    "pattern", [r"(([\w.]+)+)+Z", r"(a|a)*Z", r"(\w*)*\w*\w*\w*\w*Z", r"(.*.*)*=", r"([\w.]*\.?)+Z"]
)
def test_backtracking_patterns_match_in_linear_time(pattern: str) -> None:
    """Python's re takes minutes on these (exponential or high-degree backtracking); here each is instant."""
    model = nn.Sequential()
    model.add_module("resblocks", nn.ModuleList([nn.Conv1d(2, 2, 1) for _ in range(3)]))
    name = "dec.resblocks.11.convs2.2.aaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 2
    t0 = time.perf_counter()
    assert not target_matches(pattern, name)
    with pytest.raises(ValueError, match="match no"):
        inject_lora(model, LoRAConfig(r=1, lora_alpha=1, target_modules=[pattern]))
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    "pattern,why",
    [
        (r"(a)\1", "backreferences"),
        (r"(?=a)a", "lookahead"),
        (r"(?<!b)a", "lookahead/lookbehind"),
        (r"(a)?(?(1)b|c)", "conditionals"),
        (r"(?i)ups", "inline flags"),
        (r"(?i:u)ps", "scoped flags"),
        ("(" * 3000 + ")" * 3000, "too deeply"),
        (r"(a{1000}){1000}", "states"),
        (r"ups(", "not a valid regular expression"),
    ],
)
def test_unsupported_or_oversized_patterns_are_refused_naming_the_entry(pattern: str, why: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(why)) as e:
        LoRAConfig(r=1, lora_alpha=1, target_modules=["ups", pattern])
    assert "target_modules entry" in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 2.0


def test_caps_on_count_and_size_of_targets() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_TARGETS}"):
        LoRAConfig(target_modules=[f"t{i}" for i in range(MAX_TARGETS + 1)])
    with pytest.raises(ValueError, match="characters"):
        LoRAConfig(target_modules=["x" * 70000])
    with pytest.raises(ValueError, match="MAX_TOTAL_CHARS"):
        LoRAConfig(target_modules=["y" * 60000] * 5)
    with pytest.raises(ValueError, match="states"):  # each alone fits, together they do not
        LoRAConfig(target_modules=[f"(a{{100}}){{{100 + i}}}" for i in range(6)])


def test_an_adapter_declaring_a_million_targets_is_refused_quickly(tmp_path) -> None:
    """A 13 MB list of 10⁶ targets took minutes to read; now the count is refused first, naming the file."""
    from safetensors.torch import save_file

    cfg = {
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": [f"layer{i}" for i in range(10**6)],
        "merge_weights": False,
        "bias": "none",
    }
    import json

    path = tmp_path / "many.safetensors"
    save_file(
        {"a.lora_A": torch.zeros(1, 2), "a.lora_B": torch.zeros(2, 1)},
        str(path),
        metadata={"format_version": "2", "config": json.dumps(cfg)},
    )
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"many\.safetensors.*at most 1024") as e:
        read_lora_file(path)
    assert "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10.0


def test_a_huge_declared_rank_is_refused_before_allocation(tmp_path) -> None:
    """A 528-byte adapter declaring r = 1e8 made merge allocate gigabytes."""
    import json

    from safetensors.torch import save_file

    cfg = {
        "r": 10**8,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": ["ups"],
        "merge_weights": False,
        "bias": "none",
    }
    path = tmp_path / "huge_r.safetensors"
    save_file(
        {"ups.0.lora_A": torch.zeros(1, 2), "ups.0.lora_B": torch.zeros(2, 1)},
        str(path),
        metadata={"format_version": "2", "config": json.dumps(cfg)},
    )
    with pytest.raises(ValueError, match=r"huge_r\.safetensors.*r must be at most 8192"):
        read_lora_file(path)
    with pytest.raises(ValueError, match="MAX_RANK"):
        LoRAConfig(r=9000)


def test_peft_rank_patterns_from_a_file_run_in_linear_time(tmp_path) -> None:
    """PEFT's rank_pattern/alpha_pattern keys are regexes too, read from a downloaded adapter_config.json."""
    import json

    from rvclora.inject import randomize_lora_
    from rvclora.peft_format import CONFIG_NAME, export_peft_adapter, import_peft_adapter

    def make() -> nn.Module:  # a long module name: backtracking re takes ~2^len(name) steps on it
        torch.manual_seed(0)
        model = nn.Module()
        model.add_module(
            "a_long_module_name_that_backtracking_would_choke_on", nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
        )
        return inject_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))

    src = randomize_lora_(make(), 0.1, 1)
    export_peft_adapter(src, tmp_path)
    cfg_path = tmp_path / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {r"(([\w.]+)+)+Z": 7}
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    import_peft_adapter(make(), tmp_path)  # the key matches nothing: every layer keeps r = 2
    assert time.perf_counter() - t0 < 5.0
    cfg["rank_pattern"] = {r"(a)\1": 7}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"pattern .*backreferences"):
        import_peft_adapter(make(), tmp_path)
    cfg_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        import_peft_adapter(make(), tmp_path)
