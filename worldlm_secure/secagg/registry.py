"""Builds a `SecureSum` by the policy's `secure_aggregation.protocol` name."""

from __future__ import annotations

from collections.abc import Callable

from worldlm_secure.errors import PolicyError
from worldlm_secure.secagg.ckks_round import make_ckks
from worldlm_secure.secagg.masking_round import MaskingSum
from worldlm_secure.secagg.plain import PlainSum
from worldlm_secure.secagg.protocol import SecureSum

# name -> factory. Each protocol module registers itself here when it lands.
_FACTORIES: dict[str, Callable[..., SecureSum]] = {
    "none": lambda **_: PlainSum(),
    "masking": MaskingSum,  # params=<policy masking section>, identities=<name -> NodeIdentity>
    "ckks": make_ckks,  # params=<policy ckks section | CkksParams>, identities=<name -> NodeIdentity>, clip_range=
}


def register(name: str, factory: Callable[..., SecureSum]) -> None:
    _FACTORIES[name] = factory


def available() -> tuple[str, ...]:
    return tuple(sorted(_FACTORIES))


def make_secure_sum(name: str, **kwargs: object) -> SecureSum:
    """Build the protocol `name`; kwargs are protocol-specific (policy section, identities)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise PolicyError(
            f"secure_aggregation.protocol: unknown protocol {name!r} (available: {', '.join(available())})"
        ) from None
    return factory(**kwargs)
