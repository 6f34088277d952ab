"""RVC's generator: exact parameter layout per shipped config, state-dict round trips, forward shapes.

The expected layout is derived here from RVC's shipped configs (``docs/rvc.md``) (the table below is
that document's table), independently of :mod:`rvclora.models.rvc`.
"""

from __future__ import annotations

import math

import pytest
import torch

from rvclora.models.rvc import (
    GENERATOR_CONFIGS,
    Generator,
    GeneratorNSF,
    SineGen,
    build_generator,
    get_generator_config,
)

# RVC's shipped configs (docs/rvc.md): config -> (sr, hop, segment frames, upsample_rates, upsample_kernel_sizes)
RVC_TABLE = {
    "v1-32k": (32000, 320, 40, [10, 4, 2, 2, 2], [16, 16, 4, 4, 4]),
    "40k": (40000, 400, 32, [10, 10, 2, 2], [16, 16, 4, 4]),
    "v1-48k": (48000, 480, 24, [10, 6, 2, 2, 2], [16, 16, 4, 4, 4]),
    "v2-32k": (32000, 320, 40, [10, 8, 2, 2], [20, 16, 4, 4]),
    "v2-48k": (48000, 480, 36, [12, 10, 2, 2], [24, 20, 4, 4]),
}
INTER, UP_INIT, GIN = 192, 512, 256
RES_KERNELS = [3, 7, 11]


def expected_layout(rates: list[int], kernels: list[int], f0: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of RVC's decoder state dict (legacy weight_norm), from docs/rvc.md."""
    out: dict[str, tuple[int, ...]] = {}
    if f0:
        out["m_source.l_linear.weight"] = (1, 1)
        out["m_source.l_linear.bias"] = (1,)
        for i in range(len(rates)):
            c = UP_INIT // 2 ** (i + 1)
            s = math.prod(rates[i + 1 :])
            k = 2 * s if i + 1 < len(rates) else 1
            out[f"noise_convs.{i}.weight"] = (c, 1, k)
            out[f"noise_convs.{i}.bias"] = (c,)
    out["conv_pre.weight"] = (UP_INIT, INTER, 7)
    out["conv_pre.bias"] = (UP_INIT,)
    for i, k in enumerate(kernels):
        cin, cout = UP_INIT // 2**i, UP_INIT // 2 ** (i + 1)
        out[f"ups.{i}.bias"] = (cout,)
        out[f"ups.{i}.weight_g"] = (cin, 1, 1)  # per input channel for the transposed conv
        out[f"ups.{i}.weight_v"] = (cin, cout, k)
    for i in range(len(rates)):
        c = UP_INIT // 2 ** (i + 1)
        for j, k in enumerate(RES_KERNELS):
            for conv in ("convs1", "convs2"):
                for n in range(3):
                    p = f"resblocks.{3 * i + j}.{conv}.{n}"
                    out[f"{p}.bias"] = (c,)
                    out[f"{p}.weight_g"] = (c, 1, 1)
                    out[f"{p}.weight_v"] = (c, c, k)
    c_last = UP_INIT // 2 ** len(rates)
    out["conv_post.weight"] = (1, c_last, 7)
    out["cond.weight"] = (UP_INIT, GIN, 1)
    out["cond.bias"] = (UP_INIT,)
    return out


@pytest.mark.parametrize("f0", [True, False], ids=["f0", "nof0"])
@pytest.mark.parametrize("name", sorted(RVC_TABLE))
def test_layout_matches_rvc(name: str, f0: bool) -> None:
    sr, hop, frames, rates, kernels = RVC_TABLE[name]
    cfg = get_generator_config(name)
    assert (cfg.sampling_rate, cfg.hop_length, cfg.segment_frames) == (sr, hop, frames)
    assert list(cfg.upsample_rates) == rates and list(cfg.upsample_kernel_sizes) == kernels
    model = build_generator(name, f0=f0, seed=0)
    assert isinstance(model, GeneratorNSF if f0 else Generator)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = expected_layout(rates, kernels, f0)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in want.values())


def test_key_order_follows_rvc() -> None:
    keys = list(build_generator("40k", seed=0).state_dict())
    firsts = [
        next(i for i, k in enumerate(keys) if k.startswith(p))
        for p in ("m_source.", "noise_convs.", "conv_pre.", "ups.", "resblocks.", "conv_post.", "cond.")
    ]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize(("name", "millions"), [("40k", 14.5), ("v2-32k", 15.0), ("v2-48k", 15.7)])
def test_parameter_counts_match_rvc(name: str, millions: float) -> None:
    n = sum(p.numel() for p in build_generator(name, seed=0).parameters())
    assert abs(n / 1e6 - millions) < 0.05, n


def test_aliases_and_unknown_names() -> None:
    assert get_generator_config("v2-40k") is get_generator_config("40k")
    assert get_generator_config("V1-40K") is GENERATOR_CONFIGS["40k"]
    with pytest.raises(ValueError, match=r"unknown RVC generator config '44k'.*expected one of"):
        build_generator("44k")
    with pytest.raises(ValueError, match="weight_norm must be one of"):
        build_generator("40k", weight_norm="none")
    with pytest.raises(TypeError, match="seed must be an int"):
        build_generator("40k", seed=1.5)  # type: ignore[arg-type]


