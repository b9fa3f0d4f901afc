"""Faults with real processes (issue 7): in one deployed world,
  * a site killed with kill -9 after training round 1: its federation's round completes without it;
  * a slow site (SIGSTOP past the federation's dropout time, then SIGCONT): the round completes without it,
    its late messages are refused, and it rejoins the next round;
  * a federation killed with kill -9 mid-round 2 and restarted: it resumes from its checkpoint, the world
    finishes, every ledger verifies, and no ledger entry is lost or duplicated.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from nodeworld import ledger_ids, small_world
from worldlm_secure.node.world_up import collect_results, prepare, start_world, wait_all

MASK = "../policies/masking-open.yaml"
OPEN = "../../policies/research-open.yaml"


def _nodes() -> list[dict]:
    nodes = [{"name": "world", "policy": OPEN}]
    for fed, n, pol in (("eu", 5, MASK), ("us", 3, MASK), ("lab", 1, OPEN)):
        nodes.append({"name": fed, "parent": "world", "policy": pol})
        nodes += [{"name": f"{fed}-{c}", "parent": fed, "policy": pol} for c in "abcde"[:n]]
    return nodes


class Events:
    def __init__(self) -> None:
        self.items: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, ev: dict) -> None:
        with self.lock:
            self.items.append(ev)

    def wait(self, timeout: float, **match: object) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for ev in self.items:
                    if all(ev.get(k) == v for k, v in match.items()):
                        return ev
            time.sleep(0.05)
        raise AssertionError(f"no event {match} within {timeout} s")

    def all(self, **match: object) -> list[dict]:
        with self.lock:
            return [ev for ev in self.items if all(ev.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_site_killed_slow_site_and_federation_restarted(tmp_path: Path) -> None:
    timeouts = {"train": 120, "step": 30, "heartbeat": 1, "dropout": 5}
    world_path = small_world(tmp_path / "w", rounds=3, timeouts=timeouts, nodes=_nodes())
    # The root waits long enough for a restarting federation (imports + restore take ~10-20 s).
    (tmp_path / "w" / "nodes" / "world.yaml").write_text(
        "timeouts: {train: 240, step: 60, heartbeat: 1, dropout: 120}\n"
    )
    state = tmp_path / "state"
    events = Events()
    world, procs = prepare(world_path, state)
    try:
        start_world(world, procs, state, events)
        events.wait(180, node="eu-e", event="trained", round=1)
        os.kill(procs["eu-e"].popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
        events.wait(60, node="eu-d", event="trained", round=1)
        os.kill(procs["eu-d"].popen.pid, signal.SIGSTOP)  # type: ignore[union-attr]
        key1 = events.wait(120, node="eu", event="aggregated", round=1, phase="key")
        os.kill(procs["eu-d"].popen.pid, signal.SIGCONT)  # type: ignore[union-attr]
        assert key1["contributors"] == 3 and set(key1["dropped"]) == {"eu-d", "eu-e"}

        events.wait(240, node="us", event="aggregated", round=2, phase="key")
        os.kill(procs["us"].popen.pid, signal.SIGKILL)  # type: ignore[union-attr]
        procs["us"].popen.wait()  # type: ignore[union-attr]
        start_world(world, procs, state, events, only={"us"})
        codes = wait_all(procs, timeout=600)
    finally:
        for p in procs.values():
            if p.popen is not None and p.popen.poll() is None:
                os.kill(p.popen.pid, signal.SIGCONT)
                p.popen.kill()
    assert codes.pop("eu-e") == -signal.SIGKILL
    assert all(c == 0 for c in codes.values()), codes

    # the slow site's late messages were refused, and it rejoined: released in round 2 and 3
    assert events.all(node="eu-d", event="round_failed")
    assert {e["round"] for e in events.all(node="eu-d", event="released", group="key")} >= {2, 3}
    assert all("eu-e" not in e["dropped"] for e in events.all(node="eu", event="aggregated", round=3))
    # the restarted federation resumed (not from scratch) and its sites re-released round 2 into it
    assert events.all(node="us", event="restored")
    assert len(events.all(node="us", event="announced", round=2, phase="key")) == 2

    ids = ledger_ids(state)  # every ledger verifies (chain, signatures, policies)
    for node, entries in ids.items():
        assert len(entries) == len(set(entries)), f"{node}: duplicated entry"
    rounds = range(1, 4)
    for site in ("us-a", "us-b", "us-c"):
        assert ids[site] == [f"{r}:{g}:us" for r in rounds for g in ("key", "shared")], site
    assert ids["us"] == [f"{r}:{g}:world" for r in rounds for g in ("shared", "residual")]
    assert ids["eu"] == [f"{r}:{g}:world" for r in rounds for g in ("shared", "residual")]
    assert "eu-e" not in ids or all(i.startswith("1:") for i in ids["eu-e"])  # killed in round 1

    payload = collect_results(world, state, 0.0)
    sites = payload["methods"]["worldlm"]["sites"]
    assert set(sites) == {s.name for s in world.sites} - {"eu-e"}
