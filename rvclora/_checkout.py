"""``rvclora.kernels`` in a source checkout: the one mechanism that makes a checkout importable in place.

The layout keeps the Triton kernels and their launchers in the top-level ``kernels/`` (beside ``csrc/``), and
an install maps that folder to the subpackage ``rvclora.kernels`` (pyproject.toml, ``package-dir``). A checkout
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
import importlib.util
import os
import sys

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_KERNELS = os.path.join(os.path.dirname(_PACKAGE), "kernels")


class CheckoutKernels(importlib.abc.MetaPathFinder):
    """Resolves ``rvclora.kernels`` to the checkout's top-level ``kernels/`` package."""

    def find_spec(self, fullname, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "rvclora.kernels":
            return None
        init = os.path.join(_KERNELS, "__init__.py")
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[_KERNELS])


def install() -> None:
    """Put :class:`CheckoutKernels` on ``sys.meta_path`` when this rvclora is a source checkout."""
    if os.path.isdir(os.path.join(_PACKAGE, "kernels")) or not os.path.isfile(os.path.join(_KERNELS, "__init__.py")):
        return
    if not any(isinstance(f, CheckoutKernels) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutKernels())


install()
