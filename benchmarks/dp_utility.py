"""Utility under differential privacy (issues 6 and 14): mean per-site validation perplexity of WorldLM,
FedAvg and local-only training under DP, each beside its non-private run (same seed, data, initial model,
schedule; only the nodes' policies differ).

Parts (`--part`, comma-separated, or `all`), each a list of runs; a run is one world x one policy variant:

    record        record level (Opacus DP-SGD inside each site) on the default world (examples/world.yaml),
                  eps in {1, 4, 8}: examples/world-record-dp.yaml (examples/policies/record-dp.yaml, eps 8) and
                  the same world with examples/policies/record-dp-eps4.yaml / record-dp-eps1.yaml
    user-default  user level (one site = one unit) on the default world at eps 8: examples/world-dp.yaml
                  (policies/dp-eps8.yaml, central Gaussian). The low-SNR feasibility warning is expected.
    user100       user level on examples/world-100-sites.yaml (one federation of 100 small sites, a 2k-parameter
                  model): examples/world-100-sites-dp.yaml (policies/sites100-dp-eps8.yaml, central Gaussian),
                  the same world with sites100-dp-eps1.yaml (central, eps 1); and distributed Skellam noise over
                  pairwise masking at eps 8 on examples/world-100-sites-skellam.yaml (the same sites as two
                  federations of 50: the shares are sized for min_cohort, which must be near the cohort and at
                  most each aggregator's children) beside the same tree under research-open

The non-private baselines (`default/non-private`, `sites100/non-private`) run with the first part that needs
them. A variant without its own world file is the shipped DP world with every node's policy replaced (a
temporary world file naming the policy by absolute path): nothing else changes.

Each method of each run is one `simulate` call (so one crash loses at most one method) and the JSON is
rewritten after each, merged into what `--out` already holds (runs are keyed `WORLD/VARIANT`, methods by
name), so parts can be run separately. Every node keeps a signed ledger (a temporary folder unless
`--ledgers DIR`); every ledger is verified with `worldlm_secure.ledger.verify` and the outcome recorded.
Per method and run: mean per-site validation perplexity and its ratio to the same method's non-private run,
the per-round curve, whether it diverged (the engine's rule: not finite or above 2 x vocabulary) or stopped,
eps spent per stream, the noise multiplier z and clip read from the ledger, the expected signal-to-noise
of every DP release and whether the feasibility warning fired (`MethodResult.feasibility`, computed by
`federation.engine.plan_feasibility` before training), and the seconds the run took.

Run from the repository root:

    python benchmarks/dp_utility.py --part all --threads 1
    python benchmarks/dp_utility.py --part user100 --methods worldlm --rounds 2 --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from provenance import run_info

from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.results import divergence, divergence_bound
from worldlm_secure.federation.simulate import simulate
from worldlm_secure.federation.world import load_world
from worldlm_secure.ledger import read_entries, verify

REPO = Path(__file__).resolve().parent.parent
EX = REPO / "examples"
POL = EX / "policies"
OUT = REPO / "benchmarks" / "results" / "dp_utility.json"
METHOD_NAMES = ("worldlm", "fedavg", "local")

# run id -> (part, world file, policy replacing every node's (None: the world's own), what it is)
RUNS: dict[str, dict[str, Any]] = {
    "default/non-private": {"world": EX / "world.yaml", "policy": None, "level": "none", "epsilon": None,
                            "mechanism": None, "baseline": None},
    "default/record-eps8": {"world": EX / "world-record-dp.yaml", "policy": None, "level": "record", "epsilon": 8.0,
                            "mechanism": "dp_sgd", "baseline": "default/non-private"},
    "default/user-eps8": {"world": EX / "world-dp.yaml", "policy": None, "level": "user", "epsilon": 8.0,
                          "mechanism": "central_gaussian", "baseline": "default/non-private"},
    "sites100/non-private": {"world": EX / "world-100-sites.yaml", "policy": None, "level": "none", "epsilon": None,
                             "mechanism": None, "baseline": None},
    "sites100/user-eps8-central": {"world": EX / "world-100-sites-dp.yaml", "policy": None, "level": "user",
                                   "epsilon": 8.0, "mechanism": "central_gaussian",
                                   "baseline": "sites100/non-private"},
    # distributed noise needs a root with >= 2 children (world-100-sites-skellam.yaml: 2 x 50 sites), so its own
    # baseline: the same tree with every node under research-open
    "sites100x2/non-private": {"world": EX / "world-100-sites-skellam.yaml", "policy": REPO / "policies" / "research-open.yaml",
                               "level": "none", "epsilon": None, "mechanism": None, "baseline": None},
    "sites100x2/user-eps8-skellam": {"world": EX / "world-100-sites-skellam.yaml", "policy": None, "level": "user",
                                     "epsilon": 8.0, "mechanism": "distributed_skellam",
                                     "baseline": "sites100x2/non-private"},
    "sites100/user-eps1-central": {"world": EX / "world-100-sites-dp.yaml", "policy": POL / "sites100-dp-eps1.yaml",
                                   "level": "user", "epsilon": 1.0, "mechanism": "central_gaussian",
                                   "baseline": "sites100/non-private"},
    "default/record-eps4": {"world": EX / "world-record-dp.yaml", "policy": POL / "record-dp-eps4.yaml",
                            "level": "record", "epsilon": 4.0, "mechanism": "dp_sgd",
                            "baseline": "default/non-private"},
    "default/record-eps1": {"world": EX / "world-record-dp.yaml", "policy": POL / "record-dp-eps1.yaml",
                            "level": "record", "epsilon": 1.0, "mechanism": "dp_sgd",
                            "baseline": "default/non-private"},
}
# `--part all` runs in this order: the issue's priorities (record eps 8 and the baselines, then the default
# world at user level, then the 100-site world at eps 8), then the rest.
PARTS: dict[str, list[str]] = {
    "record": ["default/non-private", "default/record-eps8", "default/record-eps4", "default/record-eps1"],
    "user-default": ["default/non-private", "default/user-eps8"],
    "user100": ["sites100/non-private", "sites100/user-eps8-central", "sites100/user-eps1-central",
                "sites100x2/non-private", "sites100x2/user-eps8-skellam"],
}
ALL_ORDER = ["default/non-private", "default/record-eps8", "default/user-eps8", "sites100/non-private",
             "sites100/user-eps8-central", "sites100/user-eps1-central", "sites100x2/non-private",
             "sites100x2/user-eps8-skellam",
             "default/record-eps4", "default/record-eps1"]


def variant_world(run: dict[str, Any], scratch: Path) -> Path:
    """The run's world file: the shipped one, or a copy beside nothing with every node's policy replaced by
    ``run["policy"]`` (absolute path) and ``-VARIANT`` appended to its name. Data, model, schedule, tree: as is."""
    world = run["world"]
    if run["policy"] is None:
        return world
    doc = yaml.safe_load(world.read_text())
    doc["name"] = f"{doc['name']}-{run['policy'].stem}"
    config = (doc.get("model") or {}).get("config")
    if config and (world.parent / config).exists():  # the copy lives elsewhere: keep the model config it names
        doc["model"]["config"] = str((world.parent / config).resolve())
    for node in doc["nodes"]:
        node["policy"] = str(run["policy"])
    out = scratch / f"{world.stem}-{run['policy'].stem}.yaml"
    out.write_text(f"# {world.name} with every node under {run['policy'].relative_to(REPO)} (benchmarks/dp_utility.py)\n"
                   + yaml.safe_dump(doc, sort_keys=False))
    return out


def ledger_dir(root: Path, method: str) -> Path:
    """Where simulate puts a method's ledgers: WorldLM's at the root, each baseline's in a subfolder."""
    return root if method == "worldlm" else root / method


