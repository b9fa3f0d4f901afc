"""`worldlm-secure node start` and `worldlm-secure world up`: thin wrappers over `worldlm_secure.node`."""

from __future__ import annotations

from pathlib import Path

import typer

from worldlm_secure.errors import ConfigError

from worldlm_secure.cli._console import esc, make_console

console = make_console()
node_app = typer.Typer(help="Run one node of a deployed world (gRPC + mutual TLS).", no_args_is_help=True)
world_app = typer.Typer(help="Run a whole world as separate node processes on this machine.", no_args_is_help=True)


@node_app.command("start", epilog="Example: worldlm-secure node start --policy policies/eu.yaml --config examples/local-world/nodes/eu-a.yaml")
def start(
    policy: Path = typer.Option(..., "--policy", help="This node's jurisdiction policy (must be the one the world names for it)."),
    config: Path = typer.Option(..., "--config", help="The node's node.yaml."),
) -> None:
    """Start a site, federation or root and run it until the world's last round; progress as JSON lines."""
    import logging

    from worldlm_secure.node import start_node

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start_node(config, policy)


def _describe(ev: dict) -> str | None:
    e = ev.get("event")
    node = ev.get("node")
    if e == "trained":
        return f"{node}: trained round {ev['round']} (loss {ev['loss']:.3f}, {ev['seconds']:.1f} s)"
    if e == "aggregated":
        drop = f", dropped {ev['dropped']}" if ev.get("dropped") else ""
        return f"{node}: round {ev['round']} {ev['phase']} aggregated from {ev['contributors']}{drop}"
    if e == "evaluated":
        return f"{node}: round {ev['round']} validation perplexity {ev['val_ppl']:.2f}"
    if e in ("aborted", "round_failed", "members_missing", "restored", "listening", "enrolled"):
        return f"{node}: {e} " + " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "node", "event"))
    return None


@world_app.command("up", epilog="Examples: worldlm-secure world up examples/local-world/world.yaml --dry-run  |  "
                   "worldlm-secure world up examples/local-world/world.yaml --state runs/local-world")
def up(
    world: Path = typer.Argument(..., help="World YAML whose folder holds nodes/NAME.yaml (e.g. examples/local-world/world.yaml)."),
    state: Path = typer.Option(Path("runs/local-world"), "--state", help="Folder for keys, node state, ledgers, logs and results.json."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Seconds before unfinished nodes are killed."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (tree, groups, protocol and DP per release, planned ε, bytes per round, "
        "DP signal-to-noise) and exit: no key issued, nothing written, no process started."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as JSON."),
    launch: str = typer.Option(
        "fork", "--launch", help="fork: fork every node from one interpreter that imported torch once (~4 CPU-s less per "
        "node; a fresh interpreter where the OS cannot fork); exec: every node a fresh `worldlm-secure node start`, as an "
        "operator runs it."),
) -> None:
    """Issue keys, start every node as its own OS process on loopback, stream progress, print the table."""
    if timeout <= 0:
        raise ConfigError(f"--timeout: must be > 0 seconds (got {timeout:g})")
    if as_json and not dry_run:
        raise ConfigError("--json: only with --dry-run (the run's results are in STATE/results.json)")
    if launch not in ("fork", "exec"):
        raise ConfigError(f"--launch: must be fork or exec (got {launch!r})")
    if dry_run:
        _dry_run(world, as_json)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worldlm_secure.cli.simulate import _table
    from worldlm_secure.federation.results import write_json_atomic
    from worldlm_secure.federation.simulate import checked_settings
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.node.launcher import Launch
    from worldlm_secure.node.world_up import world_up

    how: Launch = "fork" if launch == "fork" else "exec"
    w = load_world(world)
    rounds = checked_settings(w).rounds
    console.print(f"[bold]{esc(w.name)}[/]: {len(w.nodes)} nodes as separate processes on loopback "
                  f"({len(w.federations)} federations, {len(w.sites)} sites), {rounds} rounds; state in {esc(state)}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting nodes", total=rounds * len(w.sites))

        def show(ev: dict) -> None:
            if ev.get("event") == "trained":
                progress.update(task, advance=1, description=f"round {ev['round']}: {esc(ev['node'])} trained")
            line = _describe(ev)
            if line:
                progress.console.print(line, markup=False)

        payload = world_up(world, state, on_event=show, timeout=timeout, launch=how)
    write_json_atomic(state / "results.json", payload)
    if payload["methods"]["worldlm"]["sites"]:
        console.print(_table(payload))
    if payload.get("failed_nodes"):
        console.print(f"[red]nodes that failed:[/] {esc(payload['failed_nodes'])} (logs in {esc(state / 'logs')})")
        raise typer.Exit(1)
    console.print(f"wrote {esc(state / 'results.json')}; ledgers in {esc(state / 'nodes')}/*/ledger/ in {payload['wall_s']:.0f} s")


def _dry_run(world: Path, as_json: bool) -> None:
    """`world up --dry-run`: the plan `simulate --dry-run` prints, for the nodes' one method (worldlm)."""
    import json

    from worldlm_secure.cli.plan import print_plan
    from worldlm_secure.node.world_up import plan_world_up

    plan = plan_world_up(world)
    if as_json:
        print(json.dumps(plan, indent=1))
        return
    n_sites = len(plan["members"])
    console.print(f"[bold]{esc(plan['world'])}[/] ({esc(plan['file'])}): {plan['rounds']} rounds, seed {plan['seed']}; "
                  f"model {plan['parameters']:,} parameters; one process per node on loopback ({n_sites} sites), "
                  "method worldlm")
    print_plan(plan, console)
    console.print("dry run: no key issued, nothing written, no process started")


@world_app.command("keys", epilog="Example: worldlm-secure world keys examples/local-world/world.yaml --state examples/local-world/state")
def world_keys(
    world: Path = typer.Argument(..., help="World YAML."),
    state: Path = typer.Option(..., "--state", help="Folder for ca/, keys/ and rosters/ (examples/local-world/state for its nodes/*.yaml)."),
) -> None:
    """Issue a CA per aggregator, every node's certificates and signing key, and the rosters (no node is started)."""
    from worldlm_secure.node.world_up import prepare

    w, _ = prepare(world, state)
    console.print(f"issued keys for {len(w.nodes)} nodes into {esc(state / 'keys')}; CAs in {esc(state / 'ca')} (keep ca.key offline), rosters in {esc(state / 'rosters')}")
