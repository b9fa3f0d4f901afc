"""Record-level DP (Opacus DP-SGD inside each site) through the simulation engine.

A record-level world trains every site with Poisson-sampled, per-sample-clipped, noised SGD; its
ledgers charge the DP-SGD steps on each site's `SITE/record` stream and verify; a budget that cannot
afford the next round stops training before it trains; models Opacus cannot handle are refused.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import POLICIES, write_world
from opacus.accountants import RDPAccountant

from worldlm_secure.errors import PolicyError
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.ledger import read_entries, verify
from worldlm_secure.privacy import derive_noise_multiplier, epsilon
from worldlm_secure.privacy.record import UnsupportedModelError
from worldlm_secure.privacy.record_stream import RecordDPParams
from worldlm_secure.train import LocalTrainer, TrainConfig
from worldlm_secure.train.private import PrivateTrainer

transformers = pytest.importorskip("transformers")

SMALL_LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": False,
}
# conftest's small world: 2048 training tokens per site in sequences of 32, batches of 4, 2 local steps.
RECORDS, BATCH, LOCAL_STEPS, DELTA = 2048 // 32, 4, 2, 1e-5
Q = BATCH / RECORDS


def record_world(folder: Path, *, rounds: int = 2, budget: float = 8.0, noise: str = "auto") -> Path:
    """conftest's small world (2 federations x 2 sites) with every node under a record-level policy."""
    folder.mkdir(parents=True, exist_ok=True)
    write_world(folder)  # creates folder/policies/ with the repository's policies
    (folder / "policies" / "record.yaml").write_text(
        textwrap.dedent(
            f"""\
            apiVersion: worldlm-secure/v1
            kind: JurisdictionPolicy
            name: record
            jurisdiction: test
            extends: research-open.yaml
            differential_privacy:
              level: record
              epsilon_budget: {budget!r}
              delta: {DELTA!r}
              record: {{max_grad_norm: 1.0, noise_multiplier: {noise}}}
            """
        )
    )
    world = write_world(folder, policy="record.yaml", rounds=rounds)
    return _small_model(world)


def _small_model(world: Path) -> Path:
    config = world.parent / "model"
    config.mkdir(exist_ok=True)
    (config / "config.json").write_text(json.dumps(SMALL_LLAMA))
    text = world.read_text()
    assert "model: {arch: llama, size: tiny}" in text
    world.write_text(text.replace("model: {arch: llama, size: tiny}", f"model: {{arch: llama, config: {config}}}"))
    return world


def _opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    from worldlm_secure.privacy.accountant import RDP_ORDERS  # integer orders (protocols/dp.md §4)

    acc = RDPAccountant()
    acc.history = [(z, q, steps)]
    return float(acc.get_epsilon(delta=delta, alphas=list(RDP_ORDERS)))


