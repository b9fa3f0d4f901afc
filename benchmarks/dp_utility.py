"""Utility under user-level DP (issue 6): WorldLM vs FedAvg perplexity, ε = 8 vs non-private.

Runs `worldlm_secure.federation.simulate.simulate` with methods worldlm and fedavg on two worlds that
differ only in their nodes' policies (tests/test_examples_dp_world.py keeps them in sync):

    non-private  examples/world.yaml     policies/research-open.yaml (no DP)
    private      examples/world-dp.yaml  examples/policies/dp-eps8.yaml (user-level DP, ε = 8 at δ = 1e-5
                                         per site over the run, clipping norm 1, central Gaussian, z auto)

Same seed, data and initial model in all four runs; the non-private run of each method is the baseline
measured in the same invocation. Every node keeps a signed ledger (in a temporary folder); every ledger is
verified with `worldlm_secure.ledger.verify` and the outcome recorded. Reports per method x world: mean
per-site validation perplexity (and its ratio to the same method's non-private run), the per-round curve,
why training stopped early (if it did), ε spent per site stream, the noise multiplier z the policy's
`auto` derived (read from a site's ledger entry), and the entropy floor of the synthetic data.

Also reported, computed from z, the clipping norm C, the cohort and the group sizes (not measured): the
noise the aggregator adds, set against the largest possible signal, and the noise on the weight sum
the aggregator divides by. The central Gaussian's std per
coordinate on the sum is z * sqrt(C^2 + 1) (the sensitivity includes the weight coordinate, w_max = 1,
protocols/dp.md section 2), so on the average of m members it is at least z * sqrt(C^2 + 1) / m, and its L2
norm over a group of d parameters is about sqrt(d) times that. The average of m clipped updates has norm
at most C. Their ratio says how much of each step is noise.

    python benchmarks/dp_utility.py                 # the world's 20 rounds
    python benchmarks/dp_utility.py --rounds 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from provenance import run_info

from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import SimulationResult, simulate
from worldlm_secure.federation.world import load_world
from worldlm_secure.ledger import read_entries, verify

REPO = Path(__file__).resolve().parent.parent
WORLDS = {
    "non-private": REPO / "examples" / "world.yaml",
    "private": REPO / "examples" / "world-dp.yaml",
}
METHOD_NAMES = ("worldlm", "fedavg")
OUT = REPO / "benchmarks" / "results" / "dp_utility.json"


def ledger_dir(root: Path, method: str) -> Path:
    """Where simulate puts a method's ledgers: WorldLM's at the root, each baseline's in a subfolder."""
    return root if method == "worldlm" else root / method


def verify_ledgers(folder: Path) -> dict[str, Any]:
    """Verify every ledger file directly in ``folder``; the problems of any that fail."""
    files = sorted(folder.glob("*.sqlite"))
    reports = {f.stem: verify(f) for f in files}
    return {
        "files": len(files),
        "entries": sum(r.total_rows for r in reports.values()),
        "all_verified": bool(files) and all(r.ok for r in reports.values()),
        "problems": {n: r.summary() for n, r in reports.items() if not r.ok},
    }


def dp_release(folder: Path, sites: list[str]) -> dict[str, Any] | None:
    """The first user-level DP release in a site's ledger: what the policy's `auto` derived, and the
    number of tensors of every group that site released under DP (from the ledger's tensor_names)."""
    for site in sites:
        path = folder / f"{site}.sqlite"
        if not path.exists():
            continue
        entries = [e for e in read_entries(path) if e.dp_level == "user" and e.noise_multiplier]
        tensors = {e.group: len(e.tensor_names) for e in entries}
        if entries:
            e = entries[0]
            return {
                "tensors_per_group": tensors,
                "site": site,
                "noise_multiplier": float(e.noise_multiplier),
                "clipping_norm": float(e.clipping_norm),
                "cohort_size": int(e.cohort_size),
                "sample_rate": e.sample_rate,
                "accountant": e.accountant,
                "delta": e.delta,
                "epsilon_budget": e.epsilon_budget,
                "epsilon_per_release": e.epsilon,
                "mechanism": e.mechanism,
                "protocol": e.protocol,
            }
    return None


