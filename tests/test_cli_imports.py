"""The import boundary of the command line: light commands never import the heavy stack.

`--help`, `--version`, `policy *`, `keys *` and `ledger *` must start in about a second, so they must
not import torch, transformers, opacus, tenseal or grpc (8-12 s on a loaded 2-core machine). Each case
runs in a fresh interpreter and asserts on the modules loaded, never on time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "opacus", "tenseal", "grpc", "datasets", "matplotlib")

PROBE = """
import json, sys
from worldlm_secure.cli import main
code = main(sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in %r})
sys.stderr.write("\\n@@" + json.dumps({"code": code, "heavy": heavy}) + "\\n")
""" % (HEAVY,)


def run_probe(args: list[str], cwd: Path = REPO, pythonpath: str | None = None) -> tuple[int, list[str], str]:
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(cwd)}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV")})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("@@")]
    assert line, f"probe did not finish: rc {proc.returncode}\n{proc.stderr[-2000:]}"
    rec = json.loads(line[-1][2:])
    return rec["code"], rec["heavy"], proc.stdout


LIGHT = [
    ["--help"],
    ["--version"],
    ["simulate", "--help"],
    ["compare", "--help"],
    ["ledger", "--help"],
    ["keys", "--help"],
    ["world", "up", "--help"],
    ["policy", "check", "policies/eu.yaml"],
    ["policy", "check", "--json", "policies/eu.yaml", "policies/research-open.yaml"],
    ["policy", "explain", "policies/eu.yaml"],
    ["policy", "effective", "examples/world-jurisdictions.yaml", "--node", "eu-a"],
    ["policy", "schema"],
    ["simulate", "--rounds", "abc"],  # usage errors are found before any import
    ["simulate", "--device", "tpu"],
    ["simulate", "--rounds", "-1"],
]


@pytest.mark.parametrize("args", LIGHT, ids=" ".join)
def test_light_commands_import_no_heavy_module(args: list[str]) -> None:
    code, heavy, _ = run_probe(args)
    assert code in (0, 2)
    assert heavy == [], f"`worldlm-secure {' '.join(args)}` imported {heavy}"


def test_the_cli_package_itself_is_light() -> None:
    code = "import sys, worldlm_secure.cli as c; print(sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# Commands whose library modules are owned elsewhere and still import the heavy stack at import time:
# `keys *` imports `worldlm_secure.transport` (whose __init__ imports the gRPC server), `ledger verify`
# imports `worldlm_secure.privacy.accountant` (Opacus). The CLI side is lazy; these xfail until those
# packages' __init__/imports are made lazy, and then pass (strict=False: they will start passing).
OWNED_ELSEWHERE = [
    pytest.param(["keys", "init-ca", "--name", "fed-eu", "--out", "{tmp}/ca"], id="keys init-ca"),
    pytest.param(["ledger", "verify", "{tmp}/missing.sqlite"], id="ledger verify",
                 marks=pytest.mark.xfail(reason="worldlm_secure.ledger imports privacy.accountant (opacus, torch)",
                                         strict=False)),
    pytest.param(["ledger", "show", "{tmp}/missing.sqlite"], id="ledger show",
                 marks=pytest.mark.xfail(reason="worldlm_secure.ledger imports privacy.accountant (opacus, torch)",
                                         strict=False)),
]


@pytest.mark.parametrize("args", OWNED_ELSEWHERE)
def test_keys_and_ledger_commands_import_no_heavy_module(args: list[str], tmp_path: Path) -> None:
    code, heavy, _ = run_probe([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert heavy == [], f"imported {heavy}"
