"""`compare`: run every cell of a grid through `simulate` and write the study's tables and plots.

Outputs in the study folder (column meanings in `report.CSV_COLUMNS`):
- ``compare.json``: ``{"grid", "world", "rounds", "code_version", "backend", "cells": [CELL...],
  "wall_s", "complete"}``; every cell has ``cell``, ``variation``, ``status`` (ok | failed), ``error``,
  ``cached`` and, when ok, its numbers (`cell.metrics`);
- ``compare.csv``: one row per cell; ``summary.md``; ``ppl_vs_epsilon.png``, ``bytes_per_round.png``,
  ``time_breakdown.png``;
- ``cells/CELL/``: the cell's derived world and policies, its ledgers and ``result.json``.
``compare.json`` and ``compare.csv`` are rewritten after every cell, so a crash loses at most the
cell that was running.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worldlm_secure.compare.cell import CellRun, cached, cell_key, code_version, run_cell
from worldlm_secure.compare.derive import write_cell_world
from worldlm_secure.compare.grid import Grid
from worldlm_secure.compare.report import write_csv, write_plots, write_summary
from worldlm_secure.federation.results import write_json_atomic


@dataclass(frozen=True)
class StudyResult:
    out: Path
    cells: list[dict[str, Any]]
    wall_s: float
    files: list[Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["status"] != "ok"]


def prepare(grid: Grid, out: Path, threads: int | None = None) -> list[tuple[CellRun, str]]:
    """Write every cell's derived world and policies; returns each cell's run and content hash.

    A cell whose files cannot even be written or loaded gets the key ``invalid:REASON`` and fails when run.
    """
    runs = []
    for cell in grid.cells:
        folder = out / "cells" / cell.cell_id
        world = write_cell_world(grid.world, cell, grid.protocol_params, folder)
        run = CellRun(cell.cell_id, cell.variation, cell.method, str(world), str(folder),
                      grid.rounds, grid.device, cell.seed, threads)
        settings = {"method": cell.method, "rounds": grid.rounds, "seed": cell.seed, "device": grid.device}
        try:
            key = cell_key(world, settings)
        except Exception as exc:  # noqa: BLE001 - an unloadable cell is recorded by run_cell, not fatal here
            key = f"invalid:{type(exc).__name__}"
        runs.append((run, key))
    return runs


def run_study(
    grid: Grid,
    out: str | Path,
    *,
    backend: str = "inprocess",
    address: str | None = None,
    threads: int | None = None,
    cpus_per_cell: float = 1.0,
    on_cell_start: Callable[[str], None] | None = None,
    on_cell_done: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[str, int, float], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> StudyResult:
    """Run every cell of ``grid`` (skipping cached ones) and write the study's outputs into ``out``.

    ``backend``: ``inprocess`` (one cell after the other in this process) or ``ray`` (one Ray task per
    cell with ``cpus_per_cell`` CPUs, on a local instance or the cluster at ``address``; the workers must
    see ``out`` at the same path). ``meta`` (e.g. the command line, machine load) is stored in compare.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = prepare(grid, out, threads)
    results: dict[str, dict[str, Any]] = {}
    header = {
        "grid": str(grid.path),
        "name": grid.name,
        "description": grid.description,
        "world": str(grid.world),
        "rounds": grid.rounds,
        "code_version": code_version(),
        "backend": backend,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        **(meta or {}),
    }

    def done(rec: dict[str, Any]) -> None:
        results[rec["cell"]] = rec
        ordered = [results[r.cell_id] for r, _ in runs if r.cell_id in results]
        write_json_atomic(out / "compare.json", {**header, "cells": ordered, "complete": False,
                                                 "wall_s": time.perf_counter() - start})
        write_csv(ordered, out / "compare.csv")
        if on_cell_done:
            on_cell_done(rec)

    todo = []
    for run, key in runs:
        hit = cached(Path(run.folder), key)
        if hit is not None:
            done({**hit, "cached": True})
        else:
            todo.append((run, key))
    if backend == "inprocess":
        for run, key in todo:
            if on_cell_start:
                on_cell_start(run.cell_id)
            cb = (lambda r, p, c=run.cell_id: on_round(c, r, p)) if on_round else None
            done({**run_cell(run, key, on_round=cb), "cached": False})
    elif backend == "ray":
        from worldlm_secure.compare.ray_backend import run_cells_on_ray

        run_cells_on_ray(todo, done, address=address, cpus_per_cell=cpus_per_cell, on_cell_start=on_cell_start)
    else:
        raise ValueError(f"backend: {backend!r} is not one of inprocess, ray")
    cells = [results[r.cell_id] for r, _ in runs]
    wall = time.perf_counter() - start
    header["load_average_at_end"] = list(os.getloadavg())
    write_json_atomic(out / "compare.json", {**header, "cells": cells, "complete": True, "wall_s": wall,
                                             "cells_computed": sum(not c.get("cached") for c in cells)})
    files = [out / "compare.json", write_csv(cells, out / "compare.csv")]
    files += write_plots(cells, out, title=grid.name)
    files.append(write_summary(cells, out / "summary.md", header={**header, "wall_s": wall}))
    return StudyResult(out, cells, wall, files)

