"""The learning methods one engine runs: WorldLM and the baselines it is compared against.

Every method is the same round loop with a different plan:
- which parameters are local / key / shared (from the policy, or all of one kind);
- whether the tree is used, or all sites sit flat under the root;
- how key layers are aggregated (attentive or plain weighted average);
- whether federations exchange residual layer embeddings;
- how often the root averages (HierFAVG's cloud interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worldlm_secure.errors import ConfigError

GroupSource = Literal["policy", "all_shared", "all_local", "policy_local_rest_shared"]


@dataclass(frozen=True)
class Method:
    name: str
    groups: GroupSource
    flat: bool
    attentive_key: bool
    residuals: bool
    description: str
    root_every_from_world: bool = False  # HierFAVG: the root averages every `hierfavg_root_every` rounds


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("worldlm", "policy", False, True, True, "WorldLM: local head, attentive key layers per federation, shared backbone, residual embeddings"),
        Method("fedavg", "all_shared", True, False, False, "FedAvg: one flat federation, every parameter averaged"),
        Method("local", "all_local", True, False, False, "Local: every site trains alone"),
        Method("fedper", "policy_local_rest_shared", True, False, False, "FedPer: flat, local head, the rest averaged"),
        Method("hierfavg", "all_shared", False, False, False, "HierFAVG: the same tree, plain averaging at every level", True),
    )
}


def parse_methods(spec: str | None) -> list[Method]:
    """``"worldlm,fedavg"`` -> methods; ``None`` or ``"all"`` -> every method."""
    if spec is None or spec.strip() in ("", "all"):
        return list(METHODS.values())
    out = []
    for name in (s.strip() for s in spec.split(",")):
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r} (valid: {', '.join(METHODS)}, all)")
        out.append(METHODS[name])
    return out
