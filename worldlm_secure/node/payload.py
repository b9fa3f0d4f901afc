"""Model transfers between nodes: named tensors PREFIX/NAME (key, shared, ref) plus raw extras."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from worldlm_secure.transport.chunks import Payload


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
