"""Assign every model parameter to exactly one group: ``local``, ``key`` or ``shared``.

- local: never leaves the site (personalization, e.g. the output head);
- key: aggregated inside one federation only (attentive aggregation);
- shared: averaged up the whole tree.
Which group a name belongs to is the policy's rule (`policy.LayerPatterns.group_of`: globs over
``named_parameters()``, local wins, key and shared must not overlap); this module applies it to a model.

With adapters (`model.adapters`) the names are the LoRA tensors' (e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``): the frozen base weights are
buffers, not parameters, so they are never grouped. As a second guard, `assign_groups` refuses to put a
frozen base weight (one listed in ``frozen``, or a name peft gives a wrapped base layer:
``...base_layer...`` / ``...original_module...``) in a released group (key or shared), naming the policy
field that selected it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from worldlm_secure.errors import ConfigError, WorldLMError
from worldlm_secure.model.adapters import is_base_name

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


def assign_groups(
    names: Iterable[str], group_of: Callable[[str], str], *, source: str, frozen: Collection[str] = ()
) -> ParameterGroups:
    """Group ``names`` with the rule ``group_of``; a failure is re-raised naming ``source`` (file and section).

    ``frozen``: names of base weights that must never leave a site (a pretrained model's frozen weights);
    one of them, or a peft base-layer name, in key or shared raises ConfigError naming ``source`` and the group.
    """
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    frozen_set = frozenset(frozen)
    for name in names:
        try:
            group = group_of(name)
        except WorldLMError as exc:
            raise ConfigError(f"{source}: {str(exc).removeprefix('layers: ')}") from None
        if group != "local" and (name in frozen_set or is_base_name(name)):
            raise ConfigError(
                f"{source}: layers.{group} selects {name!r}, a frozen base weight, which would be released with "
                f"the {group} group; base weights never leave a site: make the layers.{group} globs match adapter "
                "tensors only (e.g. '*.lora_A.*', '*.lora_B.*') or list the base weight under layers.local"
            )
        out[group].append(name)
    return ParameterGroups(*(tuple(out[g]) for g in GROUPS))
