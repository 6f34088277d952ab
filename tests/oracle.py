"""Shared test helpers: the oracle comparison with dtype-adaptive tolerances (docs/verification.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def assert_close_to_oracle(cand: Tensor, ref64: Tensor, same_dtype: Tensor, what: str, tiny: float = 1e-12) -> None:
    """``max|cand − ref64| ≤ 2·max|same_dtype − ref64| + tiny``, with relative errors in the message.

    ``same_dtype`` is the oracle evaluated by plain PyTorch in the candidate's dtype.
    """
    assert cand.shape == ref64.shape, f"{what}: shape {tuple(cand.shape)} != oracle {tuple(ref64.shape)}"
    assert not torch.isnan(cand).any(), f"{what}: NaN in candidate"
    err = (cand.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    tol = 2 * base + tiny * max(scale, 1.0)
    rel = (cand.double() - ref64).norm().item() / max(ref64.norm().item(), 1e-30)
    assert err <= tol, (
        f"{what}: max abs err {err:.3e} > tol {tol:.3e} (plain torch in {cand.dtype}: {base:.3e}); "
        f"relative err {rel:.3e}"
    )


def grads(out: Tensor, inputs: Sequence[Tensor], grad_out: Tensor):
    return torch.autograd.grad(out, [t for t in inputs], grad_out, allow_unused=True)


def compare_with_oracle(
    run: Callable[..., Tensor],
    oracle: Callable[..., Tensor],
    tensors: dict[str, Tensor],
    dtype: torch.dtype,
    grad_names: Sequence[str],
    label: str,
    tiny: float = None,
) -> None:
    """Run ``run`` in ``dtype`` and ``oracle`` in float64 and in ``dtype``; compare outputs and gradients.

    ``tensors`` holds float64 masters; copies in each dtype are made with requires_grad for
    ``grad_names``. ``run`` and ``oracle`` take the tensors as keyword arguments.
    """
    if tiny is None:
        tiny = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-3)

    def copies(dt):
        out = {}
        for k, v in tensors.items():
            if v is None:
                out[k] = None
                continue
            c = v.detach().to(dt) if v.is_floating_point() else v
            if k in grad_names:
                c = c.clone().requires_grad_(True)
            out[k] = c
        return out

    # The float64 reference starts from the inputs as rounded to ``dtype``: input rounding is
    # common to every implementation and is not what is being measured.
    tensors = {k: (v.to(dtype).double() if v is not None and v.is_floating_point() else v) for k, v in tensors.items()}
    c64, cdt, cand = copies(torch.float64), copies(dtype), copies(dtype)
    y64 = oracle(**c64)
    ydt = oracle(**cdt)
    y = run(**cand)
    assert y.dtype == dtype, f"{label}: output dtype {y.dtype}, expected {dtype}"
    assert_close_to_oracle(y, y64, ydt, f"{label} forward", tiny)
    g = torch.randn_like(y64).to(dtype).double()
    names = list(grad_names)
    g64 = grads(y64, [c64[n] for n in names], g)
    gdt = grads(ydt, [cdt[n] for n in names], g.to(dtype))
    gc = grads(y, [cand[n] for n in names], g.to(dtype))
    for n, a, b, c in zip(names, gc, g64, gdt):
        assert a is not None, f"{label}: no gradient for {n}"
        assert a.dtype == cand[n].dtype, f"{label}: grad {n} dtype {a.dtype}, expected {cand[n].dtype}"
        assert_close_to_oracle(a, b, c, f"{label} grad_{n}", tiny)
