"""Sites as Ray actors: every site of a world is a long-lived Ray actor with its own CPUs (or GPU).

`RayEngine` is the in-process `Engine` with the sites moved out of the driver. Each site is one actor
(`site_actor.SiteActor`, ``cpus_per_site`` / ``gpus_per_site`` reserved) that holds its parameters,
optimizer state, sampling generator, data and its own `NodeIdentity`. Per round the driver asks every
actor to train (in parallel), then for each release of a federation's sites:

  driver (policies, aggregator): plan -> authorize -> budget check -> ask each site to prepare
  site actor (member):           weights -> w * delta -> clip to the DP norm -> encode -> protect
  driver (aggregator):           secure sum over serialized messages -> central noise -> charge -> ledgers

Each protocol runs its one member session in the actor (`SiteActor.masking`, `SiteActor.ckks`) and its
one aggregator driver in the driver, over a `ray_channel.RayChannel` (bytes only): under masking the
actor adds its distributed DP share itself; under CKKS the actor encrypts and signs its own contribution,
key-holder actors make the key epoch and decrypt, and the driver holds the public context only (`ray_ckks`). A member whose step fails has dropped out of that round
(`ray_steps`). The aggregates go back down to the actors;
evaluation runs in the actors and only perplexities come back. Same seed, same initial model, same
per-site generators: per-site results equal the in-process engine's (bit-identical for plain sums;
masked sums differ by masking's random rounding only; tests/test_ray_backend.py).

Not at the real boundary: the sites' authorization, budget trackers and signed ledgers (kept by the driver's
`ReleasePath` with the sites' keys); the federations' own releases (residuals, federation -> root) run
in the driver as before. Record-level DP-SGD (Opacus, `train.private`) runs in the site's actor; its
steps are accounted on the site's SITE/record stream by the driver, as the other budgets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import Engine, Tensors, _Site
from worldlm_secure.federation.ray_ckks import RayCkks
from worldlm_secure.federation.site_actor import ReleaseSpec, SiteActor
from worldlm_secure.identity import NodeIdentity


class RayEngine(Engine):
    """`Engine` whose sites are Ray actors (``cpus_per_site`` / ``gpus_per_site`` each) doing their member side.

    When the cluster has fewer CPUs than ``len(sites) * cpus_per_site``, each actor reserves an equal share
    of the cluster's CPUs instead (actors hold their reservation for their lifetime; a full reservation
    would leave some sites unscheduled forever); torch still gets ``int(cpus_per_site)`` threads.
    """

    def __init__(self, *args: Any, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0,
                 address: str | None = None, **kwargs: Any) -> None:
        # The in-process constructor also refuses, before any actor starts, a model Opacus cannot handle
        # when a site's policy asks for record-level DP-SGD; the actors then run DP-SGD themselves.
        super().__init__(*args, **kwargs)
        from dataclasses import replace

        from worldlm_secure.federation.ray_backend import ensure_ray

        self._ray = ensure_ray(address)
        # build_model's transformers (or peft) model; torch types attributes it does not know as Tensor | Module
        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        spec = replace(self.settings.model, vocab_size=embeddings.num_embeddings)
        config = (spec, self.settings.train, self.trainer.total_steps, self.settings.device,
                  max(1, int(cpus_per_site)), self.settings.seed)
        cluster = float(self._ray.cluster_resources().get("CPU", 0.0))
        cpus = min(cpus_per_site, cluster / len(self.sites)) if cluster > 0 else cpus_per_site
        actor = self._ray.remote(num_cpus=cpus, num_gpus=gpus_per_site)(SiteActor)
        self.actors: dict[str, Any] = {}
        for s in self.sites:
            self.actors[s.name] = actor.remote(s.name, config, s.params, s.train, s.val, s.generator.get_state())
            s.params = {}  # the driver keeps no copy of a site's model: the actor holds it
        # Public keys of the identities the actors generated for secure aggregation (keys stay in the actors).
        names = list(self.actors)
        self.secagg_keys: dict[str, bytes] = dict(zip(names, self._get([self.actors[n].public_key.remote() for n in names])))
        self._ckks = RayCkks(_Tap(self), self.secagg_keys)  # CKKS key epochs, one per federation
        self.site_seconds: dict[str, float] = {}
        self._aggregators: dict[str, NodeIdentity] = {}  # the driver plays each federation's aggregator

    def aggregator_identity(self, federation: str) -> NodeIdentity:
        """The identity that signs ``federation``'s aggregator messages (the driver plays that aggregator)."""
        return self._aggregators.setdefault(federation, NodeIdentity.generate(federation))

    def _get(self, refs: Any) -> Any:
        """Every result the driver takes from a site actor comes through here (tests instrument it)."""
        return self._ray.get(refs)

    def train_sites(self, round_id: int) -> float:
        steps = self.settings.train.local_steps
        start_step = (round_id - 1) * steps
        for held in self.record.values():  # refuse the whole round before any site trains (BudgetExceeded)
            held.check_round(steps)
        refs = {}
        for s in self.sites:
            stream = self.record.get(s.name)
            refs[s.name] = self.actors[s.name].train.remote(start_step, stream.params if stream is not None else None)
        losses = []
        for s in self.sites:  # sites finish in any order; results are taken in the engine's site order
            loss, seconds, taken = self._get(refs[s.name])
            if s.name in self.record:  # the site's DP-SGD steps, charged on its next release (driver's accounting)
                self.record[s.name].add_steps(taken)
            self.site_seconds[s.name] = self.site_seconds.get(s.name, 0.0) + seconds
            losses.append(loss)
            if self.on_site:
                self.on_site(s.name, round_id)
        return float(np.nanmean(losses)) if not np.all(np.isnan(losses)) else float("nan")

    def _sites_round(
        self, round_id: int, group: str, fed: str, server: Tensors, sites: list[_Site], names: list[str], final: str,
        weighting: str,
    ) -> Tensors:
        n_max = self.example_scale(sites)  # the same public rule as in process (under DP no weight reads another site)
        actors = {s.name: self.actors[s.name] for s in sites}

        def remote(rid: int, secure: Any, plan: Any, noise: Any, clip: float | None, dim: int) -> Any:
            # Runs after the driver authorized the release and checked the budgets: now the sites compute it.
            spec = ReleaseSpec(tuple(names), weighting, n_max, self.settings.attention, clip)
            lengths = self._get([a.prepare.remote(spec) for a in actors.values()])
            if set(lengths) != {dim}:
                raise ConfigError(f"{fed}: sites prepared vectors of lengths {sorted(set(lengths))}, expected {dim}")
            if plan.protocol == "masking":
                from worldlm_secure.federation import ray_channel

                keys = {n: self.secagg_keys[n] for n in actors}
                return ray_channel.masked_sum(_Tap(self), actors, keys, plan.params, rid, plan.min_cohort, noise, dim,
                                              self.aggregator_identity(fed))
            if plan.protocol == "ckks":
                return self._ckks.secure_sum(fed, secure, actors, rid, plan.min_cohort, dim)
            # none: the plain vector is what the network carries under that policy
            return dict(zip(actors, self._get([a.plain.remote() for a in actors.values()])))

        shapes = {n: server[n].shape for n in names}
        avg = self.release.average_remote(round_id, group, fed, list(actors), names, shapes, remote, final_destination=final)
        return {n: server[n] + avg[n] for n in names}

    def broadcast(self) -> None:
        refs = []
        for s in self.sites:
            down: dict[str, torch.Tensor] = {**self.fed_key[s.aggregator], **self.fed_shared[s.aggregator]}
            refs.append(self.actors[s.name].receive.remote(down))
        self._get(refs)

    def evaluate(self) -> dict[str, float]:
        ppl = self._get([self.actors[s.name].evaluate.remote() for s in self.sites])
        return {s.name: float(p) for s, p in zip(self.sites, ppl)}

    def shutdown(self) -> None:
        """End this engine's site actors (their models and data leave Ray's memory with them)."""
        for a in self.actors.values():
            self._ray.kill(a)
        self.actors = {}


class _Tap:
    """The `ray` module as `ray_channel` uses it (``get``), routed through `RayEngine._get`."""

    def __init__(self, engine: RayEngine) -> None:
        self._engine = engine

    def get(self, refs: Any) -> Any:
        return self._engine._get(refs)
