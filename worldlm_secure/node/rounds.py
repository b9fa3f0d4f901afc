"""A link round's public description: its phase (announcement params) and, for masking, its RoundConfig
(for CKKS, its `CkksRound`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.node.ckks_link import CkksRound
from worldlm_secure.node.payload import split_payload
from worldlm_secure.secagg.masking import RoundConfig
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import SiteClient
from worldlm_secure.transport.handler import Announcement


PHASES = frozenset({"key", "shared", "residual", "final"})


class BaseMismatch(ConfigError):
    """A round was announced for another base model than the one this node loaded: the node stops."""


@dataclass(frozen=True)
class Phase:
    """What a link round is for. ``phase``: key | shared | residual | final; ``n_max``: the largest member
    example count (shared weights are examples / n_max, as in the engine); ``model``: the SHA-256 (hex) of the
    model payload the aggregator serves for the round; ``clip``: the adaptive clip C_t of the release (L2 norm,
    protocols/dp.md §2.7; 0.0: none, members use the public C_0 or their fixed clip). The announcement's params (these bytes) go into what
    masking members sign (`masking_config`), so members reveal only if enough of them were told the same."""

    world_round: int
    phase: str
    n_max: float = 1.0
    base: str = ""  # SHA-256 of the base weights the aggregator loaded (model.base_hash); "" when unknown
    model: str = ""  # SHA-256 of the model payload served for this round; "" when none is served
    clip: float = 0.0  # adaptive clip C_t announced for this release; 0.0 when none

    def to_bytes(self) -> bytes:
        raw: dict[str, object] = {"world_round": self.world_round, "phase": self.phase, "n_max": self.n_max}
        if self.base:
            raw["base"] = self.base
        if self.model:
            raw["model"] = self.model
        if self.clip:
            raw["clip"] = self.clip
        return json.dumps(raw, sort_keys=True).encode()

    def check_base(self, loaded: str | None, *, node: str, aggregator: str, where: str) -> None:
        """Refuse to join a round announced for another base model than the one this node loaded
        (`BaseMismatch`, naming ``where``: the world file and its model field, and both hashes)."""
        if self.base and loaded and self.base != loaded:
            raise BaseMismatch(
                f"{where}: {node} loaded base weights {loaded}, but {aggregator} announced round {self.world_round} "
                f"({self.phase}) for base {self.base}; {node} refuses to join. Give every node the same checkpoint "
                "(model.pretrained) and dtype, or pin it with model.base_sha256"
            )

    @classmethod
    def from_announcement(cls, ann: Announcement) -> "Phase":
        """Decode the announcement's params; anything malformed is a `SecAggError` (the round is skipped)."""
        try:
            raw = json.loads(ann.params.decode() or "{}")
            phase = cls(int(raw["world_round"]), str(raw["phase"]), float(raw.get("n_max", 1.0)), str(raw.get("base", "")),
                        str(raw.get("model", "")), float(raw.get("clip", 0.0)))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise SecAggError(f"round {ann.round_id}: the announcement's params do not parse ({type(exc).__name__}); skipped") from None
        if phase.phase not in PHASES or not math.isfinite(phase.n_max) or phase.n_max <= 0:
            raise SecAggError(f"round {ann.round_id}: the announcement names an unknown phase or a bad n_max; skipped")
        if not math.isfinite(phase.clip) or phase.clip < 0:
            raise SecAggError(f"round {ann.round_id}: the announcement's adaptive clip is not a finite norm >= 0; skipped")
        if phase.base and not re.fullmatch(r"[0-9a-f]{64}", phase.base):
            raise SecAggError(f"round {ann.round_id}: the announcement's base hash is not a SHA-256; skipped")
        if phase.model and not re.fullmatch(r"[0-9a-f]{64}", phase.model):
            raise SecAggError(f"round {ann.round_id}: the announcement's model hash is not a SHA-256; skipped")
        return phase


