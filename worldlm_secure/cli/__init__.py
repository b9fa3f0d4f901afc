"""The `worldlm-secure` command line. Thin: it parses, calls the library, and renders with rich.

Each command group lives in its own module (`cli/simulate.py`, `cli/policy.py`, ...) and is registered
below. Two rules keep it pleasant to use:

- **Light at import.** Importing this package (and so `--help`, `--version`, `policy *`, `ledger *`,
  `keys *`) must not import torch, transformers, opacus, tenseal or grpc: command modules import only
  typer and rich at the top, and the library inside the command body (tests/test_cli_imports.py).
- **No tracebacks.** A `WorldLMError` and a usage error (bad option value, unknown option, missing
  argument) print one line and exit 2, under every typer the pyproject allows (typer 0.12 uses the
  `click` package, newer typer bundles its own copy as `typer._click`: both are caught).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol, cast

import typer

from worldlm_secure import __version__
from worldlm_secure.cli._console import make_console
from worldlm_secure.errors import WorldLMError

PROG = "worldlm-secure"

app = typer.Typer(
    name=PROG,
    help="Train language models as a federation of federations, with enforced privacy.",
    epilog="Example: worldlm-secure simulate --dry-run   (then: worldlm-secure simulate --rounds 2 --threads 1)",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = make_console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        print(f"{PROG} {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train language models as a federation of federations, with enforced privacy."""


def _register() -> None:
    # Imported here so that `app` exists before the command modules attach to it. Every one of these
    # modules is light at import (typer, rich): the library is imported inside each command.
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


class _ClickError(Protocol):
    """What is used of a (click) ClickException beyond BaseException."""

    def show(self) -> None: ...


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """``name`` (ClickException, Exit, Abort) from every click implementation loaded in this process.

    typer <= 0.15 runs on the `click` package; typer >= 0.16 bundles its own (`typer._click`), and
    raises `typer.Exit` / `typer.Abort` that are not click's. Only modules already imported are looked
    at (typer imported the one it uses), so `click` need not be installed.
    """
    found: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        mod = sys.modules.get(module)
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    extra = {"Exit": typer.Exit, "Abort": typer.Abort}.get(name)
    if extra is not None and extra not in found:
        found.append(extra)
    return tuple(found)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _usage_error_line(exc: Any) -> str:
    """``error: simulate: Invalid value for '--rounds': ... (see: worldlm-secure simulate --help)``."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", "") or PROG
    try:
        message = exc.format_message()
    except Exception:  # noqa: BLE001 - a message is all we need
        message = str(exc)
    where = path[len(PROG):].strip() if path.startswith(PROG) else ""
    hint = f" (see: {path} --help)" if ctx is not None else ""
    return f"error: {where + ': ' if where else ''}{_one_line(message)}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and, called without ``argv``, exits with) the exit code.

    Exit codes: 0 ok; 1 a check failed (e.g. `ledger verify`) or an unexpected internal error;
    2 a usage or configuration error (one line on stderr); 130 interrupted (Ctrl-C).
    """
    click_errors = _click_classes("ClickException")
    exits = _click_classes("Exit")
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt, *_click_classes("Abort"))
    try:
        rv = app(args=argv, standalone_mode=False, prog_name=PROG)
    except WorldLMError as exc:
        err_console.print(f"error: {_one_line(str(exc))}", markup=False)
        code = exc.exit_code
    except click_errors as exc:  # usage errors: one line, exit 2
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: `group` alone prints its help
            cast(_ClickError, exc).show()
            code = 0
        else:
            err_console.print(_usage_error_line(exc), markup=False)
            code = int(getattr(exc, "exit_code", 2) or 2)
    except exits as exc:
        code = int(getattr(exc, "exit_code", 0) or 0)
    except interrupts:
        err_console.print("interrupted", markup=False)
        code = 130
    except BrokenPipeError:  # `worldlm-secure ... | head`
        code = 0
    except OSError as exc:  # a file the user named cannot be read or written
        err_console.print(f"error: {_one_line(str(exc))}", markup=False)
        code = 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line by default, the traceback on request
        if os.environ.get("WORLDLM_SECURE_TRACEBACK"):
            raise
        err_console.print(
            f"internal error: {type(exc).__name__}: {_one_line(str(exc))[:500]} "
            "(a bug: rerun with WORLDLM_SECURE_TRACEBACK=1 for the traceback and report it)",
            markup=False,
        )
        code = 1
    else:
        code = rv if isinstance(rv, int) else 0
    if argv is None:
        sys.exit(code)
    return code
