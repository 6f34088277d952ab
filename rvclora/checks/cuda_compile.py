"""Compile every ``.cu`` of ``csrc/`` for the real targets and check the kernels' resources.

No GPU needed: ``nvcc -Xptxas -v`` reports registers, shared memory, stack frame and spills
of each kernel per architecture. The check fails on a compile error, on any register spill
(non-zero "bytes spill stores/loads") or on more than 255 registers, and prints a table::

    python -m rvclora.checks.cuda_compile [--arch 80 90] [--nvcc PATH]

Dynamic shared memory is chosen at launch (the launchers refuse more than 48 KiB); the table
shows the static part.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rvclora.ops.extension import source_dir

ARCHS = (80, 90)
MAX_REGISTERS = 255

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'")
_SPILL = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_USED = re.compile(r"Used (?P<regs>\d+) registers")
_SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


@dataclass
class KernelUsage:
    source: str
    arch: str
    kernel: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def ok(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.registers <= MAX_REGISTERS


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc")):
        if cand and Path(cand).is_file():
            return cand
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    """``release 13.0, V13.0.88``: which compiler the resource figures are for (they change between releases)."""
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"
    m = re.search(r"release [^\n]*", text)
    return m.group(0).strip() if m else "unknown"


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    filt = Path(nvcc).with_name("cu++filt")
    tool = str(filt) if filt.is_file() else shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<float, float>(Args<float, float>)`` → ``k<float, float>``."""
    name = demangled.replace("(anonymous namespace)::", "").removeprefix("void ").replace("rvclora::", "")
    return name.split("(")[0]


def parse_ptxas(text: str, source: str) -> list[KernelUsage]:
    """Kernel resource lines of ``nvcc -Xptxas -v`` output, one entry per (kernel, arch)."""
    usages: list[KernelUsage] = []
    current: KernelUsage | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = KernelUsage(source, m["arch"], m["name"])
            usages.append(current)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = int(m["stack"]), int(m["st"]), int(m["ld"])
        m = _USED.search(line)
        if m:
            current.registers = int(m["regs"])
            s = _SMEM.search(line)
            current.smem = int(s["smem"]) if s else 0
    return usages


def _torch_nvcc_flags() -> list[str]:
    """The flags torch's extension build passes to nvcc (no implicit half conversions, ...): check what ships."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(COMMON_NVCC_FLAGS)


def compile_one(nvcc: str, cu: Path, arch: int, include: Path) -> tuple[list[KernelUsage], str | None]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            nvcc,
            *_torch_nvcc_flags(),
            "-std=c++17",
            "-O3",
            f"-arch=sm_{arch}",
            "-Xptxas",
            "-v",
            "-I",
            str(include),
            "-c",
            str(cu),
            "-o",
            str(Path(tmp) / "k.o"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return [], f"{cu.name} sm_{arch}: nvcc failed (exit {proc.returncode})\n{text[-4000:]}"
    usages = parse_ptxas(text, cu.name)
    if not usages:
        return [], f"{cu.name} sm_{arch}: no kernel resource lines in the ptxas output"
    return usages, None


def run_check(archs=ARCHS, nvcc: str | None = None, out=sys.stdout) -> int:
    """Build every .cu for every arch; print the table; return 0 when all pass."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        print("nvcc not found (set NVCC or CUDA_HOME)", file=out)
        return 2
    src = source_dir()
    if src is None:
        print("csrc/ sources not found", file=out)
        return 2
    jobs = [(cu, arch) for cu in sorted(src.glob("*.cu")) for arch in archs]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: compile_one(nvcc, job[0], job[1], src), jobs))
    errors = [err for _, err in results if err]
    usages = [u for us, _ in results for u in us]
    names = _demangle(sorted({u.kernel for u in usages}), nvcc)
    print(f"nvcc {nvcc}: {nvcc_version(nvcc)}", file=out)
    header = f"{'arch':<6} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}  kernel"
    print(header, file=out)
    print("-" * len(header), file=out)
    for u in sorted(usages, key=lambda u: (names[u.kernel], u.arch)):
        flag = "" if u.ok else "   <-- FAIL"
        label = _short_name(names[u.kernel])
        print(
            f"{u.arch:<6} {u.registers:>4} {u.smem:>6} {u.stack:>5} {u.spill_stores:>5}/{u.spill_loads:<5}  "
            f"{label}{flag}",
            file=out,
        )
    for err in errors:
        print(err, file=out)
    bad = [u for u in usages if not u.ok]
    print(
        f"{len(usages)} kernel builds, {len(bad)} with spills or > {MAX_REGISTERS} registers, "
        f"{len(errors)} compile errors",
        file=out,
    )
    return 1 if bad or errors else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (default: 80 90)")
    ap.add_argument("--nvcc", default=None, help="nvcc to use (default: $NVCC, PATH, $CUDA_HOME/bin)")
    args = ap.parse_args(argv)
    return run_check(args.arch, args.nvcc)


if __name__ == "__main__":
    sys.exit(main())
