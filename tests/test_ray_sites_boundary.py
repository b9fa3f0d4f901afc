"""Sites as Ray actors doing their own member side: same results as in process, and the driver (the
aggregator) only ever receives what would cross the network.

Every Ray run starts one fresh actor process per site (each imports torch and transformers), so the
worlds here are run once per module and several tests assert on the same run: the masked world
(`masked_runs`: same results as in process, and what the driver received), the record-level DP-SGD
world (`record_dp_runs`: DP-SGD in the actors, and the plain-world control of the leak instrument),
the CKKS world (`ckks_runs`: same results, what the driver received, key epochs and ledgers) and one
run per protocol in which a member fails its step once per round (`dropout_runs`).

Needs the `ray` extra; skipped, saying so, where Ray is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import write_world
from worldlm_secure.federation.methods import METHODS

ray = pytest.importorskip("ray", reason="Ray backend test needs the ray extra: pip install -e '.[test,ray]'")

# its module-scoped runs are shared by several tests: keep them in one xdist process (--dist loadgroup)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_ray_sites_boundary")]

SITES = ("f0-s0", "f0-s1", "f1-s0", "f1-s1")

MASKED = (
    "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: masked\nextends: research-open.yaml\n"
    "secure_aggregation: {protocol: [masking], min_cohort: 1, max_dropout_fraction: 0.49, masking: {threshold: 0.51}}\n"
)
DISTRIBUTED = (
    "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: dist\nextends: research-open.yaml\n"
    "secure_aggregation: {protocol: [masking], min_cohort: 1, max_dropout_fraction: 0.49, masking: {threshold: 0.51}}\n"
    "differential_privacy: {level: user, epsilon_budget: 50.0, delta: 1.0e-5, clipping_norm: 1.0,\n"
    "  mechanism: [distributed_discrete_gaussian]}\n"
)
# record-level DP-SGD (Opacus) in every site; no secure aggregation (research-open's first protocol: none)
RECORD_DP = (
    "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: rdp\nextends: research-open.yaml\n"
    "differential_privacy: {level: record, epsilon_budget: 8.0, delta: 1.0e-5, record: {max_grad_norm: 1.0}}\n"
)
CKKS = (
    "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: ckks\nextends: research-open.yaml\n"
    "secure_aggregation: {protocol: [ckks], min_cohort: 1, max_dropout_fraction: 0.5}\n"
)
# a fresh CKKS key epoch every 2 rounds: over 3 rounds the epochs are rounds 1 | 2, 3
CKKS_ROTATING = CKKS.replace("max_dropout_fraction: 0.5}", "max_dropout_fraction: 0.5, ckks: {rotate_every_rounds: 2}}")


def _world(folder: Path, policy_text: str | None, rounds: int = 2, feds: int = 2) -> Any:
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import load_world_data
    from worldlm_secure.federation.world import load_world

    folder.mkdir()
    path = write_world(folder, rounds=rounds, feds=feds)
    if policy_text is not None:
        (folder / "policies" / "custom.yaml").write_text(policy_text)
        path.write_text(path.read_text().replace("policies/research-open.yaml", "policies/custom.yaml"))
    world = load_world(path)
    settings = settings_for(world, rounds=rounds, device="cpu")
    data, vocab = load_world_data(world, settings)
    return world, settings, data, vocab


def _run(engine: Any) -> Any:
    try:
        return engine.run()
    finally:
        if hasattr(engine, "shutdown"):
            engine.shutdown()


def _leaks(value: Any) -> list[str]:
    """Float arrays or tensors anywhere in ``value`` (what a member vector or model would look like)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return [f"{type(value).__name__}{tuple(value.shape)}"]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaks(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaks(v)]
    return []


@dataclasses.dataclass
class Instrumented:
    """One Ray run with the driver's entry points instrumented, and its in-process twin (if run)."""

    received: list[Any]  # everything the driver took from a site actor (`RayEngine._get`)
    wire: list[tuple[str, str, type]]  # (member, step, type of what arrived) at `masking_round.receive`
    masked_seen: list[type]  # what the aggregator's collect_masked was given
    engine: Any  # the RayEngine (shut down; its release path, identities and timings remain)
    remote: Any  # its result
    folder: Path  # ledgers: a/ in process, b/ on Ray
    local_engine: Any = None
    local: Any = None


