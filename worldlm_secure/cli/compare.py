"""`worldlm-secure compare GRID.yaml --out DIR`: a PET trade-off study over a grid of policies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, cast

import typer
from rich.markup import escape

from worldlm_secure.cli import app
from worldlm_secure.cli._console import make_console, stdout_is_terminal
from worldlm_secure.cli.simulate import BACKENDS, check_choice
from worldlm_secure.errors import ConfigError

if TYPE_CHECKING:
    from rich.progress import TaskID

console = make_console()


class _Lines:
    """Progress as plain lines (stdout is not a terminal: logs, CI, nohup)."""

    console = console

    def __enter__(self) -> "_Lines":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: object, **k: object) -> TaskID:
        return cast("TaskID", 0)  # rich's TaskID is an int (NewType); imported lazily

    def update(self, task: TaskID, description: str | None = None, **k: object) -> None:
        if description and " round " in description:
            console.print(description)
            console.file.flush()


@app.command(epilog="Examples: worldlm-secure compare examples/pet-study.yaml --out runs/pet-study --threads 1  |  "
             "... --backend ray --cpus-per-cell 1")
def compare(
    grid: Path = typer.Argument(..., help="Grid YAML: a base world and the variations to cross."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Study folder (re-running into it skips finished cells)."),
    backend: str = typer.Option("inprocess", "--backend", help="One of: inprocess (default), ray (one Ray task per cell)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (ray backend; default: a local instance)."),
    cpus_per_cell: float = typer.Option(1.0, "--cpus-per-cell", help="CPUs Ray reserves for each cell (ray backend)."),
    threads: Optional[int] = typer.Option(
        None, "--threads",
        help="CPU threads for torch in each cell. Default: the CPUs this process may use minus the load average "
        "(at least 1); 1 is faster on a busy machine."),
) -> None:
    """Run every cell of a grid through simulate with the real protections; tabulate and plot utility, ε, bytes and time."""
    check_choice("--backend", backend, BACKENDS)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be at least 1 (got {threads})")
    if cpus_per_cell <= 0:
        raise ConfigError(f"--cpus-per-cell: must be > 0 (got {cpus_per_cell:g})")
    from worldlm_secure.compare import load_grid

    g = load_grid(grid)  # every grid error before torch is even imported
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from worldlm_secure.compare import run_study
    from worldlm_secure.federation.results import fmt_ppl
    from worldlm_secure.train.device import default_threads, set_threads

    note = "--threads"
    if threads is None:
        threads, why = default_threads()
        note = why
    set_threads(threads)
    console.print(f"[bold]{escape(g.name)}[/]: {len(g.cells)} cells on {escape(str(g.world))} ({g.rounds or 'world'} rounds), "
                  f"backend {backend}, {threads} torch thread(s) per cell ({note})")
    progress_view = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
    ) if stdout_is_terminal() else _Lines()
    with progress_view as progress:
        task = progress.add_task("cells", total=len(g.cells))

        def done(rec: dict) -> None:
            tag = "cached" if rec.get("cached") else rec["status"]
            color = {"ok": "green", "cached": "cyan"}.get(tag, "red")
            msg = f"[{color}]{tag}[/] {rec['cell']}"
            if rec["status"] == "ok":
                msg += f": ppl {fmt_ppl(rec['mean_val_ppl'])}" + (f", ε {rec['epsilon_max']:.2f}" if rec.get("epsilon_max") else "")
            else:
                msg += f": {escape(rec['error'])}"
            progress.console.print(msg, highlight=False)
            progress.update(task, advance=1)

        result = run_study(
            g, out, backend=backend, address=address, threads=threads, cpus_per_cell=cpus_per_cell,
            on_cell_start=lambda c: progress.update(task, description=f"cell {c}"),
            on_cell_done=done,
            on_round=lambda c, r, p: progress.update(task, description=f"cell {c} round {r}: ppl {fmt_ppl(p)}"),
            meta={"command": " ".join(["worldlm-secure", *sys.argv[1:]]) if sys.argv else "worldlm-secure compare"},
        )
    console.print(_table(result.cells))
    console.print(f"wrote {', '.join(str(p) for p in result.files)} in {result.wall_s:.0f} s")
    if result.failed:
        console.print(f"[yellow]{len(result.failed)} cell(s) failed[/]; reasons in compare.csv and cells/*/error.txt")


def _table(cells: list[dict]) -> object:
    from rich.console import JustifyMethod
    from rich.table import Table

    from worldlm_secure.federation.results import fmt_ppl

    t = Table(title="PET trade-offs per cell")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("cell", "left"), ("ppl", "right"), ("ε", "right"), ("MB up/round/site", "right"),
        ("expansion", "right"), ("train s", "right"), ("protect s", "right"), ("status", "left"),
    )
    for col, just in columns:
        t.add_column(col, justify=just)
    for c in cells:
        if c["status"] != "ok":
            t.add_row(c["cell"], "–", "–", "–", "–", "–", "–", f"[red]failed[/] {escape(c['error'][:60])}")
            continue
        t.add_row(
            c["cell"], fmt_ppl(c["mean_val_ppl"]), f"{c['epsilon_max']:.2f}" if c.get("epsilon_max") else "–",
            f"{c['bytes_up_per_round_per_site'] / 1e6:.2f}", f"{c['expansion']:.2f}×" if c.get("expansion") else "–",
            f"{c['train_s']:.0f}", f"{c['protect_s']:.1f}", "cached" if c.get("cached") else "ok",
        )
    return t
