"""Voice blending end to end: ``rvclora mix``, ``rvclora merge BASE A:w B:w``, ``rvclora info`` on a blend.

The merged RVC export of a weighted blend is checked against an independent construction:
the base generator with ``W0 + Σ wᵢ·ΔWᵢ`` written into each layer from the adapters' own
``get_delta_weight``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rvclora import LoRAConfig, inject_lora, load_lora_checkpoint, lora_modules, save_lora_checkpoint
from rvclora.checkpoint import read_lora_file
from rvclora.cli import main
from rvclora.inject import randomize_lora_
from rvclora.models.rvc import build_generator, get_generator_config
from rvclora.rvc_files import write_exported_model

CFG = get_generator_config("40k")
FRAMES = 4
TARGETS = ["ups", "resblocks"]


def _adapted(r: int, alpha: float, seed: int, base_seed: int = 0, targets=TARGETS):
    model = inject_lora(
        build_generator("40k", seed=base_seed), LoRAConfig(r=r, lora_alpha=alpha, target_modules=list(targets))
    )
    randomize_lora_(model, relative_norm=0.2, seed=seed)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("blend")
    write_exported_model(build_generator("40k", seed=0).eval(), d / "base.pth", CFG, info="base")
    a, b = _adapted(4, 8.0, 1), _adapted(2, 6.0, 2)
    save_lora_checkpoint(a, d / "a.safetensors")
    save_lora_checkpoint(b, d / "b.safetensors")
    save_lora_checkpoint(_adapted(2, 4.0, 3, base_seed=1), d / "other_base.safetensors")
    save_lora_checkpoint(_adapted(2, 4.0, 4, targets=["ups"]), d / "ups_only.safetensors")
    return {"dir": d, "a": a.eval(), "b": b.eval()}


def _inputs():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 192, FRAMES, generator=gen)
    f0 = 100 + 150 * torch.rand(1, FRAMES, generator=gen)
    return x, f0, torch.randn(1, 256, 1, generator=gen)


def _run(gen) -> torch.Tensor:
    x, f0, g = _inputs()
    with torch.no_grad():
        return gen(x, f0, g=g)


def _weighted_sum_model(files: dict, wa: float, wb: float):
    """The base with ``W0 + wa·ΔW_a + wb·ΔW_b`` in every adapted layer (the factors zeroed)."""
    model = _adapted(1, 1.0, 0)
    la, lb = dict(lora_modules(files["a"])), dict(lora_modules(files["b"]))
    with torch.no_grad():
        for name, m in lora_modules(model):
            m.lora_B.zero_()
            m.weight.add_(wa * la[name].get_delta_weight() + wb * lb[name].get_delta_weight())
    return model.eval()


def _load_merged(path: Path):
    from rvclora.rvc_files import build_generator_from_rvc, load_rvc_file

    return build_generator_from_rvc(load_rvc_file(path), dtype=torch.float32).eval()


def test_mix_writes_an_exact_blend_and_info_shows_its_sources(files, capsys):
    d = files["dir"]
    rc = main(["mix", f"{d}/a.safetensors:0.6", f"{d}/b.safetensors:-0.4", "-o", f"{d}/mix.safetensors"])
    assert rc == 0
    assert "blend of 2 adapters (exact), r=6" in capsys.readouterr().out
    mix = read_lora_file(d / "mix.safetensors")
    assert mix["config"].r == 6 and mix["base_fingerprint"] == read_lora_file(d / "a.safetensors")["base_fingerprint"]
    # usable everywhere an adapter is: load it into the base and compare ΔW per layer
    model, *_ = load_lora_checkpoint(build_generator("40k", seed=0), d / "mix.safetensors")
    want = _weighted_sum_model(files, 0.6, -0.4)
    for (name, m), (_, w) in zip(lora_modules(model), lora_modules(want)):
        torch.testing.assert_close(m.weight + m.get_delta_weight(), w.weight, rtol=1e-5, atol=1e-6, msg=name)

    assert main(["info", f"{d}/mix.safetensors"]) == 0
    out = capsys.readouterr().out
    assert "blend (exact) of:" in out and "+0.6 x" in out and "-0.4 x" in out and "a.safetensors" in out


def test_mix_with_rank_reports_the_truncation_error(files, capsys):
    d = files["dir"]
    assert (
        main(["mix", f"{d}/a.safetensors:0.5", f"{d}/b.safetensors:0.5", "--rank", "3", "-o", f"{d}/mix3.safetensors"])
        == 0
    )
    assert "relative error per layer" in capsys.readouterr().out
    mix = read_lora_file(d / "mix3.safetensors")
    assert mix["config"].r == 3
    errors = mix["metadata"]["blend"]["errors"]
    assert len(errors) == 76 and all(0.0 < e < 1.0 for e in errors.values())
    assert main(["info", f"{d}/mix3.safetensors"]) == 0
    assert "blend (rank 3 by SVD)" in capsys.readouterr().out


def test_merge_several_weighted_adapters_into_one_export(files, capsys):
    d = files["dir"]
    assert (
        main(["merge", f"{d}/base.pth", f"{d}/a.safetensors:0.6", f"{d}/b.safetensors:0.4", "-o", f"{d}/blend.pth"])
        == 0
    )
    assert "blend a.safetensors:0.6 + b.safetensors:0.4" in capsys.readouterr().out
    got = _run(_load_merged(d / "blend.pth"))
    want = _run(_weighted_sum_model(files, 0.6, 0.4))
    base_err = (_run(_load_merged(d / "base.pth")) - _run(build_generator("40k", seed=0).eval())).abs().max().item()
    assert (got - want).abs().max().item() <= 2 * base_err + 1e-6  # fp16 export: what storing the base costs
    assert (want - _run(build_generator("40k", seed=0).eval())).abs().max().item() > 10 * (2 * base_err + 1e-6)
    # the same as merging the mix file
    assert main(["mix", f"{d}/a.safetensors:0.6", f"{d}/b.safetensors:0.4", "-o", f"{d}/m64.safetensors"]) == 0
    assert main(["merge", f"{d}/base.pth", f"{d}/m64.safetensors", "-o", f"{d}/via_mix.pth"]) == 0
    a = torch.load(d / "blend.pth", weights_only=True)["weight"]
    b = torch.load(d / "via_mix.pth", weights_only=True)["weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_one_and_zero_merge_like_the_single_adapter(files):
    d = files["dir"]
    assert main(["merge", f"{d}/base.pth", f"{d}/a.safetensors", "-o", f"{d}/single.pth"]) == 0
    assert (
        main(["merge", f"{d}/base.pth", f"{d}/a.safetensors:1", f"{d}/b.safetensors:0", "-o", f"{d}/one_zero.pth"]) == 0
    )
    a = torch.load(d / "single.pth", weights_only=True)["weight"]
    b = torch.load(d / "one_zero.pth", weights_only=True)["weight"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() / (a[k].float().abs().max().item() + 1e-12) for k in a)
    assert worst <= 2**-10  # at most one fp16 rounding step apart (ΔW computed from folded factors)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{d}/a.safetensors:0.5", "{d}/other_base.safetensors:0.5"], "different base models"),
        (["{d}/a.safetensors:0.5", "{d}/ups_only.safetensors:0.5"], "other layers"),
        (["{d}/a.safetensors:x"], "must be a number"),
        (["{d}/a.safetensors:nan"], "finite"),
        (["{d}/missing.safetensors:0.5"], "does not exist"),
    ],
)
@pytest.mark.parametrize("command", ["mix", "merge"])
def test_bad_blends_are_refused_in_one_line(files, capsys, command, args, message):
    d = files["dir"]
    argv = [command] + ([f"{d}/base.pth"] if command == "merge" else []) + [a.format(d=d) for a in args]
    out = d / f"refused-{command}.{'pth' if command == 'merge' else 'safetensors'}"
    assert main(argv + ["-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rvclora: error:") and message in err[0], err
    assert not out.exists()


def test_empty_adapter_list_is_a_usage_error(files):
    with pytest.raises(SystemExit) as e:
        main(["mix", "-o", str(files["dir"] / "x.safetensors")])
    assert e.value.code == 2


def test_force_blends_different_bases_with_a_warning(files, capsys):
    d = files["dir"]
    assert (
        main(
            [
                "mix",
                f"{d}/a.safetensors:0.5",
                f"{d}/other_base.safetensors:0.5",
                "--force",
                "-o",
                f"{d}/forced.safetensors",
            ]
        )
        == 0
    )
    assert "different base models" in capsys.readouterr().err
    assert read_lora_file(d / "forced.safetensors")["base_fingerprint"] is None
