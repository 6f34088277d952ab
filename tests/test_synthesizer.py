"""RVC's whole synthesizer and discriminator: key/shape tables, init, forward and infer.

The expected layout outside ``dec.`` is derived here from docs/rvc.md's table (RVC's keys, counts and
shapes), independently of :mod:`rvclora.models.synthesizer`; the decoder's own layout is tested in
test_rvc_model.py. Forward tests use a tiny synthesizer (RVC's classes with small arguments) and
shipped sizes only where the sizes are the point.
"""

from __future__ import annotations

import math

import pytest
import torch

from rvclora.models import build_generator
from rvclora.models.discriminator import (
    PERIODS_V1,
    PERIODS_V2,
    build_discriminator,
    discriminator_loss,
    feature_loss,
    generator_loss,
    kl_loss,
)
from rvclora.models.synthesizer import (
    SYNTHESIZER_CONFIGS,
    SynthesizerTrnMs256NSFsid,
    SynthesizerTrnMs256NSFsid_nono,
    SynthesizerTrnMs768NSFsid,
    SynthesizerTrnMs768NSFsid_nono,
    build_synthesizer,
    get_synthesizer_config,
    synthesizer_from_rvc_config,
)

HIDDEN, FILTER, INTER, GIN, SPK, LAYERS = 192, 768, 192, 256, 109, 6
SPEC = {"32k": 513, "40k": 1025, "48k": 1025}
GEN_NAME = {
    "v1-32k": "v1-32k",
    "v1-40k": "40k",
    "v1-48k": "v1-48k",
    "v2-32k": "v2-32k",
    "v2-40k": "40k",
    "v2-48k": "v2-48k",
}


