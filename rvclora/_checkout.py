"""``rvclora.kernels`` in a source checkout: the one mechanism that makes a checkout importable in place.

The layout keeps the Triton kernels and their launchers in the top-level ``kernels/`` (beside ``csrc/``), and
an install maps that folder to the subpackage ``rvclora.kernels`` (pyproject.toml, ``package-dir``).

``kernels/`` deliberately has no ``__init__.py``, so it is never a *regular* top-level package named
``kernels``. A checkout's root is on ``sys.path`` whenever Python runs there (``python -m pytest``,
``python -c``), and a regular ``kernels`` package there would shadow Hugging Face's ``kernels`` distribution,
which transformers (and so peft) imports: ``from kernels import CUDAProperties`` failed in CI with
transformers 5.25. As a folder without ``__init__.py`` it is at most a namespace portion, which loses to any
installed regular package of that name. ``rvclora.kernels`` is a namespace package both here and installed,
like ``rvclora.csrc``. A checkout
used where it lies (``pytest`` or ``PYTHONPATH=.`` from its root) has no ``rvclora/kernels``. Importing this
module (the first thing ``rvclora/__init__.py`` does) then puts :class:`CheckoutKernels` first on
``sys.meta_path``: a finder that answers for the one name ``rvclora.kernels`` with the checkout's own
``kernels/`` (its own, even where another copy of rvclora is installed) and leaves every other import to
Python. An installed package (``rvclora/kernels`` exists), or a folder without ``kernels/`` beside it, adds
no finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(_PACKAGE), "kernels")


class CheckoutKernels(importlib.abc.MetaPathFinder):
    """Resolves ``rvclora.kernels`` to the checkout's top-level ``kernels/`` package."""

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "rvclora.kernels":
            return None
        # A package with no loader and a search path: Python makes it a namespace package over ``kernels/``.
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [_KERNELS]
        return spec


def install() -> None:
    """Put :class:`CheckoutKernels` on ``sys.meta_path`` when this rvclora is a source checkout."""
    if os.path.isdir(os.path.join(_PACKAGE, "kernels")) or not os.path.isfile(os.path.join(_KERNELS, "ops.py")):
        return
    if not any(isinstance(f, CheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutKernels())


install()
