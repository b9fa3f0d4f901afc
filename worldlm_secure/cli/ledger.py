"""`worldlm-secure ledger`: verify, show, export and report privacy ledgers (thin over worldlm_secure.ledger)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from worldlm_secure.cli._console import esc, make_console
from worldlm_secure.errors import LedgerError

# The ledger library is light (no torch: the RDP accountant runs without it, tests/test_cli_imports.py),
# but it is still imported inside each command so that other command groups need not load it.

app = typer.Typer(help="Verify, show, export and report privacy ledgers.", no_args_is_help=True)
# Wide when piped; emoji off: release ids such as "1:key:eu" print as written.
console = make_console()


@app.command("verify", epilog="Example: worldlm-secure ledger verify runs/default/ledgers/*.sqlite --json")
def verify_cmd(
    paths: list[Path] = typer.Argument(..., help="Ledger files (DIR/ledgers/NODE.sqlite)."),
    public_key: list[str] = typer.Option(
        [], "--public-key", help="Hex Ed25519 key you trust for the node (repeat per PATH, in order)."
    ),
    no_recompute: bool = typer.Option(False, "--no-recompute", help="Skip recomputing ε (chain and signatures only)."),
    node: list[str] = typer.Option(
        [], "--node", help="The node each PATH must belong to (repeat per PATH); default: NAME of NAME.sqlite."
    ),
    allow_missing_policies: bool = typer.Option(
        False, "--allow-missing-policies", help="Pass entries whose effective policy document is not stored."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"ok", "ledgers": [{"path", "node", "ok", "findings", ...}]} instead of lines.'
    ),
) -> None:
    """Check meta, chain, signatures, head, receipts, every entry against its stored policy, and recompute
    every ε; exit 1 naming the first bad entry and the rule."""
    from worldlm_secure.ledger import verify

    if public_key and len(public_key) != len(paths):
        raise LedgerError(f"--public-key given {len(public_key)} times for {len(paths)} paths; give one per PATH")
    if node and len(node) != len(paths):
        raise LedgerError(f"--node given {len(node)} times for {len(paths)} paths; give one per PATH")
    reports = [
        verify(p, expected_public_key=public_key[i] if public_key else None, recompute=not no_recompute,
               expected_node=node[i] if node else p.stem, require_policies=not allow_missing_policies)
        for i, p in enumerate(paths)
    ]
    ok = all(r.ok for r in reports)
    if as_json:
        print(json.dumps({"ok": ok, "ledgers": [r.to_dict() for r in reports]}, indent=1, ensure_ascii=False))
    for rep in [] if as_json else reports:
        if rep.ok:
            console.print(f"[green]OK[/]     {esc(rep.summary())}")
        else:
            console.print(f"[bold red]FAILED[/] {esc(f'{rep.path}: {rep.problem}')}")
        for note in rep.notes:  # what could not be checked (also in --json)
            console.print(f"[yellow]note[/]   {esc(note)}")
    if not ok:
        raise typer.Exit(1)


@app.command("audit", epilog="Example: worldlm-secure ledger audit runs/local-world --keys runs/local-world/keys")
def audit_cmd(
    paths: list[Path] = typer.Argument(..., help="Ledger files or folders (simulate's --out, a world up state folder)."),
    keys: Path | None = typer.Option(
        None, "--keys", help="The world's identities: a keys folder (node certificates), or a file of NODE HEXKEY lines / JSON."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the whole audit as JSON."),
    require_receipts: bool = typer.Option(
        False, "--require-receipts", help="A release no parent countersigned is a finding (default: a note)."
    ),
) -> None:
    """Audit a whole world: every ledger verified against its policy and pinned key, and across nodes
    (aggregations, cohorts, each member's total ε, receipts). One line per finding; exit 1 on any."""
    from worldlm_secure.ledger.audit import audit_ledgers, summary_line

    rep = audit_ledgers(paths, keys, require_receipts=require_receipts)
    if as_json:
        print(json.dumps(rep.to_dict(), indent=1))
    else:
        for line in rep.lines():
            console.print(f"[bold red]FINDING[/] {esc(line)}")
        for w in rep.worlds:
            for note in w.notes:
                console.print(f"[yellow]note[/]    {esc(w.root.name)}: {esc(note)}")
        console.print(("[green]" if rep.ok else "[bold red]") + esc(summary_line(rep)) + "[/]")
    if not rep.ok:
        raise typer.Exit(1)


@app.command("show", epilog="Example: worldlm-secure ledger show runs/default/ledgers/eu-a.sqlite --json")
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
    t = Table(title=esc(f"{lf.meta.get('node', path)} — key {lf.meta.get('public_key', '')[:16]}…"))
    for col in ("seq", "round", "group", "→", "tensors", "protocol", "cohort/drop", "DP", "mechanism",
                "z", "q", "steps", "ε", "cum ε / budget"):
        t.add_column(col)
    for e in entries:
        cum = "—" if e.epsilon_cumulative is None else f"{e.epsilon_cumulative:.4g} / {e.epsilon_budget or float('inf'):.4g}"
        t.add_row(
            *(esc(v) for v in (e.seq, e.round, e.group, e.destination, len(e.tensor_names), e.protocol,
                               f"{e.cohort_size}/{e.dropouts}", e.dp_level, e.mechanism)),
            f"{e.noise_multiplier:.4g}", f"{e.sample_rate:g}", str(e.steps),
            "—" if e.epsilon is None else f"{e.epsilon:.4g}", cum,
        )
    console.print(t)


@app.command("export", epilog="Example: worldlm-secure ledger export runs/default/ledgers/eu-a.sqlite --dp-events --out eu-a.dp.json")
def export_cmd(
    path: Path = typer.Argument(..., help="A ledger file."),
    jsonl: bool = typer.Option(True, "--jsonl", help="One JSON object per line (the default)."),
    dp_events: bool = typer.Option(
        False, "--dp-events", help="Each budget stream as Google dp-accounting DpEvent JSON (a verified ledger only)."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write to this file instead of stdout."),
) -> None:
    """Export every entry (with hashes, signatures and the public key) as JSON Lines, or with --dp-events
    each stream as dp-accounting DpEvents (`DpEvent.to_named_tuple()` as JSON) to recompute ε independently."""
    from worldlm_secure.ledger import export_jsonl

    if dp_events:
        from worldlm_secure.ledger.dp_events import export_ledger

        text = json.dumps(export_ledger(path), indent=1) + "\n"
        if out is None:
            print(text, end="")
        else:
            out.write_text(text, encoding="utf-8")
            console.print(esc(f"wrote the DpEvents of {path} to {out}"))
        return
    lines = list(export_jsonl(path))
    text = "".join(line + "\n" for line in lines)
    if out is None:
        print(text, end="")
    else:
        out.write_text(text, encoding="utf-8")
        console.print(esc(f"wrote {len(lines)} entries to {out}"))


@app.command("pubkey", epilog="Example: worldlm-secure ledger pubkey runs/default/ledgers/eu-a.sqlite")
def pubkey_cmd(path: Path = typer.Argument(..., help="A ledger file.")) -> None:
    """Print the node's recorded Ed25519 public key (hex), to pin with `verify --public-key`."""
    from worldlm_secure.ledger import read_ledger_file

    print(read_ledger_file(path).meta.get("public_key", ""))


@app.command("report", epilog="Example: worldlm-secure ledger report runs/default --out runs/default/report.html")
def report_cmd(
    paths: list[Path] = typer.Argument(..., help="Ledger files or folders (simulate's --out, a world up state folder)."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write."),
    keys: Path | None = typer.Option(None, "--keys", help="The world's identities to pin signing keys (as for `audit`)."),
    require_receipts: bool = typer.Option(False, "--require-receipts", help="A release no parent countersigned is a finding."),
) -> None:
    """Audit the world and write one self-contained HTML page (verdict and findings first, ε against budget,
    what left each node, policies, receipts). Exit 1 when any ledger fails verification or the audit."""
    from worldlm_secure.ledger import report

    rep = report(paths, out, keys=keys, require_receipts=require_receipts)
    n = sum(len(w.reports) for w in rep.worlds)
    failed = sum(1 for w in rep.worlds for r in w.reports if not r.ok)
    console.print(esc(f"wrote {out} ({n} ledgers, {failed} failed verification, {len(rep.findings)} findings)"))
    if not rep.ok:
        raise typer.Exit(1)
