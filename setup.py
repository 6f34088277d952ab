"""Packaging lives in pyproject.toml; this file exists for the optional ahead-of-time build hook.

A plain ``pip install .`` never needs a compiler: the ``cuda`` backend's extension (csrc/,
shipped as package data ``rvclora/csrc``) is then built on first use, or the backend reports
itself unavailable. ``RVCLORA_BUILD_EXT=1 pip install --no-build-isolation .`` builds
``rvclora._C`` now instead (the build needs the installed torch, hence no isolation), with the
same decisions as the build on first use (rvclora/ops/extension.py, loaded from its file: the
package is not importable yet): the CPU sources always; the CUDA sources when that torch was
built with CUDA and a CUDA toolkit is present, for ``$TORCH_CUDA_ARCH_LIST``, the visible GPUs
or, with none visible, the architectures the kernels target.
"""

import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extension_builder():
    path = os.path.join(HERE, "rvclora", "ops", "extension.py")
    spec = importlib.util.spec_from_file_location("_rvclora_extension_for_setup", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def extension_build():
    if os.environ.get("RVCLORA_BUILD_EXT", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    builder = _extension_builder()
    plan = builder.build_plan()
    if plan.note:
        print(f"rvclora: {plan.note}", file=sys.stderr)
    make = CUDAExtension if plan.cuda else CppExtension
    ext = make(
        "rvclora._C",
        [os.path.join("csrc", f) for f in builder.sources(plan.cuda)],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", *builder.openmp_flags()], "nvcc": ["-O3", *plan.arch_flags]},
        extra_link_args=builder.openmp_flags(),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**extension_build())
