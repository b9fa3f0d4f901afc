"""Security review: a malicious federation re-runs the same world-round release in a second link round.

Over links every link round is its own CKKS session and key epoch, so "a key holder decrypts once per round"
holds per LINK round; the protocol cannot know that two rounds carry the same vectors. The site can: it used to
release the same (world round, group) update again into any later link round announced for it, and the
difference of two sums over the same vectors with and without the victim is the victim's update. Now
(`node.release.NodeRelease._rerun_plan`, SECURITY.md "Re-run rounds") a release without fresh noise goes
again only to the cohort announced the first time, and only into a sum of all of it.

`test_a_site_refuses_to_re_release_its_update_into_a_round_without_the_victim`: the real `SiteNode.run` loop
(a fake transport; `member_round` recorded) is offered world round 1's key update again in link round 2, whose
cohort lacks the victim: nothing is released (it failed before the fix: the byte-identical vector went out).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.transport.handler import Announcement

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_site_refuses_to_re_release_its_update_into_a_round_without_the_victim(tmp_path: Path, monkeypatch) -> None:
    import torch
    from nodeworld import small_world

    from worldlm_secure.node import release as release_mod
    from worldlm_secure.node import site as site_mod
    from worldlm_secure.node.config import NodeConfig
    from worldlm_secure.node.context import load_context
    from worldlm_secure.node.rounds import Phase

    import yaml

    raw = yaml.safe_load((REPO / "policies" / "research-open.yaml").read_text())  # ckks-open, min_cohort 2
    raw["name"], raw["description"] = "ckks-two", "research-open, CKKS only, min_cohort 2"
    raw["secure_aggregation"].update(protocol=["ckks"], min_cohort=2, ckks={"value_bits": 32})
    raw["egress"]["require"] = ["secure_aggregation"]
    policy = tmp_path / "ckks-two.yaml"
    policy.write_text(yaml.safe_dump(raw, sort_keys=False))
    open_policy = str(REPO / "policies" / "research-open.yaml")
    nodes = [{"name": "world", "policy": open_policy}, {"name": "eu", "parent": "world", "policy": str(policy)},
             *({"name": f"eu-{x}", "parent": "eu", "policy": str(policy)} for x in "abc"),
             {"name": "us", "parent": "world", "policy": str(policy)},  # the root needs min_cohort children
             *({"name": f"us-{x}", "parent": "us", "policy": str(policy)} for x in "ab")]
    world = small_world(tmp_path / "w", rounds=1, nodes=nodes)
    ctx = load_context(world)
    cfg = NodeConfig(name="eu-a", role="site", world=world, state=tmp_path / "state",
                     parent={"name": "eu", "address": "127.0.0.1:1", "credentials": tmp_path / "none"},
                     timeouts={"heartbeat": 60})
    events: list[tuple] = []
    node = site_mod.SiteNode(cfg, ctx, NodeIdentity.generate("eu-a"), lambda *a, **k: events.append((a, k)))

    key_phase = Phase(1, "key", 1.0).to_bytes()
    anns = [Announcement(1, ("eu-a", "eu-b", "eu-c"), "ckks", key_phase),  # with the victim eu-b
            Announcement(2, ("eu-a", "eu-c"), "ckks", key_phase),  # the SAME world round again, without eu-b
            Announcement(3, ("eu-a", "eu-c"), "ckks", Phase(1, "final", 1.0).to_bytes())]

    class FakeClient:  # the federation's side of the transport, played by the attacker
        def __init__(self, *a, **k) -> None: ...
        def enroll(self): return SimpleNamespace(federation="eu", current_round=0)
        def heartbeat(self, *a): return 0
        def watch_rounds(self, after_round=None, on_refused=None): yield from anns
        def close(self) -> None: ...

    released: list[tuple[int, tuple[str, ...], np.ndarray]] = []

    def member_round(link, identity, ann, config, vector, *, before_input, ckks=None, **kw):
        assert ckks is not None  # a CKKS round
        before_input(ann.cohort, key_id="ab" * 16)  # the site's ledger entry, as the real session calls it
        released.append((ann.round_id, tuple(ann.cohort), np.array(vector, copy=True)))

    shared_names = set(ctx.key_names) | set(ctx.shared_names)

    def load_broadcast(client, ann):
        node.server = {n: t.clone() for n, t in ctx.init.items() if n in shared_names}

    def train(r):  # training as a small deterministic step
        gen = np.random.default_rng(r)
        for n in ctx.key_names:
            step = torch.from_numpy(gen.standard_normal(tuple(node.site.params[n].shape)))
            node.site.params[n] = node.site.params[n] + 1e-3 * step.to(node.site.params[n].dtype)
        node.trained = r

    monkeypatch.setattr(site_mod, "SiteClient", FakeClient)
    monkeypatch.setattr(site_mod.NodeCredentials, "load", staticmethod(lambda p: None))
    monkeypatch.setattr(release_mod, "member_round", member_round)  # NodeRelease.contribute sends through it
    monkeypatch.setattr(node, "load_broadcast", load_broadcast)
    monkeypatch.setattr(node, "train", train)
    monkeypatch.setattr(node, "evaluate", lambda r: 1.0)
    monkeypatch.setattr(node.receipts, "recover", lambda *a, **k: None)
    node.run()
    entries = [e.release_id for e in node.release.path.ledger_entries("eu-a")]
    node.state.close()

    assert released and released[0][0] == 1, events
    again = [(rid, cohort) for rid, cohort, _ in released[1:]]
    same = all(np.array_equal(v, released[0][2]) for _, _, v in released[1:])
    assert not again, (f"eu-a released world round 1's key update again into link rounds {again} "
                       f"(byte-identical vector: {same}); the victim eu-b is not in that cohort; ledger entries: {entries}")
