"""Sites as Ray actors doing their own member side: same results as in process, and the driver (the
aggregator) only ever receives what would cross the network.

Needs the `ray` extra; skipped, saying so, where Ray is missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import write_world
from worldlm_secure.federation.methods import METHODS

ray = pytest.importorskip("ray", reason="Ray backend test needs the ray extra: pip install -e '.[test,ray]'")

pytestmark = pytest.mark.slow

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


def _world(folder: Path, policy_text: str | None, rounds: int = 2) -> Any:
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import load_world_data
    from worldlm_secure.federation.world import load_world

    folder.mkdir()
    path = write_world(folder, rounds=rounds)
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


def test_masked_world_same_per_site_ppl_as_in_process(local_ray, tmp_path: Path) -> None:
    from worldlm_secure.federation.engine import Engine
    from worldlm_secure.federation.ray_sites import RayEngine

    world, settings, data, vocab = _world(tmp_path / "w", MASKED)
    local = _run(Engine(world, METHODS["worldlm"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "a"))
    remote = _run(RayEngine(world, METHODS["worldlm"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "b"))
    assert set(remote.sites) == set(local.sites) == {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
    for site, ppl in local.sites.items():
        # masking's stochastic rounding draws from a CSPRNG: two masked runs differ by quantization error only
        assert remote.sites[site] == pytest.approx(ppl, rel=1e-5), site
    assert remote.stats.by_protocol == local.stats.by_protocol and "masking" in remote.stats.by_protocol
    assert remote.stats.bytes_up == local.stats.bytes_up  # the same messages, serialized to the same sizes
    assert remote.stats.bytes_down == local.stats.bytes_down
    assert sorted(p.name for p in (tmp_path / "b").glob("*.sqlite")) == sorted(p.name for p in (tmp_path / "a").glob("*.sqlite"))


def _leaks(value: Any) -> list[str]:
    """Float arrays or tensors anywhere in ``value`` (what a member vector or model would look like)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return [f"{type(value).__name__}{tuple(value.shape)}"]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaks(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaks(v)]
    return []


def _instrumented_run(monkeypatch: pytest.MonkeyPatch, world: Any, settings: Any, data: Any, vocab: int) -> tuple[list, list, list, Any]:
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.secagg import masking_round
    from worldlm_secure.secagg.masking import MaskingAggregator

    received: list[Any] = []  # everything the driver took from a site actor
    wire: list[tuple[str, str, type]] = []  # (member, step, type of what arrived) at the aggregator's entry point
    masked_seen: list[type] = []  # what the aggregator's collect_masked was given
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

    monkeypatch.setattr(RayEngine, "_get", get)
    monkeypatch.setattr(masking_round, "receive", receive)
    monkeypatch.setattr(MaskingAggregator, "collect_masked", collect)
    result = _run(RayEngine(world, METHODS["worldlm"], data, settings, vocab_size=vocab))
    return received, wire, masked_seen, result


