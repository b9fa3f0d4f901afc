"""A round announcement's params come from the federation: a member decodes them or skips the round,
never crashes (`node.rounds.Phase.from_announcement`)."""

from __future__ import annotations

import pytest

from worldlm_secure.errors import SecAggError
from worldlm_secure.node.rounds import Phase
from worldlm_secure.transport.handler import Announcement


@pytest.mark.parametrize("params", [
    b"\xff\xfe", b"[]", b"null", b'{"phase": "key"}', b'{"world_round": "x", "phase": "key"}',
    b'{"world_round": 1, "phase": "nope"}', b'{"world_round": 1e400, "phase": "key"}',
    b'{"world_round": 1, "phase": "key", "n_max": "nan"}', b'{"world_round": 1, "phase": "key", "n_max": -1}',
    b"[" * 100_000,
])
def test_malformed_params_are_a_protocol_error(params: bytes) -> None:
    with pytest.raises(SecAggError, match="round 3: the announcement"):
        Phase.from_announcement(Announcement(3, (), "none", params))


def test_params_round_trip() -> None:
    phase = Phase(2, "shared", 5.0)
    assert Phase.from_announcement(Announcement(3, (), "none", phase.to_bytes())) == phase
