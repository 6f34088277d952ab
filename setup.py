"""Packaging lives in pyproject.toml; this file exists for the optional ahead-of-time build hook.

A plain ``pip install .`` never needs a compiler: the ``cuda`` backend's extension (csrc/,
shipped as package data ``rvclora/csrc``) is then built on first use, or the backend reports
itself unavailable. ``RVCLORA_BUILD_EXT=1 pip install --no-build-isolation .`` builds
``rvclora._C`` now instead (the build needs the installed torch, hence no isolation): the CPU
sources always, the CUDA sources when that torch was built with CUDA (never decided by
whether a GPU is visible on the build machine).
"""

import os

from setuptools import setup

# Same lists as rvclora/ops/cuda_ext.py (CPU_SOURCES, CUDA_SOURCES).
CPU_SOURCES = ["csrc/lora_convt_cpu.cpp", "csrc/lora_cpu.cpp"]
CUDA_SOURCES = ["csrc/lora_convt_cuda_ops.cpp", "csrc/lora_convt_cuda.cu"]


def extension_build():
    if os.environ.get("RVCLORA_BUILD_EXT", "0") != "1":
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    with_cuda = torch.version.cuda is not None
    make = CUDAExtension if with_cuda else CppExtension
    ext = make(
        "rvclora._C",
        CPU_SOURCES + (CUDA_SOURCES if with_cuda else []),
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
