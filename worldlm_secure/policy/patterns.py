"""Layer patterns: which model parameters are local, key or shared.

A pattern is an `fnmatch` glob over the names `model.named_parameters()` yields
(e.g. ``*.mlp.*`` matches ``model.layers.3.mlp.gate_proj.weight``). Matching is
case-sensitive (`fnmatch.fnmatchcase`), so it does not depend on the platform.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase, translate
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from worldlm_secure.errors import PolicyError

GROUPS: tuple[str, ...] = ("local", "key", "shared")


class FieldProblem(ValueError):
    """A cross-field rule failed; `path` is the dotted field path relative to the validated model."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def pattern_problem(pattern: object) -> str | None:
    """Why `pattern` is not a usable glob, or None if it is fine."""
    if not isinstance(pattern, str):
        return f"a pattern must be a string (got {type(pattern).__name__})"
    if not pattern.strip():
        return "a pattern must not be empty"
    if any(ch.isspace() for ch in pattern):
        return f"a pattern must not contain whitespace (got {pattern!r})"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            close = pattern.find("]", i + 2)  # fnmatch allows ']' as the first member of a set
            if close == -1:
                return f"unbalanced '[' in pattern {pattern!r}; close the set with ']' or remove it"
            i = close + 1
        elif ch == "]":
            return f"stray ']' in pattern {pattern!r}; open the set with '[' or remove it"
        else:
            i += 1
    return None


@lru_cache(maxsize=1024)
def _union_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for a group's globs, so matching a name is one regex call (cached by the patterns)."""
    return re.compile("|".join(translate(p) for p in patterns)) if patterns else None


class LayerPatterns(BaseModel):
    """The three parameter groups as glob lists. `local` never leaves a site."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    local: tuple[str, ...] = Field(
        default=(), description="Globs of parameters that never leave the site (personalization)."
    )
    key: tuple[str, ...] = Field(
        default=(), description="Globs of parameters aggregated inside one federation only (attentive aggregation)."
    )
    shared: tuple[str, ...] = Field(
        default=(), description="Globs of parameters averaged up the whole tree (the backbone)."
    )

    @field_validator("local", "key", "shared")
    @classmethod
    def _valid_globs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            problem = pattern_problem(pattern)
            if problem:
                raise ValueError(problem)
        if len(set(value)) != len(value):
            dup = next(p for p in value if value.count(p) > 1)
            raise ValueError(f"pattern {dup!r} is listed twice; list each pattern once")
        return value

    @model_validator(mode="after")
    def _one_group_per_pattern(self) -> LayerPatterns:
        seen: dict[str, str] = {}
        for group in GROUPS:
            for pattern in getattr(self, group):
                if pattern in seen:
                    raise FieldProblem(
                        group,
                        f"pattern {pattern!r} is in both {seen[pattern]} and {group}; a pattern belongs to one group",
                    )
                seen[pattern] = group
        return self

    def matches(self, group: str, name: str) -> bool:
        """True if parameter `name` matches any glob of `group` (case-sensitive, like `fnmatchcase`)."""
        rx = _union_regex(getattr(self, group))
        return rx is not None and rx.match(name) is not None

    def group_of(self, name: str) -> str:
        """The group of parameter `name`: "local" wins over everything; key and shared must not overlap.

        Raises PolicyError if the name matches no group, or both key and shared.
        """
        if self.matches("local", name):
            return "local"
        in_key, in_shared = self.matches("key", name), self.matches("shared", name)
        if in_key and in_shared:
            raise PolicyError(
                f"layers: parameter {name!r} matches both key {self._hits('key', name)} and shared "
                f"{self._hits('shared', name)}; narrow one of the patterns"
            )
        if in_key:
            return "key"
        if in_shared:
            return "shared"
        raise PolicyError(
            f"layers: parameter {name!r} matches no local, key or shared pattern; add a glob for it to one group"
        )

    def _hits(self, group: str, name: str) -> list[str]:
        return [p for p in getattr(self, group) if fnmatchcase(name, p)]
