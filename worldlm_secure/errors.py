"""The error hierarchy. Every user-facing failure is a `WorldLMError`.

The CLI prints a `WorldLMError` as one line (no traceback) and exits non-zero, so
messages must name the file, the field and the fix, e.g.
``policies/eu.yaml:14 differential_privacy.delta: must be < 1/min_cohort (got 0.1)``.
"""

from __future__ import annotations


class WorldLMError(Exception):
    """Base class for errors a user can act on. ``str(err)`` is the one-line message."""

    exit_code: int = 2


class ConfigError(WorldLMError):
    """A configuration file (world, node, grid) is malformed or inconsistent."""


class PolicyError(ConfigError):
    """A policy file is malformed, or policies along a path cannot be composed."""


class PolicyViolation(WorldLMError):
    """A release is not authorized by the effective policy (names the rule and both values)."""


class DataError(WorldLMError):
    """Training data is missing or unusable."""


class SecAggError(WorldLMError):
    """A secure-aggregation round failed (e.g. too few survivors); nothing was released."""


class BudgetExceeded(PolicyViolation):
    """A release would exceed the differential-privacy budget (message gives spent, requested, budget)."""


class LedgerError(WorldLMError):
    """The privacy ledger is unreadable, or failed verification."""


class TransportError(WorldLMError):
    """A peer, certificate or message was refused by the transport."""
