"""Ledger integrity: every tampering (byte flips, field edits, deletion, reordering, foreign
signatures, truncation) makes `verify` fail and name the entry; idempotent appends; budget guard."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import BudgetExceeded, LedgerError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, LedgerEntry, canonical_json, read_entries, release_entry, verify
from worldlm_secure.privacy import BudgetTracker

N_ENTRIES = 5


def effective_policy(**sections: dict) -> "EffectivePolicy":  # noqa: F821
    """The effective policy of one test policy (user-level DP, ε 50, δ 1e-5, clip 1, masking|ckks, min_cohort 2,
    destination fed; shared = model.layers.* and b, key = *.key.*, local = lm_head.*); `sections` override it."""
    from worldlm_secure.policy import compose
    from worldlm_secure.policy.loader import _tuples
    from worldlm_secure.policy.schema import Policy

    doc = {
        "apiVersion": "worldlm-secure/v1", "kind": "JurisdictionPolicy", "name": "ledger-test", "jurisdiction": "test",
        "layers": {"local": ["lm_head.*"], "key": ["*.key.*"], "shared": ["model.layers.*", "b"]},
        "secure_aggregation": {"protocol": ["masking", "ckks"], "min_cohort": 2},
        "differential_privacy": {"level": "user", "epsilon_budget": 50.0, "delta": 1e-5, "clipping_norm": 1.0,
                                 "mechanism": ["central_gaussian", "distributed_skellam"]},
        "egress": {"destinations": ["fed", "fed-eu"], "require": ["secure_aggregation"]},
    }
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v}
    return compose([Policy.model_validate(_tuples(doc))])


POLICY = effective_policy()
POLICY_DOC = POLICY.canonical_json()


def _policy_sha() -> str:
    return POLICY.sha256


def build_ledger(path: Path, node: str, identity: NodeIdentity | None = None, n: int = N_ENTRIES) -> NodeIdentity:
    identity = identity or NodeIdentity.generate(node)
    tracker = BudgetTracker(budget=50.0, delta=1e-5, stream=f"{node}/user")
    with Ledger(path, identity) as led:
        for r in range(n):
            charge = tracker.charge(2.0 + 0.25 * (r % 2), 1.0)  # dropouts change z_eff every other round
            led.append(
                release_entry(
                    release_id=f"{r}:shared:fed", round=r, level="site", source=node, destination="fed",
                    group="shared", tensor_names=("model.layers.0.mlp.up_proj.weight", "b"), protocol="masking",
                    cohort_size=4, dropouts=r % 2, dp_level="user", mechanism="central_gaussian",
                    clipping_norm=1.0, policy_sha256=_policy_sha(), charge=charge, extra={"round_seed": r},
                ),
                policy_document=POLICY_DOC,
            )
    return identity


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ledgers")
    build_ledger(d / "a.sqlite", "site-a")
    build_ledger(d / "b.sqlite", "site-b")
    return d / "a.sqlite", d / "b.sqlite"


_SCRATCH: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hypothesis examples cannot take `tmp_path`; their copies go under pytest's managed temp root."""
    _SCRATCH[:] = [tmp_path_factory.mktemp("copies")]


def _copy(src: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=_SCRATCH[0]))
    dst = d / src.name
    shutil.copy(src, dst)
    return dst


def _rows(path: Path) -> list[tuple[int, str, bytes, str, str]]:
    con = sqlite3.connect(path)
    rows = con.execute("SELECT seq, release_id, body, entry_hash, signature FROM entries ORDER BY seq").fetchall()
    con.close()
    return [(s, r, bytes(b), h, g) for s, r, b, h, g in rows]


def _exec(path: Path, sql: str, args: tuple = ()) -> None:
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()


