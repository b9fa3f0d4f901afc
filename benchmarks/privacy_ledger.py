"""Benchmark: secret DP noise sampling and ledger append/verify, against baselines in the same run.

Baselines: numpy's PCG64 (NOT usable for secret noise; the speed reference) for the samplers, and a
bare SQLite insert with the same WAL/synchronous=FULL settings for the ledger.
Prints a table and writes benchmarks/results/privacy_ledger.json.

    python benchmarks/privacy_ledger.py [--n 1000000] [--entries 200]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import Ledger, release_entry, verify
from worldlm_secure.privacy import BudgetTracker, SecureRandom


def best(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--entries", type=int, default=200)
    args = ap.parse_args()
    n = args.n
    rows = []
    sr = SecureRandom()
    baseline = np.random.Generator(np.random.PCG64())  # speed reference only, never for secrets
    base_normal = best(lambda: baseline.standard_normal(n))
    for name, fn in [
        ("gaussian (4-sum hardened)", lambda: sr.standard_normal(n)),
        ("discrete gaussian σ=1000", lambda: sr.discrete_gaussian(1000.0, n)),
        ("skellam μ=1e6", lambda: sr.skellam(1e6, n)),
    ]:
        t = best(fn)
        rows.append({"what": name, "n": n, "seconds": t, "M_per_s": n / t / 1e6, "x_slower_than_pcg64_normal": t / base_normal})
    rows.insert(0, {"what": "baseline numpy PCG64 normal", "n": n, "seconds": base_normal,
                    "M_per_s": n / base_normal / 1e6, "x_slower_than_pcg64_normal": 1.0})

    d = Path(tempfile.mkdtemp())
    k = args.entries
    con = sqlite3.connect(d / "bare.sqlite", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body BLOB)")
    body = b"x" * 900
    t = time.perf_counter()
    for i in range(k):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t VALUES (?, ?)", (i, body))
        con.execute("COMMIT")
    bare = time.perf_counter() - t
    con.close()
    tracker = BudgetTracker(budget=1e9, delta=1e-5, stream="s")
    led = Ledger(d / "led.sqlite", NodeIdentity.generate("n"))
    t = time.perf_counter()
    for i in range(k):
        led.append(release_entry(
            release_id=str(i), round=i, level="site", source="n", destination="f", group="shared",
            tensor_names=tuple(f"model.layers.{j}.mlp.up_proj.weight" for j in range(8)), protocol="masking",
            cohort_size=10, dropouts=i % 3, dp_level="user", mechanism="distributed_skellam", clipping_norm=1.0,
            policy_sha256="ab" * 32, charge=tracker.charge(1.0 + 0.1 * (i % 3), 1.0),
        ))
    appended = time.perf_counter() - t
    led.close()
    t = time.perf_counter()
    rep = verify(d / "led.sqlite")
    verified = time.perf_counter() - t
    assert rep.ok
    rows += [
        {"what": "baseline bare SQLite txn insert (WAL, sync=FULL)", "n": k, "seconds": bare, "per_entry_ms": 1e3 * bare / k, "x_bare": 1.0},
        {"what": "ledger charge+append (sign, chain, head)", "n": k, "seconds": appended, "per_entry_ms": 1e3 * appended / k, "x_bare": appended / bare},
        {"what": "ledger verify (incl. ε recompute, rdp)", "n": k, "seconds": verified, "per_entry_ms": 1e3 * verified / k, "x_bare": verified / bare},
    ]
    for r in rows:
        extra = f"{r['M_per_s']:8.2f} M/s  ×{r['x_slower_than_pcg64_normal']:.1f} vs PCG64" if "M_per_s" in r else \
            f"{r['per_entry_ms']:8.3f} ms/entry  ×{r['x_bare']:.1f} vs bare insert"
        print(f"{r['what']:<50} n={r['n']:<9} {r['seconds']:8.3f} s  {extra}")
    out = Path(__file__).resolve().parent / "results" / "privacy_ledger.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
