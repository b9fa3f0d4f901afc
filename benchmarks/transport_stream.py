"""Chunked model transfer over gRPC + mutual TLS on loopback, against baselines measured in the same run.

Moves a GPT-2-small-sized float32 model (124M parameters, about 496 MB: far beyond gRPC's 4 MB
default message limit and its 2 GB hard limit would not matter either, the chunking is
size-independent) from a federation to a member (DownloadModel) and back (UploadUpdate), through
the real `FederationServer` / `SiteClient` (admission, envelopes, SHA-256 end to end).

Baselines, same bytes, same run:
  sha256   - one SHA-256 pass over the model (each side hashes once: a floor on per-side cost);
  plain    - the same chunk stream and `Assembler` over an insecure gRPC channel, without TLS or
             admission, so  mtls/plain  is the price of mutual TLS + the checks.
The federation runs in its own process (as deployed; no shared GIL with the member). Each transfer
is checked bit-identical (the receiver's SHA-256 equals the sender's) before its time counts.

Run: python benchmarks/transport_stream.py [--params 124000000] [--chunk-kib 256,1024,3072] [--repeats 2]
Writes benchmarks/results/transport_stream.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from worldlm_secure.transport import federation_pb2 as pb
from worldlm_secure.transport.board import RoundBoard
from worldlm_secure.transport.chunks import Assembler, Payload, TransferLimits, iter_parts
from worldlm_secure.transport.client import RetryPolicy, SiteClient
from worldlm_secure.transport.handler import Announcement, Inbound
from worldlm_secure.transport.server import FederationServer, ServerConfig
from worldlm_secure.transport.testing import Pki, make_pki
from worldlm_secure.transport.tls import Roster

RESULTS = Path(__file__).resolve().parent / "results" / "transport_stream.json"
MB = 1e6


def gpt2_like(params: int) -> dict[str, np.ndarray]:
    """12 blocks of d=768 (GPT-2 small shapes), the embedding sized so the total is ``params``."""
    d, ff = 768, 3072
    block = {"attn.w": (d, 3 * d), "attn.b": (3 * d,), "proj.w": (d, d), "proj.b": (d,), "ln1": (d,), "ln2": (d,),
             "fc.w": (d, ff), "fc.b": (ff,), "out.w": (ff, d), "out.b": (d,)}
    shapes = {f"h.{i}.{k}": s for i in range(12) for k, s in block.items()}
    rest = sum(int(np.prod(s)) for s in shapes.values())
    shapes = {"wte": (max(1, (params - rest) // d), d), **shapes}
    raw = np.frombuffer(os.urandom(sum(int(np.prod(s)) for s in shapes.values()) * 4), dtype=np.float32)
    out, pos = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = raw[pos : pos + n].reshape(shape)
        pos += n
    return out


class SinkBoard(RoundBoard):
    """Keeps only the digest of each update, so repeated 500 MB uploads do not pile up in memory."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.digests: list[bytes] = []

    def on_update(self, message: Inbound) -> None:
        self.digests.append(message.payload.sha256())


def plain_server(payload: Payload, limits: TransferLimits, chunk: int, sink: SinkBoard) -> tuple[grpc.Server, int]:
    """The same chunk stream and `Assembler`, on an insecure port with no admission checks."""

    def download(_req: bytes, _ctx: grpc.ServicerContext) -> Iterator[pb.TransferPart]:
        yield from iter_parts(pb.TransferHeader(kind=pb.PAYLOAD_KIND_MODEL), payload, chunk)

    def upload(parts: Iterator[pb.TransferPart], _ctx: grpc.ServicerContext) -> bytes:
        asm = Assembler(next(parts).header, limits)
        for p in parts:
            asm.feed(p.chunk)
        sink.digests.append(asm.finish().sha256())
        return b""

    ident = lambda b: b  # noqa: E731
    handler = grpc.method_handlers_generic_handler("bench.Plain", {
        "Download": grpc.unary_stream_rpc_method_handler(download, ident, pb.TransferPart.SerializeToString),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, pb.TransferPart.FromString, ident),
    })
    server = grpc.server(futures.ThreadPoolExecutor(4), options=_opts(limits))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def _opts(limits: TransferLimits) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", limits.grpc_message_bytes), ("grpc.max_send_message_length", limits.grpc_message_bytes)]


def federation_process(conn, params: int, chunk: int, pki_root: str, limits: TransferLimits) -> None:
    """Child process: the federation side (its own interpreter, as in a deployment: no shared GIL)."""
    payload = Payload.from_tensors(gpt2_like(params))
    pki = Pki(Path(pki_root), "fed", {n: Path(pki_root) / n for n in ("fed", "site-a")})
    board, plain_sink = SinkBoard("fed"), SinkBoard("plain")
    fed = FederationServer(pki.credentials("fed"), Roster.of(["site-a"]), board, ServerConfig(limits=limits, chunk_bytes=chunk))
    fed.start()
    board.announce(Announcement(1, ("site-a",), "none"), payload)
    psrv, pport = plain_server(payload, limits, chunk, plain_sink)
    t_sha, digest = timed(payload.sha256)
    conn.send((fed.port, pport, digest, payload.nbytes, t_sha))
    while (msg := conn.recv()) != "stop":
        conn.send((board.digests[-1:], plain_sink.digests[-1:]))
    fed.stop(0)
    psrv.stop(0)


