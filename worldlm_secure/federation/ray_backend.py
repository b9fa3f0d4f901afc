"""The Ray backend of `simulate` (optional extra `worldlm-secure[ray]`): methods run as Ray tasks.

Each method of a simulation is one Ray task with its own CPUs (``cpus_per_task``, and ``gpus_per_task``
when the cluster has GPUs): the task loads the world and its data, builds the same initial model from
the seed and runs the same `Engine` as the in-process backend, so per-site results are identical for
a fixed seed (DP noise aside: it comes from a CSPRNG). Ledgers are written by the task, under
``ledger_root`` as in-process (the workers must see that path: a local instance or a shared file system).

Not (yet) distributed here: the sites *within* one method. They train one after the other inside the
method's task, and every secure-aggregation member side runs in that task too, as in-process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import MethodResult
from worldlm_secure.federation.methods import METHODS, Method


def ensure_ray(address: str | None = None) -> Any:
    """Import Ray and connect: to ``address`` if given, else to the running instance, else a new local one."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--backend ray: Ray is not installed; install the extra: pip install 'worldlm-secure[ray]'"
        ) from None
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"num_cpus": os.cpu_count()}
        ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
    return ray


def _run_method_task(
    world_path: str, method: str, rounds: int | None, device: str, seed: int | None,
    ledger_root: str | None, threads: int,
) -> MethodResult:
    """Body of one Ray task: one method on one world, exactly as the in-process backend runs it."""
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import load_world_data, run_method
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.train import set_threads

    set_threads(threads)
    world = load_world(world_path)
    settings = settings_for(world, rounds=rounds, device=device, seed=seed)
    data, vocab = load_world_data(world, settings)
    return run_method(world, settings, data, vocab, METHODS[method],
                      ledger_root=Path(ledger_root) if ledger_root else None)


def simulate_on_ray(
    world_path: str | Path,
    *,
    methods: Sequence[Method],
    rounds: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    ledger_root: Path | None = None,
    address: str | None = None,
    cpus_per_task: float = 1.0,
    gpus_per_task: float = 0.0,
    on_method_done: Callable[[MethodResult], None] | None = None,
) -> Any:
    """`simulate` with every method as one Ray task; returns the same `SimulationResult`."""
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import SimulationResult, load_world_data
    from worldlm_secure.federation.world import load_world

    start = time.perf_counter()
    if ledger_root is not None and any(Path(ledger_root).rglob("*.sqlite")):
        raise ConfigError(
            f"{ledger_root}: ledgers from an earlier run are there (budgets already spent); "
            "choose a new --out or move them away"
        )
    world = load_world(world_path)  # fail here, in the driver, on a bad world: before any task starts
    settings = settings_for(world, rounds=rounds, device=device, seed=seed)
    ray = ensure_ray(address)
    task = ray.remote(num_cpus=cpus_per_task, num_gpus=gpus_per_task)(_run_method_task)
    threads = max(1, int(cpus_per_task))
    refs = {
        task.remote(str(Path(world_path).resolve()), m.name, rounds, device, seed,
                    str(Path(ledger_root).resolve()) if ledger_root else None, threads): m.name
        for m in methods
    }
    results: dict[str, MethodResult] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        res = ray.get(ready[0])
        results[refs[ready[0]]] = res
        if on_method_done:
            on_method_done(res)
    data, _ = load_world_data(world, settings)  # the floors only (synthetic data: cheap and deterministic)
    floors = {s: d.floor_ppl for s, d in data.items() if d.floor_ppl is not None}
    ordered = {m.name: results[m.name] for m in methods}
    return SimulationResult(world.name, settings, floors, ordered, time.perf_counter() - start)
