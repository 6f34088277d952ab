"""The CUDA kernels compile for sm_80 and sm_90 without register spills (no GPU needed, nvcc is)."""

from __future__ import annotations

import io
import re

import pytest

from rvclora.checks import cuda_compile as cc

_SPILLING = """\
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    48 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_90'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parser_flags_spills():
    """The checker itself can fail: a spilling kernel is reported as not ok, a clean one as ok."""
    spilling, clean = cc.parse_ptxas(_SPILLING, "x.cu")
    assert (spilling.arch, spilling.registers, spilling.smem, spilling.spill_stores, spilling.spill_loads) == (
        "sm_80",
        255,
        4096,
        24,
        16,
    )
    assert not spilling.ok
    assert clean.ok and clean.arch == "sm_90" and clean.registers == 40


@pytest.mark.skipif(cc.find_nvcc() is None, reason="nvcc not found (set NVCC or CUDA_HOME): cannot compile .cu files")
def test_every_kernel_compiles_without_spills_for_sm80_and_sm90():
    out = io.StringIO()
    rc = cc.run_check(archs=(80, 90), out=out)
    report = out.getvalue()
    print(report)
    assert rc == 0, report
    assert re.search(r"^nvcc .*: release \d+\.\d+", report, re.M), report  # the figures name their compiler
    archs = {line.split()[0] for line in report.splitlines() if line.startswith("sm_")}
    assert archs == {"sm_80", "sm_90"}, report
    for kernel in ("lora_convt_fwd_kernel", "lora_convt_bwd_input_kernel", "lora_convt_wgrad_kernel"):
        assert report.count(kernel) == 8, f"{kernel}: expected 4 dtypes x 2 archs\n{report}"
