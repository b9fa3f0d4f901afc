"""Review of bea56c0 (adaptive clipping, protocols/dp.md §2.7): the release is claimed to be *exactly* the
Gaussian the accountant charges "central or distributed, in every backend", with sensitivity
S = C_t·z_Δ/z. Under `central_gaussian` the aggregator noises the *dequantized* sum of a quantizing protocol
(CKKS: deterministic rint to clip_range/(2^p−1); masking: stochastic floor to 1/scale), so adding/removing a
member moves the noised sum by its quantized vector, whose norm exceeds ‖v_k‖ by up to √d·(rounding error).
The quantizer's step is fixed by `clip_range` (which must be >= C_max), while C_t shrank geometrically
without any lower bound, and the only guard (`_check_quantizer_range`) bounds clip_range from *below*.
Once C_t is comparable to √d·step the member's quantized vector is ~2x the sensitivity the noise was sized
for (1.92x in the first test). These tests failed on bea56c0.

The fix (protocols/dp.md §2.8): central noise is sized at S_q = S + √d·e (`NoisePlan.quantized_sensitivity`,
e = `privacy.quantization.rounding_error` of the round's protocol, 0 for none), recorded in the ledger
(`quantization_slack`, `noise_sensitivity`); adaptive clipping floors C_t at 10·√d·e (`clip_floor`), so the
slack stays <= 10% of S; and the adaptive clip's split in `extra` recombines to the entry's noise_multiplier.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import POLICIES, REPO

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.federation.release import (
    MemberUpdate,
    ReleaseDP,
    ReleasePath,
    _check_quantizer_range,
    adaptive_clip_extra,
    release_dp_extra,
)
from worldlm_secure.federation.world import load_world
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.privacy.adaptive_clip import AdaptiveClip, AdaptiveClipConfig, combined_noise_multiplier
from worldlm_secure.privacy.central_gaussian import CentralGaussian
from worldlm_secure.privacy.mechanisms import NoisePlan
from worldlm_secure.privacy.quantization import (
    QUANTIZATION_FLOOR_FACTOR,
    clip_floor,
    quantization_slack,
    rounding_error,
)
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.masking import round_quantization

CLIP_RANGE, VALUE_BITS = 1.0, 20  # the CKKS defaults (policy schema), clip_range >= C_max = 1
D = 10_000  # one parameter group of 10k values (a real LM group is 10^5..10^7: worse)
CKKS = SimpleNamespace(clip_range=CLIP_RANGE, value_bits=VALUE_BITS)
COHORT = 10


def _shrink(ac: AdaptiveClip, stream: object, until: float, *, min_clip: float = 0.0, limit: int = 400):
    """Rounds in which every member is well inside the clip (b̃ ≈ 1): the clip shrinks by e^(-0.1) per round
    until it is <= ``until`` (or ``limit`` rounds pass). Returns (rounds, the last ClipRound)."""
    rnd = ac.round_for(stream, max_clip=1.0, noise_multiplier=1.0, cohort=COHORT, words=1, min_clip=min_clip)
    rounds = 0
    while rnd.clip > until and rounds < limit:
        total = np.zeros(D + 1)
        total[-1] = COHORT * 0.5 * rnd.count_scale  # every member within the clip (the noise only jitters this)
        ac.update(stream, rnd, total, COHORT)
        rnd = ac.round_for(stream, max_clip=1.0, noise_multiplier=1.0, cohort=COHORT, words=1, min_clip=min_clip)
        rounds += 1
    return rounds, rnd


def _worst_member(rnd, step: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    """One member's update (any data may produce it): k coordinates just above half a quantizer step, the
    rest 0, with k as large as the clip allows (so the update is not even clipped). Its encoded vector."""
    k = min(D, int((rnd.clip / (0.5001 * step)) ** 2))
    assert k >= 1
    codec = DeltaCodec(("w",), ((D,),))
    values = torch.zeros(D, dtype=torch.float64)
    values[:k] = 0.5001 * step
    v = encode_update(codec, {"w": values}, np.ones(1), rnd.member)
    assert np.linalg.norm(v) <= rnd.sensitivity * (1 + 1e-12)  # the float vector is within S, as claimed
    return v


def _ckks_moved(v: np.ndarray) -> np.ndarray:
    """What one member moves the aggregator's noised sum by: its CKKS vector, dequantized (ckks.py)."""
    q, clipped = packing.quantize(v, CLIP_RANGE, VALUE_BITS)
    assert clipped == 0
    return packing.dequantize_sum(q.astype(np.int64), 1, CLIP_RANGE, VALUE_BITS)


