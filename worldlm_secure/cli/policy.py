"""`worldlm-secure policy ...`: check, explain, compose and export jurisdiction policies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from worldlm_secure.cli._console import make_console
from worldlm_secure.errors import PolicyError, WorldLMError

app = typer.Typer(help="Check, explain and compose jurisdiction policies.", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


@app.command("check", epilog="Examples: worldlm-secure policy check policies/*.yaml  |  "
             "worldlm-secure policy check --chain policies/eu.yaml policies/research-open.yaml --json  |  "
             "worldlm-secure policy check --world examples/world-dp.yaml")
def check(
    files: Optional[list[Path]] = typer.Argument(None, help="Policy YAML files to validate."),
    chain: bool = typer.Option(
        False, "--chain", help="Also compose FILES as one release path (releasing node first, root last)."
    ),
    world: Optional[Path] = typer.Option(
        None, "--world", help="Also load this world with its policies and print the expected signal-to-noise of every "
        "DP release it plans, warning when DP cannot learn (builds the model's shapes: imports torch)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"ok", "files": [{"path", "ok", "name", "jurisdiction", "error"}], "chain", "world"} on stdout.'
    ),
) -> int:
    """Validate policy files; print one line per file; exit non-zero (2) if any is invalid."""
    from worldlm_secure.policy import compose, load_policy

    files = files or []
    if not files and world is None:
        raise _missing_files()

    loaded = []
    failed = 0
    report: list[dict[str, Any]] = []
    chain_report: Optional[dict[str, Any]] = None
    for path in files:
        try:
            policy = load_policy(path)
        except WorldLMError as exc:
            failed += 1
            report.append({"path": str(path), "ok": False, "error": str(exc)})
            if not as_json:
                err_console.print(f"error: {exc}", markup=False)
            continue
        loaded.append(policy)
        report.append({"path": str(path), "ok": True, "name": policy.name, "jurisdiction": policy.jurisdiction,
                       "error": None})
        if not as_json:
            console.print(f"ok: {path} ({policy.name}, {policy.jurisdiction})", markup=False)
    code = 2 if failed else 0
    if chain and not failed:
        try:
            eff = compose(loaded)
        except PolicyError as exc:
            chain_report = {"ok": False, "error": str(exc)}
            code = 2
            if not as_json:
                err_console.print(f"error: {exc}", markup=False)
        else:
            chain_report = {"ok": True, "protocol": eff.secure_aggregation.protocol, "sha256": eff.sha256}
            if not as_json:
                console.print(f"ok: chain composes (protocol {eff.secure_aggregation.protocol}, sha256 {eff.sha256[:16]}…)",
                              markup=False)
    world_report = _check_world(world, as_json) if world is not None and code == 0 else None
    if as_json:
        print(json.dumps({"ok": code == 0, "files": report, "chain": chain_report, "world": world_report},
                         indent=1, ensure_ascii=False))
    elif failed and len(files) > 1:
        err_console.print(f"{failed} of {len(files)} policy files are invalid", markup=False)
    return code


def _missing_files() -> Exception:
    """Click's MissingParameter (a one-line usage error, exit 2) from the click that this typer runs on:
    typer >= 0.16 bundles its own copy, older typer uses the `click` package."""
    import sys

    missing = sys.modules[typer.BadParameter.__module__].MissingParameter
    return missing("Give policy FILES, --world WORLD.yaml, or both.", param_hint="'FILES...'", param_type="argument")


def _check_world(world: Path, as_json: bool) -> dict[str, Any]:
    """Load ``world`` (tree and every policy; errors name file:line field) and print its DP feasibility."""
    from worldlm_secure.cli.plan import print_feasibility
    from worldlm_secure.federation.simulate import plan_world

    plan = plan_world(world)
    feasibility = plan["dp_feasibility"]
    if not as_json:
        console.print(f"ok: {world} ({plan['world']}: {len(plan['members'])} sites, every policy loads and composes)",
                      markup=False)
        if not print_feasibility({plan["method"]: feasibility}, console) and not feasibility:
            console.print("no release is under differential privacy", markup=False)
    return {"path": str(world), "ok": True, "name": plan["world"], "dp_feasibility": feasibility}


@app.command("explain", epilog="Example: worldlm-secure policy explain policies/eu.yaml")
def explain(file: Path = typer.Argument(..., help="Policy YAML file.")) -> int:
    """Say in plain English what stays on site, what leaves, to whom, under which protections and budget."""
    from worldlm_secure.policy import load_policy
    from worldlm_secure.policy.explain import explain as explain_policy

    console.print(explain_policy(load_policy(file)), markup=False)
    return 0


@app.command("effective", epilog="Example: worldlm-secure policy effective examples/world-jurisdictions.yaml --node eu-a --json")
def effective(
    world: Path = typer.Argument(..., help="World YAML."),
    node: str = typer.Option(..., "--node", help="The releasing node."),
    to: Optional[str] = typer.Option(None, "--to", help="Stop the path at this ancestor (default: the root)."),
    as_json: bool = typer.Option(False, "--json", help="Print the effective policy and its sources as JSON."),
) -> int:
    """Show the composed policy of NODE's release path, and which file each rule came from."""
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.policy import compose

    w = load_world(world, check_policies=False)
    if node not in w.nodes:
        raise PolicyError(f"{world} --node: unknown node {node!r}; nodes are {', '.join(w.nodes)}")
    chain_nodes = w.chain(node)
    names = [n.name for n in chain_nodes]
    if to is not None:
        if to not in names:
            raise PolicyError(f"{world} --to: {to!r} is not {node!r} or one of its ancestors ({', '.join(names)})")
        chain_nodes = chain_nodes[: names.index(to) + 1]
    eff = compose(w.policy_chain(node)[: len(chain_nodes)])
    if as_json:
        data = {
            "path": [n.name for n in chain_nodes],
            "files": list(eff.files),
            "sha256": eff.sha256,
            "effective": json.loads(eff.canonical_json()),
            "sources": eff.sources,
        }
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    path = " -> ".join(f"{n.name} ({Path(p).name})" for n, p in zip(chain_nodes, eff.files))
    console.print(f"Release path: {path}", markup=False)
    data = eff.model_dump(mode="json", exclude={"sources", "files"})
    data["egress"].pop("rules", None)
    data.pop("policies", None)  # already shown as the release path
    rows = _rows(data)
    width = max(len(f) for f, _ in rows)
    for field, value in rows:
        console.print(f"{field:<{width}}  {value}   <- {_short(_source_of(field, eff.sources))}", markup=False)
    console.print(f"sha256: {eff.sha256}", markup=False)
    return 0


@app.command("schema", epilog="Example: worldlm-secure policy schema --out policies/schema.json")
def schema(
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this file instead of printing."),
) -> int:
    """Print the JSON Schema of policy files (the same as policies/schema.json)."""
    from worldlm_secure.policy.jsonschema import policy_json_schema_text

    text = policy_json_schema_text()
    if out is None:
        console.print(text, markup=False, end="")
    else:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}", markup=False)
    return 0


def _rows(data: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("groups",):
            rows.extend(_rows(value, name + "."))
        else:
            rows.append((name, json.dumps(value, ensure_ascii=False)))
    return rows


def _short(text: str) -> str:
    """Paths relative to the working directory where possible, so the table stays narrow."""
    cwd = str(Path.cwd()) + "/"
    return text.replace(cwd, "")


def _source_of(field: str, sources: dict[str, str]) -> str:
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        hit = sources.get(".".join(parts[:n]))
        if hit:
            return hit
    if field == "policies":
        return ""
    return "composed from every policy on the path"
