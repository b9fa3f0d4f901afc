"""A record-level (DP-SGD) site killed between training and releasing: restarted from its checkpoint it
still charges that round's DP-SGD steps on its next release; once charged, never again."""

from __future__ import annotations

from pathlib import Path

from nodeworld import small_world
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import load_context
from worldlm_secure.node.site import SiteNode


def test_restarted_dp_sgd_site_charges_its_checkpointed_steps_once(tmp_path: Path) -> None:
    rec = "../policies/record-dp.yaml"
    nodes = [{"name": "world", "policy": rec}, {"name": "f0", "parent": "world", "policy": rec},
             {"name": "f0-s0", "parent": "f0", "policy": rec}]
    world = small_world(tmp_path / "w", rounds=2, nodes=nodes)
    ctx = load_context(world)
    cfg = NodeConfig(name="f0-s0", role="site", world=world, state=tmp_path / "state",
                     parent={"name": "f0", "address": "127.0.0.1:1", "credentials": tmp_path / "none"})
    ident = NodeIdentity.generate("f0-s0")
    site = SiteNode(cfg, ctx, ident, lambda *a, **k: None)
    assert site.record is not None and site.record.uncharged_steps == 0
    site.train(1)
    steps = ctx.settings.train.local_steps
    assert site.record.uncharged_steps == steps
    site.state.close()

    again = SiteNode(cfg, ctx, ident, lambda *a, **k: None)  # "kill -9" after the checkpoint: a new process
    assert again.trained == 1 and again.record.uncharged_steps == steps  # not lost
    # the key release charges them (and writes the DP-SGD entry) ...
    names = ctx.key_names
    prep = again.release.prepare(1, "key", "f0", "f0", ["f0-s0"], {n: again.site.params[n] - ctx.init[n] for n in names},
                                 __import__("numpy").ones(len(names)), names, {n: ctx.init[n].shape for n in names}, derived=False)
    again.release.record(1, "key", "f0", names, prep, ["f0-s0"], ["f0-s0"], link_round=1)
    entries = again.release.path.ledger_entries("f0-s0")
    assert [(e.release_id, e.mechanism, e.steps) for e in entries] == [("1:key:f0", "dp_sgd", steps)]
    again.state.close()
    third = SiteNode(cfg, ctx, ident, lambda *a, **k: None)  # ... and a restart after that charges nothing more
    assert third.record.uncharged_steps == 0
    third.state.close()
