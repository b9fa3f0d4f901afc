"""The committed protobuf/gRPC modules are what protocols/federation.proto generates.

Checks: the message/service definitions are identical (holds across protoc versions); the files are
identical byte for byte to what the pinned generator (codegen.GENERATOR_VERSION) writes, with the
installed grpcio-tools when it is that version, else with the pinned one fetched by pip (skips
offline); and the gencode stamp agrees with pyproject's protobuf range (gencode of major V runs on
runtimes V and V+1, so the floor is the stamp and the ceiling V+2). Regenerate with
`python -m worldlm_secure.transport.codegen`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from worldlm_secure.transport import codegen
from worldlm_secure.transport import federation_pb2

pytest.importorskip("grpc_tools")
STALE = "stale generated code: run `python -m worldlm_secure.transport.codegen` and commit the result"


def test_committed_descriptor_matches_the_proto(tmp_path):
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "federation.desc"
    rc = protoc.main([
        "grpc_tools.protoc",
        f"--proto_path={codegen.PACKAGE_DIR}={codegen.PROTO.parent}",
        f"--descriptor_set_out={out}",
        f"{codegen.PACKAGE_DIR}/{codegen.PROTO.name}",
    ])
    assert rc == 0
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    _drop_json_names(fresh.message_type)  # generated Python code leaves out the derived json_name
    committed = descriptor_pb2.FileDescriptorProto.FromString(federation_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, STALE


def _drop_json_names(messages) -> None:
    for m in messages:
        for f in m.field:
            f.ClearField("json_name")
        _drop_json_names(m.nested_type)


def _committed_stamp() -> str:
    text = (codegen.REPO / codegen.PACKAGE_DIR / "federation_pb2.py").read_text()
    return re.search(r"^# Protobuf Python Version: (.*)$", text, re.M).group(1)


def _same_files(fresh) -> None:
    committed = codegen.REPO / codegen.PACKAGE_DIR
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), f"{path.name}: {STALE}"


def test_generated_files_are_identical_when_the_generator_matches(tmp_path):
    if codegen.installed_generator() != codegen.GENERATOR_VERSION:
        pytest.skip(f"grpcio-tools {codegen.installed_generator()} installed, the committed files come from "
                    f"{codegen.GENERATOR_VERSION}; test_pinned_generator_reproduces_the_committed_files covers it")
    _same_files(codegen.generate(tmp_path))


def test_pinned_generator_reproduces_the_committed_files(tmp_path, tmp_path_factory):
    try:
        tools = codegen.fetch_pinned(codegen.TOOLS_CACHE)
    except (RuntimeError, OSError) as exc:
        try:  # the shared cache may not be writable: a private one
            tools = codegen.fetch_pinned(tmp_path_factory.mktemp("grpcio-tools"))
        except RuntimeError:
            pytest.skip(f"cannot fetch grpcio-tools=={codegen.GENERATOR_VERSION} (offline?): {exc}")
    _same_files(codegen.generate_pinned(tmp_path, tools_dir=tools))


def test_gencode_stamp_matches_the_pinned_protobuf_range():
    stamp = _committed_stamp()
    assert stamp == codegen.GENCODE_VERSION, "codegen.GENCODE_VERSION must be the committed stamp"
    major = int(stamp.split(".")[0])
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((codegen.REPO / "pyproject.toml").read_text())["project"]
    (protobuf,) = [d for d in deps["dependencies"] if re.match(r"protobuf\b", d)]
    # floor: the runtime may not be older than the gencode; ceiling: gencode major V is supported up to V+1
    assert protobuf.replace(" ", "") == f"protobuf>={stamp},<{major + 2}", protobuf
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '(.*)'",
                               (codegen.REPO / codegen.PACKAGE_DIR / "federation_pb2_grpc.py").read_text()).group(1)
    assert grpc_generated == codegen.GENERATOR_VERSION
    (grpcio,) = [d for d in deps["dependencies"] if re.match(r"grpcio\b(?!-)", d)]
    floor = re.search(r">=([0-9.]+)", grpcio).group(1)
    assert tuple(map(int, floor.split("."))) >= tuple(map(int, grpc_generated.split(".")))
    (tools,) = [d for d in deps["optional-dependencies"]["test"] if d.startswith("grpcio-tools")]
    assert re.search(r">=([0-9.]+)", tools).group(1) == codegen.GENERATOR_VERSION  # the pinned one is allowed


def test_generated_code_imports_without_warnings_under_this_runtime():
    # older gencode on a newer runtime is supported silently (no "exactly one major version older" noise)
    code = "import worldlm_secure.transport.federation_pb2_grpc"
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-800:]


def test_proto_declares_a_versioned_package():
    text = codegen.PROTO.read_text()
    assert "package worldlm.v1;" in text and 'syntax = "proto3";' in text
    assert federation_pb2.DESCRIPTOR.package == "worldlm.v1"