def test_fresh_ledger_verifies_and_records_public_key(template: tuple[Path, Path]) -> None:
    rep = verify(template[0])
    assert rep.ok, rep.problem
    assert rep.total_rows == N_ENTRIES and len(rep.entries) == N_ENTRIES
    assert rep.node == "site-a"
    assert all(e.public_key == rep.public_key for e in rep.entries)
    assert rep.entries[0].prev_hash == "0" * 64
    assert [e.prev_hash for e in rep.entries[1:]] == [e.entry_hash for e in rep.entries[:-1]]
    assert rep.spent["site-a/user"] == rep.entries[-1].epsilon_cumulative


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_change_in_any_entry_is_caught_and_named(template: tuple[Path, Path], data: st.DataObject) -> None:
    path = _copy(template[0])
    rows = _rows(path)
    i = data.draw(st.integers(0, len(rows) - 1), label="entry")
    column = data.draw(st.sampled_from(["body", "entry_hash", "signature"]), label="column")
    seq, _, body, h, sig = rows[i]
    raw = {"body": body, "entry_hash": h.encode(), "signature": sig.encode()}[column]
    j = data.draw(st.integers(0, len(raw) - 1), label="byte")
    x = data.draw(st.integers(1, 255), label="xor")
    changed = bytearray(raw)
    changed[j] ^= x
    value: bytes | str = bytes(changed) if column == "body" else bytes(changed).decode("latin-1")
    _exec(path, f"UPDATE entries SET {column} = ? WHERE seq = ?", (value, seq))
    rep = verify(path)
    assert not rep.ok
    assert rep.problem is not None and rep.problem.seq == i, str(rep.problem)


def test_a_signature_with_one_letter_in_upper_case_is_caught(template: tuple[Path, Path]) -> None:
    """`bytes.fromhex` reads "AB" as "ab": a stored signature with one letter's case flipped decoded to the same
    bytes and verified (found by the test above, entry 0, signature byte 1 xor 32). Stored hex must be canonical."""
    path = _copy(template[0])
    seq, _, _, _, sig = _rows(path)[0]
    i = next(k for k, c in enumerate(sig) if c in "abcdef")
    _exec(path, "UPDATE entries SET signature = ? WHERE seq = ?", (sig[:i] + sig[i].upper() + sig[i + 1:], seq))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and "lowercase hex" in rep.problem.what, str(rep.problem)


def test_hex_signatures_verify_only_in_canonical_form() -> None:
    from worldlm_secure.identity import NodeIdentity, verify_hex_signature

    me = NodeIdentity.generate("a")
    pk, sig = me.public_bytes.hex(), me.sign(b"m").hex()
    assert verify_hex_signature(pk, sig, b"m")
    for bad_pk, bad_sig in ((pk, sig.upper()), (pk.upper(), sig), (pk, sig[:2] + " " + sig[2:]), (pk, "")):
        assert not verify_hex_signature(bad_pk, bad_sig, b"m")


CONTENT_FIELDS = {
    "round": st.integers(-5, 10**6),
    "destination": st.text(min_size=1, max_size=12),
    "group": st.sampled_from(["key", "residual", "local"]),
    "tensor_names": st.lists(st.text(max_size=8), max_size=3),
    "protocol": st.sampled_from(["none", "ckks"]),
    "cohort_size": st.integers(5, 100),
    "dropouts": st.integers(2, 4),
    "mechanism": st.sampled_from(["distributed_skellam", "none"]),
    "clipping_norm": st.floats(0.01, 100),
    "noise_multiplier": st.floats(0.3, 50),
    "sample_rate": st.floats(0.001, 0.999),
    "epsilon": st.floats(0, 100),
    "epsilon_cumulative": st.floats(0, 100),
    "epsilon_budget": st.floats(60, 100),
    "policy_sha256": st.text("0123456789abcdef", min_size=64, max_size=64),
    "code_version": st.text(max_size=10),
    "extra": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    "public_key": st.text("0123456789abcdef", min_size=64, max_size=64),
}


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), rehash=st.booleans())
def test_any_field_edit_is_caught_even_when_the_hash_is_recomputed(
    template: tuple[Path, Path], data: st.DataObject, rehash: bool
) -> None:
    import hashlib
    import json

    path = _copy(template[0])
    rows = _rows(path)
    i = data.draw(st.integers(0, len(rows) - 1), label="entry")
    field = data.draw(st.sampled_from(sorted(CONTENT_FIELDS)), label="field")
    d = json.loads(rows[i][2])
    new = data.draw(CONTENT_FIELDS[field].filter(lambda v: v != d[field]), label="value")
    d[field] = float(new) if isinstance(d[field], float) else new
    body = canonical_json(d)
    new_hash = hashlib.sha256(body).hexdigest() if rehash else rows[i][3]
    _exec(path, "UPDATE entries SET body = ?, entry_hash = ? WHERE seq = ?", (body, new_hash, rows[i][0]))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == i, str(rep.problem)