def _instrumented_run(world: Any, settings: Any, data: Any, vocab: int, method: str = "worldlm",
                      ledger_dir: Path | None = None) -> Instrumented:
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.secagg import masking_round
    from worldlm_secure.secagg.masking import MaskingAggregator

    received: list[Any] = []
    wire: list[tuple[str, str, type]] = []
    masked_seen: list[type] = []
    real_get, real_receive, real_collect = RayEngine._get, masking_round.receive, MaskingAggregator.collect_masked

    def get(self: Any, refs: Any) -> Any:
        out = real_get(self, refs)
        received.append(out)
        return out

    def receive(member: str, step: str, data: object) -> Any:
        wire.append((member, step, type(data)))
        return real_receive(member, step, data)

    def collect(self: Any, inputs: Any) -> Any:
        masked_seen.extend(type(m) for m in inputs)
        return real_collect(self, inputs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RayEngine, "_get", get)
        mp.setattr(masking_round, "receive", receive)
        mp.setattr(MaskingAggregator, "collect_masked", collect)
        engine = RayEngine(world, METHODS[method], data, settings, vocab_size=vocab, ledger_dir=ledger_dir)
        result = _run(engine)
    return Instrumented(received, wire, masked_seen, engine, result, ledger_dir.parent if ledger_dir else Path())


def _in_process_and_on_ray(folder: Path, policy: str | None, method: str, rounds: int, feds: int = 2) -> Instrumented:
    """The world (``feds`` federations of 2 sites) under ``policy`` run by ``method`` in process (ledgers in a/),
    then instrumented on Ray (b/)."""
    from worldlm_secure.federation.engine import Engine

    world, settings, data, vocab = _world(folder / "world", policy, rounds=rounds, feds=feds)
    local_engine = Engine(world, METHODS[method], data, settings, vocab_size=vocab, ledger_dir=folder / "a")
    local = _run(local_engine)
    run = _instrumented_run(world, settings, data, vocab, method, ledger_dir=folder / "b")
    run.local_engine, run.local = local_engine, local
    return run


