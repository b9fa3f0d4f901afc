"""Attack: an aggregator serves a model that carries more (or other) tensors than the groups it aggregates.

A site loads what it downloads into its model. A federation that adds a tensor named like one of the site's
local layers (the LM head, which never leaves the site and which the federation never sees) overwrote it,
and a tensor of the wrong shape crashed the site mid-round. A member now takes from a served model exactly
the groups and shapes its own world file says it aggregates (`node.rounds.download_groups`), in every node
that downloads: sites from their federation, federations from the root.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_world

from worldlm_secure.errors import SecAggError
from worldlm_secure.node.context import WorldContext, load_context
from worldlm_secure.node.payload import model_payload
from worldlm_secure.node.rounds import Phase, download_groups
from worldlm_secure.node.site import SiteNode
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.handler import Announcement


class _ServingLink:
    """A member's link to an aggregator that serves ``payload`` and announces its hash (so the served model is
    the announced one: the attack is in what the model contains)."""

    def __init__(self, payload: Payload) -> None:
        self.payload = payload

    def download_model(self, round_id: int) -> Payload:
        return self.payload

    def announcement(self, phase: str = "key") -> Announcement:
        params = Phase(1, phase, model=self.payload.sha256().hex()).to_bytes()
        return Announcement(7, ("f0-s0", "f0-s1"), "none", params)


@pytest.fixture
def ctx(tmp_path: Path) -> WorldContext:
    return load_context(write_world(tmp_path))


def _bare_site(ctx: WorldContext) -> SiteNode:
    site = SiteNode.__new__(SiteNode)  # the download step only: no server, links or training
    site.ctx, site.name = ctx, "f0-s0"
    site.site = SimpleNamespace(params={n: t.clone() for n, t in ctx.init.items()})  # type: ignore[assignment]
    return site


def _groups(ctx: WorldContext) -> dict[str, dict[str, torch.Tensor]]:
    return {"key": {n: ctx.init[n] + 1 for n in ctx.key_names}, "shared": {n: ctx.init[n] + 1 for n in ctx.shared_names}}


def test_a_site_does_not_load_a_local_layer_its_federation_served(ctx: WorldContext) -> None:
    local = next(n for n in ctx.init if n not in ctx.key_names and n not in ctx.shared_names)
    groups = _groups(ctx)
    groups["shared"][local] = torch.zeros_like(ctx.init[local])  # the site's own head, replaced by zeros
    link = _ServingLink(model_payload(groups))
    site = _bare_site(ctx)
    with pytest.raises(SecAggError, match=local.replace(".", r"\.")):
        site.load_broadcast(link, link.announcement())  # type: ignore[arg-type]
    assert torch.equal(site.site.params[local], ctx.init[local])  # untouched
    assert all(torch.equal(site.site.params[n], ctx.init[n]) for n in ctx.init)  # nothing loaded at all


@pytest.mark.parametrize("change", ["missing", "shape", "extra group"])
def test_a_served_model_must_hold_exactly_the_aggregated_groups(ctx: WorldContext, change: str) -> None:
    groups = _groups(ctx)
    name = ctx.shared_names[0]
    if change == "missing":
        del groups["shared"][name]
    elif change == "shape":
        groups["shared"][name] = torch.zeros(3, 3)
    else:
        groups["ref"] = {name: torch.zeros_like(ctx.init[name])}
    link = _ServingLink(model_payload(groups))
    expected = {"key": ctx.key_names, "shared": ctx.shared_names}
    with pytest.raises(SecAggError, match="refused, nothing trained or sent"):
        download_groups(link, link.announcement(), expected, ctx.init)  # type: ignore[arg-type]


def test_the_honest_model_loads(ctx: WorldContext) -> None:
    link = _ServingLink(model_payload(_groups(ctx)))
    site = _bare_site(ctx)
    site.load_broadcast(link, link.announcement())  # type: ignore[arg-type]
    assert all(torch.equal(site.site.params[n], ctx.init[n] + 1) for n in ctx.key_names + ctx.shared_names)
