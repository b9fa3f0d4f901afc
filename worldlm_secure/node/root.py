"""The root: aggregates the federations' shared layers and exchanges their residual embeddings.

Per world round r (the engine's root half of `aggregate_shared` and `_exchange_residuals`):
    shared(r):   model = root_shared (+ the residual sum of r-1); root_shared += avg_examples(delta)
    residual(r): model = root_shared + reference; total = secure sum of the federations' embeddings;
                 reference += total / n_federations (each federation mixes its own blend in)
then final: model = root_shared + the last residual sum. State is checkpointed after every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worldlm_secure.aggregation import flatten, unflatten
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.aggregator import Aggregator
from worldlm_secure.node.payload import model_payload
from worldlm_secure.node.rounds import Phase
from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import WorldContext
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState

Event = Callable[..., None]


class RootNode:
    def __init__(self, cfg: NodeConfig, ctx: WorldContext, identity: NodeIdentity, emit: Event) -> None:
        self.cfg, self.ctx, self.emit = cfg, ctx, emit
        self.state = NodeState(cfg.state)
        self.release = NodeRelease(ctx, identity, cfg.ledger_dir)
        self.release.path.base_hash = ctx.base_hash  # announced with every round: members refuse another base
        self.agg = Aggregator(cfg, ctx, self.release, self.state, emit)
        self.shared = {n: ctx.init[n].clone() for n in ctx.shared_names}
        self.reference = {n: ctx.init[n].clone() for n in ctx.key_names}
        self.total: np.ndarray | None = None
        self.done = 0
        arrays = self.state.load_tensors("root")
        if arrays is not None:
            self.shared = {k[7:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("shared/")}
            self.reference = {k[4:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("ref/")}
            self.total = arrays.get("residual_total")
            self.done = int(self.state.get("root_round", 0))
            emit("restored", round=self.done)

    def _save(self, r: int) -> None:
        arrays = {f"shared/{n}": t.numpy() for n, t in self.shared.items()}
        arrays.update({f"ref/{n}": t.numpy() for n, t in self.reference.items()})
        if self.total is not None:
            arrays["residual_total"] = self.total
        self.state.save_tensors("root", arrays)
        self.state.put(root_round=r)
        self.done = r

    def _extra(self) -> dict[str, np.ndarray]:
        return {"residual_total": self.total} if self.total is not None else {}

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        self.agg.start()
        try:
            examples = self.agg.wait_for_members()
            n_max = 1.0 if self.release.public_weights else float(max((examples.get(m, 0) for m in self.agg.members), default=1) or 1)
            feds = len(self.agg.members)
            for r in range(self.done + 1, ctx.settings.rounds + 1):
                if ctx.shared_names:
                    model = model_payload({"shared": self.shared}, self._extra())
                    new = self.agg.weighted(Phase(r, "shared", n_max), model, ctx.root, self.shared, ctx.shared_names, derived=True)
                    if new is not None:
                        self.shared = new
                self.total = None
                if ctx.residuals_enabled():
                    names = ctx.key_names
                    model = model_payload({"shared": self.shared, "ref": self.reference})
                    got = self.agg.run_phase(Phase(r, "residual"), model, ctx.root)
                    if got is not None:
                        out, _ = got
                        self.total = out.total
                        ref = flatten(self.reference, names)
                        self.reference = unflatten(ref + out.total / feds, self.reference, names)
                self._save(r)
            self.agg.finish(Phase(ctx.settings.rounds, "final"), model_payload({"shared": self.shared}, self._extra()))
            return {"root": ctx.root, "rounds": ctx.settings.rounds}
        finally:
            self.agg.stop()
            self.state.close()
