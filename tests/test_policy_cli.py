"""`worldlm-secure policy check | explain | effective | schema`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldlm_secure.cli import main
from worldlm_secure.policy.jsonschema import policy_json_schema_text
from worldlm_secure.policy.loader import parse_yaml

POLICIES = Path(__file__).resolve().parents[1] / "policies"
EXAMPLES = sorted(POLICIES.glob("*.yaml"))


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_examples_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(capsys, "policy", "check", *map(str, EXAMPLES))
    assert rc == 0, err
    assert out.count("ok: ") == len(EXAMPLES) and not err


def test_check_reports_every_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((POLICIES / "eu.yaml").read_text().replace("min_cohort: 3", "min_cohort: 0"))
    rc, out, err = _run(capsys, "policy", "check", str(POLICIES / "eu.yaml"), str(bad))
    assert rc != 0
    assert f"{bad}:" in err and "secure_aggregation.min_cohort" in err and "Traceback" not in err
    assert "ok: " in out


def test_check_chain(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = _run(capsys, "policy", "check", "--chain", str(POLICIES / "eu.yaml"), str(POLICIES / "research-open.yaml"))
    assert rc == 0 and "chain composes (protocol masking" in out
    rc, _, err = _run(capsys, "policy", "check", "--chain", str(POLICIES / "research-open.yaml"), str(POLICIES / "eu.yaml"))
    assert rc == 0
    plain = tmp_path / "plain.yaml"
    plain.write_text((POLICIES / "research-open.yaml").read_text().replace("protocol: [none, masking, ckks]", "protocol: none"))
    rc, _, err = _run(capsys, "policy", "check", "--chain", str(plain), str(POLICIES / "eu.yaml"))
    assert rc != 0 and "plain.yaml" in err and "eu.yaml" in err


def test_explain_eu_reads_as_prose(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "policy", "explain", str(POLICIES / "eu.yaml"))
    assert rc == 0
    summary = out.split("\n\n")[0]
    for phrase in ("never leave the site", "whose policy declares jurisdiction EU may receive",
                   "every node above the sender (up to the root) may receive", "pairwise masking",
                   "user-level differential privacy", "ε = 8", "δ = 1e-5", "at least 3 contributors"):
        assert phrase in summary, phrase
    assert "{" not in out and "None" not in out  # no raw data structures
    assert "refused" in out and "ledger" in out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_explain_every_example(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(capsys, "policy", "explain", str(path))
    assert rc == 0 and len(out.split()) > 80 and "None" not in out


def test_schema_is_committed_and_in_sync(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    committed = (POLICIES / "schema.json").read_text()
    assert committed == policy_json_schema_text(), "run: worldlm-secure policy schema --out policies/schema.json"
    rc, out, _ = _run(capsys, "policy", "schema")
    assert rc == 0 and json.loads(out) == json.loads(committed)
    rc, _, _ = _run(capsys, "policy", "schema", "--out", str(tmp_path / "s.json"))
    assert rc == 0 and (tmp_path / "s.json").read_text() == committed


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def test_schema_accepts_examples_and_rejects_unknown_keys() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads((POLICIES / "schema.json").read_text()))
    for path in EXAMPLES:
        doc = _plain(parse_yaml(path).data)
        assert not list(validator.iter_errors(doc)), path
        doc["secure_aggregation"]["min_cohrot"] = 3
        assert list(validator.iter_errors(doc))
        del doc["secure_aggregation"]["min_cohrot"]
        doc["differential_privacy"]["accountant"] = "moments"
        assert list(validator.iter_errors(doc))


def _world(tmp_path: Path) -> Path:
    p = lambda n: POLICIES / f"{n}.yaml"  # noqa: E731
    text = f"""name: cli-world
nodes:
  - {{name: world, policy: {p('research-open')}}}
  - {{name: eu, parent: world, policy: {p('eu')}}}
  - {{name: eu-a, parent: eu, policy: {p('eu')}}}
  - {{name: eu-b, parent: eu, policy: {p('eu')}}}
  - {{name: eu-c, parent: eu, policy: {p('eu')}}}
"""
    path = tmp_path / "world.yaml"
    path.write_text(text)
    return path


def test_effective_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = _world(tmp_path)
    rc, out, err = _run(capsys, "policy", "effective", str(world), "--node", "eu-a")
    assert rc == 0, err
    assert "eu-a (eu.yaml) -> eu (eu.yaml) -> world (research-open.yaml)" in out
    assert "secure_aggregation.protocol" in out and "eu.yaml:" in out and "sha256:" in out
    rc, out, _ = _run(capsys, "policy", "effective", str(world), "--node", "eu-a", "--json")
    data = json.loads(out)
    assert data["path"] == ["eu-a", "eu", "world"]
    assert data["effective"]["differential_privacy"]["epsilon_budget"] == 8.0
    assert data["sources"]["differential_privacy.epsilon_budget"].startswith(str(POLICIES / "eu.yaml"))
    rc, out, _ = _run(capsys, "policy", "effective", str(world), "--node", "eu-a", "--to", "eu", "--json")
    assert json.loads(out)["path"] == ["eu-a", "eu"]


def test_effective_unknown_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, "policy", "effective", str(_world(tmp_path)), "--node", "nope")
    assert rc != 0 and "unknown node 'nope'" in err and "eu-a" in err


def test_schema_accepts_a_file_that_extends_another(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads((POLICIES / "schema.json").read_text()))
    child = {"apiVersion": "worldlm-secure/v1", "kind": "JurisdictionPolicy", "name": "c", "extends": "eu.yaml",
             "secure_aggregation": {"protocol": "ckks"}}
    assert not list(validator.iter_errors(child))
    del child["extends"]
    assert list(validator.iter_errors(child))  # without a base, jurisdiction is required
