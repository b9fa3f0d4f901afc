"""Residual layer embeddings: how federations share key-layer knowledge across the tree, adaptively.

For F sibling federations, federation f with key layers K_f, and the parent's public reference R
(see protocols/worldlm.md):
    r_f  = K_f - R                                   residual
    e_f  = LowRank_rank(r_f)                         embedding (truncated SVD per matrix)
    S    = sum_g e_g                                 the ONLY thing the parent learns (secure sum)
    o_f  = (S - e_f) / (F - 1)                       f's siblings' mean residual, computed by f itself
    c_f  = cos(e_f, o_f)                             how similar f is to its siblings
    g_f  = gain * max(0, c_f)                        similarity-gated gain in [0, gain]
    K_f' = K_f + g_f (o_f - r_f)                     the child mixes its siblings' blend in
    R'   = R + S / F                                 the parent moves its reference
Dissimilar federations (cosine <= 0) take nothing; similar ones take up to ``gain``. Because only the
sum leaves the secure aggregation, no federation's residual is ever seen on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def embed(residual: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Best rank-``rank`` approximation (truncated SVD) of every matrix; vectors are kept whole."""
    out = {}
    for name, r in residual.items():
        if r.ndim == 2 and rank < min(r.shape):
            U, S, Vh = torch.linalg.svd(r.float(), full_matrices=False)  # float32: exact enough, ~4x cheaper
            out[name] = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        else:
            out[name] = r.float().clone()
    return out


def flatten(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> np.ndarray:
    """The tensors in ``names`` order as one float64 vector."""
    return np.concatenate([tensors[n].detach().reshape(-1).double().numpy() for n in names])


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = torch.from_numpy(vector[offset : offset + size].astype(np.float32)).reshape(like[n].shape)
        offset += size
    return out


@dataclass(frozen=True)
class Blend:
    """What a federation derives from the secure sum: its siblings' mean residual and its gain."""

    siblings_mean: np.ndarray
    similarity: float
    gain: float


def blend_from_sum(own: np.ndarray, total: np.ndarray, count: int, gain: float) -> Blend:
    """Leave-one-out blend for one federation, from its own embedding and the sum over ``count`` siblings."""
    if count < 2:
        return Blend(np.zeros_like(own), 0.0, 0.0)
    others = (total - own) / (count - 1)
    denom = float(np.linalg.norm(own) * np.linalg.norm(others))
    sim = float(own @ others / denom) if denom > 0 else 0.0
    return Blend(others, sim, gain * max(0.0, sim))


def mix_in(key: np.ndarray, reference: np.ndarray, blend: Blend) -> np.ndarray:
    """K_f + g_f (o_f - (K_f - R))."""
    return key + blend.gain * (blend.siblings_mean - (key - reference))
