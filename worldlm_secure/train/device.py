"""Device choice: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

import contextlib
import math
import os
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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's or `taskset`'s share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> tuple[int, str]:
    """Torch intra-op threads that do not oversubscribe the machine, and why (for the run's header).

    ``usable_cpus() - round(1-minute load average)``, at least 1 and at most ``usable_cpus()``. The load
    average counts the runnable processes of the whole machine, so on a shared 2-core machine with one
    other busy process this is 1: torch's own default (one thread per core) made a small run 107 s
    instead of 16 s there, because two threads keep waiting for each other's core.
    """
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    threads = max(1, min(cpus, cpus - int(math.floor(load + 0.5))))
    return threads, f"{cpus} usable CPU(s), load {load:.1f}"


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads: must be at least 1 (got {threads})")


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads for torch (None: torch's default, one per usable core; the CLI passes
    `default_threads()` instead, which also counts the machine's load).

    Small models on a machine other processes also load run much faster with 1 thread: two
    threads that keep waiting for each other's core measured ~10x slower per step here.
    """
    if threads is None:
        return
    check_threads(threads)
    torch.set_num_threads(threads)
