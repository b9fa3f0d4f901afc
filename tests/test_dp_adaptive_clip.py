"""Issue 14: adaptive clipping (Andrew et al. 2021) under user-level DP, protocols/dp.md §2.7.

The clip tracks a target quantile of the members' update norms from a noised count that rides in the
release's weight words; the vector's noise multiplier is raised to z_Δ so that update + count together are
exactly the Gaussian mechanism of multiplier z that the ledger records and the accountant charges.
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import POLICIES, REPO

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import ConfigError, PolicyError
from worldlm_secure.federation.release import MemberUpdate, ReleasePath
from worldlm_secure.federation.world import load_world
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.privacy.adaptive_clip import (
    AdaptiveClip,
    AdaptiveClipConfig,
    MemberClip,
    combined_noise_multiplier,
    next_clip,
    vector_noise_multiplier,
)
from worldlm_secure.privacy.central_gaussian import CentralGaussian
from worldlm_secure.privacy.mechanisms import NoisePlan
from worldlm_secure.privacy.secure_random import SecureRandom

DP8 = (REPO / "examples" / "policies" / "dp-eps8.yaml").read_text()
ADAPTIVE = "aggregation: {adaptive_clip: {target_quantile: 0.5, learning_rate: 0.2, initial_clip: 0.5}}\n"


def _world(folder: Path, *, adaptive: str = ADAPTIVE, rounds: int = 2, noise: str = "auto") -> Path:
    """Two federations of two sites under examples/policies/dp-eps8.yaml (central Gaussian, C = 1)."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    (pol / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    (pol / "dp-eps8.yaml").write_text(
        DP8.replace("../../policies/research-open.yaml", "research-open.yaml").replace(
            "noise_multiplier: auto", f"noise_multiplier: {noise}"))
    nodes = ["  - {name: world, policy: policies/dp-eps8.yaml}"]
    for f in ("eu", "us"):
        nodes.append(f"  - {{name: {f}, parent: world, policy: policies/dp-eps8.yaml}}")
        nodes += [f"  - {{name: {f}-{s}, parent: {f}, policy: policies/dp-eps8.yaml}}" for s in "ab"]
    path = folder / "world.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: adaptive
        seed: 0
        model: {{arch: llama, size: tiny}}
        data:
          synthetic: {{vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}}
        schedule: {{rounds: {rounds}, local_steps: 2, batch_size: 4, seq_len: 32, warmup_steps: 1}}
        """) + adaptive + "nodes:\n" + "\n".join(nodes) + "\n")
    return path


# ---- the pure update ---------------------------------------------------------------------------------------

def _noised_round(ac: AdaptiveClip, norms: np.ndarray, z: float, words: int, rng: SecureRandom) -> float:
    """One release of the count alone: members' count words, summed, central noise at the joint sensitivity."""
    rnd = ac.round_for("s", max_clip=100.0, noise_multiplier=z, cohort=len(norms), words=words)
    total = sum(rnd.member.count_words(float(n), words) for n in norms)
    plan = NoisePlan(rnd.sensitivity, z)
    noised = CentralGaussian().add_noise(total, plan, rng)
    return ac.update("s", rnd, noised, len(norms))


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_the_clip_converges_to_the_target_quantile_of_the_norms(quantile: float) -> None:
    rng = SecureRandom()
    gen = np.random.default_rng(3)  # the crafted data only; the DP noise comes from SecureRandom
    ac = AdaptiveClip(AdaptiveClipConfig(target_quantile=quantile, learning_rate=0.2, initial_clip=0.05))
    clips = []
    for _ in range(300):
        norms = gen.lognormal(mean=0.0, sigma=0.5, size=200)  # a fresh cohort's update norms each round
        clips.append(_noised_round(ac, norms, z=1.0, words=4, rng=rng))
    want = math.exp(0.5 * {0.5: 0.0, 0.9: 1.2815515655446004}[quantile])  # the lognormal's quantile
    got = float(np.exp(np.mean(np.log(clips[-100:]))))
    assert got == pytest.approx(want, rel=0.1), (got, want)


