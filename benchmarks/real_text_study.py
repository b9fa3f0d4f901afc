"""Why the residual-embedding gate never opens, and what opening it does, on the real-text world.

Two parts, results in ``benchmarks/results/real_text_study.json``:

1. ``algebra`` (no training, instant): with the root's reference moved to the federations' mean every round
   (``Ref <- Ref + S/F``, protocols/worldlm.md step 4), the next residuals sum to zero up to one round of drift.
   For ANY number of federations F the leave-one-out mean of a zero-sum set is ``o_f = -e_f / (F - 1)``, so
   ``cos(e_f, o_f) = -1`` exactly and the gate ``gain * max(0, cos)`` is 0. Shown on random vectors for
   F = 2, 3, 5, and with a common component added (the only thing that can open it).
2. ``training`` (minutes): WorldLM on ``examples/real-text/world.yaml`` with the residual exchange
   instrumented (per round and federation: the cosine, the gate, ``||S|| / mean ||e_f||`` (how far from
   zero-sum), and the share of each residual's energy the rank-``rank`` embedding keeps), in three variants
   with the same seed, data, budget and initial model:
   - ``moving``: the mechanism as implemented (reference moves to the mean every round);
   - ``off``: no residual exchange (the ablation);
   - ``anchored``: the reference stays at the common initial key layers (public: every site starts from
     the same seeded model), so a residual is everything a federation's key layers learned; the cosine
     then measures whether federations learned in the same directions, and the mix replaces a gated share
     of the federation's own low-rank component by its siblings' mean (``K_f + g_f (o_f - e_f)``,
     keeping the federation's high-rank remainder ``r_f - e_f``).

    python benchmarks/real_text_study.py --threads 1                 # everything (~15-25 min on 2 busy cores)
    python benchmarks/real_text_study.py --variants moving --rounds 2 # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "examples" / "real-text" / "world.yaml"
OUT = ROOT / "benchmarks" / "results" / "real_text_study.json"


# ------------------------------------------------------------------------------------------ 1. algebra
def algebra(seed: int = 0) -> dict:
    from worldlm_secure.aggregation import blend_from_sum

    rng = np.random.default_rng(seed)
    out: dict = {}
    for F in (2, 3, 5):
        dev = rng.normal(size=(F, 1000))
        dev -= dev.mean(axis=0)  # residuals after Ref moved to the mean: they sum to zero
        sims = [blend_from_sum(dev[f], dev.sum(axis=0), F, 0.5).similarity for f in range(F)]
        common = rng.normal(size=1000)
        row = {"zero_sum_cosines": sims}
        for scale in (0.5, 1.0, 2.0):  # a common drift c of norm scale * ||d_f|| added to every residual
            e = dev + scale * common / np.linalg.norm(common) * np.linalg.norm(dev, axis=1).mean()
            row[f"common_{scale}x_cosines"] = [blend_from_sum(e[f], e.sum(axis=0), F, 0.5).similarity for f in range(F)]
        out[f"F={F}"] = row
    return out


# ------------------------------------------------------------------------------------------ 2. training
def _instrumented_exchange(variant: str, log: list):
    from worldlm_secure.aggregation import (
        blend_from_sum,
        embed,
        flatten,
        mix_in,
        unflatten,
    )

    def exchange(self, round_id: int) -> None:
        if not (self.method.residuals and not self.flat and len(self.members) > 1 and self.key_names):
            return
        feds = sorted(self.members)
        rules = {f: self.world.effective_policy(f).residuals for f in feds}
        if not all(r.allowed for r in rules.values()):
            return
        names = self.key_names
        ref = flatten(self.reference, names)
        full = {f: flatten(self.fed_key[f], names) - ref for f in feds}
        own = {
            f: flatten(embed({n: self.fed_key[f][n] - self.reference[n] for n in names}, rules[f].rank), names)
            for f in feds
        }
        total = self.release.secure_sum(round_id, "residual", self.root, own, names, derived=True)
        mean_norm = float(np.mean([np.linalg.norm(v) for v in own.values()]))
        rec = {"round": round_id, "sum_over_mean_norm": float(np.linalg.norm(total)) / max(mean_norm, 1e-30),
               "feds": {}}
        for f in feds:
            blend = blend_from_sum(own[f], total, len(feds), rules[f].gain)
            self.residual_gains[f] = blend.gain
            key = flatten(self.fed_key[f], names)
            if variant == "anchored":  # keep the high-rank remainder, swap a gated share of the embedding
                new = key + blend.gain * (blend.siblings_mean - own[f])
            else:
                new = mix_in(key, ref, blend)
            rec["feds"][f] = {
                "cosine": blend.similarity, "gain": blend.gain, "residual_norm": float(np.linalg.norm(full[f])),
                "embedding_energy": float(np.linalg.norm(own[f]) ** 2 / max(np.linalg.norm(full[f]) ** 2, 1e-30)),
                "moved": float(np.linalg.norm(new - key)),
            }
            self.fed_key[f] = unflatten(new, self.reference, names)
        if variant == "moving":
            self.reference = unflatten(ref + total / len(feds), self.reference, names)
        log.append(rec)

    return exchange


def train(variant: str, rounds: int | None, seed: int | None) -> dict:
    from dataclasses import replace

    from worldlm_secure.federation import engine as engine_mod
    from worldlm_secure.federation.methods import METHODS
    from worldlm_secure.federation.simulate import prepare, run_method

    prep = prepare(WORLD, rounds=rounds, device="cpu", seed=seed)
    method = METHODS["worldlm"] if variant != "off" else replace(METHODS["worldlm"], residuals=False)
    log: list = []
    original = engine_mod.Engine._exchange_residuals
    engine_mod.Engine._exchange_residuals = _instrumented_exchange(variant, log)
    try:
        t0 = time.perf_counter()
        res = run_method(prep.world, prep.settings, prep.data, prep.vocab, method)
        wall = time.perf_counter() - t0
    finally:
        engine_mod.Engine._exchange_residuals = original
    return {
        "variant": variant, "mean_val_ppl": res.mean_val_ppl, "sites": res.sites,
        "rounds": [{"round": r.round, "mean_val_ppl": r.mean_val_ppl} for r in res.rounds],
        "wall_s": round(wall, 1), "exchange": log,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="moving,off,anchored")
    ap.add_argument("--rounds", type=int, default=None, help="override the world's rounds")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    result: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["algebra"] = algebra()
    for F, row in result["algebra"].items():
        print(f"{F}: zero-sum cosines {np.round(row['zero_sum_cosines'], 6).tolist()}; "
              f"with a common drift of 1x: {np.round(row['common_1.0x_cosines'], 3).tolist()}")
    result.setdefault("training", {})
    result["command"] = "python benchmarks/real_text_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result["machine"] = {"python": platform.python_version(), "threads": args.threads}
    for v in [s.strip() for s in args.variants.split(",") if s.strip()]:
        r = train(v, args.rounds, args.seed)
        result["training"][v] = r
        gains = [round(x["feds"][f]["gain"], 3) for x in r["exchange"] for f in x["feds"]]
        print(f"{v:9s} mean val ppl {r['mean_val_ppl']:.3f}  wall {r['wall_s']:.0f} s  gains per round x fed {gains}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
