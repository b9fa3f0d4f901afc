"""Issue 14: DP-FedAvgM's server momentum on deployed federations (protocols/dp.md §2.6).

A federation node applies the engine's server step (`aggregation.server.server_step`: m <- beta*m + mean,
server + lr*m) and checkpoints the momentum buffer with its layers, so a federation killed with kill -9 and
restarted continues the momentum where it was and the world still ends where `simulate` ends.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from nodeworld import Events, assert_like_simulate, run_with_one_restart, small_world

from worldlm_secure.aggregation.server import server_step
from worldlm_secure.federation.engine import Engine
from worldlm_secure.node.federation import FederationNode
from worldlm_secure.node.state import NodeState
from worldlm_secure.node.world_up import collect_results

NAMES = ["a", "b"]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(3, 2, generator=g) for n in NAMES}


def _bare_federation(state: NodeState, momentum: float) -> FederationNode:
    node = FederationNode.__new__(FederationNode)  # the update and checkpoint only, no server or links
    node.state, node.emit = state, lambda *a, **k: None
    node.ctx = SimpleNamespace(settings=SimpleNamespace(server_momentum=momentum))  # type: ignore[assignment]
    node.key, node.shared, node.released, node.pending, node.momentum = {}, {}, {}, None, {}
    node.stage = state.get("stage", [0, "done"])
    return node


@pytest.mark.parametrize("lr,beta", [(1.0, 0.0), (1.0, 0.9), (0.7, 0.5), (2.0, 0.0)])
def test_federation_server_step_is_the_engines_and_survives_a_restart(tmp_path: Path, lr: float, beta: float) -> None:
    engine = SimpleNamespace(settings=SimpleNamespace(server_momentum=beta), momentum={})
    state = NodeState(tmp_path / "state")
    node = _bare_federation(state, beta)
    server_e = server_n = _tensors(0)
    for r in range(1, 4):
        if r == 3:  # kill -9 between rounds: a new process restores the checkpoint, momentum included
            state.close()
            state = NodeState(tmp_path / "state")
            node = _bare_federation(state, beta)
            node.restore()
            server_n = node.key
        new_e = {n: server_e[n] + 0.1 * r * t for n, t in _tensors(r).items()}
        new_n = {n: server_n[n] + 0.1 * r * t for n, t in _tensors(r).items()}
        server_e = Engine.server_step(engine, "key", "eu", server_e, new_e, NAMES, lr)  # type: ignore[arg-type]
        node.key = server_n = node.server_step("key", server_n, new_n, NAMES, lr)
        node.save(r, "aggregated")
        for n in NAMES:
            assert torch.equal(server_n[n], server_e[n]), (r, n)
    if beta > 0:
        assert set(node.momentum) == {"key"}
        # the buffer is m_t = beta*m_{t-1} + mean_t, what the engine holds
        for n in NAMES:
            assert torch.equal(node.momentum["key"][n], engine.momentum[("key", "eu")][n])
    state.close()


def test_server_step_defaults_are_plain_fedavg() -> None:
    server, new = _tensors(0), _tensors(1)
    out, buf = server_step(server, new, NAMES, lr=1.0, momentum=0.0, buffer=None)
    assert buf is None and all(out[n] is new[n] for n in NAMES)
    out, buf = server_step(server, new, NAMES, lr=1.0, momentum=0.5, buffer={n: torch.ones(3, 2) for n in NAMES})
    for n in NAMES:
        assert torch.allclose(out[n], new[n] + 0.5) and torch.allclose(buf[n], new[n] - server[n] + 0.5)  # type: ignore[index]


@pytest.mark.slow
def test_a_federation_with_momentum_restarted_mid_run_ends_where_simulate_ends(tmp_path: Path) -> None:
    """World up with server momentum 0.5; the EU federation is killed with kill -9 right after aggregating
    round 2's key layers (its momentum buffer holds round 1) and restarted: the world ends where `simulate`
    ends. Without the checkpointed buffer, round 2 would miss 0.5·m_1 and the models would differ."""
    timeouts = {"train": 240, "step": 60, "heartbeat": 1, "dropout": 120}
    world_path = small_world(tmp_path / "w", rounds=2, timeouts=timeouts)  # the kill is in the last round
    raw = yaml.safe_load(world_path.read_text())
    raw["aggregation"]["server_momentum"] = 0.5
    world_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    state = tmp_path / "state"
    events = Events()
    world, _, codes = run_with_one_restart(world_path, state, events, "eu",
                                           {"node": "eu", "event": "aggregated", "round": 2, "phase": "key"})
    assert all(c == 0 for c in codes.values()), codes
    assert events.all(node="eu", event="restored")
    assert len(events.all(node="eu", event="announced", round=2, phase="key")) == 2  # round 2 re-run
    deployed = collect_results(world, state, 0.0)["methods"]["worldlm"]["sites"]
    assert_like_simulate(world_path, deployed, state, tmp_path / "sim", 1e-4,
                         "momentum must be applied as the engine does and continue across the restart")
