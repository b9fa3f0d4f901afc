"""Composition: the effective policy of a release path is the strictest of every rule along it.

`compose([p_node, p_parent, ..., p_root])` (releasing node first). The rules, field by
field, are in ``protocols/policy.md``; in short: smallest ε and δ, largest min_cohort,
intersections of allowed protocols, mechanisms and destinations, unions of requirements
and local layers. Choices that are not "stricter" or "looser" (e.g. CKKS moduli) come
from the nearest policy that writes them. Where two policies cannot both be met,
`PolicyError` names both files (and lines).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any, Literal, Optional, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy.patterns import LayerPatterns
from worldlm_secure.policy.schema import (
    ANY,
    Destination,
    Accountant,
    Audit,
    CkksParams,
    DPLevel,
    Group,
    MaskingParams,
    Mechanism,
    Policy,
    Protocol,
    RecordDP,
    Requirement,
    Residuals,
    same_jurisdiction,
)

LEVEL_ORDER = {"none": 0, "record": 1, "user": 2}  # DP levels, weakest first
_NEEDS_MASKING = {"distributed_discrete_gaussian", "distributed_skellam"}  # integer-domain noise
_GROUPS: tuple[Group, ...] = ("key", "shared", "residual")
_REQUIREMENTS: tuple[Requirement, ...] = ("differential_privacy", "secure_aggregation")
_M = TypeVar("_M", bound=str)
_Num = TypeVar("_Num", int, float)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EffectiveSecureAggregation(_Frozen):
    protocol: Protocol  # this path's preferred protocol; a round's is chosen by `plan_round` among `acceptable`
    acceptable: tuple[Protocol, ...]  # every protocol all policies on the path accept, nearest preference first
    min_cohort: int
    max_dropout_fraction: float
    masking: MaskingParams
    ckks: CkksParams

    @property
    def params(self) -> MaskingParams | CkksParams | None:
        """The parameter section of the chosen protocol (what `make_secure_sum(params=...)` takes)."""
        by_protocol: dict[str, MaskingParams | CkksParams] = {"masking": self.masking, "ckks": self.ckks}
        return by_protocol.get(self.protocol)


class EffectiveDifferentialPrivacy(_Frozen):
    level: DPLevel
    mechanism: Optional[Mechanism]  # None when level is none; a round's is chosen by `plan_round`
    acceptable_mechanisms: tuple[Mechanism, ...] = ()  # usable with this path's preferred protocol, preference first
    epsilon_budget: Optional[float]  # ε at `delta` over the whole run (user level, or record level if level=record)
    delta: Optional[float]
    clipping_norm: float
    noise_multiplier: float | Literal["auto"]
    accountant: Accountant
    record: Optional[RecordDP]  # set when DP-SGD must run inside the site (level record, or required in addition)

    @property
    def record_level(self) -> bool:
        """True if record-level DP-SGD must run inside the site."""
        return self.record is not None


class EffectiveEgress(_Frozen):
    destinations: tuple[str, ...]  # nodes every policy allows ("*" = any node; "@parent"... = not resolved)
    groups: dict[str, tuple[Group, ...]]  # destination -> groups it may receive
    require: tuple[Requirement, ...]
    rules: tuple[tuple[str, tuple[tuple[str, tuple[Group, ...]], ...], str], ...] = Field(
        default=(),
        description=(
            "(policy file, ((destination glob, groups), ...), what the policy's destinations are, in words) for "
            "every policy, nearest first; destinations by relation or jurisdiction are resolved to node names "
            "when the chain is bound to a world"
        ),
    )

    def allows(self, destination: str, group: str) -> bool:
        return _refusing_rule(self.rules, destination, group) is None


class EffectivePolicy(_Frozen):
    """The composed policy of one release path. `sha256` goes into the ledger."""

    policies: tuple[str, ...]  # policy names, releasing node first
    layers: LayerPatterns
    secure_aggregation: EffectiveSecureAggregation
    differential_privacy: EffectiveDifferentialPrivacy
    residuals: Residuals
    egress: EffectiveEgress
    audit: Audit
    sources: dict[str, str] = Field(default_factory=dict, exclude=True)  # field path -> file:line it came from
    files: tuple[str, ...] = Field(default=(), exclude=True)  # policy files, releasing node first

    def canonical_json(self) -> str:
        """Deterministic JSON of the rules (no file paths), the input of `sha256`."""
        data = self.model_dump(mode="json", exclude={"sources", "files"})
        data["egress"].pop("rules", None)  # file paths; the rule content is already in the other fields
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of `canonical_json()`."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    @property
    def chain_ids(self) -> tuple[str, ...]:
        return self.files or self.policies


# ------------------------------------------------------------------ helpers


def _explicit(p: Policy, dotted: str) -> bool:
    """Did the policy's YAML (or its base) write this field? Falls back to pydantic's fields_set."""
    parts = tuple(dotted.split("."))
    if p._where:
        return parts in p._where
    node: Any = p
    for part in parts:
        if not isinstance(node, BaseModel) or part not in node.model_fields_set:
            return False
        node = getattr(node, part)
    return True


def _get(p: Policy, dotted: str) -> Any:
    node: Any = p
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


class _Builder:
    def __init__(self, chain: Sequence[Policy]) -> None:
        self.chain = list(chain)
        self.sources: dict[str, str] = {}

    def nearest(self, dotted: str, among: Sequence[Policy] | None = None) -> Any:
        """Value from the nearest policy that writes `dotted`; else the nearest policy's (default) value."""
        pool = list(among) if among is not None else self.chain
        for p in pool:
            if _explicit(p, dotted):
                self.sources[dotted] = p.where(dotted)
                return _get(p, dotted)
        self.sources[dotted] = f"{pool[0].source} (default)"
        return _get(pool[0], dotted)

    def pick(self, dotted: str, better: Callable[[Any, Any], bool], among: Sequence[Policy] | None = None) -> Any:
        """The strictest value; `better(a, b)` is True if a is stricter than b. Ties go to the nearer policy."""
        pool = list(among) if among is not None else self.chain
        best_p = pool[0]
        for p in pool[1:]:
            if better(_get(p, dotted), _get(best_p, dotted)):
                best_p = p
        self.sources[dotted] = best_p.where(dotted)
        return _get(best_p, dotted)

    def choose(self, dotted: str, *, drop: set[str], what: str, because: str = "") -> tuple[str, list[str]]:
        """Intersect the policies' acceptable lists at `dotted`; order by the nearest policy's preference.

        `drop` are values ruled out by another rule (`because` says which file and rule).
        """
        lists = [(p, list(_get(p, dotted))) for p in self.chain]
        running: set[str] = set(lists[0][1]) - drop
        for j, (pj, lj) in enumerate(lists):
            new = running & set(lj) - drop
            if not new:
                if not set(lj) - drop:
                    raise PolicyError(
                        f"{pj.where(dotted)} {dotted} allows only [{', '.join(lj)}] but {because or 'another rule'}: "
                        f"no {what} satisfies both; allow one of the others"
                    )
                pi = min((p for p, _ in lists[:j]), key=lambda p: len(set(_get(p, dotted)) & set(lj) - drop))
                raise PolicyError(
                    f"{pi.where(dotted)} {dotted} allows only {_show(_get(pi, dotted), drop)} but "
                    f"{pj.where(dotted)} allows only {_show(lj, drop)}: no {what} satisfies both; "
                    f"make one of them accept the other's"
                )
            running = new
        ordered = [v for v in lists[0][1] if v in running]
        self.sources[dotted] = _join(p.where(dotted) for p in self.chain)
        return ordered[0], ordered


