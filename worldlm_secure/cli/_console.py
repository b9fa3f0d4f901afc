"""The command line's rich consoles, and the one rule for printing user text with them.

Every console here has ``emoji=False`` and ``highlight=False``: a release id such as ``2:key:eu`` must
print as written, not as an emoji, and numbers inside user text must not be recoloured. Markup is still
interpreted in the strings the CLI writes itself, so user-supplied text (node names, file paths, error
messages) goes through `esc` (rich's `escape`) before it is put inside markup.

Light by design: only `rich` is imported here, so that `--help` and the policy, ledger and keys
commands start fast (tests/test_cli_imports.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape


def make_console(*, stderr: bool = False, **kwargs: Any) -> Console:
    """A console that never turns user text into emoji or highlights it; wide when not a terminal."""
    kwargs.setdefault("emoji", False)
    kwargs.setdefault("highlight", False)
    kwargs.setdefault("soft_wrap", True)
    stream = sys.stderr if stderr else sys.stdout
    if "width" not in kwargs and not _isatty(stream) and "COLUMNS" not in os.environ:
        kwargs["width"] = 200  # logs: tables of many columns stay on one line each
    return Console(stderr=stderr, **kwargs)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stdout_is_terminal() -> bool:
    """Whether progress bars make sense (else: one plain line per event, for logs and CI)."""
    return _isatty(sys.stdout)


def esc(value: object) -> str:
    """User text made safe to embed in rich markup (``[`` escaped)."""
    return escape(str(value))


__all__ = ["Console", "esc", "escape", "make_console", "stdout_is_terminal"]
