"""The learning methods one engine runs: WorldLM and the baselines it is compared against.

Every method is the same round loop with a different plan:
- which parameters are local / key / shared (from the policy, or all of one kind);
- whether the tree is used, or all sites sit flat under the root;
- how key layers are aggregated (attentive or plain weighted average);
- whether federations exchange residual layer embeddings;
- how often the root averages (HierFAVG's cloud interval).

``central`` is the exception: the privacy-free reference, not a federation. Every site's training data is
pooled in one place and one model (the same architecture, initial weights and adapters as the others) is
trained on it with the same total number of optimizer steps as all sites of a federated run together
(rounds x local_steps x sites, same batch size, same learning-rate schedule stretched over them). It has
no releases (nothing is aggregated, noised or written to a ledger: the data itself left the sites), so
its tables show what federation costs or gains against training on all the data at once. It is not in
``all`` (name it: ``--methods worldlm,fedavg,central``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from worldlm_secure.errors import ConfigError

if TYPE_CHECKING:  # the engine imports torch; this module is imported by light CLI code
    from worldlm_secure.federation.engine import Engine, MethodResult

GroupSource = Literal["policy", "all_shared", "all_local", "policy_local_rest_shared"]


@dataclass(frozen=True)
class Method:
    name: str
    groups: GroupSource
    flat: bool
    attentive_key: bool
    residuals: bool
    description: str
    root_every_from_world: bool = False  # HierFAVG: the root averages every `hierfavg_root_every` rounds
    pooled: bool = False  # central: all training data in one place, one model (`run_central`)
    in_all: bool = True  # part of ``--methods all`` (the federated methods)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("worldlm", "policy", False, True, True, "WorldLM: local head, attentive key layers per federation, shared backbone, residual embeddings"),
        Method("fedavg", "all_shared", True, False, False, "FedAvg: one flat federation, every parameter averaged"),
        Method("local", "all_local", True, False, False, "Local: every site trains alone"),
        Method("fedper", "policy_local_rest_shared", True, False, False, "FedPer: flat, local head, the rest averaged"),
        Method("hierfavg", "all_shared", False, False, False, "HierFAVG: the same tree, plain averaging at every level", True),
        Method("central", "all_local", True, False, False,
               "Central: every site's data pooled in one place, one model, the same total steps; no releases "
               "(the privacy-free reference)", pooled=True, in_all=False),
    )
}


def parse_methods(spec: str | None) -> list[Method]:
    """``"worldlm,fedavg"`` -> methods; ``None`` or ``"all"`` -> every method."""
    if spec is None or spec.strip() in ("", "all"):
        return [m for m in METHODS.values() if m.in_all]
    out = []
    for name in (s.strip() for s in spec.split(",")):
        if name not in METHODS:
            raise ConfigError(f"--methods: unknown method {name!r} (valid: {', '.join(METHODS)}, all)")
        out.append(METHODS[name])
    return out


def run_central(engine: Engine) -> MethodResult:
    """The ``central`` method on an engine built for it: one model on every site's pooled training data.

    Steps: ``rounds x local_steps x sites`` optimizer steps in total (what the sites of a federated run take
    together), ``local_steps x sites`` per round, batches drawn uniformly from the pooled sequences with
    the engine's batch size; the learning-rate schedule (warm-up, cosine) runs over the total. After every
    ``eval_every`` rounds the one model is evaluated on every site's own validation data. Nothing is released.
    """
    import time

    import numpy as np
    import torch

    from worldlm_secure.federation.engine import MethodResult, RoundRecord
    from worldlm_secure.train.loop import LocalTrainer
    from worldlm_secure.train.site import site_generator

    start = time.perf_counter()
    settings, sites = engine.settings, engine.sites
    cfg = replace(settings.train, local_steps=settings.train.local_steps * len(sites))
    trainer = LocalTrainer(engine.model, cfg, engine.device, settings.rounds * cfg.local_steps)
    engine.model.load_state_dict(sites[0].params, strict=False)  # every site starts from the same weights
    pooled = torch.cat([s.train for s in sites])
    optimizer = trainer.make_optimizer()
    generator = site_generator(settings.seed, 0)  # the pooled data draws its batches as the first site would
    rounds: list[RoundRecord] = []
    site_ppl: dict[str, float] = {}
    train_s = 0.0
    for r in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        loss = trainer.train_round(pooled, optimizer, (r - 1) * cfg.local_steps, generator)
        train_s += time.perf_counter() - t0
        if r % settings.eval_every == 0 or r == settings.rounds:
            site_ppl = {s.name: trainer.evaluate(s.val) for s in sites}
            rec = RoundRecord(r, float(np.mean(list(site_ppl.values()))), site_ppl, loss)
            rounds.append(rec)
            if engine.on_round:
                engine.on_round(rec)
    trained = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    return MethodResult(
        name=engine.method.name, sites=site_ppl, rounds=rounds, wall_s=time.perf_counter() - start, train_s=train_s,
        stats=engine.release.stats, groups={"local": trained, "key": 0, "shared": 0},
        base_hash=getattr(engine, "base_hash", None),
    )
