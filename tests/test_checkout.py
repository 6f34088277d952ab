"""A source checkout must not shadow other distributions' top-level packages.

The checkout's root is on ``sys.path`` whenever Python runs there (``python -m pytest``, ``python -c``). Its
``kernels/`` folder is the Triton kernels, installed as ``rvclora.kernels``; if it were a regular package it
would shadow Hugging Face's ``kernels`` distribution, which transformers >= 5.25 requires and imports
(``from kernels import CUDAProperties``), and with it every ``import peft``. CI failed that way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import sys
import kernels
print("TOP", kernels.__file__, getattr(kernels, "MARKER", None))
import rvclora.kernels.ops as kops
print("OURS", kops.__file__)
"""


@pytest.mark.subprocess
def test_checkout_root_does_not_shadow_an_installed_kernels_package(tmp_path):
    # a stand-in for an installed regular package named ``kernels`` (Hugging Face's), later on sys.path than
    # the checkout's root, as site-packages is
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("MARKER = 'installed'\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0] in ("TOP", "OURS"))
    assert lines["TOP"] == f"{site / 'kernels' / '__init__.py'} installed", lines
    assert lines["OURS"] == str(ROOT / "kernels" / "ops.py"), lines


def test_kernels_folder_is_not_a_regular_package():
    # the reason the test above passes; a regular package here would be found before site-packages
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "ops.py").is_file()
