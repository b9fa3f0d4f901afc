"""PRV ε without torch (issue #18): `ledger verify` recomputes a PRV-accounted stream with Opacus' own PRV
files loaded without Opacus' package (privacy/accountant.py, `_light_accountants`), and the ε is bit for bit
what Opacus' `PRVAccountant` gives, in a fresh interpreter that never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from worldlm_secure.privacy import accountant as acc
from worldlm_secure.privacy.accountant import PRV_EPS_ERROR, MechanismStep, epsilon_of

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "opacus", "tenseal", "grpc")

# (z, q, steps) histories as a ledger stream records them: q = 1 (every member, every round), a changed z
# (dropouts under distributed noise), and a subsampled DP-SGD stream.
HISTORIES = [
    pytest.param([(1.1, 1.0, 3)], 1e-5, id="q1"),
    pytest.param([(1.1, 1.0, 1), (0.95, 1.0, 1), (0.8, 0.25, 3), (1.1, 1.0, 1)], 1e-5, id="heterogeneous"),
    pytest.param([(1.3, 0.05, 40)], 1e-6, id="subsampled", marks=pytest.mark.slow),
]

PROBE = """
import json, sys
from worldlm_secure.privacy.accountant import MechanismStep, epsilon_of, _prv_accountant_class
hist, delta = json.loads(sys.argv[1])
eps = epsilon_of([MechanismStep(z, q, n) for z, q, n in hist], delta, "prv")
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
print(json.dumps({"eps": eps.hex(), "heavy": heavy, "module": _prv_accountant_class().__module__}))
""" % (HEAVY,)


def _opacus_prv(hist: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    a = PRVAccountant()
    a.history = [tuple(h) for h in hist]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(a.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


@pytest.mark.parametrize("hist,delta", HISTORIES)
def test_light_prv_is_bit_identical_to_opacus_and_imports_no_torch(hist: list[tuple[float, float, int]],
                                                                    delta: float) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps([hist, delta])], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"PRV recomputation imported {out['heavy']}"
    assert out["module"] == "worldlm_secure.privacy._opacus_accountants.prv"  # the light copy ran
    assert float.fromhex(out["eps"]) == _opacus_prv(hist, delta)  # exactly, not approximately


def test_the_light_prv_class_is_used_until_opacus_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: with Opacus' accountants imported (training) its own class is used, otherwise the light
    copy; both give the same bits."""
    import opacus.accountants  # noqa: F401

    hist = [(1.1, 1.0, 2), (0.9, 1.0, 1)]
    real = epsilon_of([MechanismStep(*h) for h in hist], 1e-5, "prv")
    assert acc._prv_accountant_class().__module__ == "opacus.accountants.prv"
    monkeypatch.delitem(sys.modules, "opacus.accountants.prv")
    assert acc._prv_accountant_class().__module__ == "worldlm_secure.privacy._opacus_accountants.prv"
    assert epsilon_of([MechanismStep(*h) for h in hist], 1e-5, "prv") == real == _opacus_prv(hist, 1e-5)
