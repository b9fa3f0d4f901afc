"""`world up`: a whole world as separate OS processes on loopback, each a real `node start` over gRPC + mTLS.

    STATE/ca/NAME/                 one CA per aggregator (root and each federation)
    STATE/keys/NAME/{down,up}/     each node's credentials (`keys issue`); a federation's two certificates
                                   bind one signing key
    STATE/rosters/NAME.txt         each aggregator's children
    STATE/nodes/NAME/              each node's state folder (state.sqlite, checkpoints, ledger/, results.json)
    STATE/configs/NAME.yaml        the node.yaml each process ran (the example's, with ports and paths filled in)
    STATE/logs/NAME.log            each process's stderr

Nodes start top-down (the root, then federations, then sites), each after its parent wrote the address it
listens on, each a fresh interpreter or forked from a warm one (`node.launcher`). Progress is read from every process's JSON-lines stdout. At the end, the sites' results are
collected into the same results.json `simulate` writes (method "worldlm").
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from worldlm_secure.errors import ConfigError, WorldLMError
from worldlm_secure.federation.world import World, load_world
from worldlm_secure.node.launcher import Launch, NodeHandle, start_node_process
from worldlm_secure.transport import keys

OnEvent = Callable[[dict[str, Any]], None]


@dataclass
class NodeProcess:
    name: str
    role: str
    config: Path
    policy: Path
    log: Path
    process: NodeHandle | None = None
    reader: threading.Thread | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


def _role(world: World, name: str) -> str:
    return world.nodes[name].kind


def issue_world_keys(world: World, state: Path) -> None:
    """One CA per aggregator; every node's certificates and signing key; rosters. Idempotent."""
    for agg in [world.root, *world.federations]:
        ca = state / "ca" / agg.name
        if not (ca / keys.CA_CERT).is_file():
            keys.init_ca(agg.name, ca)
        down = state / "keys" / agg.name / "down"
        if not (down / keys.NODE_CERT).is_file():
            keys.issue_node(ca, agg.name, down)
        roster = state / "rosters" / f"{agg.name}.txt"
        roster.parent.mkdir(parents=True, exist_ok=True)
        roster.write_text("".join(f"{c}\n" for c in sorted(agg.children)))
    for node in world.nodes.values():
        if node.parent is None:
            continue
        up = state / "keys" / node.name / "up"
        if (up / keys.NODE_CERT).is_file():
            continue
        signing = state / "keys" / node.name / "down" / keys.NODE_SIGNING_KEY
        keys.issue_node(state / "ca" / node.parent, node.name, up, signing_key=signing if signing.is_file() else None)


def _node_config(world: World, name: str, state: Path, template: dict[str, Any], parent_address: str | None,
                 listen: str = "127.0.0.1:0") -> dict[str, Any]:
    node = world.nodes[name]
    cfg: dict[str, Any] = {k: v for k, v in template.items() if k in ("device", "timeouts")}
    cfg.update(name=name, role=node.kind, world=str(world.path.resolve()), state=str(state / "nodes" / name))
    if node.parent is not None:
        cfg["parent"] = {"name": node.parent, "address": parent_address, "credentials": str(state / "keys" / name / "up")}
    if node.kind != "site":
        cfg["serve"] = {"listen": listen, "credentials": str(state / "keys" / name / "down"),
                        "roster": str(state / "rosters" / f"{name}.txt")}
    return cfg


def _templates(world: World) -> dict[str, dict[str, Any]]:
    """The example's own node configs (WORLD_DIR/nodes/NAME.yaml), for their timeouts and device."""
    out = {}
    for name in world.nodes:
        p = world.path.parent / "nodes" / f"{name}.yaml"
        out[name] = yaml.safe_load(p.read_text()) if p.is_file() else {}
    return out


def _read(proc: NodeProcess, on_event: OnEvent, lock: threading.Lock) -> None:
    assert proc.process is not None and proc.process.stdout is not None
    for line in proc.process.stdout:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        proc.events.append(ev)
        with lock:
            on_event(ev)


