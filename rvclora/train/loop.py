"""The trainer: RVC's GAN training step, with LoRA on the synthesizer (or, for comparison, all of it).

One step, as RVC's ``train.py`` runs it:

1. the synthesizer's training forward: ``enc_p`` on the content features (and coarse pitch),
   ``enc_q`` on the linear spectrogram → ``z``, the flow → ``z_p``, and the decoder on a random
   ``segment_size`` slice of ``z`` (with the matching slice of f0 for the NSF source);
2. **D step**: ``D(real slice, generated.detach())``, LSGAN loss, AdamW step on D;
3. **G step**: ``D(real slice, generated)``; loss = adversarial + feature matching
   + ``c_mel`` · L1(mel(generated), mel(real)) + ``c_kl`` · KL(posterior ‖ prior); AdamW step on
   the trainable parameters of G (the LoRA factors).

Differences from RVC, none of which changes what is learned:

* **D's parameter gradients are not computed in the G step.** RVC computes them and then throws
  them away (``optim_d.zero_grad()`` runs before the next D step). Here D's parameters have
  ``requires_grad`` off during the G step, so autograd skips them; the gradient that reaches
  the generator is the same. ``skip_d_grads=False`` computes them, as RVC does.
* **The random draws are per clip.** The slice start, the posterior's noise and the NSF
  source's noise of each clip come from a generator seeded by (seed, epoch, the clip's place in
  the epoch), not from one stream per process. So a run is the same whether its batch is split
  over one process or several, and a resumed run continues exactly as an uninterrupted one.
* Both mels are computed in float32 (RVC casts the generated one to half under fp16).

Precision: float32 on CPU; on CUDA fp16 autocast with a GradScaler (RVC's ``fp16_run``) or bf16
autocast, by ``config.json`` or ``precision=``; losses outside autocast, as RVC.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoRAConfig
from ..io import atomic_write, check_output_path, torch_load_error
from .data import Batch, ClipDataset, EpochSampler, Experiment, epoch_loader, load_experiment
from .mel import mel_spectrogram, spec_to_mel

__all__ = ["PRECISIONS", "TrainSettings", "TrainResult", "Trainer", "STATE_FILE", "LOSS_FILE", "PLOT_FILE"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
STATE_FILE = "train_state.pt"
LOSS_FILE = "losses.jsonl"
PLOT_FILE = "losses.png"
_STATE_FORMAT = "rvclora-train-state"
_LOSS_KEYS = ("loss_disc", "loss_gen", "loss_fm", "loss_mel", "loss_kl", "loss_gen_all")


@dataclass
class TrainSettings:
    """What to train and how; ``None`` fields come from ``config.json``."""

    exp_dir: str
    pretrained_g: str
    pretrained_d: str
    output: str | None = None  # the adapter file (.safetensors or .pth); None: none written (full fine-tuning)
    export: str | None = None  # merge into this RVC model of the same base (an export, or the pretrained G to
    # export from): the merged model is written too
    export_output: str | None = None  # where; default: next to ``output``, named <stem>.pth
    run_dir: str | None = None  # checkpoint, loss log and plot; default: <exp_dir>/rvclora
    lora: LoRAConfig | None = None  # default: rvclora.config.VOICE_CONFIG
    full_finetune: bool = False  # train every parameter of G, as RVC does (the benchmark's baseline)
    batch_size: int | None = None  # the global batch of one step, split across processes
    epochs: int | None = None
    save_every: int = 1
    seed: int | None = None
    device: str = "cpu"
    threads: int | None = None
    precision: str = "auto"
    learning_rate: float | None = None
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    skip_d_grads: bool = True
    workers: int = 0
    progress: bool = True
    plot: bool = True


@dataclass
class TrainResult:
    steps: int
    epochs: int
    first: dict[str, float]  # losses of the first logged step of this run
    last: dict[str, float]  # mean losses of the last epoch
    first_epoch: dict[str, float]  # mean losses of the first epoch of this run
    seconds: float
    adapter: str | None
    export: str | None
    run_dir: str
    resumed_from: int | None  # the step a resumed run started at
    trainable: int
    total: int
    notes: list[str] = field(default_factory=list)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby inputs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _load_state_dict_file(path: str, what: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds; one line says why
        raise ValueError(f"{what} {path!r} cannot be read: {torch_load_error(e)}") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        return data["model"]
    if isinstance(data, dict) and "weight" in data:
        raise ValueError(
            f"{what} {path!r} is an exported inference model (no enc_q, no discriminator); training "
            "needs RVC's pretrained checkpoint ({'model': state_dict}, e.g. pretrained_v2/f0G40k.pth)"
        )
    raise ValueError(
        f"{what} {path!r} holds no 'model' state dict; expected RVC's pretrained checkpoint ({{'model': state_dict}})"
    )


def _synthesizer_name(version: str, sr: int) -> str:
    return f"{version}-{sr // 1000}k"


class _GForward(nn.Module):
    """The synthesizer's training forward with per-clip random draws (the module DDP wraps)."""

    def __init__(self, synth: nn.Module, segment_frames: int) -> None:
        super().__init__()
        self.synth = synth
        self.segment_frames = segment_frames

    def forward(self, batch: Batch, ids: Tensor, noise: Tensor, gens: list[torch.Generator]):
        from ..models.synthesizer import slice_segments, slice_segments2

        s, seg = self.synth, self.segment_frames
        g = s.emb_g(batch.speaker).unsqueeze(-1)
        m_p, logs_p, x_mask = s.enc_p(batch.phone, batch.pitch, batch.lengths)
        # enc_q's own sample is replaced by one from this clip's generator: z = m + ε·exp(logs)
        _, m_q, logs_q, y_mask = s.enc_q(batch.spec, batch.lengths, g=g)
        z = (m_q + noise.to(m_q.dtype) * torch.exp(logs_q)) * y_mask
        z_p = s.flow(z, y_mask, g=g)
        z_slice = slice_segments(z, ids, seg)
        dec = s.dec
        if batch.pitchf is not None:
            pitchf = slice_segments2(batch.pitchf, ids, seg)
            source = torch.cat([dec.m_source(pitchf[i : i + 1], dec.upp, gens[i]) for i in range(len(gens))])
            o = dec._decode(z_slice, g, source.transpose(1, 2))
        else:
            o = dec(z_slice, g=g)
        return o, x_mask, y_mask, (z, z_p, m_p, logs_p, m_q, logs_q)


