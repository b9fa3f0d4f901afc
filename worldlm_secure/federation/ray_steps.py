"""One protocol step run by several Ray site actors at once, as the driver (the aggregator) sees it.

A member that fails its step (its actor raised, or died) has dropped out of the round from that step on,
exactly as a member that goes silent over the network: the caller carries on with the others when the
protocol allows (SecAgg+ recovery, CKKS min_cohort) and names the dropped members with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("worldlm_secure.ray")


@dataclass
class StepLog:
    """Bytes each member sent (``up``) and received (``down``), wall seconds per role, and who dropped out why."""

    up: dict[str, int] = field(default_factory=dict)
    down: dict[str, int] = field(default_factory=dict)
    member_seconds: float = 0.0
    dropped: dict[str, str] = field(default_factory=dict)

    def sent(self, member: str, data: Any) -> None:
        self.down[member] = self.down.get(member, 0) + (len(data) if isinstance(data, bytes) else 0)


def run_step(ray: Any, actors: Mapping[str, Any], step: str, args: Mapping[str, tuple], log_: StepLog,
             round_id: int, method: str | None = None) -> dict[str, Any]:
    """Call the actor method ``method`` (default: ``step``) with ``*args[m]`` on every member ``m`` of ``args``
    in parallel; their answers by name, in the order of ``args``. Members that raised are left out and
    recorded in ``log_.dropped`` under ``step``.
    ``ray``: anything with Ray's ``get`` (the engine routes every result through one tap)."""
    from ray.exceptions import RayError

    start = time.perf_counter()
    refs = {}
    for m, a in args.items():
        for x in a:
            log_.sent(m, x)
        refs[m] = getattr(actors[m], method or step).remote(*a)
    out: dict[str, Any] = {}
    for m, ref in refs.items():
        try:
            data = ray.get(ref)
        except RayError as exc:  # the member's step failed or its actor is gone: a dropout, not a crash
            reason = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            log_.dropped[m] = f"{step}: {reason}"
            log.warning("round %d: member %s dropped out at %s (%s)", round_id, m, step, reason)
            continue
        log_.up[m] = log_.up.get(m, 0) + (len(data) if isinstance(data, bytes) else 0)
        out[m] = data
    log_.member_seconds += time.perf_counter() - start  # wall time of the step (parallel members), not a sum
    return out
