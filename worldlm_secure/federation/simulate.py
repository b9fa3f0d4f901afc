"""`simulate`: run every requested method on one world, in process, and collect the results.

This is the library function behind `worldlm-secure simulate`; tests and notebooks call it directly.
`prepare` does every check a run can fail before its first model is built (world, settings, device,
data: each error names the file, the line and the field); `run_prepared` trains. `simulate` is both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from worldlm_secure.data import get_tokenizer, load_site_streams, make_world_corpus
from worldlm_secure.errors import ConfigError, DataError
from worldlm_secure.federation.engine import Engine, MethodResult, RoundRecord, SiteData
from worldlm_secure.federation.methods import Method
from worldlm_secure.federation.settings import Settings, settings_for
from worldlm_secure.federation.world import World, load_world, split_field, unknown_key_message


@dataclass(frozen=True)
class SimulationResult:
    world: str
    settings: Settings
    floors: dict[str, float]  # site -> exact perplexity floor (synthetic data only)
    methods: dict[str, MethodResult]
    wall_s: float
    vocab_size: int | None = None  # the model's vocabulary (what `results.divergence_bound` scales with)

    @property
    def entropy_floor_ppl(self) -> float | None:
        return float(np.mean(list(self.floors.values()))) if self.floors else None

    def to_dict(self) -> dict[str, Any]:
        """The results.json payload (README "What `simulate` does")."""
        from worldlm_secure.federation.results import results_json

        return results_json(self)

    def save(self, out: str | Path, *, earlier: dict[str, dict[str, Any]] | None = None,
             order: Sequence[str] | None = None) -> Any:
        """Write results.json and the perplexity plots into folder ``out`` (what `worldlm-secure simulate`
        writes); returns `federation.results.SavedResults`. ``earlier``, ``order``: see `save_results`."""
        from worldlm_secure.federation.results import save_results

        return save_results(self, out, earlier=earlier, order=order)


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
    per_site = {s.name: s.data for s in world.sites if s.data is not None} or None
    try:
        streams = _load_streams(world, settings, sites, tok, per_site)
    except DataError as exc:
        raise _data_error(world, settings, per_site, exc) from None
    return {s: SiteData(tr, va) for s, (tr, va) in streams.items()}, tok.vocab_size


def _data_error(world: World, settings: Settings, per_site: dict[str, Path] | None, exc: DataError) -> DataError:
    """The loader's error with the world file's field (and line) it comes from, and the data file."""
    msg = str(exc)
    d = settings.data
    if per_site:
        names = list(world.nodes)  # in the file's order
        hit = next((n for n, p in per_site.items() if str(p) in msg or f"site {n}:" in msg), None)
        field_name = f"nodes[{names.index(hit)}].data" if hit else "nodes"
        return DataError(f"{world.where(field_name)}: {msg}")
    source_field = "data.files.path" if d.files else "data.hub"
    source = Path(world.path.parent, d.files.path) if d.files else d.hub
    if msg.startswith("no data for site(s)"):
        column = (d.files.site_column if d.files else d.site_column) or "site"
        missing = msg[len("no data for site(s) "):].split(":")[0]
        return DataError(f"{world.where(source_field)}: {source} has no rows for site(s) {missing} in its "
                         f"{column!r} column (data.files.site_column); every site needs rows, or its own data: file")
    return DataError(f"{world.where(source_field)}: {msg}")


def _load_streams(world: World, settings: Settings, sites: list[str], tok: Any, per_site: dict[str, Path] | None) -> Any:
    d = settings.data
    files = d.files
    return load_site_streams(
        sites=sites,
        tokenizer=tok,
        seq_len=settings.seq_len,
        val_fraction=files.val_fraction if files else d.val_fraction,
        table_source=(Path(world.path.parent, files.path) if files else d.hub),
        table_format=files.format if files else None,
        hub=files is None and d.hub is not None,
        text_column=files.text_column if files else d.text_column,
        site_column=files.site_column if files else d.site_column,
        per_site=per_site,
    )


def method_ledger_dir(ledger_root: Path | None, method: str) -> Path | None:
    """Where ``method``'s ledgers live: WorldLM's in ``ledger_root``, each baseline's in ``ledger_root/METHOD``."""
    if ledger_root is None:
        return None
    return Path(ledger_root) if method == "worldlm" else Path(ledger_root) / method


