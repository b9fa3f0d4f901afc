"""worldlm-secure installs and runs beside Flower (`flwr`) in one environment (issue 18, item 1).

Flower and grpcio-health-checking require protobuf<7. The committed gRPC code carries protobuf gencode
6.31.0 (worldlm_secure/transport/codegen.py), which protobuf runtimes 6.31.0 up to 7.x accept, so both
packages fit one environment. This test builds such an environment: a venv in a tmp dir that sees this
interpreter's packages (torch and the rest are not downloaded again), `pip install -e .[test]`, then
`pip install flwr`, which installs flwr's protobuf<7 (and typer<0.21) INTO the venv, shadowing the newer
ones outside it. It then checks the venv really runs protobuf 6, and runs the CLI and the transport tests
there. Needs PyPI (or pip's cache); skips, saying so, where it cannot be reached.

A clean venv (no --system-site-packages) behaves the same, checked by hand: see README "Installing beside
Flower / in an existing environment".
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess[str], what: str) -> str:
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_flwr_and_worldlm_secure_share_an_environment() -> None:
    # Not pytest's tmp_path: pytest prunes old base temp folders, and the pytest run inside the venv (or any other
    # pytest on the machine) would delete this one while it is in use.
    with tempfile.TemporaryDirectory(prefix="worldlm-flwr-") as tmp:
        _coinstall(Path(tmp))


def _coinstall(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONDONTWRITEBYTECODE="1")
    probe = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp_path / "probe"),
                  "flwr"], env=env, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"PyPI cannot be reached (pip download flwr failed): {probe.stderr.strip()[-300:]}")

    times: dict[str, float] = {}
    venv = tmp_path / "venv"
    t = time.monotonic()
    _ok(_run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], env=env), "python -m venv")
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet"]
    _ok(_run(pip + ["-e", f"{REPO}[test]"], env=env), "pip install -e .[test]")
    times["install project"] = time.monotonic() - t
    t = time.monotonic()
    _ok(_run(pip + ["flwr"], env=env), "pip install flwr")
    times["install flwr"] = time.monotonic() - t

    # the venv's protobuf is flwr's (<7), shadowing any newer one outside the venv
    versions = _ok(_run([py, "-c", "import google.protobuf, flwr, grpc; "
                         "print(google.protobuf.__version__, google.protobuf.__file__, grpc.__version__)"],
                        env=env), "import flwr")
    protobuf, where, _grpc = versions.split()
    assert int(protobuf.split(".")[0]) < 7, versions
    assert where.startswith(str(venv)), f"protobuf {protobuf} is not the venv's own: {where}"

    cli = str(venv / "bin" / "worldlm-secure")
    t = time.monotonic()
    out = _ok(_run([cli, "--help"], env=env, timeout=120), "worldlm-secure --help")
    assert "policy" in out
    out = _ok(_run([cli, "policy", "check", "policies/eu.yaml"], env=env, timeout=120), "policy check")
    assert out.startswith("ok: policies/eu.yaml")
    out = _ok(_run([py, "-c", "import warnings; warnings.simplefilter('error'); "
                    "import worldlm_secure.transport.federation_pb2_grpc, google.protobuf; "
                    "print(google.protobuf.__version__)"], env=env), "import the generated gRPC code")
    assert out.strip() == protobuf
    times["cli"] = time.monotonic() - t
    t = time.monotonic()
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_transport_*.py"))
    out = _ok(_run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}", *tests], env=env,
                   timeout=900), "transport tests")
    times["transport tests"] = time.monotonic() - t
    assert " passed" in out and " failed" not in out
    print(f"protobuf {protobuf} in the venv; " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
