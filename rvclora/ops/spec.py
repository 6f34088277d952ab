"""One spec per op: the single description every layer of the library reads.

An :class:`OpSpec` holds what used to be typed out in each module that handles an op:

* the **calling convention** every backend's entry point follows,
  ``op(x, weight, bias, lora_A, lora_B, scaling, *options, dropout_p, seed)``, with the option
  names, their defaults and how each is normalised (:attr:`OpSpec.options`);
* the **oracle** (:mod:`rvclora.reference`) and ``ΔW`` in the base weight's layout;
* the **factor layout**: ``lora_A``/``lora_B`` shapes from the base weight, and the per-group
  factors ``(L, R)`` with ``ΔW[j] = s·L[j]·R[j]`` that blending and the record checks use;
* the **layer kind** written into an adapter's layer records (``metadata["layers"]``) and the base
  class name;
* a table of **sample inputs** (like PyTorch's OpInfo) that the tests and the selftest draw from.

Two factor layouts cover every op:

=================  ==========================  =======================  ==========================
layout             base weight                 ``lora_A``               ``lora_B``
=================  ==========================  =======================  ==========================
direct             ``(out, in/g, *k)``         ``(r, in/g · ∏k)``       ``(out, r/g)``
transposed         ``(in, out/g, *k)``         ``(r, in/g)``            ``(r, out/g · ∏k)``
=================  ==========================  =======================  ==========================

(Linear is direct with no kernel dims and ``g = 1``.) Adding an op: a reference function (and
``ΔW``) in :mod:`rvclora.reference`, one :class:`OpSpec` in :data:`SPECS`, the op in the torch backend,
the layer class in :mod:`rvclora.layers`; docs/extending.md has the recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import reference as ref

__all__ = ["Option", "OpSpec", "Sample", "SPECS", "KINDS", "spec_of", "spec_of_kind", "sample_tensors"]


def _int(v: Any) -> int:
    return int(v)


def _ints(n: int) -> Callable[[Any], tuple[int, ...]]:
    def convert(v: Any) -> tuple[int, ...]:
        t = tuple(int(e) for e in v)
        if len(t) != n:
            raise ValueError(f"expected {n} ints, got {v!r}")
        return t

    return convert


def _str(v: Any) -> str:
    return str(v)


@dataclass(frozen=True)
class Option:
    """One keyword option of an op: its name, its default and how a value is normalised."""

    name: str
    default: Any
    convert: Callable[[Any], Any] = _int
    schema: str = "int"  # its type in the custom-op schemas (rvclora.ops.autograd.schema)


@dataclass(frozen=True)
class Sample:
    """One sample input of an op (float64 masters are built by :func:`sample_tensors`).

    ``x`` is the input shape; ``cin``/``cout`` the channels (features), ``k`` the kernel shape (``()`` for
    Linear), ``r`` the rank; ``options`` the op's keyword options (the rest at their defaults).
    """

    label: str
    x: tuple[int, ...]
    cin: int
    cout: int
    k: tuple[int, ...]
    r: int
    options: dict[str, Any] = field(default_factory=dict)
    bias: bool = True
    dropout_p: float = 0.0


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op that more than one module needs (see the module docstring)."""

    name: str
    kind: str
    base: str
    options: tuple[Option, ...]
    reference: Callable[..., Tensor]
    delta: Callable[..., Tensor]
    transposed: bool = False
    samples: tuple[Sample, ...] = ()

    # ---------------------------------------------------------------- calling convention
    def __post_init__(self) -> None:
        # computed once: the op boundary reads these on every call
        object.__setattr__(self, "option_names", tuple(o.name for o in self.options))
        object.__setattr__(self, "grouped", "groups" in self.option_names)

    option_names: tuple[str, ...] = field(init=False)
    grouped: bool = field(init=False)

    def option_values(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """The options in call order, normalised, defaults filled in (other keys of ``params`` ignored)."""
        return tuple([o.convert(params.get(o.name, o.default)) for o in self.options])

    def full_options(self, params: dict[str, Any]) -> dict[str, Any]:
        """``{name: value}`` of every option, normalised, defaults filled in."""
        return dict(zip(self.option_names, self.option_values(params)))

    def call(
        self,
        fn: Callable[..., Tensor],
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        params: dict[str, Any],
        dropout_p: float = 0.0,
        seed: Tensor | None = None,
    ) -> Tensor:
        """``fn`` (a backend's entry point for this op) called in the one calling convention."""
        return fn(x, weight, bias, lora_A, lora_B, float(scaling), *self.option_values(params), float(dropout_p), seed)

    def run_reference(
        self,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        params: dict[str, Any],
        dropout_mask: Tensor | None = None,
    ) -> Tensor:
        """The oracle on these inputs and options."""
        return self.reference(
            x, weight, bias, lora_A, lora_B, scaling, dropout_mask=dropout_mask, **self.full_options(params)
        )

    # ---------------------------------------------------------------- shapes
    def groups_of(self, params: dict[str, Any]) -> int:
        return int(params.get("groups", 1)) if self.grouped else 1

    def out_channels(self, weight_shape: Sequence[int], groups: int = 1) -> int:
        return int(weight_shape[1]) * groups if self.transposed else int(weight_shape[0])

    def lora_shapes(self, weight_shape: Sequence[int], groups: int, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(lora_A shape, lora_B shape)`` for a base weight of ``weight_shape``."""
        taps = math.prod(int(k) for k in weight_shape[2:])
        if self.transposed:
            cin, og = int(weight_shape[0]), int(weight_shape[1])
            return (r, cin // groups), (r, og * taps)
        return (r, int(weight_shape[1]) * taps), (int(weight_shape[0]), r // groups)

    def delta_weight(
        self, lora_A: Tensor, lora_B: Tensor, scaling: float, groups: int, weight_shape: Sequence[int]
    ) -> Tensor:
        """``s·ΔW`` in the base weight's layout (differentiable in the factors)."""
        return self.delta(lora_A, lora_B, scaling, groups, tuple(int(k) for k in weight_shape[2:]))

    def factors(self, lora_A: Tensor, lora_B: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        """``(L, R)``: ``(g, m, r/g)`` and ``(g, r/g, n)`` with ``ΔW[j] = s·L[j]·R[j]`` (ΔW per group as a matrix)."""
        g, r = groups, lora_A.shape[0]
        if self.transposed:
            return lora_A.reshape(g, r // g, -1).transpose(1, 2), lora_B.reshape(g, r // g, -1)
        return lora_B.reshape(g, -1, r // g), lora_A.reshape(g, r // g, -1)

    def unfactors(self, L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        """The inverse of :meth:`factors`: ``(lora_A, lora_B)``."""
        g, m, rg = L.shape
        n = R.shape[-1]
        if self.transposed:
            return L.transpose(1, 2).reshape(g * rg, m).contiguous(), R.reshape(g * rg, n).contiguous()
        return R.reshape(g * rg, n).contiguous(), L.reshape(g * m, rg).contiguous()

    def lora_B_error(self, shape_b: Sequence[int], r: int, groups: int) -> str | None:
        """Why a ``lora_B`` of ``shape_b`` cannot belong to a layer of this kind with rank ``r`` and ``groups``."""
        b = tuple(shape_b)
        if self.transposed:
            return None if b[0] == r else f"a {self.base}'s lora_B is (r={r}, out/groups*k)"
        if b[1] != r // groups or b[0] % groups:
            return f"a {self.kind}'s lora_B is (out, r/groups={r // groups}) with out a multiple of groups={groups}"
        return None


# --------------------------------------------------------------------------- the ops

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _padding_mode(v: Any) -> str:
    if v not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {v!r}")
    return str(v)


SPECS: dict[str, OpSpec] = {}


def _register(spec: OpSpec) -> OpSpec:
    SPECS[spec.name] = spec
    return spec


_register(
    OpSpec(
        name="lora_linear",
        kind="linear",
        base="Linear",
        options=(),
        reference=ref.lora_linear_ref,
        delta=lambda A, B, s, g, k: ref.delta_weight_linear(A, B, s),
        samples=(
            Sample("selftest", (2, 3, 37), 37, 29, (), 4),
            Sample("lead5", (5, 7), 7, 6, (), 3),
            Sample("lead2x3 nobias", (2, 3, 37), 37, 131, (), 4, bias=False),
            Sample("dropout", (3, 1, 5, 9), 9, 11, (), 8, dropout_p=0.1),
        ),
    )
)
_register(
    OpSpec(
        name="lora_conv1d",
        kind="conv1d",
        base="Conv1d",
        options=(
            Option("stride", 1),
            Option("padding", (0, 0), _ints(2), "int[2]"),
            Option("dilation", 1),
            Option("groups", 1),
            Option("padding_mode", "zeros", _padding_mode, "str"),
        ),
        reference=ref.lora_conv1d_ref,
        delta=lambda A, B, s, g, k: ref.delta_weight_conv1d(A, B, s, g, k[0]),
        samples=(
            Sample(
                "k3 reflect g2",
                (2, 12, 41),
                12,
                10,
                (3,),
                4,
                dict(stride=2, padding=(2, 1), dilation=2, groups=2, padding_mode="reflect"),
            ),
            Sample("k5 same", (1, 6, 17), 6, 8, (5,), 2, dict(padding=(2, 2))),
        ),
    )
)
_register(
    OpSpec(
        name="lora_conv_transpose1d",
        kind="conv_transpose1d",
        base="ConvTranspose1d",
        options=(
            Option("stride", 1),
            Option("padding", 0),
            Option("output_padding", 0),
            Option("dilation", 1),
            Option("groups", 1),
        ),
        reference=ref.lora_conv_transpose1d_ref,
        delta=lambda A, B, s, g, k: ref.delta_weight_conv_transpose1d(A, B, s, g, k[0]),
        transposed=True,
        samples=(
            Sample("k16 up10", (2, 12, 9), 12, 10, (16,), 4, dict(stride=10, padding=3)),
            Sample("k4 up2 g2", (1, 8, 7), 8, 6, (4,), 4, dict(stride=2, padding=1, output_padding=1, groups=2)),
        ),
    )
)
_register(
    OpSpec(
        name="lora_conv2d",
        kind="conv2d",
        base="Conv2d",
        options=(
            Option("stride", (1, 1), _ints(2), "int[2]"),
            Option("padding", (0, 0, 0, 0), _ints(4), "int[4]"),
            Option("dilation", (1, 1), _ints(2), "int[2]"),
            Option("groups", 1),
            Option("padding_mode", "zeros", _padding_mode, "str"),
        ),
        reference=ref.lora_conv2d_ref,
        delta=lambda A, B, s, g, k: ref.delta_weight_conv2d(A, B, s, g, k),
        samples=(
            # RVC's multi-period discriminator: (k, 1) kernels, stride (3, 1), padding ((k - 1)/2, 0)
            Sample("mpd k5x1 s3", (2, 4, 23, 3), 4, 6, (5, 1), 2, dict(stride=(3, 1), padding=(2, 2, 0, 0))),
            Sample(
                "k3x2 reflect g2 d2",
                (1, 6, 11, 9),
                6,
                4,
                (3, 2),
                4,
                dict(stride=(2, 1), padding=(1, 2, 1, 0), dilation=(2, 1), groups=2, padding_mode="reflect"),
            ),
            Sample(
                "k3 circular nobias",
                (2, 3, 7, 8),
                3,
                5,
                (3, 3),
                3,
                dict(padding=(1, 1, 2, 0), padding_mode="circular"),
                bias=False,
            ),
            Sample(
                "k2x3 replicate dropout",
                (2, 4, 6, 7),
                4,
                4,
                (2, 3),
                2,
                dict(stride=(1, 2), padding=(0, 1, 1, 1), padding_mode="replicate"),
                dropout_p=0.2,
            ),
        ),
    )
)

#: The layer kinds a layer record may name, one per op.
KINDS = tuple(s.kind for s in SPECS.values())


def spec_of(op: str) -> OpSpec:
    """The spec of op ``op`` (``"lora_conv1d"``); a one-line ``ValueError`` for an unknown op."""
    try:
        return SPECS[op]
    except KeyError:
        raise ValueError(f"op must be one of {tuple(SPECS)}, got {op!r}") from None


def spec_of_kind(kind: str) -> OpSpec:
    """The spec of layer kind ``kind`` (``"conv1d"``); a one-line ``ValueError`` for an unknown kind."""
    for s in SPECS.values():
        if s.kind == kind:
            return s
    raise ValueError(f"layer kind must be one of {KINDS}, got {kind!r}")


def sample_tensors(
    spec: OpSpec, sample: Sample, seed: int = 0, gen: torch.Generator | None = None, n: int | None = None
) -> dict[str, Tensor | None]:
    """Float64 masters ``x, weight, bias, lora_A, lora_B`` of ``sample`` (fan-in scaled, reproducible), drawn in
    that order from ``gen`` (else a generator seeded with ``seed``); ``n`` replaces the batch size."""
    gen = gen if gen is not None else torch.Generator().manual_seed(seed)
    g = spec.groups_of(sample.options)
    x_shape = sample.x if n is None else (n, *sample.x[1:])

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    taps = math.prod(sample.k)
    if spec.transposed:
        w_shape = (sample.cin, sample.cout // g, *sample.k)
        fan = sample.cin // g
    else:
        w_shape = (sample.cout, sample.cin // g, *sample.k)
        fan = sample.cin // g * taps
    shape_a, shape_b = spec.lora_shapes(w_shape, g, sample.r)
    return {
        "x": rnd(*x_shape),
        "weight": rnd(*w_shape, scale=fan**-0.5),
        "bias": rnd(sample.cout) if sample.bias else None,
        "lora_A": rnd(*shape_a, scale=shape_a[1] ** -0.5),
        "lora_B": rnd(*shape_b),
    }
