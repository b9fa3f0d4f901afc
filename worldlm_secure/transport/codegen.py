"""Regenerate the committed protobuf/gRPC modules from protocols/federation.proto.

Run ``python -m worldlm_secure.transport.codegen`` after editing the .proto; a test regenerates
into a temporary directory and fails if the committed files differ. Needs grpcio-tools (test extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "protocols" / "federation.proto"
PACKAGE_DIR = "worldlm_secure/transport"  # the .proto is mapped here so generated imports are package-absolute
GENERATED = ("federation_pb2.py", "federation_pb2_grpc.py")


def generate(out_root: Path, proto: Path = PROTO) -> list[Path]:
    """Write the generated modules under ``out_root/worldlm_secure/transport/``; return their paths."""
    from grpc_tools import protoc  # imported lazily: only developers and tests need grpcio-tools

    out_root = Path(out_root)
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PACKAGE_DIR}={proto.parent}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"{PACKAGE_DIR}/{proto.name}",
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} for {proto}")
    return [out_root / PACKAGE_DIR / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(REPO):
        print(path.relative_to(REPO))
    sys.exit(0)
