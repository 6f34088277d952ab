"""``rvclora selftest`` / ``python -m rvclora.selftest``: prove the GPU path on the machine at hand.

What it runs, on each device it finds:

1. **Correctness**: every op × every backend that runs it here × dtype (and the autocast mix:
   half activations with fp32 LoRA factors) × dropout off/on, forward and every gradient,
   against the float64 oracle (:mod:`rvclora.reference`), with each backend's own dropout mask.
   A result passes when its error is at most twice the error of plain PyTorch computing the same
   maths in the same dtype (plus one rounding step): the rule the test suite applies.
2. **torch.compile**: one adapted Linear, Conv1d and ConvTranspose1d through inductor with
   ``fullgraph=True``, against eager (GPU only: on CPU inductor would compile C++ for minutes).
3. **A second GPU**, if present: the half-precision checks on ``cuda:1`` while ``cuda:0`` is current.
4. **Timing** (GPU only): one training step (forward, backward to x and the factors) at RVC's
   40k generator shapes (batch 1 and 4) and a 4096² Linear, for the fused kernel, the torch path
   and plain unfused modules, with TFLOP/s, GB/s and the fraction of the GPU's roofline
   (datasheet peaks, :data:`PEAKS`). Interleaved rounds, CUDA events, medians.

Without a GPU it runs the checks the CPU allows (the torch backend, the CUDA kernel's CPU twin,
the triton kernels under ``TRITON_INTERPRET=1``), prints what it did not run and why, and exits 0
when everything it ran passed. The JSON report goes to ``bench/results/`` of the checkout
(``--out`` to choose). It needs only torch (and triton, safetensors, tqdm, ninja for the GPU
parts): from a plain checkout ``PYTHONPATH=. python3 -m rvclora.selftest`` works without
installing this package; the ConvTranspose1d extension is then built in place with ninja.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .ops.spec import SPECS, sample_tensors

__all__ = ["PEAKS", "main", "run"]

#: Datasheet peaks (dense): (fp16/bf16 tensor TFLOP/s, tf32 TFLOP/s, fp32 TFLOP/s, HBM TB/s), by device-name substring.
PEAKS = {
    "H200": (989.0, 494.0, 67.0, 4.8),
    "H100 PCIe": (756.0, 378.0, 51.0, 2.0),
    "H100": (989.0, 494.0, 67.0, 3.35),
    "A100": (312.0, 156.0, 19.5, 2.0),
    "L40S": (362.0, 183.0, 91.6, 0.864),
    "L4": (121.0, 60.0, 30.3, 0.3),
    "A10": (125.0, 62.5, 31.2, 0.6),
    "RTX 4090": (165.0, 82.6, 82.6, 1.008),
    "RTX 3090": (71.0, 35.6, 35.6, 0.936),
}

OPS = tuple(SPECS)
_TINY = {torch.float64: 1e-12, torch.float32: 1e-6}


def _peaks(name: str):
    for key, value in PEAKS.items():
        if key in name:
            return key, value
    return None, None


# --------------------------------------------------------------------------- correctness


def _case_tensors(op: str, n: int, device, act: torch.dtype, fac: torch.dtype, gen: torch.Generator):
    """The op's first sample of :mod:`rvclora.ops.spec` (small odd shapes; float64 masters rounded to the
    call's dtypes) at batch ``n``, and its options."""
    spec = SPECS[op]
    sample = spec.samples[0]
    t = sample_tensors(spec, sample, gen=gen, n=n)
    kw: dict[str, Any] = spec.full_options(sample.options)
    dtypes = {k_: (fac if k_ in ("lora_A", "lora_B") else act) for k_ in t}
    t = {k_: v.to(dtypes[k_]).double().to(device) for k_, v in t.items()}
    return t, dtypes, kw


def _oracle(op: str, t: dict[str, torch.Tensor], kw: dict[str, Any], mask, scaling: float):
    return SPECS[op].run_reference(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], scaling, kw, mask)