def checked_settings(world: World, *, rounds: int | None = None, device: str = "auto", seed: int | None = None) -> Settings:
    """`settings_for` with the error located: ``world.yaml:19 schedule.rouds: unknown key (did you mean
    'rounds'? valid: ...)`` instead of pydantic's bare "Extra inputs are not permitted"."""
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds: must be at least 1 (got {rounds})")
    try:
        return settings_for(world, rounds=rounds, device=device, seed=seed)
    except ConfigError as exc:
        raise _located(world, exc) from None


def _section_models() -> dict[tuple[str, ...], Any]:
    from worldlm_secure.federation import settings as s

    return {("model",): s.ModelSection, ("data",): s.DataSection, ("data", "synthetic"): s.SyntheticSection,
            ("data", "files"): s.FilesSection, ("schedule",): s.ScheduleSection,
            ("aggregation",): s.AggregationSection}


def _located(world: World, exc: ConfigError) -> ConfigError:
    msg = str(exc)
    prefix = f"{world.path} "
    if not msg.startswith(prefix) or ": " not in msg[len(prefix):]:
        return exc
    field_path, rest = msg[len(prefix):].split(": ", 1)
    if " " in field_path:
        return exc
    if rest.startswith("Extra inputs are not permitted"):
        parts = split_field(field_path)
        model = _section_models().get(tuple(p for p in parts[:-1]))
        if model is not None:
            rest = unknown_key_message(str(parts[-1]), model.model_fields)
    return type(exc)(f"{world.where(field_path)}: {rest}")


@dataclass
class Prepared:
    """A world checked and loaded, ready to train: every error a run can hit before training was raised."""

    world: World
    settings: Settings
    data: dict[str, SiteData]
    vocab: int
    device: str  # the device that will be used (``auto`` resolved)
    floors: dict[str, float] = field(default_factory=dict)


def check_device(preference: str) -> str:
    """The device ``preference`` names (``auto`` resolved), or a ConfigError listing the valid ones."""
    from worldlm_secure.train.device import pick_device

    return str(pick_device(preference))


def prepare(world_path: str | Path, *, rounds: int | None = None, device: str = "auto",
            seed: int | None = None) -> Prepared:
    """Load and check everything a run needs, in order: the world (tree, policies, site data files), the
    settings, the device, and every site's data. No model is built."""
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds: must be at least 1 (got {rounds})")
    world = load_world(world_path)
    settings = checked_settings(world, rounds=rounds, device=device, seed=seed)
    resolved = check_device(device)
    data, vocab = load_world_data(world, settings)
    floors = {s: d.floor_ppl for s, d in data.items() if d.floor_ppl is not None}
    return Prepared(world, settings, data, vocab, resolved, floors)


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
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> MethodResult:
    """One method on a loaded world (what `simulate` does per method; the Ray backend runs it in a task).

    ``on_progress`` gets one dict per round: method, round, rounds, loss, ppl, epsilon (the largest
    cumulative ε of any stream so far, or None) and seconds (since the method started).
    """
    start = time.perf_counter()
    engine: Engine | None = None

    def round_done(rec: RoundRecord) -> None:
        if on_round:
            on_round(rec)
        if on_progress:
            eps = dict(engine.release.stats.epsilon) if engine is not None else {}
            on_progress({
                "method": method.name, "round": rec.round, "rounds": settings.rounds, "loss": rec.train_loss,
                "ppl": rec.mean_val_ppl, "epsilon": max(eps.values()) if eps else None,
                "seconds": time.perf_counter() - start,
            })

    engine = Engine(
        world,
        method,
        data,
        settings,
        vocab_size=vocab,
        on_site=on_site,
        on_round=round_done if (on_round or on_progress) else None,
        ledger_dir=method_ledger_dir(ledger_root, method.name),
    )
    return engine.run()


def check_ledgers_fresh(ledger_root: Path | None, methods: Sequence[Method]) -> None:
    """Refuse to run a method whose ledger folder already holds ledgers (their budgets are spent)."""
    if ledger_root is None:
        return
    for m in methods:
        folder = method_ledger_dir(ledger_root, m.name)
        if folder is not None and any(folder.glob("*.sqlite")):
            raise ConfigError(
                f"{folder}: ledgers from an earlier run are there (budgets already spent); "
                "choose a new --out, or --resume / --overwrite it"
            )