@pytest.mark.parametrize("k", range(N_ENTRIES))
def test_deleting_any_entry_is_caught_and_named(template: tuple[Path, Path], k: int) -> None:
    path = _copy(template[0])
    _exec(path, "DELETE FROM entries WHERE seq = ?", (k,))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None
    assert rep.problem.seq == k, str(rep.problem)
    assert "missing" in rep.problem.what


def test_deleting_the_head_record_is_caught(template: tuple[Path, Path]) -> None:
    path = _copy(template[0])
    _exec(path, "DELETE FROM head")
    assert not verify(path).ok


@pytest.mark.parametrize("i,j", [(0, 1), (1, 3), (0, N_ENTRIES - 1), (2, 3)])
def test_reordering_two_entries_is_caught_and_named(template: tuple[Path, Path], i: int, j: int) -> None:
    path = _copy(template[0])
    rows = _rows(path)
    con = sqlite3.connect(path)
    con.execute("DELETE FROM entries WHERE seq IN (?, ?)", (i, j))
    for pos, src in ((i, rows[j]), (j, rows[i])):
        con.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", (pos, src[1], src[2], src[3], src[4]))
    con.commit()
    con.close()
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == i, str(rep.problem)


@pytest.mark.parametrize("i", range(N_ENTRIES))
def test_another_nodes_signature_or_whole_entry_is_caught(template: tuple[Path, Path], i: int) -> None:
    a_rows, b_rows = _rows(template[0]), _rows(template[1])
    # Only the signature swapped in:
    path = _copy(template[0])
    _exec(path, "UPDATE entries SET signature = ? WHERE seq = ?", (b_rows[i][4], i))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == i, str(rep.problem)
    # The other node's whole entry (body, hash, signature: all valid for site-b) swapped in:
    path = _copy(template[0])
    _exec(path, "UPDATE entries SET body = ?, entry_hash = ?, signature = ? WHERE seq = ?",
          (b_rows[i][2], b_rows[i][3], b_rows[i][4], i))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == i, str(rep.problem)
    assert a_rows[i][2] != b_rows[i][2]


def test_a_fully_resigned_forgery_fails_against_the_pinned_key(template: tuple[Path, Path], tmp_path: Path) -> None:
    genuine = verify(template[0])
    forged = tmp_path / "forged.sqlite"
    build_ledger(forged, "site-a")  # an attacker's self-consistent ledger under its own key
    assert verify(forged).ok
    rep = verify(forged, expected_public_key=genuine.public_key)
    assert not rep.ok and "expected key" in str(rep.problem)


def test_tampered_policy_document_is_caught(template: tuple[Path, Path]) -> None:
    path = _copy(template[0])
    _exec(path, "UPDATE policies SET document = ?", (POLICY_DOC.replace("1e-05", "0.001").encode(),))
    rep = verify(path)
    assert not rep.ok and rep.problem is not None and rep.problem.seq == 0
    assert "policy" in rep.problem.what


