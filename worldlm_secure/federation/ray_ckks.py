"""The aggregator side of CKKS rounds whose members and key holders are Ray site actors.

The roles are `secagg.ckks`'s (protocols/ckks.md): every member encrypts and signs its own contribution
in its actor (`SiteActor.ckks_protect`); the key holders (the policy's ``ckks.key_holders`` among the
federation's sites; by default the first site in sorted order) make the key epoch and decrypt in their
actors; the driver runs `CkksAggregator`, which only ever holds the public context, and routes bytes
(`secagg.ckks_messages`). A key epoch lasts ``rotate_every_rounds`` rounds, as in process:

    holders:   ckks_transport_key()             -> identity-signed X25519 transport key
    generator: ckks_generate(certs)             -> public context signed + secret key sealed to each holder
    members:   ckks_install(epoch, only theirs) -- verify the public context; holders unwrap their key
    members:   ckks_protect(spec)               -> signed ciphertexts; the driver checks and adds them
    holders:   ckks_decrypt(sum, spec)          -> re-add the signed contributions (>= min_cohort, each
                                                   verified), decrypt: integer sums + signed confirmation

A member whose step fails, or whose contribution does not verify, is left out (named in the result);
the round releases only when at least ``min_cohort`` contributed and a key holder confirmed the sum.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.federation.ray_steps import StepLog, run_step
from worldlm_secure.secagg import ckks_messages as wire
from worldlm_secure.secagg.ckks import (
    CkksAggregator,
    CkksRoundTrace,
    CkksSecureSum,
    CkksSumResult,
    DecryptedAggregate,
    EpochTrust,
    RoundSpec,
    round_result,
    verify_aggregate,
)
from worldlm_secure.secagg.ckks_keys import EpochKeys


@dataclass(frozen=True)
class _Epoch:
    """The driver's view of a key epoch: the public keys message, the aggregator, who holds the secret key."""

    number: int
    keys: EpochKeys
    aggregator: CkksAggregator
    holders: tuple[str, ...]


