"""A node SIGKILLed in the middle of appending leaves a ledger that verifies, with no half entry,
and a restarted node continues the same chain."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.ledger import read_ledger_file, verify

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from worldlm_secure.identity import NodeIdentity
    from worldlm_secure.ledger import Ledger, read_entries, release_entry
    from worldlm_secure.privacy import BudgetTracker

    key, path = Path(sys.argv[1]), Path(sys.argv[2])
    ident = NodeIdentity.load("site-k", key)
    led = Ledger(path, ident)
    prior = led.entries()
    tracker = BudgetTracker.from_entries(prior, stream="site-k/user", budget=1e6, delta=1e-5)
    r = len(prior)
    print("ready", flush=True)
    while True:  # appends until killed
        c = tracker.charge(3.0 + (r % 3) * 0.5, 1.0)
        led.append(release_entry(
            release_id=f"{r}:shared:fed", round=r, level="site", source="site-k", destination="fed",
            group="shared", tensor_names=tuple(f"t{i}" for i in range(50)), protocol="masking",
            cohort_size=8, dropouts=r % 3, dp_level="user", mechanism="distributed_discrete_gaussian",
            clipping_norm=1.0, policy_sha256="ab" * 32, charge=c, extra={"pad": "x" * 2000}))
        r += 1
    """
)


def _count(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(con.execute("SELECT count(*) FROM entries").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.slow  # each child imports torch+opacus (~5 s on 2 shared cores)
@pytest.mark.parametrize("kills", [2])
def test_sigkill_during_appends_leaves_a_verifiable_ledger(tmp_path: Path, kills: int) -> None:
    key, path = tmp_path / "site-k.key", tmp_path / "ledgers" / "site-k.sqlite"
    NodeIdentity.generate("site-k").save(key)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    seen = 0
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(key), str(path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode() if proc.stderr else ""
        target = seen + 10 + 7 * k
        deadline = time.monotonic() + 60
        while _count(path) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop: very likely inside an append transaction
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        rep = verify(path)
        assert rep.ok, rep.problem
        lf = read_ledger_file(path)
        assert lf.head is not None and lf.head[0] == len(lf.rows) == rep.total_rows
        assert [e.release_id for e in rep.entries] == [f"{r}:shared:fed" for r in range(len(rep.entries))]
        assert len(rep.entries) >= target > seen
        seen = len(rep.entries)


def test_a_crash_while_creating_leaves_no_ledger_without_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creation is atomic: a crash before the rename leaves no ledger at the path (only a hidden temp
    file), and the next start creates a complete one that verifies."""
    from worldlm_secure.ledger import Ledger

    ident = NodeIdentity.generate("site-c")
    path = tmp_path / "ledgers" / "site-c.sqlite"

    def crash(*_args: object) -> None:
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        Ledger(path, ident)
    assert not path.exists()
    monkeypatch.undo()
    Ledger(path, ident).close()
    lf = read_ledger_file(path)
    assert lf.meta["node"] == "site-c" and lf.meta["public_key"] == ident.public_bytes.hex()
    assert verify(path).ok
