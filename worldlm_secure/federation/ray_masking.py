"""The aggregator side of a SecAgg+ round whose members are Ray actors: the driver only routes bytes.

Same steps as `secagg.masking.drive_round`, message for message, but each member step runs in the
site's actor (`site_actor.SiteActor`) and what comes back is the serialized message. Everything a
member sends enters the aggregator through `receive` (bytes -> the expected message type, from the
expected member): the driver never holds a member's vector, only its `MaskedInput`.
Costs are counted from the serialized sizes, as `MaskingSum` does, so bytes_up/bytes_down match it.
No dropouts are simulated here (every actor answers every step, or the round raises).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.secagg.masking import MaskingAggregator, RoundConfig, RoundTrace, round_result
from worldlm_secure.secagg.masking_messages import (
    KeyAdvert,
    MaskedInput,
    Message,
    ShareKeys,
    UnmaskResponse,
    decode,
)
from worldlm_secure.secagg.protocol import IntegerNoise, SumResult

# member step -> the message type it must answer with
EXPECTED: dict[str, type[Message]] = {
    "advertise": KeyAdvert,
    "share_keys": ShareKeys,
    "masked_input": MaskedInput,
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
               round_id: int, min_cohort: int, noise: IntegerNoise | None, dim: int) -> SumResult:
    """One masked round among ``actors`` (site name -> actor handle, each with a prepared vector of ``dim``).

    ``identity_keys``: the members' raw Ed25519 public keys; ``params``: the policy's masking section;
    ``noise``: the distributed DP shares each member adds before masking (None: no member noise).
    """
    names = sorted(actors)
    cfg = RoundConfig.build(params, round_id, names, identity_keys, min_cohort, noise)
    server = MaskingAggregator(cfg)
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    clock = {"member": 0.0, "server": 0.0}

    def members(step: str, args: Mapping[str, tuple]) -> list[Any]:
        start = time.perf_counter()
        refs = {n: getattr(actors[n], step).remote(*a) for n, a in args.items()}  # the members run in parallel
        out = []
        for n, ref in refs.items():
            data = ray.get(ref)
            up[n] += len(data) if isinstance(data, bytes) else 0
            out.append(receive(n, step, data))
        clock["member"] += time.perf_counter() - start  # wall time of the step (parallel members), not a sum
        return out

    def serve(fn: Any) -> dict[str, tuple[bytes]]:
        start = time.perf_counter()
        msgs: Mapping[str, Message] = fn()
        out = {n: (m.to_bytes(),) for n, m in msgs.items()}
        clock["server"] += time.perf_counter() - start
        for n, (data,) in out.items():
            down[n] += len(data)
        return out

    adverts = members("advertise", {n: (cfg, noise) for n in names})
    keys = serve(lambda: server.collect_adverts(adverts))
    shares = members("share_keys", keys)
    deliveries = serve(lambda: server.collect_shares(shares))
    masked = members("masked_input", deliveries)
    requests = serve(lambda: server.collect_masked(masked))
    responses = members("unmask", requests)
    start = time.perf_counter()
    outcome = server.finish(responses)
    clock["server"] += time.perf_counter() - start
    trace = RoundTrace(outcome, up, down, clock["member"], clock["server"])
    if np.asarray(outcome.total).size != dim:
        raise SecAggError(f"round {round_id}: unmasked sum has {np.asarray(outcome.total).size} values, expected {dim}")
    return round_result(cfg, names, dim, trace)
