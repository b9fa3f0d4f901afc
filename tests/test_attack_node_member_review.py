"""Review: a malicious aggregator (a federation towards its sites, the root towards federations), possibly with
colluding members, against the REAL member code of deployed nodes (`node.site.SiteNode`,
`node.federation.FederationNode`, `node.release.NodeRelease`, `MaskingMember`).

Only the transport is faked: a `_Hub` plays the aggregator with the real SecAgg+ aggregator driver
(`masking_round.aggregate`, `MaskingAggregator`) and hands each real node a `_FakeLink` that carries its
messages the way `SiteClient` would (send_secagg / fetch_secagg / upload_update / download_model /
watch_rounds). The malicious aggregator only does what a federation operator can do: choose the cohort
(from the roster), the announced world round / phase, and the model bytes each member downloads.

Each test asserts the SECURE behaviour: it FAILS while the hole is there.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from conftest import write_world

from worldlm_secure.errors import PolicyViolation, SecAggError, WorldLMError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.node import federation as federation_mod
from worldlm_secure.node import site as site_mod
from worldlm_secure.node.config import NodeConfig, ParentSection, ServeSection, TimeoutSection
from worldlm_secure.node.context import WorldContext, load_context
from worldlm_secure.node.link import STEP_KINDS
from worldlm_secure.node.payload import model_payload
from worldlm_secure.node.release import NodeRelease
from worldlm_secure.node.rounds import Phase, masking_config
from worldlm_secure.node.state import NodeState
from worldlm_secure.secagg.masking import MaskingAggregator, MaskingMember, RoundConfig
from worldlm_secure.secagg.masking_round import STEPS, MaskingSession, aggregate
from worldlm_secure.transport.chunks import Payload
from worldlm_secure.transport.client import Enrollment, Receipt
from worldlm_secure.transport.handler import Announcement

torch.set_num_threads(1)
FAST = TimeoutSection(train=30.0, step=15.0, heartbeat=60.0, enroll=5.0)


# ---- policies --------------------------------------------------------------------------------------------


def _policy(folder: Path, name: str, body: str) -> None:
    (folder / "policies" / f"{name}.yaml").write_text(
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: research-open.yaml\n"
        f"name: {name}\njurisdiction: test\n{body}"
    )


def _set_policy(path: Path, node: str, policy: str) -> None:
    text = path.read_text()
    old = f"{{name: {node}, "
    lines = []
    for line in text.splitlines():
        if old in line:
            line = line.split("policy:")[0] + f"policy: policies/{policy}.yaml}}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")


# ---- the fake transport: one aggregator (real driver) and members that reach it through fake links ---------


class _Hub:
    """One SecAgg+ link round played by the real aggregator driver. ``remote``: names of real nodes that talk to
    it through `_FakeLink`s (from their own threads); ``local``: in-process `MaskingSession`s (simulated
    members). Runs `aggregate` in a thread; ``total`` is the unmasked sum (None: the round aborted)."""

    def __init__(self, cfg: RoundConfig, identity: NodeIdentity, remote: list[str],
                 local: Mapping[str, MaskingSession] | None = None) -> None:
        self.cfg, self.identity = cfg, identity
        self.remote = set(remote)
        self.local = dict(local or {})
        self.posts: dict[str, list[tuple[int, bytes]]] = {m: [] for m in remote}
        self.answers: dict[str, queue.Queue[tuple[int, bytes]]] = {m: queue.Queue() for m in remote}
        self.dead: set[str] = set()
        self.lock = threading.Lock()
        self.total: np.ndarray | None = None
        self.error: Exception | None = None
        self.uploaded: dict[str, list[tuple[int, bytes]]] = {m: [] for m in remote}  # (secagg kind, bytes)
        self._dropped: dict[str, str] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    # Channel
    @property
    def dropped(self) -> Mapping[str, str]:
        return self._dropped

    def exchange(self, step: str, requests: Mapping[str, bytes], timeout: float | None) -> dict[str, bytes]:
        post_kind = STEP_KINDS[step][0]
        out: dict[str, bytes] = {}
        for m, data in requests.items():
            if m in self.local:
                if m in self._dropped:
                    continue
                try:
                    out[m] = self.local[m].handle(data)
                except SecAggError as exc:
                    self._dropped[m] = f"{step}: {exc}"
            elif m in self.remote and post_kind is not None:
                with self.lock:
                    self.posts[m].append((post_kind, data))
        tag = STEPS[step].TAG
        for m in requests:
            if m not in self.remote:
                continue
            deadline = time.monotonic() + 20.0
            while m not in self.dead and time.monotonic() < deadline:
                try:
                    _kind, data = self.answers[m].get(timeout=0.05)
                except queue.Empty:
                    continue
                if len(data) >= 5 and data[4] == tag:
                    out[m] = data
                    break
            if m not in out:
                self._dropped.setdefault(m, f"{step}: no answer")
        return out

    def _run(self) -> None:
        try:
            trace = aggregate(MaskingAggregator(self.cfg, self.identity), self)
            self.total = np.asarray(trace.outcome.total)
        except Exception as exc:  # an abort: nothing released
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(60)


class _FakeLink:
    """What a real node sees of its aggregator (`SiteClient`'s surface), backed by the hub of the current link
    round; the announcements and downloadable models are scripted by the test."""

    def __init__(self, name: str, federation: str, script: Callable[["_FakeLink"], Any]) -> None:
        self.name, self.federation = name, federation
        self.script = script
        self.hub: _Hub | None = None
        self.models: dict[int, Payload] = {}
        self.plain: dict[int, np.ndarray] = {}

    # session calls
    def enroll(self) -> Enrollment:
        return Enrollment(self.federation, 0, 60)

    def heartbeat(self, status: str = "") -> int:
        return 0

    def fetch_ledger_receipt(self, head: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass

    def watch_rounds(self, after_round: int | None = None, on_refused: Any = None):
        yield from self.script(self)

    def download_model(self, round_id: int | None = None) -> Payload:
        return self.models[int(round_id or 0)]

    # round calls (MemberLink)
    def upload_update(self, payload: Payload, *, secagg_kind: int = 0, round_id: int | None = None,
                      ledger_head: Any = None) -> Receipt:
        data = payload.to_bytes()
        if secagg_kind == 0:
            self.plain[int(round_id or 0)] = np.asarray(payload.as_tensors()["vector"])
        elif self.hub is not None:
            self.hub.uploaded[self.name].append((secagg_kind, data))
            self.hub.answers[self.name].put((secagg_kind, data))
        return Receipt(int(round_id or 0), len(data), b"\0" * 32, b"")

    def send_secagg(self, secagg_kind: int, payload: Payload, *, round_id: int | None = None, recipient: str = "") -> Receipt:
        data = payload.to_bytes()
        assert self.hub is not None
        self.hub.uploaded[self.name].append((secagg_kind, data))
        self.hub.answers[self.name].put((secagg_kind, data))
        return Receipt(int(round_id or 0), len(data), b"\0" * 32, b"")

    def fetch_secagg(self, secagg_kind: int = 0, *, round_id: int | None = None) -> list[Any]:
        if self.hub is None:
            return []
        with self.hub.lock:
            got = [d for k, d in self.hub.posts[self.name] if k == secagg_kind]
        return [SimpleNamespace(sender=self.federation, payload=Payload.from_bytes(d)) for d in got]


def _patch_transport(monkeypatch: pytest.MonkeyPatch, module: Any, links: Mapping[str, _FakeLink]) -> None:
    """The node's `SiteClient` is our fake link (chosen by the node's name); credentials are not read."""
    monkeypatch.setattr(module, "SiteClient", lambda *a, identity, **k: links[identity.name])
    monkeypatch.setattr(module, "NodeCredentials", SimpleNamespace(load=lambda path: None))


def _node_config(tmp: Path, world: Path, name: str, role: str, parent: str) -> NodeConfig:
    serve = ServeSection(credentials=tmp, roster=tmp / "roster") if role == "federation" else None
    return NodeConfig(name=name, role=role, world=world, state=tmp / "nodes" / name,  # type: ignore[arg-type]
                      parent=ParentSection(name=parent, address="127.0.0.1:1", credentials=tmp), serve=serve,
                      timeouts=FAST)


def _emit_to(links: Mapping[str, _FakeLink], name: str) -> Callable[..., None]:
    """A node's event callback: a refused round (`round_failed`) tells the hub not to wait for its answers."""
    def emit(event: str, **_: Any) -> None:
        link = links.get(name)
        if event == "round_failed" and link is not None and link.hub is not None:
            link.hub.dead.add(name)
    return emit


