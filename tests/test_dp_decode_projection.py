"""Under user-level DP the released average is projected onto the L2 ball of radius C (protocols/dp.md §2.9).

The true average of weighted, clipped member vectors lies in that ball, so the projection never moves the
estimate away from it, and a round can no longer throw the model away when the noise norm z·C·√d/n is far
above C (FedAvg on the default world at ε 8 diverged to perplexity 3.4e7 in two rounds). Both backends'
aggregators (`simulate`'s `ReleasePath`, a federation node's `NodeRelease`) decode through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import write_world
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.aggregation.member import encode_update
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.federation.engine import planned_site_releases
from worldlm_secure.federation.release import MemberUpdate, ReleasePath
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.context import load_context
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState
from worldlm_secure.release.dp import decode

CODEC = DeltaCodec(("a", "b"), ((3, 4), (5,)))
COHORT = ["f0-s0", "f0-s1"]


def _norm(parts: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in parts.values())))


def _flat(parts: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([parts[n].double().reshape(-1).numpy() for n in CODEC.names])


@settings(max_examples=60, deadline=None)
@given(members=st.integers(1, 6), clip=st.floats(0.05, 5.0), noise=st.floats(0.0, 200.0),
       seed=st.integers(0, 2**31 - 1))
def test_projection_never_moves_the_average_away_from_the_true_one(members: int, clip: float, noise: float,
                                                                   seed: int) -> None:
    gen = np.random.default_rng(seed)  # test data, not a secret
    vectors = []
    for _ in range(members):
        deltas = {n: torch.from_numpy(gen.normal(size=s) * gen.uniform(0.01, 10.0)) for n, s in zip(CODEC.names, CODEC.shapes)}
        vectors.append(encode_update(CODEC, deltas, gen.uniform(0.0, 1.0, size=2), clip))
    true_total = np.sum(vectors, axis=0)
    true_mean = _flat(decode(CODEC, true_total, members))
    assert np.linalg.norm(true_mean) <= clip * (1 + 1e-6)  # what the projection relies on
    noised = true_total + gen.normal(size=true_total.shape) * noise * clip
    raw = _flat(decode(CODEC, noised, members))
    projected = decode(CODEC, noised, members, clip)
    assert _norm(projected) <= clip * (1 + 1e-6)
    assert np.linalg.norm(_flat(projected) - true_mean) <= np.linalg.norm(raw - true_mean) * (1 + 1e-6) + 1e-9


def test_without_dp_the_average_is_not_touched() -> None:
    total = np.concatenate([np.full(17, 100.0), np.full(2, 1.0 / np.sqrt(2))])  # weights 1, 1
    out = decode(CODEC, total, None, 1.0)  # no public count: not a DP release, the bound is ignored
    assert _norm(out) > 100.0


def _noisy_world(folder: Path) -> Path:
    """A 2x2 world under central Gaussian noise far above the signal (z 200, clip 1)."""
    path = write_world(folder, policy="loud.yaml")
    (folder / "policies" / "loud.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: loud\n"
        "jurisdiction: test\ndifferential_privacy: {level: user, mechanism: [central_gaussian],\n"
        "  epsilon_budget: 50.0, delta: 1.0e-5, clipping_norm: 1.0, noise_multiplier: 200.0}\n"
    )
    return path


def test_both_aggregators_release_an_average_inside_the_clip_ball(tmp_path: Path) -> None:
    ctx = load_context(_noisy_world(tmp_path))
    names, shapes = ctx.key_names, {n: ctx.init[n].shape for n in ctx.key_names}
    deltas = {m: {n: 0.01 * torch.ones(ctx.init[n].shape) for n in names} for m in COHORT}
    planned = planned_site_releases(ctx.settings.rounds, bool(ctx.key_names), bool(ctx.shared_names))
    path = ReleasePath(ctx.world, {n: NodeIdentity.generate(n) for n in ctx.world.nodes}, ledger_dir=tmp_path / "sim",
                       planned_releases=planned)
    try:
        simulated = path.average_deltas(1, "key", "f0", {m: MemberUpdate(deltas[m], np.ones(len(names))) for m in COHORT},
                                        names, shapes)
    finally:
        path.close()
    assert 0.0 < _norm(simulated) <= 1.0 + 1e-6

    codec = DeltaCodec(tuple(names), tuple(tuple(shapes[n]) for n in names))
    state = NodeState(tmp_path / "state" / "f0")
    node = NodeRelease(ctx, NodeIdentity.generate("f0"), tmp_path / "ledger" / "f0", state)
    try:
        total = sum(encode_update(codec, deltas[m], np.ones(len(names)), 1.0) for m in COHORT)
        deployed = node.finish_average(np.asarray(total), COHORT, "f0", names,
                                       {n: tuple(shapes[n]) for n in names}, derived=False, stream=("f0", "key"),
                                       contributors=len(COHORT))
    finally:
        state.close()
        node.path.close()
    assert 0.0 < _norm(deployed) <= 1.0 + 1e-6
