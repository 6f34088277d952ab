"""``torch.library.opcheck`` on every registered custom op, and fake strides equal to the real ones.

Inductor asserts that each custom op's real outputs have the sizes and strides its fake kernel
promised; ``opcheck`` checks the schema, the autograd registration, the fake kernel and AOT
dispatch. Samples cover batch 1, unbatched and 3-D Linear inputs, transposed inputs, dropout on,
and each dtype (half activations with float32 factors, as under autocast).

To check another backend's ops, add its forward/backward custom ops to ``OPS`` with an adapter
from the op-boundary arguments below.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from rvclora.ops.backends import torch as tb

# backend -> op kind -> (forward custom op, backward custom op)
OPS = {
    "torch": {
        "linear": (tb._linear_fwd, tb._linear_bwd),
        "conv1d": (tb._conv1d_fwd, tb._conv1d_bwd),
        "convt": (tb._convt_fwd, tb._convt_bwd),
    },
}

DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


def _x_cases(kind):
    if kind == "linear":
        return {"2d": (4, 10), "batch1": (1, 10), "unbatched": (10,), "3d": (3, 5, 10), "transposed": (10, 4)}
    return {"batch1": (1, 4, 9), "batch2": (2, 4, 9), "channels_inner": (2, 9, 4)}


def _fwd_args(kind, x_name, shape, dt, fdt, dropout):
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, dtype=dt):
        return torch.randn(*s, generator=gen).to(dtype)

    x = rnd(*shape)
    if x_name in ("transposed", "channels_inner"):
        x = x.transpose(-1, -2) if kind == "linear" else x.transpose(1, 2)
    seed = torch.tensor(99, dtype=torch.int64) if dropout else None
    if kind == "linear":
        return (x, rnd(8, 10), rnd(8), rnd(2, 10, dtype=fdt), rnd(8, 2, dtype=fdt), 0.5, dropout, seed)
    if kind == "conv1d":
        return (
            x,
            rnd(6, 4, 3),
            rnd(6),
            rnd(2, 12, dtype=fdt),
            rnd(6, 2, dtype=fdt),
            0.5,
            1,
            [1, 1],
            1,
            1,
            "zeros",
            dropout,
            seed,
        )
    return (x, rnd(4, 6, 4), rnd(6), rnd(2, 4, dtype=fdt), rnd(2, 24, dtype=fdt), 0.5, 2, 1, 0, 1, 1, dropout, seed)


def _cases():
    for backend, ops in OPS.items():
        for kind in ops:
            for (x_name, shape), (dt, fdt), dropout in itertools.product(_x_cases(kind).items(), DTYPES, (0.0, 0.2)):
                # every layout in float32 with and without dropout, every dtype at batch 1 (opcheck compiles
                # each sample several ways: the full product would take minutes on a small CI machine)
                if (dt, fdt) != (torch.float32, torch.float32) and (x_name != "batch1" or dropout):
                    continue
                yield pytest.param(
                    backend,
                    kind,
                    x_name,
                    shape,
                    dt,
                    fdt,
                    dropout,
                    id=f"{backend}-{kind}-{x_name}-{str(dt)[6:]}-f{str(fdt)[6:]}-p{dropout}",
                )


def _significant(t):
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


def _assert_fake_matches_real(op, args, what):
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype, f"{what} output {i}: {r.shape}/{f.shape}"
        assert _significant(r) == _significant(f), (
            f"{what} output {i}: real strides {r.stride()} != fake {f.stride()} (shape {tuple(r.shape)})"
        )
    return real


@pytest.mark.parametrize("backend, kind, x_name, shape, dt, fdt, dropout", list(_cases()))
def test_opcheck_forward_and_backward(backend, kind, x_name, shape, dt, fdt, dropout):
    fwd, bwd = OPS[backend][kind]
    args = _fwd_args(kind, x_name, shape, dt, fdt, dropout)
    y, u = _assert_fake_matches_real(fwd, args, f"{kind} forward")
    grad_args = tuple(
        a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    torch.library.opcheck(fwd, grad_args)
    x, weight, bias, lora_A, lora_B, *rest = args
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    for needs in ([True] * 5, [True, False, False, True, True], [False, False, True, False, True]):
        bargs = (grad, x, u, weight, lora_A, lora_B, *rest, needs)
        _assert_fake_matches_real(bwd, bargs, f"{kind} backward needs={needs}")
        if all(needs):
            torch.library.opcheck(bwd, bargs)


# --------------------------------------------------------------------------- from the shared sample table

# ops whose opcheck samples come from rvclora.ops.spec's table (op -> backend -> (forward, backward) custom op)
SPEC_OPS = {"lora_conv2d": {"torch": (tb._conv2d_fwd, tb._conv2d_bwd)}}


def _spec_cases():
    from rvclora.ops.spec import SPECS

    for op, backends in SPEC_OPS.items():
        for backend, (i, sample), (dt, fdt) in itertools.product(backends, enumerate(SPECS[op].samples), DTYPES):
            if (dt, fdt) != (torch.float32, torch.float32) and i:
                continue  # every sample in float32, every dtype on the first
            for layout in ("contiguous", "channels_last") if i == 0 and dt == torch.float32 else ("contiguous",):
                yield pytest.param(
                    op,
                    backend,
                    i,
                    dt,
                    fdt,
                    layout,
                    id=f"{backend}-{op}-{sample.label}-{str(dt)[6:]}-f{str(fdt)[6:]}-{layout}",
                )


@pytest.mark.parametrize("op, backend, index, dt, fdt, layout", list(_spec_cases()))
def test_opcheck_spec_samples(op, backend, index, dt, fdt, layout):
    from rvclora.ops.spec import SPECS, sample_tensors

    spec = SPECS[op]
    sample = spec.samples[index]
    fwd, bwd = SPEC_OPS[op][backend]
    t = sample_tensors(spec, sample, seed=index)
    x = t["x"].to(dt)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    bias = t["bias"].to(dt) if t["bias"] is not None else None
    options = [list(v) if isinstance(v, tuple) else v for v in spec.option_values(sample.options)]
    seed = torch.tensor(7, dtype=torch.int64) if sample.dropout_p else None
    args = (
        x,
        t["weight"].to(dt),
        bias,
        t["lora_A"].to(fdt),
        t["lora_B"].to(fdt),
        0.5,
        *options,
        sample.dropout_p,
        seed,
    )
    y, u = _assert_fake_matches_real(fwd, args, f"{op} forward")
    grad_args = tuple(
        a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )
    torch.library.opcheck(fwd, grad_args)
    x, weight, _bias, lora_A, lora_B, *rest = args
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    for needs in ([True] * 5, [True, False, False, True, True], [False, False, True, False, True]):
        bargs = (grad, x, u, weight, lora_A, lora_B, *rest, needs)
        _assert_fake_matches_real(bwd, bargs, f"{op} backward needs={needs}")
        if all(needs):
            torch.library.opcheck(bwd, bargs)
