"""`compare`: grid files, derived cells through the real policy loader, a tiny study, its cache and CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import write_world
from worldlm_secure.compare import load_grid, run_study
from worldlm_secure.compare.derive import write_cell_world
from worldlm_secure.compare.report import csv_columns, pareto_front
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.world import load_world


def _grid(folder: Path, body: str) -> Path:
    path = folder / "grid.yaml"
    path.write_text("name: tiny\nworld: world.yaml\nrounds: 2\n" + body)
    return path


def test_axes_cross_union_exclude(tmp_path: Path) -> None:
    write_world(tmp_path)
    g = load_grid(_grid(tmp_path, """\
axes:
  - protocol: [none, masking]
    dp: [off, {epsilon: [2, 8], noise: central}]
  - protocol: [masking]
    dp: [off]                      # a duplicate of a cell above: counted once
    method: [worldlm, fedavg]
exclude:
  - {protocol: none, epsilon_target: 2}
"""))
    ids = [c.cell_id for c in g.cells]
    assert len(ids) == len(set(ids)) == 6
    assert "worldlm__masking__user-central-eps2__res-base__seed-base" in ids
    assert "worldlm__none__user-central-eps2__res-base__seed-base" not in ids
    assert "fedavg__masking__off__res-base__seed-base" in ids


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("axes: {protocol: [homomorphic]}\n", r"grid.yaml:\d+ axes.protocol\[0\]: Input should be 'none', 'masking' or 'ckks'"),
        ("axes: {method: [fedprox]}\n", r"grid.yaml:\d+ axes.method: Value error, unknown method 'fedprox'"),
        ("axes: {dp: [{epsilon: -1}]}\n", r"grid.yaml:\d+ axes.dp\[0\]"),
        ("axes: {protocol: [none]}\nexclude: [{protcol: none}]\n", r"grid.yaml:\d+ exclude\[0\]: unknown key 'protcol'"),
        ("axes: {protocol: [none]}\nexclude: [{protocol: none}]\n", "every cell of the grid is excluded"),
        ("axes: {protocol: [none]}\nbogus: 1\n", r"grid.yaml:\d+ bogus: unknown key \(valid: "),
    ],
)
def test_grid_errors_name_file_and_field(tmp_path: Path, body: str, message: str) -> None:
    write_world(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_grid(_grid(tmp_path, body))
    assert re.search(message, str(exc.value)), str(exc.value)


def test_missing_world_is_named(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("name: x\nworld: nowhere.yaml\naxes: {protocol: [none]}\n")
    with pytest.raises(ConfigError, match=r"grid.yaml:\d+ world: world file 'nowhere.yaml' not found"):
        load_grid(path)


def test_derived_cell_policies_go_through_the_real_loader(tmp_path: Path) -> None:
    write_world(tmp_path)
    g = load_grid(_grid(tmp_path, """\
protocol_params: {masking: {bits: 48}}
axes:
  protocol: [masking]
  dp: [{epsilon: 4, noise: distributed, delta: 1.0e-6}]
  residuals: [off]
"""))
    (cell,) = g.cells
    world = load_world(write_cell_world(g.world, cell, g.protocol_params, tmp_path / "cell"))
    eff = world.effective_policy("f0-s0")
    assert eff.secure_aggregation.acceptable == ("masking",)
    assert eff.secure_aggregation.masking.bits == 48
    assert eff.differential_privacy.level == "user"
    assert eff.differential_privacy.acceptable_mechanisms == ("distributed_discrete_gaussian",)
    assert eff.differential_privacy.epsilon_budget == 4.0 and eff.differential_privacy.delta == 1e-6
    assert eff.residuals.allowed is False
    assert eff.layers.local == load_world(g.world).effective_policy("f0-s0").layers.local  # the rest is the base's


@pytest.mark.slow
def test_tiny_study_csv_failed_cell_and_cache(tmp_path: Path) -> None:
    write_world(tmp_path)
    grid = _grid(tmp_path, """\
axes:
  - protocol: [none, masking]
    dp: [off]
  - protocol: [masking]
    dp: [{epsilon: 8, noise: central}]
  - protocol: [none]                         # distributed noise needs masking: the policies refuse it
    dp: [{epsilon: 8, noise: distributed}]
