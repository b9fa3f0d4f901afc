"""User-level DP end to end, the way the engine runs it: policy -> plan -> clip -> noise (central or
distributed shares with dropouts) -> charge before release -> signed ledger entry that verifies."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

from worldlm_secure.errors import BudgetExceeded, PolicyError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.privacy import BudgetTracker, SecureRandom, UserLevelDP, clip_l2, epsilon
from worldlm_secure.secagg import MemberInput, make_secure_sum

REPO = Path(__file__).resolve().parents[1]


def _dp(**kw: object) -> types.SimpleNamespace:
    base = dict(level="user", mechanism=("distributed_skellam",), epsilon_budget=6.0, delta=1e-5,
                clipping_norm=0.5, noise_multiplier=1.2, accountant="rdp")
    return types.SimpleNamespace(**{**base, **kw})


def test_the_eu_policy_configures_user_level_dp_and_its_hash_is_checked_by_verify(tmp_path: Path) -> None:
    policy = pytest.importorskip("worldlm_secure.policy")
    p = policy.load_policy(REPO / "policies" / "eu.yaml")
    dp = UserLevelDP.from_policy(p.differential_privacy, planned_releases=20)
    assert dp.mechanism.name == p.differential_privacy.mechanism[0]
    assert epsilon(dp.noise_multiplier, 1.0, 20, dp.delta) <= p.differential_privacy.epsilon_budget
    with pytest.raises(PolicyError, match="level"):
        UserLevelDP.from_policy(_dp(level="none"), planned_releases=1)
    eff = policy.compose([p], nodes=["eu-a", "eu", "world"])
    dp = UserLevelDP.from_policy(eff.differential_privacy, planned_releases=20,
                                 max_dropout_fraction=eff.secure_aggregation.max_dropout_fraction)
    with Ledger(tmp_path / "site.sqlite", NodeIdentity.generate("site")) as led:
        tracker = dp.tracker("site/user", led.entries())
        plan = dp.plan(expected_members=5, dim=10)
        for r, delta in enumerate([dp.delta, dp.delta * 10]):  # the second entry misstates δ
            t = tracker if r == 0 else BudgetTracker(
                budget=dp.budget, delta=delta, accountant=dp.accountant, stream="site/user")  # the stored policy rule (delta) fails first
            led.append(release_entry(
                release_id=str(r), round=r, level="site", source="site", destination="eu", group="shared",
                tensor_names=("model.layers.0.self_attn.q_proj.weight",), protocol=eff.secure_aggregation.protocol, cohort_size=5, dropouts=0,
                dp_level="user", mechanism=dp.mechanism.name, clipping_norm=dp.clipping_norm,
                policy_sha256=eff.sha256, charge=dp.charge(t, plan, 5),
            ), policy_document=eff.canonical_json())
    rep = verify(tmp_path / "site.sqlite")
    assert not rep.ok and rep.problem is not None and rep.problem.seq == 1 and "policy" in rep.problem.what
    assert len(rep.entries) == 1 and rep.entries[0].policy_sha256 == eff.sha256


@pytest.mark.parametrize("mechanism", ["distributed_skellam", "distributed_discrete_gaussian"])
def test_distributed_round_with_dropouts_is_charged_and_recorded_honestly(tmp_path: Path, mechanism: str) -> None:
    n, d, gamma = 6, 3000, 1 / 4096  # gamma: the masking quantizer's step (1 / QuantizationSpec.scale)
    dp = UserLevelDP.from_policy(_dp(mechanism=(mechanism,)), planned_releases=10, max_dropout_fraction=1 / 3)
    plan = dp.plan(expected_members=n, dim=d, quant_step=gamma)
    assert plan.expected_members == 4  # shares sized for the worst tolerated dropout
    led = Ledger(tmp_path / "fed.sqlite", NodeIdentity.generate("fed"))
    tracker = dp.tracker("fed/user", led.entries())
    rng = SecureRandom(bytes(32))  # fixed key: reproducible test
    members = {f"s{k}": clip_l2(rng.standard_normal(d), dp.clipping_norm).vector for k in range(n)}
    dropped = {"s1", "s4"}
    dp.check_before_round(tracker, plan, min_contributors=4)
    noisy_sum = np.zeros(d, dtype=np.int64)
    clean_sum = np.zeros(d, dtype=np.int64)
    for name, v in members.items():
        if name in dropped:
            continue
        q = np.floor(v / gamma + rng.uniform(d)).astype(np.int64)  # stochastic rounding, as secagg/quantize
        clean_sum += q
        noisy_sum += q + dp.mechanism.sample_member_noise(d, plan, rng)  # added BEFORE masking
    noise = (noisy_sum - clean_sum) * gamma
    m = n - len(dropped)
    assert noise.std() == pytest.approx(dp.mechanism.noise_std(plan, m), rel=0.05)
    charge = dp.charge(tracker, plan, contributors=m)
    assert charge.noise_multiplier >= dp.noise_multiplier * (1 - 1e-3)  # planned for 4 survivors: z_eff >= z
    led.append(release_entry(
        release_id="0:shared:world", round=0, level="federation", source="fed", destination="world",
        group="shared", tensor_names=("layers.0.w",), protocol="masking", cohort_size=n, dropouts=len(dropped),
        dp_level="user", mechanism=mechanism, clipping_norm=dp.clipping_norm, policy_sha256="ab" * 32,
        charge=charge, extra={"quant_step": gamma},
    ))
    led.close()
    rep = verify(tmp_path / "fed.sqlite")
    assert rep.ok, rep.problem
    assert rep.entries[0].noise_multiplier == charge.noise_multiplier


def test_central_round_through_a_secure_sum_stops_at_the_budget(tmp_path: Path) -> None:
    dp = UserLevelDP.from_policy(_dp(mechanism=("central_gaussian",), epsilon_budget=4.0, noise_multiplier=3.0),
                                 planned_releases=5)
    secure = make_secure_sum("none")
    rng = SecureRandom(bytes(range(32)))
    led = Ledger(tmp_path / "fed.sqlite", NodeIdentity.generate("fed"))
    tracker = dp.tracker("fed/user", led.entries())
    released = 0
    with pytest.raises(BudgetExceeded, match="spent ε=.*requested ε=.*budget ε=4"):
        for r in range(100):
            w_max = 1.0
            plan = dp.plan(expected_members=4, dim=50, w_max=w_max)  # secure attentive aggregation
            assert plan.sensitivity == pytest.approx(w_max * math.sqrt(dp.clipping_norm**2 + 1))
            dp.check_before_round(tracker, plan, min_contributors=3)
            inputs = []
            for k in range(4):
                w = 0.2 + 0.8 * float(rng.uniform(1)[0])
                inputs.append(MemberInput(f"s{k}", np.concatenate([w * clip_l2(rng.standard_normal(50), dp.clipping_norm).vector, [w]])))
            result = secure.run_round(r, inputs, min_cohort=3)
            noisy = dp.mechanism.add_noise(result.total, plan, rng)
            charge = dp.charge(tracker, plan, contributors=len(result.contributors))
            led.append(release_entry(
                release_id=f"{r}:key:fed", round=r, level="federation", source="fed", destination="fed",
                group="key", tensor_names=("k",), protocol="none", cohort_size=4, dropouts=0, dp_level="user",
                mechanism="central_gaussian", clipping_norm=dp.clipping_norm, policy_sha256="cd" * 32,
                charge=charge,
            ))
            released += 1
            assert noisy.shape == (51,)
    led.close()
    rep = verify(tmp_path / "fed.sqlite")
    assert rep.ok and len(rep.entries) == released >= 1
    assert rep.entries[-1].epsilon_cumulative <= 4.0
