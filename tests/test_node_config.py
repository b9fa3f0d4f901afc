"""node.yaml: errors name the file, the field and the fix; the example configs load and match the world."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeworld import LOCAL_WORLD
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.world import load_world
from worldlm_secure.node import load_node_config
from worldlm_secure.node.runner import check_policy


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "world.yaml").write_text((LOCAL_WORLD / "world.yaml").read_text())
    p = tmp_path / "node.yaml"
    p.write_text(text)
    return p


def test_example_node_configs_load_and_match_the_world() -> None:
    world = load_world(LOCAL_WORLD / "world.yaml")
    files = sorted((LOCAL_WORLD / "nodes").glob("*.yaml"))
    assert {f.stem for f in files} == set(world.nodes)
    for f in files:
        cfg = load_node_config(f)
        node = world.nodes[cfg.name]
        assert cfg.role == node.kind
        assert (cfg.parent.name if cfg.parent else None) == node.parent
        assert cfg.world == (LOCAL_WORLD / "world.yaml").resolve()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: a\nrole: site\nworld: world.yaml\nstate: s\nbogus: 1\n", "node.yaml bogus: unknown field"),
        ("name: a\nrole: site\nworld: world.yaml\n", "node.yaml state: required field is missing"),
        ("name: a\nrole: leaf\nworld: world.yaml\nstate: s\n", "node.yaml role:"),
        ("name: a\nrole: site\nworld: world.yaml\nstate: s\n", "node.yaml parent: a site dials its federation"),
        ("name: a\nrole: root\nworld: world.yaml\nstate: s\n", "node.yaml serve: a root serves its children"),
        ("name: a\nrole: site\nworld: nowhere.yaml\nstate: s\nparent: {name: eu, address: 'x:1', credentials: k}\n", "world file"),
        ("- just a list\n", "must be a mapping"),
    ],
)
def test_bad_node_config_names_file_and_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_node_config(_write(tmp_path, text))
    assert needle in str(err.value)


def test_policy_must_be_the_one_the_world_names(tmp_path: Path) -> None:
    cfg = load_node_config(LOCAL_WORLD / "nodes" / "eu-a.yaml")
    world = load_world(LOCAL_WORLD / "world.yaml")
    check_policy(cfg, world.nodes["eu-a"].policy_path, world.nodes["eu-a"].policy_path)
    with pytest.raises(ConfigError, match="differs from .*eu.yaml.*eu-a"):
        check_policy(cfg, world.nodes["us-a"].policy_path, world.nodes["eu-a"].policy_path)


def test_world_keys_make_every_example_node_config_usable(tmp_path: Path) -> None:
    """`world keys` issues exactly what examples/local-world/nodes/*.yaml point at (manual deployment)."""
    import shutil

    from worldlm_secure.cli import main
    from worldlm_secure.node.runner import _identity
    from worldlm_secure.transport.tls import NodeCredentials, Roster

    shutil.copytree(LOCAL_WORLD.parent.parent / "policies", tmp_path / "policies")
    local = tmp_path / "examples" / "local-world"
    shutil.copytree(LOCAL_WORLD, local, ignore=shutil.ignore_patterns("state"))
    assert main(["world", "keys", str(local / "world.yaml"), "--state", str(local / "state")]) == 0
    world = load_world(local / "world.yaml")
    for f in sorted((local / "nodes").glob("*.yaml")):
        cfg = load_node_config(f)
        assert _identity(cfg).name == cfg.name
        if cfg.parent is not None:
            assert NodeCredentials.load(cfg.parent.credentials).name == cfg.name
        if cfg.serve is not None:
            assert NodeCredentials.load(cfg.serve.credentials).name == cfg.name
            assert all(c in Roster.load(cfg.serve.roster) for c in world.nodes[cfg.name].children)


def test_node_start_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worldlm_secure.cli import main

    bad = _write(tmp_path, "name: a\nrole: site\nworld: world.yaml\nstate: s\n")
    assert main(["node", "start", "--policy", "p.yaml", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.yaml parent: a site dials its federation" in err and "Traceback" not in err
