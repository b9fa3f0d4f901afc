"""DP and the ledger through the engine: what left each node is recorded, verifiable, and in budget."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from worldlm_secure.errors import ConfigError, LedgerError
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import read_entries, verify

from conftest import POLICIES

FEDS = {"eu": "eu.yaml", "us": "us.yaml", "apac": "research-open.yaml"}


def jurisdiction_world(folder: Path, *, rounds: int = 2, eu_policy: str = "eu.yaml") -> Path:
    """Root `world` (research-open) with eu / us / apac federations of three sites each."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    for p in POLICIES.glob("*.yaml"):
        (pol / p.name).write_text(p.read_text())
    nodes = ["  - {name: world, policy: policies/research-open.yaml}"]
    for fed, policy in {**FEDS, "eu": eu_policy}.items():
        nodes.append(f"  - {{name: {fed}, parent: world, policy: policies/{policy}}}")
        nodes += [f"  - {{name: {fed}-{s}, parent: {fed}, policy: policies/{policy}}}" for s in "abc"]
    path = folder / "world.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: dp-world
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


@pytest.mark.slow
def test_simulate_under_eu_policies_writes_verifiable_ledgers_within_budget(tmp_path: Path) -> None:
    world = jurisdiction_world(tmp_path)
    out = tmp_path / "ledgers"
    result = simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    files = sorted(out.glob("*.sqlite"))
    assert {f.stem for f in files} == {"world", "eu", "us", "apac", *(f"{f}-{s}" for f in FEDS for s in "abc")}
    assert read_entries(out / "world.sqlite") == []  # the root releases nothing: its ledger holds the receipts it signed
    for f in files:
        report = verify(f)
        assert report.ok, report.summary()
    eu_site = read_entries(out / "eu-a.sqlite")
    assert {e.group for e in eu_site} == {"key", "shared"} and len(eu_site) == 4  # 2 rounds x 2 groups
    assert all(e.dp_level == "user" and e.mechanism == "central_gaussian" and e.epsilon > 0 for e in eu_site)
    assert all(e.protocol in ("masking", "ckks") for e in eu_site)  # eu.yaml requires secure aggregation
    assert eu_site[-1].epsilon_cumulative <= 8.0 and eu_site[-1].epsilon_budget == 8.0
    assert all(e.dp_level == "none" for e in read_entries(out / "apac-a.sqlite"))  # research-open: no DP
    fed = read_entries(out / "eu.sqlite")
    assert {e.group for e in fed} == {"shared", "residual"}
    assert all(e.mechanism == "post_processing" and e.epsilon is None for e in fed)
    for f in files:  # localized layers never appear in any release
        assert not any(n.startswith("lm_head") or n.startswith("model.norm") for e in read_entries(f) for n in e.tensor_names)
    assert result.methods["worldlm"].stats.epsilon["eu-a/user"] == pytest.approx(eu_site[-1].epsilon_cumulative)


@pytest.mark.slow
def test_training_stops_releasing_at_the_budget(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "eu-small.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: eu.yaml\nname: eu-small\n"
        "jurisdiction: EU\n"
        "differential_privacy: {epsilon_budget: 3.0, noise_multiplier: 4.0}\n"
    )
    world = jurisdiction_world(tmp_path, rounds=6, eu_policy="eu-small.yaml")
    out = tmp_path / "ledgers"
    result = simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    m = result.methods["worldlm"]
    assert m.stopped is not None and "budget" in m.stopped and "spent" in m.stopped
    assert len(m.rounds) < 6  # it stopped releasing before the planned end
    for site in ("eu-a", "eu-b", "eu-c"):
        entries = read_entries(out / f"{site}.sqlite")
        charged = [e for e in entries if e.epsilon is not None]
        assert charged and charged[-1].epsilon_cumulative <= 3.0
        # The refused release left a signed refusal entry (nothing released, no ε), and the ledger verifies.
        refused = entries[-1]
        assert refused.mechanism == "refused" and refused.release_id.endswith(":refused")
        assert refused.epsilon is None and refused.noise_multiplier == 0.0 and "budget" in refused.extra["refused"]
        assert verify(out / f"{site}.sqlite").ok


def test_an_earlier_runs_ledgers_are_never_reused(tmp_path: Path) -> None:
    (tmp_path / "ledgers").mkdir()
    (tmp_path / "ledgers" / "eu-a.sqlite").write_bytes(b"")
    with pytest.raises(ConfigError, match="ledgers from an earlier run"):
        simulate(jurisdiction_world(tmp_path), methods=[METHODS["worldlm"]], ledger_root=tmp_path / "ledgers")


@pytest.mark.slow
def test_a_run_killed_mid_round_leaves_ledgers_that_verify(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    world = jurisdiction_world(tmp_path, rounds=200)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldlm_secure.cli", "simulate", str(world), "--out", str(out),
         "--methods", "worldlm", "--threads", "1", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # wait until releases are being written, then kill mid-run
            led = out / "ledgers" / "eu-a.sqlite"
            try:
                if led.exists() and len(read_entries(led)) >= 5:
                    break
            except LedgerError:  # mid-write readers may see a locked database; look again
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the run wrote no ledger entries in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    files = sorted((out / "ledgers").glob("*.sqlite"))
    assert files
    for f in files:
        report = verify(f)
        assert report.ok, report.summary()  # no half-written entry, the chain and head agree
