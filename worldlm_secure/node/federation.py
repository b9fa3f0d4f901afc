"""A federation: serves its sites, aggregates them, and is itself a member of the root's rounds.

Per world round r (the engine's `aggregate_key`, `aggregate_shared`, `_exchange_residuals`, `broadcast`):

    root shared(r) announced -> download root_shared (+ the residual sum of r-1): fed_shared = root_shared,
                                mix the residual blend of r-1 into the key layers
    sites key(r)    -> attentive key aggregation:  fed_key += step * (avg_w(w*delta) )
    sites shared(r) -> shared aggregation:         fed_shared += avg_examples(delta)
                       (both through DP-FedAvgM's `aggregation.server.server_step`, as the engine: server_lr,
                       server_momentum; the momentum buffer is checkpointed with the layers)
    root shared(r)  <- release fed_shared - root_shared (derived: computed from DP-protected aggregates)
    root residual(r)-> download the new root_shared and the reference; release the key residual embedding
    root final      -> fed_shared = root_shared, mix the last blend, broadcast final to the sites

Durable: the key/shared state and the stage are checkpointed after every step, so a federation killed
with kill -9 and restarted resumes at the step it was in (a site round is re-announced with a new id).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worldlm_secure.aggregation import blend_from_sum, embed, flatten, mix_in, unflatten
from worldlm_secure.aggregation.server import server_step
from worldlm_secure.errors import SecAggError, TransportError, WorldLMError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.aggregator import Aggregator
from worldlm_secure.node.board import EXAMPLES_STATUS, DONE_STATUS
from worldlm_secure.node.heartbeat import Heartbeat
from worldlm_secure.node.payload import model_payload
from worldlm_secure.node.rounds import Phase, announced_phases, download_groups
from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import WorldContext
from worldlm_secure.node.receipts import MemberReceipts, ReceiptingClient, release_id
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.tls import NodeCredentials

log = logging.getLogger("worldlm_secure.node")
Event = Callable[..., None]
Tensors = dict[str, torch.Tensor]


class FederationNode:
    def __init__(self, cfg: NodeConfig, ctx: WorldContext, identity: NodeIdentity, emit: Event) -> None:
        assert cfg.parent is not None
        self.cfg, self.ctx, self.identity, self.emit = cfg, ctx, identity, emit
        self.name, self.root = cfg.name, cfg.parent.name
        self.state = NodeState(cfg.state)
        self.release = NodeRelease(ctx, identity, cfg.ledger_dir, self.state)
        self.release.path.base_hash = ctx.base_hash  # recorded in every ledger entry; announced to its sites
        self.agg = Aggregator(cfg, ctx, self.release, self.state, emit)
        self.receipts = MemberReceipts(self.release.path.ledger(self.name), self.state, self.root, emit)
        init = ctx.init
        self.key: Tensors = {n: init[n].clone() for n in ctx.key_names}
        self.shared: Tensors = {n: init[n].clone() for n in ctx.shared_names}
        self.pending: dict[str, np.ndarray] | None = None  # own embedding and reference of the last residual release
        self.released: Tensors = {}  # this round's aggregated shared layers, kept to re-release if the root restarts
        self.momentum: dict[str, Tensors] = {}  # DP-FedAvgM buffer per group (key, shared), checkpointed with them
        self.stage: list[Any] = self.state.get("stage", [0, "done"])
        self.restore()

    # ---- durability ----
    def save(self, r: int, stage: str) -> None:
        """Checkpoint this federation's layers, momentum buffers and pending residual atomically, then record
        that world round ``r`` reached ``stage`` (a restarted process resumes there, `restore`)."""
        arrays = {f"key/{n}": t.numpy() for n, t in self.key.items()}
        arrays.update({f"shared/{n}": t.numpy() for n, t in self.shared.items()})
        arrays.update({f"released/{n}": t.numpy() for n, t in self.released.items()})
        arrays.update({f"momentum/{g}/{n}": t.numpy() for g, buf in self.momentum.items() for n, t in buf.items()})
        if self.pending is not None:
            arrays.update({f"pending/{k}": v for k, v in self.pending.items()})
        self.state.save_tensors("federation", arrays)
        self.stage = [r, stage]
        self.state.put(stage=self.stage)

    def restore(self) -> None:
        """Load the last checkpoint (`save`) as a restarted process does; without one, start at round 0."""
        arrays = self.state.load_tensors("federation")
        if arrays is None:
            self.stage = [0, "done"]
            return
        self.key = {k[4:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("key/")}
        self.shared = {k[7:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("shared/")}
        self.released = {k[9:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("released/")}
        self.momentum = {}
        for k, v in arrays.items():
            if k.startswith("momentum/"):
                _, group, name = k.split("/", 2)
                self.momentum.setdefault(group, {})[name] = torch.from_numpy(v.copy())
        pend = {k[8:]: v.copy() for k, v in arrays.items() if k.startswith("pending/")}
        self.pending = pend or None
        self.emit("restored", round=self.stage[0], stage=self.stage[1])

    # ---- steps ----
    def _sync_from_root(self, ann: Announcement, parent: SiteClient) -> Tensors:
        """Take the root's shared layers and mix in the residual blend its last sum allows."""
        groups, extra = download_groups(parent, ann, {"shared": self.ctx.shared_names}, self.ctx.init)
        root_shared = groups["shared"]
        self.shared = {n: t.clone() for n, t in root_shared.items()}
        if self.pending is not None and "residual_total" in extra:
            names = self.ctx.key_names
            rule = self.ctx.world.effective_policy(self.name).residuals
            blend = blend_from_sum(self.pending["own"], extra["residual_total"], len(self.ctx.world.federations), rule.gain)
            mixed = mix_in(flatten(self.key, names), self.pending["ref"], blend)
            self.key = unflatten(mixed, self.key, names)
            self.emit("residual_mixed", gain=blend.gain)
        self.pending = None
        return root_shared

    def _up(self, parent: SiteClient, ann: Announcement, phase: Phase, names: list[str], *,
            deltas: Tensors | None = None, weights: np.ndarray | None = None, raw: np.ndarray | None = None,
            shapes: dict[str, Any] | None = None) -> None:
        r, group = phase.world_round, phase.phase
        prep = self.release.prepare(r, group, self.root, self.root, ann.cohort, deltas, weights, names,
                                    shapes or {}, derived=True, raw_vector=raw)
        # The update carries this federation's ledger head; the root's receipt is checked and held.
        link = ReceiptingClient(parent, self.receipts, release_id(r, group, self.root), ann.aggregator_key)
        self.release.contribute(link, ann, r, group, self.root, names, prep, self.cfg.timeouts)
        self.emit("released", round=r, group=group, to=self.root, protocol=ann.protocol)

    def _site_rounds(self, r: int) -> None:
        ctx = self.ctx
        model = model_payload({"key": self.key, "shared": self.shared})
        if ctx.key_names:
            new = self.agg.weighted(Phase(r, "key"), model, self.name, self.key, ctx.key_names, derived=False)
            if new is not None:
                self.key = self.server_step("key", self.key, new, ctx.key_names, ctx.settings.attention.step * ctx.settings.server_lr)
        if ctx.shared_names:
            n_max = self.release.example_scale([self.agg.board.examples.get(m, 0) for m in self.agg.members])
            new = self.agg.weighted(Phase(r, "shared", float(n_max)), None, ctx.root, self.shared, ctx.shared_names, derived=False)
            if new is not None:
                self.shared = self.server_step("shared", self.shared, new, ctx.shared_names, ctx.settings.server_lr)
        self.released = {n: t.clone() for n, t in self.shared.items()}
        self.save(r, "aggregated")

    def server_step(self, group: str, server: Tensors, new: Tensors, names: list[str], lr: float) -> Tensors:
        """DP-FedAvgM on the released mean, as the engine (`aggregation.server.server_step`); the momentum buffer
        is checkpointed with the layers by the `save` that follows, so a restart continues it exactly."""
        out, buf = server_step(server, new, names, lr=lr, momentum=self.ctx.settings.server_momentum,
                               buffer=self.momentum.get(group))
        if buf is not None:
            self.momentum[group] = {n: t.detach().clone().contiguous() for n, t in buf.items()}
        return out

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        assert cfg.parent is not None
        self.agg.start()
        examples = self.agg.wait_for_members()
        total_examples = sum(examples.get(m, 0) for m in self.agg.members)
        # As a member of the root's link this federation checks announcements itself, like a site: peers'
        # certificates, and a cohort drawn from the root's children in the world file.
        parent = SiteClient(cfg.parent.address, NodeCredentials.load(cfg.parent.credentials), cfg.parent.name,
                            identity=self.identity, retry=RetryPolicy(attempts=60, initial_backoff=0.2, max_backoff=2.0),
                            members=ctx.members(cfg.parent.name))
        status = {"text": f"{EXAMPLES_STATUS}{total_examples}"}
        enrollment = parent.enroll()
        parent.heartbeat(status["text"])
        beat = Heartbeat(lambda: parent.heartbeat(status["text"]), cfg.timeouts.heartbeat)
        beat.start()
        self.emit("enrolled", federation=enrollment.federation, round=enrollment.current_round)
        try:
            for ann, phase in announced_phases(parent, enrollment.current_round, self.emit):
                phase.check_base(ctx.base_hash, node=self.name, aggregator=self.root, where=ctx.model_field)
                r = phase.world_round
                try:
                    self.receipts.recover(parent, ann.aggregator_key)  # receipts a crash left unheld
                    if phase.phase == "final":
                        self._sync_from_root(ann, parent)
                        self.agg.finish(Phase(r, "final"), model_payload({"key": self.key, "shared": self.shared}))
                        self.save(r, "final")
                        status["text"] += f" {DONE_STATUS}"
                        parent.heartbeat(status["text"])
                        return {"federation": self.name, "rounds": r}
                    if phase.phase == "shared":
                        done_r, _stage = self.stage
                        if r < done_r:
                            continue  # a round long finished
                        if r > done_r:
                            root_shared = self._sync_from_root(ann, parent)
                            self._site_rounds(r)
                        else:
                            # Our sites' round r is aggregated already (we restarted, or the root did and
                            # re-announced): release the same aggregate again; the ledger keeps one entry.
                            groups, _ = download_groups(parent, ann, {"shared": ctx.shared_names}, ctx.init)
                            root_shared = groups["shared"]
                        names = ctx.shared_names
                        deltas = {n: self.released[n] - root_shared[n] for n in names}
                        # Under DP the root weighs federations uniformly: the example count is not used.
                        w = np.full(len(names), 1.0 if self.release.public_weights else total_examples / phase.n_max)
                        self._up(parent, ann, phase, names, deltas=deltas, weights=w, shapes={n: root_shared[n].shape for n in names})
                        self.save(r, "released")
                    elif phase.phase == "residual":
                        done_r, stage = self.stage
                        if r != done_r or stage not in ("released", "residual", "done"):
                            # The embedding is computed from the key layers as they are now: announced under
                            # another world round (the root chooses it) it would go into a second sum, keyed by
                            # another release id, over whatever cohort the root picks; the difference of the two
                            # sums is a sibling's embedding. One embedding per world round, after its release.
                            raise SecAggError(
                                f"{self.name}: residual of world round {r} announced, but its key layers are those "
                                f"of world round {done_r} ({stage}); refused, nothing sent"
                            )
                        expected = {"shared": ctx.shared_names, "ref": ctx.key_names}
                        groups, _ = download_groups(parent, ann, expected, ctx.init)
                        self.shared = {n: t.clone() for n, t in groups["shared"].items()}
                        ref = groups["ref"]
                        names = ctx.key_names
                        rule = ctx.world.effective_policy(self.name).residuals
                        own = flatten(embed({n: self.key[n] - ref[n] for n in names}, rule.rank), names)
                        self.pending = {"own": own, "ref": flatten(ref, names)}
                        self.save(r, "residual")
                        self._up(parent, ann, phase, names, raw=own)
                        self.save(r, "done")
                except (Refused, SecAggError, TransportError) as exc:
                    self.emit("round_failed", round=r, group=phase.phase, error=str(exc))
        finally:
            beat.stop()
            parent.close()
            self.agg.stop()
            self.state.close()
        raise WorldLMError(f"{self.name}: the root's round stream ended before the final round")