def test_ckks_quantization_keeps_the_adaptive_rounds_sensitivity() -> None:
    step = CLIP_RANGE / ((1 << VALUE_BITS) - 1)
    # Without the floor (what bea56c0 did): ~100 rounds take C_t from C_max = 1 down to the quantizer's scale.
    rounds, rnd = _shrink(AdaptiveClip(AdaptiveClipConfig(target_quantile=0.5, learning_rate=0.2)), ("eu", "key"),
                          0.5001 * step * math.sqrt(D) * 1.001)
    assert rounds < 150 and rnd.clip <= 1.0

    # The release path's quantizer range check passes: clip_range = 1 >= max(C_t, t/2).
    plan = SimpleNamespace(protocol="ckks", params=CKKS)
    _check_quantizer_range(plan, ReleaseDP(SimpleNamespace(clipping_norm=rnd.clip), {}, None, rnd))

    moved = float(np.linalg.norm(_ckks_moved(_worst_member(rnd, step))))
    # The member moves the sum by ~1.92x the float sensitivity S...
    assert moved / rnd.sensitivity > 1.9
    # ... but the central noise is sized at S_q = S + √d·e (what `round_user_dp` puts in every plan), so the
    # Gaussian's multiplier on the true sensitivity is still >= z: the round is as private as charged.
    e = rounding_error("ckks", CKKS, COHORT)
    assert e == pytest.approx(step / 2, rel=1e-9) and e >= step / 2
    noise_plan = NoisePlan(rnd.sensitivity, 1.0, COHORT, D + 1, rounding_error=e)
    assert noise_plan.quantized_sensitivity == pytest.approx(rnd.sensitivity + math.sqrt(D + 1) * e, rel=1e-12)
    ratio = moved / noise_plan.quantized_sensitivity
    assert ratio <= 1.0, (
        f"after {rounds} rounds C_t={rnd.clip:.3g}: one member moves the noised sum by {ratio:.2f}x the "
        f"sensitivity S_q={noise_plan.quantized_sensitivity:.3g} the Gaussian is sized for"
    )
    assert CentralGaussian().noise_std(noise_plan) == pytest.approx(noise_plan.quantized_sensitivity, rel=1e-12)


def test_the_adaptive_clip_is_floored_so_the_slack_stays_a_tenth_of_s() -> None:
    step = CLIP_RANGE / ((1 << VALUE_BITS) - 1)
    e = rounding_error("ckks", CKKS, COHORT)
    floor = clip_floor(D + 1, e)
    assert floor == pytest.approx(QUANTIZATION_FLOOR_FACTOR * math.sqrt(D + 1) * e)
    ac = AdaptiveClip(AdaptiveClipConfig(target_quantile=0.5, learning_rate=0.2))
    rounds, rnd = _shrink(ac, ("eu", "key"), 0.0, min_clip=floor, limit=300)
    assert rounds == 300 and rnd.clip == pytest.approx(floor) and rnd.clip >= floor  # it never goes below
    assert rnd.min_clip == floor
    slack = quantization_slack(D + 1, e)
    assert slack <= rnd.sensitivity / QUANTIZATION_FLOOR_FACTOR
    moved = float(np.linalg.norm(_ckks_moved(_worst_member(rnd, step))))
    assert moved <= rnd.sensitivity + slack and moved / rnd.sensitivity <= 1.0 + 1.0 / QUANTIZATION_FLOOR_FACTOR
    # The floor never lifts the clip above the policy's clipping_norm.
    capped = AdaptiveClip(AdaptiveClipConfig()).round_for("s", max_clip=0.5, noise_multiplier=1.0, cohort=COHORT,
                                                          words=1, min_clip=2.0)
    assert capped.clip == 0.5 and capped.min_clip == 0.5


