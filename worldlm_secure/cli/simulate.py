"""`worldlm-secure simulate`: run a whole world in process and compare WorldLM with the baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from worldlm_secure.cli import app
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.methods import parse_methods
from worldlm_secure.federation.results import method_json, results_json, write_json_atomic, write_plots
from worldlm_secure.federation.simulate import simulate as run_simulation
from worldlm_secure.federation.world import load_world
from worldlm_secure.train import set_threads

console = Console()


def default_world() -> Path:
    """The embedded default world (examples/world.yaml, shipped inside the package)."""
    return Path(__file__).resolve().parent.parent / "assets" / "examples" / "world.yaml"


@app.command()
def simulate(
    world: Optional[Path] = typer.Argument(None, help="World YAML (default: the embedded default world)."),
    out: Path = typer.Option(Path("runs/simulate"), "--out", help="Folder for results.json and plots."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Override the world's number of rounds."),
    device: str = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list: worldlm,fedavg,local,fedper,hierfavg (default all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the world's seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: one per core; 1 is faster on a busy machine)."),
    backend: str = typer.Option("inprocess", "--backend", help="inprocess (default) or ray (extra worldlm-secure[ray])."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray backend; default: a local instance)."),
    ray_scope: str = typer.Option("sites", "--ray-scope", help="ray backend: sites (each site a Ray actor: trains and protects its own updates) or methods (each method a Ray task)."),
    cpus_per_task: float = typer.Option(1.0, "--cpus-per-task", help="ray backend: CPUs reserved per site actor (or per method task)."),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="ray backend: GPUs reserved per site actor (or per method task)."),
) -> None:
    """Train a whole world of federations of sites and tabulate per-site validation perplexity."""
    if backend not in ("inprocess", "ray"):
        raise ConfigError(f"--backend: {backend!r} is not one of inprocess, ray")
    set_threads(threads)
    world_path = world or default_world()
    chosen = parse_methods(methods)
    w = load_world(world_path)
    n_rounds = rounds
    if n_rounds is None:
        from worldlm_secure.federation.settings import settings_for

        n_rounds = settings_for(w).rounds
    total = len(chosen) * n_rounds * len(w.sites)
    console.print(f"[bold]{w.name}[/]: {len(w.federations)} federations, {len(w.sites)} sites; "
                  f"methods {', '.join(m.name for m in chosen)}; {n_rounds} rounds")
    partial: dict = {}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        transient=False,
    ) as progress:
        if backend == "ray":
            from worldlm_secure.federation.ray_backend import simulate_on_ray

            task = progress.add_task(f"methods on Ray ({ray_scope} as tasks)", total=len(chosen))
            result = simulate_on_ray(
                world_path, methods=chosen, rounds=rounds, device=device, seed=seed, ledger_root=out / "ledgers",
                address=address, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, scope=ray_scope,
                on_method_done=lambda m: (_save_partial(out, partial, m), progress.update(
                    task, advance=1, description=f"[cyan]{m.name}[/] done: ppl {m.mean_val_ppl:.2f}")),
            )
        else:
            task = progress.add_task("training", total=total)
            result = run_simulation(
                world_path,
                methods=chosen,
                rounds=rounds,
                device=device,
                seed=seed,
                on_method=lambda name: progress.update(task, description=f"[cyan]{name}[/] round 1"),
                on_site=lambda site, r: progress.update(task, advance=1, description=f"round {r} site {site}"),
                on_round=lambda name, rec: progress.update(
                    task, description=f"[cyan]{name}[/] round {rec.round}: ppl {rec.mean_val_ppl:.2f}"
                ),
                # nothing lost on a crash: every finished method is on disk before the next starts
                on_method_done=lambda m: _save_partial(out, partial, m),
                ledger_root=out / "ledgers",
            )
    payload = results_json(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", payload)
    (out / "results.partial.json").unlink(missing_ok=True)
    plots = write_plots(payload, out)
    console.print(_table(payload))
    for name, m in result.methods.items():
        if m.stopped:
            console.print(f"[yellow]{name} stopped early:[/] {m.stopped}")
    console.print(f"wrote {out / 'results.json'} and {', '.join(str(p) for p in plots)} in {result.wall_s:.0f} s")


def _save_partial(out: Path, partial: dict, method: object) -> None:
    partial[method.name] = method_json(method)  # type: ignore[attr-defined]
    write_json_atomic(out / "results.partial.json", {"partial": True, "methods": partial})


def _table(payload: dict) -> Table:
    methods = payload["methods"]
    sites = sorted({s for m in methods.values() for s in m["sites"]})
    floors = payload.get("site_floors", {})
    table = Table(title="validation perplexity per site (lower is better)")
    table.add_column("site")
    for name in methods:
        table.add_column(name, justify="right")
    if floors:
        table.add_column("floor", justify="right", style="dim")
    for s in sites:
        row = [s] + [f"{methods[m]['sites'][s]['val_ppl']:.2f}" for m in methods]
        table.add_row(*row, *([f"{floors[s]:.2f}"] if floors else []))
    floor = payload.get("entropy_floor_ppl")
    table.add_section()
    table.add_row("[bold]mean", *[f"[bold]{m['mean_val_ppl']:.2f}" for m in methods.values()],
                  *([f"{floor:.2f}"] if floor else []))
    return table
