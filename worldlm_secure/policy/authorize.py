"""Enforcement: the one check every release path calls before anything leaves a node.

`authorize(release, chain)` composes the chain (or takes an `EffectivePolicy`) and
either returns an `Authorization` or raises `PolicyViolation` naming the rule, the
allowed value and the requested value. Secure aggregation, DP, the ledger and the
transport call it; a release without a matching authorization is a bug.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from worldlm_secure.errors import PolicyError, PolicyViolation
from worldlm_secure.policy.compose import LEVEL_ORDER, EffectivePolicy, _refusing_rule, compose, usable_mechanisms
from worldlm_secure.policy.schema import Policy

ReleaseGroup = Literal["key", "shared", "residual"]


@dataclass(frozen=True)
class Release:
    """One thing about to leave `source` for `destination` in round `round`.

    `tensor_names` are `named_parameters()` names (for a residual: the key layers it embeds).
    `protocol`, `dp_level`, `dp_mechanism` describe the protections actually applied;
    `cohort_size` is the number of contributors in the aggregate; `record_dp` is True when
    the contributing sites trained with DP-SGD; `rank` is a residual embedding's rank.
    """

    source: str
    destination: str
    round: int
    group: ReleaseGroup
    tensor_names: tuple[str, ...]
    protocol: str
    dp_level: str
    dp_mechanism: str | None
    cohort_size: int
    record_dp: bool = False
    rank: int | None = None


@dataclass(frozen=True)
class Authorization:
    """Proof that `release` was checked against the effective policy with hash `policy_sha256`."""

    release: Release
    policy_sha256: str
    policies: tuple[str, ...]
    checked: tuple[str, ...] = field(default=())

    @property
    def digest(self) -> str:
        """Hex SHA-256 binding this release to the policy hash (record it in the ledger)."""
        body = json.dumps({"release": asdict(self.release), "policy": self.policy_sha256}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()

    def covers(self, release: Release) -> bool:
        """True if this authorization was issued for exactly `release`."""
        return self.release == release


def _violation(rule: str, allowed: object, requested: object, hint: str = "") -> PolicyViolation:
    text = f"{rule}: allowed {allowed}, requested {requested}"
    return PolicyViolation(f"{text}; {hint}" if hint else text)


def authorize(
    release: Release, chain: Sequence[Policy] | EffectivePolicy, nodes: Sequence[str] | None = None
) -> Authorization:
    """Authorize `release` under the policies along its path (releasing node first), or raise PolicyViolation.

    `nodes` (the releasing node, then its ancestors) resolves destinations by relation and jurisdiction when the
    policies are not already bound to their nodes (`bind_chain`); see `compose`.
    """
    eff = chain if isinstance(chain, EffectivePolicy) else compose(list(chain), nodes)
    r = release
    where = f"round {r.round} {r.source}->{r.destination} {r.group}"
    checked: list[str] = []

    if r.group not in ("key", "shared", "residual"):
        raise _violation(f"{where} group", "key|shared|residual", repr(r.group))
    # 1. local layers never leave; key/shared tensors must belong to the group they are released as
    for name in r.tensor_names:
        if eff.layers.matches("local", name):
            hits = [p for p in eff.layers.local if _match(name, p)]
            raise _violation(
                f"{where} layers.local", f"no tensor matching {hits[0]!r} ({eff.sources.get('layers.local', '')})",
                repr(name), "local layers never leave the site",
            )
        if r.group in ("key", "shared"):
            try:
                actual = eff.layers.group_of(name)
            except PolicyError:
                raise _violation(f"{where} layers", "tensors matched by key or shared patterns", repr(name)) from None
            if actual != r.group:
                raise _violation(f"{where} layers.{r.group}", f"{r.group} tensors only", f"{name!r} (a {actual} tensor)")
    checked.append("layers")
    # 2. destination allowed by every policy on the path
    refusal = _refusing_rule(eff.egress.rules, r.destination, r.group)
    if refusal is not None:
        raise _violation(f"{where} egress.destinations ({refusal[0]})", refusal[1], f"{r.group} to {r.destination!r}")
    checked.append("egress.destinations")
    # 3. secure aggregation: exactly the effective protocol, and never a cohort below min_cohort
    sa = eff.secure_aggregation
    if r.protocol == "none" and "secure_aggregation" in eff.egress.require:
        raise _violation(f"{where} egress.require", "secure_aggregation", "protocol none")
    if r.protocol not in sa.acceptable:
        raise _violation(f"{where} secure_aggregation.protocol", "|".join(sa.acceptable), r.protocol)
    if r.cohort_size < sa.min_cohort:
        raise _violation(f"{where} secure_aggregation.min_cohort", f">= {sa.min_cohort} contributors", r.cohort_size)
    checked.append("secure_aggregation")
    # 4. differential privacy as required
    dp = eff.differential_privacy
    need_dp = dp.level != "none" or "differential_privacy" in eff.egress.require
    if r.group == "residual" and eff.residuals.require_dp:
        need_dp = True
    if need_dp:
        if r.dp_level not in LEVEL_ORDER or r.dp_level == "none":
            raise _violation(f"{where} differential_privacy.level", dp.level if dp.level != "none" else "user|record",
                             r.dp_level)
        if dp.level != "none" and LEVEL_ORDER[r.dp_level] < LEVEL_ORDER[dp.level]:
            raise _violation(f"{where} differential_privacy.level", dp.level, r.dp_level)
        # The mechanism list is for noise on released sums (user level); a record-level release is
        # protected by DP-SGD inside its sites instead, which only the sites' training can vouch for.
        usable = usable_mechanisms(dp.acceptable_mechanisms, r.protocol)
        if r.dp_level == "user" and dp.mechanism is not None and r.dp_mechanism not in usable:
            raise _violation(f"{where} differential_privacy.mechanism", "|".join(usable) or "nothing", r.dp_mechanism)
        if (dp.record_level or r.dp_level == "record") and not r.record_dp:
            raise _violation(f"{where} differential_privacy.record", "releases of DP-SGD-trained sites", "no record-level DP")
        checked.append("differential_privacy")
    # 5. residuals
    if r.group == "residual":
        res = eff.residuals
        if not res.allowed:
            raise _violation(f"{where} residuals.allowed", "no residual releases", "a residual")
        if r.rank is not None and r.rank > res.rank:
            raise _violation(f"{where} residuals.rank", f"<= {res.rank}", r.rank)
        checked.append("residuals")
    return Authorization(release=r, policy_sha256=eff.sha256, policies=eff.policies, checked=tuple(checked))


def _match(name: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern)


def verify_authorization(auth: Authorization | None, release: Release) -> Authorization:
    """For downstream release paths (transport, ledger): refuse a release no authorization covers."""
    if auth is None or not isinstance(auth, Authorization) or not auth.covers(release):
        raise PolicyViolation(
            f"round {release.round} {release.source}->{release.destination} {release.group}: no matching "
            "authorization; call worldlm_secure.policy.authorize(release, chain) first"
        )
    return auth