""")
    out = tmp_path / "study"
    res = run_study(load_grid(grid), out)
    by = {c["cell"]: c for c in res.cells}
    assert len(by) == 4
    bad = by["worldlm__none__user-distributed-eps8__res-base__seed-base"]
    assert bad["status"] == "failed" and "masking" in bad["error"] and "PolicyError" in bad["error"]
    assert (out / "cells" / bad["cell"] / "error.txt").read_text().startswith("Traceback")
    plain, masked = by["worldlm__none__off__res-base__seed-base"], by["worldlm__masking__off__res-base__seed-base"]
    dp = by["worldlm__masking__user-central-eps8__res-base__seed-base"]
    for c in (plain, masked, dp):
        assert c["status"] == "ok" and c["rounds_done"] == 2 and not c["cached"]
    # masking changes the sum only by quantization; DP noise changes it a lot
    assert masked["mean_val_ppl"] == pytest.approx(plain["mean_val_ppl"], rel=1e-4)
    assert abs(dp["mean_val_ppl"] - plain["mean_val_ppl"]) > 1e-3
    assert plain["expansion"] == pytest.approx(2.0)  # float64 plain sums
    assert masked["expansion"] == pytest.approx(1.0, abs=0.01)  # 32-bit masked integers per value
    assert plain["epsilon_max"] is None and 0 < dp["epsilon_max"] <= 8.0
    assert set(dp["fed_epsilon"]) == {"f0", "f1"} and set(dp["fed_val_ppl"]) == {"f0", "f1"}
    assert masked["bytes_down_per_round_per_site"] > 0 == plain["bytes_down_per_round_per_site"]
    assert dp["protect_s"] > 0 and dp["train_s"] > 0
    assert list(Path(out / "cells" / dp["cell"] / "ledgers").glob("*.sqlite"))

    with (out / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == csv_columns(res.cells)
    for col in ("ppl_f0", "ppl_f1", "eps_f0", "eps_f1", "bytes_up_per_round_per_site", "bytes_down_per_round_per_site",
                "expansion", "train_s", "protect_s", "wall_s", "error", "status"):
        assert col in rows[0]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok", "failed"}
    row = next(r for r in rows if r["cell"] == dp["cell"])
    assert float(row["eps_f0"]) == pytest.approx(dp["fed_epsilon"]["f0"]) and row["noise"] == "central"
    for name in ("compare.json", "summary.md", "ppl_vs_epsilon.png", "bytes_per_round.png", "time_breakdown.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "compare.json").read_text())["complete"] is True
    assert "failed: PolicyError" in (out / "summary.md").read_text()

    # a re-run skips the finished cells (same content hash) and retries the failed one
    stamp = (out / "cells" / dp["cell"] / "result.json").stat().st_mtime_ns
    again = {c["cell"]: c for c in run_study(load_grid(grid), out).cells}
    assert [c for c in again.values() if c["cached"]] == [again[k] for k in (plain["cell"], masked["cell"], dp["cell"])]
    assert again[dp["cell"]]["mean_val_ppl"] == dp["mean_val_ppl"]
    assert (out / "cells" / dp["cell"] / "result.json").stat().st_mtime_ns == stamp
    assert again[bad["cell"]]["status"] == "failed" and not again[bad["cell"]]["cached"]

    # changing what a cell runs (here its rounds) changes its hash: it runs again
    grid.write_text(grid.read_text().replace("rounds: 2", "rounds: 1"))
    third = {c["cell"]: c for c in run_study(load_grid(grid), out).cells}
    assert not third[plain["cell"]]["cached"] and third[plain["cell"]]["rounds_done"] == 1


def test_pareto_front() -> None:
    pts = [(1.0, 10.0), (2.0, 8.0), (2.0, 9.0), (4.0, 8.0), (float("inf"), 5.0)]
    assert pareto_front(pts) == [0, 1, 4]


def test_pet_study_example_loads() -> None:
    g = load_grid(Path(__file__).resolve().parent.parent / "examples" / "pet-study.yaml")
    protocols = {c.protocol for c in g.cells}
    assert protocols == {"none", "masking", "ckks"}
    assert sum(c.protocol == "ckks" for c in g.cells) == 1  # CKKS cells are the slow ones
    assert g.world.name == "world.yaml" and g.rounds is not None


@pytest.mark.slow
def test_cli_compare(tmp_path: Path) -> None:
    from worldlm_secure.cli import main

    write_world(tmp_path)
    grid = _grid(tmp_path, "axes: {protocol: [none]}\n")
    assert main(["compare", str(grid), "--out", str(tmp_path / "o"), "--threads", "1"]) == 0
    assert (tmp_path / "o" / "compare.csv").exists()
    assert main(["compare", str(grid), "--out", str(tmp_path / "o"), "--backend", "spark"]) == 2


def test_a_cell_cannot_loosen_what_a_base_policy_requires(tmp_path: Path) -> None:
    from worldlm_secure.errors import PolicyError

    write_world(tmp_path, policy="eu.yaml", sites=3)  # eu.yaml requires DP on egress
    g = load_grid(_grid(tmp_path, "axes: {protocol: [masking], dp: [off, {epsilon: 4, noise: distributed}]}\n"))
    off, dp = g.cells
    with pytest.raises(PolicyError, match=r"policies/eu.yaml:\d+ differential_privacy.level: must be user or record"):
        load_world(write_cell_world(g.world, off, g.protocol_params, tmp_path / "off"))
    # the DP cell's derived policy is valid (eu.yaml's own destinations then name eu/world, not f0: the
    # world refuses that at load, as it would refuse eu.yaml itself in this tree)
    from worldlm_secure.policy import load_policy

    write_cell_world(g.world, dp, g.protocol_params, tmp_path / "dp")
    pol = load_policy(tmp_path / "dp" / "policies" / "eu.yaml")
    assert pol.differential_privacy.epsilon_budget == 4.0 and pol.secure_aggregation.protocol == ("masking",)
