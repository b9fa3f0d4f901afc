"""Issue 14, item 1: one privacy loss per member, checked against the strictest budget it falls under.

A world whose root allows ε=4 while its federations and sites allow ε=8: every site's releases (key
releases to its federation, shared releases that travel on to the root) compose into one loss per site,
and every release is checked against, and records, the root's budget 4. Built in a tmp dir from the
example policies (examples/policies/dp-eps8.yaml on research-open), as an auditor would set it up.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest
from conftest import POLICIES, REPO

from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import read_entries, verify
from worldlm_secure.privacy.accountant import MechanismStep, epsilon_of

DP8 = (REPO / "examples" / "policies" / "dp-eps8.yaml").read_text()


def stricter_root_world(folder: Path, *, rounds: int = 2, root_eps: float = 4.0, noise: str = "auto") -> Path:
    """examples/world-dp.yaml's policies, shrunk: root at ε=root_eps, two federations of two sites at ε=8."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    (pol / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    (pol / "dp-eps8.yaml").write_text(
        DP8.replace("../../policies/research-open.yaml", "research-open.yaml").replace(
            "noise_multiplier: auto", f"noise_multiplier: {noise}"
        )
    )
    (pol / "dp-root.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: dp-root\njurisdiction: none\n"
        "extends: dp-eps8.yaml\n"
        f"differential_privacy: {{epsilon_budget: {root_eps}}}\n"
    )
    nodes = ["  - {name: world, policy: policies/dp-root.yaml}"]
    for f in ("eu", "us"):
        nodes.append(f"  - {{name: {f}, parent: world, policy: policies/dp-eps8.yaml}}")
        nodes += [f"  - {{name: {f}-{s}, parent: {f}, policy: policies/dp-eps8.yaml}}" for s in "ab"]
    path = folder / "world.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: stricter-root
            seed: 0
            model: {{arch: llama, size: tiny}}
            data:
              synthetic: {{vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}}
            schedule: {{rounds: {rounds}, local_steps: 2, batch_size: 4, seq_len: 32, warmup_steps: 1}}
            nodes:
            """
        )
        + "\n".join(nodes)
        + "\n"
    )
    return path


def _policy_docs(path: Path) -> dict[str, dict]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT sha256, document FROM policies")}
    finally:
        con.close()


@pytest.mark.slow
def test_a_stricter_root_budget_bounds_every_sites_one_loss(tmp_path: Path) -> None:
    world = stricter_root_world(tmp_path)
    out = tmp_path / "ledgers"
    result = simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    sites = [f"{f}-{s}" for f in ("eu", "us") for s in "ab"]
    for site in sites:
        path = out / f"{site}.sqlite"
        report = verify(path)
        assert report.ok, report.summary()
        entries = [e for e in read_entries(path) if e.dp_level != "none"]
        charged = [e for e in entries if e.epsilon is not None]
        assert {e.group for e in charged} == {"key", "shared"}, "both groups are releases of the same data"
        assert len({e.stream for e in charged}) == 1, "one loss per member: every group on one stream"
        for e in charged:
            assert e.epsilon_budget == 4.0, f"{site} {e.release_id} checked against {e.epsilon_budget}, not 4"
            assert e.epsilon_cumulative <= 4.0
        # One number composed over every release, recomputed independently of the ledger's own arithmetic.
        steps = [MechanismStep(e.noise_multiplier, e.sample_rate, e.steps) for e in charged]
        assert epsilon_of(steps, charged[0].delta) <= 4.0 + 1e-9
        # The policy stored with each entry is the one it was checked against: its budget is 4.
        docs = _policy_docs(path)
        for e in charged:
            assert docs[e.policy_sha256]["differential_privacy"]["epsilon_budget"] == 4.0
    # Two sites and ~10^5 released values at ε=4: the plan says before training that DP cannot learn here.
    warnings = result.methods["worldlm"].dp_warnings
    assert warnings and all("record-level DP" in w for w in warnings)
    eps = result.methods["worldlm"].stats.epsilon
    assert eps and all(v <= 4.0 for v in eps.values())
