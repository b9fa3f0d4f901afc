"""`worldlm-secure ledger verify --json`: one machine-readable document, per file `ok` and `findings`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from worldlm_secure.cli import main

from test_ledger_cli import _make


def _tamper(path: Path, seq: int) -> None:
    """Change one signed entry body in place (the chain and signature no longer match)."""
    con = sqlite3.connect(path)
    body = bytes(con.execute("SELECT body FROM entries WHERE seq = ?", (seq,)).fetchone()[0])
    con.execute("UPDATE entries SET body = ? WHERE seq = ?", (body.replace(b'"dropouts":0', b'"dropouts":1'), seq))
    con.commit()
    con.close()


def test_verify_json_reports_each_file_with_its_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "ledgers" / "site-a.sqlite", tmp_path / "ledgers" / "site-b.sqlite"
    _make(a, "site-a")
    _make(b, "site-b")
    assert main(["ledger", "verify", "--json", str(a), str(b)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and [x["node"] for x in doc["ledgers"]] == ["site-a", "site-b"]
    first = doc["ledgers"][0]
    assert first["ok"] is True and first["findings"] == [] and first["entries"] == 5
    assert first["spent"] and all(eps > 0 for eps in first["spent"].values())  # ε recomputed per stream

    _tamper(b, 2)
    assert main(["ledger", "verify", "--json", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    doc = json.loads(out)  # only JSON on stdout, even on failure
    assert doc["ok"] is False
    assert doc["ledgers"][0]["ok"] is True
    bad = doc["ledgers"][1]
    assert bad["ok"] is False and bad["path"] == str(b)
    (finding,) = bad["findings"]
    assert finding["seq"] == 2 and finding["release_id"] == "2:shared:fed" and "content changed" in finding["what"]


def test_verify_prints_release_ids_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A release id such as `2:key:eu` is text, never rich emoji or markup."""
    a = tmp_path / "ledgers" / "site-a.sqlite"
    _make(a, "site-a")
    _tamper(a, 2)
    assert main(["ledger", "verify", str(a)]) == 1
    assert "2:shared:fed" in capsys.readouterr().out


@pytest.mark.parametrize("z,q,steps", [(1.1, 0.3, 50), (4.06, 1.0, 40), (0.747, 0.02, 160)])
def test_light_rdp_is_exactly_opacus_rdp_accountant(z: float, q: float, steps: int) -> None:
    """`ledger verify` recomputes ε without importing Opacus' package (privacy/accountant.py loads its
    RDP analysis file directly): bit for bit what Opacus' RDPAccountant gives at the same orders."""
    from opacus.accountants import RDPAccountant

    from worldlm_secure.privacy.accountant import RDP_ORDERS, MechanismStep, epsilon_from_rdp, epsilon_of, rdp_curve

    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    want = acc.get_epsilon(delta=1e-5, alphas=list(RDP_ORDERS))
    assert epsilon_of([MechanismStep(z, q, steps)], 1e-5) == want
    assert epsilon_from_rdp(rdp_curve([MechanismStep(z, q, steps)]), 1e-5) == want
