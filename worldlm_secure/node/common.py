"""Pieces every node role uses: announcement parameters, the round config of a masked link round,
model payloads, a heartbeat thread, and the board that learns members' example counts."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worldlm_secure.secagg.masking import RoundConfig
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.handler import Announcement, Inbound

log = logging.getLogger("worldlm_secure.node")
EXAMPLES_STATUS = "examples="
DONE_STATUS = "done"


@dataclass(frozen=True)
class Phase:
    """What a link round is for. ``phase``: key | shared | residual | final; ``n_max``: the largest member
    example count (shared weights are examples / n_max, as in the engine)."""

    world_round: int
    phase: str
    n_max: float = 1.0

    def to_bytes(self) -> bytes:
        return json.dumps({"world_round": self.world_round, "phase": self.phase, "n_max": self.n_max}, sort_keys=True).encode()

    @classmethod
    def from_announcement(cls, ann: Announcement) -> "Phase":
        raw = json.loads(ann.params.decode() or "{}")
        return cls(int(raw["world_round"]), str(raw["phase"]), float(raw.get("n_max", 1.0)))


def masking_config(plan: Any, ann: Announcement) -> RoundConfig | None:
    """The public parameters of a masked round, identical at members and aggregator."""
    if ann.protocol != "masking":
        return None
    return RoundConfig.build(plan.params, ann.round_id, ann.cohort, dict(ann.peer_keys), plan.min_cohort)


def model_payload(groups: Mapping[str, Mapping[str, torch.Tensor]], extra: Mapping[str, np.ndarray] | None = None) -> Payload:
    """Tensors named PREFIX/NAME (prefix: key, shared, ref), plus raw extras (e.g. residual_total)."""
    arrays: dict[str, np.ndarray] = {}
    for prefix, tensors in groups.items():
        for n, t in tensors.items():
            arrays[f"{prefix}/{n}"] = t.detach().cpu().numpy()
    for n, a in (extra or {}).items():
        arrays[n] = np.asarray(a)
    return Payload.from_tensors(arrays)


def split_payload(payload: Payload) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, np.ndarray] = {}
    for name, arr in payload.as_tensors().items():
        if "/" in name:
            prefix, n = name.split("/", 1)
            groups.setdefault(prefix, {})[n] = torch.from_numpy(np.array(arr, copy=True))
        else:
            extra[name] = np.array(arr, copy=True)
    return groups, extra


class NodeBoard(RoundBoard):
    """A `RoundBoard` that also remembers what members say in heartbeats: their example counts (public
    round weights, as in the engine) and that they are done."""

    def __init__(self, name: str, start_round: int = 0) -> None:
        super().__init__(name, start_round)
        self.examples: dict[str, int] = {}
        self.done: set[str] = set()

    def on_update(self, message: Inbound) -> None:
        super().on_update(message)
        super().on_heartbeat(message.sender, "")  # a member that sends is alive

    def on_secagg(self, message: Inbound) -> None:
        super().on_secagg(message)
        super().on_heartbeat(message.sender, "")

    def on_heartbeat(self, member: str, status: str) -> None:
        super().on_heartbeat(member, status)
        for part in status.split():
            if part.startswith(EXAMPLES_STATUS):
                try:
                    self.examples[member] = int(part[len(EXAMPLES_STATUS):])
                except ValueError:
                    log.warning("heartbeat from %s: bad example count %r", member, part)
            elif part == DONE_STATUS:
                self.done.add(member)


class Heartbeat(threading.Thread):
    """Calls ``beat()`` every ``seconds`` until stopped; failures are logged, never fatal."""

    def __init__(self, beat: Callable[[], object], seconds: float) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.beat, self.seconds = beat, seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.seconds):
            try:
                self.beat()
            except Exception as exc:  # the main loop notices real outages; this only keeps liveness
                log.info("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
