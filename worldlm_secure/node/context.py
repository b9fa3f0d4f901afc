"""What every node derives identically from the shared world YAML: settings, the initial model, the
parameter groups, and (for a site) its own data. Same file + same seed -> same numbers on every node,
and the same numbers as the in-process engine (`federation.engine.Engine`) computes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import SiteData, plan_groups
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.settings import Settings, settings_for
from worldlm_secure.federation.world import World, load_world
from worldlm_secure.model import build_model

Tensors = dict[str, torch.Tensor]


@dataclass
class WorldContext:
    """The world as one node sees it. ``init``: the initial parameters (identical on every node)."""

    world: World
    settings: Settings
    vocab_size: int
    init: Tensors
    key_names: list[str]
    shared_names: list[str]
    base_hash: str | None = None  # SHA-256 of the base weights loaded (model.pretrained.base_weights_hash)

    @property
    def model_field(self) -> str:
        """Where the base model comes from, for messages: the world file and its model field."""
        m = self.settings.model
        return f"{self.world.path} model.pretrained ({m.pretrained})" if m.pretrained else f"{self.world.path} model"

    @property
    def root(self) -> str:
        return self.world.root.name

    def members(self, aggregator: str) -> list[str]:
        """Sorted children of ``aggregator`` (the engine's order)."""
        return sorted(self.world.nodes[aggregator].children)

    def site_index(self, site: str) -> int:
        """The site's position among all sites by name: the engine seeds its batch generator with it."""
        return sorted(s.name for s in self.world.sites).index(site)

    def residuals_enabled(self) -> bool:
        """The engine's condition for exchanging residual embeddings between federations (WorldLM)."""
        feds = sorted(f.name for f in self.world.federations)
        if self.world.is_flat or len(feds) < 2 or not self.key_names:
            return False
        return all(self.world.effective_policy(f).residuals.allowed for f in feds)

    def site_data(self, site: str) -> SiteData:
        """This site's token streams (the full synthetic world is generated, the site keeps its part)."""
        from worldlm_secure.federation.simulate import load_world_data

        data, _ = load_world_data(self.world, self.settings)
        if site not in data:
            raise ConfigError(f"{self.world.path}: no data for site {site!r}")
        return data[site]

    def new_model(self) -> torch.nn.Module:
        return build_model(replace(self.settings.model, vocab_size=self.vocab_size), seed=self.settings.seed)


def load_context(world_path: Path, *, rounds: int | None = None, device: str = "cpu") -> WorldContext:
    """Load the world and everything derived from it; refuses what nodes cannot run yet."""
    world = load_world(world_path)
    if world.is_flat:
        raise ConfigError(
            f"{world_path} nodes: node start needs federations between the root and the sites "
            "(root -> federations -> sites); run a flat world with `worldlm-secure simulate`"
        )
    settings = settings_for(world, rounds=rounds, device=device)
    vocab = settings.synthetic.vocab_size if settings.synthetic is not None else _vocab(world, settings)
    model = build_model(replace(settings.model, vocab_size=vocab), seed=settings.seed)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(init)
    groups = plan_groups(METHODS["worldlm"], world, names)
    first = next(iter(sorted(groups)))
    key, shared = list(groups[first].key), list(groups[first].shared)
    for site, g in groups.items():
        if list(g.key) != key or list(g.shared) != shared:
            raise ConfigError(
                f"{world.path}: sites {first!r} and {site!r} group their parameters differently (their policies' "
                "layers: sections); every site of the world must agree"
            )
    return WorldContext(world, settings, vocab, init, key, shared, getattr(model, "base_hash", None))


def _vocab(world: World, settings: Settings) -> int:
    from worldlm_secure.federation.simulate import load_world_data

    _, vocab = load_world_data(world, settings)
    return vocab


def to_numpy(tensors: Tensors, names: list[str] | None = None) -> dict[str, np.ndarray]:
    return {n: tensors[n].detach().cpu().numpy() for n in (names if names is not None else list(tensors))}


def to_torch(arrays: dict[str, np.ndarray]) -> Tensors:
    return {n: torch.from_numpy(np.array(a, copy=True)) for n, a in arrays.items()}
