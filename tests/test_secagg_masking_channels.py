"""The same malicious aggregator and the same malicious member through every channel: the same refusals.

Each case rewrites, at the channel (`Channel.exchange`), what the aggregator driver sends a victim member
(re-signed with the aggregator's real identity, as a malicious aggregator would) or what a member answers.
The bytes then reach the one member session (`masking_round.MaskingSession`) and the one aggregator driver
(`masking_round.aggregate`) exactly as they would from an attacker. The channels: in-memory
(`secagg.channel.InMemoryChannel`), Ray actors (`federation.ray_channel.RayChannel`) and gRPC/mTLS between
real sockets (`node.link.BoardChannel`). Every channel must show the same refusal, by the same party.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.channel import InMemoryChannel
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, MaskingParams, RoundConfig
from worldlm_secure.secagg.masking_messages import AggregatorMessage, decode
from worldlm_secure.secagg.masking_round import MaskingSession, aggregate

PARAMS = MaskingParams(clip_range=4.0, neighbours="auto", threshold=0.67, bits=32)
NAMES = [f"site-{i}" for i in range(5)]
VICTIM = "site-0"
Rewrite = Callable[[str, dict[str, bytes], NodeIdentity], dict[str, bytes]]


def _resign(msg: AggregatorMessage, by: NodeIdentity) -> bytes:
    unsigned = dataclasses.replace(msg, signature=b"")
    return dataclasses.replace(unsigned, signature=by.sign(unsigned.signed_payload())).to_bytes()


def withhold_shares(step: str, requests: dict[str, bytes], agg: NodeIdentity) -> dict[str, bytes]:
    if step == "masked_input" and VICTIM in requests:
        requests[VICTIM] = _resign(dataclasses.replace(decode(requests[VICTIM]), shares=()), agg)  # type: ignore[arg-type]
    return requests


def forge_signature(step: str, requests: dict[str, bytes], agg: NodeIdentity) -> dict[str, bytes]:
    if step == "share_keys" and VICTIM in requests:
        requests[VICTIM] = _resign(decode(requests[VICTIM]), NodeIdentity.generate("someone-else"))  # type: ignore[arg-type]
    return requests


def replay_round(step: str, requests: dict[str, bytes], agg: NodeIdentity) -> dict[str, bytes]:
    if step == "confirm" and VICTIM in requests:
        msg = decode(requests[VICTIM])
        requests[VICTIM] = _resign(dataclasses.replace(msg, round_id=msg.round_id + 1), agg)  # type: ignore[arg-type]
    return requests


def impersonate(step: str, answers: dict[str, bytes], agg: NodeIdentity) -> dict[str, bytes]:
    """A malicious member (VICTIM's channel slot) answers with another member's key advert."""
    if step == "advertise" and VICTIM in answers and "site-1" in answers:
        answers[VICTIM] = answers["site-1"]
    return answers


# case -> (rewrite requests, rewrite answers, the refusal every channel must show, the victim still in the sum)
CASES: dict[str, tuple[Rewrite | None, Rewrite | None, str, bool]] = {
    "withheld shares": (withhold_shares, None, "received shares from only 0 neighbours, fewer than the threshold", False),
    "forged signature": (forge_signature, None, "is not signed by the aggregator", False),
    "replayed round": (replay_round, None, "replayed or stale message refused", True),
    "impersonating member": (None, impersonate, "message claims to come from 'site-1'", False),
}


def _tampered(cls: type, monkeypatch: pytest.MonkeyPatch, agg: Callable[[], NodeIdentity], case: str) -> None:
    """Patch ``cls.exchange`` (a channel) to apply ``case``'s rewrites to what crosses it; ``agg()`` is the
    aggregator's real identity (a malicious aggregator holds its own key)."""
    before, after, _, _ = CASES[case]
    real = cls.exchange

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
        requests = before(step, dict(requests), agg()) if before else requests
        answers = real(self, step, requests, timeout)
        return after(step, dict(answers), agg()) if after else answers

    monkeypatch.setattr(cls, "exchange", exchange)


def _config(identities: Mapping[str, NodeIdentity], agg: NodeIdentity) -> RoundConfig:
    keys = {n: i.public_bytes for n, i in identities.items()}
    return RoundConfig.build(PARAMS, 1, NAMES, keys, 3, aggregator_key=agg.public_bytes)


def _vectors() -> dict[str, np.ndarray]:
    return {m: np.linspace(-1, 1, 50) * (i + 1) for i, m in enumerate(NAMES)}


def _check(case: str, contributors: tuple[str, ...], total: np.ndarray, refusals: str) -> None:
    _, _, why, victim_in_sum = CASES[case]
    assert why in refusals, refusals
    assert (VICTIM in contributors) == victim_in_sum
    vectors = _vectors()
    clipped = {m: np.clip(v, -PARAMS.clip_range, PARAMS.clip_range) for m, v in vectors.items()}
    assert np.max(np.abs(total - sum(clipped[m] for m in contributors))) < 1e-6  # the contributors' sum, exact


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_memory_channel(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = {n: NodeIdentity.generate(n) for n in NAMES}
    agg = NodeIdentity.generate("fed")
    cfg = _config(ids, agg)
    vectors = _vectors()
    sessions = {n: MaskingSession(MaskingMember(ids[n], cfg), lambda n=n: vectors[n]) for n in NAMES}
    _tampered(InMemoryChannel, monkeypatch, lambda: agg, case)
    trace = aggregate(MaskingAggregator(cfg, agg), InMemoryChannel(sessions, refusals="drop"))
    _check(case, trace.outcome.contributors, trace.outcome.total, " | ".join(trace.dropped.values()))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_channel(local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = local_ray
    from worldlm_secure.federation.ray_channel import RayChannel
    from worldlm_secure.federation.site_actor import SiteMember

    @ray.remote
    class Member(SiteMember):
        """The site actor's own member side (`SiteMember.masking`, the one member session), without a model."""

        def __init__(self, name: str) -> None:
            SiteMember.__init__(self, name, NodeIdentity.generate(name))  # keys of its own until the first case

        def reset(self, key_file: Path, vector: np.ndarray) -> None:
            """A new member for the next case (new keys, no session), as a fresh actor would be; one actor per
            member for every case, because each new actor process imports torch (~5 CPU-s)."""
            SiteMember.__init__(self, self.name, NodeIdentity.load(self.name, key_file))
            self.prepare_vector(vector)  # as after SiteActor.prepare: one session over this vector

    actors = {n: Member.remote(n) for n in NAMES}
    for case in sorted(CASES):
        with monkeypatch.context() as mp:
            ids = {n: NodeIdentity.generate(n) for n in NAMES}
            for n, identity in ids.items():
                identity.save(tmp_path / case / f"{n}.pem")
            agg = NodeIdentity.generate("fed")
            cfg = _config(ids, agg)
            ray.get([actors[n].reset.remote(tmp_path / case / f"{n}.pem", v) for n, v in _vectors().items()])
            _tampered(RayChannel, mp, lambda: agg, case)
            trace = aggregate(MaskingAggregator(cfg, agg), RayChannel(ray, actors, cfg, None))
            _check(case, trace.outcome.contributors, trace.outcome.total, " | ".join(trace.dropped.values()))
    for a in actors.values():
        ray.kill(a)


@pytest.mark.network
@pytest.mark.parametrize("case", sorted(CASES))
def test_grpc_channel(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import test_node_link as harness
    from worldlm_secure.node import link
    from worldlm_secure.transport import keys

    # the federation's real key, read once the harness has issued it under tmp_path / "pki"
    _tampered(link.BoardChannel, monkeypatch, lambda: NodeIdentity.load("fed", tmp_path / "pki" / "fed" / keys.NODE_SIGNING_KEY), case)
    out, _, _, errors = harness._run(tmp_path / "pki", 5, 3, None)
    _check(case, out.contributors, out.total, " | ".join([*errors.values(), *out.rejected]))
