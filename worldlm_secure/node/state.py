"""A node's durable state: small facts in SQLite (WAL, one transaction per write) and tensors in
safetensors checkpoints written atomically (temp file + fsync + rename + fsync of the folder).

A node killed with kill -9 finds, on restart, either the old or the new version of every fact and
checkpoint, never a torn one. Layout of the state folder:

    state.sqlite             key -> JSON value (round counters, what was trained and released)
    checkpoints/NAME.safetensors
    address                  host:port a federation actually listens on (port 0 resolved)
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


class NodeState:
    """The state folder of one node."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._con = sqlite3.connect(self.folder / "state.sqlite", isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def close(self) -> None:
        self._con.close()

    def get(self, key: str, default: Any = None) -> Any:
        row = self._con.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, **values: Any) -> None:
        """Set several keys in one transaction (all or nothing)."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            self._con.executemany(
                "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
            )
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    def next_link_round(self) -> int:
        """A link round id never used before by this node, even across restarts (persisted before use)."""
        rid = int(self.get("link_round", 0)) + 1
        self.put(link_round=rid)
        return rid

    # ---- checkpoints ----
    def checkpoint_path(self, name: str) -> Path:
        return self.folder / "checkpoints" / f"{name}.safetensors"

    def save_tensors(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
        data = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
        write_atomic(self.checkpoint_path(name), data)

    def load_tensors(self, name: str) -> dict[str, np.ndarray] | None:
        p = self.checkpoint_path(name)
        return st_load(p.read_bytes()) if p.is_file() else None
