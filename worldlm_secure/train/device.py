"""Device choice: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from worldlm_secure.errors import ConfigError


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` picks cuda > mps > cpu; otherwise the named device, checked to exist."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"--device: unknown device {preference!r} (valid: auto, cpu, cuda, cuda:N, mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {preference}: CUDA is not available on this machine (use auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {preference}: MPS is not available on this machine (use auto or cpu)")
    return device


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (the tensor cores' fast path); full fp32 elsewhere."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads for torch (None: torch's default, one per core).

    Small models on a machine other processes also load run much faster with 1 thread: two
    threads that keep waiting for each other's core measured ~10x slower per step here.
    """
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads: must be at least 1 (got {threads})")
    torch.set_num_threads(threads)
