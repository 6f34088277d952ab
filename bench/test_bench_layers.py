"""Single layers at the RVC 40k generator's training shapes: one training step, fp32, batch 1.

Cases (full mode), LoRA rank 8, ``lora_alpha`` 16:

* every ResBlock Conv1d shape: channels 256/128/64/32 (the stages after ``ups`` 0..3), kernels
  3/7/11, dilations 1/3/5, at the stage's real length for a 32-frame segment (T = 320, 3200,
  6400, 12800 samples). All 36 shapes: ``convs2`` (dilation 1) has the shape of ``convs1``'s first;
* every upsampler (ConvTranspose1d, padding (k−u)//2): 512→256 k16 u10 (32 frames in),
  256→128 k16 u10 (320), 128→64 k4 u2 (3200), 64→32 k4 u2 (6400);
* Linear 512×512 and 1024×1024 with M = 4096 rows.

Quick mode (``--bench-quick``) runs tiny versions of each kind instead (one dilated conv, so the
PEFT dilation check is exercised). Before timing, every LoRA variant gets the same factors (with
a non-zero ``B``) and must reproduce the exact merged output; rvclora and the plain module failing
that is a bug (the test fails), PEFT or loralib failing it is reported as unsupported.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from alternatives import Unsupported, conv_output_check, copy_factors, loralib_lora, peft_lora, plain_lora
from harness import machine_rates, roofline_floor

from rvclora import LoRAConv1d, LoRAConvTranspose1d, LoRALinear

#: Nominal seconds of timed rounds per case (each case still runs at least Plan.min_rounds).
CASE_BUDGET_S = 3.0
RANK, ALPHA = 8, 16
# fp32: the merged-weight and unfused computations of one step differ by rounding only.
REL_TOL = 1e-4

STAGES = [(256, 320), (128, 3200), (64, 6400), (32, 12800)]  # (channels, samples) after ups 0..3, batch 1
CONV_CASES = [(c, k, d, t) for c, t in STAGES for k in (3, 7, 11) for d in (1, 3, 5)]
UPS_CASES = [(512, 256, 16, 10, 32), (256, 128, 16, 10, 320), (128, 64, 4, 2, 3200), (64, 32, 4, 2, 6400)]
LINEAR_CASES = [(512, 4096), (1024, 4096)]

QUICK_CONV = [(16, 3, 1, 64), (16, 3, 3, 64)]
QUICK_UPS = [(32, 16, 16, 10, 4)]
QUICK_LINEAR = [(64, 128)]

#: fixture -> (full-mode cases, quick-mode cases, id function); conftest.py parametrises from it.
BENCH_PARAMS = {
    "conv_case": (CONV_CASES, QUICK_CONV, lambda c: f"c{c[0]}-k{c[1]}-d{c[2]}-T{c[3]}"),
    "ups_case": (UPS_CASES, QUICK_UPS, lambda c: f"{c[0]}to{c[1]}-k{c[2]}-u{c[3]}-T{c[4]}"),
    "linear_case": (LINEAR_CASES, QUICK_LINEAR, lambda c: f"{c[0]}x{c[0]}-M{c[1]}"),
}

_LORA_CLASS = {nn.Linear: LoRALinear, nn.Conv1d: LoRAConv1d, nn.ConvTranspose1d: LoRAConvTranspose1d}


#: (warm-up rounds, min rounds, max rounds) per mode.
PLAN_QUICK, PLAN_FULL = (1, 2, 2), (2, 5, 20)


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _variant(h, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, trainable):
    module.train()
    for n, p in module.named_parameters():
        p.requires_grad_(trainable(n))
    xi = x.detach().clone().requires_grad_(True)
    params = [xi] + [p for p in module.parameters() if p.requires_grad]

    def step():
        module(xi).backward(gy)

    return h.Variant(step=step, params=params)


def _check(module: nn.Module, x: torch.Tensor, w_eff: torch.Tensor, base: nn.Module) -> float:
    with torch.no_grad():
        return conv_output_check(module(x), x, w_eff, base)


def _library_variant(h, build, rv, x, gy, w_eff, base):
    """A PEFT/loralib variant, or unsupported with the reason (never an exception)."""
    Variant = h.Variant
    try:
        module = build()
        copy_factors(rv, module)
        err = _check(module, x, w_eff, base)
    except Unsupported as e:
        return Variant.unsupported(str(e))
    except RuntimeError as e:
        err, module = float("inf"), locals().get("module")
        first = str(e).splitlines()[0][:60]
        if not _ignores_dilation(module, base):
            return Variant.unsupported(f"unsupported (fails: {first})")
    if err > REL_TOL:
        if _ignores_dilation(module, base):
            return Variant.unsupported("unsupported (ignores dilation)")
        return Variant.unsupported(f"unsupported (wrong output, rel. error {err:.1e})")
    return _variant(h, module, x, gy, _is_lora)


def _ignores_dilation(module, base) -> bool:
    if module is None or not isinstance(base, nn.Conv1d) or base.dilation[0] == 1:
        return False
    a = module.lora_A["default"] if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) else None
    return a is not None and tuple(a.dilation) != tuple(base.dilation)


def _peft_build(base):
    def build():
        holder = nn.Module()
        holder.layer = copy.deepcopy(base)
        peft_lora(holder, "layer", RANK, ALPHA)
        return holder.layer

    return build


def _run_case(benchmark, h, case, kind, base, x, floor, params):
    torch.manual_seed(1)
    with torch.no_grad():
        gy = torch.randn_like(base(x))
    variants = {
        "base": _variant(h, copy.deepcopy(base), x, gy, lambda n: False),
        "full": _variant(h, copy.deepcopy(base), x, gy, lambda n: True),
    }
    rv = _LORA_CLASS[type(base)].from_base(copy.deepcopy(base), r=RANK, lora_alpha=ALPHA)
    with torch.no_grad():
        rv.lora_B.normal_(0.0, 0.02)  # non-zero, so the output check sees the LoRA path
        w_eff = base.weight + rv.get_delta_weight()
    err = _check(rv, x, w_eff, base)
    assert err <= REL_TOL, f"rvclora output differs from the merged computation: rel. error {err:.2e}"
    variants["rvclora"] = _variant(h, rv, x, gy, _is_lora)

    plain = plain_lora(copy.deepcopy(base), RANK, ALPHA)
    copy_factors(rv, plain)
    err = _check(plain, x, w_eff, base)
    assert err <= REL_TOL, f"plain LoRA output differs from the merged computation: rel. error {err:.2e}"
    variants["plain"] = _variant(h, plain, x, gy, _is_lora)
    variants["peft"] = _library_variant(h, _peft_build(base), rv, x, gy, w_eff, base)
    variants["loralib"] = _library_variant(
        h, lambda: loralib_lora(copy.deepcopy(base), RANK, ALPHA), rv, x, gy, w_eff, base
    )

    roles = {k: k for k in variants}
    row = h.Row(
        case=case,
        kind=kind,
        floor=floor,
        roles=roles,
        params={**params, "r": RANK, "lora_alpha": ALPHA},
        saved_allowance=h.saved_allowance(rv, lambda: rv(x)),
        roof=roofline_floor(base, tuple(x.shape), RANK, machine_rates()),
    )
    h.run(benchmark, variants, [row], h.plan(PLAN_QUICK, PLAN_FULL))


def test_conv1d_step(benchmark, bench_harness, conv_case):
    c, k, d, t = conv_case
    torch.manual_seed(0)
    base = nn.Conv1d(c, c, k, dilation=d, padding=(k * d - d) // 2)
    x = torch.randn(1, c, t)
    floor = RANK / c + RANK / (c * k)
    _run_case(
        benchmark,
        bench_harness,
        f"conv1d c{c} k{k} d{d} T{t}",
        "Conv1d",
        base,
        x,
        floor,
        {"channels": c, "kernel": k, "dilation": d, "T": t, "batch": 1},
    )


def test_conv_transpose1d_step(benchmark, bench_harness, ups_case):
    cin, cout, k, u, t = ups_case
    torch.manual_seed(0)
    base = nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2)
    x = torch.randn(1, cin, t)
    floor = RANK / cin + RANK / (cout * k)
    _run_case(
        benchmark,
        bench_harness,
        f"convT {cin}->{cout} k{k} u{u} T{t}",
        "ConvTranspose1d",
        base,
        x,
        floor,
        {"in": cin, "out": cout, "kernel": k, "stride": u, "T_in": t, "batch": 1},
    )


def test_linear_step(benchmark, bench_harness, linear_case):
    n, m = linear_case
    torch.manual_seed(0)
    base = nn.Linear(n, n)
    x = torch.randn(m, n)
    floor = RANK / n + RANK / n
    _run_case(benchmark, bench_harness, f"linear {n}x{n} M{m}", "Linear", base, x, floor, {"in": n, "out": n, "M": m})
