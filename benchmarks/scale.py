"""Scale figures: one WorldLM round under SecAgg+ masking vs number of sites and vs model size.

Each configuration runs in its own fresh Python process, so its peak RSS (``ru_maxrss``) is its own:
- **sites**: N simulated tiny sites (Llama tiny, vocab 64, ~1.07M parameters) in TWO federations of
  N/2 under the root, every release masked (SecAgg+, k = O(log N) neighbours): masked cohorts of N/2,
  the hard case for masking (a masked release needs a cohort of 2, so one federation cannot be used);
  each site trains 1 local step (batch 4 x 32 tokens);
- **model size**: 4 sites (two federations of 2) with the tiny, small (~18M) and GPT-2 124M
  configurations, one round each.
Round time is split into local training, protection (masking member + aggregator side) and the rest
(evaluation, bookkeeping); "setup" is building the engine (model copies, optimizer state per site).
With ``--ray`` the ``--ray-sites`` configurations also run on a fresh local Ray instance with 2 CPUs,
at both scopes of ``simulate --backend ray``: ``ray-sites`` (every site a Ray actor, its own worker
process, doing its training and its member side; the aggregators and the release path in the driver;
peak RSS is the driver's plus every actor's) and ``ray-methods`` (the whole method as one Ray task;
peak RSS is that worker's).

Run: python benchmarks/scale.py [--sites 8,32,128,512] [--models tiny,small,gpt2-124m] [--ray]
     [--ray-sites 8,32,128] [--timeout 900] [--merge] [--out benchmarks/results/scale.json]
Prints a table and writes the JSON (with the command line) after every configuration; ``--merge``
keeps the configurations of an earlier run in the JSON that this run does not repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import run_info

REPO = Path(__file__).resolve().parent.parent
POLICY = """\
apiVersion: worldlm-secure/v1
kind: JurisdictionPolicy
name: scale-masking
extends: {base}
description: research-open, every release masked (SecAgg+).
secure_aggregation:
  protocol: [masking]            # the only protocol: every release is masked
