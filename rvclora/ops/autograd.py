"""The autograd glue every backend's fused ops share: one shape for every backend.

A backend implements an op as two ``torch.library`` custom ops (C++ schemas, ``custom_op`` or ``triton_op``),
named by :func:`op_name` ``rvclora::<backend>_lora_<op>_{fwd,bwd}`` and taking the one argument order that
:func:`forward_args` and :func:`backward_args` derive from the op's :class:`~rvclora.ops.spec.OpSpec`::

    fwd(x, weight, bias, lora_A, lora_B, scaling, *options, dropout_p, seed) -> (y, u)
    bwd(grad_y, x, u, weight, lora_A, lora_B, scaling, *options, dropout_p, seed, needs)
        -> (grad_x, grad_weight, grad_bias, grad_A, grad_B)

``needs`` says which of ``(x, weight, bias, lora_A, lora_B)`` autograd asked a gradient for; the others come
back as empty ``(0,)`` tensors. :func:`fused_op` checks both schemas against the spec, registers the backward
op as the forward's gradient (with :func:`grad_fakes` as the backward's fake unless the backend has its own),
and returns ``run(*args) -> y``, the one way a backend calls its op:

* under ``torch.compile`` the forward custom op, so the graph holds one opaque node per layer and direction;
* eagerly a plain ``autograd.Function`` over the same bodies. The custom ops' own autograd costs a Python
  dispatch layer per call (hundreds of microseconds per call on CPU, times every adapted layer of a model);
  the Function calls a backend's Python bodies directly (``eager_fwd``/``eager_bwd``) or its compiled ops
  below the autograd key.

Autograd keeps ``x``, ``u``, the parameters and the seed, nothing activation-sized besides ``x`` and ``u``
(the dropout mask is regenerated from the seed in backward).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .spec import OpSpec

__all__ = [
    "op_name",
    "forward_args",
    "backward_args",
    "schema",
    "custom_op",
    "grad_fakes",
    "fused_op",
    "run_once",
]

#: The differentiable inputs of every op, in call order (what ``needs`` and the gradients refer to).
TENSOR_INPUTS = ("x", "weight", "bias", "lora_A", "lora_B")


def op_name(backend: str, spec: OpSpec, direction: str) -> str:
    """``"<backend>_lora_<op>_<direction>"`` (``cpu_lora_conv1d_fwd``); qualified as ``rvclora::`` + this."""
    return f"{backend}_{spec.name}_{direction}"


def forward_args(spec: OpSpec) -> tuple[str, ...]:
    """The forward op's argument names, in order."""
    return (*TENSOR_INPUTS, "scaling", *spec.option_names, "dropout_p", "seed")


def backward_args(spec: OpSpec) -> tuple[str, ...]:
    """The backward op's argument names, in order."""
    fwd = forward_args(spec)
    return ("grad_y", "x", "u", "weight", "lora_A", "lora_B", *fwd[5:], "needs")


