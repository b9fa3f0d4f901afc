"""User- and record-level differential privacy: clipping, noise mechanisms, accounting, budgets.

The engine calls (the one-stop flow is `UserLevelDP`, see privacy/user_level.py):
- `clip_l2(vec, max_norm) -> ClipResult`, `attentive_sensitivity(clipping_norm, w_max)`
- `make_mechanism(policy.mechanism)` -> `NoiseMechanism` (central: `.add_noise(total, plan)`;
  distributed: `.sample_member_noise(shape, plan)` per member, `.effective_noise_multiplier(plan, m)`)
- `epsilon(...)`, `epsilon_of(history, ...)`, `derive_noise_multiplier(...)` (pure, Opacus accountants)
- `BudgetTracker(budget=, delta=, accountant=, stream=).charge(z_eff, sample_rate, steps)`
- `make_private_training(model, optimizer, loader, noise_multiplier=, max_grad_norm=)` (record level;
  imported lazily from `worldlm_secure.privacy.record` because it pulls in torch/opacus models)
"""

from worldlm_secure.privacy.accountant import (
    ACCOUNTANTS,
    MechanismStep,
    derive_noise_multiplier,
    epsilon,
    epsilon_of,
)
from worldlm_secure.privacy.budget import BudgetTracker, Charge
from worldlm_secure.privacy.clipping import ClipResult, attentive_sensitivity, clip_l2
from worldlm_secure.privacy.mechanisms import NoiseMechanism, NoisePlan, available, make_mechanism
from worldlm_secure.privacy.secure_random import SecureRandom
from worldlm_secure.privacy.user_level import UserLevelDP

__all__ = [
    "ACCOUNTANTS",
    "BudgetTracker",
    "Charge",
    "ClipResult",
    "MechanismStep",
    "NoiseMechanism",
    "NoisePlan",
    "SecureRandom",
    "UserLevelDP",
    "attentive_sensitivity",
    "available",
    "clip_l2",
    "derive_noise_multiplier",
    "epsilon",
    "epsilon_of",
    "make_mechanism",
]
