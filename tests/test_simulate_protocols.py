"""WorldLM under required secure aggregation (issues 4 and 5): masking and CKKS worlds run end to end,
really use the required protocol, and learn what the plain run learns.

The example worlds examples/world-{masking,ckks}.yaml must stay the default world with other policies.
The end-to-end runs use a small world (3 federations x 3 sites, so the examples' min_cohort 3 holds at
every level) with a ~25k-parameter Llama so CKKS finishes in seconds; benchmarks/simulate_protocols.py
measures the full default world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, write_world

from worldlm_secure.errors import PolicyError
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import SimulationResult, simulate
from worldlm_secure.federation.world import load_world
from worldlm_secure.policy import load_policy

EXAMPLES = REPO / "examples"
VARIANTS = {"masking": "world-masking.yaml", "ckks": "world-ckks.yaml"}

# Per-site perplexity tolerance against the plain run. Masking quantizes each value to 32 bits over
# [-1, 1] (step 4.7e-10, stochastic rounding) and ckks-open to 32 value bits (step 2.3e-10); WorldLM's
# smallest released update entries are ~1e-7, so sums change by <~1e-3 relative at worst, and after two
# rounds per-site perplexities differ by ~2.5e-7 (masking) and ~5e-7 (CKKS) relative (measured on this
# world). 1e-4 leaves a 200x margin (masking's rounding is random from run to run), is 200x tighter than
# the issues' 2%, and catches coarse quantization: CKKS at the schema's default 20 value bits (step
# ~1e-6, which zeroes most late key-layer updates) moves sites here by ~5e-4 and fails.
SITE_RTOL = 1e-4


def _without_policies(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc.pop("name")
    doc["nodes"] = [{k: v for k, v in node.items() if k != "policy"} for node in doc["nodes"]]
    return doc


@pytest.mark.parametrize("protocol", sorted(VARIANTS))
def test_example_world_is_the_default_world_with_other_policies(protocol: str) -> None:
    base = yaml.safe_load((EXAMPLES / "world.yaml").read_text())
    variant = yaml.safe_load((EXAMPLES / VARIANTS[protocol]).read_text())
    assert _without_policies(variant) == _without_policies(base)
    assert {n["policy"] for n in variant["nodes"]} == {f"policies/{protocol}-open.yaml"}
    world = load_world(EXAMPLES / VARIANTS[protocol])  # check_world: every round has a plan
    for node in world.nodes.values():
        sa = load_policy(node.policy_path).secure_aggregation
        assert tuple(sa.protocol) == (protocol,)
        assert sa.min_cohort <= min(len(n.children) for n in world.nodes.values() if n.children)


# --- end to end on a small world ------------------------------------------------------------------
_SMALL_LLAMA = {
    "model_type": "llama",
    "vocab_size": 64,  # conftest's synthetic corpus
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
    "tie_word_embeddings": False,
}


def _small_world(folder: Path, protocol: str, *, feds: int = 3, sites: int = 3) -> Path:
    """conftest's small world under the example policy for ``protocol`` ('none': research-open)."""
    folder.mkdir(parents=True, exist_ok=True)
    policy = "research-open.yaml"
    if protocol != "none":
        write_world(folder)  # creates folder/policies/ with the repository's policies
        policy = f"{protocol}-open.yaml"
        text = (EXAMPLES / "policies" / policy).read_text()
        assert "extends: ../../policies/research-open.yaml" in text
        (folder / "policies" / policy).write_text(text.replace("../../policies/research-open.yaml", "research-open.yaml"))
    world = write_world(folder, policy=policy, feds=feds, sites=sites, rounds=2)
    config = folder / "model"
    config.mkdir(exist_ok=True)
    (config / "config.json").write_text(json.dumps(_SMALL_LLAMA))
    text = world.read_text()
    assert "model: {arch: llama, size: tiny}" in text
    world.write_text(text.replace("model: {arch: llama, size: tiny}", f"model: {{arch: llama, config: {config}}}"))
    return world


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimulationResult]:
    root = tmp_path_factory.mktemp("protocols")
    return {
        p: simulate(_small_world(root / p, p), methods=[METHODS["worldlm"]], device="cpu")
        for p in ("none", "masking", "ckks")
    }


@pytest.mark.slow
def test_plain_world_runs_plain(runs: dict[str, SimulationResult]) -> None:
    stats = runs["none"].methods["worldlm"].stats
    assert set(stats.by_protocol) == {"none"}  # research-open prefers none: the baseline is unprotected


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_required_protocol_is_the_one_used(runs: dict[str, SimulationResult], protocol: str) -> None:
    plain = runs["none"].methods["worldlm"].stats
    stats = runs[protocol].methods["worldlm"].stats
    assert stats.by_protocol == {protocol: plain.by_protocol["none"]}  # every aggregation, none plain
    assert stats.releases == plain.releases
    assert stats.bytes_up != plain.bytes_up  # real protected messages, not float64 vectors
    if protocol == "ckks":
        assert stats.bytes_up > plain.bytes_up  # ciphertexts are larger than the plaintext
    assert stats.protect_seconds > 0
    assert stats.clipped_fraction_max == 0.0  # nothing WorldLM releases falls outside [-1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_protected_run_learns_what_the_plain_run_learns(runs: dict[str, SimulationResult], protocol: str) -> None:
    plain = runs["none"].methods["worldlm"]
    got = runs[protocol].methods["worldlm"]
    assert set(got.sites) == set(plain.sites) and len(got.sites) == 9
    for site, ppl in plain.sites.items():
        assert got.sites[site] == pytest.approx(ppl, rel=SITE_RTOL), site
    assert [r.round for r in got.rounds] == [r.round for r in plain.rounds]
    # and both runs learned (agreement of two frozen models would prove nothing)
    for run in (plain, got):
        assert run.rounds[-1].mean_val_ppl < run.rounds[0].mean_val_ppl


@pytest.mark.parametrize("protocol", ["masking", "ckks"])
def test_min_cohort_above_a_federations_size_refuses_to_start(tmp_path: Path, protocol: str) -> None:
    world = _small_world(tmp_path, protocol, feds=3, sites=2)  # min_cohort 3, two sites per federation
    with pytest.raises(PolicyError) as err:
        load_world(world)
    msg = str(err.value)
    assert f"{protocol}-open.yaml" in msg and "min_cohort" in msg and "\n" not in msg
