"""A member's side of one weighted release, before any protection: its aggregation weights, and its update
``w * (params - server)`` per tensor, clipped to the round's user-level DP norm, encoded as one vector.

One definition for every place a member computes it: the in-process engine, a Ray site actor
(`federation.site_actor`) and a site node (`node.site`), so that all three release the same bytes.

Under user-level DP (``clip`` given) the release is ``concat(w_l * clip_l2(delta, C)) ++ 0``: the whole group's
update is clipped once by the hardened `privacy.clipping.clip_l2` (refuses NaN/inf, shades the factor so
rounding never lands above C), every weight is clamped to the public range [0, 1], and the weight words are
zero, so one member's vector has L2 norm <= C whatever its weights (the sensitivity the noise is sized for;
protocols/dp.md §2). The aggregator divides by the public cohort size, never by a noisy weight sum.

With adaptive clipping (``clip`` a `privacy.adaptive_clip.MemberClip`, protocols/dp.md §2.7) the weight words
carry the member's centered clip bit (b − ½)·t instead of zeros, b = 1[‖Δ‖ ≤ C_t]: secure-summed and noised
with the update, so the release stays one Gaussian mechanism (of sensitivity C_t·z_Δ/z).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from worldlm_secure.aggregation.attentive import AttentionConfig, client_weights
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.privacy.adaptive_clip import MemberClip
from worldlm_secure.privacy.clipping import clip_l2

WEIGHTINGS = ("attention", "examples")


def member_weights(server: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], names: Sequence[str],
                   weighting: str, *, examples: int, n_max: float, attention: AttentionConfig) -> np.ndarray:
    """Per-tensor weights of one member: "attention" (FedAtt, from its own parameters against the last
    broadcast ``server``) or "examples": ``min(examples, n_max) / n_max``. Without DP ``n_max`` is the cohort's
    largest count (plain example weighting); under DP it is a public cap (`Engine.example_scale`: 1 gives
    uniform weights), so a member's weight depends on nothing but its own data and a public number."""
    if weighting == "attention":
        return client_weights(server, params, list(names), attention)
    if weighting == "examples":
        if not n_max > 0:
            raise ValueError(f"n_max must be > 0 (got {n_max})")
        return np.full(len(names), min(float(examples), float(n_max)) / float(n_max))
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def encode_update(codec: DeltaCodec, deltas: Mapping[str, torch.Tensor], weights: np.ndarray,
                  clip: float | MemberClip | None) -> np.ndarray:
    """The member's encoded release: ``deltas`` weighted, flat, with the weights in the last words.
    ``clip`` (user-level DP): the group's update is clipped to L2 <= ``clip`` first, the weights are clamped
    to [0, 1] and the weight words are zero (the denominator is public; see the module docstring); with a
    `MemberClip` (adaptive clipping) they carry the centered clip bit instead."""
    if clip is None:
        return codec.encode(deltas, weights)
    adaptive = clip if isinstance(clip, MemberClip) else None
    flat = np.concatenate([deltas[n].detach().to("cpu").reshape(-1).double().numpy() for n in codec.names])
    result = clip_l2(flat, clip.norm if isinstance(clip, MemberClip) else clip)  # raises ValueError on NaN/inf
    clipped = result.vector
    parts, offset = {}, 0
    for name, shape, size in zip(codec.names, codec.shapes, codec.sizes):
        parts[name] = torch.from_numpy(clipped[offset : offset + size]).reshape(shape)
        offset += size
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, 1.0)
    out = codec.encode(parts, w)
    out[-len(codec.names):] = 0.0 if adaptive is None else adaptive.count_words(result.norm, len(codec.names))
    return out