def verify_ledgers(folder: Path) -> dict[str, Any]:
    """Verify every ledger file directly in ``folder``; the problems of any that fail."""
    files = sorted(folder.glob("*.sqlite")) if folder.is_dir() else []
    reports = {f.stem: verify(f) for f in files}
    return {
        "files": len(files),
        "entries": sum(r.total_rows for r in reports.values()),
        "verified_entries": sum(len(r.entries) for r in reports.values()),
        "all_verified": all(r.ok for r in reports.values()),  # vacuously true when nothing was released
        "problems": {n: r.summary() for n, r in reports.items() if not r.ok},
    }


def dp_releases(folder: Path, sites: list[str]) -> dict[str, Any] | None:
    """What the ledgers record about the DP of the releases: the first user- and record-level entries of the
    first site that has them (z, clip, cohort, q, steps, mechanism, protocol) and the range of z over all
    sites' user-level entries (adaptive/distributed noise can make it vary)."""
    out: dict[str, Any] = {}
    zs: list[float] = []
    for site in sites:
        path = folder / f"{site}.sqlite"
        if not path.exists():
            continue
        for e in read_entries(path):
            if e.dp_level not in ("user", "record") or not e.noise_multiplier:
                continue
            if e.dp_level == "user":
                zs.append(float(e.noise_multiplier))
            if e.dp_level in out:
                continue
            out[e.dp_level] = {
                "site": site, "group": e.group, "mechanism": e.mechanism, "protocol": e.protocol,
                "noise_multiplier": float(e.noise_multiplier), "clipping_norm": float(e.clipping_norm),
                "cohort_size": int(e.cohort_size), "sample_rate": e.sample_rate, "steps": e.steps,
                "accountant": e.accountant, "delta": e.delta, "epsilon_budget": e.epsilon_budget,
                "epsilon_of_this_entry": e.epsilon,
            }
    if zs:
        out["user_noise_multiplier_min_max"] = [min(zs), max(zs)]
    return out or None


