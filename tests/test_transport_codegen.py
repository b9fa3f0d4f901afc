"""The committed protobuf/gRPC modules are what protocols/federation.proto generates.

Two checks: the message/service definitions are identical (holds across protoc versions), and,
when the installed grpcio-tools is the version that generated the committed files, the files
are identical byte for byte. Regenerate with `python -m worldlm_secure.transport.codegen`.
"""

from __future__ import annotations

import re

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


def test_generated_files_are_identical_when_the_generator_matches(tmp_path):
    fresh = codegen.generate(tmp_path)
    committed = codegen.REPO / codegen.PACKAGE_DIR
    version = re.compile(r"^# Protobuf Python Version: .*$", re.M)
    fresh_pb2, old_pb2 = fresh[0].read_text(), (committed / fresh[0].name).read_text()
    if version.search(fresh_pb2).group(0) != version.search(old_pb2).group(0):
        pytest.skip("a different protoc generated the committed files; the descriptor test covers sync")
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), f"{path.name}: {STALE}"


def test_proto_declares_a_versioned_package():
    text = codegen.PROTO.read_text()
    assert "package worldlm.v1;" in text and 'syntax = "proto3";' in text
    assert federation_pb2.DESCRIPTOR.package == "worldlm.v1"
