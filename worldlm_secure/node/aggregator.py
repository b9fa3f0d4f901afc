"""What federations and the root share: serving children over mTLS and running one aggregation round
at a time on the board (announce -> secure sum -> noise -> decode), with durable round ids."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from collections.abc import Callable, Sequence

import torch

from worldlm_secure.errors import ConfigError, SecAggError, TransportError
from worldlm_secure.node.board import NodeBoard
from worldlm_secure.node.rounds import Phase, ckks_round, masking_config
from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import WorldContext
from worldlm_secure.node.link import LinkOutcome, Liveness, aggregate_round
from worldlm_secure.node.receipts import AggregatorReceipts
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState, write_atomic
from worldlm_secure.secagg import IntegerNoise
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport import keys
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.tls import NodeCredentials, Roster

log = logging.getLogger("worldlm_secure.node")
Event = Callable[..., None]


class Aggregator:
    """The serving half of a federation or the root."""

    def __init__(self, cfg: NodeConfig, ctx: WorldContext, release: NodeRelease, state: NodeState, emit: Event) -> None:
        assert cfg.serve is not None
        self.cfg, self.ctx, self.release, self.state, self.emit = cfg, ctx, release, state, emit
        self.name = cfg.name
        roster = Roster.load(cfg.serve.roster)
        self.members = ctx.members(self.name)
        unknown = [m for m in self.members if m not in roster]
        if unknown:
            raise TransportError(f"{cfg.serve.roster}: children {unknown} of {self.name!r} in {ctx.world.path} are not on the roster; add them, one name per line")
        self.identity = release.path.identities[self.name]  # signs the messages this aggregator sends members
        credentials = NodeCredentials.load(cfg.serve.credentials)
        # Members take the aggregator's key from this certificate (the announcement carries it): it must be ours.
        if keys.signing_key_of(credentials.certificate) != self.identity.public_bytes:
            raise ConfigError(f"{cfg.serve.credentials}: the certificate does not bind {self.name!r}'s signing key; "
                              "re-issue it with `keys issue --signing-key` and the node's signing.key")
        self.board = NodeBoard(self.name, start_round=int(state.get("link_round", 0)))
        # Members send their ledger head with their update; this node countersigns it in its own ledger and
        # returns the receipt (protocols/ledger.md §7). link round -> (world round, phase) it was announced for.
        self._phases: dict[int, tuple[int, str]] = {}
        if release.path.ledger_dir is not None:
            ledger = release.path.ledger(self.name)  # opened here, in the main thread; thread-safe after
            self.board.countersigner = AggregatorReceipts(ledger, self._phases.get)
        self.server = FederationServer(
            credentials, roster, self.board,
            ServerConfig(bind=cfg.serve.listen, heartbeat_seconds=max(1, int(cfg.timeouts.heartbeat))),
        )
        self.live = Liveness(self.board, silent_after=cfg.timeouts.silent_after)

    def start(self) -> None:
        self.server.start()
        write_atomic(self.cfg.state / "address", (self.server.target + "\n").encode())
        self.emit("listening", address=self.server.target)

    def stop(self) -> None:
        self.server.stop(grace=1.0)

    def wait_for_members(self) -> dict[str, int]:
        """Every child enrolled and told us its example count (or the enroll timeout passed). After a
        restart members enroll again (their next call is refused NOT_ENROLLED, and they re-enroll)."""
        deadline = time.monotonic() + self.cfg.timeouts.enroll
        ready = lambda m: m in self.board.examples and m in self.board.members  # noqa: E731
        while time.monotonic() < deadline:
            if all(ready(m) for m in self.members):
                break
            time.sleep(0.2)
        missing = [m for m in self.members if not ready(m)]
        if missing:
            self.emit("members_missing", members=missing)
        return dict(self.board.examples)

    def cohort(self) -> tuple[str, ...]:
        """Enrolled children whose heartbeats are current: the members invited to the next round."""
        enrolled = self.board.members
        return tuple(m for m in self.members if m in enrolled and self.live.alive(m))

    def announce(self, phase: Phase, model: Payload | None, protocol: str, cohort: Sequence[str]) -> Announcement:
        rid = self.state.next_link_round()  # persisted before use: ids never repeat across restarts
        # members refuse a round of another base model, and a served model other than the announced one
        phase = replace(phase, base=self.ctx.base_hash or "", model=model.sha256().hex() if model is not None else "")
        deadline = int((time.time() + self.cfg.timeouts.train) * 1000)
        ann = Announcement(rid, tuple(cohort), protocol, phase.to_bytes(), deadline, aggregator_key=self.identity.public_bytes)
        self._phases[rid] = (phase.world_round, phase.phase)
        self.board.announce(ann, model)
        held = set(self.board.rounds_held())  # pruned with the board: receipts only for rounds it still holds
        for old in [r for r in self._phases if r != rid and r not in held]:
            self._phases.pop(old, None)
        ann = self.board.announcement(rid) or ann  # with the cohort's enrolled signing keys filled in
        self.emit("announced", round=phase.world_round, phase=phase.phase, link_round=rid, cohort=len(cohort))
        return ann

    def run_phase(self, phase: Phase, model: Payload | None, final: str,
                  noise_for: Callable[[Sequence[str]], IntegerNoise | None] | None = None
                  ) -> tuple[LinkOutcome, Announcement] | None:
        """Announce ``phase`` to the live children and aggregate their releases; None if the round aborted.
        ``noise_for(cohort)``: the distributed DP noise the members add (sizes the quantizer), or None."""
        cohort = self.cohort()
        plan = self.release.plan(self.members, final)
        ann = self.announce(phase, model, plan.protocol, cohort)
        try:
            if len(cohort) < plan.min_cohort:
                raise SecAggError(f"only {len(cohort)} live members, below min_cohort={plan.min_cohort}")
            noise = noise_for(ann.cohort) if noise_for is not None else None
            out = aggregate_round(
                self.board, ann, masking_config(plan, ann, noise), plan.min_cohort, identity=self.identity,
                first_timeout=self.cfg.timeouts.train, step_timeout=self.cfg.timeouts.step, live=self.live,
                ckks=ckks_round(plan, ann),
            )
        except SecAggError as exc:
            self.emit("aborted", round=phase.world_round, phase=phase.phase, error=str(exc))
            return None
        self.emit("aggregated", round=phase.world_round, phase=phase.phase, contributors=len(out.contributors),
                  dropped=list(out.dropped), bytes_up=out.bytes_up, rejected=list(out.rejected))
        return out, ann

    def weighted(self, phase: Phase, model: Payload | None, final: str, server: dict[str, torch.Tensor],
                 names: list[str], *, derived: bool) -> dict[str, torch.Tensor] | None:
        """server + the members' weighted average delta (the engine's `_weighted_round`); None if aborted.
        Under adaptive clipping the round announces this aggregator's clip of the stream (`Phase.clip`)."""
        shapes = {n: server[n].shape for n in names}
        stream = (self.name, phase.phase)
        if not derived:
            phase = replace(phase, clip=self.release.announced_clip(*stream))
        noise_for = None if derived else (lambda cohort: self.release.member_noise(cohort, final, names, shapes, stream))
        got = self.run_phase(phase, model, final, noise_for)
        if got is None:
            return None
        out, ann = got
        avg = self.release.finish_average(out.total, ann.cohort, final, names, shapes, derived=derived, stream=stream,
                                          contributors=len(out.contributors))
        return {n: server[n] + avg[n] for n in names}

    def finish(self, phase: Phase, model: Payload) -> None:
        """Announce the final broadcast and wait until every live child said it is done (bounded)."""
        self.announce(phase, model, "none", self.members)
        deadline = time.monotonic() + self.cfg.timeouts.train
        while time.monotonic() < deadline:
            if all(m in self.board.done or not self.live.alive(m) for m in self.members):
                return
            time.sleep(0.2)
