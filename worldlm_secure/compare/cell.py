"""Running one grid cell through `simulate` and turning its result into one row of numbers.

A cell's result is cached in ``CELL_DIR/result.json`` under its content hash (`cell_key`): the derived
world and every node's effective policy, the run settings, and the code version. A re-run skips a
cell whose stored key matches and whose status is ``ok``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from worldlm_secure import __version__
from worldlm_secure.compare.grid import Cell


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version and a SHA-256 over the library's source files that a simulation runs.

    Hashing the sources (not the git commit) means uncommitted edits invalidate the cache too, and
    edits to parts `simulate` never runs (cli, node, transport) do not.
    """
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in ("cli", "node", "transport", "compare"):
            continue
        h.update(str(rel).encode())
        h.update(p.read_bytes())
    return f"{__version__}+src.{h.hexdigest()[:16]}"


def cell_key(world_path: Path, settings: dict[str, Any]) -> str:
    """Content hash of a cell: its world file, every node's effective policy, the settings, the code."""
    from worldlm_secure.federation.world import load_world

    world = load_world(world_path)
    policies = {n: world.effective_policy(n).sha256 for n in sorted(world.nodes)}
    doc = {
        "world": world_path.read_text(),
        "policies": policies,
        "settings": settings,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CellRun:
    """What a worker needs to run one cell (plain data: it crosses process boundaries for Ray)."""

    cell_id: str
    variation: dict[str, Any]
    method: str
    world_path: str
    folder: str
    rounds: int | None
    device: str
    seed: int | None
    threads: int | None = None


def metrics(result: Any, world: Any, method: str) -> dict[str, Any]:
    """One cell's numbers from a `SimulationResult` (see `compare.study` for the column meanings)."""
    m = result.methods[method]
    parent = {s.name: str(s.parent) for s in world.sites}
    feds = sorted({parent[s] for s in m.sites})
    rounds_done = m.rounds[-1].round if m.rounds else 0
    if m.stopped:  # the stopping round released nothing
        rounds_done = max(0, rounds_done - 1)
    n_sites = len(m.sites)
    per = max(1, rounds_done) * max(1, n_sites)
    eps_fed: dict[str, float | None] = {}
    for f in feds:
        vals = [e for stream, e in m.stats.epsilon.items() if parent.get(stream.split("/")[0]) == f]
        eps_fed[f] = max(vals) if vals else None
    eps_known = [e for e in eps_fed.values() if e is not None]
    plain = getattr(m.stats, "plain_bytes_up", 0.0)
    return {
        "mean_val_ppl": m.mean_val_ppl,
        "fed_val_ppl": {f: float(np.mean([v for s, v in m.sites.items() if parent[s] == f])) for f in feds},
        "site_val_ppl": dict(sorted(m.sites.items())),
        "epsilon_max": max(eps_known) if eps_known else None,
        "fed_epsilon": eps_fed,
        "epsilon_streams": dict(sorted(m.stats.epsilon.items())),
        "rounds_done": rounds_done,
        "sites": n_sites,
        "bytes_up_per_round_per_site": m.stats.bytes_up / per,
        "bytes_down_per_round_per_site": m.stats.bytes_down / per,
        "bytes_up": m.stats.bytes_up,
        "bytes_down": m.stats.bytes_down,
        "expansion": (m.stats.bytes_up / plain) if plain else None,
        "protocols": dict(m.stats.by_protocol),
        "releases": m.stats.releases,
        "clipped_fraction_max": m.stats.clipped_fraction_max,
        "train_s": m.train_s,
        "protect_s": m.stats.protect_seconds,
        "other_s": max(0.0, m.wall_s - m.train_s - m.stats.protect_seconds),
        "wall_s": m.wall_s,
        "stopped": m.stopped,
        "curve": [{"round": r.round, "mean_val_ppl": r.mean_val_ppl} for r in m.rounds],
    }


def run_cell(run: CellRun, key: str, on_round: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Run one cell with the real protections; never raises: a failure is recorded with its reason.

    Writes ``folder/result.json`` (and ``folder/error.txt`` with the traceback on failure); ledgers go to
    ``folder/ledgers`` (cleared first: a cell interrupted mid-run starts over with fresh budgets).
    """
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.results import write_json_atomic
    from worldlm_secure.federation.simulate import simulate
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.train import set_threads

    folder = Path(run.folder)
    ledgers = folder / "ledgers"
    if ledgers.exists():
        shutil.rmtree(ledgers)
    (folder / "error.txt").unlink(missing_ok=True)
    record: dict[str, Any] = {"cell": run.cell_id, "variation": run.variation, "key": key}
    start = time.perf_counter()
    try:
        if run.threads is not None:
            set_threads(run.threads)
        result = simulate(
            run.world_path,
            methods=[METHODS[run.method]],
            rounds=run.rounds,
            device=run.device,
            seed=run.seed,
            ledger_root=ledgers,
            on_round=(lambda _m, rec: on_round(rec.round, rec.mean_val_ppl)) if on_round else None,
        )
        record.update(status="ok", error=None, **metrics(result, load_world(run.world_path), run.method))
    except Exception as exc:  # noqa: BLE001 - a failing cell is recorded and the study continues
        (folder / "error.txt").write_text(traceback.format_exc())
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    record["cell_wall_s"] = time.perf_counter() - start
    write_json_atomic(folder / "result.json", record)
    return record


def cached(folder: Path, key: str) -> dict[str, Any] | None:
    """The stored result of a finished cell with this content hash (None: run it)."""
    path = folder / "result.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == key and rec.get("status") == "ok" else None