def _run_node(node: Any, errors: list[BaseException]) -> threading.Thread:
    def target() -> None:
        try:
            node.run()
        except WorldLMError:
            pass  # our scripted round stream ended
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            errors.append(exc)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


# =====================================================================================================
# 1. The federation's residual embedding: released again for any announced world round, over any cohort
# =====================================================================================================


def _residual_world(folder: Path) -> WorldContext:
    """3 federations x 2 sites; the root's link requires SecAgg+ (min_cohort 2), no DP anywhere: the residual is
    protected by secure aggregation only, which is the protection the policy asks for."""
    path = write_world(folder, policy="masked.yaml", feds=3, sites=2)
    _policy(folder, "masked", "secure_aggregation: {protocol: [masking], min_cohort: 2}\n")
    return load_context(path)


class _FakeAggregator:
    """The serving half of a federation (its sites' rounds), not under test here."""

    def __init__(self, cfg: Any, ctx: WorldContext, release: Any, state: Any, emit: Any) -> None:
        self.members = ctx.members(cfg.name)
        self.board = SimpleNamespace(examples={})

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait_for_members(self) -> dict[str, int]:
        return {}
    def weighted(self, *a: Any, **k: Any) -> None:
        return None
    def finish(self, *a: Any, **k: Any) -> None: ...


