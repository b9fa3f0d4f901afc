"""The library entry points re-exported by `worldlm_secure` (`from worldlm_secure import simulate, ...`).

What the command line does, as functions: the CLI only parses options and renders what these return.

    world = load_world("examples/world.yaml")            # checked tree, policies and data files
    result = simulate(world, methods=["worldlm", "fedavg"], rounds=2, ledger_dir="runs/x/ledgers")
    result.save("runs/x")                                 # results.json + perplexity_*.png, as the CLI writes
    report = verify_ledger("runs/x/ledgers/eu-a.sqlite")  # ledger.verification.verify
    study = run_study("examples/pet-study.yaml", "runs/study")

Imported on first use (PEP 562 in `worldlm_secure/__init__.py`): `import worldlm_secure` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldlm_secure.errors import ConfigError

if TYPE_CHECKING:  # torch-heavy modules: imported inside the functions
    from worldlm_secure.compare import Grid, StudyResult
    from worldlm_secure.federation.methods import Method
    from worldlm_secure.federation.simulate import SimulationResult
    from worldlm_secure.federation.world import World

BACKENDS = ("inprocess", "ray")
MethodSpec = str | Sequence["str | Method"] | None


def _world_path(world: str | Path | World) -> Path:
    """A world file's path, from a path or a loaded `World` (runs reload it: every check runs again)."""
    return Path(world) if isinstance(world, (str, Path)) else Path(world.path)


def _methods(spec: MethodSpec) -> list[Method]:
    """``None`` (every federated method), a comma list, or a sequence of names and `Method`s."""
    from worldlm_secure.federation.methods import Method, parse_methods

    if spec is None or isinstance(spec, str):
        return parse_methods(spec)
    out: list[Method] = []
    for m in spec:
        out.extend([m] if isinstance(m, Method) else parse_methods(m))
    if not out:
        raise ConfigError("methods: name at least one method")
    return out


def simulate(
    world: str | Path | World,
    *,
    backend: str = "inprocess",
    methods: MethodSpec = None,
    rounds: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    ledger_dir: str | Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    ray_scope: str = "sites",
) -> SimulationResult:
    """Train ``methods`` on ``world`` and return a `SimulationResult` (``.save(dir)``, ``.to_dict()``).

    ``backend``: ``inprocess`` (this process) or ``ray`` (extra ``worldlm-secure[ray]``; ``address``,
    ``cpus_per_task``, ``gpus_per_task``, ``ray_scope`` as `simulate --backend ray`). ``ledger_dir``: every
    node's signed privacy ledger goes there (WorldLM's at ``ledger_dir/NODE.sqlite``, a baseline's at
    ``ledger_dir/METHOD/NODE.sqlite``); None keeps no ledger. ``on_progress`` (in-process only) gets one
    dict per round and method (method, round, rounds, loss, ppl, epsilon, seconds).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    chosen = _methods(methods)
    path = _world_path(world)
    ledgers = None if ledger_dir is None else Path(ledger_dir)
    if backend == "ray":
        from worldlm_secure.federation.ray_backend import simulate_on_ray

        result: SimulationResult = simulate_on_ray(
            path, methods=chosen, rounds=rounds, device=device, seed=seed, ledger_root=ledgers, address=address,
            cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, scope=ray_scope,
        )
        return result
    from worldlm_secure.federation.simulate import simulate as simulate_inprocess

    return simulate_inprocess(path, methods=chosen, rounds=rounds, device=device, seed=seed, ledger_root=ledgers,
                              on_progress=on_progress)


def run_study(grid: str | Path | Grid, out: str | Path, **kwargs: Any) -> StudyResult:
    """A PET trade-off study (`worldlm-secure compare`): every cell of ``grid`` (a grid YAML or a loaded
    `Grid`) through `simulate`, written into ``out`` (compare.json, compare.csv, plots, summary.md).
    ``kwargs``: `compare.study.run_study`'s (``backend``, ``threads``, ``on_cell_done``, ...)."""
    from worldlm_secure.compare import load_grid
    from worldlm_secure.compare import run_study as run

    return run(load_grid(grid) if isinstance(grid, (str, Path)) else grid, out, **kwargs)


__all__ = ["BACKENDS", "run_study", "simulate"]