def _join(items: Any) -> str:
    """Comma-joined, de-duplicated, in order."""
    return ", ".join(dict.fromkeys(items))


def _show(values: Sequence[str], drop: set[str]) -> str:
    shown = [v for v in values if v not in drop]
    return "[" + _join(shown) + "]" if shown else "[nothing usable]"


def _max_num_or_auto(values: Sequence[_Num | Literal["auto"]]) -> _Num | Literal["auto"]:
    nums = [v for v in values if not isinstance(v, str)]
    return max(nums) if nums else "auto"


# ------------------------------------------------------------------ composition


def bind_chain(chain: Sequence[Policy], nodes: Sequence[str]) -> list[Policy]:
    """`chain` (releasing node first) attached to the nodes `nodes` (the releasing node, then its ancestors up
    to the root; at least as many as `chain`), so destinations by relation and jurisdiction resolve."""
    nodes = list(nodes)
    if len(nodes) < len(chain):
        raise PolicyError(f"bind_chain: {len(chain)} policies but only {len(nodes)} nodes ({', '.join(nodes)})")
    return [p.bound(nodes[i:]) for i, p in enumerate(chain)]


def compose(chain: Sequence[Policy], nodes: Sequence[str] | None = None) -> EffectivePolicy:
    """The effective policy of a release from `chain[0]`'s node up to `chain[-1]` (the root, or the release's
    final destination).

    `nodes`: the releasing node's name, then its ancestors up to the root; defaults to the place the first
    policy was bound to (`Policy.bound`, `bind_chain`). With it, destinations by relation (parent, ancestors,
    root) and jurisdiction become node names; without it they stay unresolved and allow nothing.
    Raises PolicyError naming both files when two policies along the chain cannot both be met.
    """
    if not chain:
        raise PolicyError("compose: empty policy chain; a release needs at least the releasing node's policy")
    for p in chain:
        if not isinstance(p, Policy):
            raise PolicyError(f"compose: expected Policy objects (got {type(p).__name__}); use load_policy(path)")
    if nodes is not None:
        chain = bind_chain(chain, nodes)
    b = _Builder(chain)
    src = b.sources

    # ---- layers: local anywhere is local; key/shared from the nearest policy that writes them
    local = tuple(dict.fromkeys(pat for p in chain for pat in p.layers.local))
    src["layers.local"] = _join(p.where("layers.local") for p in chain if p.layers.local)
    layers = LayerPatterns.model_construct(
        local=local, key=tuple(b.nearest("layers.key")), shared=tuple(b.nearest("layers.shared"))
    )

    # ---- requirements (union) and secure aggregation
    require = tuple(r for r in _REQUIREMENTS if any(r in p.egress.require for p in chain))
    src["egress.require"] = _join(p.where("egress.require") for p in chain if p.egress.require) or "(none)"
    drop = {"none"} if "secure_aggregation" in require else set()
    why = next((p for p in chain if "secure_aggregation" in p.egress.require), None)
    because = f"{why.where('egress.require')} egress.require lists secure_aggregation" if why else ""
    _, chosen = b.choose("secure_aggregation.protocol", drop=drop, what="protocol", because=because)
    acceptable = cast(list[Protocol], chosen)  # values of the policies' secure_aggregation.protocol lists
    # ---- differential privacy (only policies that ask for DP constrain it); may narrow the protocols
    dp, acceptable = _compose_dp(b, chain, acceptable)
    protocol = acceptable[0]
    min_cohort = b.pick("secure_aggregation.min_cohort", lambda a, c: a > c)
    dropout = b.pick("secure_aggregation.max_dropout_fraction", lambda a, c: a < c)
    masking = MaskingParams.model_construct(
        neighbours=_max_num_or_auto([p.secure_aggregation.masking.neighbours for p in chain]),
        threshold=b.pick("secure_aggregation.masking.threshold", lambda a, c: a > c),
        bits=b.pick("secure_aggregation.masking.bits", lambda a, c: a > c),
        clip_range=b.nearest("secure_aggregation.masking.clip_range"),
    )
    src["secure_aggregation.masking.neighbours"] = _join(
        p.where("secure_aggregation.masking.neighbours") for p in chain
    )
    # moduli and scale must fit together: take both from the nearest policy that writes either
    ckks_from = next(
        (p for p in chain if _explicit(p, "secure_aggregation.ckks.coeff_mod_bit_sizes")
         or _explicit(p, "secure_aggregation.ckks.scale_bits")),
        chain[0],
    )
    ckks = CkksParams.model_construct(
        poly_modulus_degree=b.pick("secure_aggregation.ckks.poly_modulus_degree", lambda a, c: a > c),
        coeff_mod_bit_sizes=ckks_from.secure_aggregation.ckks.coeff_mod_bit_sizes,
        scale_bits=ckks_from.secure_aggregation.ckks.scale_bits,
        key_holders=b.nearest("secure_aggregation.ckks.key_holders"),
        rotate_every_rounds=b.pick("secure_aggregation.ckks.rotate_every_rounds", lambda a, c: a < c),
        clip_range=b.nearest("secure_aggregation.ckks.clip_range"),
        value_bits=b.pick("secure_aggregation.ckks.value_bits", lambda a, c: a > c),
    )
    for f in ("coeff_mod_bit_sizes", "scale_bits"):
        src[f"secure_aggregation.ckks.{f}"] = ckks_from.where(f"secure_aggregation.ckks.{f}")
    secagg = EffectiveSecureAggregation(
        protocol=protocol, acceptable=tuple(acceptable), min_cohort=min_cohort, max_dropout_fraction=dropout,
        masking=masking, ckks=ckks,
    )

    if dp.delta is not None and dp.delta >= 1.0 / min_cohort:
        raise PolicyError(
            f"{src['differential_privacy.delta']} differential_privacy.delta {dp.delta:g} must be < 1/min_cohort = "
            f"{1.0 / min_cohort:g} with min_cohort {min_cohort} from {src['secure_aggregation.min_cohort']}; "
            "lower delta or the cohort requirement"
        )

    # ---- residuals, egress, audit
    residuals = Residuals.model_construct(
        allowed=all(p.residuals.allowed for p in chain),
        rank=b.pick("residuals.rank", lambda a, c: a < c),
        gain=b.pick("residuals.gain", lambda a, c: a < c),
        require_dp=any(p.residuals.require_dp for p in chain),
    )
    src["residuals.allowed"] = _join(p.where("residuals.allowed") for p in chain)
    if residuals.allowed and residuals.require_dp and dp.level == "none":  # pragma: no cover - schema forbids
        raise PolicyError(f"{src['residuals.allowed']} residuals.require_dp: DP required but no policy enables it")
    egress = _compose_egress(chain, require, src)
    audit = Audit.model_construct(
        ledger=any(p.audit.ledger for p in chain),
        signing=any(p.audit.signing for p in chain),
        retention_days=b.pick("audit.retention_days", lambda a, c: a > c),
    )
    src["secure_aggregation.acceptable"] = src["secure_aggregation.protocol"]
    if "differential_privacy.mechanism" in src:
        src["differential_privacy.acceptable_mechanisms"] = src["differential_privacy.mechanism"]
    src["egress.groups"] = src["egress.destinations"]
    for flag, value in (("residuals.require_dp", residuals.require_dp), ("audit.ledger", audit.ledger),
                        ("audit.signing", audit.signing)):  # "any policy asks" rules: name the ones that ask
        askers = [p.where(flag) for p in chain if _get(p, flag)]
        src[flag] = _join(askers) if value and askers else _join(p.where(flag) for p in chain)
    return EffectivePolicy(
        policies=tuple(p.name for p in chain),
        layers=layers,
        secure_aggregation=secagg,
        differential_privacy=dp,
        residuals=residuals,
        egress=egress,
        audit=audit,
        sources=dict(src),
        files=tuple(p.source for p in chain),
    )


