"""A node's durable state: atomic files, link round ids that never repeat across restarts, checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from worldlm_secure.node.state import NodeState, write_atomic


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.bin"
    write_atomic(target, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        write_atomic(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"


def test_link_rounds_never_repeat_across_restarts(tmp_path: Path) -> None:
    s = NodeState(tmp_path)
    assert [s.next_link_round() for _ in range(3)] == [1, 2, 3]
    s.close()
    s = NodeState(tmp_path)  # a restarted node
    assert s.next_link_round() == 4
    s.put(stage=[2, "aggregated"], history={"evals": {"2": 1.5}})
    s.close()
    s = NodeState(tmp_path)
    assert s.get("stage") == [2, "aggregated"] and s.get("history")["evals"]["2"] == 1.5
    assert s.get("missing", 7) == 7


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    s = NodeState(tmp_path)
    arrays = {"key/w": np.arange(6, dtype=np.float32).reshape(2, 3), "generator": np.arange(5, dtype=np.uint8)}
    s.save_tensors("site", arrays, {"param_groups": "[]"})
    got = s.load_tensors("site")
    assert got is not None and set(got) == set(arrays)
    for k in arrays:
        assert np.array_equal(got[k], arrays[k]) and got[k].dtype == arrays[k].dtype
    assert s.load_tensors("nothing") is None
