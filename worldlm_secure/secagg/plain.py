"""The `none` protocol: members send their vectors in the clear and the aggregator adds them.

Only a policy that explicitly allows `protocol: none` gets this (the authorization step enforces it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.secagg.protocol import DropoutPlan, MemberInput, ProtectionStats, SecureSum, SumResult


class PlainSum(SecureSum):
    name = "none"

    def run_round(
        self,
        round_id: int,
        inputs: Sequence[MemberInput],
        *,
        min_cohort: int,
        dropouts: DropoutPlan = DropoutPlan(),
    ) -> SumResult:
        start = time.perf_counter()
        gone = dropouts.before_keys | dropouts.after_keys
        survivors = [m for m in inputs if m.member not in gone]
        if len(survivors) < min_cohort:
            raise SecAggError(
                f"round {round_id}: only {len(survivors)} of {len(inputs)} members contributed, "
                f"below min_cohort={min_cohort}; nothing was released"
            )
        total = np.sum([np.asarray(m.vector, dtype=np.float64) for m in survivors], axis=0)
        n_bytes = 8.0 * (survivors[0].vector.size if survivors else 0)
        stats = ProtectionStats(
            protocol=self.name,
            bytes_up_per_member=n_bytes,
            bytes_down_per_member=0.0,
            expansion=2.0,  # float64 on the wire vs the float32 model
            server_seconds=time.perf_counter() - start,
        )
        return SumResult(
            total=total,
            contributors=tuple(m.member for m in survivors),
            dropped=tuple(m.member for m in inputs if m.member in gone),
            stats=stats,
        )
