"""Before/after of one in-process SecAgg+ round (`MaskingSum.run_round`): an earlier checkout and this one,
interleaved in one run (best of --repeats), each in its own process with one thread.

Run: git worktree add /tmp/old <commit>; python benchmarks/secagg_masking_ab.py --old /tmp/old [--members 100]
     [--dim 1000000] [--repeats 2]
Writes benchmarks/results/secagg_masking_ab.json (CPU and wall seconds, server and summed member seconds,
bytes per contributor, and new/old ratios).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
CODE = r'''
import sys, time, json, numpy as np
sys.path.insert(0, sys.argv[1])
from worldlm_secure.secagg import DropoutPlan, MemberInput
from worldlm_secure.secagg.masking import MaskingParams
try:  # the round driver's home since the one-driver-over-channels change; before it, secagg.masking
    from worldlm_secure.secagg.masking_round import MaskingSum
except ImportError:
    from worldlm_secure.secagg.masking import MaskingSum
import worldlm_secure.secagg.masking as M
assert M.__file__.startswith(sys.argv[1]), M.__file__
n, dim = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
ins = [MemberInput(f"m{i:03d}", rng.uniform(-0.5, 0.5, dim)) for i in range(n)]
p = MaskingSum(MaskingParams(clip_range=1.0, neighbours="auto", threshold=0.67, bits=32))
drop = DropoutPlan(after_keys=frozenset(f"m{i:03d}" for i in range(0, n, 10)))
p.run_round(0, ins[:8], min_cohort=4)  # warm-up
c0, w0 = time.process_time(), time.perf_counter()
r = p.run_round(1, ins, min_cohort=n // 2, dropouts=drop)
print(json.dumps({"cpu": time.process_time() - c0, "wall": time.perf_counter() - w0, "server": r.stats.server_seconds,
                  "member": r.stats.member_seconds, "bytes_up": r.stats.bytes_up_per_member, "bytes_down": r.stats.bytes_down_per_member}))
'''
ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--old", required=True, type=Path, help="a checkout of the earlier commit (git worktree add)")
ap.add_argument("--members", type=int, default=100)
ap.add_argument("--dim", type=int, default=1_000_000)
ap.add_argument("--repeats", type=int, default=2)
ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secagg_masking_ab.json")
args = ap.parse_args()
here = Path(__file__).resolve().parents[1]
out = {"old": [], "new": []}
env = {**os.environ, "OMP_NUM_THREADS": "1"}
for _ in range(args.repeats):
    for label, root in (("old", args.old.resolve()), ("new", here)):
        res = subprocess.run([sys.executable, "-c", CODE, str(root), str(args.members), str(args.dim)],
                             capture_output=True, text=True, cwd="/tmp", env=env)
        if res.returncode:
            sys.exit(res.stderr[-2000:])
        out[label].append(json.loads(res.stdout.strip().splitlines()[-1]))
best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in out.items()}
ratio = {m: best["new"][m] / best["old"][m] for m in best["new"]}
old_rev = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
new_rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
result = {"old": old_rev, "new": new_rev, "members": args.members, "dim": args.dim, "repeats": args.repeats,
          "best": best, "new_over_old": ratio, "load_avg": list(os.getloadavg())}
print(json.dumps(result, indent=1))
args.out.write_text(json.dumps(result, indent=1) + "\n")