def test_rounding_errors_per_protocol() -> None:
    masking = SimpleNamespace(bits=32, clip_range=2.0)
    assert rounding_error("none", None, 5) == 0.0
    assert rounding_error("masking", masking, 5) >= 1.0 / round_quantization(masking, 5).scale
    assert rounding_error("masking", masking, 5) == pytest.approx(1.0 / round_quantization(masking, 5).scale, rel=1e-6)
    assert rounding_error("ckks", CKKS, 5) >= CLIP_RANGE / (2.0 ** (VALUE_BITS + 1) - 2)
    # protocol none: the plan is the old one, byte for byte
    plain = NoisePlan(1.0, 1.5, 3, 1000)
    assert plain.quantized_sensitivity == 1.0 and CentralGaussian().noise_std(plain) == 1.5


# ---- the release path, end to end -----------------------------------------------------------------------------

KEY = "model.layers.0.mlp.w"
BITS = 12  # coarse on purpose: e = 1/scale ≈ 1e-3, so the slack is visible on 51 values


def _world(folder: Path, protocol: str, adaptive: bool = True) -> Path:
    """Two federations of two sites, dp-eps8 (central Gaussian, C = 1) with ``protocol`` as the only choice."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    (pol / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    dp8 = (REPO / "examples" / "policies" / "dp-eps8.yaml").read_text()
    dp8 = dp8.replace("../../policies/research-open.yaml", "research-open.yaml")
    dp8 += textwrap.dedent(f"""\
        secure_aggregation:
          protocol: [{protocol}]
          masking: {{threshold: 0.51, bits: {BITS}}}
        """)
    (pol / "dp-eps8.yaml").write_text(dp8)
    nodes = ["  - {name: world, policy: policies/dp-eps8.yaml}"]
    for f in ("eu", "us"):
        nodes.append(f"  - {{name: {f}, parent: world, policy: policies/dp-eps8.yaml}}")
        nodes += [f"  - {{name: {f}-{s}, parent: {f}, policy: policies/dp-eps8.yaml}}" for s in "ab"]
    agg = "aggregation: {adaptive_clip: {target_quantile: 0.5, learning_rate: 0.2, initial_clip: 0.5}}\n"
    path = folder / "world.yaml"
    path.write_text(textwrap.dedent("""\
        name: quantized
        seed: 0
        model: {arch: llama, size: tiny}
        data:
          synthetic: {vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}
        schedule: {rounds: 2, local_steps: 2, batch_size: 4, seq_len: 32, warmup_steps: 1}
        """) + (agg if adaptive else "") + "nodes:\n" + "\n".join(nodes) + "\n")
    return path


def _updates(scale: float) -> dict[str, MemberUpdate]:
    gen = torch.Generator().manual_seed(0)
    return {m: MemberUpdate({KEY: scale * torch.randn(50, generator=gen)}, np.ones(1)) for m in ("eu-a", "eu-b")}


def _release(tmp_path: Path, protocol: str, monkeypatch: pytest.MonkeyPatch, adaptive: bool = True):  # type: ignore[no-untyped-def]
    world = load_world(_world(tmp_path, protocol, adaptive))
    ids = {n: NodeIdentity.generate(n) for n in world.nodes}
    path = ReleasePath(world, ids, ledger_dir=tmp_path / "ledgers", planned_releases=40)
    seen: list[NoisePlan] = []
    original = CentralGaussian.add_noise

    def spy(self, total, plan, rng=None):  # type: ignore[no-untyped-def]
        seen.append(plan)
        return original(self, total, plan, rng)

    monkeypatch.setattr(CentralGaussian, "add_noise", spy)
    path.average_deltas(1, "key", "eu", _updates(0.01), [KEY], {KEY: torch.Size([50])})
    return path, seen


def test_the_release_path_noises_a_masked_sum_at_its_quantized_sensitivity(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path, seen = _release(tmp_path, "masking", monkeypatch)
    (plan,) = seen
    dim = 51  # 50 values + 1 weight word carrying the count
    e = 1.0 / round_quantization(SimpleNamespace(bits=BITS, clip_range=1.0), 2).scale
    assert plan.dim == dim and plan.rounding_error >= e and plan.rounding_error == pytest.approx(e, rel=1e-9)
    assert plan.quantized_sensitivity == pytest.approx(plan.sensitivity + math.sqrt(dim) * e, rel=1e-9)
    entry = path.ledger("eu-a").get("1:key:eu")
    assert entry.protocol == "masking" and entry.mechanism == "central_gaussian"
    assert entry.extra["quantization_slack"] == pytest.approx(math.sqrt(dim) * plan.rounding_error)
    assert entry.extra["noise_sensitivity"] == pytest.approx(plan.quantized_sensitivity)
    # the auditor's check: noise_sensitivity >= the joint sensitivity C_t·z_Δ/z of the recorded clip and split
    z, c_t = entry.noise_multiplier, entry.clipping_norm
    assert entry.extra["noise_sensitivity"] >= c_t * entry.extra["adaptive_clip_vector_z"] / z
    assert entry.extra["adaptive_clip_min"] == pytest.approx(10 * math.sqrt(dim) * plan.rounding_error)
    assert combined_noise_multiplier(entry.extra["adaptive_clip_vector_z"],
                                     entry.extra["adaptive_clip_count_stddev"]) == pytest.approx(z, rel=1e-9)


def test_protocol_none_is_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, seen = _release(tmp_path, "none", monkeypatch, adaptive=False)
    (plan,) = seen
    assert plan.rounding_error == 0.0 and plan.quantized_sensitivity == plan.sensitivity == 1.0
    assert dict(path.ledger("eu-a").get("1:key:eu").extra) == {}


# ---- LOW: the adaptive split in `extra` is the entry's noise_multiplier ----------------------------------------

def test_the_recorded_split_recombines_to_the_entrys_noise_multiplier() -> None:
    ac = AdaptiveClip(AdaptiveClipConfig())
    rnd = ac.round_for("s", max_clip=1.0, noise_multiplier=1.2, cohort=4, words=2)
    z_eff = 1.37  # distributed noise sized for ceil(n·(1 − max_dropout)) members: z_eff != z
    extra = adaptive_clip_extra(rnd, z_eff)
    assert combined_noise_multiplier(extra["adaptive_clip_vector_z"], extra["adaptive_clip_count_stddev"]) == \
        pytest.approx(z_eff, rel=1e-12)
    assert extra["adaptive_clip_vector_z"] / extra["adaptive_clip_count_stddev"] == \
        pytest.approx(rnd.vector_noise_multiplier / rnd.count_stddev, rel=1e-12)  # the split's shape is kept
    # distributed mechanisms: no quantization slack recorded (their Δ₂ counts rounding already)
    dp = ReleaseDP(SimpleNamespace(mechanism=SimpleNamespace(distributed=True)), {},
                   NoisePlan(rnd.sensitivity, 1.2, 3, 10, 1e-3), rnd)
    out = release_dp_extra(dp, SimpleNamespace(noise_multiplier=z_eff))
    assert out is not None and "quantization_slack" not in out
    assert combined_noise_multiplier(out["adaptive_clip_vector_z"], out["adaptive_clip_count_stddev"]) == \
        pytest.approx(z_eff, rel=1e-12)


@pytest.mark.ckks
def test_the_release_path_noises_a_ckks_sum_at_its_quantized_sensitivity(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path, seen = _release(tmp_path, "ckks", monkeypatch)
    (plan,) = seen
    e = CLIP_RANGE / (2.0 ** (VALUE_BITS + 1) - 2)  # the policy's CKKS defaults
    assert plan.rounding_error >= e and plan.rounding_error == pytest.approx(e, rel=1e-6)
    entry = path.ledger("eu-a").get("1:key:eu")
    assert entry.protocol == "ckks"
    assert entry.extra["noise_sensitivity"] == pytest.approx(plan.sensitivity + math.sqrt(51) * plan.rounding_error)
