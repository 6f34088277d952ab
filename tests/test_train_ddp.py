"""``torchrun --nproc_per_node 2 -m rvclora train …`` (DDP, 2 gloo ranks on CPU) against one process.

Both runs train over the same global batch (4 clips a step; each rank takes 2). Every random draw
is per clip (slice, posterior noise, NSF source noise), so the two runs compute the same losses;
they differ only by float rounding (the gradient is summed in another order), which Adam's first
steps can amplify to at most ``lr`` per step on elements whose gradient is ~0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rvclora.checkpoint import read_lora_file
from rvclora.models.discriminator import build_discriminator
from rvclora.models.rvc import get_generator_config
from rvclora.models.synthesizer import build_synthesizer
from rvclora.train.loop import LOSS_FILE
from rvclora.train.synthetic import make_synthetic_experiment

pytestmark = pytest.mark.subprocess  # every test here runs rvclora or pytest in a child process

ROOT = Path(__file__).resolve().parent.parent
LR, STEPS = 1e-3, 2


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    pytest.importorskip("torch.distributed.run", reason="torchrun is part of torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    exp = tmp_path / "logs" / "ddp"
    make_synthetic_experiment(exp, get_generator_config("40k"), clips=4, seconds=(0.4, 0.4), segment_frames=4)
    g, d = tmp_path / "G.pth", tmp_path / "D.pth"
    torch.save({"model": build_synthesizer("v2-40k", seed=1).state_dict()}, g)
    torch.save({"model": build_discriminator("v2", seed=2, shrink=16).state_dict()}, d)
    common = [
        "train",
        str(exp),
        "--pretrained-g",
        str(g),
        "--pretrained-d",
        str(d),
        "--batch-size",
        "4",
        "--epochs",
        str(STEPS),
        "--lr",
        str(LR),
        "--threads",
        "1",
        "--no-progress",
        "--no-plot",
    ]

    def run(prefix: list[str], name: str) -> tuple[dict, list[dict], str]:
        out = tmp_path / f"{name}.safetensors"
        proc = subprocess.run(
            [*prefix, *common, "-o", str(out), "--run-dir", str(tmp_path / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / name / LOSS_FILE).read_text().splitlines()]
        return read_lora_file(out)["weights"], rows, proc.stdout

    one, rows1, _ = run([sys.executable, "-m", "rvclora"], "single")
    two, rows2, stdout = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "rvclora"], "ddp"
    )
    assert "2 processes" in stdout  # rank 0 reports; the other rank writes nothing
    assert stdout.count("steps in") == 1

    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == list(range(1, STEPS + 1))
    for a, b in zip(rows1, rows2):  # the logged losses are the mean over both ranks
        for key in ("loss_mel", "loss_kl", "loss_fm", "loss_gen", "loss_disc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert one.keys() == two.keys()
    diffs = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    assert diffs.max() <= 2 * LR * STEPS + 1e-6  # Adam's sign on a ~0 gradient, at worst
    assert (diffs <= 1e-5).float().mean() > 0.99, diffs.quantile(torch.tensor([0.5, 0.99]))
