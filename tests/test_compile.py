"""torch.compile: every layer and the injected RVC generator trace with ``fullgraph=True``.

A graph break anywhere (the backend dispatcher, the dropout seed, the autocast check) fails
these tests, and each compiled run is held to the eager run of the same module: outputs and
the gradients of the input, the LoRA factors and the trainable bias.

The cases run through the default **inductor** backend, which (unlike ``aot_eager``) asserts that
every custom op's real outputs have the sizes and strides its fake kernel promised: each layer kind
at batch 1 and 2, the injected generator at batch 1 and 4. Inductor compiles C++ on CPU, so the
inputs are short and the number of graphs small. The dropout cases keep ``aot_eager`` for the
seed-per-call check, plus one inductor case with ``fallback_random`` (inductor otherwise draws its
own random numbers rather than torch's global generator, so eager and compiled masks would differ).
"""

from __future__ import annotations

import pytest
import torch

from rvclora import LoRAConfig, LoRAConv1d, LoRAConv2d, LoRAConvTranspose1d, LoRALinear, inject_lora
from rvclora.models.rvc import GeneratorConfig, build_generator
from rvclora.ops import dispatch

# A miniature of RVC's decoder layout: two weight-normed upsamplers, ResBlock1s, speaker cond.
TINY_RVC = GeneratorConfig(
    "tiny",
    "v2",
    16000,
    (4, 2),
    (8, 4),
    8,
    inter_channels=8,
    upsample_initial_channel=16,
    resblock_kernel_sizes=(3,),
    resblock_dilation_sizes=((1, 3),),
    gin_channels=4,
)


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test compiles as in a process that has just imported rvclora: its own dynamo caches (others'
    graphs would count towards recompile limits) and only the backends ``import rvclora`` loads, so an
    eager call made by an earlier test cannot hide a backend import inside a trace."""
    torch._dynamo.reset()
    monkeypatch.setattr(dispatch, "_loaded", {})
    monkeypatch.setattr(dispatch, "_import_errors", {})
    dispatch.preload_backends()  # what rvclora.ops runs at import
    yield
    torch._dynamo.reset()


def _randomise_lora(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero ``B`` so that the LoRA path (and the gradient of ``A``) is not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.rpartition(".")[2] == "lora_B":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _layer(kind: str, dropout: float, batch: int = 2) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LoRALinear(6, 5, r=2, lora_dropout=dropout), torch.randn(batch, 4, 6)
    elif kind == "linear2d":
        layer, x = LoRALinear(6, 5, r=2, lora_dropout=dropout), torch.randn(batch, 6)
    elif kind == "conv1d":
        layer, x = LoRAConv1d(4, 6, 3, r=2, padding=2, dilation=2, lora_dropout=dropout), torch.randn(batch, 4, 9)
    elif kind == "conv2d":  # RVC's DiscriminatorP layer, the shared sample table's first Conv2d sample
        from rvclora.ops.spec import SPECS

        sample = SPECS["lora_conv2d"].samples[0]
        layer = LoRAConv2d(
            sample.cin, sample.cout, sample.k, r=sample.r, lora_dropout=dropout, stride=(3, 1), padding=(2, 0)
        )
        x = torch.randn(batch, *sample.x[1:])
    else:
        layer = LoRAConvTranspose1d(4, 6, 4, stride=2, padding=1, r=2, lora_dropout=dropout)
        x = torch.randn(batch, 4, 5)
    layer.weight.requires_grad_(False)  # as after inject_lora; the bias trains (bias="lora_only")
    _randomise_lora(layer)
    return layer.train(), x.requires_grad_(True)


def _run(fn, module: torch.nn.Module, inputs: tuple, seed: int):
    """Output and gradients of ``fn(*inputs)`` (loss: a fixed weighting, so every output element matters)."""
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None
    torch.manual_seed(seed)  # the dropout seed of the call comes from the global generator
    y = fn(*inputs)
    weights = torch.linspace(-1.0, 1.0, y.numel()).reshape(y.shape)
    (y * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    grads.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs) if t.requires_grad})
    return y.detach(), grads


def _assert_same(eager, compiled) -> None:
    (y_e, g_e), (y_c, g_c) = eager, compiled
    torch.testing.assert_close(y_c, y_e)
    assert g_c.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], msg=lambda m, n=name: f"gradient of {n}: {m}")


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["linear", "linear2d", "conv1d", "conv_transpose1d", "conv2d"])
def test_layer_compiles_with_inductor_like_eager(kind, batch):
    layer, x = _layer(kind, 0.0, batch)
    compiled = torch.compile(layer, fullgraph=True)  # the default backend: inductor
    got = _run(compiled, layer, (x,), 0)
    _assert_same(_run(layer, layer, (x,), 0), got)


def test_conv1d_direct_plan_compiles_with_inductor_like_eager(monkeypatch):
    """The cpu backend's direct Conv1d plan (its own kernel for the convolution) under inductor: the compiled
    _fwd/_bwd ops run it as the eager op does (the suite's fixed mode otherwise runs the library plan)."""
    monkeypatch.setenv("RVCLORA_CPU_CONV1D", "direct")
    layer, x = _layer("conv1d", 0.0, 2)
    compiled = torch.compile(layer, fullgraph=True)
    got = _run(compiled, layer, (x,), 0)
    _assert_same(_run(layer, layer, (x,), 0), got)
    monkeypatch.setenv("RVCLORA_CPU_CONV1D", "library")
    _assert_same(_run(layer, layer, (x,), 0), got)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv_transpose1d", "conv2d"])
def test_dropout_layer_compiles_fullgraph_like_eager(kind):
    layer, x = _layer(kind, 0.3)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        got = _run(compiled, layer, (x,), seed)  # first: a cold trace must not depend on an earlier eager call
        _assert_same(_run(layer, layer, (x,), seed), got)
    # the seed must be drawn per call inside the graph, not frozen into it at trace time
    y1, _ = _run(compiled, layer, (x,), 1)
    y2, _ = _run(compiled, layer, (x,), 2)
    assert not torch.equal(y1, y2), "compiled dropout reused one mask for two different seeds"


def test_dropout_layer_compiles_with_inductor_like_eager():
    layer, x = _layer("conv1d", 0.3, batch=1)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True)
        for seed in (1, 2):
            got = _run(compiled, layer, (x,), seed)
            _assert_same(_run(layer, layer, (x,), seed), got)


@pytest.mark.parametrize("batch", [1, 4])
def test_injected_generator_compiles_with_inductor_like_eager(batch):
    model = build_generator(TINY_RVC, f0=False, seed=0)
    inject_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=["ups", "resblocks", "cond"], bias="lora_only"))
    _randomise_lora(model)
    model.train()
    x = torch.randn(batch, TINY_RVC.inter_channels, 6)
    g = torch.randn(batch, TINY_RVC.gin_channels, 1)
    compiled = torch.compile(model, fullgraph=True)
    got = _run(compiled, model, (x, g), 0)
    eager = _run(model, model, (x, g), 0)
    _assert_same(eager, got)
    n_lora = sum(1 for name in eager[1] if name.endswith(("lora_A", "lora_B")))
    assert n_lora == 2 * (2 + 2 * 4 + 1), "expected LoRA on 2 ups, 2 resblocks x 4 convs and cond"