class Trainer:
    """Fine-tune an RVC voice from an experiment folder (see the module docstring).

    ``Trainer(settings)`` checks everything (folder, files, outputs) and builds the models;
    :meth:`train` runs the epochs. Under ``torchrun`` each process takes its share of every
    step's batch (DDP, gloo on CPU, NCCL on CUDA); only rank 0 writes files.
    """

    def __init__(self, settings: TrainSettings, *, log: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self._log_fn = log or (lambda msg: print(msg, flush=True))
        self.notes: list[str] = []
        self._init_distributed()
        self._check_settings()
        self._build()

    # ------------------------------------------------------------------ setup

    def log(self, msg: str) -> None:
        if self.rank == 0:
            self._log_fn(msg)

    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.world, self.rank, self.local_rank = world, int(os.environ.get("RANK", "0")), 0
        self.distributed = world > 1
        if not self.distributed:
            return
        import torch.distributed as dist

        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            cuda = str(self.s.device).startswith("cuda")
            dist.init_process_group(backend="nccl" if cuda else "gloo")

    def _check_settings(self) -> None:
        s = self.s
        if s.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {s.precision!r}")
        for name in ("batch_size", "epochs", "threads"):
            v = getattr(s, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("save_every", "log_every"):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if s.learning_rate is not None and not (math.isfinite(s.learning_rate) and s.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {s.learning_rate!r}")
        if s.full_finetune and (s.output is not None or s.export is not None):
            raise ValueError("full fine-tuning trains no adapter: output and export must be None")
        if not s.full_finetune and s.output is None:
            raise ValueError("output (-o): the adapter file to write is required")
        try:
            device = torch.device(s.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {s.device!r} is not a device; expected cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"--device {s.device!r}: CUDA is not available on this machine")
            if self.distributed:
                device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise ValueError(f"--device {s.device!r}: expected cpu or cuda")
        self.device = device
        if s.threads is not None:
            torch.set_num_threads(s.threads)
        # outputs, before any work
        if s.output is not None:
            check_output_path(
                s.output,
                what="adapter (-o)",
                overwrite=s.overwrite or s.resume,
                suffixes=(".safetensors", ".pth", ".pt"),
            )
        if s.export is not None:
            if not os.path.isfile(s.export):
                raise FileNotFoundError(
                    f"--export {s.export!r} does not exist; expected an exported RVC model "
                    "of the pretrained base (or no value: export from --pretrained-g)"
                )
            self.export_output = s.export_output or _default_export_output(s.output)
            check_output_path(
                self.export_output,
                what="merged model",
                overwrite=s.overwrite or s.resume,
                inputs=(("base model (--export)", s.export), ("adapter", s.output)),
                suffixes=(".pth",),
            )
        else:
            self.export_output = None
        self.run_dir = os.path.abspath(s.run_dir or os.path.join(s.exp_dir, "rvclora"))
        state = os.path.join(self.run_dir, STATE_FILE)
        if s.resume and not os.path.isfile(state):
            raise FileNotFoundError(f"--resume: {state!r} does not exist; nothing to resume (start without --resume)")
        if not s.resume and os.path.isfile(state) and not s.overwrite:
            raise FileExistsError(
                f"run folder {self.run_dir!r} holds a training state from an earlier run; pass "
                "--resume to continue it, --overwrite to start again, or another --run-dir"
            )

    def _precision(self, exp: Experiment) -> str:
        s = self.s
        if self.device.type == "cpu":
            if s.precision in ("fp16", "bf16"):
                raise ValueError(
                    f"--precision {s.precision}: mixed precision training runs on CUDA only; on CPU "
                    "the trainer uses fp32"
                )
            if exp.config.fp16_run and s.precision == "auto":
                self.notes.append("config.json asks for fp16_run; on CPU training runs in fp32")
            return "fp32"
        if s.precision != "auto":
            if s.precision == "bf16" and not torch.cuda.is_bf16_supported():
                raise ValueError("--precision bf16: this GPU does not support bfloat16")
            return s.precision
        return "fp16" if exp.config.fp16_run else "fp32"

    def _build(self) -> None:
        from ..fingerprint import base_fingerprint
        from ..inject import inject_lora
        from ..models.discriminator import build_discriminator
        from ..models.synthesizer import build_synthesizer

        s = self.s
        g_state = _load_state_dict_file(s.pretrained_g, "--pretrained-g")
        d_state = _load_state_dict_file(s.pretrained_d, "--pretrained-d")
        phone = g_state.get("enc_p.emb_phone.weight")
        if not isinstance(phone, Tensor) or phone.dim() != 2 or phone.shape[1] not in (256, 768):
            raise ValueError(
                f"--pretrained-g {s.pretrained_g!r} has no enc_p.emb_phone.weight of width 256 (v1) or "
                "768 (v2); expected an RVC synthesizer checkpoint (G)"
            )
        version = "v1" if phone.shape[1] == 256 else "v2"
        f0 = "enc_p.emb_pitch.weight" in g_state
        exp = load_experiment(s.exp_dir, f0=f0, version=version)  # checked before anything trains
        self.experiment = exp
        cfg = exp.config
        self.seed = cfg.seed if s.seed is None else s.seed
        self.batch_size = cfg.batch_size if s.batch_size is None else s.batch_size
        self.epochs = cfg.epochs if s.epochs is None else s.epochs
        self.learning_rate = cfg.learning_rate if s.learning_rate is None else s.learning_rate
        self.precision = self._precision(exp)

        name = _synthesizer_name(version, cfg.sampling_rate)
        synth = build_synthesizer(name, f0=f0, seed=0)
        if synth.hop_length != cfg.hop_length or synth.spec_channels != cfg.spec_channels:
            raise ValueError(
                f"config {cfg.path!r}: hop_length {cfg.hop_length} and filter_length "
                f"{cfg.filter_length} do not match RVC's {name} model (hop {synth.hop_length}, "
                f"{synth.spec_channels} spectrogram channels)"
            )
        try:
            synth.load_state_dict(g_state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"--pretrained-g {s.pretrained_g!r} does not fit RVC's {name} "
                f"{'f0' if f0 else 'no-f0'} synthesizer: {_first_line(e)}"
            ) from None
        disc = build_discriminator(version, seed=0, shrink=_discriminator_shrink(d_state))
        try:
            disc.load_state_dict(d_state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"--pretrained-d {s.pretrained_d!r} does not fit RVC's {version} multi-period "
                f"discriminator: {_first_line(e)}"
            ) from None
        self.version, self.f0, self.synth_name = version, f0, name
        self.total_params = sum(p.numel() for p in synth.parameters())
        torch.manual_seed(self.seed)  # the LoRA factors' init: the same on every process
        if s.full_finetune:
            self.lora_config = None
            self.base_fingerprint = base_fingerprint(synth)
        else:
            if s.lora is None:
                from ..config import VOICE_CONFIG

                self.lora_config = VOICE_CONFIG
            else:
                self.lora_config = s.lora
            inject_lora(synth, self.lora_config)  # freezes the base: only the adapter trains
            self.base_fingerprint = synth.rvclora_base_fingerprint
        synth.to(self.device)
        disc.to(self.device)
        self.synth, self.disc = synth, disc
        self.trainable = [p for p in synth.parameters() if p.requires_grad]
        self.trainable_count = sum(p.numel() for p in self.trainable)
        g_forward: nn.Module = _GForward(synth, cfg.segment_frames)
        d_module: nn.Module = disc
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            g_forward = DDP(g_forward, device_ids=ids)
            d_module = DDP(disc, device_ids=ids)
        self.g_forward, self.d_module = g_forward, d_module
        betas, eps = cfg.betas, cfg.eps
        self.opt_g = torch.optim.AdamW(self.trainable, self.learning_rate, betas=betas, eps=eps)
        self.opt_d = torch.optim.AdamW(disc.parameters(), self.learning_rate, betas=betas, eps=eps)
        self.sched_g = torch.optim.lr_scheduler.ExponentialLR(self.opt_g, gamma=cfg.lr_decay)
        self.sched_d = torch.optim.lr_scheduler.ExponentialLR(self.opt_d, gamma=cfg.lr_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.dataset = ClipDataset(exp)
        self.sampler = EpochSampler(
            len(self.dataset), self.batch_size, seed=self.seed, rank=self.rank, world=self.world
        )
        self.step_count, self.epoch_done, self.resumed_from = 0, 0, None
        if s.resume:
            self._load_state()

    # ------------------------------------------------------------------ one step

    def _draws(self, batch: Batch, epoch: int) -> tuple[Tensor, Tensor, list[torch.Generator]]:
        seg = self.experiment.config.segment_frames
        inter = self.synth.inter_channels
        t_max = batch.spec.shape[2]
        ids, gens = [], []
        noise = torch.zeros(len(batch), inter, t_max)
        for i, (pos, n) in enumerate(zip(batch.positions.tolist(), batch.lengths.tolist())):
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, pos))
            ids.append(int(torch.rand((), generator=g) * (n - seg + 1)))  # RVC: (rand · (len − seg + 1)).long()
            noise[i, :, :n] = torch.randn(inter, n, generator=g)
            gens.append(g)
        return torch.tensor(ids, dtype=torch.long), noise.to(self.device), gens

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast("cuda", dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)

    def step(self, batch: Batch, epoch: int) -> dict[str, float]:
        """One training step (D step, then G step) on this process's share of a batch; returns its losses."""
        from ..models.discriminator import discriminator_loss, feature_loss, generator_loss, kl_loss
        from ..models.synthesizer import slice_segments

        cfg = self.experiment.config
        seg = cfg.segment_frames
        batch = batch.to(self.device)
        ids, noise, gens = self._draws(batch, epoch)
        ids_dev = ids.to(self.device)
        with self._autocast():
            y_hat, _x_mask, z_mask, (_z, z_p, m_p, logs_p, _m_q, logs_q) = self.g_forward(batch, ids, noise, gens)
        spec_slice = slice_segments(batch.spec, ids_dev, seg)
        y_mel = spec_to_mel(
            spec_slice, cfg.sampling_rate, cfg.filter_length, cfg.n_mel_channels, cfg.mel_fmin, cfg.mel_fmax
        )
        y_hat_mel = mel_spectrogram(
            y_hat.float().squeeze(1),
            cfg.sampling_rate,
            cfg.filter_length,
            cfg.hop_length,
            cfg.win_length,
            cfg.n_mel_channels,
            cfg.mel_fmin,
            cfg.mel_fmax,
        )
        wave = slice_segments(batch.wave, ids_dev * cfg.hop_length, cfg.segment_size)

        # D step
        with self._autocast():
            y_d_r, y_d_g, _, _ = self.d_module(wave, y_hat.detach())
        loss_disc, _, _ = discriminator_loss(y_d_r, y_d_g)
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler.scale(loss_disc).backward()
        self.scaler.unscale_(self.opt_d)
        self.scaler.step(self.opt_d)

        # G step
        d_for_g = self.disc if self.s.skip_d_grads else self.d_module
        if self.s.skip_d_grads:
            self.disc.requires_grad_(False)
        try:
            with self._autocast():
                _, y_d_g, fmap_r, fmap_g = d_for_g(wave, y_hat)
        finally:
            if self.s.skip_d_grads:
                self.disc.requires_grad_(True)
        loss_mel = F.l1_loss(y_mel, y_hat_mel) * cfg.c_mel
        loss_kl = kl_loss(z_p, logs_q, m_p, logs_p, z_mask) * cfg.c_kl
        loss_fm = feature_loss(fmap_r, fmap_g)
        loss_gen, _ = generator_loss(y_d_g)
        loss_gen_all = loss_gen + loss_fm + loss_mel + loss_kl
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss_gen_all).backward()
        self.scaler.unscale_(self.opt_g)
        self.scaler.step(self.opt_g)
        self.scaler.update()
        self.step_count += 1
        return {
            "loss_disc": loss_disc.item(),
            "loss_gen": loss_gen.item(),
            "loss_fm": loss_fm.item(),
            "loss_mel": loss_mel.item(),
            "loss_kl": loss_kl.item(),
            "loss_gen_all": loss_gen_all.item(),
        }

    def _global_mean(self, losses: dict[str, float]) -> dict[str, float]:
        if not self.distributed:
            return losses
        import torch.distributed as dist

        t = torch.tensor([losses[k] for k in _LOSS_KEYS], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(_LOSS_KEYS, t.tolist())}

    # ------------------------------------------------------------------ the run

    def train(self) -> TrainResult:
        """Run the remaining epochs; save every ``save_every`` epochs and at the end; write the outputs."""
        started = time.perf_counter()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            self._trim_loss_log()
        first: dict[str, float] | None = None
        first_epoch: dict[str, float] | None = None
        last: dict[str, float] = {}
        steps_per_epoch = self.sampler.steps_per_epoch()
        for epoch in range(self.epoch_done + 1, self.epochs + 1):
            self.synth.train()
            self.disc.train()
            sums = dict.fromkeys(_LOSS_KEYS, 0.0)
            bar = self._bar(epoch, steps_per_epoch)
            for batch in epoch_loader(self.dataset, self.sampler, epoch, self.s.workers):
                losses = self._global_mean(self.step(batch, epoch))
                for k in _LOSS_KEYS:
                    sums[k] += losses[k]
                if not all(math.isfinite(v) for v in losses.values()):
                    bad = next(k for k, v in losses.items() if not math.isfinite(v))
                    raise RuntimeError(
                        f"training diverged at step {self.step_count} (epoch {epoch}): {bad} = "
                        f"{losses[bad]}; the last saved state is in {self.run_dir!r}"
                    )
                if first is None:
                    first = losses
                if self.step_count % self.s.log_every == 0:
                    self._log_losses(epoch, losses)
                if bar is not None:
                    bar.set_postfix_str(
                        f"mel {losses['loss_mel']:.2f} kl {losses['loss_kl']:.2f} "
                        f"fm {losses['loss_fm']:.2f} gen {losses['loss_gen']:.2f} "
                        f"disc {losses['loss_disc']:.2f}",
                        refresh=False,
                    )
                    bar.update(1)
            if bar is not None:
                bar.close()
            last = {k: v / steps_per_epoch for k, v in sums.items()}
            if first_epoch is None:
                first_epoch = last
            self.sched_g.step()
            self.sched_d.step()
            self.epoch_done = epoch
            if epoch % self.s.save_every == 0 or epoch == self.epochs:
                self._save(epoch)
        adapter = export = None
        if self.rank == 0:
            if self.s.output is not None and self.epoch_done > 0:
                adapter = self.s.output
                if not os.path.isfile(adapter):
                    self._write_adapter()
            if self.export_output is not None:
                export = self._export()
            if self.s.plot:
                self._plot()
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return TrainResult(
            self.step_count - (self.resumed_from or 0),
            self.epoch_done,
            first or {},
            last,
            first_epoch or {},
            time.perf_counter() - started,
            adapter,
            export,
            self.run_dir,
            self.resumed_from,
            self.trainable_count,
            self.total_params,
            list(self.notes),
        )

    def _bar(self, epoch: int, total: int):
        if self.rank != 0 or not self.s.progress:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=f"epoch {epoch}/{self.epochs}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=True,
        )

    # ------------------------------------------------------------------ files

    def _log_losses(self, epoch: int, losses: dict[str, float]) -> None:
        if self.rank != 0:
            return
        row = {"step": self.step_count, "epoch": epoch, "lr": self.opt_g.param_groups[0]["lr"], **losses}
        with open(os.path.join(self.run_dir, LOSS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_loss_log(self) -> None:
        """Drop logged steps after the state this run starts from (a killed run logged past its last save)."""
        path = os.path.join(self.run_dir, LOSS_FILE)
        if not os.path.isfile(path):
            return
        if not self.s.resume:
            os.unlink(path)
            return
        with open(path, encoding="utf-8") as f:
            rows = [ln for ln in f.read().splitlines() if ln.strip()]
        keep = []
        for ln in rows:
            try:
                if json.loads(ln)["step"] <= self.step_count:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        text = "".join(ln + "\n" for ln in keep)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(path, write)

    def _write_adapter(self) -> None:
        from ..checkpoint import save_lora_checkpoint

        meta = {
            "trained_by": "rvclora train",
            "experiment": self.experiment.path,
            "synthesizer": self.synth_name,
            "f0": self.f0,
            "steps": self.step_count,
            "epochs": self.epoch_done,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
        }
        save_lora_checkpoint(self.synth, self.s.output, self.lora_config, epoch=self.epoch_done, metadata=meta)

    def _settings_record(self) -> dict[str, Any]:
        return {
            "base_fingerprint": self.base_fingerprint,
            "synthesizer": self.synth_name,
            "f0": self.f0,
            "lora": None if self.lora_config is None else self.lora_config.to_dict(),
            "full_finetune": self.s.full_finetune,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "clips": len(self.dataset),
        }

    def _save(self, epoch: int) -> None:
        if self.rank == 0:
            trainable = {k: v.detach().cpu().clone() for k, v in self.synth.named_parameters() if v.requires_grad}
            state = {
                "format": _STATE_FORMAT,
                "format_version": 1,
                "step": self.step_count,
                "epoch": epoch,
                "settings": self._settings_record(),
                "trainable": trainable,
                "discriminator": {k: v.detach().cpu().clone() for k, v in self.disc.state_dict().items()},
                "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict(),
                "sched_g": self.sched_g.state_dict(),
                "sched_d": self.sched_d.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            atomic_write(os.path.join(self.run_dir, STATE_FILE), lambda tmp: torch.save(state, tmp))
            if self.s.output is not None:
                self._write_adapter()
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _load_state(self) -> None:
        path = os.path.join(self.run_dir, STATE_FILE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - one line says why
            raise ValueError(f"training state {path!r} cannot be read: {torch_load_error(e)}") from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"training state {path!r} is not an rvclora training state")
        saved, now = state["settings"], self._settings_record()
        for key in now:
            if saved.get(key) != now[key]:
                raise ValueError(
                    f"--resume: the state in {path!r} was trained with {key} = {saved.get(key)!r}, this "
                    f"run has {now[key]!r}; resume with the same settings or start a new --run-dir"
                )
        params = dict(self.synth.named_parameters())
        for k, v in state["trainable"].items():
            if k not in params or not params[k].requires_grad or params[k].shape != v.shape:
                raise ValueError(f"training state {path!r}: {k!r} does not fit this model")
            with torch.no_grad():
                params[k].copy_(v)
        self.disc.load_state_dict(state["discriminator"], strict=True)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = self.resumed_from = int(state["step"])
        self.epoch_done = int(state["epoch"])
        if self.epoch_done >= self.epochs:
            self.notes.append(f"the saved state already completed {self.epoch_done} of {self.epochs} epochs")

    def _export(self) -> str:
        from ..rvc_files import load_rvc_file, merge_adapter

        from_checkpoint = load_rvc_file(self.s.export).kind != "exported"  # the pretrained G: write an export
        merge_adapter(self.s.export, self.s.output, self.export_output, overwrite=True, export=from_checkpoint)
        return self.export_output

    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.notes.append("matplotlib is not installed: no loss plot")
            return
        path = os.path.join(self.run_dir, LOSS_FILE)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        if not rows:
            return
        fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes.flat, _LOSS_KEYS):
            ax.plot(steps, [r[key] for r in rows], lw=1)
            ax.set_title(key)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("step")
        fig.tight_layout()
        atomic_write(os.path.join(self.run_dir, PLOT_FILE), lambda tmp: fig.savefig(tmp, format="png", dpi=80))
        plt.close(fig)


def _discriminator_shrink(state: dict[str, Tensor]) -> int:
    """RVC's discriminator has 32 channels after a period sub-discriminator's first conv; a narrower one
    (``build_discriminator(shrink=…)``, used by the demo and the tests) divides every width alike."""
    for key in (
        "discriminators.1.convs.0.weight_v",
        "discriminators.1.convs.0.parametrizations.weight.original1",
        "discriminators.1.convs.0.weight",
    ):
        t = state.get(key)
        if isinstance(t, Tensor) and t.dim() == 4 and 0 < t.shape[0] <= 32 and 32 % t.shape[0] == 0:
            return 32 // t.shape[0]
    return 1


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _default_export_output(adapter: str | None) -> str:
    if adapter is None:
        raise ValueError("--export needs -o (the adapter it merges)")
    stem, ext = os.path.splitext(adapter)
    return stem + (".merged.pth" if ext.lower() == ".pth" else ".pth")
