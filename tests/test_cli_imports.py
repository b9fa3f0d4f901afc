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


# `keys *` and `ledger *` call the library inside the command: `worldlm_secure.transport` loads its names
# lazily (no grpc for `keys`), and the ledger recomputes RDP and PRV ε with Opacus' numpy/scipy accountant
# files loaded without Opacus' package (privacy/accountant.py), so neither imports torch.
LIBRARY_LIGHT = [
    pytest.param(["keys", "init-ca", "--name", "fed-eu", "--out", "{tmp}/ca"], id="keys init-ca"),
    pytest.param(["ledger", "verify", "{tmp}/missing.sqlite"], id="ledger verify missing"),
    pytest.param(["ledger", "show", "{tmp}/missing.sqlite"], id="ledger show missing"),
]


@pytest.mark.parametrize("args", LIBRARY_LIGHT)
def test_keys_and_ledger_commands_import_no_heavy_module(args: list[str], tmp_path: Path) -> None:
    code, heavy, _ = run_probe([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert heavy == [], f"imported {heavy}"


def _make_prv(path: Path, node: str) -> None:
    """A signed ledger whose stream is accounted with PRV (`differential_privacy.accountant: prv`, as in
    policies/healthcare.yaml): `verify` recomputes every ε with Opacus' PRV accountant."""
    from test_ledger_chain import effective_policy

    from worldlm_secure.identity import NodeIdentity
    from worldlm_secure.ledger import Ledger, release_entry
    from worldlm_secure.privacy import BudgetTracker

    policy = effective_policy(differential_privacy={"epsilon_budget": 40.0, "accountant": "prv"})
    t = BudgetTracker(budget=40.0, delta=1e-5, accountant="prv", stream=f"{node}/user")
    with Ledger(path, NodeIdentity.generate(node)) as led:
        for r, z in enumerate((1.1, 0.9)):  # z changes: the PRV composition is heterogeneous
            led.append(release_entry(
                release_id=f"{r}:shared:fed", round=r, level="site", source=node, destination="fed",
                group="shared", tensor_names=("model.layers.0.w",), protocol="masking", cohort_size=3, dropouts=0,
                dp_level="user", mechanism="central_gaussian", clipping_norm=1.0, policy_sha256=policy.sha256,
                charge=t.charge(z, 1.0),
            ), policy_document=policy.canonical_json())


@pytest.fixture(scope="module", params=["rdp", "prv"])
def dp_ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ledger with user-level DP entries (ε recomputed by `verify`): RDP-accounted with a no-DP entry
    (test_ledger_cli), or PRV-accounted."""
    from test_ledger_cli import _make

    path = tmp_path_factory.mktemp("ledgers") / "ledgers" / "site-a.sqlite"
    (_make if request.param == "rdp" else _make_prv)(path, "site-a")
    return path


REAL_LEDGER = [
    (["ledger", "verify", "{ledger}"], HEAVY),
    (["ledger", "verify", "--json", "{ledger}"], HEAVY),
    (["ledger", "show", "{ledger}"], HEAVY),
    (["ledger", "show", "--json", "{ledger}"], HEAVY),
    (["ledger", "export", "{ledger}"], HEAVY),
    (["ledger", "audit", "{dir}"], HEAVY),
    (["ledger", "audit", "--json", "{dir}"], HEAVY),
    # The HTML report draws its plots with matplotlib, imported when the report is drawn (never at import).
    (["ledger", "report", "{dir}", "--out", "{dir}/report.html"], tuple(m for m in HEAVY if m != "matplotlib")),
]


@pytest.mark.parametrize("args,forbidden", REAL_LEDGER, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_ledger_commands_on_a_dp_ledger_import_no_heavy_module(
    args: list[str], forbidden: tuple[str, ...], dp_ledger: Path
) -> None:
    """Recomputing every ε of a DP ledger (RDP or PRV accountant) needs neither torch nor Opacus' package."""
    argv = [a.replace("{ledger}", str(dp_ledger)).replace("{dir}", str(dp_ledger.parent)) for a in args]
    code, heavy, _ = run_probe(argv)
    assert code in (0, 1), f"`worldlm-secure {' '.join(argv)}` exited {code}"
    if args[1] in ("verify", "export"):  # every ε was recomputed (a failed recomputation would exit 1)
        assert code == 0, f"`worldlm-secure {' '.join(argv)}` exited {code}"
    assert not set(heavy) & set(forbidden), f"`worldlm-secure {' '.join(args)}` imported {heavy}"