@pytest.fixture(scope="module")
def masked_runs(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> Instrumented:
    """The masked world (WorldLM, 2 rounds) in process and, instrumented, on Ray."""
    return _in_process_and_on_ray(tmp_path_factory.mktemp("masked"), MASKED, "worldlm", rounds=2)


@pytest.fixture(scope="module")
def record_dp_runs(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> Instrumented:
    """The record-level DP-SGD world (one federation of 2 sites, FedAvg, 2 rounds, plain sums) in process and,
    instrumented, on Ray. (Two sites suffice: each site's DP-SGD and its charges are its own.)"""
    return _in_process_and_on_ray(tmp_path_factory.mktemp("rdp"), RECORD_DP, "fedavg", rounds=2, feds=1)


@pytest.fixture(scope="module")
def ckks_runs(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> Instrumented:
    """The CKKS world with a key epoch every 2 rounds (WorldLM, 3 rounds) in process and, instrumented, on Ray."""
    return _in_process_and_on_ray(tmp_path_factory.mktemp("ckks"), CKKS_ROTATING, "worldlm", rounds=3)


def test_masked_world_same_per_site_ppl_as_in_process(masked_runs: Instrumented) -> None:
    local, remote, folder = masked_runs.local, masked_runs.remote, masked_runs.folder
    assert set(remote.sites) == set(local.sites) == set(SITES)
    for site, ppl in local.sites.items():
        # masking's stochastic rounding draws from a CSPRNG: two masked runs differ by quantization error only
        assert remote.sites[site] == pytest.approx(ppl, rel=1e-5), site
    assert remote.stats.by_protocol == local.stats.by_protocol and "masking" in remote.stats.by_protocol
    assert remote.stats.bytes_up == local.stats.bytes_up  # the same messages, serialized to the same sizes
    assert remote.stats.bytes_down == local.stats.bytes_down
    assert sorted(p.name for p in (folder / "b").glob("*.sqlite")) == sorted(p.name for p in (folder / "a").glob("*.sqlite"))


def test_driver_never_receives_an_unprotected_member_vector(masked_runs: Instrumented, record_dp_runs: Instrumented) -> None:
    from worldlm_secure.secagg.masking_messages import MaskedInput

    received, wire, masked_seen = masked_runs.received, masked_runs.wire, masked_runs.masked_seen
    assert received and not [x for r in received for x in _leaks(r)]  # no vector, no tensor: bytes and numbers
    sites = set(SITES)
    # every channel's answers enter through the one `masking_round.receive`: the sites' (actors) and the
    # federations' own releases to the root (run in the driver, members f0 and f1)
    assert {m for m, _, _ in wire} == sites | {"f0", "f1"}
    inputs = [(m, t) for m, step, t in wire if step == "masked_input" and m in sites]
    assert {m for m, _ in inputs} == sites and all(t is bytes for _, t in inputs)
    assert all(t is bytes for _, _, t in wire)
    assert masked_seen and set(masked_seen) == {MaskedInput}  # the aggregator saw masked inputs only
    rounds = masked_runs.engine.settings.rounds
    assert rounds == 2 and len(inputs) == rounds * 2 * len(sites)  # key and shared: one masked input per site per release

    # The same instrument on a plain (protocol none) world sees the sites' vectors: it would catch a leak.
    assert not record_dp_runs.wire and [x for r in record_dp_runs.received for x in _leaks(r)]


def test_sites_train_in_their_actors_with_record_level_dp_sgd(record_dp_runs: Instrumented) -> None:
    from worldlm_secure.federation.engine import Engine
    from worldlm_secure.ledger import Ledger
    from worldlm_secure.ledger.entry import DP_SGD

    engine, res, local, local_res = (record_dp_runs.engine, record_dp_runs.remote, record_dp_runs.local_engine,
                                     record_dp_runs.local)
    settings, folder = engine.settings, record_dp_runs.folder
    sites = ("f0-s0", "f0-s1")
    assert set(engine.site_seconds) == set(sites)  # timed inside each site's actor
    assert all(t > 0 for t in engine.site_seconds.values())
    assert res.stopped is None and all(p == p for p in res.sites.values())  # finite: DP-SGD trained in the actors

    def charges(sub: str, eng: Engine, site: str) -> list[tuple]:
        entries = Ledger(folder / sub / f"{site}.sqlite", eng.release.identities[site]).entries()
        return [(e.release_id, e.mechanism, e.stream, e.steps, e.sample_rate, e.noise_multiplier, e.epsilon_cumulative)
                for e in entries]

    for site in sites:
        mine = charges("b", engine, site)
        # the steps the actor took are charged on its SITE/record stream exactly as in process
        assert mine == charges("a", local, site), site
        assert [m[1] for m in mine] == [DP_SGD, DP_SGD] and mine[0][3] == settings.train.local_steps
        assert mine[1][6] > mine[0][6] > 0
    # DP-SGD's sampling and noise come from each actor's CSPRNG: a different draw than in process
    assert any(res.sites[s] != local_res.sites[s] for s in res.sites)


def test_distributed_noise_is_added_in_the_site_actor(local_ray: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worldlm_secure.federation import ray_channel
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.ledger import Ledger
    from worldlm_secure.secagg.masking_round import MaskingSum

    world, settings, data, vocab = _world(tmp_path / "dist", DISTRIBUTED, rounds=1)
    sites = set(SITES)
    routed: list[tuple[frozenset, bool]] = []  # (members, noise handed to the actors) per site release
    in_driver: list[set] = []  # members of masked rounds run entirely in the driver
    real_masked, real_round = ray_channel.masked_sum, MaskingSum.run_round

    def masked(ray_: Any, actors: Any, *args: Any) -> Any:
        routed.append((frozenset(actors), args[4] is not None))
        return real_masked(ray_, actors, *args)

    def run_round(self: Any, round_id: int, inputs: Any, **kw: Any) -> Any:
        in_driver.append({m.member for m in inputs})
        return real_round(self, round_id, inputs, **kw)

    monkeypatch.setattr(ray_channel, "masked_sum", masked)
    monkeypatch.setattr(MaskingSum, "run_round", run_round)
    engine = RayEngine(world, METHODS["worldlm"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "led")
    res = _run(engine)
    # every site release (key, shared; 2 federations) went to the actors with the noise shares to add there
    assert sorted(sorted(m) for m, _ in routed) == sorted([["f0-s0", "f0-s1"], ["f1-s0", "f1-s1"]] * 2)
    assert all(noised for _, noised in routed)
    assert not any(m & sites for m in in_driver)  # only the federations' own (derived) releases run in the driver
    assert np.isfinite(res.mean_val_ppl)
    for site in sorted(sites):
        entries = Ledger(tmp_path / "led" / f"{site}.sqlite", engine.release.identities[site]).entries()
        assert len(entries) == 2 and {e.mechanism for e in entries} == {"distributed_discrete_gaussian"}
        assert all(e.protocol == "masking" for e in entries)


def _ckks_message(x: Any) -> Any:
    from worldlm_secure.errors import SecAggError
    from worldlm_secure.secagg import ckks_messages as wire

    if not isinstance(x, bytes):
        return None
    try:
        return wire.decode(x)
    except SecAggError:  # other bytes: e.g. the identity public keys
        return None


def test_ckks_world_encrypts_in_the_site_actors(ckks_runs: Instrumented) -> None:
    """Members encrypt in their actors, key holders decrypt in theirs, the driver only adds ciphertexts."""
    import tenseal as ts

    from worldlm_secure.secagg import ckks_messages as wire

    received, wire_log, local, remote = ckks_runs.received, ckks_runs.wire, ckks_runs.local, ckks_runs.remote
    assert received and not [x for r in received for x in _leaks(r)]  # bytes and numbers only, never a vector
    assert not wire_log  # no masking messages: this world is CKKS only
    assert remote.stats.by_protocol == local.stats.by_protocol and set(local.stats.by_protocol) == {"ckks"}
    for site, ppl in local.sites.items():
        # the holders decrypt exact integer sums: same quantized sum as in process, so the same model
        assert remote.sites[site] == pytest.approx(ppl, rel=1e-12), site
    assert remote.stats.bytes_up == pytest.approx(local.stats.bytes_up, rel=1e-3)  # ciphertext sizes vary slightly

    # What the driver received of the key epochs: the public context (no secret key) and sealed keys only.
    messages = [m for r in received for x in (r if isinstance(r, list) else [r]) if (m := _ckks_message(x)) is not None]
    epochs = [wire.epoch_from(m) for m in messages if m.tag == wire.EPOCH_KEYS]
    assert epochs and all(not ts.context_from(k.public_context).is_private() for k in epochs)
    contributions = [m for m in messages if m.tag == wire.CONTRIBUTION]
    rounds = ckks_runs.engine.settings.rounds
    # rounds x (key, shared) x 4 sites, each a signed ciphertext message
    assert rounds == 3 and len(contributions) == rounds * 2 * 4


def test_ckks_on_ray_keeps_key_epochs_and_ledgers(ckks_runs: Instrumented) -> None:
    from worldlm_secure.ledger import Ledger

    engine = ckks_runs.engine
    for site in SITES:
        entries = Ledger(ckks_runs.folder / "b" / f"{site}.sqlite", engine.release.identities[site]).entries()
        assert [e.protocol for e in entries] == ["ckks"] * 3 * 2  # 3 rounds x (key, shared)
        by_round: dict[int, set[str]] = {}
        for e in entries:
            by_round.setdefault(e.round, set()).add(e.key_id)
        assert sorted(by_round) == [1, 2, 3] and all(len(k) == 1 for k in by_round.values()), (site, by_round)
        ids = [next(iter(by_round[r])) for r in (1, 2, 3)]
        # rounds 1 | 2, 3: a key epoch is round // rotate_every_rounds, as in process
        assert ids[0] != ids[1] and ids[1] == ids[2] and all(ids), (site, ids)


def _forge(mp: pytest.MonkeyPatch, module: Any, step: str, victim: str, answers: dict[int, bool | str],
           fired: list[int], engine: dict[str, Any]) -> None:
    """Once per round ``r`` in ``answers``, at ``step``: replace what the aggregator sends ``victim`` by garbage
    (``answers[r]`` False: its step then fails), or (True) flip one byte in the middle of what ``victim``
    sends back (a message tampered in transit), or (``"empty"``) act as a malicious driver: send ``victim``
    a share delivery with no shares, validly signed with the aggregator identity the driver holds
    (``engine["engine"]``). ``fired``: the rounds where it did."""
    real = module.run_step

    def run_step(ray_: Any, actors: Any, name: str, args: Any, log_: Any, round_id: int, **kw: Any) -> Any:
        hit = name == step and victim in args and round_id in answers and round_id not in fired
        answer = answers.get(round_id)
        if hit and answer == "empty":
            from worldlm_secure.secagg.masking_messages import ShareDelivery

            fired.append(round_id)
            identity = engine["engine"].aggregator_identity(engine["engine"].root)  # FedAvg: the root aggregates all
            empty = dataclasses.replace(ShareDelivery.from_bytes(args[victim][0]), shares=(), signature=b"")
            empty = dataclasses.replace(empty, signature=identity.sign(empty.signed_payload()))
            args = {**args, victim: (empty.to_bytes(),)}
        elif hit and not answer:
            fired.append(round_id)
            args = {**args, victim: tuple(b"\x00forged" if isinstance(a, bytes) else None for a in args[victim])}
        out = real(ray_, actors, name, args, log_, round_id, **kw)
        if hit and answer is True:
            fired.append(round_id)
            data = bytearray(out[victim])
            data[len(data) // 2] ^= 0x01
            out[victim] = bytes(data)
        return out

    mp.setattr(module, "run_step", run_step)


# protocol -> the step forged, and what is forged there in round 1, round 2, ... of the protocol's one run
DROPOUTS: dict[str, tuple[str, tuple[bool | str, ...]]] = {
    "masking": ("masked_input", (False, "empty")),
    "ckks": ("ckks_protect", (False, True)),
}


@dataclasses.dataclass
class DropoutRun:
    engine: Any
    result: Any
    fired: list[int]  # rounds where the forgery happened
    log: dict[int, str]  # round -> warnings logged during it ("worldlm_secure" loggers)
    ledgers: Path


class _RoundLog(logging.Handler):
    """Warnings logged in the driver, by the round (``current[0]``) during which they were logged."""

    def __init__(self, current: list[int]) -> None:
        super().__init__(logging.WARNING)
        self.current = current
        self.text: dict[int, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        r = self.current[0]
        self.text[r] = self.text.get(r, "") + record.getMessage() + "\n"


def _dropout_run(folder: Path, protocol: str) -> DropoutRun:
    from worldlm_secure.federation import ray_ckks, ray_channel
    from worldlm_secure.federation.ray_sites import RayEngine

    step, answers = DROPOUTS[protocol]
    world, settings, data, vocab = _world(folder / "world", MASKED if protocol == "masking" else CKKS,
                                          rounds=len(answers))
    fired: list[int] = []
    holder: dict[str, Any] = {}
    current = [0]
    handler = _RoundLog(current)
    real_train = RayEngine.train_sites

    def train(self: Any, round_id: int) -> float:  # marks which round the warnings that follow belong to
        current[0] = round_id
        return real_train(self, round_id)

    with pytest.MonkeyPatch.context() as mp:
        _forge(mp, ray_channel if protocol == "masking" else ray_ckks, step, "f0-s1",
               dict(enumerate(answers, start=1)), fired, holder)
        mp.setattr(RayEngine, "train_sites", train)
        engine = RayEngine(world, METHODS["fedavg"], data, settings, vocab_size=vocab, ledger_dir=folder / "led")
        holder["engine"] = engine
        logging.getLogger().addHandler(handler)
        try:
            result = _run(engine)
        finally:
            logging.getLogger().removeHandler(handler)
    return DropoutRun(engine, result, fired, handler.text, folder / "led")


@pytest.fixture(scope="module")
def dropout_runs(local_ray: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], DropoutRun]:
    """FedAvg on the masked / CKKS world, one Ray run per protocol (run when a test first asks for it): in
    round ``r`` the member f0-s1 fails its step as ``DROPOUTS[protocol][1][r - 1]`` says."""
    runs: dict[str, DropoutRun] = {}

    def get(protocol: str) -> DropoutRun:
        if protocol not in runs:
            runs[protocol] = _dropout_run(tmp_path_factory.mktemp(f"dropout-{protocol}"), protocol)
        return runs[protocol]

    return get


@pytest.mark.parametrize("protocol, step, answer", [
    ("masking", "masked_input", False),  # a forged share delivery: the member fails after key sharing
    ("masking", "masked_input", "empty"),  # a malicious driver withholds every share: the member refuses (< t)
    ("ckks", "ckks_protect", False),  # a forged round spec: the member cannot encrypt
    ("ckks", "ckks_protect", True),  # a ciphertext tampered in transit: its signature fails, rejected by name
])
def test_a_member_that_fails_its_step_drops_out_and_the_round_goes_on(
    dropout_runs: Callable[[str], DropoutRun], protocol: str, step: str, answer: bool | str,
) -> None:
    """Each case is one round of its protocol's shared run (`DROPOUTS`): f0-s1 fails that round's step."""
    from worldlm_secure.ledger import Ledger

    assert DROPOUTS[protocol][0] == step
    round_id = DROPOUTS[protocol][1].index(answer) + 1
    run = dropout_runs(protocol)
    res, engine = run.result, run.engine
    assert round_id in run.fired and np.isfinite(res.mean_val_ppl)
    assert np.isfinite(res.rounds[round_id - 1].mean_val_ppl)  # the round went on
    if answer == "empty":
        assert "received shares from only 0 neighbours, fewer than the threshold" in run.log.get(round_id, "")
    ledger = lambda s: Ledger(run.ledgers / f"{s}.sqlite", engine.release.identities[s]).entries()  # noqa: E731
    # FedAvg's one flat cohort of 4: the forged round released the other 3 updates, each recording the dropout
    assert ledger("f0-s1") == []  # (it fails its step in every round of the run)
    for site in ("f0-s0", "f1-s0", "f1-s1"):
        assert [(e.cohort_size, e.dropouts) for e in ledger(site) if e.round == round_id] == [(3, 1)], site
