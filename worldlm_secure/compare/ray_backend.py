"""Cells of a `compare` grid as Ray tasks (``--backend ray``): one task per cell, with its own CPUs.

Each task runs `cell.run_cell` on the cell's derived world, exactly as the in-process backend does,
and writes the cell's ``result.json`` and ledgers into the cell's folder (the workers must see the
study folder at the same path: a local instance, or a shared file system on a cluster). The driver
records each result as it arrives, so compare.json/csv stay current and a crash loses only running cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from worldlm_secure.compare.cell import CellRun, run_cell
from worldlm_secure.federation.ray_backend import ensure_ray


def _cell_task(run: CellRun, key: str) -> dict[str, Any]:
    if run.threads is None:  # Ray pins OMP threads to the task's CPUs; torch follows the same count
        from dataclasses import replace

        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        run = replace(run, threads=max(1, int(cpus)))
    return run_cell(run, key)


def run_cells_on_ray(
    todo: list[tuple[CellRun, str]],
    done: Callable[[dict[str, Any]], None],
    *,
    address: str | None = None,
    cpus_per_cell: float = 1.0,
    on_cell_start: Callable[[str], None] | None = None,
) -> None:
    """Submit every cell, then hand each result to ``done`` as soon as it finishes."""
    if not todo:
        return
    ray = ensure_ray(address)
    task = ray.remote(num_cpus=cpus_per_cell)(_cell_task)
    refs = {}
    for run, key in todo:
        refs[task.remote(run, key)] = run.cell_id
        if on_cell_start:
            on_cell_start(run.cell_id)
    runs = {run.cell_id: (run, key) for run, key in todo}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            rec = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - the worker itself died (e.g. out of memory): record, go on
            run, key = runs[refs[ready[0]]]
            rec = {"cell": run.cell_id, "variation": run.variation, "key": key, "status": "failed",
                   "error": f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        done({**rec, "cached": False})