def schema(spec: OpSpec, direction: str) -> str:
    """The op's schema (``torch.library`` syntax, without the name) generated from the spec; ``direction``:
    ``"fwd"`` or ``"bwd"``. The Python ops are declared with it, the C++ and Triton ones checked against it."""
    options = ", ".join(f"{o.schema} {o.name}" for o in spec.options)
    scalars = f"float scaling, {options + ', ' if options else ''}float dropout_p, Tensor? seed"
    if direction == "fwd":
        return f"(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, {scalars}) -> (Tensor, Tensor)"
    return (
        f"(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, Tensor lora_B, {scalars}, bool[5] needs)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    )


def custom_op(spec: OpSpec, backend: str, direction: str, fn: Callable[..., Any]) -> Any:
    """``fn`` as the custom op ``rvclora::<backend>_lora_<op>_<direction>``, with the schema :func:`schema` generates
    (so a Python body needs no annotations to declare it)."""
    name = f"rvclora::{op_name(backend, spec, direction)}"
    return torch.library.custom_op(name, fn, mutates_args=(), schema=schema(spec, direction))


def _check_schema(qualname: str, expected: str) -> None:
    """The registered op takes the arguments (names, order and types) of the schema generated from the spec."""
    ns, name = qualname.split("::")
    registered = getattr(getattr(torch.ops, ns), name).default._schema
    got = tuple((a.name, str(a.type)) for a in registered.arguments)
    want = tuple((a.name, str(a.type)) for a in torch._C.parse_schema(f"{name}{expected}").arguments)
    if got != want:
        raise RuntimeError(f"{qualname} takes {got}; the op spec asks for {want}")


def _transposed_2d(x: Tensor) -> bool:
    """A transposed matrix (``x.t()`` of a contiguous one), both dims > 1."""
    return x.dim() == 2 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(0) == 1 and x.stride(1) == x.shape[0]


def _channels_last_2d(x: Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not also contiguous), as the convolution library keeps it."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def grad_fakes(spec: OpSpec) -> Callable[..., tuple[Tensor, ...]]:
    """The backward op's fake: contiguous gradients shaped like their inputs (the bias's from the spec's output
    channels), in ``x``'s dtype for ``x``, the weight and the bias and in the factors' own for the factors;
    empty ``(0,)`` tensors where not needed. ``grad_x`` has the layout the base layer's autograd gives: transposed
    for a Linear's transposed 2-D ``x``, channels-last for a channels-last 4-D ``x`` of a convolution."""
    # args (after lora_B): scaling, *options, dropout_p, seed, needs
    groups_at = 1 + spec.option_names.index("groups") if spec.grouped else None
    linear = not spec.option_names

    def fake(grad_y, x, u, weight, lora_A, lora_B, *args):
        needs = args[-1]
        groups = args[groups_at] if groups_at is not None else 1
        shapes = (x.shape, weight.shape, (spec.out_channels(weight.shape, groups),), lora_A.shape, lora_B.shape)
        dtypes = (x.dtype, x.dtype, x.dtype, lora_A.dtype, lora_B.dtype)
        out = [x.new_empty(s, dtype=d) if n else x.new_empty(0) for s, d, n in zip(shapes, dtypes, needs)]
        if needs[0] and linear and _transposed_2d(x):
            out[0] = x.new_empty(x.shape[1], x.shape[0]).t()
        elif needs[0] and _channels_last_2d(x):
            out[0] = out[0].contiguous(memory_format=torch.channels_last)
        return tuple(out)

    return fake


def fused_op(
    spec: OpSpec,
    backend: str,
    *,
    eager_fwd: Callable[..., Any] | None = None,
    eager_bwd: Callable[..., Any] | None = None,
    below_autograd: bool = False,
    contiguous_grad: bool = False,
    bwd_fake: bool = True,
    eager_native: Callable[..., Tensor] | None = None,
) -> Callable[..., Tensor]:
    """Register the autograd of ``rvclora::<backend>_lora_<op>_fwd`` and return ``run(*args) -> y``.

    ``eager_fwd``/``eager_bwd``: the bodies the eager Function calls (default: the custom ops themselves);
    ``eager_bwd`` may return ``None`` for an unneeded gradient. ``below_autograd``: call the ops below the
    autograd key eagerly (compiled ops: skips their Python autograd layer). ``contiguous_grad``: the backward
    bodies need a contiguous ``grad_y``. ``bwd_fake``: register :func:`grad_fakes` as the backward's fake
    (``triton_op`` derives its own). ``eager_native``: an op with its own (C++) autograd over the same bodies,
    taking the forward's arguments and returning ``y``, called eagerly instead of the Python Function.
    """
    fwd_name, bwd_name = op_name(backend, spec, "fwd"), op_name(backend, spec, "bwd")
    _check_schema(f"rvclora::{fwd_name}", schema(spec, "fwd"))
    _check_schema(f"rvclora::{bwd_name}", schema(spec, "bwd"))
    fwd_op = getattr(torch.ops.rvclora, fwd_name).default
    bwd_op = getattr(torch.ops.rvclora, bwd_name).default
    if bwd_fake:
        torch.library.register_fake(f"rvclora::{bwd_name}")(grad_fakes(spec))
    n_inputs = len(forward_args(spec))
    no_grads = (None,) * n_inputs
    tail = (None,) * (n_inputs - len(TENSOR_INPUTS))

    def make_backward(bwd: Callable[..., Any]) -> Callable[..., tuple[Tensor | None, ...]]:
        def backward(ctx, grad_y, *_grad_u):
            n = ctx.needs_input_grad
            needs = [n[0], n[1], n[2], n[3], n[4]]
            if not (needs[0] or needs[1] or needs[2] or needs[3] or needs[4]):
                return no_grads
            x, u, weight, lora_A, lora_B, seed = ctx.saved_tensors
            if contiguous_grad:
                grad_y = grad_y.contiguous()
            g = bwd(grad_y, x, u, weight, lora_A, lora_B, *ctx.scalars, seed, needs)
            return (
                g[0] if needs[0] else None,
                g[1] if needs[1] else None,
                g[2] if needs[2] else None,
                g[3] if needs[3] else None,
                g[4] if needs[4] else None,
                *tail,
            )

        return backward

    def setup_context(ctx, inputs, output):
        # x and u are the LoRA's memory cost; the scalars are the options between lora_B and seed.
        ctx.save_for_backward(inputs[0], output[1], inputs[1], inputs[3], inputs[4], inputs[-1])
        ctx.scalars = inputs[5:-1]
        ctx.mark_non_differentiable(output[1])

    torch.library.register_autograd(f"rvclora::{fwd_name}", make_backward(bwd_op), setup_context=setup_context)

    fwd_body = eager_fwd if eager_fwd is not None else fwd_op
    eager_backward = make_backward(eager_bwd if eager_bwd is not None else bwd_op)
    if below_autograd:

        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                y, u = fwd_body(*args)
            ctx.save_for_backward(args[0], u, args[1], args[3], args[4], args[-1])
            ctx.scalars = args[5:-1]
            return y

        def backward(ctx, grad_y):
            with torch._C._AutoDispatchBelowAutograd():
                return eager_backward(ctx, grad_y)

    else:

        def forward(ctx, *args):
            y, u = fwd_body(*args)
            ctx.save_for_backward(args[0], u, args[1], args[3], args[4], args[-1])
            ctx.scalars = args[5:-1]
            return y

        backward = eager_backward

    function: Any = type(
        f"_{fwd_name}_Function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )
    apply = eager_native if eager_native is not None else function.apply
    is_compiling = torch.compiler.is_compiling

    def run(*args: Any) -> Tensor:
        if is_compiling():
            return fwd_op(*args)[0]
        return apply(*args)

    return run


def run_once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run at most once per process, however many threads call it (a compiled backend registers its
    Python parts, fakes and :func:`fused_op`, once its library has loaded)."""
    done = threading.Event()
    lock = threading.Lock()

    @functools.wraps(fn)
    def once() -> None:
        if done.is_set():
            return
        with lock:
            if not done.is_set():
                fn()
                done.set()

    return once