def _wait_address(path: Path, proc: NodeProcess, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        if proc.process is not None and proc.process.poll() is not None:
            raise WorldLMError(f"node {proc.name} exited with code {proc.process.returncode} before listening; see {proc.log}")
        time.sleep(0.1)
    raise WorldLMError(f"node {proc.name} did not listen within {timeout:.0f} s; see {proc.log}")


def launch(proc: NodeProcess, on_event: OnEvent, lock: threading.Lock, how: Launch = "exec") -> None:
    """Start ``proc`` as `node start` (``how``: a fresh interpreter or forked, `node.launcher`) and follow its events."""
    proc.log.parent.mkdir(parents=True, exist_ok=True)
    argv = ["node", "start", "--policy", str(proc.policy), "--config", str(proc.config)]
    proc.process = start_node_process(argv, proc.log, how)
    proc.reader = threading.Thread(target=_read, args=(proc, on_event, lock), daemon=True)
    proc.reader.start()


def _deployable(world_path: str | Path) -> World:
    """The world, refused unless it is root -> federations -> sites (what nodes run)."""
    world = load_world(world_path)
    if world.is_flat:
        raise ConfigError(f"{world_path}: world up needs root -> federations -> sites")
    return world


def plan_world_up(world_path: str | Path) -> dict[str, Any]:
    """What `world up` would run, with nothing issued, written or started (`world up --dry-run`).

    The plan `simulate --dry-run` prints for method worldlm (the one nodes run; `plan_simulation`), after
    the checks `node start` makes before it opens a port (`check_supported`). JSON-ready.
    """
    from worldlm_secure.federation.simulate import plan_world
    from worldlm_secure.node.context import load_context
    from worldlm_secure.node.release import check_supported

    _deployable(world_path)
    check_supported(load_context(Path(world_path)))
    return plan_world(world_path)


def prepare(world_path: Path, state: Path) -> tuple[World, dict[str, NodeProcess]]:
    """Keys, rosters and node configs for every node of the world (nothing started)."""
    world = _deployable(world_path)
    state = state.resolve()
    issue_world_keys(world, state)
    templates = _templates(world)
    procs = {}
    for name, node in world.nodes.items():
        procs[name] = NodeProcess(name, node.kind, state / "configs" / f"{name}.yaml", node.policy_path, state / "logs" / f"{name}.log")
    return world, procs


def write_config(world: World, state: Path, name: str, parent_address: str | None, listen: str = "127.0.0.1:0") -> None:
    cfg = _node_config(world, name, state.resolve(), _templates(world)[name], parent_address, listen)
    path = state.resolve() / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def start_world(world: World, procs: dict[str, NodeProcess], state: Path, on_event: OnEvent,
                only: set[str] | None = None, listen_timeout: float = 120.0, how: Launch = "exec") -> threading.Lock:
    """Start the nodes top-down (``only``: a subset, e.g. to restart one; ``how``: `node.launcher`)."""
    lock = threading.Lock()
    state = state.resolve()
    order = [world.root.name] + sorted(f.name for f in world.federations) + sorted(s.name for s in world.sites)
    for name in order:
        if only is not None and name not in only:
            continue
        node = world.nodes[name]
        parent_addr = None
        if node.parent is not None:
            parent_addr = _wait_address(state / "nodes" / node.parent / "address", procs[node.parent], listen_timeout)
        listen = "127.0.0.1:0"
        if node.kind != "site":
            addr = state / "nodes" / name / "address"
            if addr.is_file() and addr.read_text().strip():
                listen = addr.read_text().strip()  # a restarted node keeps its port: its children know only that
            addr.unlink(missing_ok=True)
        write_config(world, state, name, parent_addr, listen)
        launch(procs[name], on_event, lock, how)
    return lock


def wait_all(procs: dict[str, NodeProcess], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for name, p in procs.items():
        assert p.process is not None
        try:
            codes[name] = p.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.process.kill()
            codes[name] = p.process.wait()
        if p.reader is not None:
            p.reader.join(timeout=5)
    return codes


def _wait_fail_fast(procs: dict[str, NodeProcess], timeout: float) -> dict[str, int]:
    """Wait for every node; if one fails (non-zero exit) the world cannot finish: stop the others."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = {n: p.process.poll() for n, p in procs.items() if p.process is not None}
        if all(c is not None for c in codes.values()):
            break
        if any(c not in (None, 0) for c in codes.values()):
            for p in procs.values():
                if p.process is not None and p.process.poll() is None:
                    p.process.terminate()
            break
        time.sleep(0.2)
    return wait_all(procs, 10.0)


def collect_results(world: World, state: Path, wall_s: float) -> dict[str, Any]:
    """The sites' results.json files as one `simulate`-style results.json (method "worldlm")."""
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import load_world_data

    settings = settings_for(world, device="cpu")
    sites = sorted(s.name for s in world.sites)
    per = {}
    for s in sites:
        p = state / "nodes" / s / "results.json"
        if p.is_file():
            per[s] = json.loads(p.read_text())
    data, _ = load_world_data(world, settings) if settings.synthetic is not None else ({}, 0)
    floors = {s: d.floor_ppl for s, d in data.items() if d.floor_ppl is not None}
    rounds = sorted({r["round"] for v in per.values() for r in v["rounds"]})
    recs = []
    for r in rounds:
        vals = [x["val_ppl"] for v in per.values() for x in v["rounds"] if x["round"] == r]
        losses = [v["losses"].get(str(r)) for v in per.values() if v["losses"].get(str(r)) is not None]
        recs.append({"round": r, "mean_val_ppl": float(np.mean(vals)), "train_loss": float(np.mean(losses)) if losses else None})
    site_ppl = {s: {"val_ppl": v["val_ppl"]} for s, v in per.items() if v.get("val_ppl") is not None}
    from dataclasses import asdict

    return {
        "world": world.name,
        "entropy_floor_ppl": float(np.mean(list(floors.values()))) if floors else None,
        "site_floors": dict(sorted(floors.items())),
        "methods": {"worldlm": {
            "mean_val_ppl": float(np.mean([v["val_ppl"] for v in site_ppl.values()])) if site_ppl else None,
            "sites": site_ppl, "rounds": recs, "wall_s": wall_s, "deployment": "world up (gRPC + mTLS, one process per node)",
            "missing_sites": [s for s in sites if s not in site_ppl],
        }},
        "settings": {"rounds": settings.rounds, "seq_len": settings.seq_len, "seed": settings.seed, "device": "cpu",
                     "model": asdict(settings.model), "train": asdict(settings.train)},
        "wall_s": wall_s,
    }


def world_up(world_path: str | Path, state: str | Path, *, on_event: OnEvent | None = None, timeout: float = 1800.0,
             launch: Launch = "exec") -> dict[str, Any]:
    """Issue keys, start every node as its own process, wait for the world to finish, collect results.

    ``launch``: ``"exec"`` starts each node as a fresh ``worldlm-secure node start``; ``"fork"`` forks each from
    one interpreter that imported torch once (`node.launcher`; ~4 CPU-s less per node; the calling script needs
    an ``if __name__ == "__main__":`` guard)."""
    start = time.perf_counter()
    state = Path(state).resolve()
    if (state / "nodes").exists() and any((state / "nodes").rglob("*.sqlite")):
        raise ConfigError(f"{state}: a world already ran here (ledgers and round state exist); choose a new --state folder")
    world, procs = prepare(Path(world_path), state)
    try:
        start_world(world, procs, state, on_event or (lambda ev: None), how=launch)
        codes = _wait_fail_fast(procs, timeout)
    finally:
        for p in procs.values():
            if p.process is not None and p.process.poll() is None:
                p.process.kill()
    failed = {n: c for n, c in codes.items() if c != 0}
    payload = collect_results(world, state, time.perf_counter() - start)
    payload["exit_codes"] = codes
    payload["launch"] = launch
    if failed:
        payload["failed_nodes"] = failed
    return payload
