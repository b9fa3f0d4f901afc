"""One release pipeline (issue #15): a deployed member's ledger entries are written by the same steps as
`simulate`'s, so they record the same fields; a re-release in a new link round (`...:retryLINK`) is an entry
like any other, with the same DP fields and `extra` as the release it repeats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_distributed_world, write_world

from worldlm_secure.federation.engine import planned_site_releases
from worldlm_secure.federation.release import MemberUpdate, ReleasePath
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import LedgerEntry
from worldlm_secure.node.context import WorldContext, load_context
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState
from worldlm_secure.privacy import Charge
from worldlm_secure.release import ReleaseDP, pipeline

COHORT = ["f0-s0", "f0-s1"]
# What one release's entries may differ in: its id, where it sits in the chain, and the stream's running total.
SEAL = {"release_id", "seq", "timestamp", "prev_hash", "public_key", "entry_hash", "signature", "epsilon_cumulative"}


def _content(entry: LedgerEntry) -> dict[str, object]:
    return {k: v for k, v in vars(entry).items() if k not in SEAL}


def _deltas(ctx: WorldContext, member: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(COHORT.index(member))
    return {n: 0.01 * torch.randn(ctx.init[n].shape, generator=gen) for n in ctx.key_names}


def _deployed(ctx: WorldContext, tmp: Path, member: str, link_rounds: list[int]) -> list[LedgerEntry]:
    """``member``'s entries after releasing its round-1 key update once per link round (as a site node does:
    prepare, then `record` right before its input leaves)."""
    names, shapes = ctx.key_names, {n: ctx.init[n].shape for n in ctx.key_names}
    state = NodeState(tmp / "state" / member)
    release = NodeRelease(ctx, NodeIdentity.generate(member), tmp / "ledger" / member, state)
    try:
        prep = release.prepare(1, "key", "f0", "f0", COHORT, _deltas(ctx, member), np.ones(len(names)), names, shapes,
                               derived=False)
        for link in link_rounds:
            release.record(1, "key", "f0", names, prep, COHORT, COHORT, link_round=link)
        return release.path.ledger_entries(member)
    finally:
        state.close()
        release.path.close()


def test_a_retried_deployed_entry_records_what_the_first_one_does(tmp_path: Path) -> None:
    """A federation restarted mid-round re-runs it: under distributed noise the member re-releases with fresh
    shares in a new link round, charged as its own entry. That entry is the release's entry again (same
    protocol, cohort, mechanism, clip, z_eff, ε, policy and `extra`), under the id ``1:key:f0:retry2``."""
    ctx = load_context(write_distributed_world(tmp_path, noise_multiplier="1.0"))
    first, retry = _deployed(ctx, tmp_path, "f0-s0", [1, 2])
    assert (first.release_id, retry.release_id) == ("1:key:f0", "1:key:f0:retry2")
    assert first.epsilon_cumulative is not None and retry.epsilon_cumulative is not None
    assert retry.epsilon_cumulative > first.epsilon_cumulative  # charged again
    assert _content(retry) == _content(first)


def test_a_retried_entry_carries_every_extra_of_the_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever `extra` the pipeline writes for a distributed round (today nothing: the slack is central noise's,
    and adaptive clipping, whose split distributed rounds record, is refused by `node start`), the retry entry
    writes it too: it is written by the same step, not by a copy of it that leaves `extra` out."""
    real = pipeline.release_dp_extra

    def with_marker(dp: ReleaseDP | None, charge: Charge | None) -> dict[str, float]:
        assert charge is not None
        return {**(real(dp, charge) or {}), "marker_noise_multiplier": float(charge.noise_multiplier)}

    monkeypatch.setattr(pipeline, "release_dp_extra", with_marker)
    ctx = load_context(write_distributed_world(tmp_path, noise_multiplier="1.0"))
    first, retry = _deployed(ctx, tmp_path, "f0-s0", [1, 2])
    assert first.extra == {"marker_noise_multiplier": first.noise_multiplier}
    assert retry.extra == first.extra


