"""Attacks on what a deployed member's sums are bound to: the contributors of any earlier sum of the same update,
and the round everyone in one sum was told (`test_ckks_members_told_different_rounds_reveal_nothing`; the
masking case with whole site nodes: test_attack_node_member_review.py, model consistency).

Re-runs: a malicious aggregator leaves a member out of the FIRST sum of a release, then re-runs it with her.

SecAgg+ and CKKS each protect one sum. A federation that re-runs a world-round release (it restarted, or says
it did: a member cannot tell) gets two sums over the same unchanged updates; if their contributor sets differ,
their difference is the updates of the members in one and not the other. The first defence
(`NodeRelease._rerun_plan`) makes a re-run go only to the first announced cohort and only into a sum of all of
it. It leaves one way through: in the first link round the aggregator takes the victim's masked input (or
revealed ciphertext), declares her dropped, and releases the sum of the others; the victim never learns, and in
the full re-run the difference is exactly her update.

The members that *did* complete the first sum know its contributors (they signed the survivor list, or, as
CKKS key holders, decrypted it). Each remembers them, in its node state, before it reveals anything that
completes a sum (`NodeRelease.reveal_guard`, the sessions' ``before_reveal``), and never helps complete a
second sum of the same update over other contributors. Without their unmask shares (or decryptions) the
re-run yields nothing. SECURITY.md, "Re-run rounds".

Each test drives the real member code of a deployed node (`NodeRelease` with its sqlite state, the protocol's
member session) against a malicious aggregator built from the real aggregator driver. Both attacks recovered
the victim's update before the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_world

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.context import WorldContext, load_context
from worldlm_secure.node.release import NodeRelease, Prepared
from worldlm_secure.node.rounds import masking_config
from worldlm_secure.node.state import NodeState
from worldlm_secure.secagg.channel import InMemoryChannel
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember
from worldlm_secure.secagg.masking_round import MaskingSession, aggregate
from worldlm_secure.transport.handler import Announcement

COHORT = ("f0-s0", "f0-s1", "f0-s2", "f0-s3")  # 4: with 3 survivors every secret still has t=2 shares
VICTIM = "f0-s1"


def _world(folder: Path, protocol: str) -> Path:
    """2 federations x 4 sites under ``protocol`` with central Gaussian noise (nothing fresh in a re-release)."""
    path = write_world(folder, policy="central.yaml", sites=4)
    extra = "ckks: {value_bits: 32}, " if protocol == "ckks" else ""
    (folder / "policies" / "central.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: central\n"
        f"jurisdiction: test\nsecure_aggregation: {{protocol: [{protocol}], {extra}min_cohort: 2}}\n"
        "differential_privacy: {level: user, mechanism: [central_gaussian], epsilon_budget: 50.0,\n"
        "  delta: 1.0e-5, clipping_norm: 1.0, noise_multiplier: 1.0}\n"
    )
    return path


class _Member:
    """One deployed site's release of its round-1 key update: its identity, ledger, state and prepared vector."""

    def __init__(self, ctx: WorldContext, tmp: Path, name: str, identity: NodeIdentity) -> None:
        self.name, self.identity = name, identity
        self.state = NodeState(tmp / "state" / name)
        self.release = NodeRelease(ctx, identity, tmp / "ledger" / name, self.state)
        self.names = ctx.key_names
        gen = torch.Generator().manual_seed(COHORT.index(name))
        self.deltas = {n: 0.01 * torch.randn(ctx.init[n].shape, generator=gen) for n in self.names}
        self.shapes = {n: ctx.init[n].shape for n in self.names}

    def prepare(self) -> Prepared:
        return self.release.prepare(1, "key", "f0", "f0", COHORT, self.deltas, np.ones(len(self.names)), self.names,
                                    self.shapes, derived=False)

    def hooks(self, prep: Prepared, link_round: int) -> tuple[Callable[..., None], Callable[[tuple[str, ...]], None]]:
        """What a site node passes its session (`node.site.SiteNode._release`): the ledger entry, the reveal guard."""
        def before_input(cohort: tuple[str, ...], key_id: str = "") -> None:
            self.release.record(1, "key", "f0", self.names, prep, cohort, COHORT, link_round, key_id=key_id)
        return before_input, self.release.reveal_guard(1, "key", "f0", prep)

    def close(self) -> None:
        self.state.close()
        self.release.path.close()


