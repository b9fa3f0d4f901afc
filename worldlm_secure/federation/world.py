"""The world: a tree of sites (leaves) and federations (inner nodes), loaded from a world YAML.

A world file declares nodes as a flat list (``name``, ``parent``, ``policy``) so that every error can
name the node's index, plus the model, the data and the round schedule. Depth is at most three
levels (root -> federations -> sites) or two (root -> sites, a flat world).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from worldlm_secure.errors import ConfigError

NodeKind = Literal["root", "federation", "site"]

_TOP_KEYS = {"name", "seed", "model", "data", "schedule", "aggregation", "nodes", "description"}
_NODE_KEYS = {"name", "parent", "policy", "data", "description"}


@dataclass(frozen=True)
class WorldNode:
    """One node of the tree. ``data`` is the site's data path (relative paths resolved), if any."""

    name: str
    kind: NodeKind
    policy_path: Path
    parent: str | None
    children: tuple[str, ...]
    data: Path | None = None


@dataclass(frozen=True)
class World:
    """A loaded world. Sections other than the tree stay raw dicts here; their owners parse them."""

    path: Path
    name: str
    seed: int
    nodes: dict[str, WorldNode]
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    aggregation: dict[str, Any] = field(default_factory=dict)
    _policies: dict[Path, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def root(self) -> WorldNode:
        return next(n for n in self.nodes.values() if n.kind == "root")

    @property
    def sites(self) -> list[WorldNode]:
        return [n for n in self.nodes.values() if n.kind == "site"]

    @property
    def federations(self) -> list[WorldNode]:
        return [n for n in self.nodes.values() if n.kind == "federation"]

    @property
    def is_flat(self) -> bool:
        return not self.federations

    def chain(self, name: str) -> list[WorldNode]:
        """The node and its ancestors, ending at the root."""
        out = [self.nodes[name]]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])
        return out

    def policy_chain(self, name: str) -> list[Any]:
        """The loaded policies along ``chain(name)`` (releasing node first)."""
        from worldlm_secure.policy import load_policy

        for n in self.chain(name):
            if n.policy_path not in self._policies:
                self._policies[n.policy_path] = load_policy(n.policy_path)
        return [self._policies[n.policy_path] for n in self.chain(name)]

    def effective_policy(self, name: str) -> Any:
        """The composed policy for releases from ``name`` all the way to the root."""
        from worldlm_secure.policy import compose

        return compose(self.policy_chain(name))

    def sites_of(self, federation: str) -> list[WorldNode]:
        return [self.nodes[c] for c in self.nodes[federation].children if self.nodes[c].kind == "site"]


def _fail(path: Path, where: str, msg: str) -> ConfigError:
    return ConfigError(f"{path} {where}: {msg}")


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document at ``path`` (``what``: "world file", "grid file", ... for the error); a missing
    file or invalid YAML is a ConfigError naming the file and, where YAML knows it, the line."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def load_world(path: str | Path, *, check_policies: bool = True) -> World:
    """Load and validate a world YAML; every error names the file and the field.

    With ``check_policies`` (the default) every site's policy chain is composed now, so a world
    whose policies cannot be met together refuses to start here, not at round 57.
    """
    path = Path(path)
    raw = read_yaml(path, "world file")
    if not isinstance(raw, dict):
        raise _fail(path, "(top level)", "must be a mapping with at least `nodes:`")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _fail(path, sorted(unknown)[0], f"unknown key (valid: {', '.join(sorted(_TOP_KEYS))})")
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise _fail(path, "nodes", "must be a non-empty list of {name, parent, policy}")

    base = path.parent
    parents: dict[str, str | None] = {}
    entries: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(nodes_raw):
        where = f"nodes[{i}]"
        if not isinstance(node, dict):
            raise _fail(path, where, "must be a mapping with name, parent, policy")
        bad = set(node) - _NODE_KEYS
        if bad:
            raise _fail(path, f"{where}.{sorted(bad)[0]}", f"unknown key (valid: {', '.join(sorted(_NODE_KEYS))})")
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(path, f"{where}.name", "must be a non-empty string")
        if name in entries:
            raise _fail(path, f"{where}.name", f"duplicate node name {name!r}")
        parent = node.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise _fail(path, f"{where}.parent", "must be a node name or omitted for the root")
        policy = node.get("policy")
        if not isinstance(policy, str):
            raise _fail(path, f"{where}.policy", "must be the path of a policy YAML (relative to the world file)")
        if not (base / policy).is_file():
            raise _fail(path, f"{where}.policy", f"policy file {policy!r} not found (looked in {base / policy})")
        parents[name] = parent
        entries[name] = {**node, "_index": i}

    for name, parent in parents.items():
        if parent is not None and parent not in parents:
            i = entries[name]["_index"]
            raise _fail(path, f"nodes[{i}].parent", f"unknown node {parent!r} (declared: {', '.join(parents)})")
    roots = [n for n, p in parents.items() if p is None]
    if len(roots) != 1:
        raise _fail(path, "nodes", f"exactly one node must have no parent (the root); found {len(roots)}: {roots}")

    depth: dict[str, int] = {}
    for name in parents:
        seen = [name]
        cur = parents[name]
        while cur is not None:
            if cur in seen:
                cycle = " -> ".join([*seen[seen.index(cur) :], cur])
                raise _fail(path, f"nodes[{entries[name]['_index']}].parent", f"cycle in the tree: {cycle}")
            seen.append(cur)
            cur = parents[cur]
        depth[name] = len(seen) - 1

    children: dict[str, list[str]] = {n: [] for n in parents}
    for name, parent in parents.items():
        if parent is not None:
            children[parent].append(name)
    nodes: dict[str, WorldNode] = {}
    for name, entry in entries.items():
        kind: NodeKind = "root" if parents[name] is None else ("federation" if children[name] else "site")
        where = f"nodes[{entry['_index']}]"
        if depth[name] > 2:
            raise _fail(path, f"{where}.parent", "worlds are at most three levels deep (root -> federations -> sites)")
        if kind == "federation" and any(children[c] for c in children[name]):
            raise _fail(path, where, f"federation {name!r} has federations below it; nest at most one level")
        data = entry.get("data")
        if data is not None and kind != "site":
            raise _fail(path, f"{where}.data", "only sites (leaves) hold data")
        nodes[name] = WorldNode(
            name=name,
            kind=kind,
            policy_path=(base / entry["policy"]).resolve(),
            parent=parents[name],
            children=tuple(children[name]),
            data=(base / data).resolve() if isinstance(data, str) else None,
        )
    if not any(n.kind == "site" for n in nodes.values()):
        raise _fail(path, "nodes", "the world has no sites (leaves that hold data)")
    if len({nodes[c].kind for c in nodes[roots[0]].children}) > 1:
        raise _fail(path, "nodes", "the root's children must be all federations or all sites, not a mix")

    world = World(
        path=path,
        name=str(raw.get("name", path.stem)),
        seed=_int(path, "seed", raw.get("seed", 0)),
        nodes=nodes,
        model=_section(path, raw, "model"),
        data=_section(path, raw, "data"),
        schedule=_section(path, raw, "schedule"),
        aggregation=_section(path, raw, "aggregation"),
    )
    if check_policies:
        check_world_policies(world)
    return world


def check_world_policies(world: World) -> None:
    """Compose every release path now (policy.check_world); a conflict names both files (PolicyError)."""
    from worldlm_secure.policy import check_world

    check_world(world)


def _section(path: Path, raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, key, "must be a mapping")
    return value


def _int(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, key, f"must be an integer (got {value!r})")
    return value
