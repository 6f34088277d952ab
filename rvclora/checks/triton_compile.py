"""Compile every fused kernel and autotune config for sm_80 and sm_90, without a GPU.

For each (architecture, kernel variant, config) this runs ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 80|90, 32))`` and checks (docs/verification.md):

* tensor-core instructions in the PTX of every variant whose dots run in fp16/bf16, or whose
  base dots run in TF32 (``BASE_PRECISION="tf32"``, where PyTorch would use TF32 for the base
  op): ``mma.sync`` on sm_80, ``wgmma`` or ``mma`` on sm_90 (the table says which). The IEEE
  fp32 variants have no tensor-core instruction; they are checked for resources only;
* no spills: ``cuobjdump --dump-resource-usage`` (shipped with Triton) reports ``STACK:0`` and
  ``LOCAL:0``;
* registers ≤ 255 per thread; shared memory ≤ 163 KiB (sm_80) / 227 KiB (sm_90).

Variants (see :func:`_variants`): every kernel in its Conv1d specialisation (``k = 3``, reflect
padding: the heaviest index arithmetic) in fp16 (tensor cores) and fp32 (FMA, its own configs),
plus the Linear forward in fp16, each with the worst case of its options (dropout on, rank block
32, the backend's limit). Stride arguments that are 1 for contiguous tensors are compiled as the
constant 1, as Triton specialises them at launch. Not compiled here, to keep the check near two
minutes on two cores (one compile takes 2-4 s): bf16 (it emits the same MMA shapes and register
layout as fp16), fp16 activations with fp32 factors (one more cast per factor tile), and the
Linear backward (a subset of the Conv1d index arithmetic).

Run ``python -m rvclora.checks.triton_compile`` without
``TRITON_INTERPRET``: it prints the resource table and exits non-zero on any violation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

__all__ = ["SHARED_LIMIT", "Result", "check_all", "main"]

#: Per-block shared memory limits (bytes) with the opt-in carve-out.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255

_FLOAT_ARGS = {"scaling", "p_drop", "alpha"}


@dataclass
class Result:
    arch: int
    kernel: str
    variant: str
    config: str
    registers: int
    stack: int
    local: int
    shared: int
    tensor_core: str
    problems: list


def _ptr_types(kernel: str, act: str, factor: str, use: str) -> dict:
    """Element type of each pointer argument of ``kernel`` for one variant."""
    if kernel == "lora_forward_kernel":
        return {
            "x_ptr": act,
            "w_ptr": act,
            "bias_ptr": act,
            "a_ptr": factor,
            "b_ptr": factor,
            "y_ptr": act,
            "u_ptr": "fp32",
        }
    if kernel == "lora_grad_u_kernel":
        return {"g_ptr": act, "b_ptr": factor, "gu_ptr": "fp32"}
    if kernel == "lora_grad_input_kernel":
        return {"g_ptr": act, "w_ptr": act, "gu_ptr": "fp32", "a_ptr": factor, "dx_ptr": act}
    p, q = {"grad_W": (act, act), "grad_A": ("fp32", act), "grad_B": (act, "fp32")}[use]
    return {"p_ptr": p, "q_ptr": q, "out_ptr": "fp32"}


def _variants():
    """(kernel name, variant label, activation dtype, pointer types, constexprs) of every compiled specialisation.

    Worst cases stand for the lighter ones: dropout on, rank block 64 (the backend's limit; rank
    16 compiles the same code with a smaller accumulator), reflect padding, and for the weight
    gradients ``grad_A`` (fp32 ``P``, dropout on ``Q``) for ``grad_W`` (same ``Q`` patches, no dropout).
    """
    out = []
    linear = {"KS": 1, "PAD_MODE": 0, "IS_LINEAR": True}
    conv = {"KS": 3, "PAD_MODE": 1, "IS_LINEAR": False}
    out.append(
        (
            "lora_forward_kernel",
            "linear fp16 r≤32",
            "fp16",
            _ptr_types("lora_forward_kernel", "fp16", "fp16", ""),
            {**linear, "HAS_BIAS": True, "HAS_DROPOUT": True, "BLOCK_R": 32},
        )
    )
    for label, act in (("conv k3 fp16", "fp16"), ("conv k3 fp32", "fp32")):
        out.append(
            (
                "lora_forward_kernel",
                f"{label} r≤32",
                act,
                _ptr_types("lora_forward_kernel", act, act, ""),
                {**conv, "HAS_BIAS": True, "HAS_DROPOUT": True, "BLOCK_R": 32},
            )
        )
        out.append(
            (
                "lora_grad_u_kernel",
                f"{label} r≤32",
                act,
                _ptr_types("lora_grad_u_kernel", act, act, ""),
                {"IS_LINEAR": False, "BLOCK_R": 32},
            )
        )
        out.append(
            (
                "lora_grad_input_kernel",
                label,
                act,
                _ptr_types("lora_grad_input_kernel", act, act, ""),
                {**conv, "HAS_DROPOUT": True},
            )
        )
        if act == "fp32":
            # the base dots in TF32 (what cuDNN does for an fp32 Conv1d by default): tensor cores expected
            tf32 = {"BASE_PRECISION": "tf32"}
            out.append(
                (
                    "lora_forward_kernel",
                    "conv k3 fp32 tf32-base r≤32",
                    act,
                    _ptr_types("lora_forward_kernel", act, act, ""),
                    {**conv, "HAS_BIAS": True, "HAS_DROPOUT": True, "BLOCK_R": 32, **tf32},
                )
            )
            out.append(
                (
                    "lora_grad_input_kernel",
                    "conv k3 fp32 tf32-base",
                    act,
                    _ptr_types("lora_grad_input_kernel", act, act, ""),
                    {**conv, "HAS_DROPOUT": True, **tf32},
                )
            )
        for use in ("grad_A", "grad_B"):
            consts = dict(conv) if use == "grad_A" else {"KS": 1, "PAD_MODE": 0, "IS_LINEAR": False}
            consts.update(HAS_DROPOUT=use == "grad_A", DOT_FROM_Q=use == "grad_A", SPLIT=4)
            out.append(
                (
                    "lora_weight_grad_kernel",
                    f"{label} {use}",
                    act,
                    _ptr_types("lora_weight_grad_kernel", act, act, use),
                    consts,
                )
            )
    return out


def _unit_strides(kernel: str, consts: dict) -> set:
    """The stride arguments that are 1 for contiguous tensors (Linear ``(M, C)``, Conv1d ``(N, C, T)``)."""
    linear = consts.get("IS_LINEAR", False)
    if kernel == "lora_forward_kernel":
        return {"s_xc" if linear else "s_xt", "s_wk", "s_ak", "s_br", "s_yo" if linear else "s_yt", "s_ur"}
    if kernel == "lora_grad_u_kernel":
        return {"s_go" if linear else "s_gt", "s_br", "s_ur"}
    if kernel == "lora_grad_input_kernel":
        return {"s_go" if linear else "s_gt", "s_wk", "s_ur", "s_ak", "s_dc" if linear else "s_dt"}
    q_is_u = not consts["DOT_FROM_Q"]
    p_unit = "s_pc" if (linear or consts["DOT_FROM_Q"]) else "s_pt"
    q_unit = "s_qc" if (linear or q_is_u) else "s_qt"
    return {p_unit, q_unit, "s_oj"}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_one(job) -> Result:
    arch, kernel_name, variant, act, ptr_types, consts, cfg_kwargs, num_warps, num_stages = job
    unit = _unit_strides(kernel_name, consts)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rvclora.kernels import lora_kernels

    fn = getattr(lora_kernels, kernel_name).fn
    # Eager launches pass the dropout seed by value (an int64 scalar), not through a pointer.
    constexprs = {**consts, **cfg_kwargs}
    if "SEED_IS_PTR" in fn.arg_names:
        constexprs["SEED_IS_PTR"] = False
    if "BASE_PRECISION" in fn.arg_names:
        constexprs.setdefault("BASE_PRECISION", "ieee")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit:
            # Triton specialises an int argument equal to 1 at launch; contiguous tensors get this here too.
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        else:
            signature[name] = "i32"
            if name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def field(key):
        m = re.search(rf"\b{key}:(\d+)", usage)
        return int(m.group(1)) if m else -1

    regs, stack, local = field("REG"), field("STACK"), field("LOCAL")
    shared = int(compiled.metadata.shared)
    if "wgmma" in ptx:
        tc = "wgmma"
    elif "mma.sync" in ptx:
        tc = "mma.sync"
    else:
        tc = "none"
    problems = []
    half_dots = act != "fp32" or consts.get("BASE_PRECISION") == "tf32"  # dots expected on tensor cores
    if half_dots and tc == "none":
        problems.append("no tensor-core instruction in PTX")
    if half_dots and arch == 80 and tc != "mma.sync":
        problems.append(f"expected mma.sync on sm_80, found {tc}")
    if regs < 0 or stack != 0 or local != 0:
        problems.append(f"spills (STACK:{stack} LOCAL:{local}) or no resource line")
    if regs > MAX_REGISTERS:
        problems.append(f"{regs} registers > {MAX_REGISTERS}")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"shared {shared} B > {SHARED_LIMIT[arch]} B")
    cfg = "x".join(str(cfg_kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f" w{num_warps} s{num_stages}"
    return Result(arch, kernel_name, variant, cfg, regs, stack, local, shared, tc, problems)


def _jobs(archs):
    from rvclora.kernels import lora_kernels

    jobs = []
    for arch in archs:
        for kernel_name, variant, act, ptr_types, consts in _variants():
            for cfg in getattr(lora_kernels, kernel_name).configs:
                if (cfg.kwargs["BLOCK_K"] == 16) != (act == "fp32"):
                    continue  # the autotuner prunes configs by dot dtype the same way
                jobs.append(
                    (
                        arch,
                        kernel_name,
                        variant,
                        act,
                        ptr_types,
                        consts,
                        dict(cfg.kwargs),
                        cfg.num_warps,
                        cfg.num_stages,
                    )
                )
    return jobs


def check_all(archs=(80, 90), workers: int = 0) -> list:
    """Compile every variant × config for ``archs``; returns one :class:`Result` per compile."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the Triton compile check needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    jobs = _jobs(archs)
    workers = workers or max(os.cpu_count() or 1, 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, jobs, chunksize=4))


def main(argv=None) -> int:
    import triton

    print(f"triton {triton.__version__}: compiling every kernel variant x config for sm_80 and sm_90")
    results = check_all()
    header = f"{'sm':>3} {'kernel':<24} {'variant':<28} {'config':<18} {'REG':>4} {'STACK':>5} {'SMEM KiB':>8}  TC"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.arch:>3} {r.kernel:<24} {r.variant:<28} {r.config:<18} {r.registers:>4} {r.stack:>5} "
            f"{r.shared / 1024:>8.1f}  {r.tensor_core}" + (f"  !! {'; '.join(r.problems)}" if r.problems else "")
        )
    bad = [r for r in results if r.problems]
    for arch in sorted({r.arch for r in results}):
        mine = [r for r in results if r.arch == arch]
        tcs = sorted({r.tensor_core for r in mine if r.tensor_core != "none"})
        print(
            f"sm_{arch}: {len(mine)} compiles, max REG {max(r.registers for r in mine)}, "
            f"max shared {max(r.shared for r in mine) / 1024:.1f} KiB, tensor-core instructions: {', '.join(tcs)}"
        )
    print(f"triton {triton.__version__}: {len(results)} compiles, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
