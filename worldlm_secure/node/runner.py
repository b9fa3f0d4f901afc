"""`start_node`: the library function behind `worldlm-secure node start --policy FILE --config node.yaml`."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worldlm_secure.errors import ConfigError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.config import NodeConfig, load_node_config
from worldlm_secure.node.context import load_context
from worldlm_secure.node.release import check_supported
from worldlm_secure.transport import keys

Emit = Callable[..., None]


def jsonl_emitter(node: str, stream: Any = None) -> Emit:
    """Progress events as JSON lines on ``stream`` (stdout): what `world up` reads and renders."""
    out = stream or sys.stdout

    def emit(event: str, **fields: Any) -> None:
        out.write(json.dumps({"t": round(time.time(), 3), "node": node, "event": event, **fields}, default=str) + "\n")
        out.flush()

    return emit


def _identity(cfg: NodeConfig) -> NodeIdentity:
    """The node's Ed25519 signing key: in the credentials folder `keys issue` generated it into."""
    folders = [c for c in ((cfg.serve.credentials if cfg.serve else None), (cfg.parent.credentials if cfg.parent else None)) if c]
    for folder in folders:
        path = Path(folder) / keys.NODE_SIGNING_KEY
        if path.is_file():
            keys.check_private_permissions(path)
            return NodeIdentity.load(cfg.name, path)
    raise ConfigError(f"{cfg.source}: no {keys.NODE_SIGNING_KEY} in {', '.join(map(str, folders))}; issue the node with `worldlm-secure keys issue`")


def check_policy(cfg: NodeConfig, policy_path: Path, world_policy: Path) -> None:
    """The policy the operator passes must be byte-identical to the one the shared world names for this node."""
    if not Path(policy_path).is_file():
        raise ConfigError(f"--policy {policy_path}: file not found")
    mine = hashlib.sha256(Path(policy_path).read_bytes()).hexdigest()
    theirs = hashlib.sha256(Path(world_policy).read_bytes()).hexdigest()
    if mine != theirs:
        raise ConfigError(
            f"--policy {policy_path}: differs from {world_policy}, the policy {cfg.world} names for node {cfg.name!r} "
            "(sha256 differ); every node must compose the same policies: update the world file or pass that policy"
        )


def node_feasibility(ctx: Any, name: str) -> list[Any]:
    """The expected signal-to-noise (`privacy.feasibility.Feasibility`) of every user-level DP release node
    ``name`` takes part in, as a member or as the aggregator: what `node start` reports before it opens a port.
    (A record-level site's DP-SGD is planned by the site from its own data: `simulate --dry-run` shows it.)"""
    from worldlm_secure.federation.engine import plan_feasibility, planned_site_releases
    from worldlm_secure.federation.release import ReleasePath

    planned = planned_site_releases(ctx.settings.rounds, bool(ctx.key_names), bool(ctx.shared_names))
    path = ReleasePath(ctx.world, {}, planned_releases=planned)
    members = {f.name: ctx.members(f.name) for f in ctx.world.federations}
    mine = {agg: sites for agg, sites in members.items() if name == agg or name in sites}
    return plan_feasibility(path, mine, {"key": ctx.key_names, "shared": ctx.shared_names},
                            {n: int(t.numel()) for n, t in ctx.init.items()}, ctx.root)


def report_feasibility(ctx: Any, name: str, emit: Emit) -> None:
    """One `dp_feasibility` progress event per DP release of this node; each warning also on the log (stderr)."""
    import logging

    log = logging.getLogger("worldlm_secure.dp")
    for f in node_feasibility(ctx, name):
        emit("dp_feasibility", **f.to_dict())
        for w in f.warnings:
            log.warning("%s: %s", name, w)


def start_node(config_path: str | Path, policy_path: str | Path, *, emit: Emit | None = None) -> dict[str, Any]:
    """Run one node until its world's last round is done; returns a summary. Raises `WorldLMError`s
    that name the file, the field and the fix."""
    cfg = load_node_config(config_path)
    emit = emit or jsonl_emitter(cfg.name)
    ctx = load_context(cfg.world, device=cfg.device)
    node = ctx.world.nodes.get(cfg.name)
    if node is None:
        raise ConfigError(f"{cfg.source} name: {cfg.name!r} is not a node of {cfg.world}; use one of {sorted(ctx.world.nodes)}")
    if node.kind != cfg.role:
        raise ConfigError(f"{cfg.source} role: {cfg.name!r} is a {node.kind} in {cfg.world}, not a {cfg.role}")
    if cfg.parent is not None and cfg.parent.name != node.parent:
        raise ConfigError(f"{cfg.source} parent.name: {cfg.name!r}'s parent in {cfg.world} is {node.parent!r}, not {cfg.parent.name!r}")
    check_policy(cfg, Path(policy_path), node.policy_path)
    check_supported(ctx)
    identity = _identity(cfg)
    emit("starting", role=cfg.role, world=str(cfg.world), rounds=ctx.settings.rounds)
    report_feasibility(ctx, cfg.name, emit)  # before any round: say when DP cannot learn
    if cfg.role == "site":
        from worldlm_secure.node.site import SiteNode

        return SiteNode(cfg, ctx, identity, emit).run()
    if cfg.role == "federation":
        from worldlm_secure.node.federation import FederationNode

        return FederationNode(cfg, ctx, identity, emit).run()
    from worldlm_secure.node.root import RootNode

    return RootNode(cfg, ctx, identity, emit).run()
