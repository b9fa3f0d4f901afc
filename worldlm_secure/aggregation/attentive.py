"""Attentive aggregation of key layers (FedAtt, Ji et al. 2019), in the secure form of DESIGN.md.

FedAtt, per layer l with server parameters s_l and client parameters c_kl:
    d_kl   = ||s_l - c_kl||_2                         (layer distance)
    a_kl   = softmax_k(d_kl / tau)                     (attention over clients)
    s_l'   = s_l + eps * sum_k a_kl (c_kl - s_l)       (server step of size eps)
Secure form: each client computes its own bounded score d_kl' = min(d_kl, max_score) and weight
w_kl = exp((d_kl' - max_score) / tau) in [exp(-max_score / tau), 1] (normalized by the public maximum,
so weighted values stay inside the quantization range); it submits w_kl (c_kl - s_l) and w_kl under
secure aggregation. Since a_kl = w_kl / sum_k w_kl, dividing the two sums gives the same update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionConfig:
    """``step`` is FedAtt's server step eps; ``temperature`` tau; ``max_score`` the public bound on d_kl."""

    step: float = 1.0
    temperature: float = 1.0
    max_score: float = 3.0

    @property
    def min_weight(self) -> float:
        """The public lower bound of any attention weight (the upper bound is 1)."""
        return float(np.exp(-self.max_score / self.temperature))


def client_weights(
    server: Mapping[str, torch.Tensor], client: Mapping[str, torch.Tensor], names: Sequence[str], cfg: AttentionConfig
) -> np.ndarray:
    """What a client computes on its own: w_l = exp((min(||s_l - c_l||, max_score) - max_score) / tau)."""
    d = np.array([float(torch.linalg.vector_norm((server[n] - client[n]).double())) for n in names])
    return np.exp((np.minimum(d, cfg.max_score) - cfg.max_score) / cfg.temperature)


def fedatt_update(
    server: Mapping[str, torch.Tensor],
    clients: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str],
    cfg: AttentionConfig,
) -> dict[str, torch.Tensor]:
    """Plaintext FedAtt (with the same score bound): the reference the secure path must equal."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        dists = torch.stack([torch.linalg.vector_norm((server[name] - c[name]).double()) for c in clients])
        att = torch.softmax(torch.clamp(dists, max=cfg.max_score) / cfg.temperature, dim=0)
        step = sum(a * (c[name].double() - server[name].double()) for a, c in zip(att, clients))
        out[name] = (server[name].double() + cfg.step * step).float()
    return out