def run_prepared(
    prep: Prepared,
    *,
    methods: Sequence[Method],
    on_method: Callable[[str], None] | None = None,
    on_site: Callable[[str, int], None] | None = None,
    on_round: Callable[[str, RoundRecord], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    on_method_done: Callable[[MethodResult], None] | None = None,
    ledger_root: Path | None = None,
) -> SimulationResult:
    """Train ``methods`` on a prepared world, one after the other (``on_method_done`` after each)."""
    start = time.perf_counter()
    check_ledgers_fresh(ledger_root, methods)
    results: dict[str, MethodResult] = {}
    for method in methods:
        if on_method:
            on_method(method.name)
        results[method.name] = run_method(
            prep.world, prep.settings, prep.data, prep.vocab, method, ledger_root=ledger_root, on_site=on_site,
            on_round=partial(on_round, method.name) if on_round else None,
            on_progress=on_progress,
        )
        if on_method_done:
            on_method_done(results[method.name])
    return SimulationResult(prep.world.name, prep.settings, prep.floors, results, time.perf_counter() - start,
                            vocab_size=prep.vocab)


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
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> SimulationResult:
    """Run ``methods`` on the world at ``world_path``; every method sees the same data and initial model.

    With ``ledger_root`` every node keeps a signed privacy ledger: WorldLM's at
    ``ledger_root/NODE.sqlite``, each baseline's at ``ledger_root/METHOD/NODE.sqlite``.
    """
    start = time.perf_counter()
    check_ledgers_fresh(ledger_root, methods)
    prep = prepare(world_path, rounds=rounds, device=device, seed=seed)
    result = run_prepared(prep, methods=methods, on_method=on_method, on_site=on_site, on_round=on_round,
                          on_progress=on_progress, on_method_done=on_method_done, ledger_root=ledger_root)
    return SimulationResult(result.world, result.settings, result.floors, result.methods,
                            time.perf_counter() - start, vocab_size=result.vocab_size)


# ------------------------------------------------------------------------------------- the plan (--dry-run)
def count_model_parameters(settings: Settings, vocab: int, *, trainable: bool = False) -> dict[str, int]:
    """Parameter name -> number of values, from a model built on the ``meta`` device (no memory, no init);
    ``trainable``: only the parameters that train (a pretrained base under adapters is frozen)."""
    import torch
    from dataclasses import replace as dc_replace

    from worldlm_secure.model import build_model

    spec = dc_replace(settings.model, vocab_size=vocab)
    try:
        with torch.device("meta"):
            model = build_model(spec, seed=settings.seed)
    except Exception:  # noqa: BLE001 - an architecture that cannot be built on meta: the tiny real one
        model = build_model(spec, seed=settings.seed)
    return {n: int(p.numel()) for n, p in model.named_parameters() if p.requires_grad or not trainable}


def plan_simulation(prep: Prepared, method: Method | None = None) -> dict[str, Any]:
    """What a run of ``method`` (default: WorldLM) would do, without training: the tree, every site's
    parameter groups, each release (group, from -> to, protocol, DP), each member's planned privacy loss,
    and the float32 bytes sent up per round (before the protocol's expansion). JSON-ready."""
    from worldlm_secure.federation.engine import _layer_override, plan_feasibility, plan_groups, planned_site_releases
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.release import ReleasePath, round_user_dp
    from worldlm_secure.identity import NodeIdentity

    method = method or METHODS["worldlm"]
    world, settings = prep.world, prep.settings
    sizes = count_model_parameters(settings, prep.vocab)
    names = list(sizes)
    groups = plan_groups(method, world, names)
    flat = method.flat or world.is_flat
    root = world.root.name
    key_released = any(g.key for g in groups.values())
    shared_released = any(g.shared for g in groups.values())
    planned = planned_site_releases(settings.rounds, key_released, shared_released)
    path = ReleasePath(world, {n: NodeIdentity.generate(n) for n in world.nodes},
                       layer_override=_layer_override(method, world), ledger_dir=None, planned_releases=planned)

    def count(ns: tuple[str, ...]) -> int:
        return sum(sizes[n] for n in ns)

    members: dict[str, list[str]] = {}
    for s in sorted(world.sites, key=lambda n: n.name):
        members.setdefault(root if flat else str(s.parent), []).append(s.name)
    releases: list[dict[str, Any]] = []
    bytes_up = 0

    def add(group: str, sources: list[str], to: str, final: str, dim: int) -> None:
        nonlocal bytes_up
        plan = path.plan(sources, final)
        dp = round_user_dp(path, sources, final, plan)
        eff = path.effective(sources[0], final)
        record = bool(eff.differential_privacy.record_level)
        releases.append({
            "group": group, "from": sources, "to": to, "values": dim, "protocol": plan.protocol,
            "min_cohort": plan.min_cohort,
            "dp": None if dp is None else {
                "level": "user", "mechanism": dp.mechanism.name, "noise_multiplier": dp.noise_multiplier,
                "clipping_norm": dp.clipping_norm, "budget": dp.budget, "delta": dp.delta},
            "record_level_dp": record,
        })
        bytes_up += 4 * dim * len(sources)

    for agg, sites in members.items():
        g = groups[sites[0]]
        if g.key and not flat:
            add("key", sites, agg, agg, count(g.key))
        if g.shared:
            add("shared", sites, agg, root, count(g.shared))
    if not flat:
        for fed in members:
            if groups[members[fed][0]].shared:
                add("shared", [fed], root, root, count(groups[members[fed][0]].shared))
    per_member: dict[str, dict[str, Any]] = {}
    for s in world.sites:
        dp = path.member_dp(s.name)
        eff = path.effective(s.name, root).differential_privacy
        if dp is not None:
            per_member[s.name] = {"level": "user", "epsilon_planned": float(dp.epsilon_budget),
                                  "delta": float(dp.delta), "releases": planned}
        elif eff.record_level:
            per_member[s.name] = {"level": "record", "epsilon_planned": getattr(eff, "epsilon_budget", None),
                                  "delta": getattr(eff, "delta", None), "releases": planned}
        else:
            per_member[s.name] = {"level": "none", "epsilon_planned": None, "delta": None, "releases": planned}

    first = groups[min(groups)]
    feasible = plan_feasibility(
        path, members, {"key": list(first.key), "shared": list(first.shared)}, sizes, root,
        record=_planned_record_dp(prep, path), trained=sum(count_model_parameters(settings, prep.vocab, trainable=True).values()),
    )

    def node(n: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"name": n.name, "kind": n.kind, "policy": n.policy_path.name}
        if n.kind == "site":
            g = groups[n.name]
            out["groups"] = {"local": count(g.local), "key": count(g.key), "shared": count(g.shared)}
        out["children"] = [node(world.nodes[c]) for c in n.children]
        return out

    return {
        "world": world.name, "file": str(world.path), "method": method.name, "rounds": settings.rounds,
        "seed": settings.seed, "device": prep.device, "parameters": sum(sizes.values()),
        "tree": node(world.root), "releases": releases, "members": per_member,
        "bytes_up_per_round": bytes_up, "releases_per_site": planned,
        # expected signal-to-noise of every DP release, with a warning naming the fixes when DP cannot learn
        "dp_feasibility": [f.to_dict() for f in feasible],
    }


def plan_world(world_path: str | Path, *, rounds: int | None = None, device: str = "cpu",
               seed: int | None = None, method: Method | None = None) -> dict[str, Any]:
    """`prepare` then `plan_simulation`: the plan of a world file (`--dry-run`, `policy check --world`)."""
    return plan_simulation(prepare(world_path, rounds=rounds, device=device, seed=seed), method)


def _planned_record_dp(prep: Prepared, path: Any) -> dict[str, Any]:
    """Site -> `RecordDPParams` of its DP-SGD, for every record-level site (as the engine plans them)."""
    from worldlm_secure.train.private import site_record_dp

    root = prep.world.root.name
    out = {}
    for s in sorted(prep.world.sites, key=lambda n: n.name):
        params = site_record_dp(path.effective(s.name, root),
                                records=int(prep.data[s.name].train.size) // prep.settings.seq_len,
                                cfg=prep.settings.train, rounds=prep.settings.rounds)
        if params is not None:
            out[s.name] = params
    return out
