"""The `worldlm-secure` command line. Thin: it parses, calls the library, and renders with rich.

Each command group lives in its own module (`cli/simulate.py`, `cli/policy.py`, ...)
and is registered below. A `WorldLMError` is printed as one line, never a traceback.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console

from worldlm_secure.errors import WorldLMError

app = typer.Typer(
    name="worldlm-secure",
    help="Train language models as a federation of federations, with enforced privacy.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Train language models as a federation of federations, with enforced privacy."""


def _register() -> None:
    # Imported here so that `app` exists before the command modules attach to it.
    from worldlm_secure.cli import compare, simulate  # noqa: F401
    from worldlm_secure.cli import policy

    app.add_typer(policy.app, name="policy")
    from worldlm_secure.cli import keys

    app.add_typer(keys.app, name="keys")
    from worldlm_secure.cli import ledger

    app.add_typer(ledger.app, name="ledger")
    from worldlm_secure.cli import node

    app.add_typer(node.node_app, name="node")
    app.add_typer(node.world_app, name="world")


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the process exit code."""
    try:
        rv = app(args=argv, standalone_mode=False)
    except WorldLMError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        code = 130
    else:
        code = rv if isinstance(rv, int) else 0
    if argv is None:
        sys.exit(code)
    return code