def test_federation_refuses_to_release_its_residual_again_under_another_world_round_over_another_cohort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The root announces `residual` for world round 2 over {f0, f1, f2}, then `residual` for world round 3
    over {f0, f1} with no site round in between. `FederationNode.run` (residual branch) recomputes the same
    embedding of its unchanged key layers and releases it again: the re-run guards (`_rerun_plan`,
    `reveal_guard`) are keyed by the announced world round, which the root chooses. The difference of the two
    secure sums is f2's residual embedding, although every federation is honest and both sums have
    >= min_cohort contributors."""
    ctx = _residual_world(tmp_path)
    names = ctx.key_names
    root = NodeIdentity.generate(ctx.root)
    ids = {f: NodeIdentity.generate(f) for f in ("f0", "f1", "f2")}
    monkeypatch.setattr(federation_mod, "Aggregator", _FakeAggregator)

    links: dict[str, _FakeLink] = {}
    node = federation_mod.FederationNode(_node_config(tmp_path, ctx.world.path, "f0", "federation", ctx.root),
                                         ctx, ids["f0"], _emit_to(links, "f0"))
    gen = torch.Generator().manual_seed(1)
    # f0's key layers after its sites' rounds (whatever they are), and the root's reference
    node.key = {n: ctx.init[n] + 0.01 * torch.randn(ctx.init[n].shape, generator=gen) for n in names}
    ref = {n: t.clone() for n, t in ctx.init.items() if n in names}

    # the other federations (simulated with the same release code), and their embeddings
    others = {f: NodeRelease(ctx, ids[f], tmp_path / "other" / f / "ledger", NodeState(tmp_path / "other" / f / "state"))
              for f in ("f1", "f2")}
    own = {f: np.concatenate([0.01 * torch.randn(ctx.init[n].numel(), generator=gen).double().numpy() for n in names])
           for f in ("f1", "f2")}
    hubs: list[_Hub] = []

    def announce(link: _FakeLink, link_round: int, world_round: int, cohort: tuple[str, ...]) -> Announcement:
        ann = Announcement(link_round, cohort, "masking", Phase(world_round, "residual").to_bytes(),
                           peer_keys=tuple((f, ids[f].public_bytes) for f in cohort), aggregator_key=root.public_bytes)
        link.models[link_round] = model_payload({"shared": {n: ctx.init[n] for n in ctx.shared_names}, "ref": ref})
        local = {}
        for f in cohort:
            if f == "f0":
                continue
            rel = others[f]
            prep = rel.prepare(world_round, "residual", ctx.root, ctx.root, cohort, None, None, names, {},
                               derived=True, raw_vector=own[f])
            cfg = masking_config(prep.plan, ann)
            assert cfg is not None
            rid = (world_round, "residual", ctx.root)
            local[f] = MaskingSession(
                MaskingMember(ids[f], cfg), (lambda v=prep.vector: v),
                before_input=lambda adv, rel=rel, prep=prep, wr=world_round: rel.record(
                    wr, "residual", ctx.root, names, prep, adv, cohort, link_round),
                before_reveal=rel.reveal_guard(*rid, prep))
        plan = node.release.plan(cohort, ctx.root)
        cfg = masking_config(plan, ann)
        assert cfg is not None
        hub = _Hub(cfg, root, ["f0"], local)
        hubs.append(hub)
        link.hub = hub
        hub.start()
        return ann

    def script(link: _FakeLink):
        yield announce(link, 1, 2, ("f0", "f1", "f2"))
        hubs[-1].join()
        yield announce(link, 2, 3, ("f0", "f1"))
        hubs[-1].join()

    link = links["f0"] = _FakeLink("f0", ctx.root, script)
    _patch_transport(monkeypatch, federation_mod, links)
    errors: list[BaseException] = []
    try:
        _run_node(node, errors).join(120)
    finally:
        for r in others.values():
            r.state.close()
            r.path.close()
    assert not errors, errors
    first, second = hubs[0].total, hubs[1].total
    assert first is not None, f"the first (legitimate) residual round should complete: {hubs[0].error}"
    victim = own["f2"]
    if second is not None:
        assert not np.allclose(first - second, victim, atol=1e-4), (
            "the root isolated f2's residual embedding: f0 (and f1) released the same embedding again under a "
            "new world round over a cohort without f2"
        )


# =====================================================================================================
# 2. The residual is recorded and authorized as DP post-processing although its input was never noised
# =====================================================================================================


def test_residual_of_unnoised_key_layers_is_not_released_as_dp_post_processing(tmp_path: Path) -> None:
    """The root's policy requires user-level DP and DP on residuals; the federations' and sites' policies do not.
    A key release stops at the federation, so its policy chain (site -> federation) asks for no noise: the
    federation's key layers are a plain sum of its sites' key updates. The federation then sends the residual
    embedding of those key layers to the root as a *derived* release, which `Pipeline.applied_level` labels
    with the level of the federation -> root policy ('user') and `authorize` accepts as DP by post-processing;
    the ledger entry records `post_processing` at user level. The root's policy (residuals.require_dp) is not
    met, and nothing was noised or charged anywhere."""
    path = write_world(tmp_path, feds=3, sites=2)
    _policy(tmp_path, "rootdp", "secure_aggregation: {protocol: [masking], min_cohort: 2}\n"
            "differential_privacy: {level: user, mechanism: [central_gaussian], epsilon_budget: 8.0,\n"
            "  delta: 1.0e-5, clipping_norm: 1.0, noise_multiplier: 1.0}\n"
            "residuals: {allowed: true, require_dp: true}\n")
    _set_policy(path, "world", "rootdp")
    ctx = load_context(path)
    names = ctx.key_names
    site = NodeRelease(ctx, NodeIdentity.generate("f0-s0"), tmp_path / "s" / "ledger", NodeState(tmp_path / "s" / "state"))
    fed = NodeRelease(ctx, NodeIdentity.generate("f0"), tmp_path / "f" / "ledger", NodeState(tmp_path / "f" / "state"))
    try:
        deltas = {n: 0.01 * torch.ones(ctx.init[n].shape) for n in names}
        key = site.prepare(1, "key", "f0", "f0", ["f0-s0", "f0-s1"], deltas, np.ones(len(names)), names,
                           {n: ctx.init[n].shape for n in names}, derived=False)
        assert ctx.world.nodes[ctx.root].policy_path.name == "rootdp.yaml"
        assert key.dp is None  # the key layers reach f0 without any noise (its chain asks for none)
        try:
            prep = fed.prepare(1, "residual", ctx.root, ctx.root, ["f0", "f1", "f2"], None, None, names, {},
                               derived=True, raw_vector=np.ones(8))
        except (PolicyViolation, SecAggError):
            return  # refused: secure
        assert prep.level != "user", (
            "the residual of f0's noiseless key layers is authorized (and would be recorded) as user-level DP "
            f"post-processing (level={prep.level!r}), though the root's policy requires DP on residuals"
        )
    finally:
        for r in (site, fed):
            r.state.close()
            r.path.close()


# =====================================================================================================
# 3. Model inconsistency: the federation serves different models to different members of one round
# =====================================================================================================


def _site_world(folder: Path) -> WorldContext:
    """1 federation x 2 sites under SecAgg+ (min_cohort 2, no DP): the sites' key updates are protected by the
    secure sum alone, exactly what the policy asks for."""
    path = write_world(folder, policy="masked.yaml", feds=2, sites=2, rounds=1)
    _policy(folder, "masked", "secure_aggregation: {protocol: [masking], min_cohort: 2}\n")
    return load_context(path)


@pytest.mark.parametrize("told", ["no model hash", "each its own model's hash", "everyone the real model's hash"])
def test_sites_detect_that_the_federation_served_them_different_models_in_one_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, told: str,
) -> None:
    """The federation announces key(1) to {f0-s0, f0-s1}, serves the target f0-s0 the real broadcast and f0-s1
    a model whose key layers are all zero. In that model the MLP output is zero, so every key-layer gradient is
    zero and AdamW (fresh, no weight decay) moves nothing: f0-s1's key update is exactly 0, and the SecAgg+ sum
    is f0-s0's update alone, with min_cohort met. Before the fix nothing bound the model to the round (the
    announcement carried no hash): the federation unmasked f0-s0's update. Now the announcement carries the
    served model's SHA-256 and is in what members sign (`node.rounds.download_announced`, `masking_config`):
    whatever the federation tells each site (``told``), the round yields no sum that is f0-s0's update."""
    ctx = _site_world(tmp_path)
    fed = NodeIdentity.generate("f0")
    sites = ("f0-s0", "f0-s1")
    ids = {s: NodeIdentity.generate(s) for s in sites}
    captured: dict[str, np.ndarray] = {}
    real_prepare = NodeRelease.prepare

    def spy(self: NodeRelease, *a: Any, **k: Any) -> Any:  # observe only: what each site puts into the sum
        prep = real_prepare(self, *a, **k)
        captured[self.me] = np.array(prep.vector, copy=True)
        return prep

    monkeypatch.setattr(NodeRelease, "prepare", spy)
    real = {"key": {n: ctx.init[n] for n in ctx.key_names}, "shared": {n: ctx.init[n] for n in ctx.shared_names}}
    dead = {"key": {n: torch.zeros_like(ctx.init[n]) for n in ctx.key_names}, "shared": real["shared"]}
    served = {"f0-s0": model_payload(real), "f0-s1": model_payload(dead)}

    def announcement(site: str) -> Announcement:
        digest = {"no model hash": "", "each its own model's hash": served[site].sha256().hex(),
                  "everyone the real model's hash": served["f0-s0"].sha256().hex()}[told]
        return Announcement(1, sites, "masking", Phase(1, "key", model=digest).to_bytes(),
                            peer_keys=tuple((s, ids[s].public_bytes) for s in sites), aggregator_key=fed.public_bytes)

    probe = NodeRelease(ctx, ids["f0-s0"], tmp_path / "probe" / "ledger")
    cfg = masking_config(probe.plan(sites, "f0"), announcement("f0-s0"))  # the federation plays the target's round
    probe.path.close()
    assert cfg is not None
    hub = _Hub(cfg, fed, list(sites))

    def script(link: _FakeLink):
        link.hub = hub
        link.models[1] = served[link.name]
        yield announcement(link.name)

    links = {s: _FakeLink(s, "f0", script) for s in sites}
    _patch_transport(monkeypatch, site_mod, links)
    nodes = [site_mod.SiteNode(_node_config(tmp_path, ctx.world.path, s, "site", "f0"), ctx, ids[s],
                               _emit_to(links, s)) for s in sites]
    hub.start()
    errors: list[BaseException] = []
    threads = [_run_node(n, errors) for n in nodes]
    for t in threads:
        t.join(120)
    hub.join()
    assert not errors, errors
    if hub.total is None:
        return  # the round yielded no sum: the attack failed
    target = captured["f0-s0"]
    assert np.count_nonzero(target) > 0
    k = len(ctx.key_names)  # the weight words at the end
    assert not np.allclose(hub.total[:-k], target[:-k], atol=1e-6, rtol=0), (
        "the 'secure sum' the federation unmasked is f0-s0's key update alone: f0-s1 trained from a dead model "
        "the federation served only to it"
    )


