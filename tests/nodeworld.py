"""Helpers for the deployed-world tests: small variants of examples/local-world and ledger checks."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
LOCAL_WORLD = REPO / "examples" / "local-world"


def small_world(folder: Path, *, source: str = "world-nodp.yaml", rounds: int = 2, timeouts: dict[str, float] | None = None,
                nodes: list[dict[str, Any]] | None = None) -> Path:
    """A copy of an examples/local-world world in ``folder`` with ``rounds`` rounds and absolute policy
    paths; ``timeouts`` go into nodes/NAME.yaml templates that `world up` reads."""
    src = LOCAL_WORLD / source
    raw = yaml.safe_load(src.read_text())
    raw["schedule"]["rounds"] = rounds
    if nodes is not None:
        raw["nodes"] = nodes
    for n in raw["nodes"]:
        n["policy"] = str((src.parent / n["policy"]).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "world.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if timeouts:
        (folder / "nodes").mkdir(exist_ok=True)
        for n in raw["nodes"]:
            (folder / "nodes" / f"{n['name']}.yaml").write_text(yaml.safe_dump({"timeouts": timeouts}))
    return path


def ledger_ids(state: Path) -> dict[str, list[str]]:
    """node -> its ledger's release ids in order (every ledger verified on the way)."""
    from worldlm_secure.ledger import verify

    out = {}
    for path in sorted((state / "nodes").glob("*/ledger/*.sqlite")):
        rep = verify(path)
        assert rep.ok, f"{path}: {rep.problem}"
        out[rep.node] = [e.release_id for e in rep.entries]
    return out


class Events:
    """Progress events of every node process (the `world up` callback), searchable from the test thread."""

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


def kill9(procs: dict, node: str) -> None:
    """kill -9 one node process and reap it."""
    import os
    import signal

    os.kill(procs[node].process.pid, signal.SIGKILL)
    procs[node].process.wait()


def run_with_one_restart(world_path: Path, state: Path, events: Events, node: str, after: dict[str, object], *,
                         wait: float = 300, timeout: float = 600) -> tuple[Any, dict, dict[str, int]]:
    """`world up` the world, kill -9 ``node`` once ``events`` shows an event matching ``after`` (within
    ``wait`` s), restart it, and wait for every node to exit; returns (world, processes, exit codes).
    Every process still running at the end (a failed test) is killed."""
    from worldlm_secure.node.world_up import prepare, start_world, wait_all

    world, procs = prepare(world_path, state)
    try:
        start_world(world, procs, state, events, how="fork")
        events.wait(wait, **after)
        kill9(procs, node)
        start_world(world, procs, state, events, only={node}, how="fork")
        codes = wait_all(procs, timeout=timeout)
    finally:
        for p in procs.values():
            if p.process is not None and p.process.poll() is None:
                p.process.kill()
    return world, procs, codes


def assert_like_simulate(world_path: Path, deployed_sites: dict[str, dict], state: Path, sim_ledgers: Path,
                         rel: float, why: str) -> None:
    """The deployed world ended where the in-process `simulate` of the same world and seed ends: every
    site's validation perplexity within ``rel`` (``why``: what a larger gap would mean), and every node's
    ledger holds the same release ids as simulate's, all verifying."""
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import simulate
    from worldlm_secure.ledger import verify

    sim = simulate(world_path, methods=[METHODS["worldlm"]], device="cpu", ledger_root=sim_ledgers)
    for site, ppl in sim.methods["worldlm"].sites.items():
        got = deployed_sites[site]["val_ppl"]
        assert abs(got - ppl) / ppl < rel, (site, got, ppl, why)
    ids = ledger_ids(state)
    for path in sim_ledgers.glob("*.sqlite"):
        rep = verify(path)
        assert rep.ok, f"{path}: {rep.problem}"
        assert ids.get(rep.node, []) == [e.release_id for e in rep.entries], rep.node
    assert_receipts_clean(state)


def assert_receipts_clean(state: Path) -> None:
    """Every release of the deployed world is countersigned by its receiver, both copies are kept and agree
    with both ledgers (`ledger audit --require-receipts`, keys pinned from the world's certificates): no
    receipt finding, also after a kill -9 and restart."""
    from worldlm_secure.ledger.audit import audit_ledgers

    rep = audit_ledgers([state], state / "keys", require_receipts=True)
    bad = [line for f, line in zip(rep.findings, rep.lines()) if f.rule.startswith("receipt.")]
    assert not bad, bad
