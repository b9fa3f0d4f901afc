"""Every node checks that it loaded the base model its aggregator announces (issue #17 item 1): rounds carry
the aggregator's base-weights hash, and a site that loaded another base refuses to join, naming the world
file's model field and both hashes. Its ledger entries record the base it loaded."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from nodeworld import small_world

from worldlm_secure.node.config import NodeConfig
from worldlm_secure.node.context import load_context
from worldlm_secure.node.rounds import BaseMismatch, Phase
from worldlm_secure.node.site import SiteNode
from worldlm_secure.transport.handler import Announcement
from worldlm_secure.transport.testing import make_pki, start_federation

OTHER = "ab" * 32


def test_a_phase_carries_the_base_and_old_announcements_still_parse() -> None:
    p = Phase(3, "shared", 2.0, "cd" * 32)
    assert Phase.from_announcement(Announcement(1, (), "none", p.to_bytes())) == p
    old = Phase(3, "shared", 2.0)  # no base: the bytes are what they were before the field existed
    assert b"base" not in old.to_bytes() and Phase.from_announcement(Announcement(1, (), "none", old.to_bytes())) == old
    with pytest.raises(BaseMismatch) as info:
        p.check_base(OTHER, node="s", aggregator="f", where="w.yaml model.pretrained (/ckpt)")
    msg = str(info.value)
    assert "w.yaml model.pretrained (/ckpt)" in msg and OTHER in msg and "cd" * 32 in msg and "refuses" in msg
    p.check_base("cd" * 32, node="s", aggregator="f", where="w")  # the same base joins
    old.check_base(OTHER, node="s", aggregator="f", where="w")  # an aggregator that announces none: nothing to check


def test_a_site_refuses_a_round_announced_for_another_base(tmp_path: Path) -> None:
    nodes = [{"name": "world", "policy": "../../policies/research-open.yaml"},
             {"name": "f0", "parent": "world", "policy": "../../policies/research-open.yaml"},
             {"name": "f0-s0", "parent": "f0", "policy": "../../policies/research-open.yaml"}]
    world = small_world(tmp_path / "w", rounds=1, nodes=nodes)
    ctx = load_context(world)
    assert ctx.base_hash is not None and len(ctx.base_hash) == 64
    pki = make_pki(tmp_path / "pki", "ca", ["f0", "f0-s0"])
    server, board = start_federation(pki, "f0", ["f0-s0"])
    cfg = NodeConfig(name="f0-s0", role="site", world=world, state=tmp_path / "state",
                     parent={"name": "f0", "address": server.target, "credentials": pki.nodes["f0-s0"]},
                     timeouts={"heartbeat": 1})
    site = SiteNode(cfg, ctx, pki.identity("f0-s0"), lambda *a, **k: None)
    assert site.base_hash == ctx.base_hash and site.release.path.base_hash == ctx.base_hash
    out: dict[str, BaseException] = {}

    def run() -> None:
        try:
            site.run()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while "f0-s0" not in board.members and time.monotonic() < deadline:
            time.sleep(0.05)
        board.announce(Announcement(1, ("f0-s0",), "none", Phase(1, "key", 1.0, OTHER).to_bytes(),
                                    int((time.time() + 60) * 1000)))
        t.join(60)
    finally:
        server.stop(0)
    err = out.get("error")
    assert isinstance(err, BaseMismatch), err
    assert str(world) in str(err) and "model" in str(err) and OTHER in str(err) and ctx.base_hash in str(err)
    assert board.updates(1) == {}  # nothing was released for that round
