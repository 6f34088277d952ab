"""``pytest bench/``: its options, parametrisation, fixtures and reporting hooks (the harness they drive
— interleaved timing, saved-bytes counts, the table, the machine record — is ``harness.py``).

Every case times one *training step* (forward + backward) of several variants of the same
layer or model, interleaved inside one pytest-benchmark run: each round runs every variant once
(the order rotates from round to round), after warm-up rounds, and the per-variant medians over
the rounds are what the table reports (they are also kept in ``benchmark.extra_info``;
pytest-benchmark's own statistics are those of whole rounds, so its table is left out for these
cases). Ratios are therefore always taken between numbers measured in the same run, close in time.

Variants (the names used everywhere):
``base`` the frozen base (the baseline: weights ``requires_grad=False``, gradient w.r.t. the input
only), ``rvclora`` (``RVCLORA_BACKEND``, default ``auto``: the compiled cpu backend on CPU, else the
torch path), ``plain`` (the
textbook unfused module, ``alternatives.py``), ``peft``, ``loralib``, ``full`` (full fine-tuning:
every weight trains).

Memory: the activation bytes autograd saves for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` over unique storages during the first warm-up step
(deterministic: no timing involved). Parameters are not counted (the model holds them anyway;
saving one costs nothing). rvclora's count is checked against the memory bound of docs/maths.md: the frozen
base's count plus ``x`` and ``u`` of every adapted layer (``bound`` column: ``ok`` or ``OVER``).

Options (or environment variables): ``--bench-quick`` (``RVCLORA_BENCH_QUICK=1``) tiny shapes and
1 warm-up + 2 rounds, for the CI smoke test; ``--bench-json PATH`` (``RVCLORA_BENCH_JSON``), default
``bench/results/<date>-<commit>.json``; ``--bench-threads N`` (``RVCLORA_BENCH_THREADS``), default
every CPU this process may run on; ``--bench-budget S`` (``RVCLORA_BENCH_BUDGET``) the seconds the
timed rounds of all cases may take together (default 480): each case runs at least its minimum
number of rounds and more while its share of the budget allows.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

# The test modules import alternatives.py, gan.py and harness.py as top-level modules, whatever
# pytest's import mode.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402 (after the sys.path entry above)
    _RESULTS_KEY,
    _STATE_KEY,
    BENCH_DIR,
    Harness,
    _available_cpus,
    format_table,
    machine_info,
)


def pytest_addoption(parser):
    group = parser.getgroup("rvclora-bench", "rvclora benchmarks (bench/)")
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=None,
        help="tiny shapes, 1 warm-up + 2 rounds (also RVCLORA_BENCH_QUICK=1)",
    )
    group.addoption(
        "--bench-json",
        default=None,
        help="results file (also RVCLORA_BENCH_JSON); default bench/results/<date>-<commit>.json",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch threads (also RVCLORA_BENCH_THREADS); default: every CPU this process may use",
    )
    group.addoption(
        "--bench-budget",
        type=float,
        default=None,
        help="seconds for the timed rounds of all cases together (also RVCLORA_BENCH_BUDGET; default 480)",
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def pytest_configure(config):
    # `pytest bench/` also collects the GPU benchmarks other modules keep in bench/bench_*.py.
    config.addinivalue_line("python_files", "bench_*.py")
    quick = config.getoption("--bench-quick") or _env_flag("RVCLORA_BENCH_QUICK")
    threads = config.getoption("--bench-threads") or int(os.environ.get("RVCLORA_BENCH_THREADS", "0") or 0)
    threads = threads or _available_cpus()
    torch.set_num_threads(threads)
    budget = config.getoption("--bench-budget") or float(os.environ.get("RVCLORA_BENCH_BUDGET", "0") or 0) or 480.0
    config.stash[_RESULTS_KEY] = []
    config.stash[_STATE_KEY] = {
        "quick": bool(quick),
        "threads": threads,
        "budget_s": budget,
        "start": time.perf_counter(),
        "timed_s": 0.0,
        "pending": {},
        "json_path": None,
    }


def pytest_generate_tests(metafunc):
    # A test module lists its cases as BENCH_PARAMS = {fixture: (full cases, quick cases, id function)}.
    spec = getattr(metafunc.module, "BENCH_PARAMS", {})
    quick = metafunc.config.stash[_STATE_KEY]["quick"]
    for argname, (full, small, idfn) in spec.items():
        if argname in metafunc.fixturenames:
            cases = small if quick else full
            metafunc.parametrize(argname, cases, ids=[idfn(c) for c in cases])


def pytest_collection_modifyitems(session, config, items):
    # The nominal budget of every case still to run, so each case's share of the budget is known.
    state = config.stash[_STATE_KEY]
    state["pending"] = {
        item.nodeid: float(getattr(item.module, "CASE_BUDGET_S", 5.0))
        for item in items
        if "bench_harness" in getattr(item, "fixturenames", ())
    }


@pytest.fixture
def bench_harness(request) -> Harness:
    """The measurement harness for one benchmark test (see the module docstring)."""
    budget = float(getattr(request.module, "CASE_BUDGET_S", 5.0))
    return Harness(request.config, request.node.nodeid, budget)


@pytest.fixture(scope="session")
def bench_quick(request) -> bool:
    """Whether the benchmarks run in quick (smoke-test) mode."""
    return request.config.stash[_STATE_KEY]["quick"]


@pytest.hookimpl(wrapper=True)
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    # Our cases' pytest-benchmark statistics are of whole interleaved rounds; our table replaces them.
    # Other benchmarks in bench/ (the GPU ones) keep pytest-benchmark's table.
    groups = yield
    kept = []
    for name, benches in groups:
        benches = [b for b in benches if not str(b.get("group") or "").startswith("rvclora: ")]
        if benches:
            kept.append((name, benches))
    return kept


def _json_path(config, info: dict) -> Path:
    given = config.getoption("--bench-json") or os.environ.get("RVCLORA_BENCH_JSON")
    if given:
        return Path(given)
    day = datetime.date.today().isoformat()
    commit = (info.get("git_commit") or "nocommit")[:10]
    return BENCH_DIR / "results" / f"{day}-{commit}.json"


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if _STATE_KEY not in config.stash:
        return
    results = config.stash[_RESULTS_KEY]
    state = config.stash[_STATE_KEY]
    if not results:
        return
    info = machine_info(state)
    info["wall_s"] = time.perf_counter() - state["start"]
    info["timed_rounds_s"] = state["timed_s"]
    path = _json_path(config, info)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "results": results}, indent=1, default=str) + "\n")
    state["json_path"] = path
    state["info"] = info


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _STATE_KEY not in config.stash:
        return
    results = config.stash[_RESULTS_KEY]
    state = config.stash[_STATE_KEY]
    if not results or "info" not in state:
        return
    tr = terminalreporter
    tr.section("rvclora benchmark: LoRA training step vs the frozen base and the alternatives")
    for line in format_table(results, state["info"]):
        tr.write_line(line)
    tr.write_line(
        f"results: {state['json_path']} · {len(results)} cases · wall {state['info']['wall_s']:.0f} s "
        f"(timed rounds {state['timed_s']:.0f} s)"
    )
