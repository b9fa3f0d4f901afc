"""Issue 14, items 2 and 4: under DP every weight and denominator is public, so the sensitivity the ledger's
mechanism assumes holds for every released vector.

Crafted neighbouring worlds, as an auditor would build them: world A, and world B = A plus one *large* site
(ten times the examples of any other). The real engine and release path run one key and one shared round on
crafted site updates (larger than the clip) with the noise switched off, and every released sum is captured.
For each site-level release the L2 change between A and B, weight words included, must not exceed the
sensitivity the noise was sized for; the root's release (post-processing) must carry the same public weights
in both worlds. On the old code the large site rescaled every other site's example weight (÷ n_max), and
the root weighted federations by their raw example counts.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import POLICIES, REPO

from worldlm_secure.federation import release as release_mod
from worldlm_secure.federation.engine import Engine, SiteData
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.settings import settings_for
from worldlm_secure.federation.world import load_world
from worldlm_secure.privacy.central_gaussian import CentralGaussian

DP8 = (REPO / "examples" / "policies" / "dp-eps8.yaml").read_text()
SEQ = 32


def _world(folder: Path, sites: dict[str, list[str]]) -> Path:
    pol = folder / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    (pol / "research-open.yaml").write_text((POLICIES / "research-open.yaml").read_text())
    (pol / "dp-eps8.yaml").write_text(DP8.replace("../../policies/research-open.yaml", "research-open.yaml"))
    nodes = ["  - {name: world, policy: policies/dp-eps8.yaml}"]
    for fed, members in sites.items():
        nodes.append(f"  - {{name: {fed}, parent: world, policy: policies/dp-eps8.yaml}}")
        nodes += [f"  - {{name: {s}, parent: {fed}, policy: policies/dp-eps8.yaml}}" for s in members]
    path = folder / "world.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: neighbours
        seed: 0
        model: {{arch: llama, size: tiny}}
        data:
          synthetic: {{vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}}
        schedule: {{rounds: 2, local_steps: 1, batch_size: 4, seq_len: {SEQ}, warmup_steps: 1}}
        nodes:
        """) + "\n".join(nodes) + "\n")
    return path


def _crafted_delta(site: str, like: dict[str, torch.Tensor], names: list[str], norm: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, site)) * 7919 + len(names))
    d = {n: torch.randn(like[n].shape, generator=g) for n in names}
    scale = norm / float(torch.sqrt(sum((t.double() ** 2).sum() for t in d.values())))
    return {n: t * scale for n, t in d.items()}


def _released(folder: Path, sites: dict[str, list[str]], examples: dict[str, int], monkeypatch: Any) -> dict:
    """Run one key and one shared aggregation of the real engine; every released sum, noise off."""
    world = load_world(_world(folder, sites))
    settings = settings_for(world)
    data = {s: SiteData(np.arange(examples[s] * SEQ) % 64, np.arange(4 * SEQ) % 64) for f in sites for s in sites[f]}
    engine = Engine(world, METHODS["worldlm"], data, settings, vocab_size=64)
    for s in engine.sites:  # crafted updates, 3x the clipping norm, identical for a site in both worlds
        for names, server in ((engine.key_names, engine.fed_key[s.aggregator]),
                              (engine.shared_names, engine.fed_shared[s.aggregator])):
            delta = _crafted_delta(s.name, server, names, 3.0)
            s.params.update({n: server[n] + delta[n] for n in names})
    captured: dict[tuple[str, str], tuple[np.ndarray, float | None]] = {}
    orig = release_mod.ReleasePath._release

    def capture(self, round_id, group, destination, members, run, names, final, plan, dp, derived):  # noqa: ANN001
        out = orig(self, round_id, group, destination, members, run, names, final, plan, dp, derived)
        captured[(group, destination)] = (np.array(out.total, copy=True), dp.plan.sensitivity if dp is not None else None)
        return out

    monkeypatch.setattr(release_mod.ReleasePath, "_release", capture)
    monkeypatch.setattr(CentralGaussian, "add_noise", lambda self, total, plan, rng=None: np.asarray(total, float))
    engine.aggregate_key(1)
    engine.aggregate_shared(1)
    monkeypatch.undo()
    return {**captured, "n_shared": len(engine.shared_names)}


def test_adding_one_large_site_moves_every_release_by_at_most_its_sensitivity(tmp_path: Path, monkeypatch: Any) -> None:
    a_sites = {"eu": ["eu-a", "eu-b"], "us": ["us-a", "us-b"]}
    b_sites = {"eu": ["eu-a", "eu-b", "eu-big"], "us": ["us-a", "us-b"]}
    examples = {"eu-a": 8, "eu-b": 6, "us-a": 8, "us-b": 5, "eu-big": 80}
    a = _released(tmp_path / "a", a_sites, examples, monkeypatch)
    b = _released(tmp_path / "b", b_sites, examples, monkeypatch)
    assert set(a) - {"n_shared"} == set(b) - {"n_shared"} == {("key", "eu"), ("key", "us"), ("shared", "eu"), ("shared", "us"), ("shared", "world")}
    for key in (("key", "eu"), ("key", "us"), ("shared", "eu"), ("shared", "us")):
        (va, sens), (vb, sens_b) = a[key], b[key]
        assert sens is not None and sens == sens_b == pytest.approx(1.0)  # the clipping norm: weights are public
        change = float(np.linalg.norm(vb - va))
        assert change <= sens * (1 + 1e-9), f"{key}: adding one site moved the released sum by {change:.4g} > {sens:.4g}"
    # The root's release is post-processing of the noised federation sums: its weights are public
    # (uniform), the same in both worlds, never the federations' raw example counts.
    n_shared = a["n_shared"]
    w_a, w_b = a[("shared", "world")][0][-n_shared:], b[("shared", "world")][0][-n_shared:]
    assert np.array_equal(w_a, w_b), f"root weights depend on the data: {w_a[:1]} vs {w_b[:1]}"
