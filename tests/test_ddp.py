"""DistributedDataParallel: two CPU processes (gloo) train a LoRA-injected RVC generator.

RVC wraps its generator in DDP *without* ``find_unused_parameters``, so every trainable
parameter must get a gradient in every step, and a frozen base must not be communicated at
all. One spawn runs every check (process start-up dominates the cost):

* DDP's reducer holds exactly the LoRA factors (count and bytes), frozen parameters get no
  ``.grad``, and training steps run without ``find_unused_parameters``;
* after training, the LoRA factors are bit-identical on both ranks and equal those of a
  single-process run over the combined batch (checked in the parent process);
* ``eval()`` under DDP merges (``merge_weights=True``) identically on every rank, and
  ``train()`` restores the exact unmerged weights;
* rank 0 saves a checkpoint, every rank loads it after a barrier.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from rvclora import LoRAConfig, get_lora_parameters, inject_lora, load_lora_checkpoint, save_lora_checkpoint
from rvclora.models.rvc import GeneratorConfig, build_generator

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available in this build",
    ),
    pytest.mark.subprocess,
]

WORLD = 2
STEPS = 3
PER_RANK = 2
TIMEOUT_S = 240  # the whole spawn; a hung collective can never block CI longer than this
TINY_RVC = GeneratorConfig(
    "tiny",
    "v2",
    16000,
    (4, 2),
    (8, 4),
    8,
    inter_channels=8,
    upsample_initial_channel=16,
    resblock_kernel_sizes=(3,),
    resblock_dilation_sizes=((1, 3),),
    gin_channels=4,
)
LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=["ups", "resblocks", "cond"], merge_weights=True)


def _model(seed: int = 0):
    """The injected no-f0 generator with non-zero ``B`` (its gradient of ``A`` is then non-zero too)."""
    with torch.random.fork_rng(devices=[]):  # lora_A's init draws from the global generator
        torch.manual_seed(seed)
        model = inject_lora(build_generator(TINY_RVC, f0=False, seed=seed), LORA)
        with torch.no_grad():
            for p in get_lora_parameters(model):
                p.add_(torch.randn(p.shape) * 0.05)
    return model


def _batch():
    """The combined batch of both ranks: latent frames and speaker embeddings, and a target waveform."""
    gen = torch.Generator().manual_seed(7)
    n = WORLD * PER_RANK
    x = torch.randn(n, TINY_RVC.inter_channels, 4, generator=gen)
    g = torch.randn(n, TINY_RVC.gin_channels, 1, generator=gen)
    target = 0.3 * torch.randn(n, 1, 4 * TINY_RVC.hop_length, generator=gen)
    return x, g, target


def _train(model, x, g, target, opt, steps: int):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(x, g), target)  # mean over this process's batch: DDP averages across ranks
        loss.backward()
        opt.step()


def _optimizer(model):
    # RVC's optimizer gets every parameter; frozen ones have no gradient and are skipped
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = _model()
        if rank == 1:
            # DDP must start every rank from rank 0's parameters
            with torch.no_grad():
                for p in get_lora_parameters(model):
                    p.add_(1.0)
        ddp = DDP(model)  # find_unused_parameters=False: RVC's setting
        lora = get_lora_parameters(model)
        logged = ddp._get_ddp_logging_data()
        assert logged["num_parameter_tensors"] == len(lora), logged
        assert logged["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in lora), logged
        assert not logged["find_unused_parameters"]

        x, g, target = _batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        opt = _optimizer(ddp)
        ddp.train()
        _train(ddp, x[part], g[part], target[part], opt, STEPS)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(model.get_parameter(n).grad is None for n in frozen), "a frozen parameter got a grad"
        for name, p in _lora_state(model).items():
            assert _all_equal_across_ranks(p), f"{name} differs across ranks after training"
        torch.save(_lora_state(model), os.path.join(out_dir, f"lora_rank{rank}.pt"))

        # merging in eval() under DDP: identical merged weights and outputs on every rank
        unmerged = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "lora_A")}
        with torch.no_grad():
            model.train(False)
            for m in model.modules():
                if hasattr(m, "lora_A"):
                    m.unmerge()
            reference = model(x, g)
            ddp.eval()
            merged_out = ddp(x, g)
        merged_modules = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}
        assert all(m.merged for m in merged_modules.values()), "eval() did not merge every LoRA layer"
        for name, m in merged_modules.items():
            assert _all_equal_across_ranks(m.weight.detach()), f"merged {name}.weight differs across ranks"
        assert _all_equal_across_ranks(merged_out)
        torch.testing.assert_close(merged_out, reference)
        ddp.train()
        for name, m in merged_modules.items():
            assert not m.merged and torch.equal(m.weight, unmerged[name]), f"{name} not restored exactly"
        _train(ddp, x[part], g[part], target[part], opt, 1)  # DDP still trains after a merge cycle

        # rank 0 saves, every rank loads (after the barrier) into a differently initialised model
        path = os.path.join(out_dir, "lora.safetensors")
        if rank == 0:
            save_lora_checkpoint(model, path, LORA, optimizer_state=opt.state_dict(), epoch=STEPS + 1)
        dist.barrier()
        fresh = _model(seed=1)  # another base too: the adapter's fingerprint check is overridden on purpose
        fresh, opt_state, epoch, config = load_lora_checkpoint(fresh, path, load_optimizer=True, force=True)
        assert epoch == STEPS + 1 and config.r == LORA.r and opt_state is not None
        loaded, trained = _lora_state(fresh), _lora_state(model)
        assert loaded.keys() == trained.keys()
        for name in trained:
            assert torch.equal(loaded[name], trained[name]), f"{name} differs after loading on rank {rank}"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

    # the same steps in one process over the combined batch
    model = _model()
    x, g, target = _batch()
    model.train()
    _train(model, x, g, target, _optimizer(model), STEPS)
    single = _lora_state(model)
    ranks = [torch.load(tmp_path / f"lora_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0].keys() == single.keys()
    moved = [n for n in single if not torch.equal(single[n], _lora_state(_model())[n])]
    assert len(moved) == len(single), "training must move every LoRA factor"
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name])
        # gradients are averaged in a different order (all-reduce vs one batch): float rounding only
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-4, atol=1e-6)
