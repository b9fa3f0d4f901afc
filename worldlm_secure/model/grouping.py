"""Assign every model parameter to exactly one group: ``local``, ``key`` or ``shared``.

- local: never leaves the site (personalization, e.g. the output head);
- key: aggregated inside one federation only (attentive aggregation);
- shared: averaged up the whole tree.
Patterns are fnmatch globs over ``named_parameters()`` names, from a policy's ``layers:`` section.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

Group = Literal["local", "key", "shared"]
GROUPS: tuple[Group, ...] = ("local", "key", "shared")


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter names per group, each in model order."""

    local: tuple[str, ...]
    key: tuple[str, ...]
    shared: tuple[str, ...]

    def of(self, group: Group) -> tuple[str, ...]:
        return getattr(self, group)

    def group_of(self, name: str) -> Group:
        for g in GROUPS:
            if name in self.of(g):
                return g
        raise KeyError(name)


def assign_groups(
    names: Iterable[str], patterns: Mapping[str, Iterable[str]], *, source: str = "layers"
) -> ParameterGroups:
    """Group ``names`` by ``patterns`` (group -> globs).

    Raises ``ConfigError`` naming ``source``, the parameter and the matching groups when a
    parameter matches no group or more than one.
    """
    from worldlm_secure.errors import ConfigError

    unknown = set(patterns) - set(GROUPS)
    if unknown:
        raise ConfigError(f"{source}: unknown group(s) {sorted(unknown)} (valid: local, key, shared)")
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in names:
        hits = [g for g in GROUPS if any(fnmatchcase(name, p) for p in patterns.get(g, ()))]
        if not hits:
            raise ConfigError(
                f"{source}: parameter {name!r} matches no pattern in local, key or shared; add a pattern for it"
            )
        if len(hits) > 1:
            raise ConfigError(
                f"{source}: parameter {name!r} matches both {hits[0]} and {hits[1]}; "
                "each parameter must belong to exactly one group"
            )
        out[hits[0]].append(name)
    return ParameterGroups(*(tuple(out[g]) for g in GROUPS))