def test_driver_never_receives_an_unprotected_member_vector(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worldlm_secure.secagg.masking_messages import MaskedInput

    world, settings, data, vocab = _world(tmp_path / "masked", MASKED, rounds=1)
    received, wire, masked_seen, _ = _instrumented_run(monkeypatch, world, settings, data, vocab)
    assert received and not [x for r in received for x in _leaks(r)]  # no vector, no tensor: bytes and numbers
    sites = {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
    # every channel's answers enter through the one `masking_round.receive`: the sites' (actors) and the
    # federations' own releases to the root (run in the driver, members f0 and f1)
    assert {m for m, _, _ in wire} == sites | {"f0", "f1"}
    inputs = [(m, t) for m, step, t in wire if step == "masked_input" and m in sites]
    assert {m for m, _ in inputs} == sites and all(t is bytes for _, t in inputs)
    assert all(t is bytes for _, _, t in wire)
    assert masked_seen and set(masked_seen) == {MaskedInput}  # the aggregator saw masked inputs only
    assert len(inputs) == 2 * len(sites)  # key and shared, one masked input per site per release

    # The same instrument on a plain (protocol none) world sees the sites' vectors: it would catch a leak.
    world, settings, data, vocab = _world(tmp_path / "plain", None, rounds=1)
    received, wire, _, _ = _instrumented_run(monkeypatch, world, settings, data, vocab)
    assert not wire and [x for r in received for x in _leaks(r)]


def test_distributed_noise_is_added_in_the_site_actor(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worldlm_secure.federation import ray_channel
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.ledger import Ledger
    from worldlm_secure.secagg.masking_round import MaskingSum

    world, settings, data, vocab = _world(tmp_path / "dist", DISTRIBUTED, rounds=1)
    sites = {"f0-s0", "f0-s1", "f1-s0", "f1-s1"}
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


CKKS = (
    "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nname: ckks\nextends: research-open.yaml\n"
    "secure_aggregation: {protocol: [ckks], min_cohort: 1, max_dropout_fraction: 0.5}\n"
)


def _ckks_message(x: Any) -> Any:
    from worldlm_secure.errors import SecAggError
    from worldlm_secure.secagg import ckks_messages as wire

    if not isinstance(x, bytes):
        return None
    try:
        return wire.decode(x)
    except SecAggError:  # other bytes: e.g. the identity public keys
        return None


def test_ckks_world_encrypts_in_the_site_actors(local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Members encrypt in their actors, key holders decrypt in theirs, the driver only adds ciphertexts."""
    import tenseal as ts

    from worldlm_secure.federation.engine import Engine
    from worldlm_secure.secagg import ckks_messages as wire

    world, settings, data, vocab = _world(tmp_path / "ckks", CKKS, rounds=2)
    local = _run(Engine(world, METHODS["worldlm"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "a"))
    received, wire_log, _, remote = _instrumented_run(monkeypatch, world, settings, data, vocab)
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
    assert len(contributions) == 2 * 2 * 4  # 2 rounds x (key, shared) x 4 sites, each a signed ciphertext message


def test_ckks_on_ray_keeps_key_epochs_and_ledgers(local_ray, tmp_path: Path) -> None:
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.ledger import Ledger

    rotate = CKKS.replace("max_dropout_fraction: 0.5}", "max_dropout_fraction: 0.5, ckks: {rotate_every_rounds: 2}}")
    world, settings, data, vocab = _world(tmp_path / "rot", rotate, rounds=3)
    engine = RayEngine(world, METHODS["fedavg"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "led")
    _run(engine)
    for site in ("f0-s0", "f0-s1", "f1-s0", "f1-s1"):
        entries = Ledger(tmp_path / "led" / f"{site}.sqlite", engine.release.identities[site]).entries()
        assert [e.protocol for e in entries] == ["ckks"] * 3
        ids = [e.key_id for e in entries]
        # rounds 1 | 2, 3: a key epoch is round // rotate_every_rounds, as in process
        assert ids[0] != ids[1] and ids[1] == ids[2] and all(ids), (site, ids)


def _forge(monkeypatch: pytest.MonkeyPatch, module: Any, step: str, victim: str, once: list[bool], answer: bool | str,
           engine: dict[str, Any] | None = None) -> None:
    """Once, at ``step``: replace what the aggregator sends ``victim`` by garbage (its step then fails), or
    (``answer``) flip one byte in the middle of what ``victim`` sends back (a message tampered in transit), or
    (``answer="empty"``) act as a malicious driver: send ``victim`` a share delivery with no shares, validly
    signed with the aggregator identity the driver holds (``engine["engine"]``)."""
    real = module.run_step

    def run_step(ray_: Any, actors: Any, name: str, args: Any, log_: Any, round_id: int, **kw: Any) -> Any:
        hit = name == step and victim in args and not once
        if hit and answer == "empty":
            from worldlm_secure.secagg.masking_messages import ShareDelivery

            once.append(True)
            (identity,) = engine["engine"]._aggregators.values()  # type: ignore[index]
            empty = dataclasses.replace(ShareDelivery.from_bytes(args[victim][0]), shares=(), signature=b"")
            empty = dataclasses.replace(empty, signature=identity.sign(empty.signed_payload()))
            args = {**args, victim: (empty.to_bytes(),)}
        elif hit and not answer:
            once.append(True)
            args = {**args, victim: tuple(b"\x00forged" if isinstance(a, bytes) else None for a in args[victim])}
        out = real(ray_, actors, name, args, log_, round_id, **kw)
        if hit and answer is True:
            once.append(True)
            data = bytearray(out[victim])
            data[len(data) // 2] ^= 0x01
            out[victim] = bytes(data)
        return out

    monkeypatch.setattr(module, "run_step", run_step)


@pytest.mark.parametrize("protocol, step, answer", [
    ("masking", "masked_input", False),  # a forged share delivery: the member fails after key sharing
    ("masking", "masked_input", "empty"),  # a malicious driver withholds every share: the member refuses (< t)
    ("ckks", "ckks_protect", False),  # a forged round spec: the member cannot encrypt
    ("ckks", "ckks_protect", True),  # a ciphertext tampered in transit: its signature fails, rejected by name
])
def test_a_member_that_fails_its_step_drops_out_and_the_round_goes_on(
    local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, protocol: str,
    step: str, answer: bool | str,
) -> None:
    from worldlm_secure.federation import ray_ckks, ray_channel
    from worldlm_secure.federation.ray_sites import RayEngine
    from worldlm_secure.ledger import Ledger

    policy = MASKED if protocol == "masking" else CKKS
    world, settings, data, vocab = _world(tmp_path / protocol, policy, rounds=1)
    fired: list[bool] = []
    holder: dict[str, Any] = {}
    _forge(monkeypatch, ray_channel if protocol == "masking" else ray_ckks, step, "f0-s1", fired, answer, holder)
    engine = RayEngine(world, METHODS["fedavg"], data, settings, vocab_size=vocab, ledger_dir=tmp_path / "led")
    holder["engine"] = engine
    res = _run(engine)
    assert fired and np.isfinite(res.mean_val_ppl)
    if answer == "empty":
        assert "received shares from only 0 neighbours, fewer than the threshold" in caplog.text
    ledger = lambda s: Ledger(tmp_path / "led" / f"{s}.sqlite", engine.release.identities[s]).entries()  # noqa: E731
    # FedAvg's one flat cohort of 4: the forged round released the other 3 updates, each recording the dropout
    assert ledger("f0-s1") == []
    for site in ("f0-s0", "f1-s0", "f1-s1"):
        assert [(e.cohort_size, e.dropouts) for e in ledger(site)] == [(3, 1)], site
