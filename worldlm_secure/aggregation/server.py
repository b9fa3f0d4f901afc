"""The server step of DP-FedAvgM (protocols/dp.md §2.6): one definition for the in-process engine (and so the
Ray backend) and the deployed federation nodes, which persist the momentum buffer in their checkpoint.

On the released (noised) mean u_t = new − server:  m_t = β·m_{t−1} + u_t,  server ← server + η·m_t.
Post-processing of DP releases: it spends no privacy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


def server_step(server: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], names: Sequence[str], *,
                lr: float, momentum: float, buffer: Mapping[str, torch.Tensor] | None) -> tuple[Tensors, Tensors | None]:
    """``(next server, next momentum buffer)``. ``buffer``: m_{t−1} (None before the first step); the returned
    buffer is None when ``momentum`` is 0. lr = 1 and momentum = 0 (the defaults) is plain FedAvg: exactly
    ``new``, unchanged bytes."""
    if lr == 1.0 and momentum == 0.0:
        return dict(new), None
    mean = {n: new[n] - server[n] for n in names}
    out_buffer = None
    if momentum > 0.0:
        if buffer is not None:
            mean = {n: momentum * buffer[n] + mean[n] for n in names}
        out_buffer = mean
    return {n: server[n] + lr * mean[n] for n in names}, out_buffer