def _inputs(frames: int, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, INTER, frames, generator=gen)
    f0 = 100 + 200 * torch.rand(batch, frames, generator=gen)
    f0[:, :1] = 0.0  # one unvoiced frame: the noise branch runs too
    g = torch.randn(batch, GIN, 1, generator=gen)
    return x, f0, g


@pytest.mark.parametrize("name", sorted(RVC_TABLE))
def test_output_length_is_frames_times_hop(name: str) -> None:
    hop = RVC_TABLE[name][1]
    x, f0, g = _inputs(frames=3, batch=2)
    with torch.no_grad():
        y = build_generator(name, seed=0)(x, f0, g, generator=torch.Generator().manual_seed(0))
        y_nof0 = build_generator(name, f0=False, seed=0)(x, g)
    assert y.shape == y_nof0.shape == (2, 1, 3 * hop)
    assert torch.isfinite(y).all() and y.abs().max() <= 1


def test_strict_round_trip_with_rvc_dec_prefix() -> None:
    """An RVC decoder state dict (``dec.`` keys) loads strictly, and ours exports to the same keys."""
    src = build_generator("40k", seed=1)
    rvc_sd = {f"dec.{k}": v.clone() for k, v in src.state_dict().items()}
    rvc_sd["enc_p.emb_phone.weight"] = torch.zeros(2, 2)  # other synthesizer keys are not the decoder's
    dst = build_generator("40k", seed=2)
    dec = {k[len("dec.") :]: v for k, v in rvc_sd.items() if k.startswith("dec.")}
    dst.load_state_dict(dec, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, rvc_sd[f"dec.{k}"]), k
    x, f0, g = _inputs(frames=4)
    with torch.no_grad():
        a = src(x, f0, g, generator=torch.Generator().manual_seed(3))
        b = dst(x, f0, g, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_parametrizations_weight_norm_is_the_same_function() -> None:
    legacy = build_generator("40k", seed=4)
    param = build_generator("40k", seed=4, weight_norm="parametrizations")
    keys = set(param.state_dict())
    assert "ups.0.parametrizations.weight.original0" in keys and "ups.0.weight_g" not in keys
    assert param.state_dict()["ups.0.parametrizations.weight.original0"].shape == (512, 1, 1)
    x, f0, g = _inputs(frames=2)
    with torch.no_grad():
        a = legacy(x, f0, g, generator=torch.Generator().manual_seed(0))
        b = param(x, f0, g, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seeds_make_runs_reproducible() -> None:
    a, b = build_generator("40k", seed=5), build_generator("40k", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv_pre.weight, build_generator("40k", seed=6).conv_pre.weight)
    x, f0, g = _inputs(frames=2)
    with torch.no_grad():
        y1 = a(x, f0, g, generator=torch.Generator().manual_seed(7))
        y2 = b(x, f0, g, generator=torch.Generator().manual_seed(7))
        y3 = b(x, f0, g, generator=torch.Generator().manual_seed(8))
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)  # the source noise is really drawn from the generator


def test_init_weights_normal_001() -> None:
    model = build_generator("40k", seed=0)
    for name in ("ups.0", "ups.1", "resblocks.3.convs1.1", "resblocks.5.convs2.2"):
        mod = model.get_submodule(name)
        g, v = mod.weight_g, mod.weight_v
        dims = tuple(range(1, v.dim()))
        w = g * v / v.norm(dim=dims, keepdim=True)
        assert abs(w.std().item() - 0.01) < 0.0005, (name, w.std().item())


def test_sine_source_is_a_continuous_sine_at_f0() -> None:
    """Noise off: voiced output is ``0.1·sin(2π f0 (n+1)/sr)`` across frame boundaries; unvoiced is 0."""
    sr, upp, f0_hz = 40000, 400, 220.0
    sine = SineGen(sr, noise_std=0.0)
    f0 = torch.full((1, 6), f0_hz)
    out = sine(f0, upp, torch.Generator().manual_seed(0))[0, :, 0].double()
    n = torch.arange(1, 6 * upp + 1, dtype=torch.float64)
    torch.testing.assert_close(out, 0.1 * torch.sin(2 * math.pi * f0_hz * n / sr), rtol=0, atol=2e-5)
    f0[:, 3:] = 0.0
    quiet = SineGen(sr, noise_std=0.0, sine_amp=0.1)(f0, upp, torch.Generator().manual_seed(0))[0, :, 0]
    assert quiet[3 * upp :].std() > 0.02  # unvoiced: noise of std sine_amp/3
    assert abs(quiet[3 * upp :].std().item() - 0.1 / 3) < 0.005


def test_bad_inputs_name_the_argument() -> None:
    model = build_generator("40k", seed=0)
    x, f0, g = _inputs(frames=2)
    with pytest.raises(ValueError, match=r"x must be \(batch, 192, frames\)"):
        model(x[:, :100], f0, g)
    with pytest.raises(ValueError, match=r"f0 must be \(batch, frames\) = \(1, 2\)"):
        model(x, f0[:, :1], g)
    with pytest.raises(ValueError, match=r"g must be \(1, 256"):
        model(x, f0, g[:, :10])
    no_spk = Generator(INTER, "1", [3], [[1, 3, 5]], [2], 16, [4], gin_channels=0)
    with pytest.raises(ValueError, match="no speaker conditioning"):
        no_spk(x, g)
    with pytest.raises(ValueError, match="resblock must be '1'"):
        Generator(INTER, "2", [3], [[1, 3, 5]], [2], 16, [4])