def fresh(payload: Payload) -> Payload:
    """The same bytes as a new update (no cached digest): the sender's hashing pass counts, as in a real upload."""
    return Payload(payload.buffers, payload.tensors)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(params: int, chunks_kib: list[int], repeats: int) -> dict:
    limits = TransferLimits(max_chunk_bytes=4 << 20, max_total_bytes=8 << 30)
    ctx = mp.get_context("spawn")  # never fork a process that has gRPC threads
    rows, info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp), "fed", ["fed", "site-a"])
        for kib in chunks_kib:
            chunk = kib << 10
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=federation_process, args=(child, params, chunk, tmp, limits))
            proc.start()
            fed_port, plain_port, digest, nbytes, t_sha = parent.recv()
            info = {"bytes": nbytes, "params": nbytes // 4, "sha256_mb_s": nbytes / MB / t_sha}
            client = SiteClient(f"127.0.0.1:{fed_port}", pki.credentials("site-a"), "fed", identity=pki.identity("site-a"),
                                retry=RetryPolicy(attempts=1), chunk_bytes=chunk, limits=limits)
            client.enroll()
            client.heartbeat()
            pchan = grpc.insecure_channel(f"127.0.0.1:{plain_port}", options=_opts(limits))
            pdown = pchan.unary_stream("/bench.Plain/Download", request_serializer=lambda b: b, response_deserializer=pb.TransferPart.FromString)
            pup = pchan.stream_unary("/bench.Plain/Upload", request_serializer=pb.TransferPart.SerializeToString, response_deserializer=lambda b: b)
            received: dict[str, Payload] = {}

            def plain_download() -> bytes:
                parts = iter(pdown(b""))
                asm = Assembler(next(parts).header, limits)
                for p in parts:
                    asm.feed(p.chunk)
                received["plain"] = asm.finish()
                return received["plain"].sha256()

            def mtls_download() -> bytes:
                received["mtls"] = client.download_model(1)
                return received["mtls"].sha256()

            def server_digests() -> tuple[list[bytes], list[bytes]]:
                parent.send("digests")
                return parent.recv()

            def plain_upload() -> bytes:
                pup(iter_parts(pb.TransferHeader(kind=pb.PAYLOAD_KIND_UPDATE_PLAIN), fresh(received["plain"]), chunk))
                return server_digests()[1][-1]

            def mtls_upload() -> bytes:
                client.upload_update(fresh(received["mtls"]), round_id=1)
                return server_digests()[0][-1]

            best: dict[str, float] = {}
            for _ in range(repeats):
                for label, fn in (("plain_down", plain_download), ("mtls_down", mtls_download),
                                  ("plain_up", plain_upload), ("mtls_up", mtls_upload)):
                    secs, got = timed(fn)
                    assert got == digest, f"{label}: received bytes differ from sent bytes"
                    best[label] = min(best.get(label, float("inf")), secs)
            client.close()
            pchan.close()
            parent.send("stop")
            proc.join(timeout=60)
            row = {"chunk_kib": kib, **{f"{k}_mb_s": nbytes / MB / v for k, v in best.items()}}
            row["down_ratio_mtls_over_plain"] = row["mtls_down_mb_s"] / row["plain_down_mb_s"]
            row["up_ratio_mtls_over_plain"] = row["mtls_up_mb_s"] / row["plain_up_mb_s"]
            rows.append(row)
    return {**info, "repeats": repeats, "rows": rows,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "grpc": grpc.__version__}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=124_000_000)
    ap.add_argument("--chunk-kib", default="256,1024,3072")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    res = run(args.params, [int(x) for x in args.chunk_kib.split(",")], args.repeats)
    print(f"model: {res['params']:,} float32 parameters = {res['bytes'] / MB:.0f} MB; SHA-256 alone {res['sha256_mb_s']:.0f} MB/s")
    print(f"{'chunk':>8} | {'plain down':>10} {'mTLS down':>10} {'ratio':>6} | {'plain up':>10} {'mTLS up':>10} {'ratio':>6}   (MB/s, best of {res['repeats']})")
    for r in res["rows"]:
        print(f"{r['chunk_kib']:>5} KiB | {r['plain_down_mb_s']:>10.0f} {r['mtls_down_mb_s']:>10.0f} {r['down_ratio_mtls_over_plain']:>6.2f} | "
              f"{r['plain_up_mb_s']:>10.0f} {r['mtls_up_mb_s']:>10.0f} {r['up_ratio_mtls_over_plain']:>6.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
