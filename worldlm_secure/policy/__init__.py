"""Declarative jurisdiction policies: schema, loading, composition along a path, and enforcement.

    p = load_policy("policies/eu.yaml")            # Policy, or PolicyError (one line: file:line field: fix)
    eff = compose([p_site, p_fed, p_root])         # EffectivePolicy: the strictest rule along the path
    eff = compose(chain, nodes=["eu-a", "eu", "world"])  # ... with destinations by relation resolved
    auth = authorize(Release(...), chain)          # Authorization, or PolicyViolation (rule, allowed, requested)
    plan = plan_round({member: eff, ...})          # one protocol + parameters for all members of a round
    check_world(world)                             # at world load: every path composes, every round can run
"""

from worldlm_secure.errors import PolicyError, PolicyViolation
from worldlm_secure.policy.authorize import Authorization, Release, authorize, verify_authorization
from worldlm_secure.policy.check import check_world
from worldlm_secure.policy.compose import (
    EffectiveDifferentialPrivacy,
    EffectiveEgress,
    EffectivePolicy,
    EffectiveSecureAggregation,
    bind_chain,
    compose,
)
from worldlm_secure.policy.jsonschema import policy_json_schema
from worldlm_secure.policy.loader import load_policy
from worldlm_secure.policy.patterns import LayerPatterns
from worldlm_secure.policy.round import RoundPlan, plan_round
from worldlm_secure.policy.schema import (
    Audit,
    CkksParams,
    Destination,
    DifferentialPrivacy,
    Egress,
    MaskingParams,
    Policy,
    RecordDP,
    Residuals,
    SecureAggregation,
)

__all__ = [
    "Audit",
    "Authorization",
    "CkksParams",
    "Destination",
    "DifferentialPrivacy",
    "EffectiveDifferentialPrivacy",
    "EffectiveEgress",
    "EffectivePolicy",
    "EffectiveSecureAggregation",
    "Egress",
    "LayerPatterns",
    "MaskingParams",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "RecordDP",
    "Release",
    "Residuals",
    "RoundPlan",
    "SecureAggregation",
    "authorize",
    "bind_chain",
    "check_world",
    "compose",
    "load_policy",
    "plan_round",
    "policy_json_schema",
    "verify_authorization",
]
