"""The world: a tree of sites (leaves) and federations (inner nodes), loaded from a world YAML.

A world file declares nodes as a flat list (``name``, ``parent``, ``policy``) so that every error can
name the node's index, plus the model, the data and the round schedule. Depth is at most three
levels (root -> federations -> sites) or two (root -> sites, a flat world).
"""

from __future__ import annotations

import difflib
import re
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
    # field path -> line of its key in the world file (for errors: `world.yaml:19 schedule.rouds: ...`)
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, repr=False, compare=False)

    def where(self, field_path: str) -> str:
        """``FILE:LINE FIELD`` for a dotted field path such as ``schedule.lr`` or ``nodes[3].data``."""
        return _where(self.path, self.lines, field_path)

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

        from worldlm_secure.policy import bind_chain

        chain = self.chain(name)
        for n in chain:
            if n.policy_path not in self._policies:
                self._policies[n.policy_path] = load_policy(n.policy_path)
        # Destinations stated by relation or jurisdiction ("parent", "ancestors", "jurisdiction: EU") become
        # this path's node names, so one policy file can govern any tree.
        return bind_chain([self._policies[n.policy_path] for n in chain], [n.name for n in chain])

    def effective_policy(self, name: str) -> Any:
        """The composed policy for releases from ``name`` all the way to the root."""
        from worldlm_secure.policy import compose

        return compose(self.policy_chain(name))

    def sites_of(self, federation: str) -> list[WorldNode]:
        return [self.nodes[c] for c in self.nodes[federation].children if self.nodes[c].kind == "site"]


def _fail(path: Path, where: str, msg: str, lines: dict[tuple[Any, ...], int] | None = None) -> ConfigError:
    return ConfigError(f"{_where(path, lines or {}, where)}: {msg}")


def split_field(field_path: str) -> tuple[Any, ...]:
    """``"nodes[3].data"`` -> ``("nodes", 3, "data")``."""
    out: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", field_path):
        out.append(int(index) if index else name)
    return tuple(out)


def _where(path: Path, lines: dict[tuple[Any, ...], int], field_path: str) -> str:
    """``FILE:LINE FIELD`` (the line of the field, or of its nearest enclosing field that has one)."""
    parts = split_field(field_path)
    line = None
    for n in range(len(parts), 0, -1):
        line = lines.get(parts[:n])
        if line is not None:
            break
    loc = f"{path}:{line}" if line is not None else str(path)
    return f"{loc} {field_path}" if field_path else loc


def unknown_key_message(key: str, valid: Any) -> str:
    """``unknown key (did you mean 'rounds'? valid: a, b, c)``."""
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}valid: {', '.join(valid)})"