def noise_vs_signal(release: dict[str, Any], groups: dict[str, int]) -> dict[str, Any]:
    """Analytic noise against the largest possible signal, per released group (see the module doc)."""
    z, c, m = release["noise_multiplier"], release["clipping_norm"], release["cohort_size"]
    std_sum = z * math.sqrt(c * c + 1.0)
    std_avg = std_sum / m  # lower bound: the sum of weights is at most m (w <= w_max = 1)
    out: dict[str, Any] = {
        "noise_std_per_coordinate_on_sum": std_sum,
        "noise_std_per_coordinate_on_average_at_least": std_avg,
        "signal_norm_of_average_at_most": c,
        "groups": {},
    }
    for group, d in groups.items():
        if group == "local" or d == 0:
            continue
        noise_norm = std_avg * math.sqrt(d)
        row: dict[str, Any] = {
            "parameters": d,
            "signal_per_coordinate_rms_at_most": c / math.sqrt(d),
            "noise_norm_on_average_at_least": noise_norm,
            "noise_to_signal_norm_at_least": noise_norm / c,
        }
        n_tensors = release["tensors_per_group"].get(group)
        if n_tensors:
            # The aggregator divides each tensor's noisy sum by that tensor's noisy weight sum. The codec sends
            # weights scaled by 1/sqrt(L) and multiplies back, so that denominator's noise std is sqrt(L) times
            # the per-coordinate std, against a true weight sum of at most m (aggregation/weighted.py).
            w_std = std_sum * math.sqrt(n_tensors)
            row.update(
                tensors=n_tensors,
                weight_sum_at_most=m,
                weight_sum_noise_std=w_std,
                p_weight_sum_nonpositive_at_least=0.5 * math.erfc(m / w_std / math.sqrt(2.0)),
            )
        out["groups"][group] = row
    return out


def summarize(world_label: str, world: Path, result: SimulationResult, ledgers: Path) -> dict[str, dict[str, Any]]:
    sites = sorted(s.name for s in load_world(world).sites)
    rows: dict[str, dict[str, Any]] = {}
    for name, m in result.methods.items():
        folder = ledger_dir(ledgers, name)
        release = dp_release(folder, sites)
        rows[name] = {
            "method": name,
            "world": world_label,
            "world_file": str(world.relative_to(REPO)),
            "mean_val_ppl": m.mean_val_ppl,
            "site_ppl": dict(sorted(m.sites.items())),
            "curve": [{"round": r.round, "mean_val_ppl": r.mean_val_ppl, "train_loss": r.train_loss} for r in m.rounds],
            "rounds_completed": len(m.rounds) and m.rounds[-1].round,
            "stopped": m.stopped,
            "epsilon_spent": dict(sorted(m.stats.epsilon.items())),
            "epsilon_spent_max": max(m.stats.epsilon.values()) if m.stats.epsilon else 0.0,
            "dp_release": release,
            "noise_multiplier": release["noise_multiplier"] if release else None,
            "noise_vs_signal": noise_vs_signal(release, m.groups) if release else None,
            "groups": dict(m.groups),
            "releases": m.stats.releases,
            "by_protocol": dict(m.stats.by_protocol),
            "wall_s": m.wall_s,
            "ledgers": verify_ledgers(folder),
        }
    return rows




