"""The library surface, used only through `worldlm_secure`'s public names (issue 15): a notebook user
loads a world, simulates it, saves what the CLI saves, verifies and audits the ledgers, runs a study.

Kept cheap: a 2 x 2 tiny world, one round, one or two methods.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import worldlm_secure
from worldlm_secure import audit_ledgers, load_world, run_study, simulate, start_node, verify_ledger
from worldlm_secure.errors import WorldLMError

from conftest import REPO, write_world

PUBLIC = ("load_world", "simulate", "run_study", "verify_ledger", "audit_ledgers", "start_node", "SimulationResult")
HEAVY = ("torch", "transformers", "opacus", "tenseal", "grpc", "datasets", "matplotlib")


def test_import_is_light_and_names_resolve_on_use() -> None:
    code = (
        "import sys, worldlm_secure as w; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))); "
        f"print(all(n in dir(w) for n in {PUBLIC!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr
    assert set(worldlm_secure.__all__) == {"__version__", "World", *PUBLIC}
    for name in PUBLIC:
        assert getattr(worldlm_secure, name) is not None
    with pytest.raises(AttributeError):
        worldlm_secure.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One round of worldlm and fedavg on a 2 x 2 tiny world, with ledgers, saved into ``out``."""
    folder = tmp_path_factory.mktemp("api")
    world = load_world(write_world(folder, rounds=1))
    out = folder / "out"
    seen: list[dict] = []
    result = simulate(world, methods=["worldlm", "fedavg"], rounds=1, device="cpu", ledger_dir=out / "ledgers",
                      on_progress=seen.append)
    assert [p["method"] for p in seen] == ["worldlm", "fedavg"]
    result.save(out)
    return out, result


def test_load_world_checks_and_returns_the_tree(tmp_path: Path) -> None:
    world = load_world(write_world(tmp_path))
    assert sorted(s.name for s in world.sites) == ["f0-s0", "f0-s1", "f1-s0", "f1-s1"]
    with pytest.raises(WorldLMError, match="not found"):
        load_world(tmp_path / "missing.yaml")


def test_simulate_returns_a_result_that_saves_what_the_cli_writes(run: tuple[Path, object]) -> None:
    out, result = run
    assert isinstance(result, worldlm_secure.SimulationResult)
    assert list(result.methods) == ["worldlm", "fedavg"]
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))  # the file is the result's own payload
    assert set(saved["methods"]) == {"worldlm", "fedavg"}
    assert saved["methods"]["worldlm"]["sites"].keys() == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
    for plot in ("perplexity_rounds.png", "perplexity_sites.png"):
        assert (out / plot).stat().st_size > 1000


def test_ledgers_verify_and_audit(run: tuple[Path, object]) -> None:
    out, _ = run
    ledgers = sorted((out / "ledgers").glob("*.sqlite"))
    assert {p.stem for p in ledgers} >= {"f0-s0", "f0", "world"}
    for p in ledgers:
        report = verify_ledger(p, expected_node=p.stem)
        assert report.ok, report.summary()
        assert report.to_dict()["findings"] == []
    audit = audit_ledgers([out])
    assert audit.ok, audit.lines()


def test_simulate_refuses_an_unknown_backend_and_method(tmp_path: Path) -> None:
    world = write_world(tmp_path)
    with pytest.raises(WorldLMError, match="backend"):
        simulate(world, backend="spark")
    with pytest.raises(WorldLMError, match="fedprox"):
        simulate(world, methods=["fedprox"])


@pytest.mark.slow
def test_simulate_on_ray_returns_the_same_result_type(local_ray: Any, tmp_path: Path) -> None:
    result = simulate(write_world(tmp_path, rounds=1), backend="ray", methods="worldlm", rounds=1, device="cpu",
                      ray_scope="methods")
    assert isinstance(result, worldlm_secure.SimulationResult) and list(result.methods) == ["worldlm"]


def test_run_study_from_a_grid_file(tmp_path: Path) -> None:
    write_world(tmp_path, rounds=1)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: tiny\nworld: world.yaml\nrounds: 1\ndevice: cpu\naxes: {protocol: [none], dp: [off]}\n")
    study = run_study(grid, tmp_path / "study", threads=1)
    assert [c["status"] for c in study.cells] == ["ok"]
    assert (tmp_path / "study" / "compare.json").is_file() and not study.failed


def test_start_node_names_a_missing_config(tmp_path: Path) -> None:
    with pytest.raises(WorldLMError):
        start_node(tmp_path / "node.yaml", REPO / "policies" / "eu.yaml")
