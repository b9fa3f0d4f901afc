"""SecAgg+ members as Ray site actors: the `secagg.channel.Channel` the Ray backend's driver talks through.

The driver runs the one aggregator driver (`secagg.masking_round.aggregate`); each site actor runs the one
member session (`site_actor.SiteActor.masking`, a `MaskingSession`). This channel only carries bytes: a
member whose step fails (its actor raised or died: `ray_steps.run_step`) has dropped out from that step
on; SecAgg+ recovers its masks from the others' shares, and the round aborts (nothing released) only
when fewer than the threshold remain.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldlm_secure.federation.ray_steps import StepLog, run_step
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg.masking import MaskingAggregator, RoundConfig
from worldlm_secure.secagg.masking_round import aggregate, round_result
from worldlm_secure.secagg.protocol import IntegerNoise, SumResult


class RayChannel:
    """Each request goes to the member's actor method ``masking(data, config, noise)``; the round's first
    (empty) request also carries the round's public ``config`` and the DP ``noise`` shares to add."""

    def __init__(self, ray: Any, actors: Mapping[str, Any], config: RoundConfig, noise: IntegerNoise | None) -> None:
        self.ray, self.actors, self.config, self.noise = ray, actors, config, noise
        self.log = StepLog()

    @property
    def dropped(self) -> Mapping[str, str]:
        return self.log.dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        args = {m: (data, self.config, self.noise) if not data else (data,) for m, data in requests.items() if m not in self.log.dropped}
        return run_step(self.ray, self.actors, step, args, self.log, self.config.round_id, method="masking")


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