def _central_world(folder: Path, sites: int = 2) -> Path:
    """A 2xSITES world under masking with central Gaussian noise: entries carry the quantizer's slack (§2.8)."""
    path = write_world(folder, policy="central.yaml", sites=sites)
    (folder / "policies" / "central.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: central\n"
        "jurisdiction: test\nsecure_aggregation: {protocol: [masking], min_cohort: 2}\n"
        "differential_privacy: {level: user, mechanism: [central_gaussian], epsilon_budget: 50.0,\n"
        "  delta: 1.0e-5, clipping_norm: 1.0, noise_multiplier: 1.0}\n"
    )
    return path


def test_a_deployed_member_entry_has_the_fields_simulate_records(tmp_path: Path) -> None:
    """The same release made by `simulate`'s pipeline and by a deployed member: the same entry, `extra`
    (quantization_slack, noise_sensitivity) included."""
    ctx = load_context(_central_world(tmp_path))
    names, shapes = ctx.key_names, {n: ctx.init[n].shape for n in ctx.key_names}
    node = {m: _deployed(ctx, tmp_path, m, [1]) for m in COHORT}
    planned = planned_site_releases(ctx.settings.rounds, bool(ctx.key_names), bool(ctx.shared_names))  # as both plan
    path = ReleasePath(ctx.world, {n: NodeIdentity.generate(n) for n in ctx.world.nodes}, ledger_dir=tmp_path / "sim",
                       planned_releases=planned)
    try:
        path.average_deltas(1, "key", "f0", {m: MemberUpdate(_deltas(ctx, m), np.ones(len(names))) for m in COHORT},
                            names, shapes)
        sim = {m: path.ledger_entries(m) for m in COHORT}
    finally:
        path.close()
    for m in COHORT:
        assert [e.release_id for e in node[m]] == [e.release_id for e in sim[m]] == ["1:key:f0"]
        (deployed,), (simulated,) = node[m], sim[m]
        assert set(deployed.extra) == {"quantization_slack", "noise_sensitivity", "released_dim"}
        assert _content(deployed) | {"epsilon_cumulative": deployed.epsilon_cumulative} == \
            _content(simulated) | {"epsilon_cumulative": simulated.epsilon_cumulative}


def test_a_release_without_fresh_noise_goes_again_only_to_its_first_cohort_and_only_whole(tmp_path: Path) -> None:
    """A federation re-running a release (restarted, or saying so) gets the same update again only from the
    cohort it announced the first time, and only into a sum of all of it: with different contributors the
    difference of the two sums would be one member's update (SECURITY.md, "Re-run rounds")."""
    from worldlm_secure.errors import SecAggError

    ctx = load_context(_central_world(tmp_path, sites=3))  # central noise: nothing fresh in a re-release
    cohort = ["f0-s0", "f0-s1", "f0-s2"]
    names, shapes = ctx.key_names, {n: ctx.init[n].shape for n in ctx.key_names}
    state = NodeState(tmp_path / "state" / "f0-s0")
    release = NodeRelease(ctx, NodeIdentity.generate("f0-s0"), tmp_path / "ledger" / "f0-s0", state)
    deltas, weights = _deltas(ctx, "f0-s0"), np.ones(len(names))

    def prepare(cohort: list[str]):  # type: ignore[no-untyped-def]
        return release.prepare(1, "key", "f0", "f0", cohort, deltas, weights, names, shapes, derived=False)

    try:
        first = prepare(cohort)
        assert first.plan.min_cohort == 2  # the policy's
        release.record(1, "key", "f0", names, first, cohort, cohort, link_round=1)
        again = prepare(cohort)  # link round 2, the same cohort: every member must be in the sum
        assert again.plan.min_cohort == len(cohort) and np.array_equal(again.vector, first.vector)
        with pytest.raises(SecAggError, match="refusing to release 1:key:f0 again.*left out now: f0-s1"):
            prepare(["f0-s0", "f0-s2"])  # the victim f0-s1 left out: refused before anything is sent
    finally:
        state.close()
        release.path.close()
