"""A member's side of one weighted release, before any protection: its aggregation weights, and its update
``w * (params - server)`` per tensor, clipped to the round's user-level DP norm, encoded as one vector.

One definition for every place a member computes it: the in-process engine, a Ray site actor
(`federation.site_actor`) and a site node (`node.site`), so that all three release the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from worldlm_secure.aggregation.attentive import AttentionConfig, client_weights
from worldlm_secure.aggregation.weighted import DeltaCodec

WEIGHTINGS = ("attention", "examples")


def member_weights(server: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], names: Sequence[str],
                   weighting: str, *, examples: int, n_max: float, attention: AttentionConfig) -> np.ndarray:
    """Per-tensor weights of one member: "attention" (FedAtt, from its own parameters against the last
    broadcast ``server``) or "examples" (its training examples / the cohort's largest, ``n_max``)."""
    if weighting == "attention":
        return client_weights(server, params, list(names), attention)
    if weighting == "examples":
        return np.full(len(names), examples / n_max)
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def clip_update(deltas: Mapping[str, torch.Tensor], names: Sequence[str], max_norm: float) -> dict[str, torch.Tensor]:
    """Scale the group's update so its L2 norm over all tensors is at most ``max_norm`` (parameter units)."""
    norm = float(torch.sqrt(sum((deltas[n].double() ** 2).sum() for n in names)))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {n: deltas[n] * scale for n in names}


def encode_update(codec: DeltaCodec, deltas: Mapping[str, torch.Tensor], weights: np.ndarray,
                  clip: float | None) -> np.ndarray:
    """The member's encoded release: ``deltas`` clipped to ``clip`` (None: no user-level DP), weighted, flat."""
    if clip is not None:
        deltas = clip_update(deltas, codec.names, clip)
    return codec.encode(deltas, weights)
