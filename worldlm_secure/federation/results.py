"""Writing a simulation's results: `results.json` and PNG plots.

`results.json` (stable keys, documented in the README):
    {"world", "entropy_floor_ppl": float|null, "site_floors": {SITE: ppl},
     "methods": {NAME: {"mean_val_ppl", "sites": {SITE: {"val_ppl"}},
                        "rounds": [{"round", "mean_val_ppl", "train_loss"}], "wall_s", "train_s",
                        "protect_s", "bytes_up", "releases", "protocols", "groups", "residual_gains",
                        "epsilon": {STREAM: cumulative ε}, "stopped": str|null}},
     "settings": {...}, "wall_s": float}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worldlm_secure.federation.engine import MethodResult


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
    }


def results_json(result: Any) -> dict[str, Any]:
    s = result.settings
    return {
        "world": result.world,
        "entropy_floor_ppl": result.entropy_floor_ppl,
        "site_floors": dict(sorted(result.floors.items())),
        "methods": {name: method_json(m) for name, m in result.methods.items()},
        "settings": {
            "rounds": s.rounds,
            "seq_len": s.seq_len,
            "seed": s.seed,
            "device": s.device,
            "model": asdict(s.model),
            "train": asdict(s.train),
        },
        "wall_s": result.wall_s,
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    os.replace(tmp, path)


def write_plots(payload: dict[str, Any], out: Path) -> list[Path]:
    """Validation perplexity per round per method, and per-site final perplexity (PNG)."""
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
    paths.append(out / "perplexity_rounds.png")
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
    ax.set_ylabel("final validation perplexity")
    ax.set_title("per-site final validation perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(out / "perplexity_sites.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