def test_record_level_world_trains_with_dp_sgd_and_its_ledgers_verify(tmp_path: Path) -> None:
    rounds = 2
    out = tmp_path / "ledgers"
    result = simulate(record_world(tmp_path, rounds=rounds), methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    m = result.methods["worldlm"]
    assert m.stopped is None and [r.round for r in m.rounds] == [1, 2]
    z = derive_noise_multiplier(8.0, DELTA, Q, rounds * LOCAL_STEPS)  # auto: derived once for the planned steps
    sites = [f"f{f}-s{s}" for f in range(2) for s in range(2)]
    for site in sites:
        report = verify(out / f"{site}.sqlite")
        assert report.ok, report.summary()
        entries = read_entries(out / f"{site}.sqlite")
        assert {e.group for e in entries} == {"key", "shared"} and len(entries) == 2 * rounds
        assert all(
            (e.stream, e.dp_level, e.mechanism, e.clipping_norm, e.accountant) == (f"{site}/record", "record", "dp_sgd", 1.0, "rdp")
            for e in entries
        )
        assert all(e.sample_rate == pytest.approx(Q) and e.noise_multiplier == pytest.approx(z) for e in entries)
        # the steps of a round are charged on its first release, the second release of that model is ε 0
        assert [e.steps for e in entries] == [LOCAL_STEPS, 0] * rounds
        assert sum(e.steps for e in entries) == rounds * LOCAL_STEPS
        assert [e.epsilon == 0.0 for e in entries] == [False, True] * rounds
        last = entries[-1]
        assert last.epsilon_cumulative == pytest.approx(_opacus_epsilon(z, Q, rounds * LOCAL_STEPS, DELTA), rel=1e-9)
        assert last.epsilon_cumulative <= 8.0 == last.epsilon_budget
        assert m.stats.epsilon[f"{site}/record"] == pytest.approx(last.epsilon_cumulative)
    for fed in ("f0", "f1"):  # federations release only what they computed from DP-SGD-trained sites
        fed_entries = read_entries(out / f"{fed}.sqlite")
        assert fed_entries and all(e.mechanism == "post_processing" and e.dp_level == "record" for e in fed_entries)
        assert verify(out / f"{fed}.sqlite").ok


def _trainer(max_grad_norm: float, noise_multiplier: float) -> tuple[PrivateTrainer, torch.nn.Module, RecordDPParams]:
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL_LLAMA))
    cfg = TrainConfig(local_steps=4, batch_size=BATCH, lr=0.0, warmup_steps=0, lr_schedule="constant")
    private = PrivateTrainer(LocalTrainer(model, cfg, torch.device("cpu"), total_steps=4))
    params = RecordDPParams(noise_multiplier, max_grad_norm, Q, BATCH, DELTA, 8.0, "rdp")
    return private, model, params


def _grad_norms(private: PrivateTrainer, model: torch.nn.Module, params: RecordDPParams) -> list[float]:
    """The norm of the gradient the DP optimizer hands to the site's optimizer, at every step."""
    norms: list[float] = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.register_step_pre_hook(
        lambda o, a, k: norms.append(float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))))
    )
    data = torch.randint(0, 64, (RECORDS, 32), generator=torch.Generator().manual_seed(0))  # data, not a secret
    loss, steps = private.train_round(data, opt, 0, params)
    assert steps == 4 and len(norms) == 4
    return norms


def test_each_sequence_gradient_is_clipped_and_noise_of_std_z_times_c_is_added() -> None:
    # Noise ~0 and a tiny clip: the averaged gradient is at most C * (drawn batch) / (expected batch); at
    # this model's initialisation an unclipped per-sequence gradient has norm ~1, i.e. 10^4 times more.
    c = 1e-4
    private, model, params = _trainer(c, 1e-9)
    assert max(_grad_norms(private, model, params)) <= c * RECORDS / BATCH
    # A huge noise multiplier: the gradient is noise of std z*C/B per coordinate, so its norm is ~z*C*sqrt(d)/B.
    z, d = 1e3, sum(p.numel() for p in model.parameters())
    private, model, params = _trainer(1.0, z)
    expected = z * 1.0 * math.sqrt(d) / BATCH
    assert all(0.9 * expected < n < 1.1 * expected for n in _grad_norms(private, model, params))
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())  # nothing outlives the round


def test_a_budget_the_next_round_cannot_afford_stops_training_before_it_trains(tmp_path: Path) -> None:
    z = 1.0
    one, two = epsilon(z, Q, LOCAL_STEPS, DELTA), epsilon(z, Q, 2 * LOCAL_STEPS, DELTA)
    budget = (one + two) / 2  # round 1 fits, round 2 does not
    out = tmp_path / "ledgers"
    world = record_world(tmp_path, rounds=3, budget=round(budget, 6), noise=repr(z))
    result = simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    m = result.methods["worldlm"]
    assert m.stopped is not None and m.stopped.startswith("round 2:") and "training refused" in m.stopped
    assert "budget" in m.stopped and "/record" in m.stopped
    assert [r.round for r in m.rounds] == [1, 2] and math.isnan(m.rounds[-1].train_loss)  # round 2 did not train
    for site in ("f0-s0", "f0-s1", "f1-s0", "f1-s1"):
        entries = read_entries(out / f"{site}.sqlite")
        assert [e.round for e in entries] == [1, 1]  # nothing of round 2 was released
        assert sum(e.steps for e in entries) == LOCAL_STEPS
        assert entries[-1].epsilon_cumulative == pytest.approx(one) and one <= entries[-1].epsilon_budget
        assert verify(out / f"{site}.sqlite").ok