def usable_mechanisms(mechanisms: Sequence[_M], protocol: str) -> list[_M]:
    """The mechanisms that work with `protocol`: distributed (integer) noise needs masking."""
    return [m for m in mechanisms if protocol == "masking" or m not in _NEEDS_MASKING]


def _compose_dp(
    b: _Builder, chain: Sequence[Policy], protocols: Sequence[Protocol]
) -> tuple[EffectiveDifferentialPrivacy, list[Protocol]]:
    """The composed DP section, and the protocols (of `protocols`) that some acceptable mechanism works with."""
    src = b.sources
    with_dp = [p for p in chain if p.differential_privacy.level != "none"]
    if not with_dp:
        src["differential_privacy.level"] = _join(p.where("differential_privacy.level") for p in chain)
        base = chain[0].differential_privacy
        return EffectiveDifferentialPrivacy(
            level="none", mechanism=None, epsilon_budget=None, delta=None, clipping_norm=base.clipping_norm,
            noise_multiplier=base.noise_multiplier, accountant=base.accountant, record=None,
        ), list(protocols)
    level = b.pick("differential_privacy.level", lambda a, c: LEVEL_ORDER[a] > LEVEL_ORDER[c], among=with_dp)
    sub = _Builder(with_dp)
    _, chosen = sub.choose("differential_privacy.mechanism", drop=set(), what="noise mechanism")
    mechanisms = cast(list[Mechanism], chosen)  # values of the policies' differential_privacy.mechanism lists
    usable = [p for p in protocols if usable_mechanisms(mechanisms, p)]
    if not usable:
        raise PolicyError(
            f"{sub.sources['differential_privacy.mechanism']} differential_privacy.mechanism allows only "
            f"[{', '.join(mechanisms)}], which add integer noise and need protocol masking, but "
            f"{src['secure_aggregation.protocol']} secure_aggregation.protocol allows only [{', '.join(protocols)}]; "
            "allow central_gaussian or masking"
        )
    mechanism = usable_mechanisms(mechanisms, usable[0])[0]
    src.update(sub.sources)
    at_level = [p for p in with_dp if p.differential_privacy.level == level]
    epsilon = b.pick("differential_privacy.epsilon_budget", lambda a, c: a < c, among=at_level)
    delta = b.pick("differential_privacy.delta", lambda a, c: a < c, among=with_dp)
    clip = b.pick("differential_privacy.clipping_norm", lambda a, c: a < c, among=with_dp)
    noise = _max_num_or_auto([p.differential_privacy.noise_multiplier for p in with_dp])
    src["differential_privacy.noise_multiplier"] = _join(p.where("differential_privacy.noise_multiplier") for p in with_dp)
    accountant = b.nearest("differential_privacy.accountant", among=with_dp)
    # record-level DP-SGD: required if any policy is level=record or writes a record section
    rec_ps = [p for p in with_dp if p.differential_privacy.level == "record" or p.differential_privacy.record]
    record = None
    if rec_ps:
        recs = [(p, p.differential_privacy.record or RecordDP()) for p in rec_ps]
        budgets = [(r.epsilon_budget or p.differential_privacy.epsilon_budget) for p, r in recs]
        record = RecordDP.model_construct(
            max_grad_norm=min(r.max_grad_norm for _, r in recs),
            noise_multiplier=_max_num_or_auto([r.noise_multiplier for _, r in recs]),
            epsilon_budget=min(x for x in budgets if x is not None),
        )
        src["differential_privacy.record"] = _join(p.where("differential_privacy.record") for p in rec_ps)
    return EffectiveDifferentialPrivacy(
        level=level, mechanism=mechanism, acceptable_mechanisms=tuple(mechanisms), epsilon_budget=epsilon,
        delta=delta, clipping_norm=clip, noise_multiplier=noise, accountant=accountant, record=record,
    ), usable


