"""Models that made rvclora silently wrong: tied weights, one module under two names, wrapped models,
and a failed load that left the model injected."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from rvclora import (
    LoRAConfig,
    inject_lora,
    load_lora_checkpoint,
    lora_modules,
    merge_lora_weights,
    merged_state_dict,
    save_lora_checkpoint,
)
from rvclora.inject import randomize_lora_
from rvclora.io import RVCLoRAWarning

CFG = LoRAConfig(r=2, lora_alpha=4, target_modules=["0", "2"])


def _seq() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))


def test_two_targeted_layers_sharing_a_weight_are_refused() -> None:
    """Both ΔWs landed on the one tensor: the merged output was 173 % off the unmerged one."""
    m = _seq()
    m[2].weight = m[0].weight
    with pytest.raises(ValueError, match=r"'0\.weight' shares its memory with '2\.weight' \(tied weights\)"):
        inject_lora(m, CFG)
    assert not list(lora_modules(m)) and not hasattr(m, "rvclora_config")  # nothing was replaced


def test_a_targeted_layer_tied_to_an_untargeted_one_is_refused() -> None:
    """Merging in place would change the untargeted partner silently."""
    m = _seq()
    m[2].weight = m[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        inject_lora(m, LoRAConfig(r=2, lora_alpha=4, target_modules=["0"]))


def test_a_weight_that_is_a_view_of_another_is_refused() -> None:
    m = _seq()
    flat = torch.randn(72)
    with torch.no_grad():
        m[0].weight = nn.Parameter(flat[:36].view(6, 6))
        m[2].weight = nn.Parameter(flat[30:66].view(6, 6))  # overlaps the first by 6 elements
    with pytest.raises(ValueError, match="shares its memory"):
        inject_lora(m, CFG)
    m = _seq()
    with torch.no_grad():  # adjacent, not overlapping: fine
        m[0].weight = nn.Parameter(flat[:36].view(6, 6))
        m[2].weight = nn.Parameter(flat[36:].view(6, 6))
    inject_lora(m, CFG)


def test_untied_layers_merge_exactly() -> None:
    m = _seq()
    inject_lora(m, CFG)
    randomize_lora_(m, 0.5, 1)
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = m(x)
        sd = merged_state_dict(m)
        merge_lora_weights(m)
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fresh = _seq()
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x).detach(), want, rtol=1e-5, atol=1e-6)


class _Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv1d(3, 3, 3, padding=1)
        self.a = conv
        self.b = conv
        self.c = nn.Conv1d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_one_module_under_two_names_stays_one_lora_layer() -> None:
    """Only ``a`` was replaced; ``b`` stayed a plain conv and the two silently stopped sharing."""
    m = _Aliased()
    inject_lora(m, LoRAConfig(r=2, lora_alpha=4, target_modules=["a", "b"]))
    assert m.a is m.b and type(m.a).__name__ == "LoRAConv1d"
    randomize_lora_(m, 0.3, 2)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        want = m(x)
        sd = merged_state_dict(m)
    fresh = _Aliased()
    fresh.load_state_dict(sd)  # strict: no LoRA keys left under either name
    torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-6)
    assert fresh.a is fresh.b


def test_one_module_under_two_names_selected_by_one_name_is_refused() -> None:
    m = _Aliased()
    with pytest.raises(ValueError, match=r"'a' is also registered as 'b'"):
        inject_lora(m, LoRAConfig(r=2, lora_alpha=4, target_modules=["a"]))
    assert type(m.a) is nn.Conv1d and m.a is m.b


def test_a_model_wrapped_in_data_parallel_is_refused() -> None:
    """The new factors were not registered with DDP: the ranks drifted apart (1.5e-2 after 3 steps)."""
    wrapped = nn.DataParallel(_seq())
    with pytest.raises(ValueError, match="wrapped in DataParallel.*inject into the bare model first, then wrap"):
        inject_lora(wrapped, LoRAConfig(r=2, lora_alpha=4, target_modules=["module.0"]))
    outer = nn.Sequential(nn.DataParallel(_seq()))
    with pytest.raises(ValueError, match=r"module '0' is wrapped in DataParallel"):
        inject_lora(outer, CFG)


def test_a_model_wrapped_in_ddp_is_refused() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP.__new__(DDP)  # no process group needed: the check looks at the type
    nn.Module.__init__(ddp)
    ddp.module = _seq()
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
        inject_lora(ddp, LoRAConfig(r=2, lora_alpha=4, target_modules=["module.0"]))


def _state(m: nn.Module) -> tuple:
    return (
        type(m[0]),
        type(m[2]),
        {k: v.clone() for k, v in m.state_dict().items()},
        [p.requires_grad for p in m.parameters()],
        hasattr(m, "rvclora_config"),
    )


def _same(a: tuple, b: tuple) -> bool:
    return (
        a[0] is b[0]
        and a[1] is b[1]
        and a[2].keys() == b[2].keys()
        and all(torch.equal(a[2][k], b[2][k]) for k in a[2])
        and a[3] == b[3]
        and a[4] == b[4]
    )


def test_a_failed_load_leaves_a_plain_model_as_it_was(tmp_path) -> None:
    """A failed load injected the model and left it so: the next try failed for the wrong reason."""
    src = inject_lora(_seq(), CFG)
    randomize_lora_(src, 0.2, 3)
    save_lora_checkpoint(src, tmp_path / "a.safetensors")
    other = _seq()
    with torch.no_grad():
        other[0].weight.add_(1.0)  # another base: the fingerprint differs
    before = _state(other)
    with pytest.raises(ValueError, match="another base model"):
        load_lora_checkpoint(other, tmp_path / "a.safetensors")
    assert _same(_state(other), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RVCLoRAWarning)
        load_lora_checkpoint(other, tmp_path / "a.safetensors", force=True)  # the retry fails for no wrong reason
    assert type(other[0]).__name__ == "LoRALinear"


def test_a_failed_load_leaves_an_injected_model_as_it_was(tmp_path) -> None:
    src = inject_lora(_seq(), CFG)
    randomize_lora_(src, 0.2, 3)
    save_lora_checkpoint(src, tmp_path / "a.safetensors")
    target = inject_lora(_seq(), CFG)
    randomize_lora_(target, 0.2, 9)
    before = copy.deepcopy(target.state_dict())
    save_lora_checkpoint(src, tmp_path / "b.pth", optimizer_state={"state": {}, "param_groups": []})
    raw = torch.load(tmp_path / "b.pth", weights_only=True)
    raw["optimizer"] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # a damaged optimizer blob
    torch.save(raw, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="damaged"):  # it loaded the weights, then raised
        load_lora_checkpoint(target, tmp_path / "b.pth", load_optimizer=True)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
