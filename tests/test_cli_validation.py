"""Every check a run can fail fires before the header and before the first model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldlm_secure.cli import main

from conftest import write_world


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any model (or an engine) fails the test: the error must come first."""
    import worldlm_secure.federation.engine as engine
    import worldlm_secure.model as model

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a model was built before the error")

    monkeypatch.setattr(engine, "build_model", boom)
    monkeypatch.setattr(engine.Engine, "__init__", boom)
    monkeypatch.setattr(model, "build_model", boom)


def _fails(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(args)
    out = capsys.readouterr()
    assert code == 2, out.err
    assert "Traceback" not in out.err and "a model was built" not in out.err
    assert "federations" not in out.out  # no header was printed
    return " ".join(out.err.split())


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--rounds", "-1"], "--rounds: must be at least 1 (got -1)"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--methods", "worldlm,magic"], "unknown method 'magic'"),
])
def test_bad_options_fail_before_the_header(small_world: Path, tmp_path: Path, args: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str], no_model: None) -> None:
    assert message in _fails(["simulate", str(small_world), "--out", str(tmp_path / "o"), *args], capsys)


def test_unavailable_device_fails_before_the_header(small_world: Path, tmp_path: Path, no_model: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = _fails(["simulate", str(small_world), "--out", str(tmp_path / "o"), "--device", "cuda:0"], capsys)
    assert "CUDA is not available" in err


def test_missing_site_data_file_in_a_synthetic_world(tmp_path: Path, no_model: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    world = write_world(tmp_path, extra_nodes="  - {name: f0-s9, parent: f0, policy: policies/research-open.yaml, data: missing.txt}\n")
    err = _fails(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "world.yaml:" in err and "nodes[7].data: site 'f0-s9': data file 'missing.txt' not found" in err


def test_a_site_data_file_a_synthetic_world_would_ignore(tmp_path: Path, no_model: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("hello " * 500)
    world = write_world(tmp_path, extra_nodes="  - {name: f0-s9, parent: f0, policy: policies/research-open.yaml, data: mine.txt}\n")
    err = _fails(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "nodes[7].data" in err and "data.synthetic is this world's data source" in err


def test_only_some_sites_with_data_files(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.txt").write_text("hello " * 500)
    world = write_world(tmp_path, data="data: {}\n",
                        extra_nodes="  - {name: f0-s9, parent: f0, policy: policies/research-open.yaml, data: mine.txt}\n")
    err = _fails(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "nodes[7].data" in err and "only some sites give a data file" in err


def test_a_site_with_no_rows_names_file_and_field(tmp_path: Path, no_model: None,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rows = "\n".join(json.dumps({"site": s, "text": "hello world " * 200}) for s in ["f0-s0", "f0-s1", "f1-s0"])
    (tmp_path / "d.jsonl").write_text(rows)
    world = write_world(tmp_path, data="data:\n  files: {path: d.jsonl}\n")
    err = _fails(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "world.yaml:" in err and "data.files.path" in err and "d.jsonl has no rows for site(s) ['f1-s1']" in err


def test_schedule_typo_gets_line_and_valid_keys(tmp_path: Path, no_model: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    world = write_world(tmp_path)
    world.write_text(world.read_text().replace("rounds: 2", "rouds: 2"))
    err = _fails(["simulate", str(world), "--out", str(tmp_path / "o")], capsys)
    assert "world.yaml:4 schedule.rouds: unknown key (did you mean 'rounds'? valid:" in err and "local_steps" in err


def test_top_level_and_node_typos(tmp_path: Path, no_model: None, capsys: pytest.CaptureFixture[str]) -> None:
    world = write_world(tmp_path)
    world.write_text(world.read_text().replace("schedule:", "schedul:"))
    assert "world.yaml:4 schedul: unknown key (did you mean 'schedule'?" in _fails(["simulate", str(world)], capsys)
    world = write_world(tmp_path, extra_nodes="  - {name: x, parnt: f0, policy: policies/research-open.yaml}\n")
    assert "nodes[7].parnt: unknown key (did you mean 'parent'?" in _fails(["simulate", str(world)], capsys)


def test_a_key_given_twice_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = write_world(tmp_path)
    world.write_text(world.read_text() + "seed: 3\n")
    assert "seed: given twice" in _fails(["simulate", str(world)], capsys)


@pytest.mark.parametrize("axes", ["axes:\n  protocl: [none]\n", "axes:\n  - protocol: [none]\n  - protocl: [none]\n"])
def test_grid_typo_same_message_in_both_axes_forms(tmp_path: Path, axes: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_world(tmp_path)
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: g\nworld: world.yaml\n" + axes)
    err = _fails(["compare", str(grid), "--out", str(tmp_path / "o")], capsys)
    assert "grid.yaml:" in err and "protocl: unknown key (did you mean 'protocol'? valid: dp, method, protocol, residuals, seed)" in err


def test_dry_run_prints_the_plan_and_writes_nothing(small_world: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["simulate", str(small_world), "--out", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["tree"]["name"] == "world" and [c["name"] for c in plan["tree"]["children"]] == ["f0", "f1"]
    site = plan["tree"]["children"][0]["children"][0]
    assert site["groups"]["local"] > 0 and site["groups"]["key"] > 0 and site["groups"]["shared"] > 0
    assert {(r["group"], r["to"]) for r in plan["releases"]} >= {("key", "f0"), ("shared", "f0"), ("shared", "world")}
    assert all(r["protocol"] for r in plan["releases"]) and set(plan["members"]) == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
    assert plan["bytes_up_per_round"] > 0 and not out.exists()
    assert main(["simulate", str(small_world), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "releases per round" in text and "planned privacy loss" in text and "bytes up per round" in text


def test_dry_run_of_a_dp_world_plans_noise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import write_distributed_world

    world = write_distributed_world(tmp_path)
    assert main(["simulate", str(world), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    dp = [r["dp"] for r in plan["releases"] if r["dp"]]
    assert dp and all(d["noise_multiplier"] > 0 for d in dp)
    assert {m["epsilon_planned"] for m in plan["members"].values()} == {50.0}
