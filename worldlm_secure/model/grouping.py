"""Assign every model parameter to exactly one group: ``local``, ``key`` or ``shared``.

- local: never leaves the site (personalization, e.g. the output head);
- key: aggregated inside one federation only (attentive aggregation);
- shared: averaged up the whole tree.
Which group a name belongs to is the policy's rule (`policy.LayerPatterns.group_of`: globs over
``named_parameters()``, local wins, key and shared must not overlap); this module applies it to a model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from worldlm_secure.errors import ConfigError, WorldLMError

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


def assign_groups(names: Iterable[str], group_of: Callable[[str], str], *, source: str) -> ParameterGroups:
    """Group ``names`` with the rule ``group_of``; a failure is re-raised naming ``source`` (file and section)."""
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name in names:
        try:
            group = group_of(name)
        except WorldLMError as exc:
            raise ConfigError(f"{source}: {str(exc).removeprefix('layers: ')}") from None
        out[group].append(name)
    return ParameterGroups(*(tuple(out[g]) for g in GROUPS))
