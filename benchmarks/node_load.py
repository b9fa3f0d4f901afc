"""One federation node serving N concurrent site connections through a full masked (SecAgg+) round.

The federation runs in its own process, exactly the node code: `FederationServer` (mTLS, admission,
envelopes, replay cache, chunked transfers) + `NodeBoard` + `node.link.aggregate_round` (the
aggregator's side of SecAgg+). The N sites are threads of this process, each with its own
`SiteClient` (own certificate, own mTLS channel, own Ed25519 key) running `node.link.member_round`
(advertise, share keys, masked input, unmask) on a random vector of --dim float64 values, with
heartbeats like a deployed site. One round: announce -> every member's full protocol -> the sum.

Checked, not assumed: the unmasked sum equals the plain sum of the members' vectors within the
quantization bound. Baseline in the same run: the same sum computed in process (numpy), so the
round time can be read against pure arithmetic.

Reports round time (announce -> sum, at the federation), the federation process's peak RSS
(ru_maxrss) and its RSS before the round, and bytes per site (payload bytes each site sent and
received over gRPC; TLS and HTTP/2 framing excluded).

Run: python benchmarks/node_load.py [--sites 50] [--dim 262144] [--out FILE]
Writes benchmarks/results/node_load.json (with the command line).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _federation(pki_root: str, names: list[str], dim: int, q: "mp.Queue", go: "mp.Event") -> None:
    from worldlm_secure.node.board import NodeBoard
    from worldlm_secure.node.link import Liveness, aggregate_round
    from worldlm_secure.secagg.masking import MaskingParams as MP, RoundConfig
    from worldlm_secure.transport.handler import Announcement
    from worldlm_secure.transport.server import FederationServer, ServerConfig
    from worldlm_secure.transport.testing import Pki
    from worldlm_secure.transport.tls import Roster

    pki = Pki(Path(pki_root), "fed")
    pki.nodes["fed"] = Path(pki_root) / "fed"
    board = NodeBoard("fed")
    server = FederationServer(pki.credentials("fed"), Roster.of(names), board, ServerConfig(max_workers=2 * len(names) + 16))
    server.start()
    q.put(("address", server.target))
    live = Liveness(board, silent_after=30.0)
    deadline = time.monotonic() + 300
    while len(board.members) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = MP(clip_range=4.0, neighbours="auto", threshold=0.67, bits=32)
    t0 = time.perf_counter()
    aggregator = pki.identity("fed")
    ann = Announcement(1, tuple(sorted(board.members)), "masking", b"{}", 0, aggregator_key=aggregator.public_bytes)
    board.announce(ann)
    ann = board.announcement(1) or ann
    cfg = RoundConfig.build(params, 1, ann.cohort, dict(ann.peer_keys), min_cohort=max(1, len(names) // 2),
                            aggregator_key=aggregator.public_bytes)
    out = aggregate_round(board, ann, cfg, cfg.min_cohort, identity=aggregator, first_timeout=300, step_timeout=120, live=live)
    round_s = time.perf_counter() - t0
    q.put(("result", {
        "round_s": round_s, "contributors": len(out.contributors), "dropped": list(out.dropped),
        "bytes_received_by_federation": out.bytes_up, "total": out.total.tolist() if dim <= 16 else None,
        "total_sha": __import__("hashlib").sha256(np.round(out.total, 4).tobytes()).hexdigest(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_round_mib": rss_before / 1024,
        "params": {"neighbours": cfg.neighbours, "threshold": cfg.threshold, "bits": cfg.quant.bits},
        "quantization_bound": cfg.quant.sum_error_bound(len(out.contributors)),
        "total_vec": out.total.astype(np.float64).tobytes(),
    }))
    go.wait(60)
    server.stop(grace=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--dim", type=int, default=262_144, help="values per member (float64 before quantization)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "node_load.json")
    args = ap.parse_args()

    from worldlm_secure.node.heartbeat import Heartbeat
    from worldlm_secure.node.link import member_round
    from worldlm_secure.secagg.masking import MaskingParams as MP, RoundConfig
    from worldlm_secure.transport.client import RetryPolicy, SiteClient
    from worldlm_secure.transport.testing import make_pki

    names = [f"site-{i:03d}" for i in range(args.sites)]
    tmp = tempfile.mkdtemp(prefix="node_load_")
    pki = make_pki(Path(tmp), "fed", ["fed", *names])
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    go = ctx.Event()
    fed = ctx.Process(target=_federation, args=(tmp, names, args.dim, q, go))
    fed.start()
    kind, address = q.get(timeout=120)
    rng = np.random.default_rng(0)  # benchmark inputs only, not secrets
    vectors = {n: rng.uniform(-0.5, 0.5, args.dim) for n in names}
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    errors: list[str] = []

    def site(name: str) -> None:
        client = SiteClient(address, pki.credentials(name), "fed", identity=pki.identity(name), members=names,
                            retry=RetryPolicy(attempts=20, initial_backoff=0.1, max_backoff=1.0), timeout=120)
        counted = _Counting(client)
        try:
            client.enroll()
            beat = Heartbeat(lambda: client.heartbeat("training"), 2.0)
            beat.start()
            ann = next(iter(client.watch_rounds(after_round=0)))
            params = MP(clip_range=4.0, neighbours="auto", threshold=0.67, bits=32)
            cfg = RoundConfig.build(params, ann.round_id, ann.cohort, dict(ann.peer_keys), min_cohort=max(1, len(names) // 2),
                                    aggregator_key=ann.aggregator_key)  # both verified by the client from certificates
            member_round(counted, pki.identity(name), ann, cfg, vectors[name], before_input=lambda c: None, timeout=120)  # type: ignore[arg-type]
            beat.stop()
        except Exception as exc:  # reported, and the benchmark fails below
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            sent[name], received[name] = counted.sent, counted.received
            client.close()

    threads = [threading.Thread(target=site, args=(n,)) for n in names]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    kind, result = q.get(timeout=900)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=120)
    go.set()
    fed.join(timeout=30)
    if errors:
        sys.exit("members failed: " + "; ".join(errors[:5]))
    total = np.frombuffer(result.pop("total_vec"), dtype=np.float64)
    start = time.perf_counter()
    plain = np.sum([vectors[n] for n in names], axis=0)
    plain_s = time.perf_counter() - start
    err = float(np.max(np.abs(total - plain)))
    assert err <= result["quantization_bound"] + 1e-9, (err, result["quantization_bound"])
    per_site_up = float(np.mean(list(sent.values())))
    per_site_down = float(np.mean(list(received.values())))
    report = {
        "command": "python " + " ".join(sys.argv),
        "sites": args.sites, "dim": args.dim, "float32_bytes_per_update": 4 * args.dim,
        "round_s": result["round_s"], "wall_s_including_connect": wall,
        "baseline_in_process_sum_s": plain_s,
        "federation_peak_rss_mib": result["peak_rss_mib"], "federation_rss_before_round_mib": result["rss_before_round_mib"],
        "bytes_up_per_site": per_site_up, "bytes_down_per_site": per_site_down,
        "up_expansion_vs_float32": per_site_up / (4 * args.dim),
        "contributors": result["contributors"], "max_abs_error": err, "quantization_bound": result["quantization_bound"],
        "masking": result["params"],
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "note": "sites are threads of one process (one GIL), each with its own SiteClient and mTLS channel; the federation is its own process",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.sites} sites x {args.dim} values, one masked round over gRPC + mTLS")
    print(f"  round time at the federation: {report['round_s']:.2f} s (in-process numpy sum of the same vectors: {plain_s * 1000:.1f} ms)")
    print(f"  federation peak RSS: {report['federation_peak_rss_mib']:.0f} MiB (before the round: {report['federation_rss_before_round_mib']:.0f} MiB)")
    print(f"  bytes per site: up {per_site_up / 1e6:.2f} MB ({report['up_expansion_vs_float32']:.2f}x float32), down {per_site_down / 1e6:.3f} MB")
    print(f"  sum max abs error {err:.2e} <= bound {result['quantization_bound']:.2e}")
    print(f"wrote {args.out}")


class _Counting:
    """A `SiteClient` that counts the payload bytes it sends and receives (what the member's protocol moves)."""

    def __init__(self, client: object) -> None:
        self._c = client
        self.sent = 0
        self.received = 0
        self.federation = client.federation  # type: ignore[attr-defined]

    def send_secagg(self, kind: int, payload: object, **kw: object) -> object:
        self.sent += payload.nbytes  # type: ignore[attr-defined]
        return self._c.send_secagg(kind, payload, **kw)  # type: ignore[attr-defined]

    def upload_update(self, payload: object, **kw: object) -> object:
        self.sent += payload.nbytes  # type: ignore[attr-defined]
        return self._c.upload_update(payload, **kw)  # type: ignore[attr-defined]

    def fetch_secagg(self, kind: int = 0, **kw: object) -> list:
        got = self._c.fetch_secagg(kind, **kw)  # type: ignore[attr-defined]
        self.received += sum(m.payload.nbytes for m in got)
        return got


if __name__ == "__main__":
    main()