def _forward_and_grads(fn, t: dict[str, torch.Tensor], dtypes, grad_out):
    leaves = {k: v.detach().to(dtypes[k]).requires_grad_(True) for k, v in t.items()}
    y = fn(leaves)
    gs = torch.autograd.grad(y, list(leaves.values()), grad_out.to(y.dtype))
    return y, dict(zip(leaves, gs))


def check_case(
    backend: str, op: str, device, act: torch.dtype, fac: torch.dtype, p: float, n: int = 2, seed: int = 0
) -> dict[str, Any]:
    """One oracle check; returns ``{"ok": bool, "worst": ratio of error to tolerance, ...}``."""
    from . import ops
    from .ops import dispatch

    gen = torch.Generator().manual_seed(seed)
    t, dtypes, kw = _case_tensors(op, n, device, act, fac, gen)
    why = dispatch.unsupported(
        backend, op, t["x"].to(act), weight=t["weight"].to(act), lora_A=t["lora_A"].to(fac), dropout_p=p, **kw
    )
    if why is not None:
        return {"ok": None, "skipped": why}
    mod = dispatch.load_backend(backend)
    seed_t = torch.tensor(1234 + seed, dtype=torch.int64) if p > 0 else None
    mask = mod.dropout_mask(seed_t, tuple(t["x"].shape), p, t["x"].device, torch.float64) if p > 0 else None
    scaling = 0.8
    y64 = _oracle(op, {k: v.detach().requires_grad_(True) for k, v in t.items()}, kw, mask, scaling)
    grad_out = torch.randn(y64.shape, generator=gen, dtype=torch.float64).to(act).double().to(device)
    all_act = {k: act for k in t}
    y_ref, g_ref = _forward_and_grads(
        lambda lv: _oracle(op, lv, kw, mask, scaling), t, {k: torch.float64 for k in t}, grad_out
    )
    y_plain, g_plain = _forward_and_grads(
        lambda lv: _oracle(op, lv, kw, None if mask is None else mask.to(act), scaling), t, all_act, grad_out
    )
    ops.set_backend(backend)
    try:
        y, g = _forward_and_grads(
            lambda lv: getattr(ops, op)(
                lv["x"], lv["weight"], lv["bias"], lv["lora_A"], lv["lora_B"], scaling, dropout_p=p, seed=seed_t, **kw
            ),
            t,
            dtypes,
            grad_out,
        )
    finally:
        ops.set_backend(None)
    tiny = _TINY.get(act, 1e-3)
    worst, problems = 0.0, []
    pairs = [("y", y, y_ref, y_plain)] + [(f"grad_{k}", g[k], g_ref[k], g_plain[k].to(g[k].dtype)) for k in g]
    for name, cand, ref64, plain in pairs:
        expected_dtype = act if name in ("y",) else dtypes[name[5:]]
        if cand.dtype != expected_dtype:
            problems.append(f"{name} dtype {cand.dtype}, expected {expected_dtype}")
        err = (cand.double() - ref64).abs().max().item()
        tol = 2 * (plain.double() - ref64).abs().max().item() + tiny * max(ref64.abs().max().item(), 1.0)
        if not err <= tol:
            problems.append(f"{name}: max err {err:.3e} > tol {tol:.3e}")
        worst = max(worst, err / tol if tol > 0 else float("inf"))
    return {"ok": not problems, "worst": worst, "problems": problems}


def _dtype_plan(device_type: str):
    """(activation dtype, factor dtype) pairs per device: plain dtypes, then autocast-style mixes."""
    if device_type == "cuda":
        return [
            (torch.float32, torch.float32),
            (torch.float16, torch.float16),
            (torch.bfloat16, torch.bfloat16),
            (torch.float16, torch.float32),
            (torch.bfloat16, torch.float32),
        ]
    plan = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float64, torch.float32)]
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        plan.append((torch.float16, torch.float32))
    return plan


