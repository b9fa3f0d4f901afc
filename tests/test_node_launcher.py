"""`node.launcher`: a node forked from the warm fork server behaves like a fresh `worldlm-secure` process: its
stdout reaches the caller line by line, its stderr goes to the log, its exit code is the command's."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from nodeworld import REPO
from worldlm_secure.node.launcher import Launch, start_node_process


@pytest.mark.parametrize("how", ["fork", "exec"])
def test_a_node_command_keeps_its_stdout_stderr_and_exit_code(tmp_path: Path, how: Launch) -> None:
    log = tmp_path / "node.log"
    ok = start_node_process(["--version"], log, how)
    assert ok.stdout is not None
    assert "worldlm-secure" in ok.stdout.read()
    assert ok.wait(timeout=120) == 0

    bad = start_node_process(["node", "start", "--policy", str(tmp_path / "p.yaml"), "--config", str(tmp_path / "missing.yaml")],
                             log, how)
    assert bad.stdout is not None
    assert bad.stdout.read() == ""
    assert bad.wait(timeout=120) == 2  # a configuration error, one line on stderr, as from the shell
    assert "missing.yaml" in log.read_text()


def test_a_forked_node_can_be_killed_and_reports_the_signal(tmp_path: Path) -> None:
    """What the fault tests rely on: poll, wait with a timeout, kill, as with subprocess.Popen. The command is a
    simulate of the default world (minutes of training), so it is still running when killed."""
    proc = start_node_process(["simulate", str(REPO / "examples" / "world.yaml"), "--out", str(tmp_path / "run")],
                              tmp_path / "log", "fork")
    assert proc.poll() is None and proc.returncode is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert proc.poll() == proc.returncode == -signal.SIGKILL


def test_nodes_forked_from_one_server_draw_different_secrets(tmp_path: Path) -> None:
    """The fork server holds no key material and no random state a node's secrets come from: two forked
    `keys init-ca` runs (Ed25519/X.509 from the OS CSPRNG through OpenSSL, after the fork) make different keys."""
    runs = [start_node_process(["keys", "init-ca", "--name", f"fed-{i}", "--out", str(tmp_path / f"ca{i}")],
                               tmp_path / "log", "fork") for i in range(2)]
    assert [r.wait(timeout=120) for r in runs] == [0, 0], (tmp_path / "log").read_text()
    keys = [(tmp_path / f"ca{i}" / "ca.key").read_bytes() for i in range(2)]
    assert keys[0] != keys[1] and all(len(k) > 0 for k in keys)
