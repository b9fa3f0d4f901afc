"""Secure aggregation: "protect this update under that policy". Nobody outside secagg/ touches keys or nonces."""

from worldlm_secure.secagg.protocol import DropoutPlan, IntegerNoise, MemberInput, ProtectionStats, SecureSum, SumResult
from worldlm_secure.secagg.registry import available, make_secure_sum, register

__all__ = [
    "DropoutPlan",
    "IntegerNoise",
    "MemberInput",
    "ProtectionStats",
    "SecureSum",
    "SumResult",
    "available",
    "make_secure_sum",
    "register",
]