def run_checks(device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from .ops import dispatch

    results = []
    for backend in dispatch.BACKENDS:
        if backend == "reference":
            continue
        why = dispatch._unavailable(backend)
        if why is not None:
            results.append({"device": str(device), "backend": backend, "ok": None, "skipped": why})
            continue
        for op in OPS:
            for act, fac in _dtype_plan(device.type):
                for p in (0.0, 0.2):
                    label = f"{backend:<7} {op:<22} {str(act)[6:]:>8} x / {str(fac)[6:]:<8} factors p={p}"
                    try:
                        res = check_case(backend, op, device, act, fac, p)
                    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its cause
                        res = {
                            "ok": False,
                            "problems": [f"raised {type(e).__name__}: {e}"],
                            "traceback": traceback.format_exc(limit=4),
                        }
                    res.update(device=str(device), backend=backend, op=op, act=str(act), factors=str(fac), p=p)
                    results.append(res)
                    if res["ok"] is None:
                        continue
                    status = "ok  " if res["ok"] else "FAIL"
                    detail = f"err/tol {res['worst']:.2f}" if res["ok"] else "; ".join(res["problems"])[:300]
                    log(f"  {status} {label} {detail}")
    return results


# --------------------------------------------------------------------------- torch.compile


def run_compile_check(device: torch.device) -> dict[str, Any]:
    from . import LoRAConv1d, LoRAConvTranspose1d, LoRALinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        LoRAConv1d(16, 24, 3, padding=1, r=4, lora_alpha=8),
        LoRAConvTranspose1d(24, 16, 4, stride=2, padding=1, r=4, lora_alpha=8),
    ).to(device)
    lin = LoRALinear(16, 16, r=4, lora_alpha=8).to(device)
    for m in (*model, lin):
        torch.nn.init.normal_(m.lora_B, std=0.1)

    def f(x):
        h = model(x)
        return lin(h.transpose(1, 2))

    x = torch.randn(2, 16, 80, device=device)
    y_eager = f(x)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in lin.parameters() if p.requires_grad]
    for p in (*model.parameters(), *lin.parameters()):
        p.grad = None
    t0 = time.perf_counter()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad for p in lin.parameters() if p.requires_grad]
    err = max([(y - y_eager).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, grads_eager)])
    scale = max(y_eager.abs().max().item(), 1.0)
    ok = err <= 1e-3 * scale
    return {"ok": ok, "max_abs_err": err, "compile_seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- timing


def _rvc_cases(batches=(1, 4)):
    """(label, op, shapes) of the timed cases: RVC 40k generator layers and a 4096² Linear."""
    cases = []
    # resblock convolutions after each upsampler (channels, samples) and the four upsamplers of the 40k generator
    stages = [(256, 320), (128, 3200), (64, 6400), (32, 12800)]
    ups = [(512, 256, 16, 10, 32), (256, 128, 16, 10, 320), (128, 64, 4, 2, 3200), (64, 32, 4, 2, 6400)]
    for n in batches:
        for c, t in stages:
            cases.append((f"conv1d {c}ch k3 d1 T{t} N{n}", "lora_conv1d", dict(n=n, c=c, o=c, k=3, d=1, t=t)))
        cases.append((f"conv1d 256ch k11 d5 T320 N{n}", "lora_conv1d", dict(n=n, c=256, o=256, k=11, d=5, t=320)))
        for cin, cout, k, s, t in ups:
            cases.append(
                (
                    f"convT {cin}->{cout} k{k} u{s} T{t} N{n}",
                    "lora_conv_transpose1d",
                    dict(n=n, c=cin, o=cout, k=k, s=s, t=t),
                )
            )
    cases.append(("linear 4096x4096 M4096", "lora_linear", dict(m=4096, c=4096, o=4096)))
    return cases


def _timed_inputs(op: str, sh: dict[str, int], device, dtype, r: int = 8):
    def rnd(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    fp32 = torch.float32
    if op == "lora_linear":
        x = rnd(sh["m"], sh["c"], grad=True)
        w, b = rnd(sh["o"], sh["c"], scale=sh["c"] ** -0.5), rnd(sh["o"])
        a = rnd(r, sh["c"], scale=sh["c"] ** -0.5).to(fp32).requires_grad_(True)
        bb = rnd(sh["o"], r, scale=0.1).to(fp32).requires_grad_(True)
        kw: dict[str, Any] = {}
        flops_base = 2 * sh["m"] * sh["c"] * sh["o"]
        rows, k_dim = sh["m"], sh["c"]
    elif op == "lora_conv1d":
        pad = sh["d"] * (sh["k"] - 1) // 2
        x = rnd(sh["n"], sh["c"], sh["t"], grad=True)
        w, b = rnd(sh["o"], sh["c"], sh["k"], scale=(sh["c"] * sh["k"]) ** -0.5), rnd(sh["o"])
        a = rnd(r, sh["c"] * sh["k"], scale=(sh["c"] * sh["k"]) ** -0.5).to(fp32).requires_grad_(True)
        bb = rnd(sh["o"], r, scale=0.1).to(fp32).requires_grad_(True)
        kw = dict(stride=1, padding=(pad, pad), dilation=sh["d"], groups=1, padding_mode="zeros")
        rows, k_dim = sh["n"] * sh["t"], sh["c"] * sh["k"]
        flops_base = 2 * rows * k_dim * sh["o"]
    elif op == "lora_conv_transpose1d":
        pad = (sh["k"] - sh["s"]) // 2
        x = rnd(sh["n"], sh["c"], sh["t"], grad=True)
        w, b = rnd(sh["c"], sh["o"], sh["k"], scale=sh["c"] ** -0.5), rnd(sh["o"])
        a = rnd(r, sh["c"], scale=sh["c"] ** -0.5).to(fp32).requires_grad_(True)
        bb = rnd(r, sh["o"] * sh["k"], scale=0.1).to(fp32).requires_grad_(True)
        kw = dict(stride=sh["s"], padding=pad, output_padding=0, dilation=1, groups=1)
        rows, k_dim = sh["n"] * sh["t"], sh["c"]
        flops_base = 2 * rows * k_dim * sh["o"] * sh["k"]
    else:
        raise ValueError(f"the timing cases are RVC's Linear/Conv1d/ConvTranspose1d layers, not {op!r}")
    return x, w, b, a, bb, kw, flops_base, rows, k_dim


def _unfused(op, x, w, b, a, bb, s, kw):
    """Plain LoRA as separate modules (what peft-style code runs): base + two thin layers, plain autograd."""
    if op == "lora_linear":
        return F.linear(x, w, b) + s * F.linear(F.linear(x, a.to(x.dtype)), bb.to(x.dtype))
    if op == "lora_conv1d":
        pad = kw["padding"][0]
        base = F.conv1d(x, w, b, padding=pad, dilation=kw["dilation"])
        k = w.shape[-1]
        h = F.conv1d(x, a.to(x.dtype).reshape(a.shape[0], x.shape[1], k), padding=pad, dilation=kw["dilation"])
        return base + s * F.conv1d(h, bb.to(x.dtype)[:, :, None])
    if op != "lora_conv_transpose1d":
        raise ValueError(f"the timing cases are RVC's Linear/Conv1d/ConvTranspose1d layers, not {op!r}")
    base = F.conv_transpose1d(x, w, b, stride=kw["stride"], padding=kw["padding"])
    h = F.conv1d(x, a.to(x.dtype)[:, :, None])
    k = w.shape[-1]
    bw = bb.to(x.dtype).reshape(a.shape[0], w.shape[1], k)
    return base + s * F.conv_transpose1d(h, bw, stride=kw["stride"], padding=kw["padding"])


def _time_case(op: str, sh: dict[str, int], device, dtype, rounds: int) -> dict[str, Any]:
    """Median seconds of one training step per implementation, plus the step's flops and minimum bytes."""
    from . import ops
    from .ops import dispatch

    x, w, b, a, bb, kw, flops_base, rows, k_dim = _timed_inputs(op, sh, device, dtype)
    s = 2.0
    fused_name = "cuda" if op == "lora_conv_transpose1d" else "triton"
    impls: dict[str, Callable[[], torch.Tensor]] = {}
    for be in (fused_name, "torch"):
        if dispatch.unsupported(be, op, x, weight=w, lora_A=a, dropout_p=0.0, **kw):
            continue

        def call(be=be):
            ops.set_backend(be)
            try:
                return getattr(ops, op)(x, w, b, a, bb, s, **kw)
            finally:
                ops.set_backend(None)

        impls["fused" if be == fused_name else "torch"] = call
    impls["unfused"] = lambda: _unfused(op, x, w, b, a, bb, s, kw)

    def step(fn):
        def run():
            for t in (x, a, bb):
                t.grad = None
            y = fn()
            y.backward(torch.ones_like(y))

        return run

    steps = {k: step(fn) for k, fn in impls.items()}
    for fn in steps.values():
        fn()  # warm-up: compilation, autotuning, cuDNN's algorithm search
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times[k].append(e0.elapsed_time(e1) / 1e3)
    with torch.no_grad():
        y_numel = _unfused(op, x, w, b, a, bb, s, kw).numel()
    # base forward + grad_x, and the LoRA terms: u, the up-projection, grad_u, grad_x, grad_A, grad_B
    r = a.shape[0]
    flops = 2 * flops_base + 2 * rows * r * (3 * k_dim + 3 * (y_numel // max(rows, 1)))
    elem = torch.finfo(dtype).bits // 8
    nbytes = elem * (2 * x.numel() + 2 * y_numel + w.numel())  # x, grad_x, y, grad_y, W: each at least once
    return {"seconds": {k: statistics.median(ts) for k, ts in times.items()}, "flops": flops, "bytes": nbytes}


def run_timing(device: torch.device, dtypes: Sequence[torch.dtype], rounds: int, log, batches=(1, 4)):
    name = torch.cuda.get_device_name(device)
    peak_key, peaks = _peaks(name)
    rows_out = []
    log(
        f"  roofline peaks: {peak_key or 'unknown GPU (no roofline column)'} {peaks or ''} "
        "(datasheet: fp16 TF/s, tf32 TF/s, fp32 TF/s, TB/s)"
    )
    for dtype in dtypes:
        for label, op, sh in _rvc_cases(batches):
            res = _time_case(op, sh, device, dtype, rounds)
            flops, nbytes = res["flops"], res["bytes"]
            row: dict[str, Any] = {"case": label, "dtype": str(dtype), "op": op, "flops": flops, "bytes": nbytes}
            for k, t_med in res["seconds"].items():
                entry = {"seconds": t_med, "tflops": flops / t_med / 1e12, "gbps": nbytes / t_med / 1e9}
                if peaks is not None:
                    tf32 = (
                        torch.backends.cuda.matmul.allow_tf32
                        if op == "lora_linear"
                        else torch.backends.cudnn.allow_tf32
                    )
                    peak = peaks[0] if dtype != torch.float32 else (peaks[1] if tf32 else peaks[2])
                    roof = max(flops / (peak * 1e12), nbytes / (peaks[3] * 1e12))
                    entry["roofline_fraction"] = roof / t_med
                row[k] = entry
            rows_out.append(row)
            cells = "  ".join(
                f"{k} {row[k]['seconds'] * 1e3:7.3f} ms {row[k]['tflops']:6.1f} TF/s {row[k]['gbps']:6.0f} GB/s"
                + (f" {100 * row[k]['roofline_fraction']:4.0f}%" if "roofline_fraction" in row[k] else "")
                for k in ("fused", "torch", "unfused")
                if k in row
            )
            log(f"  {str(dtype)[6:]:>8} {label:<34} {cells}")
    return {"device": name, "peaks": {"matched": peak_key, "values": peaks}, "rows": rows_out}


# --------------------------------------------------------------------------- driver


def _default_out() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(here, "bench")
    return os.path.join(bench if os.path.isdir(bench) else os.getcwd(), "results")


def run(out_dir: str | None = None, rounds: int = 10, timing: bool = True, log=print) -> dict[str, Any]:
    from . import __version__
    from .ops import backend_status

    report: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rvclora": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backends": backend_status(),
        "not_run": [],
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    cuda = torch.cuda.is_available()
    devices = [torch.device("cuda", 0)] if cuda else [torch.device("cpu")]
    report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    log(
        f"rvclora {__version__} selftest: torch {torch.__version__}, triton {report['triton']}, "
        f"GPUs: {', '.join(report['gpus']) or 'none'}"
    )
    for row in report["backends"]:
        log(
            f"  backend {row['backend']:<9} "
            + ("available" if row["unavailable"] is None else f"unavailable: {row['unavailable']}")
        )
    t0 = time.perf_counter()
    log("correctness against the float64 oracle (forward and every gradient):")
    checks = []
    for dev in devices:
        checks += run_checks(dev, log)
    if cuda and torch.cuda.device_count() > 1:
        log("second GPU (cuda:1 while cuda:0 is current):")
        torch.cuda.set_device(0)
        checks += [c for c in run_checks(torch.device("cuda", 1), log)]
    elif cuda:
        report["not_run"].append("second-device checks: only one GPU")
    report["checks"] = checks
    if cuda:
        log("torch.compile(fullgraph=True, backend='inductor') against eager:")
        try:
            report["compile"] = run_compile_check(devices[0])
        except Exception as e:  # noqa: BLE001
            report["compile"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        log(f"  {'ok' if report['compile']['ok'] else 'FAIL'} {report['compile']}")
    else:
        report["not_run"] += [
            "GPU correctness checks (no CUDA device: the fused kernels ran only as CPU twin / interpreter, if at all)",
            "inductor fullgraph compile on a GPU (no CUDA device)",
            "second-device checks (no CUDA device)",
            "timing table (no CUDA device: no GPU figure is produced without one)",
        ]
    if cuda and timing:
        log("timing: one training step (forward + backward to x, A, B), median of interleaved rounds:")
        report["timing"] = run_timing(devices[0], (torch.float16, torch.float32), rounds, log)
    elif cuda:
        report["not_run"].append("timing table (--no-timing)")
    report["seconds"] = time.perf_counter() - t0
    failed = [c for c in checks if c.get("ok") is False]
    if report.get("compile", {}).get("ok") is False:
        failed.append(report["compile"])
    report["failed"] = len(failed)
    ran = sum(1 for c in checks if c.get("ok") is not None)
    log(
        f"{ran} checks run, {len(failed)} failed, {sum(1 for c in checks if c.get('ok') is None)} skipped "
        f"(backend or dtype not supported here), {report['seconds']:.0f} s"
    )
    for item in report["not_run"]:
        log(f"NOT RUN: {item}")
    out_dir = out_dir or _default_out()
    os.makedirs(out_dir, exist_ok=True)
    tag = (report["gpus"][0] if report["gpus"] else "cpu").replace(" ", "_").replace("/", "_")
    path = os.path.join(out_dir, f"selftest-{report['when'][:10]}-{tag}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"report: {path}")
    report["path"] = path
    return report


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m rvclora.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--out", metavar="DIR", help="directory of the JSON report (default: bench/results)")
    parser.add_argument("--rounds", type=int, default=10, help="timing rounds per case (default 10)")
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cmd(args)


def cmd(args: argparse.Namespace) -> int:
    report = run(args.out, rounds=args.rounds, timing=not args.no_timing)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
