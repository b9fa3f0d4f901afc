"""Attack: an aggregator announces a round under protocol ``none`` to members whose policies require secure
aggregation, hoping they upload their update in the clear.

A site checked the announced protocol against its policies' round plan; a federation sending its aggregate up
to the root did not (it went straight to `member_round`, whose ``none`` path uploads the plain vector). The
check now lives in the one member-side send, `NodeRelease.contribute`, which site and federation nodes both
use. The test drives it with a link that records what would leave.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_world

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node.config import TimeoutSection
from worldlm_secure.node.context import load_context
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.state import NodeState
from worldlm_secure.transport.handler import Announcement


class _RecordingLink:
    """A member's link that records every message it would send."""

    federation = "f0"

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def upload_update(self, payload: object, *, secagg_kind: int = 0, round_id: int | None = None) -> None:
        self.sent.append(("update", secagg_kind))

    def send_secagg(self, secagg_kind: int, payload: object, *, round_id: int | None = None) -> None:
        self.sent.append(("secagg", secagg_kind))

    def fetch_secagg(self, secagg_kind: int = 0, *, round_id: int | None = None) -> list:
        return []


@pytest.mark.parametrize("derived", [False, True], ids=["site-to-federation", "federation-to-root"])
def test_a_member_refuses_a_round_announced_without_the_protocol_its_policy_requires(tmp_path: Path, derived: bool) -> None:
    path = write_world(tmp_path, policy="masked.yaml")
    (tmp_path / "policies" / "masked.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: masked\n"
        "jurisdiction: test\nsecure_aggregation: {protocol: [masking], min_cohort: 2}\n"
    )
    ctx = load_context(path)
    me = "f0" if derived else "f0-s0"
    final = ctx.root if derived else "f0"
    cohort = ["f0", "f1"] if derived else ["f0-s0", "f0-s1"]
    state = NodeState(tmp_path / "state")
    release = NodeRelease(ctx, NodeIdentity.generate(me), tmp_path / "ledger", state)
    names = ctx.key_names
    deltas = {n: 0.01 * torch.ones(ctx.init[n].shape) for n in names}
    try:
        prep = release.prepare(1, "key", final, final, cohort, deltas, np.ones(len(names)), names,
                               {n: ctx.init[n].shape for n in names}, derived=derived)
        assert prep.plan.protocol != "none"  # the policy asks for secure aggregation
        link = _RecordingLink()
        ann = Announcement(1, tuple(cohort), "none")
        with pytest.raises(SecAggError, match="announced 'none'.*refused, nothing sent"):
            release.contribute(link, ann, 1, "key", final, names, prep, TimeoutSection())  # type: ignore[arg-type]
        assert link.sent == []
        assert release.path.ledger(me).get(f"1:key:{final}") is None  # nothing recorded as released either
    finally:
        state.close()
        release.path.close()
