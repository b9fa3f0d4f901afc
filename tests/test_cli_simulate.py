"""`worldlm-secure simulate` end to end, and one-line errors for bad worlds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldlm_secure.cli import main

from conftest import write_world


@pytest.mark.slow
def test_simulate_end_to_end_writes_results_and_plots(small_world: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["simulate", str(small_world), "--out", str(out), "--rounds", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"worldlm", "fedavg", "local", "fedper", "hierfavg"}
    assert res["entropy_floor_ppl"] > 1
    for m in res["methods"].values():
        assert len(m["rounds"]) == 2 and m["mean_val_ppl"] > res["entropy_floor_ppl"]
        assert set(m["sites"]) == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
        assert all(v["val_ppl"] > 1 for v in m["sites"].values())
    assert res["wall_s"] > 0
    assert (out / "perplexity_rounds.png").stat().st_size > 1000
    assert (out / "perplexity_sites.png").stat().st_size > 1000
    assert "mean" in capsys.readouterr().out


def _error_of(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    return " ".join(err.split())


def test_cycle_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path, extra_nodes="  - {name: x, parent: y, policy: policies/research-open.yaml}\n"
                                              "  - {name: y, parent: x, policy: policies/research-open.yaml}\n")
    err = _error_of(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "world.yaml:15 nodes[7].parent:" in err and "cycle in the tree" in err


def test_unknown_parent_is_named(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path, extra_nodes="  - {name: x, parent: nowhere, policy: policies/research-open.yaml}\n")
    err = _error_of(["simulate", str(world)], capsys)
    assert ".parent: unknown node 'nowhere'" in err


def test_missing_policy_file_is_named(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path, extra_nodes="  - {name: x, parent: f0, policy: policies/missing.yaml}\n")
    err = _error_of(["simulate", str(world)], capsys)
    assert ".policy: policy file 'policies/missing.yaml' not found" in err


def test_missing_data_file_is_named(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path, data="data:\n  files: {path: nothing.jsonl}\n")
    err = _error_of(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "nothing.jsonl: data file or folder not found" in err


def test_unknown_site_in_data_is_named(tmp_path: Path, capsys) -> None:
    rows = "\n".join(json.dumps({"site": s, "text": "hello world " * 200}) for s in ["f0-s0", "f0-s1", "f1-s0", "f1-s1", "mars"])
    (tmp_path / "d.jsonl").write_text(rows)
    world = write_world(tmp_path, data="data:\n  files: {path: d.jsonl}\n")
    err = _error_of(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "names unknown site(s) ['mars']" in err


def test_patterns_leaving_a_parameter_unassigned_are_named(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path)
    pol = tmp_path / "policies" / "research-open.yaml"
    pol.write_text(pol.read_text().replace('"*.embed_tokens.*", ', ""))
    err = _error_of(["simulate", str(world), "--out", str(tmp_path / "o"), "--methods", "worldlm"], capsys)
    assert "research-open.yaml layers" in err and "'model.embed_tokens.weight' matches no local, key or shared pattern" in err


def test_bad_schedule_value_names_the_field(tmp_path: Path, capsys) -> None:
    world = write_world(tmp_path)
    world.write_text(world.read_text().replace("lr: 0.003", "lr: -1"))
    err = _error_of(["simulate", str(world)], capsys)
    assert "world.yaml:4 schedule.lr:" in err and "(got -1)" in err


def test_unknown_method_is_named(small_world: Path, capsys) -> None:
    err = _error_of(["simulate", str(small_world), "--methods", "worldlm,magic"], capsys)
    assert "--methods: unknown method 'magic'" in err
