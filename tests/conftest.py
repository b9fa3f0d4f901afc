"""Shared fixtures (small worlds that train in seconds, the repo's paths) and the test lanes.

Lanes. Every test may carry markers saying what it needs (pyproject.toml lists them):
  e2e      trains a whole world or runs a study end to end
  network  real sockets or processes (gRPC/mTLS links, `world up`, `node start`)
  ray      a local Ray instance
  ckks     TenSEAL CKKS (key generation and ciphertexts are slow)
  slow     anything else that takes more than a few seconds
A bare `pytest` runs the fast lane (none of these; under 3 minutes on 2 cores). `pytest --all` (what CI
and the README's test command run) runs everything; `-m EXPR` selects by marker as usual, and tests named
on the command line (`pytest tests/test_node_link.py`) run whatever their lane. A whole
module's markers are in `MODULE_MARKERS` below (one place to see the lanes), single tests carry theirs.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


#: The ledger entry fields every backend (in process, Ray, nodes) records identically for one world and seed.
LEDGER_FIELDS = (
    "release_id", "round", "stream", "level", "source", "destination", "group", "tensor_names", "protocol",
    "cohort_size", "dropouts", "dp_level", "mechanism", "clipping_norm", "noise_multiplier", "sample_rate",
    "steps", "accountant", "delta", "epsilon", "epsilon_cumulative", "epsilon_budget", "policy_sha256",
    "base_hash",  # every node, deployed or simulated, records the same base model
)


HEAVY = ("e2e", "network", "ray", "ckks", "slow", "typer_matrix")

# test module -> markers every test in it carries
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    # real sockets or processes
    **dict.fromkeys((
        "test_node_link", "test_node_link_attacks", "test_node_peer_keys_attack", "test_node_base_hash",
        "test_node_site_restart", "test_node_load_smoke", "test_node_faults", "test_node_restart_root",
        "test_node_world_up", "test_node_world_up_dp", "test_node_momentum", "test_ledger_audit_world_up", "test_node_launcher",
        "test_ledger_receipts_link", "test_transport_client", "test_transport_caps", "test_transport_refusals",
        "test_transport_relay_attack", "test_fuzz_wire_decoders", "test_cli_world_up_dry_run", "test_flwr_coinstall",
    ), ("network",)),
    "test_node_ckks_link": ("network", "ckks"),
    "test_node_world_up_ckks": ("network", "ckks", "e2e"),
    # a local Ray instance
    "test_ray_backend": ("ray", "e2e"),
    "test_ray_sites_boundary": ("ray", "e2e"),
    # TenSEAL CKKS
    **dict.fromkeys((
        "test_secagg_ckks_round", "test_secagg_ckks_keys", "test_secagg_ckks_packing", "test_secagg_ckks_attacks",
        "test_secagg_ckks_fuzz", "test_aggregation_secure_attentive",
    ), ("ckks",)),
    # whole worlds trained, studies run
    **dict.fromkeys((
        "test_cli_simulate", "test_cli_resume", "test_cli_dp_feasibility", "test_compare", "test_federation_engine",
        "test_federation_privacy", "test_record_dp_engine", "test_simulate_protocols", "test_dp_strictest_budget",
        "test_dp_adaptive_clip", "test_dp_neighbour_sensitivity", "test_privacy_distributed_masking",
        "test_library_api", "test_example_real_text", "test_examples_dp_world", "test_benchmark_gpt2_smoke",
        "test_ledger_audit", "test_ledger_crash", "test_model_adapters", "test_model_pretrained",
    ), ("e2e",)),
    # many fresh interpreters each
    **dict.fromkeys(("test_cli_imports", "test_transport_codegen"), ("slow",)),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", default=False,
                     help="run every lane (e2e, network, ray, ckks, slow); without it a plain run is the fast lane")


# The heaviest modules, slowest first (per-test durations of `-n 2 --all` runs on 2026-12-03, after `world up`
# started forking its nodes and the Ray channel tests kept one actor per member).
# They run first so that the two workers finish together: xdist hands out work in collection order, and
# alphabetically they came last, leaving one worker alone with a 4-minute test at the end. Only the
# order depends on this list.
HEAVIEST_FIRST = (
    "test_ray_sites_boundary", "test_node_world_up", "test_node_world_up_ckks", "test_node_faults",
    "test_node_world_up_dp", "test_model_adapters_backends", "test_ray_backend", "test_node_momentum",
    "test_ledger_audit_world_up", "test_node_restart_root", "test_cli_resume", "test_flwr_coinstall",
    "test_secagg_ckks_channels", "test_secagg_masking_channels", "test_attack_member_sums", "test_dp_adaptive_clip",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {stem: i for i, stem in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order
    for item in items:
        for name in MODULE_MARKERS.get(item.path.stem, ()):
            item.add_marker(getattr(pytest.mark, name))
    # the fast lane applies to a bare run only: `--all`, a marker expression, or tests named on the command
    # line (files, folders, node ids) run what was asked for
    if config.getoption("--all") or config.getoption("markexpr") or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    fast, heavy = [], []
    for item in items:
        (heavy if any(item.get_closest_marker(m) for m in HEAVY) else fast).append(item)
    if heavy:
        config.hook.pytest_deselected(items=heavy)
        items[:] = fast


@pytest.fixture(scope="session")
def local_ray() -> Iterator[Any]:
    """One local Ray instance per test process, shared by every Ray test (starting one costs ~30 s; the
    suite used to start one per module). Skips where the ray extra is not installed."""
    ray = pytest.importorskip("ray", reason="Ray tests need the ray extra: pip install -e '.[test,ray]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def small_world(tmp_path: Path) -> Path:
    return write_world(tmp_path)


@pytest.fixture(scope="session")
def deployed_dp_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The DP local world (world.yaml: eu and us under user-level DP with masking), 2 rounds, run once by
    `world up` over real gRPC/mTLS processes: (world file, state folder). Shared by the tests that compare its
    ledgers with `simulate` and that audit them (one world up costs ~2 CPU-minutes); they only read it (the
    tamper tests copy it first). Mark users `xdist_group("deployed_dp_world")` so they share one process."""
    from nodeworld import small_world

    from worldlm_secure.node.world_up import world_up

    d = tmp_path_factory.mktemp("deployed-dp")
    world = small_world(d / "w", source="world.yaml", rounds=2)
    payload = world_up(world, d / "state", timeout=600, launch="fork")
    assert payload.get("failed_nodes") is None, payload.get("exit_codes")
    return world, d / "state"
