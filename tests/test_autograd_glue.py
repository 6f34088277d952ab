"""The one autograd glue of every backend (rvclora/ops/autograd.py): schemas from the op spec, and their check."""

from __future__ import annotations

import threading

import pytest
import torch

from rvclora.ops import autograd
from rvclora.ops.backends import cpu
from rvclora.ops.spec import SPECS


def _arguments(schema) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in schema.arguments]


@pytest.mark.parametrize("op", list(SPECS))
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_torch_backend_ops_are_declared_with_the_generated_schema(op, direction):
    generated = torch._C.parse_schema(f"x{autograd.schema(SPECS[op], direction)}")
    registered = getattr(torch.ops.rvclora, autograd.op_name("torch", SPECS[op], direction)).default._schema
    assert _arguments(registered) == _arguments(generated)
    assert [str(r.type) for r in registered.returns] == ["Tensor"] * (2 if direction == "fwd" else 5)


@pytest.mark.parametrize("op", ["lora_linear", "lora_conv1d", "lora_conv_transpose1d"])
def test_cpu_backend_cpp_schemas_match_the_spec(op):
    if cpu.unavailable_reason() is not None:
        pytest.skip(f"the cpu backend is unavailable here: {cpu.unavailable_reason()}")
    for direction in ("fwd", "bwd"):
        registered = getattr(torch.ops.rvclora, autograd.op_name("cpu", SPECS[op], direction)).default._schema
        assert str(registered).split("(", 1)[1] == autograd.schema(SPECS[op], direction)[1:]


def test_fused_op_refuses_an_op_that_breaks_the_argument_order():
    # lora_B before lora_A: the kind of drift one backend's glue could not see before
    spec = SPECS["lora_linear"]
    swapped = autograd.schema(spec, "fwd").replace("Tensor lora_A, Tensor lora_B", "Tensor lora_B, Tensor lora_A")
    name = autograd.op_name("gluetest", spec, "fwd")
    torch.library.custom_op(f"rvclora::{name}", lambda *a: (a[0], a[0]), mutates_args=(), schema=swapped)
    with pytest.raises(RuntimeError, match=f"rvclora::{name} takes .*the op spec asks for"):
        autograd.fused_op(spec, "gluetest")


def test_run_once_runs_once_across_threads():
    calls = []
    barrier = threading.Barrier(4)

    @autograd.run_once
    def register():
        calls.append(1)

    def worker():
        barrier.wait()
        register()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    register()
    assert calls == [1]