class _TakeAndDiscard(InMemoryChannel):
    """The malicious aggregator's channel: ``victim``'s answer to ``step`` is taken (her session made it, her
    release is recorded) and then treated as never arrived, so the sum goes on without her."""

    def __init__(self, sessions: Mapping[str, object], step: str, victim: str) -> None:
        super().__init__(sessions, refusals="drop")  # type: ignore[arg-type]
        self.step, self.victim = step, victim

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        out = super().exchange(step, requests, timeout)
        if step == self.step:
            out.pop(self.victim, None)
        return out


@pytest.fixture
def members(tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, _Member]:
    ctx = load_context(_world(tmp_path, request.param))
    made = {n: _Member(ctx, tmp_path, n, NodeIdentity.generate(n)) for n in COHORT}
    yield made
    for m in made.values():
        m.close()


def _masked_round(members: dict[str, _Member], link_round: int, victim_discarded: bool) -> np.ndarray:
    """One masked link round of the release among ``members``; the sum the aggregator gets (SecAggError: none)."""
    aggregator = NodeIdentity.generate("f0")
    preps = {n: m.prepare() for n, m in members.items()}
    ann = Announcement(link_round, COHORT, "masking", peer_keys=tuple((n, m.identity.public_bytes) for n, m in members.items()),
                       aggregator_key=aggregator.public_bytes)
    sessions = {}
    for n, m in members.items():
        config = masking_config(preps[n].plan, ann)
        assert config is not None
        before_input, before_reveal = m.hooks(preps[n], link_round)
        sessions[n] = MaskingSession(MaskingMember(m.identity, config), (lambda v=preps[n].vector: v),
                                     before_input=before_input, before_reveal=before_reveal)
    server_cfg = masking_config(preps[COHORT[0]].plan, ann)  # the members' public round parameters
    assert server_cfg is not None
    channel = (_TakeAndDiscard(sessions, "masked_input", VICTIM) if victim_discarded
               else InMemoryChannel(sessions, refusals="drop"))
    return np.asarray(aggregate(MaskingAggregator(server_cfg, aggregator), channel).outcome.total)


@pytest.mark.parametrize("members", ["masking"], indirect=True)
def test_masking_a_victim_left_out_of_the_first_sum_is_not_isolated_by_a_full_rerun(members: dict[str, _Member]) -> None:
    victim = members[VICTIM].prepare().vector
    first = _masked_round(members, 1, victim_discarded=True)  # the others' sum, the victim's input taken
    assert members[VICTIM].release.path.ledger(VICTIM).get("1:key:f0") is not None  # she did release
    with pytest.raises(SecAggError):
        second = _masked_round(members, 2, victim_discarded=False)
        # what the attack got before the fix: the victim's update, to the quantizer's precision
        assert not np.allclose(second - first, victim, atol=1e-3), "the re-run isolated the victim's update"


@pytest.mark.parametrize("members", ["masking"], indirect=True)
def test_masking_an_honest_rerun_over_the_same_contributors_still_completes(members: dict[str, _Member]) -> None:
    """The aggregator restarted after the first sum: the same cohort, all of it, sums again (nothing new learnt)."""
    first = _masked_round(members, 1, victim_discarded=False)
    second = _masked_round(members, 2, victim_discarded=False)
    assert np.allclose(first, second, atol=1e-3)


