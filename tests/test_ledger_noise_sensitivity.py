"""Issue #14: `ledger verify` checks that central noise was sized for the sensitivity the release needs.

Under `central_gaussian` on a quantizing protocol the aggregator noises the decoded sum, which one member moves
by its *quantized* vector: the noise must be sized at S_q = S + √d·e (protocols/dp.md §2.8), and the entry
records `extra.noise_sensitivity` (S_q) and `extra.quantization_slack` (√d·e). Before this check `verify`
recomputed ε from `noise_multiplier` only, so a signed entry claiming noise sized below S + slack (or a slack
below what its protocol implies) verified. The attacker below is a node with its own real key writing such
entries through the real `Ledger.append`; every case verified before the check (each test asserts the
finding, so each failed then) and must now fail naming the release, the field, recorded and required.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_ledger_chain import effective_policy

from worldlm_secure.cli import main
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.ledger.noise_rules import MASKING_MAX_BITS, CKKS_MAX_VALUE_BITS, rounding_error_floor
from worldlm_secure.privacy import BudgetTracker
from worldlm_secure.privacy.adaptive_clip import combined_noise_multiplier, vector_noise_multiplier
from worldlm_secure.privacy.quantization import rounding_error

POLICY = effective_policy()  # masking|ckks, clip 1, masking bits 32 / clip_range 1, ckks value_bits 20
COHORT = 3
DIM = 51  # one tensor of 50 values + its weight word
Z = 1.2
E_MASKING = rounding_error("masking", SimpleNamespace(bits=32, clip_range=1.0), COHORT)  # what the release path uses
SLACK = math.sqrt(DIM) * E_MASKING


def _ledger(path: Path, entries: list[dict]) -> Path:  # type: ignore[type-arg]
    """A ledger of `site-a` (its own real key) with one user-level central-Gaussian release per item."""
    t = BudgetTracker(budget=50.0, delta=1e-5, stream="site-a/user")
    with Ledger(path, NodeIdentity.generate("site-a")) as led:
        for r, item in enumerate(entries):
            fields = dict(
                release_id=f"{r}:shared:fed", round=r, level="site", source="site-a", destination="fed",
                group="shared", tensor_names=("model.layers.0.w",), protocol="masking", cohort_size=COHORT,
                dropouts=0, dp_level="user", mechanism="central_gaussian", clipping_norm=1.0,
                policy_sha256=POLICY.sha256,
            )
            fields.update(item)
            led.append(release_entry(**fields, charge=t.charge(Z, 1.0)), policy_document=POLICY.canonical_json())
    return path


def _problem(path: Path) -> str:
    rep = verify(path, require_policies=True, expected_node="site-a")
    assert rep.problem is not None, "the forged entry verified"
    return str(rep.problem)


def test_honest_entries_verify(tmp_path: Path) -> None:
    """What the release path writes (S_q = S + √d·e, e of the round's protocol) verifies; so does an entry under
    protocol none or a distributed mechanism that records no slack."""
    sb = 3.0  # adaptive clipping: the clip C_t = 0.5 and the split of z, S = C_t·z_Δ/z
    z_delta = vector_noise_multiplier(Z, sb)
    s_adaptive = 0.5 * z_delta / Z
    path = _ledger(tmp_path / "site-a.sqlite", [
        {"extra": {"quantization_slack": SLACK, "noise_sensitivity": 1.0 + SLACK}},
        {"clipping_norm": 0.5, "extra": {
            "adaptive_clip_max": 1.0, "adaptive_clip_vector_z": z_delta, "adaptive_clip_count_stddev": sb,
            "quantization_slack": SLACK, "noise_sensitivity": s_adaptive + SLACK}},
        {"protocol": "ckks", "extra": {"quantization_slack": math.sqrt(DIM) * 1.0 / (2.0**21 - 2),
                                       "noise_sensitivity": 1.0 + math.sqrt(DIM) * 1.0 / (2.0**21 - 2) + 1e-12}},
        {"mechanism": "distributed_skellam"},
    ])
    rep = verify(path, require_policies=True, expected_node="site-a")
    assert rep.ok, rep.problem
    assert not any("noise_sensitivity" in n for n in rep.notes)


def test_noise_sized_below_sensitivity_plus_slack_is_refused(tmp_path: Path) -> None:
    """The entry records the slack √d·e but claims noise sized at S alone (the pre-§2.8 sizing)."""
    path = _ledger(tmp_path / "site-a.sqlite", [
        {"extra": {"quantization_slack": SLACK, "noise_sensitivity": 1.0 + SLACK}},
        {"extra": {"quantization_slack": SLACK, "noise_sensitivity": 1.0}},
    ])
    what = _problem(path)
    assert what.startswith("entry 1 (1:shared:fed): ")
    assert "extra.noise_sensitivity" in what and "recorded 1.0" in what and f"{1.0 + SLACK!r}" in what


def test_noise_sized_below_the_clip_is_refused(tmp_path: Path) -> None:
    """Noise sized at half the clip (with a small slack claimed) under CKKS."""
    path = _ledger(tmp_path / "site-a.sqlite", [
        {"protocol": "ckks", "extra": {"quantization_slack": 1e-3, "noise_sensitivity": 0.5}},
    ])
    what = _problem(path)
    assert "(0:shared:fed)" in what and "extra.noise_sensitivity" in what and "recorded 0.5" in what


def test_adaptive_clipping_sensitivity_includes_the_count_words(tmp_path: Path) -> None:
    """With adaptive clipping S = C_t·z_Δ/z (update and count words), not C_t: noise sized at C_t + slack is short."""
    sb = 1.0
    z_delta = vector_noise_multiplier(Z, sb)
    assert combined_noise_multiplier(z_delta, sb) == pytest.approx(Z)
    path = _ledger(tmp_path / "site-a.sqlite", [
        {"clipping_norm": 0.5, "extra": {
            "adaptive_clip_max": 1.0, "adaptive_clip_vector_z": z_delta, "adaptive_clip_count_stddev": sb,
            "quantization_slack": SLACK, "noise_sensitivity": 0.5 + SLACK}},
    ])
    what = _problem(path)
    assert "extra.noise_sensitivity" in what and f"{0.5 * z_delta / Z + SLACK!r}" in what


def test_a_slack_below_what_the_protocol_implies_is_refused(tmp_path: Path) -> None:
    """Noise sized at S + slack, but the slack claimed is zero (or far below any rounding the protocol can have):
    a quantizing protocol with at least one released value has √d·e > 0."""
    for protocol in ("masking", "ckks"):
        path = _ledger(tmp_path / f"{protocol}.sqlite", [
            {"protocol": protocol, "extra": {"quantization_slack": 0.0, "noise_sensitivity": 1.0}},
        ])
        what = _problem(path)
        floor = rounding_error_floor(protocol, 1.0, COHORT)
        assert "extra.quantization_slack" in what and "recorded 0.0" in what and f"{floor!r}" in what, what
        assert protocol in what


def test_a_slack_for_a_smaller_d_than_released_is_refused(tmp_path: Path) -> None:
    """With `released_dim` recorded the slack must cover √d·e for that d: a slack computed for one value while
    the entry says 10^6 were released (noise sized as if the rounding of 999,999 values did not exist) fails,
    and so does a released_dim below the number of released tensors."""
    one_value = rounding_error_floor("masking", 1.0, COHORT) * 2  # above the d = 1 floor, far below √10^6 of it
    path = _ledger(tmp_path / "small-d.sqlite", [
        {"extra": {"quantization_slack": one_value, "noise_sensitivity": 1.0 + one_value, "released_dim": 10**6}},
    ])
    what = _problem(path)
    assert "extra.quantization_slack" in what and "d >= 1000000" in what, what
    path = _ledger(tmp_path / "zero-d.sqlite", [
        {"extra": {"quantization_slack": SLACK, "noise_sensitivity": 1.0 + SLACK, "released_dim": 0}},
    ])
    assert "extra.released_dim" in _problem(path)


def test_half_a_record_is_refused(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "site-a.sqlite", [{"extra": {"noise_sensitivity": 2.0}}])
    what = _problem(path)
    assert "quantization_slack" in what and "noise_sensitivity" in what


def test_the_cli_names_release_field_recorded_and_required(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _ledger(tmp_path / "site-a.sqlite", [
        {"extra": {"quantization_slack": SLACK, "noise_sensitivity": 1.0}},
    ])
    assert main(["ledger", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "0:shared:fed" in out and "noise_sensitivity" in out
    assert "recorded 1.0" in out and "required" in out


def test_an_entry_without_the_record_is_noted_not_failed(tmp_path: Path) -> None:
    """Entries written before §2.8 (or by hand) under central noise on a quantizing protocol record neither
    field: their sizing cannot be checked, which the report says (a note), without failing the ledger."""
    path = _ledger(tmp_path / "site-a.sqlite", [{}, {}])
    rep = verify(path, require_policies=True)
    assert rep.ok, rep.problem
    assert any("noise_sensitivity" in n and "2 " in n for n in rep.notes), rep.notes


def test_the_floor_uses_the_schema_precision_caps() -> None:
    """The slack floor holds for every round the member's policy could be in: the round's precision is the
    members' largest, at most the schema's cap, and its clip_range at least this member's."""
    from worldlm_secure.policy.schema import CkksParams, MaskingParams

    def le(model: type, name: str) -> int:
        return next(m.le for m in model.model_fields[name].metadata if hasattr(m, "le"))

    assert le(MaskingParams, "bits") == MASKING_MAX_BITS and le(CkksParams, "value_bits") == CKKS_MAX_VALUE_BITS
    for protocol, params in (("masking", SimpleNamespace(bits=MASKING_MAX_BITS, clip_range=1.0)),
                             ("ckks", SimpleNamespace(value_bits=CKKS_MAX_VALUE_BITS, clip_range=1.0))):
        for n in (1, 3, 100):
            assert rounding_error_floor(protocol, 1.0, n) == pytest.approx(rounding_error(protocol, params, n), rel=1e-12)
            assert rounding_error_floor(protocol, 1.0, n) <= rounding_error(protocol, SimpleNamespace(
                bits=32, value_bits=20, clip_range=1.0), n)


@pytest.mark.parametrize("protocol,adaptive", [
    ("masking", True), ("masking", False), pytest.param("ckks", True, marks=pytest.mark.ckks),
])
def test_what_the_release_path_writes_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str,
                                               adaptive: bool) -> None:
    """The real release path (central Gaussian on a quantizing protocol; test_dp_adaptive_clip_review's world)
    records both fields, and its ledgers pass the check with the stored policies required."""
    from test_dp_adaptive_clip_review import _release

    _release(tmp_path, protocol, monkeypatch, adaptive=adaptive)
    for node in ("eu-a", "eu-b"):
        ledger = tmp_path / "ledgers" / f"{node}.sqlite"
        rep = verify(ledger, require_policies=True, expected_node=node)
        assert rep.ok, rep.problem
        (entry,) = [e for e in rep.entries if e.release_id == "1:key:eu"]
        assert {"noise_sensitivity", "quantization_slack", "released_dim"} <= set(entry.extra) and not rep.notes
        assert isinstance(entry.extra["released_dim"], int) and entry.extra["released_dim"] > len(entry.tensor_names)
