"""`ledger export --dp-events`: an auditor rebuilds each stream as Google dp-accounting DpEvents and
recomputes ε with that library alone; it matches what the ledger recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from test_ledger_chain import effective_policy

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry
from worldlm_secure.ledger.dp_events import EXPORT_FORMAT, events_from_json
from worldlm_secure.privacy import BudgetTracker
from worldlm_secure.privacy.accountant import RDP_ORDERS

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting import dp_event, pld, rdp  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)
POLICY = effective_policy(differential_privacy={"epsilon_budget": 40.0, "record": {"max_grad_norm": 1.0, "epsilon_budget": 30.0}})
PRV_POLICY = effective_policy(differential_privacy={"epsilon_budget": 40.0, "accountant": "prv"})


def _site(path: Path, policy=POLICY, accountant: str = "rdp") -> None:  # type: ignore[no-untyped-def]
    user = BudgetTracker(budget=40.0, delta=1e-5, accountant=accountant, stream="s/user")
    record = BudgetTracker(budget=30.0, delta=1e-5, accountant=accountant, stream="s/record")
    plan = [(1.1, 1.0, 1), (0.95, 1.0, 1), (0.8, 0.25, 3), (1.1, 1.0, 1)]  # z changes with dropouts
    with Ledger(path, NodeIdentity.generate("s")) as led:
        for r, (z, q, steps) in enumerate(plan):
            for group, tensor in (("shared", "model.layers.0.w"), ("key", "model.key.w")):
                led.append(release_entry(
                    release_id=f"{r}:{group}:fed", round=r, level="site", source="s", destination="fed", group=group,
                    tensor_names=(tensor,), protocol="masking", cohort_size=3, dropouts=0, dp_level="user",
                    mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=policy.sha256,
                    charge=user.charge(z, q, steps=steps),
                ), policy_document=policy.canonical_json())
            if accountant == "rdp":  # DP-SGD steps charged on the first release after training, 0 after that
                led.append(release_entry(
                    release_id=f"{r}:shared:fed:record", round=r, level="site", source="s", destination="fed",
                    group="shared", tensor_names=("model.layers.0.w",), protocol="masking", cohort_size=3, dropouts=0,
                    dp_level="record", mechanism="dp_sgd", clipping_norm=1.0, policy_sha256=policy.sha256,
                    charge=record.charge(1.3, 0.05, steps=20 if r % 2 == 0 else 0),
                ), policy_document=policy.canonical_json())


def _export(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    out = tmp_path / "events.json"
    assert main(["ledger", "export", str(path), "--dp-events", "--out", str(out)]) == 0
    capsys.readouterr()
    return json.loads(out.read_text())


def test_rdp_streams_recomputed_with_dp_accounting_match_the_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _site(tmp_path / "s.sqlite")
    doc = _export(tmp_path / "s.sqlite", tmp_path, capsys)
    assert doc["format"] == EXPORT_FORMAT and doc["node"] == "s"
    assert {s["stream"] for s in doc["streams"]} == {"s/user", "s/record"}
    for s in doc["streams"]:
        # each release alone
        for rel in s["releases"]:
            acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
            acc.compose(events_from_json(rel["event"]))
            assert acc.get_epsilon(s["delta"]) == pytest.approx(rel["epsilon"], rel=1e-6, abs=1e-9)
        # the whole stream, as one ComposedDpEvent
        event = events_from_json(s["event"])
        assert isinstance(event, dp_event.ComposedDpEvent)
        acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
        acc.compose(event)
        assert acc.get_epsilon(s["delta"]) == pytest.approx(s["epsilon_cumulative"], rel=1e-6)
    # the member total at user level composes every group and destination (one stream here)
    (user,) = [m for m in doc["member"] if m["level"] == "user"]
    assert user["streams"] == ["s/user"]
    # the JSON is dp-accounting's own named-tuple serialization: it round-trips through its constructors
    ev = events_from_json(doc["streams"][0]["releases"][4]["event"])  # round 2: q 0.25, 3 steps
    nt = ev.to_named_tuple()
    assert nt.class_name == "SelfComposedDpEvent" and nt.count == 3
    assert nt.event.class_name == "PoissonSampledDpEvent" and nt.event.sampling_probability == 0.25


def test_prv_streams_match_dp_accountings_pld_within_one_percent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _site(tmp_path / "s.sqlite", PRV_POLICY, accountant="prv")
    doc = _export(tmp_path / "s.sqlite", tmp_path, capsys)
    (s,) = doc["streams"]
    acc = pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(events_from_json(s["event"]))
    assert acc.get_epsilon(s["delta"]) == pytest.approx(s["epsilon_cumulative"], rel=0.01)


def test_an_unverified_ledger_is_not_exported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    _site(tmp_path / "s.sqlite")
    con = sqlite3.connect(tmp_path / "s.sqlite")
    con.execute("DELETE FROM entries WHERE seq = 1")
    con.commit()
    con.close()
    assert main(["ledger", "export", str(tmp_path / "s.sqlite"), "--dp-events"]) == 2
    assert "does not verify" in capsys.readouterr().err