def _index_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            here = prefix + (key,)
            out.setdefault(here, key_node.start_mark.line + 1)
            _index_lines(value_node, here, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.setdefault(prefix + (i,), item.start_mark.line + 1)
            _index_lines(item, prefix + (i,), out)


def _duplicate_key(node: yaml.Node, prefix: tuple[Any, ...]) -> tuple[tuple[Any, ...], int] | None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if key in seen:
                return prefix + (key,), key_node.start_mark.line + 1
            seen.add(key)
            hit = _duplicate_key(value_node, prefix + (key,))
            if hit:
                return hit
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            hit = _duplicate_key(item, prefix + (i,))
            if hit:
                return hit
    return None


def _dotted(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def read_yaml_lines(path: Path, what: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The YAML document at ``path`` and the line of every field path in it (keys and list items).

    A missing file, invalid YAML or a key given twice (YAML would silently keep the last) is a
    ConfigError naming the file and the line.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: {what} is a folder; give the YAML file") from None
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        lines[()] = node.start_mark.line + 1
        dup = _duplicate_key(node, ())
        if dup is not None:
            raise ConfigError(f"{path}:{dup[1]} {_dotted(dup[0])}: given twice; keep one")
        _index_lines(node, (), lines)
    return data, lines


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document at ``path`` (``what``: "world file", "grid file", ... for the error); a missing
    file or invalid YAML is a ConfigError naming the file and, where YAML knows it, the line."""
    return read_yaml_lines(path, what)[0]


def load_world(path: str | Path, *, check_policies: bool = True) -> World:
    """Load and validate a world YAML; every error names the file, the line and the field.

    With ``check_policies`` (the default) every site's policy chain is composed now, so a world
    whose policies cannot be met together refuses to start here, not at round 57. Sites' ``data:``
    files are checked here too (they exist; they are not silently ignored), before any model is built.
    """
    path = Path(path)
    raw, lines = read_yaml_lines(path, "world file")

    def fail(where: str, msg: str) -> ConfigError:
        return _fail(path, where, msg, lines)

    if not isinstance(raw, dict):
        raise fail("", "must be a mapping with at least `nodes:` (top level)")
    unknown = sorted(str(k) for k in set(raw) - _TOP_KEYS)
    if unknown:
        raise fail(unknown[0], unknown_key_message(unknown[0], _TOP_KEYS))
    nodes_raw = raw.get("nodes")
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise fail("nodes", "must be a non-empty list of {name, parent, policy}")

    base = path.parent
    parents: dict[str, str | None] = {}
    entries: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(nodes_raw):
        where = f"nodes[{i}]"
        if not isinstance(node, dict):
            raise fail(where, "must be a mapping with name, parent, policy")
        bad = sorted(str(k) for k in set(node) - _NODE_KEYS)
        if bad:
            raise fail(f"{where}.{bad[0]}", unknown_key_message(bad[0], _NODE_KEYS))
        name = node.get("name")
        if not isinstance(name, str) or not name:
            raise fail(f"{where}.name", "must be a non-empty string")
        if name in entries:
            raise fail(f"{where}.name", f"duplicate node name {name!r}")
        parent = node.get("parent")
        if parent is not None and not isinstance(parent, str):
            raise fail(f"{where}.parent", "must be a node name or omitted for the root")
        policy = node.get("policy")
        if not isinstance(policy, str):
            raise fail(f"{where}.policy", "must be the path of a policy YAML (relative to the world file)")
        if not (base / policy).is_file():
            raise fail(f"{where}.policy", f"policy file {policy!r} not found (looked in {base / policy})")
        parents[name] = parent
        entries[name] = {**node, "_index": i}

    for name, parent in parents.items():
        if parent is not None and parent not in parents:
            i = entries[name]["_index"]
            raise fail(f"nodes[{i}].parent", f"unknown node {parent!r} (declared: {', '.join(parents)})")
    roots = [n for n, p in parents.items() if p is None]
    if len(roots) != 1:
        raise fail("nodes", f"exactly one node must have no parent (the root); found {len(roots)}: {roots}")

    depth: dict[str, int] = {}
    for name in parents:
        seen = [name]
        cur = parents[name]
        while cur is not None:
            if cur in seen:
                cycle = " -> ".join([*seen[seen.index(cur) :], cur])
                raise fail(f"nodes[{entries[name]['_index']}].parent", f"cycle in the tree: {cycle}")
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
            raise fail(f"{where}.parent", "worlds are at most three levels deep (root -> federations -> sites)")
        if kind == "federation" and any(children[c] for c in children[name]):
            raise fail(where, f"federation {name!r} has federations below it; nest at most one level")
        data = entry.get("data")
        if data is not None and kind != "site":
            raise fail(f"{where}.data", "only sites (leaves) hold data")
        if data is not None and not (isinstance(data, str) and data):
            raise fail(f"{where}.data", f"must be the path of the site's data file or folder (got {data!r})")
        nodes[name] = WorldNode(
            name=name,
            kind=kind,
            policy_path=(base / entry["policy"]).resolve(),
            parent=parents[name],
            children=tuple(children[name]),
            data=(base / data).resolve() if isinstance(data, str) else None,
        )
    if not any(n.kind == "site" for n in nodes.values()):
        raise fail("nodes", "the world has no sites (leaves that hold data)")
    if len({nodes[c].kind for c in nodes[roots[0]].children}) > 1:
        raise fail("nodes", "the root's children must be all federations or all sites, not a mix")

    sections = {key: _section(path, raw, key, lines) for key in ("model", "data", "schedule", "aggregation")}
    _check_site_data(path, lines, sections["data"], nodes, entries)
    world = World(
        path=path,
        name=str(raw.get("name", path.stem)),
        seed=_int(path, "seed", raw.get("seed", 0), lines),
        nodes=nodes,
        lines=lines,
        model=sections["model"],
        data=sections["data"],
        schedule=sections["schedule"],
        aggregation=sections["aggregation"],
    )
    if check_policies:
        check_world_policies(world)
    return world


def _check_site_data(
    path: Path, lines: dict[tuple[Any, ...], int], data: dict[str, Any], nodes: dict[str, WorldNode],
    entries: dict[str, dict[str, Any]],
) -> None:
    """Sites' ``data:`` files: each exists, and none is silently ignored.

    A site's ``data:`` is used only when every site gives one and the world's ``data:`` section names no
    other source; with ``data.synthetic``, ``data.files`` or ``data.hub`` (or when only some sites give
    one, which makes the world synthetic) a site's file would be ignored, so that is an error here.
    """
    sites = [n for n in nodes.values() if n.kind == "site"]
    given = [n for n in sites if n.data is not None]
    if not given:
        return

    def fail(node: WorldNode, msg: str) -> ConfigError:
        return _fail(path, f"nodes[{entries[node.name]['_index']}].data", msg, lines)

    for n in given:
        assert n.data is not None  # `given` holds only the sites with a data file
        if not n.data.exists():
            raw = entries[n.name]["data"]
            raise fail(n, f"site {n.name!r}: data file {raw!r} not found (looked in {n.data})")
    source = next((k for k in ("synthetic", "files", "hub") if data.get(k) is not None), None)
    if source is not None:
        raise fail(given[0], f"site {given[0].name!r} gives its own data file, but data.{source} is this "
                             f"world's data source, so the file would be ignored; remove the site's data: "
                             f"or remove data.{source}")
    missing = [n.name for n in sites if n.data is None]
    if missing:
        raise fail(given[0], f"only some sites give a data file (none for {', '.join(missing)}); give every "
                             "site a data: file, or use data.files (one table with a site column) or data.synthetic")


def check_world_policies(world: World) -> None:
    """Compose every release path now (policy.check_world); a conflict names both files (PolicyError)."""
    from worldlm_secure.policy import check_world

    check_world(world)


def _section(path: Path, raw: dict[str, Any], key: str, lines: dict[tuple[Any, ...], int]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(path, key, "must be a mapping", lines)
    return value


def _int(path: Path, key: str, value: Any, lines: dict[tuple[Any, ...], int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, key, f"must be an integer (got {value!r})", lines)
    return value
