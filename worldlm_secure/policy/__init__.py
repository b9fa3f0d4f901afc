"""Declarative jurisdiction policies: schema, loading, composition along a path, and enforcement.

    p = load_policy("policies/eu.yaml")            # Policy, or PolicyError (one line: file:line field: fix)
    eff = compose([p_site, p_fed, p_root])         # EffectivePolicy: the strictest rule along the path
    auth = authorize(Release(...), chain)          # Authorization, or PolicyViolation (rule, allowed, requested)
"""

from worldlm_secure.errors import PolicyError, PolicyViolation
from worldlm_secure.policy.authorize import Authorization, Release, authorize, verify_authorization
from worldlm_secure.policy.compose import (
    EffectiveDifferentialPrivacy,
    EffectiveEgress,
    EffectivePolicy,
    EffectiveSecureAggregation,
    compose,
)
from worldlm_secure.policy.loader import load_policy
from worldlm_secure.policy.patterns import LayerPatterns
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
    "SecureAggregation",
    "authorize",
    "compose",
    "load_policy",
    "verify_authorization",
]
