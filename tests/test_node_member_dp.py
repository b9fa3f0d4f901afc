"""What a member of a deployed DP link decides itself rather than taking from its aggregator.

Adaptive clipping (protocols/dp.md §2.7): the aggregator announces the clip C_t of each release (`Phase.clip`)
and keeps it in node state; a member clips at the announced C_t, but never above its own policy's
clipping_norm and never at a malformed value. Public weights (§2): under DP a member weighs its shared update
with the public cap of its own world file, not the announced n_max. The world-up run that checks adaptive
clipping's ledgers against `simulate` is in test_node_world_up_dp.py (distributed noise with adaptive clipping).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_world

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.context import WorldContext, load_context
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.rounds import Phase
from worldlm_secure.node.state import NodeState
from worldlm_secure.transport.handler import Announcement

CLIP = 1.0  # the policy's clipping_norm: the ceiling of every adaptive clip


@pytest.fixture
def ctx(tmp_path: Path) -> WorldContext:
    """A 2x2 world under central user-level DP (clip 1.0) with adaptive clipping from C_0 = 0.5."""
    path = write_world(tmp_path, policy="dp.yaml")
    (tmp_path / "policies" / "dp.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: dp\n"
        "jurisdiction: test\ndifferential_privacy: {level: user, mechanism: [central_gaussian], epsilon_budget: 50.0,\n"
        f"  delta: 1.0e-5, clipping_norm: {CLIP}, noise_multiplier: auto}}\nresiduals: {{require_dp: true}}\n"
    )
    raw = yaml.safe_load(path.read_text())
    raw["aggregation"] = {"adaptive_clip": {"target_quantile": 0.5, "initial_clip": 0.5}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_context(path)


@pytest.fixture
def member(ctx: WorldContext, tmp_path: Path) -> Iterator[NodeRelease]:
    state = NodeState(tmp_path / "member-state")
    release = NodeRelease(ctx, NodeIdentity.generate("f0-s0"), tmp_path / "ledger", state)
    yield release
    state.close()
    release.path.close()


def _clipped_norm(ctx: WorldContext, release: NodeRelease, announced: float) -> float:
    """The L2 norm of the update part of what f0-s0 would send after the aggregator announced ``announced``."""
    names = ctx.key_names
    deltas = {n: torch.full(ctx.init[n].shape, 0.5) for n in names}  # far above any clip
    prep = release.prepare(1, "key", "f0", "f0", ["f0-s0", "f0-s1"], deltas, np.ones(len(names)), names,
                           {n: ctx.init[n].shape for n in names}, derived=False, clip=announced)
    return float(np.linalg.norm(prep.vector[: -len(names)]))


@pytest.mark.parametrize("announced,used", [(0.0, 0.5), (0.2, 0.2), (0.9, 0.9), (100.0, CLIP)],
                         ids=["none-announced: C_0", "lower", "higher", "above the policy: capped"])
def test_a_member_clips_at_the_announced_clip_within_its_policy(ctx: WorldContext, member: NodeRelease,
                                                                announced: float, used: float) -> None:
    assert _clipped_norm(ctx, member, announced) == pytest.approx(used, rel=1e-9)


def test_the_aggregator_announces_the_clip_its_last_sum_gave_and_keeps_it_across_a_restart(
        ctx: WorldContext, tmp_path: Path) -> None:
    names = ctx.key_names
    shapes = {n: tuple(ctx.init[n].shape) for n in names}
    state = NodeState(tmp_path / "agg-state")
    agg = NodeRelease(ctx, NodeIdentity.generate("f0"), tmp_path / "agg-ledger", state)
    assert agg.announced_clip("f0", "key") == 0.0  # no release yet: members start from C_0
    # a sum whose count words say every member was inside the clip (b = 1): the clip shrinks
    dp = agg.path.round_dp(["f0-s0", "f0-s1"], "f0", sum(int(np.prod(s)) for s in shapes.values()) + len(names),
                           agg.plan(["f0-s0", "f0-s1"], "f0"), charged=[], stream=("f0", "key"), words=len(names))
    assert dp is not None and dp.clip_round is not None
    words = dp.clip_round.member.count_words(0.0, len(names)) * 2  # two members, both inside
    total = np.concatenate([np.zeros(dp.plan.dim - len(names)), words])
    agg.finish_average(total, ["f0-s0", "f0-s1"], "f0", names, shapes, derived=False, stream=("f0", "key"),
                       contributors=2)
    c1 = agg.announced_clip("f0", "key")
    assert 0.0 < c1 < 0.5
    state.close()
    agg.path.close()
    state = NodeState(tmp_path / "agg-state")  # kill -9 and restart: the clip comes back from node state
    again = NodeRelease(ctx, NodeIdentity.generate("f0"), tmp_path / "agg-ledger", state)
    assert again.announced_clip("f0", "key") == c1
    state.close()
    again.path.close()


@pytest.mark.parametrize("clip", ["NaN", "-0.5", "Infinity", "\"big\""])
def test_a_malformed_announced_clip_is_refused(clip: str) -> None:
    params = ('{"world_round": 1, "phase": "key", "n_max": 1.0, "clip": %s}' % clip).encode()
    with pytest.raises(SecAggError, match="skipped"):
        Phase.from_announcement(Announcement(3, ("a", "b"), "masking", params))


def test_the_clip_is_in_the_announced_params_members_sign() -> None:
    phase = Phase(2, "key", clip=0.625)
    assert Phase.from_announcement(Announcement(3, ("a", "b"), "masking", phase.to_bytes())) == phase
    assert b'"clip": 0.625' in phase.to_bytes() and b"clip" not in Phase(2, "key").to_bytes()


def test_under_dp_a_member_weighs_with_its_own_public_cap_not_the_announced_n_max(member: NodeRelease) -> None:
    """The shared weight min(n, n_max)/n_max must be public under DP (protocols/dp.md §2): the member derives
    n_max from its world file (`aggregation.dp_weight_cap`, here unset: 1, uniform) instead of trusting the
    announcement, which an aggregator could set per member."""
    assert member.public_weights
    assert member.member_scale(1e9) == member.member_scale(0.5) == 1.0
