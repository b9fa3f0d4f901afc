"""Weighted averages of parameter deltas, in the form secure aggregation can sum.

Every aggregation rule here (FedAvg, FedAtt) is "a weighted average of deltas", with one weight per
tensor. A member encodes ``concat_l(w_l * delta_l) ++ [w_1 .. w_L] / sqrt(L)`` into one float vector;
the aggregator only needs the *sum* of those vectors to divide, so it never sees one member's update.
The weights are scaled by 1/sqrt(L) so that, with every w_l <= 1, the weight part has L2 norm <= 1
whatever L is: a member's vector then has norm <= sqrt(C^2 + 1) when its update is clipped to C
(the sensitivity user-level DP needs, protocols/dp.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DeltaCodec:
    """Layout of one parameter group in the flat vector: tensor names and shapes, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def for_tensors(cls, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> "DeltaCodec":
        return cls(tuple(names), tuple(tuple(tensors[n].shape) for n in names))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def length(self) -> int:
        """Vector length: every value plus one weight per tensor."""
        return sum(self.sizes) + len(self.names)

    def encode(self, deltas: Mapping[str, torch.Tensor], weights: np.ndarray) -> np.ndarray:
        """``concat(w_l * delta_l) ++ w / sqrt(L)`` as float64; ``weights`` has one entry per tensor."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(self.names),):
            raise ValueError(f"expected {len(self.names)} weights, got shape {weights.shape}")
        out = np.empty(self.length, dtype=np.float64)  # one buffer: no per-tensor temporaries, no concat
        offset = 0
        for name, size, w in zip(self.names, self.sizes, weights):
            src = deltas[name].detach().to("cpu").reshape(-1).numpy()
            np.multiply(src, w, out=out[offset : offset + size], dtype=np.float64)
            offset += size
        out[offset:] = weights / np.sqrt(len(self.names))
        return out

    def decode_mean(self, total: np.ndarray, count: int) -> dict[str, torch.Tensor]:
        """From a summed vector, the sum of weighted deltas per tensor divided by the public ``count``
        (user-level DP: the weight words are zero and the denominator is never a noisy sum)."""
        if total.shape != (self.length,):
            raise ValueError(f"summed vector has {total.shape} entries, expected ({self.length},)")
        if count < 1:
            raise ValueError(f"count must be >= 1 (got {count})")
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            chunk = total[offset : offset + size] / float(count)
            out[name] = torch.from_numpy(chunk.astype(np.float32)).reshape(shape)
            offset += size
        return out

    def decode_average(self, total: np.ndarray) -> dict[str, torch.Tensor]:
        """From a summed vector, the weighted average delta per tensor (float32)."""
        if total.shape != (self.length,):
            raise ValueError(f"summed vector has {total.shape} entries, expected ({self.length},)")
        weights = total[-len(self.names) :] * np.sqrt(len(self.names))
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape, size, w in zip(self.names, self.shapes, self.sizes, weights):
            chunk = total[offset : offset + size] / w if w > 0 else np.zeros(size)
            out[name] = torch.from_numpy(chunk.astype(np.float32)).reshape(shape)
            offset += size
        return out


def plain_weighted_average(
    deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[np.ndarray], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Reference computation in the clear: per tensor, sum_k w_kl delta_kl / sum_k w_kl."""
    out = {}
    for i, name in enumerate(names):
        ws = np.array([w[i] for w in weights], dtype=np.float64)
        acc = sum(float(w) * d[name].double() for w, d in zip(ws, deltas))
        out[name] = (acc / ws.sum()).float()
    return out
