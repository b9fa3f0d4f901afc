"""Usage errors are one line and exit 2, under the installed typer and the oldest the pyproject allows.

typer >= 0.16 (the floor: older typer breaks under click >= 8.2) may run on the `click` package or on
its own bundled copy (`typer._click`); `cli.main` catches both. The oldest typer is pip-installed into a
temporary folder put first on sys.path (skipped with a message when that is not possible, e.g. offline;
set WORLDLM_TYPER_OLD_DIR to a folder where `pip install --target DIR "typer==0.16.*"` was run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worldlm_secure import __version__

REPO = Path(__file__).resolve().parents[1]
OLDEST = "typer==0.16.*"

RUN = """
import sys, typer
sys.stderr.write("@@typer " + typer.__version__ + "\\n")
from worldlm_secure.cli import main
sys.exit(main(sys.argv[1:]))
"""

# args, exit code, what stderr (one line) or stdout must contain
MATRIX = [
    (["--version"], 0, f"worldlm-secure {__version__}"),
    (["simulate", "--rounds", "abc"], 2, "Invalid value for '--rounds'"),
    (["simulate", "--bogus"], 2, "No such option"),
    (["policy", "check"], 2, "Missing argument"),
    (["ledger", "verify"], 2, "Missing argument"),
    (["nosuchcommand"], 2, "No such command"),
    (["simulate", "--device", "tpu"], 2, "--device: unknown device 'tpu'"),
    (["simulate", "--rounds", "0"], 2, "--rounds: must be at least 1"),
    (["simulate", "--backend", "spark"], 2, "--backend: 'spark' is not one of inprocess, ray"),
    (["compare", "x.yaml", "--backend", "spark"], 2, "--backend: 'spark' is not one of inprocess, ray"),
    (["simulate", "--resume", "--overwrite"], 2, "--resume and --overwrite"),
    (["world", "up", "examples/local-world/world.yaml", "--launch", "spawn"], 2, "--launch: must be fork or exec"),
    (["policy", "check", "policies/eu.yaml"], 0, "ok: policies/eu.yaml"),
    (["--help"], 0, "Example:"),
    (["simulate", "--help"], 0, "cuda:N"),
]


def _run(args: list[str], pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-W", "ignore", "-c", RUN, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _check(args: list[str], code: int, text: str, pythonpath: str | None = None) -> None:
    proc = _run(args, pythonpath)
    err = [line for line in proc.stderr.splitlines() if not line.startswith("@@typer")]
    assert proc.returncode == code, (args, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    if code == 2:
        assert len(err) == 1, f"{args}: not one line:\n" + "\n".join(err)
        assert err[0].startswith("error: ") and text in err[0], err[0]
    else:
        assert text in proc.stdout + "\n".join(err), proc.stdout


@pytest.mark.parametrize("args,code,text", MATRIX, ids=[" ".join(m[0]) for m in MATRIX])
def test_cli_matrix_installed_typer(args: list[str], code: int, text: str) -> None:
    _check(args, code, text)


@pytest.fixture(scope="module")
def oldest_typer(tmp_path_factory: pytest.TempPathFactory) -> str:
    given = os.environ.get("WORLDLM_TYPER_OLD_DIR")
    if given:
        return given
    target = tmp_path_factory.mktemp("typer_oldest")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           OLDEST], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot pip-install {OLDEST} (offline?): {proc.stderr.strip().splitlines()[-1:]}; "
                    "set WORLDLM_TYPER_OLD_DIR to a folder with it installed")
    return str(target)


@pytest.mark.typer_matrix
@pytest.mark.parametrize("args,code,text", MATRIX, ids=[" ".join(m[0]) for m in MATRIX])
def test_cli_matrix_oldest_typer(args: list[str], code: int, text: str, oldest_typer: str) -> None:
    proc = _run(["--version"], oldest_typer)
    assert "@@typer 0.16." in proc.stderr, proc.stderr  # really the oldest one
    _check(args, code, text, oldest_typer)


def test_policy_check_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "policies" / "eu.yaml").read_text().replace("min_cohort: 3", "min_cohort: 0"))
    proc = _run(["policy", "check", "--json", "policies/eu.yaml", str(bad)])
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and [f["ok"] for f in doc["files"]] == [True, False]
    assert doc["files"][0]["jurisdiction"] and "min_cohort" in doc["files"][1]["error"]
    proc = _run(["policy", "check", "--json", "--chain", "policies/eu.yaml", "policies/research-open.yaml"])
    assert proc.returncode == 0 and json.loads(proc.stdout)["chain"]["protocol"] == "masking"


def test_every_command_shows_an_example() -> None:
    from typer.testing import CliRunner

    from worldlm_secure.cli import app

    runner = CliRunner()
    for cmd in (["simulate"], ["compare"], ["policy", "check"], ["policy", "explain"], ["policy", "effective"],
                ["policy", "schema"], ["keys", "init-ca"], ["keys", "issue"], ["keys", "show"], ["node", "start"],
                ["world", "up"], ["world", "keys"]):
        res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "Example" in res.output, cmd
    res = runner.invoke(app, ["simulate", "--help"], env={"COLUMNS": "200"})
    assert "cuda:N" in res.output and "inprocess" in res.output and "ray" in res.output


def test_user_text_is_never_an_emoji() -> None:
    from worldlm_secure.cli._console import esc, make_console

    c = make_console(width=80, force_terminal=False)
    with c.capture() as cap:
        c.print("release 2:key:eu at [bold]" + esc("[site]") + "[/]")
    assert cap.get().strip() == "release 2:key:eu at [site]"


COMMANDS = [
    ["simulate"], ["compare"], ["policy", "check"], ["policy", "explain"], ["policy", "effective"],
    ["policy", "schema"], ["ledger", "verify"], ["ledger", "audit"], ["ledger", "show"], ["ledger", "export"],
    ["ledger", "pubkey"], ["ledger", "report"], ["keys", "init-ca"], ["keys", "issue"], ["keys", "show"],
    ["node", "start"], ["world", "up"], ["world", "keys"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_shows_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from worldlm_secure.cli import main

    assert main([*command, "--help"]) == 0
    assert "Example" in capsys.readouterr().out, f"`worldlm-secure {' '.join(command)} --help` has no example"
