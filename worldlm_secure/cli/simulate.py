"""`worldlm-secure simulate`: run a whole world in process and compare WorldLM with the baselines.

Light at import (typer, rich): the library (torch) is imported inside the command, after the options
were checked. Order of a run: options -> the --out folder -> world, settings, device and data
(`federation.simulate.prepare`, no model built) -> header -> training -> results.json and plots.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import typer

from worldlm_secure.cli import PROG, app
from worldlm_secure.cli._console import esc, make_console, stdout_is_terminal
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.results import PLOT_FILES, RESULTS_FILE as RESULTS  # light: json, os

console = make_console()
BACKENDS = ("inprocess", "ray")
RAY_SCOPES = ("sites", "methods")
DEVICE_HELP = "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PARTIAL = "results.partial.json"


def default_world() -> Path:
    """The embedded default world (examples/world.yaml, shipped inside the package)."""
    return Path(__file__).resolve().parent.parent / "assets" / "examples" / "world.yaml"


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option}: {value!r} is not one of {', '.join(choices)}")


def check_device_name(device: str) -> None:
    """The spelling of --device (its availability is checked when the world is prepared)."""
    if not _DEVICE.match(device):
        raise ConfigError(f"--device: unknown device {device!r} (valid: {DEVICE_HELP})")


@app.command(
    epilog="Examples: worldlm-secure simulate --dry-run  |  worldlm-secure simulate examples/world-dp.yaml "
    "--rounds 2 --threads 1 --out runs/dp  |  ... --out runs/dp --resume (after Ctrl-C)",
)
def simulate(
    world: Optional[Path] = typer.Argument(None, help="World YAML (default: the embedded default world)."),
    out: Path = typer.Option(Path("runs/simulate"), "--out", help="Folder for results.json, plots and ledgers/."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Override the world's number of rounds (>= 1)."),
    device: str = typer.Option("auto", "--device", help=f"One of: {DEVICE_HELP}."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma list of worldlm, fedavg, local, fedper, hierfavg (default: all)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the world's seed."),
    threads: Optional[int] = typer.Option(
        None, "--threads",
        help="CPU threads for torch. Default: the CPUs this process may use minus the load average (at least 1), "
        "shown in the header; 1 is fastest for small models on a busy machine."),
    backend: str = typer.Option("inprocess", "--backend", help="One of: inprocess (default), ray (extra worldlm-secure[ray])."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray backend; default: a local instance)."),
    ray_scope: str = typer.Option("sites", "--ray-scope", help="ray backend, one of: sites (each site a Ray actor: trains and protects its own updates), methods (each method a Ray task)."),
    cpus_per_task: float = typer.Option(1.0, "--cpus-per-task", help="ray backend: CPUs reserved per site actor (or per method task)."),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="ray backend: GPUs reserved per site actor (or per method task)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tree, groups, protocol and DP per release, planned ε, bytes per round) and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the --dry-run plan) as JSON on stdout; progress goes to stderr."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out: keep its finished methods and their ledgers, rerun the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the results, plots and ledgers of an earlier run in --out first."),
) -> None:
    """Train a whole world of federations of sites and tabulate per-site validation perplexity.

    Every option is checked, and the world, its policies, the device and every site's data are loaded,
    before the header is printed and the first model is built. Piped to a file, it prints one plain line
    per round and method. Ctrl-C exits 130 and keeps results.partial.json and the finished methods' ledgers.
    """
    # 1. options (no heavy import yet)
    check_choice("--backend", backend, BACKENDS)
    check_choice("--ray-scope", ray_scope, RAY_SCOPES)
    check_device_name(device)
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds: must be at least 1 (got {rounds})")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be at least 1 (got {threads})")
    if cpus_per_task <= 0 or gpus_per_task < 0:
        raise ConfigError("--cpus-per-task must be > 0 and --gpus-per-task >= 0")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: give one of them")
    if resume and backend != "inprocess":
        raise ConfigError("--resume: supported with --backend inprocess only")
    from worldlm_secure.federation.methods import parse_methods

    chosen = parse_methods(methods)
    world_path = world or default_world()
    # 2. the --out folder
    earlier = _earlier_run(out)
    if earlier and not (resume or overwrite or dry_run):
        raise ConfigError(
            f"--out {out}: an earlier run is there ({', '.join(earlier)}); add --resume to continue it "
            "(finished methods and their ledgers are kept) or --overwrite to start again, or choose another --out"
        )
    # 3. world, settings, device, data: every check before the header and the first model
    from worldlm_secure.federation.simulate import prepare
    from worldlm_secure.train.device import default_threads, set_threads

    if threads is None:
        threads, why = default_threads()
        thread_note = f"{threads} torch thread(s) ({why}; --threads to change)"
    else:
        thread_note = f"{threads} torch thread(s) (--threads)"
    set_threads(threads)
    prep = prepare(world_path, rounds=rounds, device=device, seed=seed)
    info = make_console(stderr=True) if as_json else console
    if dry_run:
        _dry_run(prep, chosen, as_json, thread_note)
        return
    fingerprint = _fingerprint(world_path, prep)
    finished: dict[str, dict] = {}
    if resume:
        finished = _resume_state(out, fingerprint, [m.name for m in chosen], info)
    elif overwrite and earlier:
        _clear(out)
        info.print(f"--overwrite: removed the earlier run's {', '.join(earlier)} from {esc(out)}")
    todo = [m for m in chosen if m.name not in finished]
    w = prep.world
    n_rounds = prep.settings.rounds
    info.print(f"[bold]{esc(w.name)}[/]: {len(w.federations)} federations, {len(w.sites)} sites; "
               f"methods {', '.join(m.name for m in chosen)}; {n_rounds} rounds; device {prep.device}; {thread_note}")
    _print_dp_feasibility(prep, chosen, info)
    if finished:
        info.print(f"--resume: kept {', '.join(finished)} from the earlier run in {esc(out)}; running {', '.join(m.name for m in todo) or 'nothing'}")
    out.mkdir(parents=True, exist_ok=True)
    partial: dict[str, dict] = dict(finished)
    _write_partial(out, partial, fingerprint)
    live = stdout_is_terminal() and not as_json
    try:
        if backend == "ray":
            result = _run_ray(world_path, chosen, rounds, device, seed, out, partial, fingerprint, address,
                              cpus_per_task, gpus_per_task, ray_scope, live, info)
        else:
            result = _run_inprocess(prep, todo, out, partial, fingerprint, live, info, len(w.sites))
    except KeyboardInterrupt:
        _interrupted(out, chosen, partial, world, info)
        raise typer.Exit(130) from None
    saved = result.save(out, earlier={m.name: finished[m.name] for m in chosen if m.name in finished},
                        order=[m.name for m in chosen])
    (out / PARTIAL).unlink(missing_ok=True)
    payload, plots = saved.payload, saved.plots
    if as_json:
        print(json.dumps(summary_json(payload, out, plots), indent=1))
        return
    console.print(table(payload))
    for name, m in payload["methods"].items():
        if m.get("stopped"):
            console.print(f"[yellow]{name} stopped early:[/] {esc(m['stopped'])}")
        if m.get("diverged"):
            console.print(f"[red]{name} diverged:[/] {esc(m['diverged'])} (plots use a log scale)")
    console.print(f"wrote {esc(out / RESULTS)} and {', '.join(esc(p) for p in plots)} in {result.wall_s:.0f} s; "
                  f"ledgers in {esc(out / 'ledgers')} (check: {PROG} ledger audit {esc(out)})")


# ----------------------------------------------------------------------------------------------- running
def _run_inprocess(prep: Any, todo: list, out: Path, partial: dict, fingerprint: dict, live: bool, info: Any,
                   n_sites: int) -> Any:
    from worldlm_secure.federation.simulate import run_prepared

    def done(m: Any) -> None:
        _save_partial(out, partial, m, fingerprint)

    if not live:  # logs, CI, nohup: one plain line per round and method, flushed
        def line(p: dict) -> None:
            eps = f"{p['epsilon']:.3g}" if p.get("epsilon") is not None else "-"
            text = (f"{p['method']} round {p['round']}/{p['rounds']}: loss {p['loss']:.4f}, "
                    f"ppl {_fmt(p['ppl'])}, ε {eps}, {p['seconds']:.1f} s")
            info.print(text, markup=False)
            info.file.flush()

        def finished(m: Any) -> None:
            done(m)
            info.print(f"{m.name}: done, mean ppl {_fmt(m.mean_val_ppl)} in {m.wall_s:.1f} s", markup=False)

        return run_prepared(
            prep, methods=todo, ledger_root=out / "ledgers", on_progress=line,
            on_method=lambda name: info.print(f"{name}: training", markup=False),
            on_method_done=finished,
        )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task("training", total=max(1, len(todo) * prep.settings.rounds * n_sites))

        def on_progress(p: dict) -> None:
            eps = f", ε {p['epsilon']:.3g}" if p.get("epsilon") is not None else ""
            progress.console.print(f"[cyan]{p['method']}[/] round {p['round']}/{p['rounds']}: loss {p['loss']:.4f}, "
                                   f"ppl {_fmt(p['ppl'])}{eps}, {p['seconds']:.1f} s")
            progress.update(task, description=f"[cyan]{p['method']}[/] round {p['round']}: ppl {_fmt(p['ppl'])}")

        return run_prepared(
            prep, methods=todo, ledger_root=out / "ledgers",
            on_method=lambda name: progress.update(task, description=f"[cyan]{name}[/] round 1"),
            on_site=lambda site, r: progress.update(task, advance=1, description=f"round {r} site {esc(site)}"),
            on_progress=on_progress, on_method_done=done,
        )


def _run_ray(world_path: Path, chosen: list, rounds: Any, device: str, seed: Any, out: Path, partial: dict,
             fingerprint: dict, address: Any, cpus: float, gpus: float, scope: str, live: bool, info: Any) -> Any:
    from worldlm_secure.federation.ray_backend import simulate_on_ray

    def done(m: Any) -> None:
        _save_partial(out, partial, m, fingerprint)
        info.print(f"{m.name}: done on Ray, mean ppl {_fmt(m.mean_val_ppl)}", markup=False)

    info.print(f"methods on Ray ({scope} as tasks)", markup=False)
    return simulate_on_ray(
        world_path, methods=chosen, rounds=rounds, device=device, seed=seed, ledger_root=out / "ledgers",
        address=address, cpus_per_task=cpus, gpus_per_task=gpus, scope=scope, on_method_done=done,
    )


def _fmt(x: float) -> str:
    from worldlm_secure.federation.results import fmt_ppl

    return fmt_ppl(x)


# ----------------------------------------------------------------------------- --out: partial, resume, overwrite
def _earlier_run(out: Path) -> list[str]:
    """What an earlier run left in ``out`` (empty: nothing)."""
    found = [name for name in (RESULTS, PARTIAL) if (out / name).exists()]
    ledgers = out / "ledgers"
    if ledgers.is_dir() and any(ledgers.rglob("*.sqlite")):
        found.append("ledgers/")
    return found


def _fingerprint(world_path: Path, prep: Any) -> dict:
    return {
        "world": str(Path(world_path).resolve()),
        "world_sha256": hashlib.sha256(Path(world_path).read_bytes()).hexdigest(),
        "rounds": prep.settings.rounds,
        "seed": prep.settings.seed,
    }


def _write_partial(out: Path, partial: dict, fingerprint: dict) -> None:
    from worldlm_secure.federation.results import write_json_atomic

    write_json_atomic(out / PARTIAL, {"partial": True, "run": fingerprint, "methods": partial})


def _save_partial(out: Path, partial: dict, method: Any, fingerprint: dict) -> None:
    from worldlm_secure.federation.results import method_json

    partial[method.name] = method_json(method)
    _write_partial(out, partial, fingerprint)


def _resume_state(out: Path, fingerprint: dict, chosen: list[str], info: Any) -> dict[str, dict]:
    """The methods an earlier run in ``out`` finished (kept), after checking it ran the same world and
    settings; the partial ledgers of every other chosen method are removed (that method reruns)."""
    from worldlm_secure.federation.simulate import method_ledger_dir

    done: dict[str, dict] = {}
    earlier_run: dict | None = None
    for name in (RESULTS, PARTIAL):  # a complete results.json, then a newer partial file
        path = out / name
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--resume: {path} is unreadable ({exc}); use --overwrite") from None
        earlier_run = doc.get("run", earlier_run)
        if name == RESULTS:
            s = doc.get("settings", {})
            earlier_run = earlier_run or {"rounds": s.get("rounds"), "seed": s.get("seed")}
        done.update(doc.get("methods", {}))
    if earlier_run:
        for key in ("world_sha256", "rounds", "seed"):
            if key in earlier_run and earlier_run[key] != fingerprint[key]:
                what = "the world file changed" if key == "world_sha256" else f"{key} {earlier_run[key]} then, {fingerprint[key]} now"
                raise ConfigError(f"--resume: {out} holds a run of different settings ({what}); "
                                  "resume with the same world, --rounds and --seed, or use --overwrite")
    kept = {n: done[n] for n in chosen if n in done}
    for name in chosen:
        if name in kept:
            continue
        folder = method_ledger_dir(out / "ledgers", name)
        stale = sorted(folder.glob("*.sqlite*")) if folder is not None and folder.is_dir() else []
        if stale:
            for f in stale:
                f.unlink()
            info.print(f"--resume: {name} did not finish; removed its partial ledgers in {esc(folder)} (it reruns from round 1)")
    return kept


def _clear(out: Path) -> None:
    for name in (RESULTS, PARTIAL, *PLOT_FILES):
        (out / name).unlink(missing_ok=True)
    if (out / "ledgers").is_dir():
        shutil.rmtree(out / "ledgers")


def _interrupted(out: Path, chosen: list, partial: dict, world: Optional[Path], info: Any) -> None:
    from worldlm_secure.federation.simulate import method_ledger_dir

    kept = [m.name for m in chosen if m.name in partial]
    ledgers = [str(method_ledger_dir(out / "ledgers", n)) for n in kept]
    unfinished = [m.name for m in chosen if m.name not in partial]
    again = " ".join([PROG, "simulate", *([str(world)] if world else []), "--out", str(out), "--resume"])
    info.print(
        f"interrupted: kept {out / PARTIAL} "
        + (f"(finished: {', '.join(kept)}) and their ledgers in {', '.join(ledgers)}; " if kept else "(no method finished); ")
        + (f"the ledgers of {', '.join(unfinished)} are partial and are replaced on resume; " if unfinished else "")
        + f"continue with: {again}",
        markup=False,
    )
    info.file.flush()


# ----------------------------------------------------------------------------------------------- rendering
def table(payload: dict) -> Any:
    """Per-site validation perplexity per method; diverged methods flagged."""
    from rich.table import Table

    from worldlm_secure.federation.results import fmt_ppl

    methods = payload["methods"]
    sites = sorted({s for m in methods.values() for s in m["sites"]})
    floors = payload.get("site_floors", {})
    t = Table(title="validation perplexity per site (lower is better)")
    t.add_column("site")
    for name, m in methods.items():
        t.add_column(f"{name} [red](diverged)[/]" if m.get("diverged") else name, justify="right")
    if floors:
        t.add_column("floor", justify="right", style="dim")
    for s in sites:
        row = [esc(s)] + [fmt_ppl(methods[m]["sites"].get(s, {}).get("val_ppl")) for m in methods]
        t.add_row(*row, *([fmt_ppl(floors[s]) if s in floors else "–"] if floors else []))
    floor = payload.get("entropy_floor_ppl")
    t.add_section()
    t.add_row("[bold]mean", *[("[bold red]" if m.get("diverged") else "[bold]") + fmt_ppl(m["mean_val_ppl"])
                              for m in methods.values()],
              *([fmt_ppl(floor)] if floor else []))
    return t


_table = table  # `world up` (cli/node.py) renders its results with the same table


def summary_json(payload: dict, out: Path, plots: list[Path]) -> dict:
    """`simulate --json`: what a script needs to know about the run (the full record is results.json)."""
    methods = {}
    for name, m in payload["methods"].items():
        eps = [v for v in (m.get("epsilon") or {}).values() if v is not None]
        methods[name] = {"mean_val_ppl": m["mean_val_ppl"], "epsilon_max": max(eps) if eps else None,
                         "diverged": m.get("diverged"), "stopped": m.get("stopped"), "wall_s": m.get("wall_s"),
                         "sites": {s: v["val_ppl"] for s, v in m["sites"].items()}}
    return {"world": payload["world"], "out": str(out), "results": str(out / RESULTS),
            "plots": [str(p) for p in plots], "entropy_floor_ppl": payload.get("entropy_floor_ppl"),
            "diverged_above_ppl": payload.get("diverged_above_ppl"), "methods": methods,
            "resumed_from_earlier_run": payload.get("resumed_from_earlier_run", []), "wall_s": payload["wall_s"]}


def _dry_run(prep: Any, chosen: list, as_json: bool, thread_note: str) -> None:
    from worldlm_secure.cli.plan import print_plan
    from worldlm_secure.federation.simulate import plan_simulation

    plan = plan_simulation(prep)
    plan["methods"] = [m.name for m in chosen]
    plan["threads"] = thread_note
    if as_json:
        print(json.dumps(plan, indent=1))
        return
    console.print(f"[bold]{esc(plan['world'])}[/] ({esc(plan['file'])}): {plan['rounds']} rounds, seed {plan['seed']}, "
                  f"device {plan['device']}, {thread_note}; model {plan['parameters']:,} parameters; "
                  f"methods {', '.join(plan['methods'])} (plan below: worldlm)")
    print_plan(plan, console)
    console.print("dry run: nothing trained, nothing written")


def _print_dp_feasibility(prep: Any, chosen: list, info: Any) -> None:
    """The header's expected signal-to-noise of every DP release of every chosen method, before training."""
    from worldlm_secure.cli.plan import print_feasibility
    from worldlm_secure.federation.simulate import plan_simulation

    print_feasibility({m.name: plan_simulation(prep, m)["dp_feasibility"] for m in chosen}, info)
