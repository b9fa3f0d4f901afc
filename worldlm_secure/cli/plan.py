"""Rendering of a run's plan (`federation.simulate.plan_simulation`) and of its DP feasibility.

One renderer for every command that shows a plan before work starts: `simulate --dry-run`,
`world up --dry-run`, the `simulate` header, `policy check --world`. Light at import (rich only);
the plan itself is computed by the library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from worldlm_secure.cli._console import esc


def print_plan(plan: Mapping[str, Any], console: Console) -> None:
    """The tree with each site's parameter groups, the releases per round, each member's planned ε,
    the bytes sent up per round (float32 values) and the expected signal-to-noise of each DP release."""
    console.print(_tree(plan["tree"]))
    console.print(_releases(plan["releases"]))
    console.print(_members(plan["members"]))
    console.print(f"bytes up per round: {plan['bytes_up_per_round'] / 1e6:.2f} MB of float32 values "
                  "(before the protocol's expansion: masking and CKKS send more; see `compare`)")
    print_feasibility({plan.get("method", "worldlm"): plan.get("dp_feasibility", [])}, console)


def print_feasibility(by_method: Mapping[str, Sequence[Mapping[str, Any]]], console: Console) -> bool:
    """Expected signal-to-noise of every DP release (rows shared by methods are merged), then each warning
    once, naming the fixes. Prints nothing when no release is under DP; returns whether any warning was shown."""
    rows: dict[tuple[Any, ...], list[str]] = {}
    found: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    for method, feasibilities in by_method.items():
        for f in feasibilities:
            key = (f["release"], f["level"], f["contributors"], f["noise_multiplier"], f["dim"])
            rows.setdefault(key, []).append(method)
            found[key] = f
    if not rows:
        return False
    t = Table(title="expected signal-to-noise of each DP release (n / (z·√d); below 1 DP cannot learn)")
    for col in ("method", "release", "DP", "n", "z", "values d", "SNR"):
        t.add_column(col, justify="right" if col in ("n", "z", "values d", "SNR") else "left")
    for key, methods in rows.items():
        f = found[key]
        snr = f"{f['snr']:.3g}"
        t.add_row(esc(", ".join(methods)), esc(f["release"]), f["level"], f"{f['contributors']:,}",
                  f"{f['noise_multiplier']:.3g}", f"{f['dim']:,}", f"[bold red]{snr}[/]" if f["warnings"] else snr)
    console.print(t)
    warned = False
    for key, methods in rows.items():
        for w in found[key]["warnings"]:
            warned = True
            console.print(f"[bold yellow]warning[/] ({esc(', '.join(methods))}): {esc(w)}")
    return warned


def _tree(root: Mapping[str, Any]) -> Tree:
    def label(n: Mapping[str, Any]) -> str:
        text = f"[bold]{esc(n['name'])}[/] {n['kind']} ({esc(n['policy'])})"
        if "groups" in n:
            g = n["groups"]
            text += f": local {g['local']:,} / key {g['key']:,} / shared {g['shared']:,} values"
        return text

    def grow(branch: Tree, n: Mapping[str, Any]) -> None:
        for c in n["children"]:
            grow(branch.add(label(c)), c)

    tree = Tree(label(root))
    grow(tree, root)
    return tree


def _releases(releases: Sequence[Mapping[str, Any]]) -> Table:
    t = Table(title="releases per round")
    for col in ("group", "from", "to", "values", "protocol", "min cohort", "DP"):
        t.add_column(col, justify="right" if col in ("values", "min cohort") else "left")
    for r in releases:
        dp = r["dp"]
        dp_text = (f"user {dp['mechanism']}, z {dp['noise_multiplier']:.3g}, clip {dp['clipping_norm']:g}"
                   if dp else ("record (DP-SGD in site)" if r["record_level_dp"] else "none"))
        t.add_row(r["group"], esc(", ".join(r["from"])), esc(r["to"]), f"{r['values']:,}", esc(r["protocol"]),
                  str(r["min_cohort"]), esc(dp_text))
    return t


def _members(members: Mapping[str, Mapping[str, Any]]) -> Table:
    t = Table(title="planned privacy loss per member (over the whole run)")
    for col in ("member", "DP", "ε planned", "δ", "releases"):
        t.add_column(col)
    for name, v in sorted(members.items()):
        t.add_row(esc(name), v["level"], "–" if v["epsilon_planned"] is None else f"{v['epsilon_planned']:g}",
                  "–" if v["delta"] is None else f"{v['delta']:g}", str(v["releases"]))
    return t
