"""`worldlm-secure ledger`: verify, show, export and report privacy ledgers (thin over worldlm_secure.ledger)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from worldlm_secure.errors import LedgerError

# The ledger library pulls in the Opacus accountants (torch): imported inside each command so that
# other command groups start fast.

app = typer.Typer(help="Verify, show, export and report privacy ledgers.", no_args_is_help=True)
# Wide when piped (tables of many columns); the terminal's width otherwise.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)


@app.command("verify")
def verify_cmd(
    paths: list[Path] = typer.Argument(..., help="Ledger files (DIR/ledgers/NODE.sqlite)."),
    public_key: list[str] = typer.Option(
        [], "--public-key", help="Hex Ed25519 key you trust for the node (repeat per PATH, in order)."
    ),
    no_recompute: bool = typer.Option(False, "--no-recompute", help="Skip recomputing ε (chain and signatures only)."),
) -> None:
    """Check chain, signatures, head, policy hashes and recompute every ε; exit 1 naming the first bad entry."""
    from worldlm_secure.ledger import verify

    if public_key and len(public_key) != len(paths):
        raise LedgerError(f"--public-key given {len(public_key)} times for {len(paths)} paths; give one per PATH")
    failed = 0
    for i, p in enumerate(paths):
        rep = verify(p, expected_public_key=public_key[i] if public_key else None, recompute=not no_recompute)
        if rep.ok:
            console.print(f"[green]OK[/]     {rep.summary()}", highlight=False)
        else:
            failed += 1
            console.print(f"[bold red]FAILED[/] {rep.path}: {rep.problem}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("show")
def show_cmd(
    path: Path = typer.Argument(..., help="A ledger file."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as a JSON list (all fields)."),
) -> None:
    """List the entries of one ledger (not verified: run `ledger verify`)."""
    from worldlm_secure.ledger import read_entries, read_ledger_file

    entries = read_entries(path)
    if as_json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return
    lf = read_ledger_file(path)
    t = Table(title=f"{lf.meta.get('node', path)} — key {lf.meta.get('public_key', '')[:16]}…")
    for col in ("seq", "round", "group", "→", "tensors", "protocol", "cohort/drop", "DP", "mechanism",
                "z", "q", "steps", "ε", "cum ε / budget"):
        t.add_column(col)
    for e in entries:
        cum = "—" if e.epsilon_cumulative is None else f"{e.epsilon_cumulative:.4g} / {e.epsilon_budget or float('inf'):.4g}"
        t.add_row(
            str(e.seq), str(e.round), e.group, e.destination, str(len(e.tensor_names)), e.protocol,
            f"{e.cohort_size}/{e.dropouts}", e.dp_level, e.mechanism, f"{e.noise_multiplier:.4g}",
            f"{e.sample_rate:g}", str(e.steps), "—" if e.epsilon is None else f"{e.epsilon:.4g}", cum,
        )
    console.print(t)


@app.command("export")
def export_cmd(
    path: Path = typer.Argument(..., help="A ledger file."),
    jsonl: bool = typer.Option(True, "--jsonl", help="One JSON object per line (the only format)."),
    out: Path | None = typer.Option(None, "--out", help="Write to this file instead of stdout."),
) -> None:
    """Export every entry (with hashes, signatures and the public key) as JSON Lines."""
    from worldlm_secure.ledger import export_jsonl

    lines = list(export_jsonl(path))
    text = "".join(line + "\n" for line in lines)
    if out is None:
        print(text, end="")
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {len(lines)} entries to {out}", highlight=False)


@app.command("pubkey")
def pubkey_cmd(path: Path = typer.Argument(..., help="A ledger file.")) -> None:
    """Print the node's recorded Ed25519 public key (hex), to pin with `verify --public-key`."""
    from worldlm_secure.ledger import read_ledger_file

    print(read_ledger_file(path).meta.get("public_key", ""))


@app.command("report")
def report_cmd(
    paths: list[Path] = typer.Argument(..., help="Ledger files."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write."),
) -> None:
    """Write one self-contained HTML page (ε over rounds, what left each node, protocols, verification)."""
    from worldlm_secure.ledger import report

    reps = report(paths, out)
    bad = [r for r in reps if not r.ok]
    console.print(f"wrote {out} ({len(reps)} ledgers, {len(bad)} failed verification)", highlight=False)


