"""The Ray backend of `simulate` (optional extra `worldlm-secure[ray]`), at one of two scopes.

- ``scope="sites"`` (the default): the methods run one after the other in this process, each with
  every site as a Ray actor on its own CPUs/GPU (`ray_sites.RayEngine`) that trains, evaluates and runs
  its member side (clip, encode, SecAgg+ masking, distributed noise share); policies, the aggregator
  side, CKKS, central noise and ledgers stay in this process.
- ``scope="methods"``: each method is one Ray task with its own CPUs that runs the in-process
  `Engine` (sites one after the other inside the task) — for many methods on few cores, or a cluster.
Either way the engine, data, initial model and per-site generators are the in-process ones, so
per-site results are identical for a fixed seed (DP noise aside: it comes from a CSPRNG). Ledgers go
under ``ledger_root`` as in-process (Ray workers must see that path: a local instance or a shared
file system).
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
    scope: str = "sites",
    on_method_done: Callable[[MethodResult], None] | None = None,
) -> Any:
    """`simulate` on Ray (see the module docstring for ``scope``); returns the same `SimulationResult`.

    ``cpus_per_task`` / ``gpus_per_task`` are what Ray reserves for each site actor (scope ``sites``)
    or each method task (scope ``methods``).
    """
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
    if scope not in ("sites", "methods"):
        raise ConfigError(f"--ray-scope: {scope!r} is not one of sites, methods")
    ray = ensure_ray(address)
    if scope == "sites":
        return _sites_on_ray(world, settings, methods, ledger_root, cpus_per_task, gpus_per_task, start,
                             on_method_done)
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


def _sites_on_ray(
    world: Any, settings: Any, methods: Sequence[Method], ledger_root: Path | None, cpus: float, gpus: float,
    start: float, on_method_done: Callable[[MethodResult], None] | None,
) -> Any:
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.federation.simulate import SimulationResult, load_world_data, method_ledger_dir

    data, vocab = load_world_data(world, settings)
    results: dict[str, MethodResult] = {}
    for method in methods:
        engine = RayEngine(world, method, data, settings, vocab_size=vocab, cpus_per_site=cpus, gpus_per_site=gpus,
                           ledger_dir=method_ledger_dir(ledger_root, method.name))
        try:
            results[method.name] = engine.run()
        finally:
            engine.shutdown()
        if on_method_done:
            on_method_done(results[method.name])
    floors = {s: d.floor_ppl for s, d in data.items() if d.floor_ppl is not None}
    return SimulationResult(world.name, settings, floors, results, time.perf_counter() - start)