def _ckks_round(members: dict[str, _Member], link_round: int, victim_discarded: bool) -> np.ndarray:
    """One CKKS link round of the release (the key epoch is the link round, as over links); the decrypted sum."""
    from worldlm_secure.node.rounds import ckks_round
    from worldlm_secure.secagg.ckks_round import round_result
    from worldlm_secure.secagg import ckks_round as ckks
    from worldlm_secure.secagg.ckks_round import CkksKeyring, CkksSession

    preps = {n: m.prepare() for n, m in members.items()}
    ann = Announcement(link_round, COHORT, "ckks", peer_keys=tuple((n, m.identity.public_bytes) for n, m in members.items()))
    sessions = {}
    for n, m in members.items():
        setup = ckks_round(preps[n].plan, ann)
        assert setup is not None
        before_input, before_reveal = m.hooks(preps[n], link_round)
        sessions[n] = CkksSession(CkksKeyring(m.identity), setup.setup(ann), (lambda v=preps[n].vector: v),
                                  before_input=before_input, before_reveal=before_reveal)
    server = ckks_round(preps[COHORT[0]].plan, ann)
    assert server is not None
    channel = (_TakeAndDiscard(sessions, ckks.CONTRIBUTE, VICTIM) if victim_discarded
               else InMemoryChannel(sessions, refusals="drop"))
    trace, _ = ckks.aggregate(server.setup(ann), channel)
    return np.asarray(round_result(server.params, COHORT, trace).total)


@pytest.mark.ckks
@pytest.mark.parametrize("members", ["ckks"], indirect=True)
def test_ckks_a_victim_left_out_of_the_first_sum_is_not_isolated_by_a_full_rerun(members: dict[str, _Member]) -> None:
    victim = members[VICTIM].prepare().vector
    first = _ckks_round(members, 1, victim_discarded=True)  # the holder decrypts the others' sum
    assert members[VICTIM].release.path.ledger(VICTIM).get("1:key:f0") is not None  # her ciphertext left
    with pytest.raises(SecAggError):
        second = _ckks_round(members, 2, victim_discarded=False)
        assert not np.allclose(second - first, victim, atol=1e-3), "the re-run isolated the victim's update"


@pytest.mark.ckks
@pytest.mark.parametrize("members", ["ckks"], indirect=True)
def test_ckks_an_honest_rerun_over_the_same_contributors_still_completes(members: dict[str, _Member]) -> None:
    first = _ckks_round(members, 1, victim_discarded=False)
    second = _ckks_round(members, 2, victim_discarded=False)
    assert np.allclose(first, second, atol=1e-3)


@pytest.mark.ckks
@pytest.mark.parametrize("members", ["ckks"], indirect=True)
def test_ckks_members_told_different_rounds_reveal_nothing(members: dict[str, _Member], monkeypatch: pytest.MonkeyPatch) -> None:
    """Model consistency under CKKS: the aggregator announces one round to the victim and another (say, another
    served model's hash) to everyone else, and skips its own commitment checks. Every commitment carries the
    SHA-256 of the announcement its member was told; each member reveals only under a list whose commitments
    all carry its own, so nobody reveals and there is no sum."""
    from worldlm_secure.node.rounds import Phase, ckks_round
    from worldlm_secure.secagg import ckks_round as ckks
    from worldlm_secure.secagg.ckks_round import CkksKeyring, CkksSession

    monkeypatch.setattr(ckks, "commitments_problem", lambda *a, **k: None)  # the aggregator checks nothing
    keys = tuple((n, m.identity.public_bytes) for n, m in members.items())
    anns = {n: Announcement(1, COHORT, "ckks", Phase(1, "key", model=("b" if n == VICTIM else "a") * 64).to_bytes(),
                            peer_keys=keys) for n in COHORT}
    sessions = {}
    for n, m in members.items():
        prep = m.prepare()
        setup = ckks_round(prep.plan, anns[n])
        assert setup is not None
        sessions[n] = CkksSession(CkksKeyring(m.identity), setup.setup(anns[n]), (lambda v=prep.vector: v),
                                  before_input=m.hooks(prep, 1)[0])
    server = ckks_round(members[COHORT[0]].prepare().plan, anns[COHORT[0]])
    assert server is not None
    channel = InMemoryChannel(sessions, refusals="drop")
    with pytest.raises(SecAggError, match="contributed"):
        ckks.aggregate(server.setup(anns[COHORT[0]]), channel)
    assert "another round context" in channel.dropped[VICTIM]
