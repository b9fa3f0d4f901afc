"""`worldlm-secure ledger ...`: verify exit codes naming the bad entry, show --json field names,
export --jsonl, pubkey, and a self-contained HTML report."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from pathlib import Path

import pytest

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry
from worldlm_secure.privacy import BudgetTracker

from test_ledger_chain import effective_policy

DP_POLICY = effective_policy(differential_privacy={"epsilon_budget": 6.0})
NO_DP_POLICY = effective_policy(differential_privacy={"level": "none"})


def _make(path: Path, node: str, rounds: int = 4) -> None:
    t = BudgetTracker(budget=6.0, delta=1e-5, stream=f"{node}/user")
    with Ledger(path, NodeIdentity.generate(node)) as led:
        for r in range(rounds):
            led.append(release_entry(
                release_id=f"{r}:shared:fed", round=r, level="site", source=node, destination="fed-eu",
                group="shared", tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol="masking",
                cohort_size=2, dropouts=r % 2, dp_level="user", mechanism="distributed_skellam",
                clipping_norm=1.0, policy_sha256=DP_POLICY.sha256, charge=t.charge(2.5, 1.0),
            ), policy_document=DP_POLICY.canonical_json())
        led.append(release_entry(
            release_id="4:key:fed", round=4, level="site", source=node, destination="fed-eu", group="key",
            tensor_names=("model.key.w",), protocol="ckks", cohort_size=2, dropouts=0, dp_level="none", mechanism="none",
            clipping_norm=1.0, policy_sha256=NO_DP_POLICY.sha256, charge=None, key_id="ckks-key-7",
        ), policy_document=NO_DP_POLICY.canonical_json())


@pytest.fixture()
def ledgers(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "ledgers" / "site-a.sqlite", tmp_path / "ledgers" / "site-b.sqlite"
    _make(a, "site-a")
    _make(b, "site-b")
    return a, b


def test_verify_ok_and_failure_names_the_first_bad_entry(ledgers: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = ledgers
    assert main(["ledger", "verify", str(a), str(b)]) == 0
    assert capsys.readouterr().out.count("OK") >= 2
    con = sqlite3.connect(b)
    body = bytes(con.execute("SELECT body FROM entries WHERE seq = 2").fetchone()[0])
    con.execute("UPDATE entries SET body = ? WHERE seq = 2", (body.replace(b'"dropouts":0', b'"dropouts":1'),))
    con.commit()
    con.close()
    assert main(["ledger", "verify", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "entry 2 (2:shared:fed)" in out and "content changed" in out
    assert str(a) in out  # the good ledger is still reported


def test_verify_with_pinned_keys(ledgers: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = ledgers
    assert main(["ledger", "pubkey", str(a)]) == 0
    key_a = capsys.readouterr().out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key_a)
    assert main(["ledger", "verify", str(a), "--public-key", key_a]) == 0
    assert main(["ledger", "verify", str(b), "--public-key", key_a]) == 1
    assert main(["ledger", "verify", str(a), str(b), "--public-key", key_a]) == 2  # one key per path
    assert "one per PATH" in capsys.readouterr().err


def test_show_json_has_the_documented_field_names(ledgers: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "show", str(ledgers[0]), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len(entries) == 5
    for field in ("round", "level", "source", "destination", "group", "tensor_names", "protocol", "cohort_size",
                  "dropouts", "dp_level", "mechanism", "clipping_norm", "noise_multiplier", "sample_rate", "steps",
                  "accountant", "delta", "epsilon", "epsilon_cumulative", "epsilon_budget", "policy_sha256",
                  "code_version", "key_id", "extra", "prev_hash", "entry_hash", "signature", "public_key"):
        assert field in entries[0], field
    assert entries[-1]["key_id"] == "ckks-key-7" and entries[-1]["epsilon"] is None
    assert entries[3]["epsilon_cumulative"] <= entries[3]["epsilon_budget"]
    assert main(["ledger", "show", str(ledgers[0])]) == 0
    assert "site-a" in capsys.readouterr().out


def test_export_jsonl_round_trips(ledgers: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["ledger", "export", str(ledgers[0]), "--jsonl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(json.loads(x)["public_key"] for x in lines)
    out = tmp_path / "a.jsonl"
    assert main(["ledger", "export", str(ledgers[0]), "--jsonl", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == lines


def test_report_is_one_self_contained_html_page_and_fails_with_its_ledgers(ledgers: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = ledgers
    out = tmp_path / "report.html"
    assert main(["ledger", "report", str(a.parent), "--out", str(out)]) == 0
    page = out.read_text()
    assert "PASSED" in page and "FAILED" not in page
    con = sqlite3.connect(b)
    con.execute("DELETE FROM entries WHERE seq = 1")
    con.commit()
    con.close()
    assert main(["ledger", "report", str(a), str(b), "--out", str(out)]) == 1  # a failing ledger fails the report
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert "site-a" in page and "site-b" in page and "fed-eu" in page
    # the verdict and the finding come before everything else
    assert page.index("FAILED") < page.index("Privacy spent against budget") and "entry 1" in page
    assert "verified" in page and "masking" in page and "ckks" in page and "distributed_skellam" in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page)  # nothing external
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 1  # one ε-over-rounds plot per aggregating node (fed-eu)
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "ledger-test" in page  # policies by name
    assert "lm_head.*" in page  # the layers that never leave


def test_unreadable_paths_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "show", str(tmp_path / "missing.sqlite")]) == 2
    err = capsys.readouterr().err
    assert "no such ledger file" in err and "Traceback" not in err
