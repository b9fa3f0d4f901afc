"""The committed protobuf/gRPC modules are exactly what protocols/federation.proto generates."""

from __future__ import annotations

import pytest

from worldlm_secure.transport import codegen

pytest.importorskip("grpc_tools")


def test_generated_modules_are_in_sync_with_the_proto(tmp_path):
    fresh = codegen.generate(tmp_path)
    committed = codegen.REPO / codegen.PACKAGE_DIR
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{path.name} is stale: run `python -m worldlm_secure.transport.codegen` and commit the result"
        )


def test_proto_declares_a_versioned_package():
    text = codegen.PROTO.read_text()
    assert "package worldlm.v1;" in text and 'syntax = "proto3";' in text