def test_the_clip_never_exceeds_the_policys_clipping_norm() -> None:
    cfg = AdaptiveClipConfig(target_quantile=0.5, learning_rate=1.0, initial_clip=50.0)
    assert next_clip(1.0, 0.0, cfg, max_clip=1.2) == 1.2  # every update above the clip: grow, but only to C_max
    ac = AdaptiveClip(cfg)
    assert ac.round_for("s", max_clip=2.0, noise_multiplier=1.0, cohort=10, words=3).clip == 2.0  # C_0 capped too
    rng = SecureRandom()
    for _ in range(20):
        assert _noised_round(ac, np.full(30, 1e6), 1.0, 3, rng) <= 100.0


# ---- the noise split ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("z,cohort,words", [(0.8, 3, 5), (1.3, 100, 12), (4.0, 1000, 1)])
def test_vector_and_count_noise_together_are_the_accounted_gaussian(z: float, cohort: int, words: int) -> None:
    ac = AdaptiveClip(AdaptiveClipConfig())
    rnd = ac.round_for("s", max_clip=0.7, noise_multiplier=z, cohort=cohort, words=words)
    sb = rnd.count_stddev
    assert sb == pytest.approx(max(cohort / 20, z / (2 * math.sqrt(0.1))))
    z_vec = rnd.vector_noise_multiplier
    assert z_vec == pytest.approx((z ** -2 - (2 * sb) ** -2) ** -0.5) and z_vec > z
    # Theorem 1 of Andrew et al.: z_Δ and σ_b compose to z, what the ledger records and the accountant charges.
    assert combined_noise_multiplier(z_vec, sb) == pytest.approx(z, rel=1e-12)
    # The joint vector's sensitivity S = C·z_Δ/z; noise z·S per word is z_Δ·C on the update, σ_b on the count.
    assert rnd.sensitivity == pytest.approx(rnd.clip * z_vec / z, rel=1e-12)
    plan = NoisePlan(rnd.sensitivity, z)
    noise = CentralGaussian().add_noise(np.zeros(200_000), plan)
    assert float(np.std(noise)) == pytest.approx(z_vec * rnd.clip, rel=0.02)
    count_noise_std = z * rnd.sensitivity / (rnd.count_scale * math.sqrt(words))
    assert count_noise_std == pytest.approx(sb, rel=1e-12)
    # the largest count word stays within the clip with the default σ_b (the quantizer's range suffices)
    assert rnd.max_word == rnd.clip


def test_a_count_stddev_too_small_for_z_is_refused() -> None:
    with pytest.raises(PolicyError, match="count_stddev"):
        vector_noise_multiplier(2.0, 0.9)
    with pytest.raises(PolicyError, match="count_stddev"):
        AdaptiveClip(AdaptiveClipConfig(count_stddev=0.5)).round_for("s", max_clip=1.0, noise_multiplier=1.0, cohort=5, words=2)


def test_a_members_vector_has_the_joint_sensitivity() -> None:
    rnd = AdaptiveClip(AdaptiveClipConfig()).round_for("s", max_clip=1.0, noise_multiplier=1.0, cohort=4, words=2)
    codec = DeltaCodec(("a", "b"), ((3,), (2,)))
    big = {"a": torch.tensor([3.0, 4.0, 0.0]), "b": torch.tensor([12.0, 0.0])}  # ‖Δ‖ = 13 > C: b = 0
    small = {n: t / 100 for n, t in big.items()}  # ‖Δ‖ = 0.13 <= C: b = 1
    for deltas, bit in ((big, 0.0), (small, 1.0)):
        v = encode_update(codec, deltas, np.ones(2), rnd.member)
        assert np.linalg.norm(v) <= rnd.sensitivity * (1 + 1e-12)
        assert np.allclose(v[-2:], (bit - 0.5) * rnd.count_scale)
        assert np.linalg.norm(v[:-2]) <= rnd.clip
    # a plain clip (adaptive off) still zeroes the weight words, byte for byte as before
    plain = encode_update(codec, big, np.ones(2), 1.0)
    assert np.all(plain[-2:] == 0.0) and isinstance(rnd.member, MemberClip)


