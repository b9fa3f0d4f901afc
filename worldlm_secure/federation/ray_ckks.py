"""The aggregator side of CKKS rounds whose members and key holders are Ray site actors.

The driver runs the one aggregator driver (`secagg.ckks_round.aggregate`: key-epoch ceremony, contributions,
the holders' decryption) over a `RayChannel`; each site actor runs the one member session
(`SiteActor.ckks`, a `CkksSession` over the actor's own keys). The key holders are the policy's
``ckks.key_holders`` among the federation's sites (by default the first site in sorted order); a key epoch
lasts ``rotate_every_rounds`` rounds, as in process; the driver keeps one epoch per destination and only
ever holds its public context. A member whose step fails, or whose contribution does not verify, is left
out (named in the result); the round releases only when at least ``min_cohort`` contributed and a key
holder confirmed the sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.ray_channel import RayChannel
from worldlm_secure.federation.ray_steps import run_step
from worldlm_secure.secagg.ckks import CkksSumResult, EpochTrust
from worldlm_secure.secagg.ckks_round import CkksEpoch, CkksRoundSetup, CkksSecureSum, aggregate, round_result


class RayCkks:
    """The driver's side of CKKS among site actors, one key epoch per destination (federation).

    ``ray``: anything with Ray's ``get``; ``identity_keys``: each site's raw Ed25519 public key (its
    private key never leaves its actor).
    """

    def __init__(self, ray: Any, identity_keys: Mapping[str, bytes]) -> None:
        self._ray = ray
        self._keys = dict(identity_keys)
        self._epochs: dict[str, CkksEpoch] = {}

    def secure_sum(self, destination: str, secure: CkksSecureSum, actors: Mapping[str, Any], round_id: int,
                   min_cohort: int, dim: int) -> CkksSumResult:
        """One CKKS round of ``actors`` (each holding a prepared vector of ``dim`` values) toward ``destination``.

        The driver hands each actor its `CkksRoundSetup` (the named holders and the sites' keys: the actors
        have no trust root of their own on Ray, so their checks guard against faults, not a malicious driver)."""
        params = secure.params
        names = sorted(actors)
        params.check_cohort(len(names))
        holders = secure.holder_names(names)
        outside = [h for h in holders if h not in actors]
        if outside:
            raise ConfigError(
                f"{destination}: secure_aggregation.ckks.key_holders names {', '.join(outside)}, not a site of this "
                f"federation; on Ray the key holders must be its sites (use [members] or name sites of {destination})"
            )
        setup = CkksRoundSetup(params, round_id, secure.epoch_of(round_id), tuple(names), max(min_cohort, 1),
                               EpochTrust(tuple(holders), dict(self._keys)))
        channel = RayChannel(self._ray, actors, setup, method="ckks", opening=(setup,), run=run_step)
        trace, self._epochs[destination] = aggregate(setup, channel, self._epochs.get(destination), n_values=dim)
        return round_result(params, names, trace)
