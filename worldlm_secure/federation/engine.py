"""The in-process engine: one round loop that runs WorldLM and every baseline on a world.

A round, for every method (see protocols/worldlm.md for the equations):
  1. every site trains locally from its current model (DP-SGD when its policy is record-level);
  2. each federation aggregates its sites' key layers (attentive, or plain for baselines);
  3. shared layers are averaged (weighted by examples) at the federation and then at the root;
  4. federations exchange residual layer embeddings of their key layers through the root;
  5. the new key and shared layers flow down; local layers never moved;
  6. every site's model is evaluated on its own validation data.
Every aggregation goes through `ReleasePath` (policy authorization + secure aggregation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from worldlm_secure.aggregation import blend_from_sum, embed, flatten, mix_in, unflatten
from worldlm_secure.aggregation.member import member_weights
from worldlm_secure.errors import BudgetExceeded, ConfigError
from worldlm_secure.federation.methods import Method
from worldlm_secure.federation.release import MemberUpdate, ReleasePath
from worldlm_secure.federation.settings import Settings
from worldlm_secure.federation.world import World
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.model import ParameterGroups, assign_groups, build_model
from worldlm_secure.policy import LayerPatterns
from worldlm_secure.policy.check import check_ckks_usable
from worldlm_secure.privacy.record_stream import RecordDPParams, RecordStream
from worldlm_secure.release import ReleaseStats, round_user_dp
from worldlm_secure.train import LocalTrainer, as_sequences, pick_device
from worldlm_secure.train.site import SiteState, site_generator

if TYPE_CHECKING:
    from worldlm_secure.train.private import PrivateTrainer

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SiteData:
    """One site's token ids (train, validation) and the site's perplexity floor if known."""

    train: np.ndarray
    val: np.ndarray
    floor_ppl: float | None = None


@dataclass(frozen=True)
class RoundRecord:
    round: int
    mean_val_ppl: float
    sites: dict[str, float]
    train_loss: float


@dataclass(frozen=True)
class MethodResult:
    name: str
    sites: dict[str, float]
    rounds: list[RoundRecord]
    wall_s: float
    train_s: float
    stats: ReleaseStats
    groups: dict[str, int]  # parameter count per group
    residual_gains: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # why training stopped before the last round (e.g. a DP budget)
    # privacy.feasibility.Feasibility of every DP release planned (expected signal-to-noise, warnings)
    feasibility: list = field(default_factory=list)
    base_hash: str | None = None  # SHA-256 of the base weights every site started from (model.pretrained)

    @property
    def dp_warnings(self) -> list[str]:
        return [w for f in self.feasibility for w in f.warnings]

    @property
    def mean_val_ppl(self) -> float:
        return float(np.mean(list(self.sites.values())))


@dataclass
class _Site(SiteState):
    """A site in the engine: its `SiteState` and the aggregator its releases go to."""

    aggregator: str = field(kw_only=True)


def plan_feasibility(
    path: ReleasePath,
    members: Mapping[str, list[str]],
    groups: Mapping[str, list[str]],
    sizes: Mapping[str, int],
    root: str,
    *,
    record: Mapping[str, RecordDPParams] | None = None,
    trained: int = 0,
) -> list:
    """`privacy.feasibility.Feasibility` of every DP release a run plans, before anything trains.

    ``members``: aggregator -> its sites; ``groups``: "key"/"shared" -> released parameter names;
    ``sizes``: parameter name -> number of values; ``record``: site -> `RecordDPParams` of its DP-SGD;
    ``trained``: trainable values (the DP-SGD noise dimension). The one definition the engine, the
    `--dry-run` plan, `policy check --world` and `node start` use.
    """
    from worldlm_secure.aggregation.weighted import DeltaCodec
    from worldlm_secure.privacy.feasibility import feasibility

    out = []
    for agg, sites in sorted(members.items()):
        cohort = sorted(sites)
        for group, final in (("key", agg), ("shared", root)):
            names = list(groups.get(group) or [])
            if not names:
                continue
            dp = round_user_dp(path, cohort, final, path.plan(cohort, final))
            if dp is None:
                continue
            dim = DeltaCodec(tuple(names), tuple((sizes[n],) for n in names)).length
            out.append(feasibility(f"{group} at {agg}", contributors=len(cohort), clipping_norm=dp.clipping_norm,
                                   noise_multiplier=dp.noise_multiplier, dim=dim))
    for site, prm in sorted((record or {}).items()):
        out.append(feasibility(f"DP-SGD at {site}", contributors=prm.expected_batch,
                               clipping_norm=prm.max_grad_norm, noise_multiplier=prm.noise_multiplier,
                               dim=trained, level="record"))
    return out


def planned_site_releases(rounds: int, key_released: bool, shared_released: bool) -> int:
    """Releases one site makes over the run (what ``noise_multiplier: auto`` plans its one loss over)."""
    return max(1, rounds * (int(key_released) + int(shared_released)))


def _all_of(names: list[str], group: str) -> ParameterGroups:
    empty: tuple[str, ...] = ()
    return ParameterGroups(**{g: (tuple(names) if g == group else empty) for g in ("local", "key", "shared")})


def plan_groups(method: Method, world: World, names: list[str]) -> dict[str, ParameterGroups]:
    """The parameter groups of every site under ``method`` (policy groups come from each site's chain)."""
    out: dict[str, ParameterGroups] = {}
    for site in world.sites:
        if method.groups == "all_shared":
            out[site.name] = _all_of(names, "shared")
        elif method.groups == "all_local":
            out[site.name] = _all_of(names, "local")
        else:
            layers = world.effective_policy(site.name).layers
            groups = assign_groups(names, layers.group_of, source=f"{site.policy_path} layers (site {site.name})")
            if method.groups == "policy_local_rest_shared":
                groups = ParameterGroups(groups.local, (), tuple(n for n in names if n not in groups.local))
            out[site.name] = groups
    return out


def _layer_override(method: Method, world: World) -> LayerPatterns | None:
    """The layer plan a baseline is authorized under (None: the policies' own layers).

    Baselines share differently from what the policies' ``layers:`` say (that is what makes them
    baselines), so simulate authorizes them under their own plan and marks them as such.
    """
    if method.groups == "policy":
        return None
    if method.groups == "all_shared":
        return LayerPatterns(local=(), key=(), shared=("*",))
    if method.groups == "all_local":
        return LayerPatterns(local=("*",), key=(), shared=())
    layers = world.effective_policy(world.sites[0].name).layers  # FedPer: policy's local, all else shared
    return LayerPatterns(local=layers.local, key=(), shared=(*layers.key, *layers.shared))


class Engine:
    """Runs one method on one world. Deterministic on CPU for a fixed seed."""

    def __init__(
        self,
        world: World,
        method: Method,
        data: Mapping[str, SiteData],
        settings: Settings,
        *,
        vocab_size: int,
        identities: Mapping[str, NodeIdentity] | None = None,
        on_site: Callable[[str, int], None] | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        ledger_dir: Path | None = None,
    ) -> None:
        self.world, self.method, self.settings = world, method, settings
        self.on_site, self.on_round = on_site, on_round
        self.device = pick_device(settings.device)
        self.model = build_model(replace(settings.model, vocab_size=vocab_size), seed=settings.seed)
        self.base_hash: str | None = getattr(self.model, "base_hash", None)  # SHA-256 of the base weights (model.pretrained)
        init = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.names = list(init)
        self.groups = plan_groups(method, world, self.names)
        self.flat = method.flat or world.is_flat
        self.root = world.root.name
        ids = dict(identities or {})
        for n in world.nodes:
            ids.setdefault(n, NodeIdentity.generate(n))
        override = _layer_override(method, world)
        key_released = any(self.groups[s].key for s in self.groups)
        shared_released = any(self.groups[s].shared for s in self.groups)
        self.release = ReleasePath(
            world, ids, layer_override=override, ledger_dir=ledger_dir,
            # every release of a site composes into its one loss: key + shared per round per site
            planned_releases=planned_site_releases(settings.rounds, key_released, shared_released),
        )
        self.release.base_hash = self.base_hash  # every ledger entry records the base it updates
        if self.flat:  # the world check sees only tree rounds; a flat method sums every site at the root
            self._check_flat_round(sorted(n.name for n in world.sites))
        self.sites: list[_Site] = []
        for i, node in enumerate(sorted(world.sites, key=lambda n: n.name)):
            self.sites.append(
                _Site(
                    name=node.name,
                    aggregator=self.root if self.flat else str(node.parent),
                    params={n: t.clone() for n, t in init.items()},
                    train=as_sequences(data[node.name].train, settings.seq_len),
                    val=as_sequences(data[node.name].val, settings.seq_len),
                    generator=site_generator(settings.seed, i),
                )
            )
        self.members: dict[str, list[_Site]] = {}
        for s in self.sites:
            self.members.setdefault(s.aggregator, []).append(s)
        self.key_names, self.shared_names = self._common_groups()
        self.fed_key: dict[str, Tensors] = {f: {n: init[n].clone() for n in self.key_names} for f in self.members}
        self.fed_shared: dict[str, Tensors] = {f: {n: init[n].clone() for n in self.shared_names} for f in self.members}
        self.root_shared: Tensors = {n: init[n].clone() for n in self.shared_names}
        self.reference: Tensors = {n: init[n].clone() for n in self.key_names}  # the root's residual reference
        self.trainer = LocalTrainer(self.model, settings.train, self.device, settings.rounds * settings.train.local_steps)
        self.residual_gains: dict[str, float] = {}
        self.private, self.record = self._plan_record_dp()
        # Under any DP every weight and denominator is public (protocols/dp.md §2): no example counts.
        self.public_weights = any(
            self.release.effective(s.name, self.root).differential_privacy.level != "none" for s in self.sites
        )
        self.momentum: dict[tuple[str, str], Tensors] = {}  # DP-FedAvgM server momentum per (group, aggregator)
        self.feasibility = self._feasibility()

    def _check_flat_round(self, sites: list[str]) -> None:
        """Before training: the one round of every site at the root passes the protocol's own checks (a CKKS
        ring's noise budget bounds the members per sum), as `check_world` does for the tree's rounds."""
        plan = self.release.plan(sites, self.root)
        if plan.protocol == "ckks":
            effective = {(s, self.root): self.release.effective(s, self.root) for s in sites}
            check_ckks_usable(plan, self.root, sites, self.root, effective)

    def _plan_record_dp(self) -> tuple[PrivateTrainer | None, dict[str, RecordStream]]:
        """DP-SGD for every site whose effective policy (site -> root) is record-level, fixed before training.

        The shared module is wrapped for per-sample gradients once; a model Opacus cannot handle raises
        UnsupportedModelError here, before any site trains (never a silent fallback to plain training).
        Each site's `SITE/record` stream is rebuilt from its ledger and shared with the release path,
        which charges the steps on the site's next release.
        """
        from worldlm_secure.train.private import PrivateTrainer, site_record_dp

        streams: dict[str, RecordStream] = {}
        for s in self.sites:
            params = site_record_dp(self.release.effective(s.name, self.root), records=s.examples,
                                    cfg=self.settings.train, rounds=self.settings.rounds)
            if params is not None:
                streams[s.name] = RecordStream(s.name, params, self.release.ledger_entries(s.name))
        if not streams:
            return None, {}
        private = PrivateTrainer(self.trainer)
        self.release.record_streams.update(streams)
        return private, streams

    def _feasibility(self) -> list[object]:
        """The expected signal-to-noise of every DP release this run plans (`plan_feasibility`), before any
        site trains; each warning is logged and kept in the result (results.json, via MethodResult)."""
        import logging

        out = plan_feasibility(
            self.release, {agg: [s.name for s in sites] for agg, sites in self.members.items()},
            {"key": self.key_names, "shared": self.shared_names},
            {n: p.numel() for n, p in self.model.named_parameters()}, self.root,
            record={site: stream.params for site, stream in self.record.items()},
            trained=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        )
        log = logging.getLogger("worldlm_secure.dp")
        for f in out:
            for w in f.warnings:
                log.warning("%s: %s", self.method.name, w)
        return out

    def _common_groups(self) -> tuple[list[str], list[str]]:
        """Key and shared names must agree within an aggregator (they are summed together)."""
        key: list[str] | None = None
        shared: list[str] | None = None
        for fed, sites in self.members.items():
            for s in sites:
                g = self.groups[s.name]
                if key is None:
                    key, shared, first = list(g.key), list(g.shared), s.name
                elif list(g.key) != key or list(g.shared) != shared:
                    raise ConfigError(
                        f"{self.world.path}: sites {first!r} and {s.name!r} group their parameters differently "
                        f"(their policies' layers: sections); sites aggregated together must agree"
                    )
        return key or [], shared or []

    # --- one round -------------------------------------------------------------------------------
    def train_sites(self, round_id: int) -> float:
        """Round ``round_id``'s local training at every site (nothing is released); returns the sites' mean
        training loss (NaN when none has one). Record-level DP refuses the whole round first (BudgetExceeded)."""
        losses = []
        steps = self.settings.train.local_steps
        start_step = (round_id - 1) * steps
        for held in self.record.values():  # refuse the whole round before any site trains (BudgetExceeded)
            held.check_round(steps)
        for site in self.sites:
            stream = self.record.get(site.name)
            # _plan_record_dp makes self.private whenever a site has a record stream
            loss, taken = site.train_round(self.trainer, start_step, private=self.private,
                                           record=stream.params if stream is not None else None)
            if stream is not None:
                stream.add_steps(taken)
            losses.append(loss)
            if self.on_site:
                self.on_site(site.name, round_id)
        return float(np.nanmean(losses)) if not np.all(np.isnan(losses)) else float("nan")

    def _weighted_round(
        self, round_id: int, group: str, destination: str, server: Tensors, members: Mapping[str, tuple[Tensors, np.ndarray]],
        names: list[str], final: str, *, derived: bool = False,
    ) -> Tensors:
        """server + weighted average of (member - server), through the release path."""
        updates = {
            m: MemberUpdate({n: params[n] - server[n] for n in names}, weights) for m, (params, weights) in members.items()
        }
        shapes = {n: server[n].shape for n in names}
        avg = self.release.average_deltas(
            round_id, group, destination, updates, names, shapes, final_destination=final, derived=derived
        )
        return {n: server[n] + avg[n] for n in names}

    def _sites_round(
        self, round_id: int, group: str, fed: str, server: Tensors, sites: list[_Site], names: list[str], final: str,
        weighting: str,
    ) -> Tensors:
        """One release of ``fed``'s sites: server + weighted average of (site - server).

        ``weighting``: "attention" (FedAtt weights each site computes from its own parameters) or
        "examples" (examples / the federation's largest site). `RayEngine` runs this in the sites' actors.
        """
        n_max = self.example_scale(sites)
        members = {
            s.name: (s.params, member_weights(server, s.params, names, weighting, examples=s.examples, n_max=n_max,
                                              attention=self.settings.attention))
            for s in sites
        }
        return self._weighted_round(round_id, group, fed, server, members, names, final)

    def example_scale(self, sites: list[_Site]) -> float:
        """``n_max`` of example weighting ``min(n, n_max) / n_max``: the cohort's largest count without DP; under
        DP a public number (`aggregation.dp_weight_cap`, else 1: uniform weights), so that no member's weight
        depends on another member's data. The Ray backend and nodes must use the same rule."""
        if self.public_weights:
            return float(self.settings.dp_weight_cap or 1)
        return float(max(s.examples for s in sites))

    def server_step(self, group: str, aggregator: str, server: Tensors, new: Tensors, names: list[str],
                    lr: float) -> Tensors:
        """DP-FedAvgM on the released mean ``new - server``: m <- beta*m + mean; server + lr * m
        (`aggregation.server.server_step`, the one definition deployed federations use too), with the momentum
        buffer of (``group``, ``aggregator``) kept in `momentum`. lr = 1 and beta = 0 (the defaults) is plain
        FedAvg: exactly ``new``."""
        from worldlm_secure.aggregation.server import server_step

        out, buf = server_step(server, new, names, lr=lr, momentum=self.settings.server_momentum,
                               buffer=self.momentum.get((group, aggregator)))
        if buf is not None:
            self.momentum[(group, aggregator)] = buf
        return out

    def aggregate_key(self, round_id: int) -> None:
        """Round ``round_id``'s key-layer release of each federation's sites (attentive or example-weighted, as
        the method says), through the release path, then the server step; no-op without key layers."""
        if not self.key_names:
            return
        cfg = self.settings.attention
        weighting = "attention" if self.method.attentive_key else "examples"
        for fed, sites in self.members.items():
            server = self.fed_key[fed]
            new = self._sites_round(round_id, "key", fed, server, sites, self.key_names, fed, weighting)
            step = cfg.step if self.method.attentive_key else 1.0
            self.fed_key[fed] = self.server_step("key", fed, server, new, self.key_names, step * self.settings.server_lr)

    def aggregate_shared(self, round_id: int) -> None:
        """Round ``round_id``'s shared-layer releases: each federation's sites (example-weighted), then the root
        over the federations when it is the root's round; no-op without shared layers."""
        if not self.shared_names:
            return
        examples: dict[str, int] = {}
        for fed, sites in self.members.items():
            server = self.fed_shared[fed]
            new = self._sites_round(round_id, "shared", fed, server, sites, self.shared_names, self.root, "examples")
            self.fed_shared[fed] = self.server_step("shared", fed, server, new, self.shared_names, self.settings.server_lr)
            examples[fed] = sum(s.examples for s in sites)
        root_every = self.settings.hierfavg_root_every if self.method.root_every_from_world else 1
        if self.flat or round_id % root_every:
            if self.flat:
                self.root_shared = self.fed_shared[self.root]
            return
        # Under DP the root's weights are public (uniform over federations): the federations' example counts
        # are raw data statistics, and the root's release must be post-processing of noised sums only.
        n_max = 1 if self.public_weights else max(examples.values())
        members = {
            f: (self.fed_shared[f], np.full(len(self.shared_names), 1.0 if self.public_weights else examples[f] / n_max))
            for f in self.members
        }
        # A federation's shared layers are computed only from its (DP-protected) round aggregate.
        self.root_shared = self._weighted_round(
            round_id, "shared", self.root, self.root_shared, members, self.shared_names, self.root, derived=True
        )
        for f in self.members:
            self.fed_shared[f] = {n: t.clone() for n, t in self.root_shared.items()}

    def _exchange_residuals(self, round_id: int) -> None:
        """Residual layer embeddings between sibling federations, from their secure sum only."""
        if not (self.method.residuals and not self.flat and len(self.members) > 1 and self.key_names):
            return
        feds = sorted(self.members)
        rules = {f: self.world.effective_policy(f).residuals for f in feds}
        if not all(r.allowed for r in rules.values()):
            return
        names = self.key_names
        ref = flatten(self.reference, names)
        own = {
            f: flatten(embed({n: self.fed_key[f][n] - self.reference[n] for n in names}, rules[f].rank), names)
            for f in feds
        }
        # Key layers are DP-protected aggregates already: their residuals are post-processing.
        total = self.release.secure_sum(round_id, "residual", self.root, own, names, derived=True)
        for f in feds:
            blend = blend_from_sum(own[f], total, len(feds), rules[f].gain)
            self.residual_gains[f] = blend.gain
            self.fed_key[f] = unflatten(mix_in(flatten(self.fed_key[f], names), ref, blend), self.reference, names)
        self.reference = unflatten(ref + total / len(feds), self.reference, names)

    def aggregate(self, round_id: int) -> None:
        """Every release of round ``round_id`` after training: key layers, shared layers, residual embeddings."""
        self.aggregate_key(round_id)
        self.aggregate_shared(round_id)
        self._exchange_residuals(round_id)

    def broadcast(self) -> None:
        """Every site takes its federation's aggregated key and shared layers (its local layers stay its own)."""
        for s in self.sites:
            s.params.update({n: t.clone() for n, t in self.fed_key[s.aggregator].items()})
            s.params.update({n: t.clone() for n, t in self.fed_shared[s.aggregator].items()})

    def evaluate(self) -> dict[str, float]:
        out = {}
        for s in self.sites:
            out[s.name] = s.evaluate(self.trainer)
        return out

    def run(self) -> MethodResult:
        """Train every round (or until a budget refuses one) and return the result; the ledgers are closed
        at the end, whatever happened (`ReleasePath.close`)."""
        try:
            return self._run()
        finally:
            self.release.close()

    def _run(self) -> MethodResult:
        if self.method.pooled:  # `central`: the pooled-data reference (federation.methods.run_central)
            from worldlm_secure.federation.methods import run_central

            return run_central(self)
        start = time.perf_counter()
        train_s = 0.0
        rounds: list[RoundRecord] = []
        site_ppl: dict[str, float] = {}
        stopped: str | None = None
        for r in range(1, self.settings.rounds + 1):
            t0 = time.perf_counter()
            loss = float("nan")
            try:
                try:
                    loss = self.train_sites(r)  # record-level DP refuses a round its budget cannot afford
                finally:
                    train_s += time.perf_counter() - t0
                self.aggregate(r)
            except BudgetExceeded as exc:
                # Nothing of this round was released (a refused training round did not train either);
                # the sites keep what they had and training stops.
                stopped = f"round {r}: {exc}"
                site_ppl = self.evaluate()
                rounds.append(RoundRecord(r, float(np.mean(list(site_ppl.values()))), site_ppl, loss))
                break
            self.broadcast()
            if r % self.settings.eval_every == 0 or r == self.settings.rounds:
                site_ppl = self.evaluate()
                rec = RoundRecord(r, float(np.mean(list(site_ppl.values()))), site_ppl, loss)
                rounds.append(rec)
                if self.on_round:
                    self.on_round(rec)
        g = self.groups[self.sites[0].name]
        sizes = {n: p.numel() for n, p in self.model.named_parameters()}  # shapes only (sites may hold theirs elsewhere)
        counts = {k: sum(sizes[n] for n in g.of(k)) for k in ("local", "key", "shared")}
        return MethodResult(
            name=self.method.name,
            sites=site_ppl,
            rounds=rounds,
            wall_s=time.perf_counter() - start,
            train_s=train_s,
            stats=self.release.stats,
            groups=counts,
            residual_gains=dict(self.residual_gains),
            stopped=stopped,
            feasibility=list(self.feasibility),
            base_hash=self.base_hash,
        )