# ---- the release path (in-process and the Ray driver's remote path) ----------------------------------------

KEY = "model.layers.0.mlp.w"  # a name research-open's key pattern matches (and its shared one does not)
SHARED = "model.layers.0.self_attn.w"


def _updates(scale: float, name: str = KEY) -> dict[str, MemberUpdate]:
    gen = torch.Generator().manual_seed(0)
    return {m: MemberUpdate({name: scale * torch.randn(50, generator=gen)}, np.ones(1)) for m in ("eu-a", "eu-b")}


def test_release_path_adapts_the_clip_and_records_it(tmp_path: Path) -> None:
    world = load_world(_world(tmp_path))
    ids = {n: NodeIdentity.generate(n) for n in world.nodes}
    path = ReleasePath(world, ids, ledger_dir=tmp_path / "ledgers", planned_releases=40)
    assert path.adaptive is not None
    clips = []
    for r in range(1, 6):  # the count's noise (σ_b on two members) moves the clip; the cap holds it <= C
        path.average_deltas(r, "key", "eu", _updates(0.01), [KEY], {KEY: torch.Size([50])})
        clips.append(path.ledger("eu-a").get(f"{r}:key:eu").clipping_norm)
    assert clips[0] == 0.5 and all(c <= 1.0 for c in clips) and len(set(clips)) > 1, clips
    e = path.ledger("eu-a").get("5:key:eu")
    assert combined_noise_multiplier(e.extra["adaptive_clip_vector_z"], e.extra["adaptive_clip_count_stddev"]) == \
        pytest.approx(e.noise_multiplier, rel=1e-9)
    assert e.extra["adaptive_clip_max"] == 1.0

    # The Ray driver's path: the members run encode_update with the clip they are handed (site_actor.prepare).
    def remote(rid, secure, plan, noise, clip, dim):  # type: ignore[no-untyped-def]
        assert isinstance(clip, MemberClip)
        codec = DeltaCodec((SHARED,), ((50,),))
        return {m: encode_update(codec, u.deltas, u.weights, clip) for m, u in _updates(0.01, SHARED).items()}

    before = path.adaptive.current(("eu", "shared"), 1.0)
    path.average_remote(9, "shared", "eu", ["eu-a", "eu-b"], [SHARED], {SHARED: torch.Size([50])}, remote,
                        final_destination="world")
    assert path.adaptive.current(("eu", "shared"), 1.0) != before  # its own stream, updated from its count


def test_a_bad_setting_names_the_world_file_and_field(tmp_path: Path) -> None:
    world = load_world(_world(tmp_path, adaptive="aggregation: {adaptive_clip: {target_quantile: 1.5}}\n"))
    with pytest.raises(ConfigError, match=r"aggregation.adaptive_clip.target_quantile"):
        ReleasePath(world, {})


# ---- a whole run, recomputed independently -----------------------------------------------------------------

