"""Shared fixtures: small worlds that train in seconds, and the repo's paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"

# Tiny models on small batches: one intra-op thread is faster, and several test processes on two
# cores otherwise thrash (measured ~10x slower per step with 2 threads under contention).
torch.set_num_threads(1)


def write_world(
    folder: Path,
    *,
    policy: str = "research-open.yaml",
    feds: int = 2,
    sites: int = 2,
    rounds: int = 2,
    extra_nodes: str = "",
    data: str | None = None,
) -> Path:
    """A small world file in ``folder`` whose nodes all use ``policy`` (copied from policies/)."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    for p in POLICIES.glob("*.yaml"):
        (pol / p.name).write_text(p.read_text())
    nodes = [f"  - {{name: world, policy: policies/{policy}}}"]
    for f in range(feds):
        nodes.append(f"  - {{name: f{f}, parent: world, policy: policies/{policy}}}")
        for s in range(sites):
            nodes.append(f"  - {{name: f{f}-s{s}, parent: f{f}, policy: policies/{policy}}}")
    data = data or textwrap.dedent(
        """\
        data:
          synthetic: {vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}
        """
    )
    text = (
        textwrap.dedent(
            f"""\
            name: test-world
            seed: 0
            model: {{arch: llama, size: tiny}}
            schedule: {{rounds: {rounds}, local_steps: 2, batch_size: 4, seq_len: 32, lr: 0.003, warmup_steps: 1}}
            """
        )
        + data
        + "nodes:\n"
        + "\n".join(nodes)
        + "\n"
        + extra_nodes
    )
    path = folder / "world.yaml"
    path.write_text(text)
    return path


def write_distributed_world(folder: Path, *, protocol: str = "masking", noise_multiplier: str = "auto") -> Path:
    """A 2x2 world whose every node requires user-level DP with distributed discrete Gaussian noise
    (ε 50, δ 1e-5) under ``protocol``, min_cohort 2. With ``noise_multiplier: auto`` the planned releases
    use the whole budget; a fixed one leaves room (e.g. for a charged re-release after a restart)."""
    pol = folder / "policies"
    pol.mkdir(exist_ok=True)
    (pol / "dist.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\nname: dist\n"
        f"jurisdiction: test\nsecure_aggregation: {{protocol: [{protocol}], min_cohort: 2}}\n"
        "differential_privacy: {level: user, mechanism: [distributed_discrete_gaussian], epsilon_budget: 50.0,\n"
        f"  delta: 1.0e-5, clipping_norm: 1.0, noise_multiplier: {noise_multiplier}}}\nresiduals: {{require_dp: true}}\n"
    )
    return write_world(folder, policy="dist.yaml", feds=2, sites=2, rounds=2)


@pytest.fixture
def small_world(tmp_path: Path) -> Path:
    return write_world(tmp_path)
