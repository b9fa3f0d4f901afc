"""CKKS secure summation: our packed protocol vs the common default, on the same update, in one run.

Default (what most CKKS-FL code does): one TenSEAL ckks_vector per layer, N=8192, moduli [60,40,40,60],
scale 2^40, float values encrypted directly. Ours: worldlm_secure.secagg.ckks (N=4096, [60,49], 2^17,
values quantized to 2^-21 of the clip range and packed several per slot), through the real member,
aggregator and key-holder classes (commit, then reveal, as a round runs them).

Reported per run (also to benchmarks/results/secagg_ckks.json):
- expansion = ciphertext bytes sent by one member / float32 bytes of its update;
- encrypt(+quantize+pack)+serialize and deserialize+add throughput in parameters per CPU-second
  (process CPU time, so "per core" even if a library spawns threads);
- aggregation error: max |decrypted sum - plaintext sum|, relative to the clip range.

Run: python benchmarks/secagg_ckks.py [--params 10000000] [--members 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tenseal as ts

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.ckks import (
    CkksAggregator,
    CkksKeyHolder,
    CkksMember,
    Commitment,
    Contribution,
    EpochTrust,
    RoundSpec,
    commitments_digest,
)
from worldlm_secure.secagg.ckks_keys import generate_epoch_keys
from worldlm_secure.secagg.ckks_params import CkksParams

RESULTS = Path(__file__).resolve().parent / "results" / "secagg_ckks.json"


def layer_sizes(total: int) -> list[int]:
    """A small decoder's layers (d=512, 3 blocks, MLP 1024), the embedding sized so the total is `total`."""
    d, ff = 512, 1024
    block = [3 * d * d, 3 * d, d * d, d, d, d, d * ff, ff, ff * d, d, d, d]
    rest = block * 3 + [d, d]
    emb = total - sum(rest)
    if emb <= 0:
        return [total]
    return [emb, *rest]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """TenSEAL's C++ prints a warning per multi-ciphertext vector; keep the table readable."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


class Clock:
    def __init__(self) -> None:
        self.cpu = 0.0
        self.wall = 0.0

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        c, w = time.process_time(), time.perf_counter()
        yield
        self.cpu += time.process_time() - c
        self.wall += time.perf_counter() - w


def run_default(updates: list[np.ndarray], sizes: list[int], clip: float) -> dict[str, float]:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60], n_threads=1)
    ctx.global_scale = 2.0**40
    pub = ctx.copy()
    pub.make_context_public()
    enc, add = Clock(), Clock()
    total_bytes = 0
    edges = np.cumsum([0, *sizes])
    out = np.empty(edges[-1])
    with quiet_stdout():
        for a, b in zip(edges[:-1], edges[1:]):
            acc = None
            for u in updates:
                with enc.run():
                    blob = ts.ckks_vector(pub, u[a:b].tolist()).serialize()
                total_bytes += len(blob)
                with add.run():
                    v = ts.ckks_vector_from(pub, blob)
                    acc = v if acc is None else acc + v
            acc.link_context(ctx)
            out[a:b] = acc.decrypt()
    n = edges[-1]
    exact = np.sum(updates, axis=0)
    return {
        "expansion": total_bytes / len(updates) / (4.0 * n),
        "encrypt_params_per_cpu_s": n * len(updates) / enc.cpu,
        "encrypt_params_per_wall_s": n * len(updates) / enc.wall,
        "add_params_per_cpu_s": n * len(updates) / add.cpu,
        "max_rel_error": float(np.max(np.abs(out - exact)) / clip),
    }


def run_ours(updates: list[np.ndarray], params: CkksParams) -> dict[str, float]:
    """Our protocol's roles in one process, as a round runs them (protocols/ckks.md §4): every member encrypts
    and commits, reveals under the commitment list, the aggregator checks and adds, the holder re-adds and
    decrypts. Timed per phase (commitments and signatures inside encrypt and add)."""
    names = [f"m{i}" for i in range(len(updates))]
    ids = {n: NodeIdentity.generate(n) for n in names}
    trust = EpochTrust((names[0],), {n: ids[n].public_bytes for n in names}, 1)
    holder = CkksKeyHolder(ids[names[0]])
    keys = generate_epoch_keys(ids[names[0]], params, 0, {holder.name: holder.transport.cert}, dict(trust.peer_keys))
    holder.install(keys, trust)
    agg = CkksAggregator(keys, ids[names[0]].public_bytes, params)
    n = updates[0].size
    layout = packing.plan_layout(params.slot_bits, params.value_bits, packing.headroom_for(len(updates)))
    spec = RoundSpec(0, keys.key_id, n, tuple(names), layout, params.clip_range, params.slot_count)
    enc, add, dec = Clock(), Clock(), Clock()
    total_bytes = 0
    made: dict[str, Contribution] = {}
    commitments: list[Commitment] = []
    for name, u in zip(names, updates):
        member = CkksMember(ids[name])
        member.install(keys, trust)
        with enc.run():
            c = member.protect(spec, u)
            commitments.append(member.commit(spec.round_id, c.n_values, c.chunks))
        made[name] = c
    listed = commitments_digest(commitments)
    agg.open_round(spec, commitments)
    for name in names:
        with enc.run():
            c = made.pop(name).revealed(listed, ids[name])
        total_bytes += c.nbytes
        with add.run():
            ok = agg.receive(c, ids[name].public_bytes)
        assert ok, agg.rejected
        del c
    with add.run():
        summed = agg.summed()
    with dec.run():
        sums, _ = holder.decrypt(summed, spec)
        total = packing.dequantize_sum(sums, len(updates), params.clip_range, params.value_bits)
    exact = np.sum(updates, axis=0)
    return {
        "expansion": total_bytes / len(updates) / (4.0 * n),
        "encrypt_params_per_cpu_s": n * len(updates) / enc.cpu,
        "encrypt_params_per_wall_s": n * len(updates) / enc.wall,
        "add_params_per_cpu_s": n * len(updates) / add.cpu,
        "decrypt_params_per_cpu_s": n / dec.cpu,
        "max_rel_error": float(np.max(np.abs(total - exact)) / params.clip_range),
        "values_per_slot": layout.values_per_slot,
        "slot_bits": layout.slot_bits,
        "headroom_bits": layout.headroom,
        "precision_per_value_rel": params.precision / params.clip_range,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--clip-range", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    clip = args.clip_range
    sizes = layer_sizes(args.params)
    rng = np.random.default_rng(0)  # benchmark data only, nothing secret
    # model-update-like values: mostly small, a few at the clip range, all within it
    updates = [np.clip(rng.normal(0, clip / 4, args.params), -clip, clip) for _ in range(args.members)]
    params = CkksParams(clip_range=clip)

    t0 = time.perf_counter()
    ours = run_ours(updates, params)
    t1 = time.perf_counter()
    default = run_default(updates, sizes, clip)
    t2 = time.perf_counter()

    result = {
        "params": args.params,
        "members": args.members,
        "layers": len(sizes),
        "clip_range": clip,
        "ours_config": {
            "poly_modulus_degree": params.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
            "scale_bits": params.scale_bits,
            "value_bits": params.value_bits,
        },
        "default_config": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60], "scale_bits": 40,
                           "packing": "one ckks_vector per layer"},
        "expansion": ours["expansion"],
        "default_expansion": default["expansion"],
        "expansion_vs_default": default["expansion"] / ours["expansion"],
        "throughput": ours["encrypt_params_per_cpu_s"],
        "default_throughput": default["encrypt_params_per_cpu_s"],
        "throughput_vs_default": ours["encrypt_params_per_cpu_s"] / default["encrypt_params_per_cpu_s"],
        "add_throughput": ours["add_params_per_cpu_s"],
        "default_add_throughput": default["add_params_per_cpu_s"],
        "add_throughput_vs_default": ours["add_params_per_cpu_s"] / default["add_params_per_cpu_s"],
        "max_rel_error": ours["max_rel_error"],
        "error_bound_rel": args.members * ours["precision_per_value_rel"],
        "default_max_rel_error": default["max_rel_error"],
        "ours": ours,
        "default": default,
        "seconds": {"ours": t1 - t0, "default": t2 - t1},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "tenseal": ts.__version__},
        "command": "python benchmarks/secagg_ckks.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    rows = [
        ("ciphertext / float32 bytes", f"{ours['expansion']:.2f}x", f"{default['expansion']:.2f}x",
         f"{result['expansion_vs_default']:.2f}x smaller"),
        ("encrypt+serialize, params/CPU-s", f"{ours['encrypt_params_per_cpu_s'] / 1e6:.2f} M", f"{default['encrypt_params_per_cpu_s'] / 1e6:.2f} M",
         f"{result['throughput_vs_default']:.2f}x"),
        ("deserialize+add, params/CPU-s", f"{ours['add_params_per_cpu_s'] / 1e6:.1f} M", f"{default['add_params_per_cpu_s'] / 1e6:.1f} M",
         f"{result['add_throughput_vs_default']:.2f}x"),
        ("max |sum error| / clip_range", f"{ours['max_rel_error']:.2e}", f"{default['max_rel_error']:.2e}", "quantization only" if ours["max_rel_error"] > 0 else ""),
    ]
    print(f"CKKS secure sum: {args.params:,} parameters ({len(sizes)} layers), {args.members} members, clip_range {clip}")
    print(f"ours: N=4096 [60,49] 2^17, {ours['values_per_slot']:.2f} values/slot, per-value precision "
          f"{ours['precision_per_value_rel']:.2e} of clip_range; default: N=8192 [60,40,40,60] 2^40, one ckks_vector per layer")
    w = [34, 12, 12, 20]
    print(f"{'metric':<{w[0]}} {'ours':>{w[1]}} {'default':>{w[2]}} {'ours vs default':>{w[3]}}")
    for r in rows:
        print(f"{r[0]:<{w[0]}} {r[1]:>{w[1]}} {r[2]:>{w[2]}} {r[3]:>{w[3]}}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
