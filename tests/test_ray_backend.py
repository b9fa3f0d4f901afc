"""The Ray backend on a local Ray instance: same per-site results as the in-process engine, same seed.

The small world is run in process once (`in_process`) and compared with each Ray run; the CLI's
`simulate --backend ray` run is the scope-``sites`` run of `simulate_on_ray` (`cli_on_ray` records what
the CLI got from it), so one Ray run backs both the API and the CLI checks. That sites train, evaluate
and protect their updates in their actors (record-level DP-SGD included) is checked in
tests/test_ray_sites_boundary.py.

Needs the `ray` extra (`pip install -e ".[test,ray]"`, which .ci/run installs); skipped, saying so,
where Ray is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import LEDGER_FIELDS, write_world
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import SimulationResult, simulate
from worldlm_secure.ledger import verify

ray = pytest.importorskip("ray", reason="Ray backend test needs the ray extra: pip install -e '.[test,ray]'")

# its module-scoped runs are shared by several tests: keep them in one xdist process (--dist loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_ray_backend")]

METHOD_NAMES = ("worldlm", "fedavg")
ROUNDS = 2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def in_process(world: Path) -> SimulationResult:
    """Both methods on the small world in process, ledgers under ``world.parent / "a"``."""
    return simulate(world, methods=[METHODS[m] for m in METHOD_NAMES], rounds=ROUNDS, device="cpu",
                    ledger_root=world.parent / "a")


@pytest.fixture(scope="module")
def cli_on_ray(local_ray: Any, world: Path) -> tuple[int, Path, list[SimulationResult]]:
    """`simulate --backend ray` (scope sites, the default) on the small world, both methods: its exit code,
    its --out folder, and the `SimulationResult` the CLI got from `simulate_on_ray`."""
    from worldlm_secure.cli import main
    from worldlm_secure.federation import ray_backend

    got: list[SimulationResult] = []
    real = ray_backend.simulate_on_ray

    def recorded(*args: Any, **kwargs: Any) -> Any:
        got.append(real(*args, **kwargs))
        return got[-1]

    out = world.parent / "cli-out"
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ray_backend, "simulate_on_ray", recorded)
            code = main(["simulate", str(world), "--out", str(out), "--rounds", str(ROUNDS), "--device", "cpu",
                         "--methods", ",".join(METHOD_NAMES), "--backend", "ray"])
    finally:
        torch.set_num_threads(threads)  # the CLI sets the process's torch threads; later in-process runs keep theirs
    return code, out, got


def _same_as_in_process(remote: SimulationResult, local: SimulationResult, remote_ledgers: Path,
                        local_ledgers: Path) -> None:
    assert list(remote.methods) == list(METHOD_NAMES)
    for name in METHOD_NAMES:
        a, b = local.methods[name].sites, remote.methods[name].sites
        assert set(a) == set(b) == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
        for site in a:
            assert b[site] == pytest.approx(a[site], rel=1e-9), (name, site)
        assert remote.methods[name].stats.bytes_up == local.methods[name].stats.bytes_up
    # the tasks kept the same signed ledgers, in the same places, entry for entry
    files = sorted(p.relative_to(remote_ledgers) for p in remote_ledgers.rglob("*.sqlite"))
    assert files == sorted(p.relative_to(local_ledgers) for p in local_ledgers.rglob("*.sqlite"))
    for rel in files:
        got, want = verify(remote_ledgers / rel), verify(local_ledgers / rel)
        assert got.ok and want.ok, (rel, got.problem, want.problem)
        assert [tuple(getattr(e, f) for f in LEDGER_FIELDS) for e in got.entries] == [
            tuple(getattr(e, f) for f in LEDGER_FIELDS) for e in want.entries], rel


@pytest.mark.parametrize("scope", ["sites", "methods"])
def test_simulate_on_ray_matches_in_process(
    local_ray: Any, tmp_path: Path, world: Path, in_process: SimulationResult,
    cli_on_ray: tuple[int, Path, list[SimulationResult]], scope: str,
) -> None:
    """Scope ``sites`` is checked on the CLI's run (`cli_on_ray`: the same call, ledgers in its --out),
    scope ``methods`` on a run of its own."""
    from worldlm_secure.federation.ray_backend import simulate_on_ray

    if scope == "sites":
        code, out, got = cli_on_ray
        assert code == 0 and len(got) == 1
        remote, ledgers = got[0], out / "ledgers"
        assert remote.settings.rounds == ROUNDS
    else:
        ledgers = tmp_path / "b"
        remote = simulate_on_ray(world, methods=[METHODS[m] for m in METHOD_NAMES], rounds=ROUNDS, device="cpu",
                                 ledger_root=ledgers, scope=scope)
    _same_as_in_process(remote, in_process, ledgers, world.parent / "a")


def test_compare_cells_on_ray_match_in_process(local_ray: Any, tmp_path: Path) -> None:
    from worldlm_secure.compare import load_grid, run_study

    write_world(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: t\nworld: world.yaml\nrounds: 2\naxes: {protocol: [none, masking]}\n")
    local = {c["cell"]: c for c in run_study(load_grid(grid), tmp_path / "local").cells}
    remote = {c["cell"]: c for c in run_study(load_grid(grid), tmp_path / "ray", backend="ray").cells}
    assert set(local) == set(remote) and len(local) == 2
    for cell, c in local.items():
        r = remote[cell]
        assert r["status"] == c["status"] == "ok" and not r["cached"]
        # plain sums are bit-identical; masking's stochastic quantization draws from a CSPRNG, so two masked
        # runs (in-process or not) differ by quantization error only (documented: ~3e-7 relative)
        tol = 1e-9 if r["variation"]["protocol"] == "none" else 1e-5
        assert r["site_val_ppl"] == pytest.approx(c["site_val_ppl"], rel=tol)
        assert r["bytes_up"] == c["bytes_up"]
    assert (tmp_path / "ray" / "compare.csv").exists()


def test_cli_simulate_backend_ray(world: Path, tmp_path: Path, in_process: SimulationResult,
                                  cli_on_ray: tuple[int, Path, list[SimulationResult]]) -> None:
    from worldlm_secure.cli import main

    code, out, _ = cli_on_ray
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == list(METHOD_NAMES)
    for name in METHOD_NAMES:
        sites = res["methods"][name]["sites"]
        assert set(sites) == set(in_process.methods[name].sites)
        for site, v in sites.items():
            assert v["val_ppl"] == pytest.approx(in_process.methods[name].sites[site], rel=1e-9)
    assert list((out / "ledgers").glob("*.sqlite"))
    assert main(["simulate", str(world), "--out", str(tmp_path / "o2"), "--backend", "ray",
                 "--ray-scope", "cells"]) == 2
