"""``rvclora train``: the trainer on generated experiment folders (RVC and Applio layouts; f0/no-f0; v1/v2).

Small but real: RVC's whole synthesizer at 40k, clips of about 0.4 s, a 4-frame decoder slice and
RVC's discriminator narrowed 16× (``build_discriminator(shrink=16)``; the trainer reads the width
from the file), so a step takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rvclora.models.discriminator import build_discriminator
from rvclora.models.rvc import get_generator_config
from rvclora.models.synthesizer import build_synthesizer
from rvclora.train.data import load_experiment
from rvclora.train.loop import LOSS_FILE, STATE_FILE, Trainer, TrainSettings
from rvclora.train.synthetic import make_synthetic_experiment

ROOT = Path(__file__).resolve().parent.parent
SEGMENT = 4  # frames
LR = 2e-3  # a random base moves little at RVC's 1e-4 in a few steps


def _pretrained(tmp: Path, version: str, f0: bool) -> tuple[str, str]:
    g, d = tmp / f"G-{version}-{int(f0)}.pth", tmp / f"D-{version}.pth"
    if not g.exists():
        torch.save({"model": build_synthesizer(f"{version}-40k", f0=f0, seed=1).state_dict()}, g)
    if not d.exists():
        torch.save({"model": build_discriminator(version, seed=2, shrink=16).state_dict()}, d)
    return str(g), str(d)


def _experiment(
    tmp: Path, name: str, *, version="v2", f0=True, layout="rvc", clips=4, seconds=(0.35, 0.45), **kw
) -> str:
    path = tmp / "logs" / name
    make_synthetic_experiment(
        path,
        get_generator_config("40k"),
        version=version,
        f0=f0,
        layout=layout,
        clips=clips,
        segment_frames=SEGMENT,
        seconds=seconds,
        **kw,
    )
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture
def one_thread():
    """In-process trainers run on one thread (``threads=1``); the suite's setting comes back afterwards."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def _load_infer_model(export_path: str, version: str, f0: bool):
    """Load an exported model exactly as RVC's inference does: cls(*config), drop enc_q, strict=False."""
    from rvclora.models.synthesizer import synthesizer_from_rvc_config

    cpt = torch.load(export_path, map_location="cpu", weights_only=True)
    assert (cpt["version"], cpt["f0"]) == (version, int(f0))
    model = synthesizer_from_rvc_config(cpt["config"], cpt["version"], bool(cpt["f0"]))
    del model.enc_q
    result = model.load_state_dict({k: v.float() for k, v in cpt["weight"].items()}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return model.eval()


def _infer(model, f0: bool, n: int = 30, dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    dim = 256 if model.enc_p.emb_phone.in_features == 256 else 768
    phone = torch.randn(1, n, dim, generator=g).to(dtype)
    lengths = torch.tensor([n])
    sid = torch.tensor([0])
    with torch.no_grad():
        if f0:
            nsff0 = (120 + 80 * torch.rand(1, n, generator=g)).to(dtype)
            pitch = torch.randint(1, 256, (1, n), generator=g)
            return model.infer(phone, lengths, pitch, nsff0, sid, generator=torch.Generator().manual_seed(9))[0]
        return model.infer(phone, lengths, sid, generator=torch.Generator().manual_seed(9))[0]


LAYOUTS = [("v1", True, "rvc"), ("v2", True, "applio"), ("v1", False, "applio"), ("v2", False, "rvc")]


@pytest.mark.parametrize(
    "version,f0,layout", LAYOUTS, ids=[f"{v}-{'f0' if f else 'nof0'}-{lay}" for v, f, lay in LAYOUTS]
)
def test_trains_each_layout(work, one_thread, version, f0, layout):
    exp = _experiment(work, f"{version}{f0}{layout}", version=version, f0=f0, layout=layout)
    g, d = _pretrained(work, version, f0)
    out = work / f"{version}{f0}{layout}.safetensors"
    trainer = Trainer(
        TrainSettings(
            exp,
            g,
            d,
            output=str(out),
            export=g,
            batch_size=2,
            epochs=3,
            learning_rate=LR,
            threads=one_thread,
            progress=False,
            plot=False,
        )
    )
    assert (trainer.version, trainer.f0) == (version, f0)
    synth0 = {k: v.clone() for k, v in trainer.synth.state_dict().items()}
    disc0 = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    trainable = {n for n, p in trainer.synth.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert result.steps == 6 and result.epochs == 3

    rows = [json.loads(line) for line in (Path(result.run_dir) / LOSS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r[k])) for r in rows for k in r)
    for key in ("loss_kl", "loss_gen_all"):  # the G objective: the first epoch's mean against the last's
        assert result.last[key] < result.first_epoch[key], (key, result.first_epoch, result.last)

    # only the adapter's parameters changed in G; D trained in full
    for k, v in trainer.synth.state_dict().items():
        changed = not torch.equal(v, synth0[k])
        assert changed == (k in trainable), k
    assert trainable and all(not torch.equal(v, disc0[k]) for k, v in trainer.disc.state_dict().items())

    # the merged export (from the pretrained G) infers what the adapted model infers
    assert result.export == str(out.with_suffix(".pth"))
    exported = _load_infer_model(result.export, version, f0)
    adapted = trainer.synth.eval()
    from rvclora.inject import merged_state_dict

    merged = build_synthesizer(f"{version}-40k", f0=f0, seed=3).eval()
    merged_sd = merged_state_dict(adapted)
    merged.load_state_dict({k: v.half().float() for k, v in merged_sd.items()})  # what the export stores
    assert torch.allclose(_infer(exported, f0), _infer(merged, f0), atol=1e-6, rtol=0)
    merged.load_state_dict(merged_sd)  # and merging is exact: in float64, merged = adapted (the sine source is fp32)
    ref = _infer(adapted.double(), f0, dtype=torch.float64)
    assert torch.allclose(_infer(merged.double(), f0, dtype=torch.float64), ref, atol=1e-6, rtol=0)  # NSF: fp32 sines


#: one backend for the runs compared bit for bit (auto may pick another per process after measuring)
FIXED_BACKEND = dict(os.environ, RVCLORA_BACKEND="torch")


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rvclora", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.subprocess
def test_bad_folders_are_refused_in_one_line_before_training(work, tmp_path):
    import numpy as np
    import soundfile as sf

    def fresh(name, **kw):
        return Path(_experiment(tmp_path, name, clips=3, **kw))

    exp = fresh("missing")
    os.unlink(exp / "3_feature768" / "0_1.npy")
    with pytest.raises(ValueError, match=r"line 2: feature file .*0_1\.npy' does not exist"):
        load_experiment(exp)

    exp = fresh("lengths")
    np.save(exp / "3_feature768" / "0_2.npy", np.zeros((5, 768), np.float32))
    with pytest.raises(ValueError, match=r"line 3: lengths disagree: feature file .*0_2\.npy' has 5 frames"):
        load_experiment(exp)

    exp = fresh("width")
    np.save(exp / "3_feature768" / "0_1.npy", np.zeros((20, 256), np.float32))
    with pytest.raises(ValueError, match=r"line 2: feature file .*0_1\.npy' has width 256; expected 768 like"):
        load_experiment(exp)
    exp = fresh("v1", version="v1")  # a v1 folder for a v2 model
    with pytest.raises(ValueError, match=r"line 1: feature file .* has width 256; expected 768"):
        load_experiment(exp, version="v2")

    exp = fresh("rate")
    wave, sr = sf.read(exp / "0_gt_wavs" / "0_1.wav", dtype="float32")
    sf.write(exp / "0_gt_wavs" / "0_1.wav", wave, 32000, subtype="PCM_16")
    with pytest.raises(
        ValueError,
        match=r"line 2: wav file .*0_1\.wav' is sampled at 32000 Hz; config\.json says "
        r"40000 Hz",
    ):
        load_experiment(exp)

    # through the command: one line, status 1, before any training (no run folder, no adapter)
    g, d = _pretrained(work, "v2", True)
    proc = _cli("train", str(exp), "--pretrained-g", g, "--pretrained-d", d, "-o", str(tmp_path / "v.safetensors"))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rvclora: error: filelist ") and "32000 Hz" in lines[0], lines
    assert not (exp / "rvclora").exists() and not (tmp_path / "v.safetensors").exists()


def test_int16_and_float_waves_read_alike(tmp_path):
    from rvclora.train.data import ClipDataset

    a = load_experiment(_experiment(tmp_path, "float", clips=2, seed=4))
    b = load_experiment(_experiment(tmp_path, "int16", clips=2, seed=4, wav_subtype="PCM_16"))
    wa, wb = ClipDataset(a)[0].wave, ClipDataset(b)[0].wave
    assert wa.shape == wb.shape and (wa - wb).abs().max() <= 1 / 32768 + 1e-7


_KILLED_CHILD = r"""
import os, sys, time
import rvclora.train.loop as loop
marker = sys.argv[1]
real = loop.atomic_write
count = [0]
def slow_second_save(path, write, **kw):
    if path.endswith("train_state.pt"):
        count[0] += 1
        if count[0] == 2:  # the second save: written to its temporary file, then killed before the rename
            def stall(tmp):
                write(tmp)
                open(marker, "w").close()
                time.sleep(600)
            return real(path, stall, **kw)
    return real(path, write, **kw)
loop.atomic_write = slow_second_save
from rvclora.cli import main
raise SystemExit(main(sys.argv[2:]))
"""


@pytest.mark.subprocess
def test_resume_after_sigkill_mid_save_continues_from_the_saved_step(work, tmp_path):
    exp = _experiment(tmp_path, "kill", clips=2)
    g, d = _pretrained(work, "v2", True)
    common = [
        "--pretrained-g",
        g,
        "--pretrained-d",
        d,
        "--batch-size",
        "2",
        "--epochs",
        "3",
        "--lr",
        str(LR),
        "--threads",
        "1",
        "--no-progress",
        "--no-plot",
    ]
    # the reference: three epochs without interruption
    ref = _cli(
        "train",
        exp,
        "-o",
        str(tmp_path / "ref.safetensors"),
        "--run-dir",
        str(tmp_path / "ref"),
        *common,
        env=FIXED_BACKEND,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir, adapter, marker = tmp_path / "run", tmp_path / "voice.safetensors", tmp_path / "in-save"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_CHILD,
            str(marker),
            "train",
            exp,
            "-o",
            str(adapter),
            "--run-dir",
            str(run_dir),
            *common,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=FIXED_BACKEND,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert child.poll() is None, child.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the second save never started"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    # the first save survived whole; the second was caught between its write and its rename
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    assert (state["step"], state["epoch"]) == (1, 1)
    assert any(".rvclora-tmp-" in p.name for p in run_dir.iterdir())
    from rvclora.checkpoint import read_lora_file

    assert read_lora_file(adapter)["epoch"] == 1

    resumed = _cli("train", exp, "-o", str(adapter), "--run-dir", str(run_dir), "--resume", *common, env=FIXED_BACKEND)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step 1" in resumed.stdout
    assert not any(".rvclora-tmp-" in p.name for p in run_dir.iterdir())  # the stale temporary is gone
    steps = [json.loads(line)["step"] for line in (run_dir / LOSS_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3]
    a, b = read_lora_file(adapter)["weights"], read_lora_file(tmp_path / "ref.safetensors")["weights"]
    assert a.keys() == b.keys()
    for k in a:  # the resumed run continued exactly where the uninterrupted one went
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_state(work, one_thread, tmp_path):
    exp = _experiment(tmp_path, "again", clips=2)
    g, d = _pretrained(work, "v2", True)
    base = dict(
        exp_dir=exp,
        pretrained_g=g,
        pretrained_d=d,
        output=str(tmp_path / "a.safetensors"),
        batch_size=2,
        epochs=1,
        threads=one_thread,
        progress=False,
        plot=False,
    )
    Trainer(TrainSettings(**base)).train()
    with pytest.raises(FileExistsError, match="holds a training state from an earlier run; pass --resume"):
        Trainer(TrainSettings(**{**base, "overwrite": False, "output": str(tmp_path / "b.safetensors")}))
    with pytest.raises(ValueError, match="trained with seed = 0, this run has 7"):
        Trainer(TrainSettings(**{**base, "resume": True, "seed": 7}))


@pytest.mark.subprocess
@pytest.mark.slow
def test_demo_runs_the_trainer_end_to_end(tmp_path):
    proc = _cli("demo", "--epochs", "2", "--out-dir", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dataset: 10 clips" in out and "filelist.txt, config.json" in out
    assert re.search(r"ran on: (CPU|GPU) .+", out), out  # the machine and what auto ran
    losses = re.search(r"losses, mean of the first epoch -> the last: mel (\S+) -> (\S+),", out)
    assert losses and float(losses.group(2)) < float(losses.group(1)), out
    diff = re.search(r"merged export vs adapted model, infer\(\) on a training clip: max \|diff\| (\S+) ", out)
    peak = re.search(r"output peak (\S+)\)?", out)
    assert diff and peak and float(diff.group(1)) <= 1e-2 * max(float(peak.group(1)), 1e-3), out
    assert "epoch 2/2" in proc.stderr  # the progress bars
    for name in ("rvclora-demo-voice.safetensors", "rvclora-demo-voice.pth"):
        assert (tmp_path / name).is_file(), name
    run_dir = tmp_path / "logs" / "rvclora-demo-voice" / "rvclora"
    assert (run_dir / LOSS_FILE).is_file() and (run_dir / STATE_FILE).is_file()
