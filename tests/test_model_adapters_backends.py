"""LoRA adapters on every backend: the same saved checkpoint fine-tuned with LoRA across a 2x2 world under
SecAgg+ masking and record-level DP, once in process, once with the sites as Ray actors and once as real
nodes (`world up`, gRPC/mTLS). Every node's ledger holds the same entries in every backend (releases,
adapter tensor names only, protection, DP-SGD steps, q, z, ε, the base model's hash), every ledger
verifies, and the base weights are the same checkpoint everywhere. Validation perplexities differ: DP-SGD's
sampling and noise come from each process's CSPRNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from test_model_adapters import ADAPTER_POLICY, LORA
from test_model_pretrained import save_tiny_checkpoint, write_text_world
from test_node_world_up_dp import FIELDS

from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import verify
from worldlm_secure.model.adapters import is_adapter_name

pytestmark = [pytest.mark.e2e, pytest.mark.network, pytest.mark.ray]


def _ledgers(paths: list[Path]) -> dict[str, list[tuple[Any, ...]]]:
    """node -> its entries' FIELDS, every ledger verified on the way (the root may hold none)."""
    out = {}
    for p in paths:
        rep = verify(p)
        assert rep.ok, (p, rep.problem)
        if rep.entries:
            out[rep.node] = [tuple(getattr(e, f) for f in FIELDS) for e in rep.entries]
    return out


def test_lora_world_agrees_in_process_on_ray_and_over_world_up(local_ray: Any, tmp_path: Path) -> None:
    from worldlm_secure.federation.ray_backend import simulate_on_ray
    from worldlm_secure.node.world_up import world_up

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt" / "tiny-llama")
    world = write_text_world(tmp_path / "w", model=f"{{pretrained: {checkpoint}, adapters: {{lora: {LORA}}}}}",
                             policy="adapters.yaml", policy_text=ADAPTER_POLICY, rounds=1)
    methods = [METHODS["worldlm"]]
    local = simulate(world, methods=methods, device="cpu", ledger_root=tmp_path / "inprocess")
    ray = simulate_on_ray(world, methods=methods, device="cpu", ledger_root=tmp_path / "ray", scope="sites")
    deployed = world_up(world, tmp_path / "state", timeout=600, launch="fork")
    assert deployed.get("failed_nodes") is None, deployed.get("exit_codes")

    inproc = _ledgers(sorted((tmp_path / "inprocess").glob("*.sqlite")))
    on_ray = _ledgers(sorted((tmp_path / "ray").glob("*.sqlite")))
    nodes = _ledgers(sorted((tmp_path / "state" / "nodes").glob("*/ledger/*.sqlite")))
    assert inproc and set(inproc) == set(on_ray) == set(nodes)
    for node, entries in inproc.items():
        assert on_ray[node] == entries, ("ray", node)
        assert nodes[node] == entries, ("world up", node)

    released = {n for entries in inproc.values() for e in entries for n in e[FIELDS.index("tensor_names")]}
    assert released and all(is_adapter_name(n) for n in released)  # adapters only, in every backend
    assert not any("lm_head" in n for n in released)  # head adapters are local
    mechanisms = {e[FIELDS.index("mechanism")] for entries in inproc.values() for e in entries}
    assert "dp_sgd" in mechanisms  # record-level DP-SGD charged on the sites' streams
    bases = {e[FIELDS.index("base_hash")] for entries in inproc.values() for e in entries}
    assert len(bases) == 1 and bases != {""}  # one base checkpoint, recorded in every entry
    assert local.methods["worldlm"].base_hash == ray.methods["worldlm"].base_hash == next(iter(bases))

    for result in (local.methods["worldlm"].sites, ray.methods["worldlm"].sites,
                   {s: v["val_ppl"] for s, v in deployed["methods"]["worldlm"]["sites"].items()}):
        assert set(result) == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
        assert all(math.isfinite(v) for v in result.values())
