"""What autograd keeps for backward: a LoRA layer may save at most the frozen base's activations plus
``x`` and ``u`` (the memory bound of docs/maths.md), with dropout on or off, at batch 1 and 2 and for every layer kind.

Counted with ``saved_tensors_hooks`` over unique storages (parameters excluded: saving one costs no
memory). A view of an activation-sized buffer saved as ``u`` keeps the whole buffer alive, so the
count is by storage, not by tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from rvclora import LoRAConv1d, LoRAConvTranspose1d, LoRALinear


def saved_storages(fn) -> dict:
    """``{storage pointer: bytes}`` of the non-parameter tensors autograd saves while ``fn`` runs."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


CASES = {
    "linear": (lambda: nn.Linear(48, 40), LoRALinear, lambda n: torch.randn(n, 30, 48)),
    "linear_rows": (lambda: nn.Linear(48, 400), LoRALinear, lambda n: torch.randn(n, 48)),
    "conv1d": (lambda: nn.Conv1d(32, 32, 3, padding=3, dilation=3), LoRAConv1d, lambda n: torch.randn(n, 32, 200)),
    "conv1d_reflect": (
        lambda: nn.Conv1d(16, 24, 5, padding=2, padding_mode="reflect"),
        LoRAConv1d,
        lambda n: torch.randn(n, 16, 100),
    ),
    "conv1d_groups": (lambda: nn.Conv1d(16, 32, 3, padding=1, groups=2), LoRAConv1d, lambda n: torch.randn(n, 16, 90)),
    "convT": (
        lambda: nn.ConvTranspose1d(32, 16, 16, 10, padding=3),
        LoRAConvTranspose1d,
        lambda n: torch.randn(n, 32, 20),
    ),
    "convT_wide_input": (
        lambda: nn.ConvTranspose1d(16, 8, 4, 2, padding=1),
        LoRAConvTranspose1d,
        lambda n: torch.randn(n, 16, 300),
    ),
}


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", list(CASES))
def test_saved_bytes_within_base_plus_x_and_u(case, dropout, batch):
    make_base, lora_cls, make_x = CASES[case]
    torch.manual_seed(0)
    base = make_base().requires_grad_(False)
    r = 4
    lora = lora_cls.from_base(make_base(), r=r, lora_alpha=8, lora_dropout=dropout)
    lora.train()
    x = make_x(batch).requires_grad_(True)

    base_saved = saved_storages(lambda: base(x).sum().backward())
    lora_saved = saved_storages(lambda: lora(x).sum().backward())
    base_bytes, lora_bytes = sum(base_saved.values()), sum(lora_saved.values())
    if lora_cls is LoRALinear:
        u_rows = x.numel() // x.shape[-1]
    elif lora_cls is LoRAConvTranspose1d:
        u_rows = batch * x.shape[-1]
    else:
        with torch.no_grad():
            u_rows = batch * base(x).shape[-1]
    x_bytes, u_bytes = x.numel() * x.element_size(), u_rows * r * 4
    bound = base_bytes + x_bytes + u_bytes
    assert lora_bytes <= bound, (
        f"{case} dropout={dropout} batch={batch}: autograd saves {lora_bytes} B, more than the base's "
        f"{base_bytes} B + x + u = {bound} B"
    )
    # The design's tighter statement: beyond what the base keeps (x itself included), only u (and the
    # dropout seed, one int64: the mask is regenerated in backward, never stored).
    with_x = {**base_saved, x.untyped_storage().data_ptr(): x_bytes}
    extra = sum(b for p, b in lora_saved.items() if p not in with_x)
    seed_bytes = 8 if dropout else 0
    assert extra <= u_bytes + seed_bytes, (
        f"{case} dropout={dropout} batch={batch}: beyond the base's tensors and x, autograd keeps {extra} B; "
        f"u alone is {u_bytes} B"
    )
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None