def announced_phases(link: SiteClient, current_round: int, emit: Callable[..., None]) -> Iterator[tuple[Announcement, Phase]]:
    """The aggregator's announcements from ``current_round`` on (its enrollment's), each with its `Phase`. An
    announcement the member refuses (`SiteClient.verify_announcement`: certificates, roster) or whose params do
    not parse is skipped and reported as ``round_failed`` (group ``announcement``): the member sits it out."""
    def refused(rid: int, exc: Exception) -> None:
        emit("round_failed", link_round=rid, group="announcement", error=str(exc))

    for ann in link.watch_rounds(after_round=max(0, current_round - 1), on_refused=refused):
        try:
            phase = Phase.from_announcement(ann)
        except SecAggError as exc:
            refused(ann.round_id, exc)
            continue
        yield ann, phase


def download_announced(link: SiteClient, ann: Announcement) -> Payload:
    """The model served for round ``ann``, checked against the SHA-256 its announcement carries (`SecAggError`
    otherwise, the round skipped). Why: an aggregator serving different members different models (say, one
    that makes every member's update but the victim's zero) gets the victim's update as "the sum"; the hash
    is in the announcement, and the announcement is in what members sign, so the members of one sum trained
    from one model. protocols/federation.md, "Model consistency"."""
    phase = Phase.from_announcement(ann)
    payload = link.download_model(ann.round_id)
    got = payload.sha256().hex()
    if not phase.model or got != phase.model:
        raise SecAggError(
            f"round {ann.round_id}: the model served ({got[:16]}...) is not the one announced "
            f"({phase.model[:16] + '...' if phase.model else 'none'}); refused, nothing trained or sent"
        )
    return payload


def download_groups(link: SiteClient, ann: Announcement, expected: Mapping[str, Sequence[str]],
                    shapes: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, np.ndarray]]:
    """The model served for round ``ann`` (`download_announced`), split into its groups and raw extras, refused
    (`SecAggError`, the round skipped, nothing loaded) unless its groups are exactly ``expected`` (group -> the
    tensor names this member's own world file puts there; an empty group may be absent) with the shapes of
    ``shapes`` (the initial model). Why: a member loads what it downloads; an aggregator adding a tensor named
    like a local layer would overwrite what never leaves the site, and a wrong shape would crash the member."""
    groups, extra = split_payload(download_announced(link, ann))
    problems = [f"unexpected group {g!r}" for g in sorted(set(groups) - set(expected))]
    for group, names in expected.items():
        got = groups.get(group, {})
        problems += [f"{group}/{n} not aggregated here" for n in sorted(set(got) - set(names))]
        problems += [f"{group}/{n} missing" for n in names if n not in got]
        problems += [f"{group}/{n} shape {tuple(got[n].shape)} is not {tuple(shapes[n].shape)}"
                     for n in names if n in got and got[n].shape != shapes[n].shape]
    if problems:
        raise SecAggError(f"round {ann.round_id}: the served model is not the groups this node aggregates "
                          f"({'; '.join(problems[:4])}{'; ...' if len(problems) > 4 else ''}); refused, nothing trained or sent")
    return groups, extra


def masking_config(plan: Any, ann: Announcement, noise: Any = None) -> RoundConfig | None:
    """The public parameters of a masked round, identical at members and aggregator (``noise``: the
    distributed DP shares the quantizer leaves room for). At a member, ``ann`` is what
    `SiteClient.verify_announcement` returned: its peer keys and ``aggregator_key`` come from certificates
    the member checked itself; at the aggregator, ``aggregator_key`` is its own (`Aggregator.announce`)."""
    if ann.protocol != "masking":
        return None
    return RoundConfig.build(plan.params, ann.round_id, ann.cohort, dict(ann.peer_keys), plan.min_cohort, noise,
                             aggregator_key=ann.aggregator_key, context=ann.params)


def ckks_round(plan: Any, ann: Announcement) -> CkksRound | None:
    """The public parameters of a CKKS round (None for other protocols), identical at members and aggregator."""
    if ann.protocol != "ckks":
        return None
    return CkksRound.from_plan(plan)
