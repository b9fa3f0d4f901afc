"""Writing a simulation's results: `results.json` and PNG plots (`save_results`, behind
`SimulationResult.save` and `worldlm-secure simulate`).

`results.json` (stable keys, documented in the README):
    {"world", "entropy_floor_ppl": float|null, "site_floors": {SITE: ppl},
     "vocab_size": int|null, "diverged_above_ppl": float|null,
     "methods": {NAME: {"mean_val_ppl", "sites": {SITE: {"val_ppl"}},
                        "rounds": [{"round", "mean_val_ppl", "train_loss"}], "wall_s", "train_s",
                        "protect_s", "bytes_up", "releases", "protocols", "groups", "residual_gains",
                        "epsilon": {STREAM: cumulative ε}, "stopped": str|null,
                        "diverged": str|null}},
     "settings": {...}, "wall_s": float}

**Divergence.** A method has diverged when a perplexity it reports is not finite, or exceeds
`DIVERGENCE_FACTOR` (2) times the vocabulary size: a model that guesses uniformly over the vocabulary
scores exactly the vocabulary size, so a perplexity above twice that is worse than knowing nothing (e.g.
DP noise that overwhelmed the update). Its ``diverged`` field says why; the table flags it and the plots
switch to a log scale. Without a known vocabulary only non-finite values count.

Light at import (json, os): the CLI and `world up` import this module without torch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the engine imports torch; this module must not
    from worldlm_secure.federation.engine import MethodResult

DIVERGENCE_FACTOR = 2.0
RESULTS_FILE = "results.json"
PLOT_FILES = ("perplexity_rounds.png", "perplexity_sites.png")


@dataclass(frozen=True)
class SavedResults:
    """What `save_results` wrote: the results.json payload, its path and the plots."""

    payload: dict[str, Any]
    results: Path
    plots: list[Path]


def save_results(
    result: Any,
    out: str | Path,
    *,
    earlier: Mapping[str, dict[str, Any]] | None = None,
    order: Sequence[str] | None = None,
) -> SavedResults:
    """Write ``result`` (a `SimulationResult`) into folder ``out``: results.json (atomically) and the plots.

    ``earlier``: methods (their `method_json`) an interrupted run into ``out`` finished (``--resume``);
    ``order``: the order of the methods in the file and the plots (default: earlier ones, then the run's).
    """
    out = Path(out)
    payload = results_json(result, earlier=dict(earlier or {}))
    if order is not None:
        payload["methods"] = {n: payload["methods"][n] for n in order if n in payload["methods"]}
    if earlier:
        payload["resumed_from_earlier_run"] = list(earlier)
    write_json_atomic(out / RESULTS_FILE, payload)
    return SavedResults(payload, out / RESULTS_FILE, write_plots(payload, out))


def divergence_bound(vocab_size: int | None) -> float | None:
    """The perplexity above which a run counts as diverged (None: only non-finite values do)."""
    return DIVERGENCE_FACTOR * vocab_size if vocab_size else None


def divergence(method: dict[str, Any], bound: float | None) -> str | None:
    """Why the method (its `method_json`) diverged, or None."""
    for r in method.get("rounds", []):
        v = r.get("mean_val_ppl")
        if v is None or not math.isfinite(v):
            return f"perplexity is not finite at round {r.get('round')}"
        if bound is not None and v > bound:
            return f"perplexity {v:.3g} at round {r.get('round')} exceeds {bound:g} (2 x the vocabulary size)"
    v = method.get("mean_val_ppl")
    if v is None or not math.isfinite(v):
        return "final perplexity is not finite"
    if bound is not None and v > bound:
        return f"final perplexity {v:.3g} exceeds {bound:g} (2 x the vocabulary size)"
    return None


def fmt_ppl(value: float | None) -> str:
    """A perplexity for a table: two decimals, or 3 significant digits when huge (never 130 digits)."""
    if value is None or not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"


def method_json(m: MethodResult) -> dict[str, Any]:
    return {
        "mean_val_ppl": m.mean_val_ppl,
        "sites": {s: {"val_ppl": v} for s, v in sorted(m.sites.items())},
        "rounds": [{"round": r.round, "mean_val_ppl": r.mean_val_ppl, "train_loss": r.train_loss} for r in m.rounds],
        "wall_s": m.wall_s,
        "train_s": m.train_s,
        "protect_s": m.stats.protect_seconds,
        "bytes_up": m.stats.bytes_up,
        "releases": m.stats.releases,
        "protocols": dict(m.stats.by_protocol),
        "groups": m.groups,
        "residual_gains": m.residual_gains,
        "epsilon": dict(m.stats.epsilon),
        "stopped": m.stopped,
        "policy_layers_overridden": m.name != "worldlm",
        # predicted before training (privacy.feasibility): expected signal-to-noise of every DP release
        "dp_feasibility": [f.to_dict() for f in getattr(m, "feasibility", [])],
        "dp_warnings": list(getattr(m, "dp_warnings", [])),
        "base_hash": getattr(m, "base_hash", None),  # SHA-256 of the pretrained base weights (model.pretrained)
    }


def flag_divergence(payload: dict[str, Any]) -> dict[str, Any]:
    """Set every method's ``diverged`` (reason or None) from the payload's ``diverged_above_ppl``."""
    bound = payload.get("diverged_above_ppl")
    for m in payload.get("methods", {}).values():
        m["diverged"] = divergence(m, bound)
    return payload


def results_json(result: Any, earlier: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The results.json payload; ``earlier``: methods (their `method_json`) finished by an earlier,
    interrupted run into the same folder (``--resume``), listed first."""
    s = result.settings
    vocab = getattr(result, "vocab_size", None)
    methods = dict(earlier or {})
    methods.update({name: method_json(m) for name, m in result.methods.items()})
    return flag_divergence({
        "world": result.world,
        "entropy_floor_ppl": result.entropy_floor_ppl,
        "site_floors": dict(sorted(result.floors.items())),
        "vocab_size": vocab,
        "diverged_above_ppl": divergence_bound(vocab),
        "methods": methods,
        "settings": {
            "rounds": s.rounds,
            "seq_len": s.seq_len,
            "seed": s.seed,
            "device": s.device,
            "model": asdict(s.model),
            "train": asdict(s.train),
        },
        "wall_s": result.wall_s,
    })


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_plots(payload: dict[str, Any], out: Path) -> list[Path]:
    """Validation perplexity per round per method, and per-site final perplexity (PNG, `PLOT_FILES`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    floor = payload.get("entropy_floor_ppl")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in payload["methods"].items():
        ax.plot([r["round"] for r in m["rounds"]], [r["mean_val_ppl"] for r in m["rounds"]], marker="o", ms=3, label=name)
    if floor:
        ax.axhline(floor, color="grey", ls="--", lw=1, label=f"entropy floor ({floor:.1f})")
    ax.set_xlabel("round")
    ax.set_ylabel("mean per-site validation perplexity")
    ax.set_yscale("log")
    ax.set_title(f"{payload['world']}: validation perplexity per round")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(out / PLOT_FILES[0])
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    methods = list(payload["methods"])
    sites = sorted({s for m in payload["methods"].values() for s in m["sites"]})
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(sites) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, name in enumerate(methods):
        vals = [payload["methods"][name]["sites"].get(s, {}).get("val_ppl", float("nan")) for s in sites]
        ax.bar([j + i * width for j in range(len(sites))], vals, width, label=name)
    if floor:
        ax.axhline(floor, color="grey", ls="--", lw=1, label="entropy floor")
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(sites))], sites, rotation=30, ha="right")
    values = [v.get("val_ppl") for m in payload["methods"].values() for v in m["sites"].values()]
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    if any(m.get("diverged") for m in payload["methods"].values()) or (finite and max(finite) > 100 * min(finite)):
        ax.set_yscale("log")  # one diverged method would flatten every other bar to zero
    ax.set_ylabel("final validation perplexity")
    ax.set_title("per-site final validation perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out / PLOT_FILES[1])
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