def summarize(run_id: str, run: dict[str, Any], world: Path, m: Any, ledgers: Path, seconds: float,
              vocab: int | None) -> dict[str, Any]:
    sites = sorted(s.name for s in load_world(world).sites)
    folder = ledger_dir(ledgers, m.name)
    rel = dp_releases(folder, sites)
    feas = [f.to_dict() for f in m.feasibility]
    curve = [{"round": r.round, "mean_val_ppl": r.mean_val_ppl, "train_loss": r.train_loss} for r in m.rounds]
    mj = {"rounds": curve, "mean_val_ppl": m.mean_val_ppl}
    z = None
    if rel:
        z = (rel.get("user") or rel.get("record") or {}).get("noise_multiplier")
    return {
        "method": m.name,
        "run": run_id,
        "level": run["level"],
        "epsilon_budget": run["epsilon"],
        "mechanism": run["mechanism"],
        "world_file": str(run["world"].relative_to(REPO)),
        "policy_replaced_by": None if run["policy"] is None else str(run["policy"].relative_to(REPO)),
        "mean_val_ppl": m.mean_val_ppl,
        "site_ppl": dict(sorted(m.sites.items())),
        "curve": curve,
        "rounds_completed": curve[-1]["round"] if curve else 0,
        "stopped": m.stopped,
        "diverged": divergence(mj, divergence_bound(vocab)),
        "epsilon_spent": dict(sorted(m.stats.epsilon.items())),
        "epsilon_spent_max": max(m.stats.epsilon.values()) if m.stats.epsilon else 0.0,
        "noise_multiplier": z,
        "dp_releases": rel,
        "feasibility": feas,
        "feasibility_warning_fired": bool(m.dp_warnings),
        "feasibility_min_snr": min((f["snr"] for f in feas), default=None),
        "groups": dict(m.groups),
        "releases": m.stats.releases,
        "by_protocol": dict(m.stats.by_protocol),
        "seconds": seconds,
        "engine_wall_s": m.wall_s,
        "ledgers": verify_ledgers(folder),
    }


