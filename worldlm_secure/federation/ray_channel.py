"""Ray site actors as protocol members: the `secagg.channel.Channel` the Ray backend's driver talks through.

The driver runs each protocol's one aggregator driver (`secagg.masking_round.aggregate`,
`secagg.ckks_round.aggregate` via `ray_ckks`); each site actor runs the one member session
(`site_actor.SiteActor.masking`, a `MaskingSession`; `SiteActor.ckks`, a `CkksSession`). This channel only
carries bytes: a member whose step fails (its actor raised or died: `ray_steps.run_step`) has dropped out
from that step on; SecAgg+ recovers its masks from the others' shares, CKKS goes on without its
contribution, and the round aborts (nothing released) only when fewer than the threshold / min_cohort remain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from worldlm_secure.federation.ray_steps import StepLog, run_step
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.masking import MaskingAggregator, RoundConfig
from worldlm_secure.secagg.masking_round import aggregate, round_result
from worldlm_secure.secagg.protocol import IntegerNoise, SumResult


class RayChannel:
    """Each request goes to the member's actor method ``method`` (``masking(data, config, noise)`` by default);
    the first request a member gets in the round also carries ``opening`` (by default the round's public
    ``config`` and the DP ``noise`` shares to add; for CKKS the member's `ckks_round.CkksRoundSetup`).
    ``run``: the step runner (`ray_steps.run_step`; a backend passes its own module's, which tests patch)."""

    def __init__(self, ray: Any, actors: Mapping[str, Any], config: Any, noise: IntegerNoise | None = None, *,
                 method: str = "masking", opening: tuple | None = None, run: Callable[..., dict[str, Any]] | None = None) -> None:
        self.ray, self.actors, self.config, self.noise = ray, actors, config, noise
        self.method, self.opening, self.run = method, (config, noise) if opening is None else opening, run
        self.log = StepLog()
        self._opened: set[str] = set()

    @property
    def dropped(self) -> Mapping[str, str]:
        return self.log.dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        args = {}
        for m, data in requests.items():
            if m not in self.log.dropped:
                args[m] = (data,) if m in self._opened else (data, *self.opening)
                self._opened.add(m)
        return (self.run or run_step)(self.ray, self.actors, step, args, self.log, self.config.round_id, method=self.method)


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
    trace = aggregate(MaskingAggregator(cfg, aggregator), RayChannel(ray, actors, cfg, noise))
    return round_result(cfg, names, dim, trace)
