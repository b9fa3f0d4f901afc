"""World-load-time policy checks: every path of a world composes, and every round can actually run.

`check_world(world)` is what the world loader calls, so a world whose policies cannot be
met together refuses to start (naming both files) instead of failing at round 57.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from worldlm_secure.errors import ConfigError, PolicyError
from worldlm_secure.policy.compose import EffectivePolicy, bind_chain, compose
from worldlm_secure.policy.round import RoundPlan, plan_round
from worldlm_secure.policy.schema import MEMBERS, Policy
from worldlm_secure.secagg.ckks_params import CkksParams as ImplParams


class _World(Protocol):
    """What `check_world` needs of `federation.world.World`."""

    @property
    def nodes(self) -> Mapping[str, Any]: ...

    def chain(self, name: str) -> list[Any]: ...


def check_world(
    world: _World, *, load: Callable[[Any], Policy] | None = None
) -> dict[tuple[str, str], EffectivePolicy]:
    """Compose every release path of `world`; raise PolicyError naming both files on any conflict.

    Checks, for every node below the root:
    - its chain up to the root composes, and so does its chain up to its parent (key layers);
    - its parent may receive its shared layers (a site's federation also its key layers, and a
      federation's parent its residual embeddings when residuals are allowed);
    - siblings (one aggregation round) have a protocol in common (`plan_round`);
    - the parent has at least min_cohort children, so a round can ever be released;
    - CKKS key holders other than 'members' are nodes of the world, and every CKKS round has one
      among its members (the aggregator never holds the key).
    Returns {(node, final destination): effective policy}.
    """
    from worldlm_secure.policy.loader import load_policy

    loader = load or (lambda node: load_policy(node.policy_path))
    cache: dict[str, Policy] = {}

    def policies(chain: Sequence[Any]) -> list[Policy]:
        out = []
        for node in chain:
            if node.name not in cache:
                cache[node.name] = loader(node)
            out.append(cache[node.name])
        return out

    effective: dict[tuple[str, str], EffectivePolicy] = {}
    for name, node in world.nodes.items():
        if node.parent is None:
            continue
        chain = world.chain(name)
        full = bind_chain(policies(chain), [n.name for n in chain])  # relations resolve from this node
        up = compose(full)
        effective[(name, chain[-1].name)] = up
        _check_destination(up, full, name, node.parent, "shared")
        if node.children and up.residuals.allowed:  # a federation sends residual embeddings to its parent
            _check_destination(up, full, name, node.parent, "residual")
        parent = world.nodes[node.parent]
        if parent.parent is not None:  # a federation: key layers stop there
            to_parent = compose(full[:2])
            effective[(name, node.parent)] = to_parent
            _check_destination(to_parent, full[:2], name, node.parent, "key")
        for holder in up.secure_aggregation.ckks.key_holders if "ckks" in up.secure_aggregation.acceptable else ():
            if holder != MEMBERS and holder not in world.nodes:
                raise PolicyError(
                    f"{up.sources.get('secure_aggregation.ckks.key_holders', full[0].source)} "
                    f"secure_aggregation.ckks.key_holders: {holder!r} is not a node of the world "
                    f"(nodes: {', '.join(world.nodes)}); name a node or use 'members'"
                )

    for name, node in world.nodes.items():
        kids = list(node.children)
        for final in sorted({f for (n, f) in effective if n in kids}):
            _check_round(world, name, [k for k in kids if (k, final) in effective], final, effective)
    return effective


def _check_destination(eff: EffectivePolicy, chain: Sequence[Policy], node: str, dest: str, group: str) -> None:
    from worldlm_secure.policy.compose import _refusing_rule

    refusal = _refusing_rule(eff.egress.rules, dest, group)
    if refusal is not None:
        raise PolicyError(
            f"{refusal[0]} egress.destinations: node {node!r} must send its {group} layers to its parent "
            f"{dest!r} but {refusal[1]} (policy chain: {', '.join(p.source for p in chain)}); "
            f"allow {group} to {dest!r} (by name, or as relation: parent, or by its policy's jurisdiction) "
            "or move the node"
        )


def _check_round(
    world: _World,
    parent: str,
    members: Sequence[str],
    final: str,
    effective: dict[tuple[str, str], EffectivePolicy],
) -> None:
    if not members:
        return
    plan = plan_round({m: effective[(m, final)] for m in members})
    if plan.protocol == "ckks":
        check_ckks_usable(plan, parent, members, final, effective)
        named = set(plan.ckks.key_holders) - {MEMBERS}
        if named and MEMBERS not in plan.ckks.key_holders and not named & set(members):
            where = effective[(members[0], final)].sources.get("secure_aggregation.ckks.key_holders", "")
            raise PolicyError(
                f"{where} secure_aggregation.ckks.key_holders: none of {', '.join(sorted(named))} is a member of the "
                f"CKKS round at {parent!r} ({', '.join(members)}), so nobody could decrypt it (the aggregator "
                f"{parent!r} never holds the key); name at least one of its members"
            )
    if len(members) < plan.min_cohort:
        src = next(
            effective[(m, final)].sources["secure_aggregation.min_cohort"]
            for m in members
            if effective[(m, final)].secure_aggregation.min_cohort == plan.min_cohort
        )
        raise PolicyError(
            f"{src} secure_aggregation.min_cohort: {plan.min_cohort} contributors required but {parent!r} has only "
            f"{len(members)} children in {getattr(world, 'path', 'the world')}; add members or lower min_cohort"
        )


def check_ckks_usable(
    plan: RoundPlan, parent: str, members: Sequence[str], final: str, effective: Mapping[tuple[str, str], EffectivePolicy]
) -> None:
    """Run the CKKS implementation's own parameter checks now (noise budget, slot width) for the CKKS round of
    ``members`` at ``parent`` (a tree round here; the engine calls it for a flat method's one round of every
    site at the root). Raises PolicyError naming the file that set scale_bits, the limit and the fix."""
    try:
        impl = ImplParams.from_policy(plan.ckks)
        impl.check_cohort(len(members))
    except ConfigError as exc:
        where = effective[(members[0], final)].sources.get("secure_aggregation.ckks.scale_bits", "")
        raise PolicyError(f"{where} {exc} (round at {parent!r} with {len(members)} members)") from None
