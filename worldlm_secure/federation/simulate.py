"""`simulate`: run every requested method on one world, in process, and collect the results.

This is the library function behind `worldlm-secure simulate`; tests and notebooks call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldlm_secure.data import get_tokenizer, load_site_streams, make_world_corpus
from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import Engine, MethodResult, RoundRecord, SiteData
from worldlm_secure.federation.methods import Method
from worldlm_secure.federation.settings import Settings, settings_for
from worldlm_secure.federation.world import World, load_world


@dataclass(frozen=True)
class SimulationResult:
    world: str
    settings: Settings
    floors: dict[str, float]  # site -> exact perplexity floor (synthetic data only)
    methods: dict[str, MethodResult]
    wall_s: float

    @property
    def entropy_floor_ppl(self) -> float | None:
        return float(np.mean(list(self.floors.values()))) if self.floors else None


def load_world_data(world: World, settings: Settings) -> tuple[dict[str, SiteData], int]:
    """Every site's data and the vocabulary size the model needs."""
    sites = sorted(s.name for s in world.sites)
    spec = settings.synthetic
    if spec is not None:
        feds: dict[str, list[str]] = {}
        for s in world.sites:
            feds.setdefault(str(s.parent), []).append(s.name)
        corpus = make_world_corpus(spec, feds, settings.seq_len)
        return {s: SiteData(c.train, c.val, c.perplexity_floor) for s, c in corpus.items()}, spec.vocab_size
    d = settings.data
    files = d.files
    tok = get_tokenizer((files.tokenizer if files else None) or d.tokenizer)
    streams = load_site_streams(
        sites=sites,
        tokenizer=tok,
        seq_len=settings.seq_len,
        val_fraction=files.val_fraction if files else d.val_fraction,
        table_source=(Path(world.path.parent, files.path) if files else d.hub),
        table_format=files.format if files else None,
        hub=files is None and d.hub is not None,
        text_column=files.text_column if files else d.text_column,
        site_column=files.site_column if files else d.site_column,
        per_site={s.name: s.data for s in world.sites if s.data is not None} or None,
    )
    return {s: SiteData(tr, va) for s, (tr, va) in streams.items()}, tok.vocab_size


def method_ledger_dir(ledger_root: Path | None, method: str) -> Path | None:
    """Where ``method``'s ledgers live: WorldLM's in ``ledger_root``, each baseline's in ``ledger_root/METHOD``."""
    if ledger_root is None:
        return None
    return Path(ledger_root) if method == "worldlm" else Path(ledger_root) / method


def run_method(
    world: World,
    settings: Settings,
    data: dict[str, SiteData],
    vocab: int,
    method: Method,
    *,
    ledger_root: Path | None = None,
    on_site: Callable[[str, int], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> MethodResult:
    """One method on a loaded world (what `simulate` does per method; the Ray backend runs it in a task)."""
    engine = Engine(
        world,
        method,
        data,
        settings,
        vocab_size=vocab,
        on_site=on_site,
        on_round=on_round,
        ledger_dir=method_ledger_dir(ledger_root, method.name),
    )
    return engine.run()


def simulate(
    world_path: str | Path,
    *,
    methods: Sequence[Method],
    rounds: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    on_method: Callable[[str], None] | None = None,
    on_site: Callable[[str, int], None] | None = None,
    on_round: Callable[[str, RoundRecord], None] | None = None,
    on_method_done: Callable[[MethodResult], None] | None = None,
    ledger_root: Path | None = None,
) -> SimulationResult:
    """Run ``methods`` on the world at ``world_path``; every method sees the same data and initial model.

    With ``ledger_root`` every node keeps a signed privacy ledger: WorldLM's at
    ``ledger_root/NODE.sqlite``, each baseline's at ``ledger_root/METHOD/NODE.sqlite``.
    """
    start = time.perf_counter()
    if ledger_root is not None and any(Path(ledger_root).rglob("*.sqlite")):
        raise ConfigError(
            f"{ledger_root}: ledgers from an earlier run are there (budgets already spent); "
            "choose a new --out or move them away"
        )
    world = load_world(world_path)
    settings = settings_for(world, rounds=rounds, device=device, seed=seed)
    data, vocab = load_world_data(world, settings)
    results: dict[str, MethodResult] = {}
    for method in methods:
        if on_method:
            on_method(method.name)
        results[method.name] = run_method(
            world, settings, data, vocab, method, ledger_root=ledger_root, on_site=on_site,
            on_round=(lambda rec, m=method.name: on_round(m, rec)) if on_round else None,
        )
        if on_method_done:
            on_method_done(results[method.name])
    floors = {s: d.floor_ppl for s, d in data.items() if d.floor_ppl is not None}
    return SimulationResult(world.name, settings, floors, results, time.perf_counter() - start)