def test_a_record_budget_auto_cannot_meet_is_refused_naming_the_policy_field(tmp_path: Path) -> None:
    # RDP cannot certify ε below ~log(1/δ)/(max order - 1) ≈ 0.045 at δ = 1e-5, whatever the noise.
    world = record_world(tmp_path, budget=0.01)
    with pytest.raises(PolicyError, match=r"record\.yaml.* differential_privacy\.record\.epsilon_budget"):
        simulate(world, methods=[METHODS["worldlm"]], device="cpu", ledger_root=tmp_path / "ledgers")
    assert not list((tmp_path / "ledgers").glob("*.sqlite")) if (tmp_path / "ledgers").exists() else True


def test_a_model_opacus_cannot_train_privately_is_refused_not_trained_without_dp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worldlm_secure.federation.engine as engine

    built = engine.build_model

    def with_batchnorm(spec, *, seed=0):  # type: ignore[no-untyped-def]
        model = built(spec, seed=seed)
        model.model.norm.add_module("bn", torch.nn.BatchNorm1d(4))  # a local (never released) layer
        return model

    monkeypatch.setattr(engine, "build_model", with_batchnorm)
    trained: list[str] = []
    with pytest.raises(UnsupportedModelError, match="Opacus cannot train privately"):
        simulate(record_world(tmp_path), methods=[METHODS["worldlm"]], device="cpu",
                 ledger_root=tmp_path / "ledgers", on_site=lambda s, r: trained.append(s))
    assert trained == []  # refused before any site trained
    # the same model under a non-DP policy trains: the refusal is record-level DP's, not the model's
    (tmp_path / "plain").mkdir()
    plain = _small_model(write_world(tmp_path / "plain", rounds=1))
    assert simulate(plain, methods=[METHODS["worldlm"]], device="cpu").methods["worldlm"].stopped is None


def test_healthcare_policy_runs_user_and_record_level_dp_and_records_both_streams(tmp_path: Path) -> None:
    """policies/healthcare.yaml asks for both: DP-SGD in each hospital and user-level noise on every sum (CKKS)."""
    pol = tmp_path / "policies"
    pol.mkdir()
    for p in POLICIES.glob("*.yaml"):
        (pol / p.name).write_text(p.read_text())
    nodes = ["  - {name: world, policy: policies/research-open.yaml}"]
    for fed, policy in (("health", "healthcare.yaml"), ("eu", "research-open.yaml"), ("us", "research-open.yaml")):
        nodes.append(f"  - {{name: {fed}, parent: world, policy: policies/{policy}}}")
        nodes += [f"  - {{name: {fed}-{s}, parent: {fed}, policy: policies/{policy}}}" for s in "abc"]
    world = tmp_path / "world.yaml"
    world.write_text(
        "name: health-world\nmodel: {arch: llama, size: tiny}\n"
        "data:\n  synthetic: {vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 512}\n"
        f"schedule: {{rounds: 1, local_steps: {LOCAL_STEPS}, batch_size: {BATCH}, seq_len: 32, warmup_steps: 1}}\n"
        "nodes:\n" + "\n".join(nodes) + "\n"
    )
    out = tmp_path / "ledgers"
    result = simulate(_small_model(world), methods=[METHODS["worldlm"]], device="cpu", ledger_root=out)
    assert result.methods["worldlm"].stopped is None
    entries = read_entries(out / "health-a.sqlite")
    assert verify(out / "health-a.sqlite").ok
    by_stream: dict[str, list] = {}
    for e in entries:
        by_stream.setdefault(e.stream, []).append(e)
    assert set(by_stream) == {"health-a/user", "health-a/record"}  # one entry per charged stream
    assert all(e.mechanism == "central_gaussian" and e.protocol == "ckks" for e in by_stream["health-a/user"])
    assert all(e.mechanism == "dp_sgd" and e.release_id.endswith(":record") for e in by_stream["health-a/record"])
    assert sum(e.steps for e in by_stream["health-a/record"]) == LOCAL_STEPS
    assert all(e.dp_level == "none" for e in read_entries(out / "eu-a.sqlite"))  # research-open sites: no DP