def test_recorded_epsilon_that_was_not_earned_is_caught(tmp_path: Path) -> None:
    ident = NodeIdentity.generate("s")
    tracker = BudgetTracker(budget=10.0, delta=1e-5, stream="s/user")
    with Ledger(tmp_path / "s.sqlite", ident) as led:
        c = tracker.charge(1.5, 1.0)
        e = release_entry(release_id="0", round=0, level="site", source="s", destination="f", group="key",
                          tensor_names=("w",), protocol="masking", cohort_size=3, dropouts=0, dp_level="user",
                          mechanism="central_gaussian", clipping_norm=1.0, policy_sha256="0" * 64, charge=c)
        import dataclasses

        # A node that under-reports ε (signed and chained correctly, but the math is wrong):
        led.append(dataclasses.replace(e, epsilon=c.epsilon / 2, epsilon_cumulative=c.epsilon_cumulative / 2))
    rep = verify(tmp_path / "s.sqlite")
    assert not rep.ok and rep.problem is not None and rep.problem.seq == 0 and "accountant gives" in rep.problem.what


def test_append_is_idempotent_by_release_id(tmp_path: Path) -> None:
    ident = build_ledger(tmp_path / "a.sqlite", "site-a", n=2)
    before = read_entries(tmp_path / "a.sqlite")
    with Ledger(tmp_path / "a.sqlite", ident) as led:
        again = led.append(dataclasses_replace_seal(before[1]))
        assert again == before[1]
        with pytest.raises(LedgerError, match="already recorded for a different release"):
            import dataclasses

            led.append(dataclasses.replace(dataclasses_replace_seal(before[1]), round=99))
    assert len(read_entries(tmp_path / "a.sqlite")) == 2
    assert verify(tmp_path / "a.sqlite").ok


def dataclasses_replace_seal(e: LedgerEntry) -> LedgerEntry:
    import dataclasses

    return dataclasses.replace(e, seq=-1, timestamp="", prev_hash="", public_key="", entry_hash="", signature="")


def test_a_ledger_refuses_another_nodes_key_and_over_budget_entries(tmp_path: Path) -> None:
    build_ledger(tmp_path / "a.sqlite", "site-a", n=1)
    with pytest.raises(LedgerError, match="belongs to node 'site-a'"):
        Ledger(tmp_path / "a.sqlite", NodeIdentity.generate("site-a"))
    import dataclasses

    e = read_entries(tmp_path / "a.sqlite")[0]
    with Ledger(tmp_path / "b.sqlite", NodeIdentity.generate("b")) as led:
        over = dataclasses.replace(dataclasses_replace_seal(e), release_id="x", epsilon_budget=e.epsilon_cumulative / 2)
        with pytest.raises(BudgetExceeded, match="over budget"):
            led.append(over)
        with pytest.raises(LedgerError, match="policy_document does not hash"):
            led.append(dataclasses.replace(dataclasses_replace_seal(e), release_id="y"), policy_document="{}")
        assert led.entries() == []


def test_missing_or_foreign_file_is_a_one_line_ledger_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no such ledger file"):
        verify(tmp_path / "nope.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(LedgerError, match="not a readable ledger"):
        verify(tmp_path / "junk.sqlite")


@settings(deadline=None, max_examples=40)
@given(
    names=st.lists(st.text(max_size=20), max_size=4),
    extra=st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans()), max_size=3),
    clip=st.one_of(st.integers(1, 5), st.floats(1e-6, 1e6)),
    node=st.text(min_size=1, max_size=10),
)
def test_any_entry_content_round_trips_canonically_and_verifies(
    names: list[str], extra: dict[str, object], clip: float, node: str
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.sqlite"
        with Ledger(path, NodeIdentity.generate(node)) as led:
            e = release_entry(
                release_id="r", round=0, level="site", source=node, destination="ü-fed", group="shared",
                tensor_names=names, protocol="none", cohort_size=1, dropouts=0, dp_level="none", mechanism="none",
                clipping_norm=clip, policy_sha256="f" * 64, charge=None, extra=extra,  # type: ignore[arg-type]
            )
            sealed = led.append(e)
        stored = read_entries(path)
        assert stored == [sealed]
        assert stored[0].tensor_names == tuple(names) and dict(stored[0].extra) == extra
        assert verify(path).ok
