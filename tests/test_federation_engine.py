"""The engine: local layers never move, aggregation is what it claims, runs are reproducible."""

from __future__ import annotations

from pathlib import Path

import torch

from worldlm_secure.federation.engine import Engine
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.settings import settings_for
from worldlm_secure.federation.simulate import load_world_data
from worldlm_secure.federation.world import load_world


def _engine(world_path: Path, method: str = "worldlm") -> Engine:
    world = load_world(world_path)
    settings = settings_for(world, device="cpu")
    data, vocab = load_world_data(world, settings)
    return Engine(world, METHODS[method], data, settings, vocab_size=vocab)


def test_local_parameters_are_bit_identical_across_aggregation(small_world: Path) -> None:
    engine = _engine(small_world)
    engine.train_sites(1)
    local = engine.groups[engine.sites[0].name].local
    assert local, "the example policy keeps the head local"
    before = {s.name: {n: s.params[n].clone() for n in local} for s in engine.sites}
    engine.aggregate(1)
    engine.broadcast()
    for s in engine.sites:
        for n in local:
            assert torch.equal(s.params[n], before[s.name][n]), f"{s.name}:{n} changed"
    # ... while key layers now agree within a federation and shared layers everywhere
    key, shared = engine.key_names, engine.shared_names
    by_fed: dict[str, list] = {}
    for s in engine.sites:
        by_fed.setdefault(s.aggregator, []).append(s)
    for sites in by_fed.values():
        assert all(torch.equal(sites[0].params[n], o.params[n]) for o in sites[1:] for n in key)
    assert all(torch.equal(engine.sites[0].params[n], o.params[n]) for o in engine.sites[1:] for n in shared)


def test_local_heads_differ_between_sites_after_training(small_world: Path) -> None:
    engine = _engine(small_world)
    engine.train_sites(1)
    a, b = engine.sites[0].params["lm_head.weight"], engine.sites[1].params["lm_head.weight"]
    assert not torch.equal(a, b)


def test_shared_average_is_the_example_weighted_mean(small_world: Path) -> None:
    engine = _engine(small_world, "fedavg")
    engine.train_sites(1)
    name = engine.shared_names[0]
    expected = sum(s.params[name].double() * s.examples for s in engine.sites) / sum(s.examples for s in engine.sites)
    engine.aggregate_shared(1)
    assert torch.allclose(engine.root_shared[name].double(), expected, atol=1e-6)


def test_same_seed_same_result_on_cpu(small_world: Path) -> None:
    one = _engine(small_world).run()
    two = _engine(small_world).run()
    assert one.sites == two.sites


def test_local_method_releases_nothing(small_world: Path) -> None:
    result = _engine(small_world, "local").run()
    assert result.stats.releases == 0 and result.stats.bytes_up == 0
