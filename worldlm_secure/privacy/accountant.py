"""ε at δ for the subsampled Gaussian mechanism: a pure wrapper over Opacus accountants.

`rdp` is Opacus' RDPAccountant (Mironov et al. 2019, with the Balle et al. 2020 RDP→DP
conversion); `prv` is the PRVAccountant (Gopi et al. 2021) with ε error 1e-3 and its upper
bound reported. Everything here is a pure function of its arguments, so `ledger verify`
recomputes exactly what the node recorded.

Light at import: Opacus' package imports torch, so nothing from Opacus is imported at module level.
`ledger verify` (and show/export/report/audit) must not import torch, so both accountants run Opacus'
own files loaded without executing Opacus' package `__init__` (same code, same numbers, no torch):
Opacus' `accountants/` folder is mounted under a private package name (`_light_accountants`), never
executing its `__init__`, with a stand-in for `accountants/accountant.py`, the one file there that
imports torch (for the DPOptimizer hook only; the accountants use nothing of it but `history`). RDP
then runs `analysis/rdp.py` (pure numpy/scipy); PRV runs `prv.py`, `analysis/prv/*.py` and the
`rdp.py` accountant they size the PRV domain with (numpy/scipy as well). When Opacus proper is already
imported (training), its own modules are used. Only the noise search (`derive_noise_multiplier`, a
training path) imports Opacus proper, torch included, when first called.

For user-level DP in a federation round: sample_rate = cohort / population (1.0 when all
members participate), steps = number of releases on the stream. For record-level DP-SGD:
sample_rate = batch / records, steps = optimizer steps.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np

from worldlm_secure.errors import PolicyError

_RDP_MODULE = "opacus.accountants.analysis.rdp"
_PRV_MODULE = "opacus.accountants.prv"
_LIGHT = "worldlm_secure.privacy._opacus_accountants"  # Opacus' accountants/ folder under a private name

ACCOUNTANTS = ("rdp", "prv")
PRV_EPS_ERROR = 1e-3  # absolute ε error of the PRV estimate; the upper bound is what we report
# Integer orders only. The RDP bounds of the distributed integer mechanisms (Skellam: Agarwal, Kairouz & Liu
# 2021, Thm 3.5; the discrete Gaussian's via CDP) are proven at integer α, and the ledger replays every stream
# at these same orders whatever its mechanism, so fractional orders (Opacus' default 1.1, 1.2, ...) would
# under-state a Skellam release's ε by 0.07-0.24%. For the Gaussian the integer subset costs < 0.3% of ε.
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (72, 80, 96, 128, 160, 192, 256)


@dataclass(frozen=True)
class MechanismStep:
    """`steps` compositions of the Poisson-subsampled Gaussian mechanism (noise_multiplier z, rate q)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1


class _IAccountant:
    """Stand-in for `opacus.accountants.accountant.IAccountant` in the light package: that file imports torch
    (`opacus.optimizers`, for `get_optimizer_hook_fn`), while `RDPAccountant` and `PRVAccountant` use nothing of
    their base class but the `history` list its `__init__` makes."""

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []


@cache
def _light_accountants() -> ModuleType:
    """Opacus' `accountants` package mounted under a private name, without importing torch.

    `find_spec("opacus")` locates Opacus without executing its `__init__` (which imports torch). The package
    object is made from `accountants/__init__.py`'s spec but never executed (that `__init__` imports every
    accountant, hence `accountant.py`, hence torch), and its `accountant` submodule is the stand-in above.
    Every other submodule imported through it (`rdp`, `prv`, `analysis.rdp`, `analysis.prv.*`) is Opacus'
    own file, loaded by the import system from Opacus' folder under the private name: relative imports
    between them resolve inside the private package, so the code and the numbers are Opacus' exactly.
    """
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed (pip install opacus): it computes ε")
    folder = Path(next(iter(spec.submodule_search_locations))) / "accountants"
    pkg_spec = importlib.util.spec_from_file_location(
        _LIGHT, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if pkg_spec is None:  # pragma: no cover - a broken opacus install
        raise ImportError(f"cannot load Opacus' accountants from {folder}")
    package = importlib.util.module_from_spec(pkg_spec)  # not executed: its __init__ would import torch
    base = ModuleType(f"{_LIGHT}.accountant", "Stand-in for Opacus' accountant.py (no torch).")
    base.IAccountant = _IAccountant  # type: ignore[attr-defined]
    package.accountant = base  # type: ignore[attr-defined]
    sys.modules[_LIGHT] = package
    sys.modules[base.__name__] = base
    return package


def _light(name: str) -> ModuleType:
    """Opacus' module ``accountants.NAME`` from the light package (see `_light_accountants`)."""
    _light_accountants()
    return importlib.import_module(f"{_LIGHT}.{name}")


def _rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis module (`compute_rdp`, `get_privacy_spent`): the real one when Opacus is already
    imported, else the same file from the light package (it imports only math, numpy and scipy)."""
    loaded = sys.modules.get(_RDP_MODULE)
    return loaded if loaded is not None else _light("analysis.rdp")


def _prv_accountant_class() -> type:
    """Opacus' `PRVAccountant`: the real class when Opacus' accountants are already imported, else the same
    file (`accountants/prv.py`, with `analysis/prv/` and the RDP accountant that sizes its domain) from the
    light package, so verifying a PRV-accounted ledger imports no torch either."""
    loaded = sys.modules.get(_PRV_MODULE)
    module = loaded if loaded is not None else _light("prv")
    cls: type = module.PRVAccountant
    return cls


def _rdp_epsilon(hist: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at δ of (z, q, steps) compositions: exactly Opacus' `RDPAccountant.get_epsilon` at `RDP_ORDERS`."""
    rdp_analysis = _rdp_analysis()
    orders = list(RDP_ORDERS)
    rdp = sum(  # the same expression as RDPAccountant.get_privacy_spent, so the same floating-point sum
        [rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=n, orders=orders) for (z, q, n) in hist]
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _check(accountant: str, delta: float, history: Sequence[MechanismStep]) -> None:
    if accountant not in ACCOUNTANTS:
        raise PolicyError(f"differential_privacy.accountant: unknown accountant {accountant!r} (use rdp or prv)")
    if not 0 < delta < 1:
        raise PolicyError(f"differential_privacy.delta: must be in (0, 1) (got {delta})")
    for s in history:
        if not (s.noise_multiplier > 0 and math.isfinite(s.noise_multiplier)):
            raise PolicyError(f"noise_multiplier must be > 0 and finite for DP accounting (got {s.noise_multiplier})")
        if not 0 < s.sample_rate <= 1:
            raise PolicyError(f"sample_rate must be in (0, 1] (got {s.sample_rate})")
        if s.steps < 0:
            raise PolicyError(f"steps must be >= 0 (got {s.steps})")


def epsilon_of(history: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
    """ε at δ of the composition of all steps in `history` (0.0 for an empty history)."""
    _check(accountant, delta, history)
    hist: list[tuple[float, float, int]] = []
    for s in history:  # merge consecutive identical mechanisms: same ε, much faster PRV/RDP
        if s.steps <= 0:
            continue
        if hist and hist[-1][:2] == (s.noise_multiplier, s.sample_rate):
            hist[-1] = (s.noise_multiplier, s.sample_rate, hist[-1][2] + s.steps)
        else:
            hist.append((s.noise_multiplier, s.sample_rate, s.steps))
    if not hist:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(hist, delta)
    acc_p = _prv_accountant_class()()
    acc_p.history = hist
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log(1 - q) at q = 1 inside Opacus is harmless
        return float(acc_p.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """ε at δ after `steps` steps of one subsampled Gaussian mechanism."""
    return epsilon_of([MechanismStep(noise_multiplier, sample_rate, steps)], delta, accountant)


def rdp_curve(history: Sequence[MechanismStep], start: Sequence[float] | None = None) -> list[float]:
    """The RDP ε(α) at `RDP_ORDERS` of the composition, optionally added to a `start` curve
    (incremental accounting: one `compute_rdp` per new step instead of replaying the stream)."""
    _check("rdp", 0.5, history)
    rdp_analysis = _rdp_analysis()
    total = list(start) if start is not None else [0.0] * len(RDP_ORDERS)
    for s in history:
        if s.steps:
            r = rdp_analysis.compute_rdp(
                q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=list(RDP_ORDERS)
            )
            total = [a + float(b) for a, b in zip(total, r)]
    return total


def epsilon_from_rdp(curve: Sequence[float], delta: float) -> float:
    """ε at δ of an RDP curve at `RDP_ORDERS` (Opacus' conversion, as RDPAccountant uses)."""
    _check("rdp", delta, [])
    if not any(curve):
        return 0.0
    eps, _ = _rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=np.asarray(curve), delta=delta)
    return float(eps)


def derive_noise_multiplier(
    budget: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """The smallest z (to 1% in ε) such that `steps` steps at `sample_rate` spend ≤ `budget` at δ.

    Raises PolicyError when no z ≤ 1e6 meets the budget (refuse to start training).
    """
    _check(accountant, delta, [MechanismStep(1.0, sample_rate, steps)])
    if not (budget > 0 and math.isfinite(budget)):
        raise PolicyError(f"differential_privacy.epsilon_budget: must be > 0 and finite (got {budget})")
    if steps < 1:
        raise PolicyError(f"planned releases must be >= 1 to derive a noise multiplier (got {steps})")
    from opacus.accountants.utils import get_noise_multiplier  # imports torch: training paths only

    logging.getLogger("opacus").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # The search runs PRV at a coarser ε error (10× faster); the result is re-checked below.
            kwargs = {"eps_error": 1e-2} if accountant == "prv" else {}
            z = get_noise_multiplier(
                target_epsilon=budget,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=budget * 0.01,
                **kwargs,
            )
    except ValueError:
        raise PolicyError(
            f"differential_privacy.epsilon_budget: ε={budget} at δ={delta} cannot be met over {steps} releases "
            f"at sample rate {sample_rate} (noise multiplier would exceed 1e6); raise the budget or plan fewer rounds"
        ) from None
    # Opacus' binary search returns a z whose ε is ≤ the target; re-check with the exact ε we record.
    for _ in range(50):
        if epsilon(z, sample_rate, steps, delta, accountant) <= budget:
            return float(z)
        z *= 1.01
    raise PolicyError(f"derived noise multiplier {z} does not meet ε={budget} at δ={delta}; report this bug")