def render(results: dict[str, dict[str, dict[str, Any]]], floor: float | None, console: Console) -> None:
    t = Table(title=f"Utility under user-level DP (ε=8, δ=1e-5) on the default world; entropy floor ppl {floor:.3f}"
              if floor is not None else "Utility under user-level DP (ε=8, δ=1e-5) on the default world")
    for col in ("method", "world", "mean val ppl", "x non-private", "rounds", "z", "max ε spent",
                "noise/signal (shared)", "P(Σw<=0) (shared)", "stopped", "ledgers"):
        t.add_column(col, justify="right")
    for method in METHOD_NAMES:
        base = results.get("non-private", {}).get(method)
        for label in WORLDS:
            r = results.get(label, {}).get(method)
            if r is None:
                continue
            nvs = r["noise_vs_signal"]
            shared = nvs["groups"].get("shared") if nvs else None
            t.add_row(
                method,
                label,
                f"{r['mean_val_ppl']:.3f}",
                f"{r['mean_val_ppl'] / base['mean_val_ppl']:.3f}" if base else "-",
                str(r["rounds_completed"]),
                "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}",
                f"{r['epsilon_spent_max']:.3f}",
                "-" if shared is None else f">= {shared['noise_to_signal_norm_at_least']:.0f}",
                "-" if shared is None or "tensors" not in shared else f">= {shared['p_weight_sum_nonpositive_at_least']:.2f}",
                r["stopped"] or "-",
                f"{r['ledgers']['files']} {'ok' if r['ledgers']['all_verified'] else 'FAILED'}",
            )
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: the world's, 20)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the worlds', 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for the tiny model)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--worlds", default=",".join(WORLDS), help=f"comma-separated subset of {','.join(WORLDS)}")
    ap.add_argument("--ledgers", type=Path, default=None,
                    help="keep every node's ledger under DIR/<world>/ (default: a temporary folder, deleted at the end)")
    args = ap.parse_args(argv)
    worlds = {w.strip(): WORLDS.get(w.strip()) for w in args.worlds.split(",") if w.strip()}
    if not worlds or None in worlds.values():
        ap.error(f"--worlds: valid names are {', '.join(WORLDS)} (got {args.worlds!r})")
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    meta: dict[str, Any] = {
        **run_info("dp_utility", argv),
        "torch": torch.__version__,
        "torch_threads": args.threads,
        "methods": list(METHOD_NAMES),
        "worlds": {k: str(v.relative_to(REPO)) for k, v in worlds.items()},
        "ledgers_kept_in": None if args.ledgers is None else str(args.ledgers),
        "note": "same seed, data and initial model in every run; ratios are to the same method's non-private run",
    }
    results: dict[str, dict[str, dict[str, Any]]] = {}
    floor: float | None = None
    for label, world in worlds.items():
        console.print(f"[bold]{label}[/] ({world.name}): simulate worldlm, fedavg ...")
        with tempfile.TemporaryDirectory() as scratch:
            ledgers = Path(scratch) / "ledgers" if args.ledgers is None else args.ledgers / label
            result = simulate(
                world, methods=[METHODS[m] for m in METHOD_NAMES], rounds=args.rounds, device="cpu",
                seed=args.seed, ledger_root=ledgers,
                on_round=lambda m, rec: console.print(f"  {m} round {rec.round}: mean val ppl {rec.mean_val_ppl:.3f}"),
            )
            results[label] = summarize(label, world, result, ledgers)
        floor = result.entropy_floor_ppl
        meta["rounds"] = result.settings.rounds
        for m, r in results[label].items():
            console.print(f"  {m}: mean val ppl {r['mean_val_ppl']:.3f}, stopped: {r['stopped']}, "
                          f"ledgers verified: {r['ledgers']['all_verified']}")
        all_ok = all(r["ledgers"]["all_verified"] for w in results.values() for r in w.values())
        doc = {**meta, "entropy_floor_ppl": floor, "all_ledgers_verified": all_ok, "results": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, args.out)  # after every world, so an interrupted run keeps what finished
    render(results, floor, console)
    console.print(f"wrote {args.out}")
    bad = [f"{w}/{m}" for w, rows in results.items() for m, r in rows.items() if not r["ledgers"]["all_verified"]]
    if bad:
        console.print(f"[red]ledgers that did not verify: {', '.join(bad)}[/]")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