def _resolve(d: Destination, chain: Sequence[Policy]) -> tuple[list[str], str]:
    """The node names (or globs) destination `d` of a policy in `chain` stands for, and how to show it."""
    groups = "/".join(d.groups)
    if d.name is not None:
        return [d.name], f"{d.name}: {groups}"
    path = chain[0].path
    if path is None:  # not attached to a world: nothing to resolve against
        return [d.token], f"{d.label} (not resolved: the policy is not attached to a node of a world): {groups}"
    above = list(path[1:])
    if d.relation == "parent":
        names = above[:1]
    elif d.relation == "ancestors":
        names = above
    elif d.relation == "root":
        names = above[-1:]
    else:
        assert d.jurisdiction is not None
        names = [path[i] for i in range(1, min(len(chain), len(path)))
                 if same_jurisdiction(chain[i].jurisdiction, d.jurisdiction)]
    if names:
        return names, f"{d.label} (= {', '.join(names)}): {groups}"
    if d.jurisdiction is not None:
        declared = [f"{path[i]} declares {chain[i].jurisdiction!r}" for i in range(1, min(len(chain), len(path)))]
        why = f"no node above {path[0]!r} declares it" + (f": {'; '.join(declared)}" if declared else "")
    else:
        why = f"{path[0]!r} has none"
    return [], f"{d.label} ({why}): {groups}"