@pytest.mark.slow
def test_a_run_with_adaptive_clipping_recomputes_with_dp_accounting(tmp_path: Path) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import dp_event, rdp

    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import simulate
    from worldlm_secure.ledger import read_entries, verify
    from worldlm_secure.privacy.accountant import RDP_ORDERS

    logging.getLogger("absl").setLevel(logging.ERROR)
    out = tmp_path / "ledgers"
    simulate(_world(tmp_path, rounds=3), methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    for site in ("eu-a", "eu-b", "us-a", "us-b"):
        report = verify(out / f"{site}.sqlite")
        assert report.ok, report.summary()
        charged = [e for e in read_entries(out / f"{site}.sqlite") if e.epsilon is not None]
        assert len(charged) == 6 and all(e.clipping_norm <= 1.0 for e in charged)
        assert len({e.clipping_norm for e in charged}) > 1, "the clip moved"
        acc = rdp.RdpAccountant(orders=list(RDP_ORDERS))
        for e in charged:
            assert dp_accounting is not None and e.sample_rate == 1.0
            # Each release as what it is: the update's Gaussian (multiplier z_Δ) and the count's (σ_b on a
            # centered bit of sensitivity 1/2, i.e. multiplier 2σ_b), composed by dp-accounting on its own.
            acc.compose(dp_event.GaussianDpEvent(e.extra["adaptive_clip_vector_z"]))
            acc.compose(dp_event.GaussianDpEvent(2 * e.extra["adaptive_clip_count_stddev"]))
            assert acc.get_epsilon(e.delta) == pytest.approx(e.epsilon_cumulative, rel=1e-6)


@pytest.mark.slow
def test_distributed_noise_under_masking_carries_the_count_too(tmp_path: Path) -> None:
    """Distributed discrete Gaussian shares added by the members before SecAgg+ masking: the count words are
    inside the masked, integer-noised vector (sized at the joint sensitivity), the ledgers verify and record
    the clip used, and a node deployment of the same world is refused naming the setting."""
    from conftest import write_distributed_world

    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import simulate
    from worldlm_secure.ledger import read_entries, verify

    world = write_distributed_world(tmp_path, noise_multiplier="1.0")
    text = world.read_text().replace("nodes:\n", "aggregation: {adaptive_clip: {initial_clip: 0.5}}\nnodes:\n", 1)
    world.write_text(text)
    out = tmp_path / "ledgers"
    result = simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    assert all(math.isfinite(v) for v in result.methods["worldlm"].sites.values())
    entries = [e for e in read_entries(out / "f0-s0.sqlite") if e.epsilon is not None]
    assert {e.mechanism for e in entries} == {"distributed_discrete_gaussian"} and {e.protocol for e in entries} == {"masking"}
    assert [e.clipping_norm for e in entries][:2] == [0.5, 0.5] and all(e.clipping_norm <= 1.0 for e in entries)
    assert all(e.extra["adaptive_clip_vector_z"] > 1.0 for e in entries)
    # The split is recorded at the entry's z_eff (distributed shares: z_eff != the planned z in general, e.g. with
    # dropouts), not at the planned z: recombined, it is the noise_multiplier the accountant charged.
    for e in entries:
        assert combined_noise_multiplier(e.extra["adaptive_clip_vector_z"], e.extra["adaptive_clip_count_stddev"]) == \
            pytest.approx(e.noise_multiplier, rel=1e-9)
        assert "quantization_slack" not in e.extra  # distributed: rounding is in Δ₂ already (dp.md §3.2)
    assert verify(out / "f0-s0.sqlite").ok


@pytest.mark.slow
def test_ray_site_actors_clip_adaptively_through_the_same_pipeline(local_ray: Any, tmp_path: Path) -> None:
    """Sites as Ray actors: the driver hands each actor the round's `MemberClip`, the actor encodes its own
    update and count words (`encode_update`), the driver noises, updates the clip and records it."""
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.ray_backend import simulate_on_ray
    from worldlm_secure.ledger import read_entries, verify

    out = tmp_path / "ledgers"
    simulate_on_ray(_world(tmp_path, rounds=2), methods=[METHODS["worldlm"]], device="cpu", ledger_root=out,
                    scope="sites")
    paths = list(out.rglob("eu-a.sqlite"))
    assert len(paths) == 1 and verify(paths[0]).ok
    entries = [e for e in read_entries(paths[0]) if e.epsilon is not None]
    assert len(entries) == 4 and [e.clipping_norm for e in entries][:2] == [0.5, 0.5]
    assert len({e.clipping_norm for e in entries}) > 1 and all(e.clipping_norm <= 1.0 for e in entries)
    assert all("adaptive_clip_vector_z" in e.extra for e in entries)
