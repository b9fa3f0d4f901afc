"""How `world up` starts one node process: `node start` in a fresh interpreter, or forked from a warm one.

- ``exec``: ``python -m worldlm_secure.cli node start ...``, exactly the command an operator runs.
- ``fork`` (the `world up` command's default where the OS has fork): a `multiprocessing` fork server imports
  torch, transformers and the node code once; each node is forked from it and runs the same command-line entry
  (`cli.main`) with the same arguments and the caller's current environment, in its own process with its own
  sockets, keys, state folder, stdout and stderr. Only the already-imported module code is shared
  (copy-on-write). Every secret a node uses is drawn after the fork from the OS CSPRNG (os.urandom, OpenSSL),
  never from state created at import time. As with any `multiprocessing` start method but fork, the calling
  script is re-imported in each node (as ``__mp_main__``): a script calling `world_up(launch="fork")` needs an
  ``if __name__ == "__main__":`` guard, which is why the library's default is ``exec``.

Why fork: a fresh node spends ~4-6 CPU-seconds importing torch and transformers before it reads its config; a
world of 11 nodes spent ~40 s of a 2-core machine on imports before the first site enrolled. The fork server
pays that once per driving process (once per `world up`, once per test worker).

Fork safety: the server is started with one OpenMP/MKL thread in its environment and imports modules only (it
never trains, opens a gRPC channel or creates a thread pool), which is the state PyTorch's own DataLoader
workers are forked from.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit hook before ours (see _kill_forked_nodes)
import os
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Literal, Protocol

Launch = Literal["fork", "exec"]

# One thread per node process: 11+ nodes share a few cores (see train.device.set_threads for the measured cost).
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# The fork server imports this one module (`node.warm_imports`), which imports what a node needs before it reads
# its config and swallows any failure: multiprocessing skips only ImportError, and any other error in a preload
# kills the server (the node then imports what is missing itself, as under exec).
PRELOAD = ["worldlm_secure.node.warm_imports"]

_server_lock = threading.Lock()
_forked: weakref.WeakSet[ForkedNode] = weakref.WeakSet()


class NodeHandle(Protocol):
    """The part of `subprocess.Popen` that `world up` and its tests use, for either way of starting."""

    pid: int
    stdout: IO[str] | None

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...


def fork_available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def start_node_process(argv: list[str], log: Path, how: Launch) -> NodeHandle:
    """Start ``worldlm-secure`` with ``argv`` (e.g. ``["node", "start", ...]``) as its own process: stdout (the
    JSON-lines events) to a pipe the caller reads, stderr appended to ``log``."""
    if how == "exec":
        with open(log, "ab") as err:
            return subprocess.Popen([sys.executable, "-m", "worldlm_secure.cli", *argv], stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=dict(os.environ, **NODE_ENV))
    if not fork_available():
        return start_node_process(argv, log, "exec")
    ctx = _fork_context()
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_forked_main, args=(argv, writer, str(log), dict(os.environ)),
                          name=f"worldlm-secure {' '.join(argv[:2])}")
    try:
        process.start()
    except (EOFError, OSError) as exc:  # the fork server died: say so once, and start a fresh interpreter instead
        reader.close()
        writer.close()
        with open(log, "a") as err:
            err.write(f"fork server unavailable ({exc!r}); starting a fresh interpreter\n")
        return start_node_process(argv, log, "exec")
    writer.close()
    stdout = os.fdopen(os.dup(reader.fileno()), "r", encoding="utf-8")
    reader.close()
    node = ForkedNode(process, stdout, argv)
    _forked.add(node)
    return node


class ForkedNode:
    """A node forked from the fork server, behind the `Popen` methods `world up` uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess, stdout: IO[str], argv: list[str]) -> None:
        assert process.pid is not None
        self.pid: int = process.pid
        self.stdout: IO[str] | None = stdout
        self._process = process
        self._argv = argv

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self._process.exitcode
        if code is None:
            raise subprocess.TimeoutExpired(self._argv, timeout or 0.0)
        return code

    # The fork server, not this process, reaps a node, so its pid is free for reuse once it has exited: signal
    # only a node not yet known to have exited (Popen keeps a zombie instead).
    def kill(self) -> None:
        if self.poll() is None:
            self._process.kill()

    def terminate(self) -> None:
        if self.poll() is None:
            self._process.terminate()


@atexit.register
def _kill_forked_nodes() -> None:
    """At interpreter exit, kill nodes still running (even stopped ones): multiprocessing would otherwise join
    them without a timeout and hang the caller. Registered after multiprocessing's own hook, so it runs first."""
    for node in list(_forked):
        node.kill()


def _fork_context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    with _server_lock:
        from multiprocessing import forkserver

        ctx.set_forkserver_preload(PRELOAD)
        # The server inherits os.environ when it starts: one OpenMP thread there, so no thread pool can exist
        # at fork time (a forked OpenMP pool deadlocks). Restored at once; only the server sees it.
        saved = {k: os.environ.get(k) for k in NODE_ENV}
        os.environ.update(NODE_ENV)
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return ctx


def _forked_main(argv: list[str], stdout: Connection, log: str, environ: dict[str, str]) -> None:
    """In the forked node: the caller's environment as of the launch, stdout to the caller's pipe, stderr to the
    log, one thread, then `cli.main(argv)`."""
    os.environ.clear()
    os.environ.update(environ)
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(err, 2)
    os.close(err)
    os.dup2(stdout.fileno(), 1)
    stdout.close()
    # Line-buffered: the caller follows the node's events as they are printed, as with PYTHONUNBUFFERED.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
    os.environ.update(NODE_ENV)
    import torch

    torch.set_num_threads(1)
    from worldlm_secure.cli import main

    sys.exit(main(argv))