# =====================================================================================================
# 4. Cheap guards that hold (they pass): what a member takes from its own policy, not from the announcement
# =====================================================================================================


def test_member_refuses_a_cohort_below_its_own_min_cohort(tmp_path: Path) -> None:
    """An aggregator announcing a cohort of one (the target alone) is refused before anything is prepared."""
    ctx = _site_world(tmp_path)
    rel = NodeRelease(ctx, NodeIdentity.generate("f0-s0"), tmp_path / "ledger", NodeState(tmp_path / "state"))
    names = ctx.key_names
    try:
        with pytest.raises(PolicyViolation, match="min_cohort"):
            rel.prepare(1, "key", "f0", "f0", ["f0-s0"], {n: 0.01 * torch.ones(ctx.init[n].shape) for n in names},
                        np.ones(len(names)), names, {n: ctx.init[n].shape for n in names}, derived=False)
        assert rel.path.ledger("f0-s0").get("1:key:f0") is None
    finally:
        rel.state.close()
        rel.path.close()


def test_masking_round_parameters_come_from_the_members_own_plan(tmp_path: Path) -> None:
    """bits, clip range, threshold and min_cohort of the member's `RoundConfig` are its policy's; the announcement
    contributes only the round id, the (roster-checked) cohort and the certificate-checked keys."""
    path = write_world(tmp_path, policy="masked.yaml", feds=3, sites=3, rounds=1)
    _policy(tmp_path, "masked", "secure_aggregation: {protocol: [masking], min_cohort: 3, max_dropout_fraction: 0.1,\n"
            "  masking: {bits: 40, clip_range: 2.5, threshold: 0.9}}\n")
    ctx = load_context(path)
    rel = NodeRelease(ctx, NodeIdentity.generate("f0-s0"), tmp_path / "ledger")
    try:
        cohort = ("f0-s0", "f0-s1", "f0-s2")
        ids = {m: NodeIdentity.generate(m) for m in cohort}
        ann = Announcement(7, cohort, "masking", Phase(1, "key").to_bytes(),
                           peer_keys=tuple((m, i.public_bytes) for m, i in ids.items()), aggregator_key=b"\1" * 32)
        cfg = masking_config(rel.plan(cohort, "f0"), ann)
        assert cfg is not None
        assert cfg.quant.bits == 40 and cfg.quant.clip_range == 2.5 and cfg.min_cohort == 3
    finally:
        rel.path.close()
