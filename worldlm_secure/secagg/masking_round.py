"""One SecAgg+ round over any `Channel`: the member session and the aggregator driver, each written once.

`masking.MaskingMember` and `masking.MaskingAggregator` are the protocol's state machines (every key,
share and check). This module runs them over a channel:

  member      `MaskingSession.handle(bytes) -> bytes`: decodes the aggregator's request by its SecAgg+
              tag and answers with the member's next message. The member's checks all happen inside
              `MaskingMember`; the session adds only the caller's hooks: ``before_input`` (the ledger
              entry, written before the masked input leaves) and ``before_reveal`` (a deployed member's
              memory of the sums its update went into, `protocol.BeforeReveal`).
  aggregator  `aggregate(cfg, identity, channel)`: the five steps of `STEPS`, each one exchange; every
              answer enters through `receive` (the step's message type, from the member it came from).

The same two run in-process (`drive_round`, `MaskingSum`), on Ray actors (`federation.ray_channel`) and
between nodes over gRPC/mTLS (`node.link`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.channel import Channel, InMemoryChannel
from worldlm_secure.secagg.masking import (
    Entropy,
    MaskingAggregator,
    MaskingMember,
    MaskingOutcome,
    RoundConfig,
    round_quantization,
)
from worldlm_secure.secagg.masking_messages import (
    AggregatorMessage,
    KeyAdvert,
    MaskedInput,
    Message,
    NeighbourKeys,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    decode,
)
from worldlm_secure.secagg.protocol import BeforeReveal, DropoutPlan, IntegerNoise, MemberInput, ProtectionStats, SecureSum, SumResult
from worldlm_secure.secagg.quantize import QuantizationSpec

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

# step -> the message type a member must answer it with, in protocol order
STEPS: dict[str, type[Message]] = {
    "advertise": KeyAdvert,
    "share_keys": ShareKeys,
    "masked_input": MaskedInput,
    "confirm": SurvivorSignature,
    "unmask": UnmaskResponse,
}


class MemberSteps(Protocol):
    """The five steps of one member (`masking.MaskingMember`; tests substitute malicious ones)."""

    def advertise(self) -> KeyAdvert: ...
    def share_keys(self, msg: NeighbourKeys) -> ShareKeys: ...
    def masked_input(self, msg: ShareDelivery, vector: np.ndarray) -> MaskedInput: ...
    def confirm(self, msg: SurvivorList) -> SurvivorSignature: ...
    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse: ...


class MaskingSession:
    """One member's side of one masked round: aggregator request bytes in, the member's answer bytes out.

    ``vector``: called once, when the masked input is due (so a site hands over its release only then);
    ``before_input(advertised)``: runs right before the masked input leaves (the member's ledger entry);
    ``before_reveal(survivors)``: runs after the unmask request passed every check and before the shares that
    complete the sum over ``survivors`` leave (`protocol.BeforeReveal`; it may refuse).
    Out-of-order, repeated, unsigned or inconsistent requests are refused by `MaskingMember` itself."""

    def __init__(
        self,
        member: MemberSteps,
        vector: Callable[[], np.ndarray],
        before_input: Callable[[tuple[str, ...]], None] | None = None,
        before_reveal: BeforeReveal | None = None,
    ) -> None:
        self.member = member
        self._vector = vector
        self._before_input = before_input
        self._before_reveal = before_reveal
        self._advertised: tuple[str, ...] = ()

    def handle(self, data: bytes) -> bytes:
        if not data:
            return self.member.advertise().to_bytes()
        msg = decode(data)
        if not isinstance(msg, AggregatorMessage):
            raise SecAggError(f"round {msg.round_id}: a {type(msg).__name__} is not an aggregator request; refused")
        if isinstance(msg, NeighbourKeys):
            self._advertised = tuple(msg.advertised)
            return self.member.share_keys(msg).to_bytes()
        if isinstance(msg, ShareDelivery):
            masked = self.member.masked_input(msg, self._vector())
            if self._before_input is not None:
                self._before_input(self._advertised)
            return masked.to_bytes()
        if isinstance(msg, SurvivorList):
            return self.member.confirm(msg).to_bytes()
        if isinstance(msg, UnmaskRequest):
            shares = self.member.unmask(msg)
            if self._before_reveal is not None:
                self._before_reveal(tuple(sorted(msg.survivors)))
            return shares.to_bytes()
        raise SecAggError(f"round {msg.round_id}: unexpected aggregator request {type(msg).__name__}; refused")


def receive(member: str, step: str, data: object) -> Message:
    """The one entry point of member data into the aggregator: serialized bytes of the step's message type,
    attributed to the member the channel received it from."""
    if not isinstance(data, bytes):
        raise SecAggError(f"{member}: step {step} returned {type(data).__name__}, not a serialized message; refused")
    msg = decode(data)
    want = STEPS[step]
    if not isinstance(msg, want):
        raise SecAggError(f"{member}: step {step} answered with {type(msg).__name__}, expected {want.__name__}; refused")
    sender = getattr(msg, "member", getattr(msg, "sender", member))
    if sender != member:
        raise SecAggError(f"{member}: step {step} message claims to come from {sender!r}; refused")
    return msg


@dataclass
class RoundTrace:
    """What a masked round produced, with every message's serialized size and the time spent."""

    outcome: MaskingOutcome
    bytes_up: dict[str, int]  # member -> bytes it sent
    bytes_down: dict[str, int]  # member -> bytes it received
    member_seconds: float  # time spent in the channel's exchanges (in-process: summed over members)
    server_seconds: float
    wire: list[tuple[str, bytes]] = field(default_factory=list)  # (sender, encoded message), if recorded
    dropped: dict[str, str] = field(default_factory=dict)  # member -> the step it left at, and why
    refused: dict[str, str] = field(default_factory=dict)  # members whose answer the aggregator refused, why


def aggregate(
    server: MaskingAggregator,
    channel: Channel,
    *,
    first_timeout: float | None = None,
    step_timeout: float | None = None,
    record: bool = False,
) -> RoundTrace:
    """Run the aggregator's side of one round over ``channel`` (``server``: this round's state machine, with
    the identity that signs every request). ``first_timeout`` bounds the wait for key adverts (members may
    still be training), ``step_timeout`` each later step (seconds; None: as long as the channel allows).
    Aborts with `SecAggError` (nothing released) as `MaskingAggregator` decides."""
    cfg = server.cfg
    up = dict.fromkeys(cfg.roster, 0)
    down = dict.fromkeys(cfg.roster, 0)
    wire: list[tuple[str, bytes]] = []
    refused: dict[str, str] = {}
    clock = {"member": 0.0, "server": 0.0}

    def step(name: str, requests: Mapping[str, bytes], timeout: float | None, cls: type[M]) -> list[M]:
        for m, data in requests.items():
            down[m] += len(data)
            if record and data:
                wire.append(("aggregator", data))
        start = time.perf_counter()
        answers = channel.exchange(name, requests, timeout)
        clock["member"] += time.perf_counter() - start
        out: list[M] = []
        for m in requests:
            if m not in answers:
                continue
            data = answers[m]
            up[m] += len(data) if isinstance(data, bytes) else 0
            if record and isinstance(data, bytes):
                wire.append((m, data))
            try:
                msg = receive(m, name, data)
            except SecAggError as exc:  # malformed or misattributed: that member is out of the round
                refused[m] = f"{name}: {exc}"
                log.warning("round %d: %s", cfg.round_id, exc)
                continue
            assert isinstance(msg, cls)  # receive checked it against STEPS[name]
            out.append(msg)
        return out

    def serve(fn: Callable[[], Mapping[str, AggregatorMessage]]) -> dict[str, bytes]:
        start = time.perf_counter()
        out = {m: msg.to_bytes() for m, msg in fn().items() if m not in refused}
        clock["server"] += time.perf_counter() - start
        return out

    adverts = step("advertise", dict.fromkeys(cfg.roster, b""), first_timeout, KeyAdvert)
    keys = serve(lambda: server.collect_adverts(adverts))
    shares = step("share_keys", keys, step_timeout, ShareKeys)
    deliveries = serve(lambda: server.collect_shares(shares))
    masked = step("masked_input", deliveries, step_timeout, MaskedInput)
    lists = serve(lambda: server.collect_masked(masked))
    signatures = step("confirm", lists, step_timeout, SurvivorSignature)
    requests = serve(lambda: server.collect_signatures(signatures))
    responses = step("unmask", requests, step_timeout, UnmaskResponse)
    start = time.perf_counter()
    outcome = server.finish(responses)
    clock["server"] += time.perf_counter() - start
    dropped = {**dict(channel.dropped), **refused}
    return RoundTrace(outcome, up, down, clock["member"], clock["server"], wire, dropped, refused)


# ---- in-process ------------------------------------------------------------------------------------


def drive_round(
    members: Mapping[str, MemberSteps],
    server: MaskingAggregator,
    vectors: Mapping[str, np.ndarray],
    dropouts: DropoutPlan = DropoutPlan(),
    *,
    record: bool = False,
) -> RoundTrace:
    """Run one round among in-process members over an `InMemoryChannel`; every message goes through bytes.

    Members in ``dropouts`` vanish at their stage: before advertising keys, after sharing keys, or after
    sending their masked input (they then never sign the survivor list nor answer the unmask request).
    A member that refuses a request raises here (`SecAggError`): in-process, a refusal stops the round."""
    sessions = {n: MaskingSession(m, partial(vectors.__getitem__, n)) for n, m in members.items()}
    silent = {
        "advertise": dropouts.before_keys,
        "masked_input": dropouts.after_keys,
        "confirm": dropouts.after_input,
    }
    return aggregate(server, InMemoryChannel(sessions, silent), record=record)


class MaskingSum(SecureSum):
    """SecAgg+ among in-process members, each with its own identity and keys; messages go through bytes.

    ``identities`` maps member name -> NodeIdentity. If it is None, fresh identities are generated for
    the members on first sight and reused in later rounds (fine for simulation, not for a deployment,
    where identities come from the node keys). A member missing from a given mapping is a ConfigError.
    """

    name = "masking"
    carries_integer_noise = True

    def __init__(
        self,
        params: object,
        identities: Mapping[str, NodeIdentity] | None = None,
        *,
        entropy: Entropy = os.urandom,
        **_ignored: object,
    ) -> None:
        if getattr(params, "clip_range", None) is None:
            raise ConfigError("secure_aggregation.masking.clip_range: required (values are quantized within it)")
        self.params = params
        self._generate = identities is None
        self.identities: dict[str, NodeIdentity] = dict(identities or {})
        self._entropy = entropy
        self.aggregator = NodeIdentity.generate("aggregator")  # signs what the in-process aggregator sends

    def quantization(self, n_members: int, noise: IntegerNoise | None = None) -> QuantizationSpec:
        """The fixed-point spec a round of ``n_members`` uses (its scale sizes distributed DP noise)."""
        return round_quantization(self.params, n_members, noise)

    def _identity(self, member: str) -> NodeIdentity:
        if member not in self.identities:
            if not self._generate:
                raise ConfigError(f"secagg masking: no Ed25519 identity for member {member!r}; issue it a node key")
            self.identities[member] = NodeIdentity.generate(member)
        return self.identities[member]

    def run_round(
        self,
        round_id: int,
        inputs: Sequence[MemberInput],
        *,
        min_cohort: int,
        dropouts: DropoutPlan = DropoutPlan(),
        noise: IntegerNoise | None = None,
    ) -> SumResult:
        """As `SecureSum.run_round`; with ``noise`` every member adds its distributed DP share before masking."""
        names = [m.member for m in inputs]
        sizes = {np.asarray(m.vector).shape for m in inputs}
        if not inputs or len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise SecAggError(f"round {round_id}: members must submit 1-D vectors of one length (got shapes {sorted(sizes)})")
        ids = {n: self._identity(n) for n in names}
        cfg = RoundConfig.build(
            self.params, round_id, names, {n: i.public_bytes for n, i in ids.items()}, min_cohort, noise,
            aggregator_key=self.aggregator.public_bytes,
        )
        members = {n: MaskingMember(ids[n], cfg, entropy=self._entropy, noise=noise) for n in names}
        trace = drive_round(members, MaskingAggregator(cfg, self.aggregator), {m.member: m.vector for m in inputs}, dropouts)
        return round_result(cfg, names, next(iter(sizes))[0], trace)


def round_result(cfg: RoundConfig, names: Sequence[str], dim: int, trace: RoundTrace) -> SumResult:
    """A masked round's `SumResult`: the sum, who is in it, and its costs (bytes from the serialized messages).

    ``names``: the invited members in order; ``dim``: the input vector's length (before the clip-report word).
    Every channel's caller builds its result here; ``stats.extra["dropped"]`` names who left and why."""
    outcome, up, down = trace.outcome, trace.bytes_up, trace.bytes_down
    contributors = outcome.contributors
    if np.asarray(outcome.total).size != dim:
        raise SecAggError(f"round {cfg.round_id}: unmasked sum has {np.asarray(outcome.total).size} values, expected {dim}")
    stats = ProtectionStats(
        protocol=MaskingSum.name,
        # what one contributing member sends and receives, averaged over the contributors
        bytes_up_per_member=sum(up[n] for n in contributors) / len(contributors),
        bytes_down_per_member=sum(down[n] for n in contributors) / len(contributors),
        expansion=cfg.quant.wire_bytes * (dim + 1) / (4.0 * max(1, dim)),
        clipped_fraction=outcome.clipped_fraction,
        member_seconds=trace.member_seconds,
        server_seconds=trace.server_seconds,
        extra={
            "neighbours": float(cfg.neighbours),
            "threshold": float(outcome.threshold or cfg.threshold),
            "bits": float(cfg.quant.bits),
            "clip_range": cfg.quant.clip_range,
            "scale": cfg.quant.scale,
            "quantization_error_bound": cfg.quant.sum_error_bound(len(outcome.contributors)),
            "recovered_mask_keys": float(outcome.recovered_mask_keys),
            "bytes_up_total": float(sum(up.values())),  # including members that dropped
            "bytes_down_total": float(sum(down.values())),
        },
    )
    if trace.dropped:
        stats.extra["dropped"] = " | ".join(f"{m}: {why}" for m, why in sorted(trace.dropped.items()))
    return SumResult(
        total=outcome.total,
        contributors=tuple(n for n in names if n in outcome.contributors),
        dropped=tuple(n for n in names if n not in outcome.contributors),
        stats=stats,
    )