def _wn(prefix: str, out: int, inp: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.bias": (out,), f"{prefix}.weight_g": (out, 1, 1), f"{prefix}.weight_v": (out, inp, k)}


def _wn_stack(prefix: str, n_layers: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for i in range(n_layers):
        out.update(_wn(f"{prefix}.in_layers.{i}", 2 * HIDDEN, HIDDEN, 5))
    for i in range(n_layers):
        out.update(_wn(f"{prefix}.res_skip_layers.{i}", 2 * HIDDEN if i < n_layers - 1 else HIDDEN, HIDDEN, 1))
    out.update(_wn(f"{prefix}.cond_layer", 2 * HIDDEN * n_layers, GIN, 1))
    return out


def expected_outside_dec(version: str, sr: str, f0: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """docs/rvc.md's table, per top-level module, in RVC's key order."""
    phone = 256 if version == "v1" else 768
    enc_p: dict[str, tuple[int, ...]] = {"enc_p.emb_phone.weight": (HIDDEN, phone), "enc_p.emb_phone.bias": (HIDDEN,)}
    if f0:
        enc_p["enc_p.emb_pitch.weight"] = (256, HIDDEN)
    e = "enc_p.encoder"
    for i in range(LAYERS):
        enc_p[f"{e}.attn_layers.{i}.emb_rel_k"] = (1, 21, 96)
        enc_p[f"{e}.attn_layers.{i}.emb_rel_v"] = (1, 21, 96)
        for c in "qkvo":
            enc_p[f"{e}.attn_layers.{i}.conv_{c}.weight"] = (HIDDEN, HIDDEN, 1)
            enc_p[f"{e}.attn_layers.{i}.conv_{c}.bias"] = (HIDDEN,)
    for i in range(LAYERS):
        enc_p[f"{e}.norm_layers_1.{i}.gamma"] = (HIDDEN,)
        enc_p[f"{e}.norm_layers_1.{i}.beta"] = (HIDDEN,)
    for i in range(LAYERS):
        enc_p[f"{e}.ffn_layers.{i}.conv_1.weight"] = (FILTER, HIDDEN, 3)
        enc_p[f"{e}.ffn_layers.{i}.conv_1.bias"] = (FILTER,)
        enc_p[f"{e}.ffn_layers.{i}.conv_2.weight"] = (HIDDEN, FILTER, 3)
        enc_p[f"{e}.ffn_layers.{i}.conv_2.bias"] = (HIDDEN,)
    for i in range(LAYERS):
        enc_p[f"{e}.norm_layers_2.{i}.gamma"] = (HIDDEN,)
        enc_p[f"{e}.norm_layers_2.{i}.beta"] = (HIDDEN,)
    enc_p["enc_p.proj.weight"] = (2 * INTER, HIDDEN, 1)
    enc_p["enc_p.proj.bias"] = (2 * INTER,)
    enc_q = {"enc_q.pre.weight": (HIDDEN, SPEC[sr], 1), "enc_q.pre.bias": (HIDDEN,)}
    enc_q.update(_wn_stack("enc_q.enc", 16))
    enc_q.update({"enc_q.proj.weight": (2 * INTER, HIDDEN, 1), "enc_q.proj.bias": (2 * INTER,)})
    flow: dict[str, tuple[int, ...]] = {}
    for n in (0, 2, 4, 6):
        flow[f"flow.flows.{n}.pre.weight"] = (HIDDEN, INTER // 2, 1)
        flow[f"flow.flows.{n}.pre.bias"] = (HIDDEN,)
        flow.update(_wn_stack(f"flow.flows.{n}.enc", 3))
        flow[f"flow.flows.{n}.post.weight"] = (INTER // 2, HIDDEN, 1)
        flow[f"flow.flows.{n}.post.bias"] = (INTER // 2,)
    return {"enc_p": enc_p, "enc_q": enc_q, "flow": flow, "emb_g": {"emb_g.weight": (SPK, GIN)}}


def _meta_synth(name: str, f0: bool, weight_norm: str = "legacy"):
    with torch.device("meta"):
        return build_synthesizer(name, f0, weight_norm=weight_norm)


@pytest.mark.parametrize("f0", [True, False], ids=["f0", "nono"])
@pytest.mark.parametrize("name", list(SYNTHESIZER_CONFIGS))
def test_state_dict_is_rvcs_key_for_key(name: str, f0: bool) -> None:
    version, sr = name.split("-")
    model = _meta_synth(name, f0)
    cls = {
        ("v1", True): SynthesizerTrnMs256NSFsid,
        ("v2", True): SynthesizerTrnMs768NSFsid,
        ("v1", False): SynthesizerTrnMs256NSFsid_nono,
        ("v2", False): SynthesizerTrnMs768NSFsid_nono,
    }
    assert type(model) is cls[(version, f0)]
    sd = model.state_dict()
    parts = expected_outside_dec(version, sr, f0)
    with torch.device("meta"):
        dec = build_generator(GEN_NAME[name], f0=f0).state_dict()
    parts["dec"] = {"dec." + k: tuple(v.shape) for k, v in dec.items()}
    # RVC registers enc_p, dec, enc_q, flow, emb_g; v2 deletes enc_p and adds its own last
    order = ["enc_p", "dec", "enc_q", "flow", "emb_g"]
    if version == "v2":
        order = order[1:] + ["enc_p"]
    expected = [(k, s) for part in order for k, s in parts[part].items()]
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected


def test_parametrizations_names_every_weight_norm() -> None:
    legacy = _meta_synth("v1-40k", True).state_dict()
    param = _meta_synth("v1-40k", True, "parametrizations").state_dict()
    renamed = {
        k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): tuple(v.shape)
        for k, v in legacy.items()
    }
    assert {k: tuple(v.shape) for k, v in param.items()} == renamed
    assert any(k.startswith("flow.") and "original1" in k for k in param)


def test_shipped_sizes() -> None:
    cfg = get_synthesizer_config("v2-48k")
    assert cfg.phone_channels == 768 and cfg.spec_channels == 1025 and cfg.segment_frames == 36
    assert get_synthesizer_config("v2-40k").generator.upsample_rates == (10, 10, 2, 2)
    total = sum(v.numel() for v in _meta_synth("v1-40k", True).state_dict().values())
    assert 36_000_000 < total < 37_000_000  # dec 14.5M + enc_q, flow, enc_p
    with pytest.raises(ValueError, match="unknown RVC synthesizer config 'v3-40k'"):
        get_synthesizer_config("v3-40k")


def test_init_follows_rvc() -> None:
    m = build_synthesizer("v1-32k", True, seed=0)
    for n in (0, 2, 4, 6):
        post = m.flow.flows[n].post
        assert post.weight.abs().max() == 0 and post.bias.abs().max() == 0  # mean-only coupling starts at identity
    attn = m.enc_p.encoder.attn_layers[0]
    assert abs(float(attn.emb_rel_k.detach().std()) - 96**-0.5) < 0.01
    bound = math.sqrt(6 / (HIDDEN + HIDDEN))  # xavier_uniform on the 1x1 q/k/v convs
    w = float(attn.conv_q.weight.detach().abs().max())
    assert 0.1 < w <= bound  # PyTorch's default init would stay below 1/sqrt(192) = 0.072
    in0 = m.flow.flows[0].enc.in_layers[0]
    assert torch.allclose(in0.weight_g.flatten(), in0.weight_v.flatten(1).norm(dim=1))
    a = build_synthesizer("v1-32k", True, seed=0).state_dict()
    assert all(torch.equal(a[k], v) for k, v in m.state_dict().items())


def tiny(version: str = "v1", f0: bool = True, **kw):
    """RVC's class with small arguments: same code paths, fast."""
    args = [33, 4, 8, 16, 32, 2, 2, 3, 0.0, "1", [3, 5], [[1, 3], [1, 3]], [4, 2], 16, [8, 4], 5, 8, 8000]
    cls = {
        ("v1", True): SynthesizerTrnMs256NSFsid,
        ("v2", True): SynthesizerTrnMs768NSFsid,
        ("v1", False): SynthesizerTrnMs256NSFsid_nono,
        ("v2", False): SynthesizerTrnMs768NSFsid_nono,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(kw.pop("seed", 0))
        return cls[(version, f0)](*args, **kw)


def inputs(model, batch: int = 2, frames: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([frames, frames - 3][:batch])
    return {
        "phone": torch.randn(batch, frames, model.phone_channels, generator=g),
        "phone_lengths": lengths,
        "pitch": torch.randint(1, 256, (batch, frames), generator=g),
        "pitchf": torch.rand(batch, frames, generator=g) * 300 + 80,
        "spec": torch.rand(batch, model.spec_channels, frames, generator=g),
        "sid": torch.tensor([0, 3][:batch]),
    }


@pytest.mark.parametrize("version,f0", [("v1", True), ("v2", False)])
def test_training_forward(version: str, f0: bool) -> None:
    m = tiny(version, f0)
    x = inputs(m)
    gen = torch.Generator().manual_seed(5)
    if f0:
        out = m(
            x["phone"],
            x["phone_lengths"],
            x["pitch"],
            x["pitchf"],
            x["spec"],
            x["phone_lengths"],
            x["sid"],
            generator=gen,
        )
    else:
        out = m(x["phone"], x["phone_lengths"], x["spec"], x["phone_lengths"], x["sid"], generator=gen)
    o, ids_slice, x_mask, z_mask, (z, z_p, m_p, logs_p, m_q, logs_q) = out
    assert o.shape == (2, 1, m.segment_size * m.hop_length)
    assert ids_slice.shape == (2,) and int(ids_slice[1]) <= 9 - m.segment_size
    assert x_mask.shape == z_mask.shape == (2, 1, 12) and float(x_mask[1, 0, 9:].sum()) == 0
    for t in (z, z_p, m_p, logs_p, m_q, logs_q):
        assert t.shape == (2, 8, 12)
    loss = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) + o.abs().mean()
    loss.backward()
    grads = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"enc_p", "enc_q", "flow", "dec", "emb_g"}


@pytest.mark.parametrize("version,f0", [("v2", True), ("v1", False)])
def test_infer_is_seeded_and_slices(version: str, f0: bool) -> None:
    m = tiny(version, f0).eval()
    x = inputs(m, batch=1)

    def run(seed, **kw):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if f0:
                return m.infer(x["phone"], x["phone_lengths"], x["pitch"], x["pitchf"], x["sid"], generator=gen, **kw)
            return m.infer(x["phone"], x["phone_lengths"], x["sid"], generator=gen, **kw)

    o, x_mask, (z, z_p, m_p, logs_p) = run(1)
    assert o.shape == (1, 1, 12 * m.hop_length) and x_mask.shape == (1, 1, 12) and z.shape == (1, 8, 12)
    assert torch.equal(run(1)[0], o) and not torch.equal(run(2)[0], o)
    part = run(1, skip_head=4, return_length=6)[0]
    assert part.shape == (1, 1, 6 * m.hop_length)
    with pytest.raises(ValueError, match="return_length2=5"):
        run(1, return_length2=5)


def test_phone_shape_is_checked() -> None:
    m = tiny("v2", True)
    x = inputs(m, batch=1)
    with pytest.raises(ValueError, match=r"phone must be \(batch, frames, 768\)"):
        m.infer(x["phone"][..., :256], x["phone_lengths"], x["pitch"], x["pitchf"], x["sid"])


def test_rvc_style_load_from_config_list() -> None:
    """An export's config list builds the class as RVC's inference does, and the weights load strictly."""
    m = tiny("v1", True, seed=1)
    back = synthesizer_from_rvc_config(m.rvc_config(), "v1", True)
    back.load_state_dict(m.state_dict(), strict=True)
    x = inputs(m, batch=1)
    with torch.no_grad():
        a = m.infer(
            x["phone"],
            x["phone_lengths"],
            x["pitch"],
            x["pitchf"],
            x["sid"],
            generator=torch.Generator().manual_seed(0),
        )[0]
        b = back.infer(
            x["phone"],
            x["phone_lengths"],
            x["pitch"],
            x["pitchf"],
            x["sid"],
            generator=torch.Generator().manual_seed(0),
        )[0]
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        SynthesizerTrnMs256NSFsid(*m.rvc_config(), is_half=False, bogus=1)


# --------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("version,periods", [("v1", PERIODS_V1), ("v2", PERIODS_V2)])
def test_discriminator_layout(version: str, periods: tuple[int, ...]) -> None:
    with torch.device("meta"):
        d = build_discriminator(version)
    sd = d.state_dict()
    assert len(d.discriminators) == 1 + len(periods)
    assert [getattr(s, "period", None) for s in d.discriminators] == [None, *periods]
    s_convs = [(16, 1, 15), (64, 4, 41), (256, 4, 41), (1024, 4, 41), (1024, 4, 41), (1024, 1024, 5)]
    for i, shape in enumerate(s_convs):
        assert tuple(sd[f"discriminators.0.convs.{i}.weight_v"].shape) == shape
        assert tuple(sd[f"discriminators.0.convs.{i}.weight_g"].shape) == (shape[0], 1, 1)
    assert tuple(sd["discriminators.0.conv_post.weight_v"].shape) == (1, 1024, 3)
    p_convs = [(32, 1), (128, 32), (512, 128), (1024, 512), (1024, 1024)]
    for i, (o, c) in enumerate(p_convs):
        assert tuple(sd[f"discriminators.1.convs.{i}.weight_v"].shape) == (o, c, 5, 1)
    assert tuple(sd["discriminators.1.conv_post.weight_v"].shape) == (1, 1024, 3, 1)
    assert len(sd) == 3 * (7 + 6 * len(periods))


def test_discriminator_forward_and_losses() -> None:
    d = build_discriminator("v1", shrink=16, seed=0)
    g = torch.Generator().manual_seed(0)
    y, y_hat = torch.randn(2, 1, 1000, generator=g), torch.randn(2, 1, 1000, generator=g)
    y_hat.requires_grad_(True)
    rs, gs, frs, fgs = d(y, y_hat)
    assert len(rs) == len(gs) == len(frs) == len(fgs) == 7
    assert [len(f) for f in frs] == [7] + [6] * 6
    assert frs[2][0].shape[-1] == 3  # period 3 view (B, C, T/p, p)
    loss, r_losses, g_losses = discriminator_loss(rs, gs)
    det = [[t.detach() for t in group] for group in (rs, gs)]
    want = sum(float(((1 - r) ** 2).mean() + (q**2).mean()) for r, q in zip(*det))
    assert abs(loss.item() - want) < 1e-5 and len(r_losses) == 7 and isinstance(r_losses[0], float)
    gl, terms = generator_loss(gs)
    assert abs(gl.item() - sum(float(((1 - q) ** 2).mean()) for q in det[1])) < 1e-5 and len(terms) == 7
    fm = feature_loss(frs, fgs)
    with torch.no_grad():
        want = 2 * sum(float((a - b).abs().mean()) for x, z in zip(frs, fgs) for a, b in zip(x, z))
    assert abs(fm.item() - want) < 1e-4
    (gl + fm).backward()
    assert y_hat.grad is not None and y_hat.grad.abs().sum() > 0


def test_kl_loss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z_p, logs_q, m_p, logs_p = (torch.randn(2, 4, 5, generator=g) for _ in range(4))
    mask = torch.ones(2, 1, 5)
    mask[1, :, 3:] = 0
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2 * logs_p)
    assert torch.allclose(kl_loss(z_p, logs_q, m_p, logs_p, mask), (kl * mask).sum() / mask.sum())
