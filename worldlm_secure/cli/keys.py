"""`worldlm-secure keys`: make a federation CA and issue node credentials. Thin: the work is in
`worldlm_secure.transport.keys`; this module parses, calls it, and prints summaries (never keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from worldlm_secure.cli._console import make_console

app = typer.Typer(help="Make a federation CA and issue node certificates and signing keys.", no_args_is_help=True)
console = make_console()


def _lib() -> Any:
    """`worldlm_secure.transport.keys` (imported per command: importing it imports `worldlm_secure.transport`)."""
    from worldlm_secure.transport import keys as lib

    return lib


def _table(title: str, summary: Any, files: dict[str, Path]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title), show_header=False)  # Text: names and paths are never markup
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    rows = [("name", summary.name), ("valid", f"{summary.not_before} .. {summary.not_after}"),
            ("sha256", summary.fingerprint_sha256)]
    if summary.signing_public_key:
        rows.append(("signing key (Ed25519, public)", summary.signing_public_key))
    rows += [(label, str(path)) for label, path in files.items()]
    for label, value in rows:
        table.add_row(Text(label), Text(str(value)))
    return table


@app.command("init-ca", epilog="Example: worldlm-secure keys init-ca --name fed-eu --out keys/ca-eu")
def init_ca(
    name: str = typer.Option(..., "--name", help="Federation name (lowercase DNS name), e.g. fed-eu."),
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, ca.key (0600) and ca.json."),
    days: int = typer.Option(3650, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing CA in --out."),
) -> None:
    """Create a federation certificate authority. Keep ca.key offline; share only ca.crt."""
    lib = _lib()
    summary = lib.init_ca(name, out, days=days, force=force)
    console.print(
        _table("federation CA", summary, {"certificate": out / lib.CA_CERT, "private key (0600)": out / lib.CA_KEY})
    )


@app.command("issue", epilog="Example: worldlm-secure keys issue --ca keys/ca-eu --node site-a --out keys/site-a")
def issue(
    ca: Path = typer.Option(..., "--ca", help="CA directory made by `keys init-ca`."),
    node: str = typer.Option(..., "--node", help="Node name (lowercase DNS name), e.g. site-a."),
    out: Path = typer.Option(..., "--out", help="The node's directory: ca.crt, tls.crt, tls.key, signing.key."),
    days: int = typer.Option(365, "--days", help="Validity in days."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing credentials in --out."),
    signing_key: Optional[Path] = typer.Option(
        None, "--signing-key", help="Bind this existing Ed25519 key (e.g. a federation's, issued by its own CA) instead of a new one."
    ),
) -> None:
    """Issue a node its TLS certificate and key, and its Ed25519 signing key (ledger, secure aggregation)."""
    lib = _lib()
    issued = lib.issue_node(ca, node, out, days=days, force=force, signing_key=signing_key)
    console.print(
        _table(
            f"node {node}",
            issued.summary,
            {
                "certificate": issued.cert,
                "TLS private key (0600)": issued.key,
                "signing key (0600)": issued.signing_key,
                "trusted CA": issued.ca_cert,
            },
        )
    )


@app.command("show", epilog="Example: worldlm-secure keys show keys/site-a")
def show(path: Path = typer.Argument(..., help="A certificate file, or a CA or node directory.")) -> None:
    """Print a certificate's name, validity, fingerprint and bound signing key."""
    lib = _lib()
    if path.is_dir():
        path = path / (lib.NODE_CERT if (path / lib.NODE_CERT).exists() else lib.CA_CERT)
    console.print(_table(str(path), lib.summarize(lib.load_certificate(path), path), {}))