def _compose_egress(chain: Sequence[Policy], require: tuple[Requirement, ...], src: dict[str, str]) -> EffectiveEgress:
    rules = []
    for p in chain:
        dests: list[tuple[str, tuple[Group, ...]]] = []
        shown: list[str] = []
        for d in p.egress.destinations:
            names, text = _resolve(d, chain)
            dests.extend((n, tuple(d.groups)) for n in names)
            shown.append(text)
        rules.append((p.where("egress.destinations"), tuple(dests), "; ".join(shown)))
    names = list(dict.fromkeys(n for _, dests, _ in rules for n, _ in dests if n != ANY))
    if all(any(n == ANY for n, _ in dests) for _, dests, _ in rules):
        names.insert(0, ANY)
    groups: dict[str, tuple[Group, ...]] = {}
    for name in names:
        ok = tuple(g for g in _GROUPS if _refusing_rule(rules, name, g) is None)
        if ok:
            groups[name] = ok
    src["egress.destinations"] = _join(p.where("egress.destinations") for p in chain)
    return EffectiveEgress(destinations=tuple(groups), groups=groups, require=require, rules=tuple(rules))


def _refusing_rule(
    rules: Sequence[tuple[str, Sequence[tuple[str, Sequence[str]]], str]], destination: str, group: str
) -> tuple[str, str] | None:
    """(policy file, what it allows) of the first policy that refuses `group` to `destination`, or None."""
    for where, dests, shown in rules:
        matching = [(n, gs) for n, gs in dests if n == destination or (n != destination and fnmatchcase(destination, n))]
        if not any(group in gs for _, gs in matching):
            if matching:
                allowed = sorted({g for _, gs in matching for g in gs})
                return where, f"{destination!r} may receive only [{', '.join(allowed)}] (destinations: [{shown}])"
            return where, f"its destinations are [{shown or 'none'}]"
    return None
