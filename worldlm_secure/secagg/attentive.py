"""Secure attentive aggregation (DESIGN.md): FedAtt's attention-weighted average, computed from two sums.

Member k holds the server parameters θ_s, so it computes its own per-layer score s_k^l itself (e.g.
FedAtt's ‖θ_s^l − θ_k^l‖), clips it to the public range [lo, hi] and sets
    w_k^l = exp((s_k^l − hi) / τ)  ∈ [exp(−(hi − lo)/τ), 1]
(the shift by hi cancels in the softmax and keeps w ≤ 1 inside the quantization range). It submits
    v_k = concat_l(w_k^l · δ_k^l) ‖ (w_k^1, ..., w_k^L),   δ_k = θ_k − θ_s,
to any `SecureSum`. The aggregator learns only Σ_k w_k^l δ_k^l and Σ_k w_k^l and returns
    θ_s^l + Σ_k w_k^l δ_k^l / Σ_k w_k^l  =  Σ_k softmax_k(s^l / τ) θ_k^l,
the plaintext attentive average, up to the protocol's quantization error (`AttentiveResult.error_bound`),
provided the protocol's quantization range covers w ≤ 1 and every |w·δ| (masking: clip_range ≥ 1 and
≥ max |δ|); anything cut off shows up in `AttentiveResult.clipped_fraction` and breaks the equality.
The FedAtt server step (θ_s + ε (avg − θ_s)) is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from worldlm_secure.errors import SecAggError
from worldlm_secure.secagg.protocol import DropoutPlan, MemberInput, SecureSum, SumResult


@dataclass(frozen=True)
class AttentiveResult:
    average: np.ndarray  # per coordinate, Σ_k α_k θ_k over the contributors (α = per-layer softmax)
    weight_sums: np.ndarray  # Σ_k w_k^l per layer
    error_bound: float  # max |average − plaintext attentive average| per coordinate, from quantization
    clipped_fraction: float  # > 0 means the protocol's range cut some w·δ or w: widen it (clip_range >= 1)
    sum_result: SumResult


def attention_weight(score: float, tau: float, score_range: tuple[float, float]) -> float:
    """w = exp((clip(score, lo, hi) − hi) / τ), in [exp(−(hi − lo)/τ), 1]."""
    lo, hi = score_range
    if not (tau > 0 and lo <= hi):
        raise SecAggError(f"attentive aggregation: need tau > 0 and lo <= hi (got tau={tau}, range={score_range})")
    return math.exp((min(max(float(score), lo), hi) - hi) / tau)


def _layers(layer_sizes: Sequence[int] | None, d: int) -> list[slice]:
    sizes = list(layer_sizes) if layer_sizes is not None else [d]
    if sum(sizes) != d or any(s <= 0 for s in sizes):
        raise SecAggError(f"attentive aggregation: layer sizes {sizes} do not add up to the vector length {d}")
    edges = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def member_vector(
    server_vector: np.ndarray,
    own_vector: np.ndarray,
    scores: Sequence[float],
    tau: float,
    score_range: tuple[float, float],
    layer_sizes: Sequence[int] | None = None,
) -> np.ndarray:
    """What one member submits: concat_l(w^l · δ^l) ‖ (w^1..w^L), computed from its own score(s)."""
    delta = np.asarray(own_vector, dtype=np.float64) - np.asarray(server_vector, dtype=np.float64)
    layers = _layers(layer_sizes, delta.size)
    if len(scores) != len(layers):
        raise SecAggError(f"attentive aggregation: {len(scores)} scores for {len(layers)} layers")
    w = np.array([attention_weight(s, tau, score_range) for s in scores])
    weighted = np.concatenate([w[i] * delta[sl] for i, sl in enumerate(layers)])
    return np.concatenate([weighted, w])


def secure_attentive_average(
    protocol: SecureSum,
    server_vector: np.ndarray,
    member_vectors: Mapping[str, np.ndarray],
    scores: Mapping[str, float | Sequence[float]],
    tau: float,
    *,
    score_range: tuple[float, float],
    round_id: int,
    min_cohort: int,
    layer_sizes: Sequence[int] | None = None,
    dropouts: DropoutPlan = DropoutPlan(),
) -> AttentiveResult:
    """Attention-weighted average of the members' parameters through ``protocol`` (which sees only sums).

    ``scores[m]`` is one float, or one per layer (``layer_sizes`` splits the flat vector into layers).
    In a deployment each member builds its own `member_vector`; here they are built in-process.
    """
    server = np.asarray(server_vector, dtype=np.float64)
    layers = _layers(layer_sizes, server.size)
    inputs = []
    for name, vec in member_vectors.items():
        s = scores[name]
        per_layer = [float(s)] * len(layers) if np.isscalar(s) else list(s)  # type: ignore[arg-type]
        inputs.append(MemberInput(name, member_vector(server, vec, per_layer, tau, score_range, layer_sizes)))
    res = protocol.run_round(round_id, inputs, min_cohort=min_cohort, dropouts=dropouts)
    d = server.size
    sums = res.total[:d]
    weights = res.total[d:]
    err = float(res.stats.extra.get("quantization_error_bound", 0.0))
    average = np.empty(d)
    bound = 0.0
    for i, sl in enumerate(layers):
        if weights[i] <= err:
            raise SecAggError(
                f"round {round_id}: attention weights of layer {i} sum to {weights[i]:.3g}, not above the "
                f"quantization error {err:.3g}; raise bits or narrow score_range"
            )
        mean_delta = sums[sl] / weights[i]
        average[sl] = server[sl] + mean_delta
        # |A/B - a/b| <= (|A - a| + |a/b| |B - b|) / b with |A - a|, |B - b| <= err and b >= B - err
        bound = max(bound, err * (1.0 + float(np.max(np.abs(mean_delta), initial=0.0))) / (weights[i] - err))
    return AttentiveResult(average, weights, bound, res.stats.clipped_fraction, res)