def ratios(doc: dict[str, Any]) -> None:
    """Fill every DP row's ratio to the same method's non-private run (when that exists)."""
    for run_id, rows in doc["runs"].items():
        base_id = RUNS.get(run_id, {}).get("baseline")
        for name, r in rows.items():
            base = doc["runs"].get(base_id, {}).get(name) if base_id else None
            r["non_private_ppl"] = base["mean_val_ppl"] if base else None
            ok = base and all(math.isfinite(x) for x in (r["mean_val_ppl"], base["mean_val_ppl"]))
            r["ratio_to_non_private"] = r["mean_val_ppl"] / base["mean_val_ppl"] if ok else None


def table(doc: dict[str, Any]) -> str:
    lines = ["| run | method | ε | mean val ppl | non-private | ratio | z | max ε spent | min SNR | warning | "
             "diverged | s | ledgers |", "|" + "---|" * 13]
    for run_id, rows in doc["runs"].items():
        for name, r in rows.items():
            f = (lambda v, p=".2f": "-" if v is None else format(v, p))
            lines.append(
                f"| {run_id} | {name} | {f(r['epsilon_budget'], 'g')} | {f(r['mean_val_ppl'], '.4g')} | "
                f"{f(r.get('non_private_ppl'), '.4g')} | {f(r.get('ratio_to_non_private'), '.3g')} | "
                f"{f(r['noise_multiplier'], '.3f')} | {f(r['epsilon_spent_max'], '.2f')} | "
                f"{f(r['feasibility_min_snr'], '.3g')} | {'yes' if r['feasibility_warning_fired'] else 'no'} | "
                f"{'yes' if r['diverged'] else 'no'} | {r['seconds']:.0f} | "
                f"{r['ledgers']['files']} {'ok' if r['ledgers']['all_verified'] else 'FAILED'} |")
    return "\n".join(lines)


