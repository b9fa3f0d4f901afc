"""The aggregator side of a SecAgg+ round whose members are Ray actors: the driver only routes bytes.

Same steps as `secagg.masking.drive_round`, message for message, but each member step runs in the
site's actor (`site_actor.SiteActor`) and what comes back is the serialized message. Everything a
member sends enters the aggregator through `receive` (bytes -> the expected message type, from the
expected member): the driver never holds a member's vector, only its `MaskedInput`.
Costs are counted from the serialized sizes, as `MaskingSum` does, so bytes_up/bytes_down match it.
A member whose step fails (its actor raised or died: `ray_steps.run_step`) or that answers with something
other than the step's message has dropped out from that step on; SecAgg+ recovers its masks from the
others' shares, and the round aborts (nothing released) only when fewer than the threshold remain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.federation.ray_steps import StepLog, run_step
from worldlm_secure.secagg.masking import MaskingAggregator, RoundConfig, RoundTrace, round_result
from worldlm_secure.secagg.masking_messages import (
    KeyAdvert,
    MaskedInput,
    Message,
    ShareKeys,
    SurvivorSignature,
    UnmaskResponse,
    decode,
)
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.protocol import IntegerNoise, SumResult

log = logging.getLogger("worldlm_secure.ray")

# member step -> the message type it must answer with
EXPECTED: dict[str, type[Message]] = {
    "advertise": KeyAdvert,
    "share_keys": ShareKeys,
    "masked_input": MaskedInput,
    "confirm": SurvivorSignature,
    "unmask": UnmaskResponse,
}


def receive(member: str, step: str, data: object) -> Message:
    """The one entry point of member data into the aggregator: serialized bytes of the step's message type."""
    if not isinstance(data, bytes):
        raise SecAggError(f"{member}: step {step} returned {type(data).__name__}, not a serialized message; refused")
    msg = decode(data)
    want = EXPECTED[step]
    if not isinstance(msg, want):
        raise SecAggError(f"{member}: step {step} answered with {type(msg).__name__}, expected {want.__name__}; refused")
    sender = getattr(msg, "member", getattr(msg, "sender", member))
    if sender != member:
        raise SecAggError(f"{member}: step {step} message claims to come from {sender!r}; refused")
    return msg


def masked_sum(ray: Any, actors: Mapping[str, Any], identity_keys: Mapping[str, bytes], params: object,
               round_id: int, min_cohort: int, noise: IntegerNoise | None, dim: int,
               aggregator: NodeIdentity) -> SumResult:
    """One masked round among ``actors`` (site name -> actor handle, each with a prepared vector of ``dim``).

    ``identity_keys``: the members' raw Ed25519 public keys; ``aggregator``: the driver's identity, which
    signs every aggregator message (members check it); ``params``: the policy's masking section;
    ``noise``: the distributed DP shares each member adds before masking (None: no member noise).
    The result's ``dropped`` names every member that left the round, `stats.extra["dropped"]` says why.
    """
    names = sorted(actors)
    cfg = RoundConfig.build(params, round_id, names, identity_keys, min_cohort, noise, aggregator_key=aggregator.public_bytes)
    server = MaskingAggregator(cfg, aggregator)
    steps = StepLog()
    server_seconds = 0.0

    def members(step: str, args: Mapping[str, tuple]) -> list[Message]:
        out = []
        for m, data in run_step(ray, actors, step, args, steps, round_id).items():
            try:
                out.append(receive(m, step, data))
            except SecAggError as exc:  # a malformed or misattributed message: that member is out of the round
                steps.dropped[m] = f"{step}: {exc}"
                log.warning("round %d: %s", round_id, exc)
        return out

    def serve(fn: Any) -> dict[str, tuple[bytes]]:
        nonlocal server_seconds
        start = time.perf_counter()
        msgs: Mapping[str, Message] = fn()
        server_seconds += time.perf_counter() - start
        return {n: (m.to_bytes(),) for n, m in msgs.items() if n not in steps.dropped}

    adverts = members("advertise", {n: (cfg, noise) for n in names})
    keys = serve(lambda: server.collect_adverts(adverts))
    shares = members("share_keys", keys)
    deliveries = serve(lambda: server.collect_shares(shares))
    masked = members("masked_input", deliveries)
    lists = serve(lambda: server.collect_masked(masked))
    confirmations = members("confirm", lists)
    requests = serve(lambda: server.collect_signatures(confirmations))
    responses = members("unmask", requests)
    start = time.perf_counter()
    outcome = server.finish(responses)
    server_seconds += time.perf_counter() - start
    up = {n: steps.up.get(n, 0) for n in names}
    down = {n: steps.down.get(n, 0) for n in names}
    trace = RoundTrace(outcome, up, down, steps.member_seconds, server_seconds)
    if np.asarray(outcome.total).size != dim:
        raise SecAggError(f"round {round_id}: unmasked sum has {np.asarray(outcome.total).size} values, expected {dim}")
    result = round_result(cfg, names, dim, trace)
    if steps.dropped:
        result.stats.extra["dropped"] = " | ".join(f"{m}: {why}" for m, why in sorted(steps.dropped.items()))
    return result