"""


def write_world(folder: Path, sites: int, model: str) -> Path:
    """Root -> two federations -> ``sites`` / 2 sites each, all under the masking policy.

    Two federations, not one: a masked release needs a cohort of at least 2, also at the root.
    """
    base = os.path.relpath(REPO / "policies" / "research-open.yaml", folder)
    (folder / "masking.yaml").write_text(POLICY.format(base=base))
    nodes = ["  - {name: world, policy: masking.yaml}"]
    nodes += [f"  - {{name: fed{f}, parent: world, policy: masking.yaml}}" for f in (0, 1)]
    nodes += [f"  - {{name: s{i:04d}, parent: fed{i % 2}, policy: masking.yaml}}" for i in range(sites)]
    arch = "gpt2" if model == "gpt2-124m" else "llama"
    (folder / "world.yaml").write_text(
        f"name: scale-{sites}-{model}\nseed: 0\n"
        f"model: {{arch: {arch}, size: {model}}}\n"
        "schedule: {rounds: 1, local_steps: 1, batch_size: 4, seq_len: 32, lr: 0.003, warmup_steps: 0}\n"
        "data:\n  synthetic: {vocab_size: 64, own_tokens: 8, successors: 4, train_tokens: 2048, val_tokens: 256}\n"
        "nodes:\n" + "\n".join(nodes) + "\n"
    )
    return folder / "world.yaml"


def run_one(sites: int, model: str, backend: str) -> dict:
    """One configuration in this process (called in a fresh subprocess by `main`)."""
    import torch

    torch.set_num_threads(1)
    from worldlm_secure.federation.engine import Engine
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.settings import settings_for
    from worldlm_secure.federation.simulate import load_world_data
    from worldlm_secure.federation.world import load_world

    extra: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_world(Path(tmp), sites, model)

        def load() -> tuple:
            world = load_world(path)
            settings = settings_for(world, device="cpu")
            return (world, settings, *load_world_data(world, settings))

        t0 = time.perf_counter()
        if backend == "ray-sites":
            import ray

            from worldlm_secure.federation.ray_sites import RayEngine

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            world, settings, data, vocab = load()
            t1 = time.perf_counter()
            # Starting the engine starts one actor per site (each imports torch and builds its model) and
            # waits for their public keys: that is setup. The round below is a steady-state round.
            engine = RayEngine(world, METHODS["worldlm"], data, settings, vocab_size=vocab)
            setup_s = time.perf_counter() - t1
            res = engine.run()
            # every actor's own peak RSS (each site is its own worker process), on top of the driver's
            actor_kib = ray.get([a.__ray_call__.remote(lambda _self: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                                 for a in engine.actors.values()])
            engine.shutdown()
            ray.shutdown()
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            extra = {"driver_rss_mib": peak_kib / 1024.0, "actor_rss_mib_mean": sum(actor_kib) / len(actor_kib) / 1024.0}
            peak_kib += sum(actor_kib)
        elif backend == "ray-methods":
            import ray

            from worldlm_secure.federation.ray_backend import _run_method_task

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

            @ray.remote(num_cpus=1)
            def task() -> tuple:
                res = _run_method_task(str(path), "worldlm", 1, "cpu", None, None, 1)
                return res, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

            t_submit = time.perf_counter()
            res, worker_rss = ray.get(task.remote())
            e2e = time.perf_counter() - t_submit
            ray.shutdown()
            setup_s = e2e - res.wall_s  # task scheduling, worker start, world/data load, engine build
            peak_kib = worker_rss
        else:
            world, settings, data, vocab = load()
            t1 = time.perf_counter()
            engine = Engine(world, METHODS["worldlm"], data, settings, vocab_size=vocab)
            setup_s = time.perf_counter() - t1
            res = engine.run()
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        params = sum(res.groups.values())
        return {
            "sites": sites,
            "model": model,
            "backend": backend,
            "params": params,
            "setup_s": setup_s,
            "round_s": res.wall_s,
            "train_s": res.train_s,
            "protect_s": res.stats.protect_seconds,
            "other_s": res.wall_s - res.train_s - res.stats.protect_seconds,
            "peak_rss_mib": peak_kib / 1024.0,
            "bytes_up_per_site": res.stats.bytes_up / sites,
            "releases": res.stats.releases,
            "protocols": dict(res.stats.by_protocol),
            "mean_val_ppl": res.mean_val_ppl,
            "total_s": time.perf_counter() - t0,
            **extra,
        }


def _growth(rows: list[dict], key: str) -> list[dict]:
    """Cost per site relative to the smallest N: a ratio > 1 growing with N means faster than linear."""
    rows = sorted(rows, key=lambda r: r["sites"])
    if not rows:
        return []
    b = rows[0]
    return [
        {"sites": r["sites"], f"{key}_per_site_vs_smallest": (r[key] / r["sites"]) / (b[key] / b["sites"])}
        for r in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="8,32,128,512")
    ap.add_argument("--models", default="tiny,small,gpt2-124m")
    ap.add_argument("--model-sites", type=int, default=4)
    ap.add_argument("--ray", action="store_true", help="also run the site configurations on Ray")
    ap.add_argument("--ray-sites", default="8,32,128", help="site counts to run on Ray")
    ap.add_argument("--merge", action="store_true", help="keep an earlier run's other configurations in --out")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration before it is skipped")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        sites, model, backend = args.one.split(":")
        print("RESULT " + json.dumps(run_one(int(sites), model, backend)), flush=True)
        return

    configs = [(int(n), "tiny", "inprocess") for n in args.sites.split(",") if n]
    configs += [(args.model_sites, m, "inprocess") for m in args.models.split(",") if m]
    if args.ray:
        configs += [(int(n), "tiny", b) for b in ("ray-sites", "ray-methods") for n in args.ray_sites.split(",") if n]
    doc = {
        **run_info("scale"),
        "torch_threads": 1,
        "load_average_at_start": list(os.getloadavg()),
        "note": "",
        "results": [],
        "skipped": [],
    }
    seen: set[tuple] = set()
    if args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        keys = set(configs)
        doc["results"] = [r for r in old.get("results", []) if (r["sites"], r["model"], r["backend"]) not in keys]
        doc["merged_from"] = {"command": old.get("command"), "date_utc": old.get("date_utc"),
                              "load_average_at_start": old.get("load_average_at_start")}
    print(f"{'sites':>6} {'model':>10} {'backend':>11} {'params':>11} {'setup s':>8} {'round s':>8} {'train s':>8} "
          f"{'protect s':>9} {'other s':>8} {'peak MiB':>9} {'MB up/site':>10}")
    for sites, model, backend in configs:
        if (sites, model, backend) in seen:
            continue
        seen.add((sites, model, backend))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", f"{sites}:{model}:{backend}"],
                capture_output=True, text=True, timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            doc["skipped"].append({"sites": sites, "model": model, "backend": backend,
                                   "why": f"did not finish within --timeout {args.timeout:g} s"})
            print(f"{sites:>6} {model:>10} {backend:>11}  skipped: over {args.timeout:g} s")
            continue
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            doc["skipped"].append({"sites": sites, "model": model, "backend": backend, "why": why})
            print(f"{sites:>6} {model:>10} {backend:>11}  failed: {why}")
            continue
        r = json.loads(line[len("RESULT "):])
        doc["results"].append(r)
        print(f"{sites:>6} {model:>10} {backend:>11} {r['params']:>11,} {r['setup_s']:>8.1f} {r['round_s']:>8.1f} "
              f"{r['train_s']:>8.1f} {r['protect_s']:>9.1f} {r['other_s']:>8.1f} {r['peak_rss_mib']:>9.0f} "
              f"{r['bytes_up_per_site'] / 1e6:>10.2f}", flush=True)
        site_counts = {int(n) for n in args.sites.split(",") if n}
        inproc_sites = [x for x in doc["results"]
                        if x["backend"] == "inprocess" and x["model"] == "tiny" and x["sites"] in site_counts]
        doc["growth"] = {k: _growth(inproc_sites, k) for k in ("round_s", "protect_s", "train_s", "peak_rss_mib")}
        doc["load_average_at_end"] = list(os.getloadavg())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