def write(doc: dict[str, Any], out: Path) -> None:
    ratios(doc)
    doc["all_ledgers_verified"] = all(r["ledgers"]["all_verified"] for rows in doc["runs"].values()
                                      for r in rows.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", help=f"comma-separated {', '.join(PARTS)}, or all")
    ap.add_argument("--runs", default=None, help=f"comma-separated run ids instead of --part ({', '.join(RUNS)})")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default: each world's, 20)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: the worlds', 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these models)")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON to write; runs already in it are kept (merged)")
    ap.add_argument("--skip-done", action="store_true", help="skip a run x method already in --out")
    ap.add_argument("--ledgers", type=Path, default=None,
                    help="keep every node's ledger under DIR/<run>/ (default: a temporary folder, deleted at the end)")
    args = ap.parse_args(argv)
    if args.runs:
        run_ids = [r.strip() for r in args.runs.split(",") if r.strip()]
    else:
        parts = [p.strip() for p in args.part.split(",") if p.strip()]
        if parts == ["all"]:
            run_ids = list(ALL_ORDER)
        else:
            bad = [p for p in parts if p not in PARTS]
            if bad:
                ap.error(f"--part: valid names are {', '.join(PARTS)}, all (got {', '.join(bad)})")
            run_ids = list(dict.fromkeys(r for p in parts for r in PARTS[p]))
    if any(r not in RUNS for r in run_ids):
        ap.error(f"--runs: valid ids are {', '.join(RUNS)}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if any(m not in METHODS for m in methods):
        ap.error(f"--methods: valid names are {', '.join(METHODS)}")
    os.chdir(REPO)  # examples/world-100-sites.yaml names its model config relative to the repository root
    torch.set_num_threads(args.threads)
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    if doc.get("benchmark") != "dp_utility" or "runs" not in doc:
        doc = {"runs": {}}
    invocations = doc.get("invocations", [])
    this = {**run_info("dp_utility", argv), "torch": torch.__version__, "torch_threads": args.threads,
            "runs": run_ids, "methods": methods, "rounds": args.rounds}
    doc.update({
        "benchmark": "dp_utility",
        "note": ("mean per-site validation perplexity; ratio = DP run / the same method's non-private run on the same "
                 "world (same seed, data, initial model, schedule); seconds = wall time of that method's simulate call "
                 "on one torch thread; z and clip as recorded in the ledgers; SNR = n/(z*sqrt(d)) per DP release "
                 "(protocols/dp.md section 9)"),
        "run_definitions": {k: {"world": str(v["world"].relative_to(REPO)),
                                "policy_replaced_by": None if v["policy"] is None else str(v["policy"].relative_to(REPO)),
                                "level": v["level"], "epsilon_budget": v["epsilon"], "mechanism": v["mechanism"],
                                "baseline": v["baseline"]} for k, v in RUNS.items()},
        "invocations": [*invocations, this],
    })
    doc.setdefault("runs", {})
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for run_id in run_ids:
            run = RUNS[run_id]
            world = variant_world(run, scratch)
            for method in methods:
                if args.skip_done and method in doc["runs"].get(run_id, {}):
                    print(f"{run_id} {method}: already in {args.out}, skipped", flush=True)
                    continue
                base = (args.ledgers if args.ledgers is not None else scratch / "ledgers") / run_id.replace("/", "_")
                ledgers = base / method
                if ledgers.exists():
                    import shutil

                    shutil.rmtree(ledgers)
                print(f"{run_id} {method}: simulate {world.name} ...", flush=True)
                t0 = time.perf_counter()
                partial: list[dict[str, Any]] = []

                def on_round(n: str, rec: Any, run_id: str = run_id, method: str = method,
                             partial: list[dict[str, Any]] = partial, t0: float = t0) -> None:
                    # the curve so far, in "unfinished" (dropped when the method finishes): a run stopped at the
                    # deadline still says how far it got
                    print(f"  {n} round {rec.round}: mean val ppl {rec.mean_val_ppl:.3f}", flush=True)
                    partial.append({"round": rec.round, "mean_val_ppl": rec.mean_val_ppl, "train_loss": rec.train_loss,
                                    "seconds": time.perf_counter() - t0})
                    doc.setdefault("unfinished", {}).setdefault(run_id, {})[method] = {
                        "curve": list(partial), "git_commit": this["git_commit"],
                        "note": "interrupted before its last round: not a result, only the curve so far"}
                    write(doc, args.out)

                result = simulate(world, methods=[METHODS[method]], rounds=args.rounds, device="cpu", seed=args.seed,
                                  ledger_root=ledgers, on_round=on_round)
                seconds = time.perf_counter() - t0
                unfinished = doc.get("unfinished", {})
                unfinished.get(run_id, {}).pop(method, None)
                if run_id in unfinished and not unfinished[run_id]:
                    del unfinished[run_id]
                if "unfinished" in doc and not doc["unfinished"]:
                    del doc["unfinished"]
                row = summarize(run_id, run, world, result.methods[method], ledgers, seconds, result.vocab_size)
                row["entropy_floor_ppl"] = result.entropy_floor_ppl
                row["rounds_planned"] = result.settings.rounds
                row["git_commit"] = this["git_commit"]
                row["date_utc"] = run_info("dp_utility", argv)["date_utc"]
                doc["runs"].setdefault(run_id, {})[method] = row
                write(doc, args.out)  # after every method: an interrupted run keeps what finished
                print(f"{run_id} {method}: mean val ppl {row['mean_val_ppl']:.4g}, ratio "
                      f"{row.get('ratio_to_non_private')}, z {row['noise_multiplier']}, eps {row['epsilon_spent_max']:.3f}, "
                      f"warning {row['feasibility_warning_fired']}, diverged {row['diverged']}, stopped {row['stopped']}, "
                      f"ledgers {row['ledgers']['files']} verified {row['ledgers']['all_verified']}, {seconds:.0f} s",
                      flush=True)
                if not row["ledgers"]["all_verified"]:
                    failed.append(f"{run_id}/{method}")
    print(table(doc))
    print(f"wrote {args.out}")
    if failed:
        print(f"ledgers that did not verify: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
