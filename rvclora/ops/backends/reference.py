"""The ``reference`` backend: the oracle run through plain autograd (slow, for checking).

Its dropout mask is the torch backend's (:func:`rvclora.ops.backends.torch.dropout_mask`),
so ``reference`` and ``torch`` give the same result for the same seed.
"""

from __future__ import annotations

from torch import Tensor

from ..spec import SPECS
from .torch import dropout_mask

NAME = "reference"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(op: str, x: Tensor, **params) -> str | None:
    return None


def _mask(x: Tensor, dropout_p: float, seed: Tensor | None):
    if dropout_p == 0.0:
        return None
    assert seed is not None, "dropout_p > 0 needs a seed"
    return dropout_mask(seed, x.shape, dropout_p, x.device, x.dtype)


def _entry_point(op: str):
    """``op``'s entry point in the one calling convention: the oracle with this backend's dropout mask."""
    spec = SPECS[op]

    def run(x, weight, bias, lora_A, lora_B, scaling, *rest):
        *options, dropout_p, seed = rest
        return spec.run_reference(
            x, weight, bias, lora_A, lora_B, scaling, dict(zip(spec.option_names, options)), _mask(x, dropout_p, seed)
        )

    run.__name__ = run.__qualname__ = op
    return run


# every op of the spec, new ones included
for _op in SPECS:
    globals()[_op] = _entry_point(_op)
