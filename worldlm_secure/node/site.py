"""A site: holds data, trains, and releases its key and shared deltas to its federation.

It dials out to its federation (no open port), enrolls, and follows the federation's rounds:

    key(r):    download the federation's key + shared layers (the broadcast of round r-1), evaluate if
               due, train round r (`train.site`, the engine's site runner: same seed and generator as `simulate`),
               release w*delta of the key layers (w = FedAtt attention weight computed on site)
    shared(r): release the shared-layer delta, weighted by examples / n_max
    final:     download the last broadcast, evaluate, write results.json, say done
Local layers never leave. Training and the checkpoint that follows it happen once per round: a site
restarted with kill -9 reloads its checkpoint and releases what it trained, without training again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worldlm_secure.aggregation.member import member_weights
from worldlm_secure.errors import SecAggError, TransportError, WorldLMError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.board import DONE_STATUS, EXAMPLES_STATUS
from worldlm_secure.node.heartbeat import Heartbeat
from worldlm_secure.node.rounds import Phase, announced_phases, download_groups
from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import WorldContext
from worldlm_secure.node.receipts import MemberReceipts, ReceiptingClient, release_id
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState, write_atomic
from worldlm_secure.train import LocalTrainer, as_sequences, pick_device
from worldlm_secure.train.site import SiteState, site_generator
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.refusal import Refused
from worldlm_secure.transport.tls import NodeCredentials

if TYPE_CHECKING:
    from worldlm_secure.privacy.record_stream import RecordStream
    from worldlm_secure.train.private import PrivateTrainer

log = logging.getLogger("worldlm_secure.node")
Event = Callable[..., None]


class SiteNode:
    def __init__(self, cfg: NodeConfig, ctx: WorldContext, identity: NodeIdentity, emit: Event) -> None:
        assert cfg.parent is not None
        self.cfg, self.ctx, self.identity, self.emit = cfg, ctx, identity, emit
        self.name = cfg.name
        self.fed = cfg.parent.name
        s = ctx.settings
        data = ctx.site_data(self.name)
        # Weights, data, generator and optimizer state: the one site runner's (`train.site`), seeded as `simulate`'s.
        self.site = SiteState(self.name, {n: t.clone() for n, t in ctx.init.items()},
                              as_sequences(data.train, s.seq_len), as_sequences(data.val, s.seq_len),
                              site_generator(s.seed, ctx.site_index(self.name)))
        self.examples = self.site.examples
        self.device = pick_device(cfg.device)
        self.model = ctx.new_model()
        self.trainer = LocalTrainer(self.model, s.train, self.device, s.rounds * s.train.local_steps)
        self.server: dict[str, torch.Tensor] = {}
        self.state = NodeState(cfg.state)
        self.release = NodeRelease(ctx, identity, cfg.ledger_dir, self.state)
        # The base this site loaded: recorded in every ledger entry, and every announced round must be for it.
        self.base_hash: str | None = getattr(self.model, "base_hash", None) or ctx.base_hash
        self.release.path.base_hash = self.base_hash
        self.receipts = MemberReceipts(self.release.path.ledger(self.name), self.state, self.fed, emit)
        self.trained = 0
        self.history: dict[str, Any] = self.state.get("history", {"losses": {}, "evals": {}})
        self.record, self.private = self._plan_record_dp()
        self._restore()

    def _plan_record_dp(self) -> tuple[RecordStream | None, PrivateTrainer | None]:
        """DP-SGD when this site's composed policy (site -> root) is record-level, as the engine's
        `_plan_record_dp`: the `SITE/record` stream rebuilt from the ledger, shared with the release path."""
        from worldlm_secure.privacy.record_stream import RecordStream
        from worldlm_secure.train.private import PrivateTrainer, site_record_dp

        s = self.ctx.settings
        params = site_record_dp(self.release.path.effective(self.name, self.ctx.root), records=self.examples,
                                cfg=s.train, rounds=s.rounds)
        if params is None:
            return None, None
        stream = RecordStream(self.name, params, self.release.path.ledger_entries(self.name))
        self.release.path.record_streams[self.name] = stream
        return stream, PrivateTrainer(self.trainer)

    # ---- durability ----
    def _checkpoint(self) -> None:
        site = self.site
        arrays: dict[str, np.ndarray] = {f"p/{n}": t.numpy() for n, t in site.params.items()}
        arrays.update({f"s/{n}": t.numpy() for n, t in self.server.items()})
        arrays["generator"] = site.generator.get_state().numpy()
        groups: list[Any] = []
        if site.opt_state is not None:
            for idx, st in site.opt_state["state"].items():
                for k, v in st.items():
                    arrays[f"o/{idx}/{k}"] = v.detach().cpu().numpy()
            groups = site.opt_state["param_groups"]
        self.state.save_tensors("site", arrays, {"param_groups": json.dumps(groups)})
        # The checkpoint is in place before the state says so: a crash between them retrains, never skips.
        self.state.put(trained_round=self.trained, history=self.history)

    def _restore(self) -> None:
        self.trained = int(self.state.get("trained_round", 0))
        if not self.trained:
            return
        from safetensors import safe_open

        arrays = self.state.load_tensors("site")
        if arrays is None:
            self.trained = 0
            return
        with safe_open(str(self.state.checkpoint_path("site")), framework="numpy") as f:
            groups = json.loads((f.metadata() or {}).get("param_groups", "[]"))
        self.site.params = {k[2:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("p/")}
        self.server = {k[2:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("s/")}
        self.site.generator.set_state(torch.from_numpy(arrays["generator"].copy()))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in arrays.items():
            if k.startswith("o/"):
                _, idx, key = k.split("/", 2)
                state.setdefault(int(idx), {})[key] = torch.from_numpy(v.copy())
        self.site.opt_state = {"state": state, "param_groups": groups} if groups else None
        if self.record is not None:
            entries = self.release.path.ledger_entries(self.name)
            if not any(e.round == self.trained and e.stream == f"{self.name}/record" for e in entries):
                # DP-SGD steps of the checkpointed round not charged to any release yet: the next one charges them.
                self.record.add_steps(int(self.history.get("dp_steps", {}).get(str(self.trained), 0)))
        self.emit("restored", round=self.trained)

    # ---- the round steps ----
    def train(self, r: int) -> None:
        """Train world round ``r`` locally (from its step, with DP-SGD when the policy is record-level), then
        checkpoint: a site restarted after this releases round ``r`` without training it again."""
        t0 = time.perf_counter()
        steps = self.ctx.settings.train.local_steps
        if self.record is not None:
            self.record.check_round(steps)  # refuse before training (BudgetExceeded)
        loss, taken = self.site.train_round(self.trainer, (r - 1) * steps, private=self.private,
                                            record=self.record.params if self.record is not None else None)
        if self.record is not None:
            self.record.add_steps(taken)
            self.history.setdefault("dp_steps", {})[str(r)] = taken
        self.trained = r
        self.history["losses"][str(r)] = loss
        self._checkpoint()
        self.emit("trained", round=r, loss=loss, seconds=time.perf_counter() - t0)

    def evaluate(self, r: int) -> float:
        """The site's validation perplexity after world round ``r``, kept in its history (results.json)."""
        ppl = self.site.evaluate(self.trainer)
        self.history["evals"][str(r)] = ppl
        self.state.put(history=self.history)
        self.emit("evaluated", round=r, val_ppl=ppl)
        return ppl

    def load_broadcast(self, client: SiteClient, ann: Announcement) -> None:
        """Download the announced model and take exactly the key and shared layers (names, shapes) this site
        aggregates (`download_groups`); they become its parameters and the base its next deltas are taken from."""
        expected = {"key": self.ctx.key_names, "shared": self.ctx.shared_names}
        groups, _ = download_groups(client, ann, expected, self.ctx.init)
        self.server = {**groups.get("key", {}), **groups.get("shared", {})}
        self.site.params.update({n: t.clone() for n, t in self.server.items()})

    def _release(self, client: SiteClient, ann: Announcement, phase: Phase) -> None:
        r, ctx = phase.world_round, self.ctx
        key = phase.phase == "key"
        names, final = (ctx.key_names, self.fed) if key else (ctx.shared_names, ctx.root)
        params = self.site.params
        weights = member_weights(self.server, params, names, "attention" if key else "examples",
                                 examples=self.examples, n_max=self.release.member_scale(phase.n_max),
                                 attention=ctx.settings.attention)
        deltas = {n: params[n] - self.server[n] for n in names}
        shapes = {n: self.server[n].shape for n in names}
        group = phase.phase
        prep = self.release.prepare(r, group, self.fed, final, ann.cohort, deltas, weights, names, shapes, derived=False,
                                    clip=phase.clip)
        # The update carries this site's ledger head; the federation's countersigned receipt is checked and held.
        link = ReceiptingClient(client, self.receipts, release_id(r, group, self.fed), ann.aggregator_key)
        self.release.contribute(link, ann, r, group, self.fed, names, prep, self.cfg.timeouts)
        self.emit("released", round=r, group=group, protocol=ann.protocol, cohort=len(ann.cohort))

    def _results(self) -> dict[str, Any]:
        evals = {int(k): v for k, v in self.history["evals"].items()}
        losses = {int(k): v for k, v in self.history["losses"].items()}
        last = max(evals) if evals else None
        out = {
            "site": self.name, "federation": self.fed, "val_ppl": evals[last] if last else None,
            "rounds": [{"round": r, "val_ppl": evals[r], "train_loss": losses.get(r)} for r in sorted(evals)],
            "losses": {str(k): v for k, v in sorted(losses.items())},
        }
        write_atomic(self.cfg.state / "results.json", (json.dumps(out, indent=2) + "\n").encode())
        return out

    # ---- the loop ----
    def run(self) -> dict[str, Any]:
        assert self.cfg.parent is not None
        p = self.cfg.parent
        # The members this site knows from the world file, independently of what the federation announces:
        # an announced cohort naming anyone else, or a peer key without a valid certificate, is refused.
        client = SiteClient(
            p.address, NodeCredentials.load(p.credentials), p.name, identity=self.identity,
            retry=RetryPolicy(attempts=60, initial_backoff=0.2, max_backoff=2.0), members=self.ctx.members(self.fed),
        )
        status = {"text": f"{EXAMPLES_STATUS}{self.examples}"}
        enrollment = client.enroll()
        client.heartbeat(status["text"])
        beat = Heartbeat(lambda: client.heartbeat(status["text"]), self.cfg.timeouts.heartbeat)
        beat.start()
        self.emit("enrolled", federation=enrollment.federation, round=enrollment.current_round)
        eval_every, rounds = self.ctx.settings.eval_every, self.ctx.settings.rounds
        try:
            for ann, phase in announced_phases(client, enrollment.current_round, self.emit):
                phase.check_base(self.base_hash, node=self.name, aggregator=self.fed, where=self.ctx.model_field)
                r = phase.world_round
                try:
                    self.receipts.recover(client, ann.aggregator_key)  # receipts a crash left unheld
                    if phase.phase == "final":
                        self.load_broadcast(client, ann)
                        self.evaluate(rounds)
                        status["text"] = f"{EXAMPLES_STATUS}{self.examples} {DONE_STATUS}"
                        client.heartbeat(status["text"])
                        return self._results()
                    if self.name not in ann.cohort:
                        self.emit("skipped", round=r, group=phase.phase, reason="not in the cohort")
                        continue
                    if phase.phase == "key":
                        if r > self.trained:
                            self.load_broadcast(client, ann)
                            if r - 1 >= 1 and (r - 1) % eval_every == 0 and str(r - 1) not in self.history["evals"]:
                                self.evaluate(r - 1)
                            self.train(r)
                        elif r < self.trained:
                            continue
                    elif r != self.trained:
                        self.emit("skipped", round=r, group=phase.phase, reason=f"trained round {self.trained}")
                        continue
                    self._release(client, ann, phase)
                except (Refused, SecAggError, TransportError) as exc:
                    # The federation moved on or the round aborted: nothing of ours was released without a
                    # ledger entry; wait for the next announcement.
                    self.emit("round_failed", round=r, group=phase.phase, error=str(exc))
        finally:
            beat.stop()
            client.close()
            self.state.close()
        raise WorldLMError(f"{self.name}: the federation's round stream ended before the final round")
