"""Before/after: one benchmark run on a base commit and on this tree, one after the other in one invocation, with
the figures side by side.

Each side runs its own copy of ``benchmarks/NAME.py`` against its own package: the before side in a git worktree
of ``--base`` with ``PYTHONPATH`` pointing at it, so an API change between the two does not break the comparison.
``--script-from head`` runs this tree's script on both sides instead (for a base whose own copy of the script
no longer ran against its own package).
The two runs are sequential (2 cores: never at once) and the load average is recorded around each.

Run: python benchmarks/before_after.py --base bb5998a node_load -- --sites 50
Writes benchmarks/results/before_after/NAME.json: both results, and ``ratio`` (after / before) for every numeric
field the two share, flattened to dotted names (``wall_s.ray``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import REPO, git, run_info


def flatten(d: Any, prefix: str = "", depth: int = 3) -> dict[str, float]:
    """Numeric leaves of nested dicts as ``{"a.b": x}`` (booleans excluded), ``depth`` levels down."""
    out: dict[str, float] = {}
    if not isinstance(d, dict) or depth < 0:
        return out
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, dict):
            out.update(flatten(v, name + ".", depth - 1))
    return out


def run_side(tree: Path, name: str, args: list[str], out: Path, script: Path | None = None) -> dict[str, Any]:
    """``python benchmarks/NAME.py ARGS --out OUT`` in ``tree`` against ``tree``'s package (``script``: another
    copy of the script); its JSON plus timing."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    load_before = os.getloadavg()
    start = time.perf_counter()
    cmd = [sys.executable, str(script or f"benchmarks/{name}.py"), *args, "--out", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True)
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    return {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip(),
            "script_wall_s": wall, "load_average": {"start": load_before, "end": os.getloadavg()}, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the before commit (e.g. bb5998a)")
    ap.add_argument("--script-from", choices=["each", "head"], default="each",
                    help="each: every side runs its own copy of the script; head: both run this tree's")
    ap.add_argument("name", help="benchmark script name in benchmarks/ (e.g. node_load)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script, after --")
    a = ap.parse_args()
    args = [x for x in a.args if x != "--"] if a.args[:1] == ["--"] else a.args
    with tempfile.TemporaryDirectory(prefix="before-after-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), a.base], cwd=REPO, check=True)
        try:
            script = REPO / "benchmarks" / f"{a.name}.py" if a.script_from == "head" else None
            before = run_side(base_tree, a.name, args, Path(tmp) / "before.json", script)
            after = run_side(REPO, a.name, args, Path(tmp) / "after.json")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    fb, fa = flatten(before["result"]), flatten(after["result"])
    ratio = {k: fa[k] / fb[k] for k in sorted(fb.keys() & fa.keys()) if fb[k] != 0}
    ratio["script_wall_s"] = after["script_wall_s"] / before["script_wall_s"]
    doc = {**run_info("before_after", sys.argv[1:]), "base": a.base, "base_commit": before["commit"],
           "head_commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
           "benchmark_args": args, "script_from": a.script_from, "before": before, "after": after, "ratio_after_over_before": ratio}
    out = REPO / "benchmarks" / "results" / "before_after" / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for k in ("script_wall_s", *[k for k in ratio if k != "script_wall_s"][:40]):
        print(f"{k:60s} {ratio[k]:8.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