class RayCkks:
    """The driver's side of CKKS among site actors, one key epoch per destination (federation).

    ``ray``: anything with Ray's ``get``; ``identity_keys``: each site's raw Ed25519 public key (its
    private key never leaves its actor).
    """

    def __init__(self, ray: Any, identity_keys: Mapping[str, bytes]) -> None:
        self._ray = ray
        self._keys = dict(identity_keys)
        self._epochs: dict[str, _Epoch] = {}

    def secure_sum(self, destination: str, secure: CkksSecureSum, actors: Mapping[str, Any], round_id: int,
                   min_cohort: int, dim: int) -> CkksSumResult:
        """One CKKS round of ``actors`` (each holding a prepared vector of ``dim`` values) toward ``destination``."""
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
        steps = StepLog()
        number = secure.epoch_of(round_id)
        epoch = self._epochs.get(destination)
        new_epoch = epoch is None or epoch.number != number
        if new_epoch:
            epoch = self._epochs[destination] = self._ceremony(params, number, holders, actors, steps, round_id)
        assert epoch is not None
        spec = RoundSpec.plan(params, round_id, epoch.keys.key_id, dim, names, min_cohort)
        agg = epoch.aggregator
        agg.open_round(spec)
        sent = run_step(self._ray, actors, "ckks_protect", {m: (spec,) for m in names if m not in steps.dropped},
                        steps, round_id)
        start = time.perf_counter()
        up = []
        for m in sorted(sent):
            try:
                c = wire.contribution_from(wire.decode(sent[m]))
            except SecAggError as exc:
                steps.dropped[m] = f"ckks_protect: not a CKKS contribution ({exc})"
                continue
            if c.member != m:
                steps.dropped[m] = f"ckks_protect: contribution signed as {c.member!r}"
                continue
            up.append(c.nbytes)
            agg.receive(c, self._keys[m])
        rejected = tuple(str(e) for e in agg.rejected) + tuple(f"{m}: {why}" for m, why in sorted(steps.dropped.items()))
        if len(agg.contributors) < max(min_cohort, 1):
            detail = f"; left out: {' | '.join(rejected)}" if rejected else ""
            raise SecAggError(
                f"round {round_id}: only {len(agg.contributors)} of {len(names)} members contributed, below "
                f"min_cohort={min_cohort}; nothing was released{detail}"
            )
        summed = agg.summed()
        server_seconds = time.perf_counter() - start
        member_seconds = steps.member_seconds
        body = wire.summed_bytes(summed, dim)
        answers = run_step(self._ray, actors, "ckks_decrypt",
                           {h: (body, spec) for h in epoch.holders if h not in steps.dropped}, steps, round_id)
        results = {}
        for h, data in answers.items():
            try:
                results[h] = wire.decrypted_from(wire.decode(data))
            except SecAggError as exc:
                steps.dropped[h] = f"ckks_decrypt: not a decryption ({exc})"
        if not results:
            raise SecAggError(f"round {round_id}: no key holder ({', '.join(epoch.holders)}) decrypted the sum; nothing released")
        online = tuple(sorted(results))
        aggregate = DecryptedAggregate(round_id, epoch.keys.key_id, summed.contributors, results[online[0]][0], online[0],
                                       tuple(results[h][1] for h in online))
        verify_aggregate(aggregate, self._keys, online)  # every holder that answered confirms the same sums
        trace = CkksRoundTrace(spec, epoch.keys.key_id, epoch.keys.public_context, number, new_epoch, tuple(holders),
                               online, aggregate, rejected, agg.clipped, tuple(up), member_seconds, server_seconds,
                               steps.member_seconds - member_seconds)
        return round_result(params, names, trace)

    def _ceremony(self, params: Any, number: int, holders: tuple[str, ...], actors: Mapping[str, Any], steps: StepLog,
                  round_id: int) -> _Epoch:
        """A new key epoch made by the holders' actors; the driver gets only public material and sealed keys."""
        answers = run_step(self._ray, actors, "ckks_transport_key", {h: () for h in holders}, steps, round_id)
        certs = {}
        for h, data in answers.items():
            try:
                cert = wire.cert_from(wire.decode(data))
            except SecAggError as exc:
                steps.dropped[h] = f"ckks_transport_key: not a transport key ({exc})"
                continue
            if cert.holder != h or not cert.verify(self._keys[h]):
                steps.dropped[h] = "ckks_transport_key: transport key not signed by its identity"
                continue
            certs[h] = cert
        if not certs:
            raise SecAggError(f"round {round_id}: no key holder ({', '.join(holders)}) sent a valid transport key; nothing released")
        generator = sorted(certs)[0]
        made = run_step(self._ray, actors, "ckks_generate",
                        {generator: (params, number, wire.certs_bytes([certs[h] for h in sorted(certs)]),
                                     {h: self._keys[h] for h in certs})}, steps, round_id)
        if generator not in made:
            raise SecAggError(f"round {round_id}: key generator {generator!r} made no key epoch; nothing released")
        try:
            keys = wire.epoch_from(wire.decode(made[generator]))
        except SecAggError as exc:
            raise SecAggError(f"round {round_id}: key epoch from {generator!r} is malformed ({exc}); nothing released") from None
        if keys.generator != generator or keys.epoch != number or set(keys.wrapped) != set(certs):
            raise SecAggError(f"round {round_id}: key epoch from {generator!r} is not for this epoch's holders; nothing released")
        aggregator = CkksAggregator(keys, self._keys[generator], params)  # verifies the signature, refuses secret keys
        # Each actor checks the epoch itself (`CkksMember.install` / `CkksKeyHolder.install`: the generator is
        # a key holder the policy names, its signature verifies); a holder keeps ``trust`` to check sums.
        trust = EpochTrust(tuple(holders), dict(self._keys))
        run_step(self._ray, actors, "ckks_install",
                 {m: (wire.epoch_bytes(keys, only=m), trust) for m in sorted(actors)}, steps, round_id)
        return _Epoch(number, keys, aggregator, tuple(sorted(certs)))
