"""Nothing leaves a node without `authorize`: a release with no matching authorization is a bug caught here."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch
import pytest

import worldlm_secure
from worldlm_secure.errors import PolicyViolation

PACKAGE = Path(worldlm_secure.__file__).resolve().parent
POLICIES = Path(__file__).resolve().parents[1] / "policies"
# Calls that sum / send member contributions. The protocol implementations themselves (secagg/) and the
# wire (transport/) sit below the release path; everything above them must authorize first.
RELEASING_CALLS = {"make_secure_sum", "run_round"}
BELOW_THE_RELEASE_PATH = ("secagg", "transport", "policy")


def _called_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_every_module_that_releases_also_authorizes() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in BELOW_THE_RELEASE_PATH:
            continue
        called = _called_names(ast.parse(path.read_text(encoding="utf-8")))
        if called & RELEASING_CALLS and "authorize" not in called:
            offenders.append(f"{rel}: calls {sorted(called & RELEASING_CALLS)} but never authorize()")
    assert not offenders, offenders


def _tiny_world(tmp_path: Path, site_policy: str) -> Path:
    p = lambda n: POLICIES / f"{n}.yaml"  # noqa: E731
    lines = ["name: enforce", "nodes:", f"  - {{name: world, policy: {p('research-open')}}}"]
    for fed in ("eu", "us", "apac"):
        lines.append(f"  - {{name: {fed}, parent: world, policy: {p('research-open')}}}")
        for i in range(3):
            lines.append(f"  - {{name: {fed}-{i}, parent: {fed}, policy: {p(site_policy)}}}")
    path = tmp_path / "world.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_release_path_authorizes_every_member_before_summing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release_mod = pytest.importorskip("worldlm_secure.federation.release")
    from worldlm_secure.federation.world import load_world
    from worldlm_secure.identity import NodeIdentity
    import worldlm_secure.policy as policy_pkg
    import worldlm_secure.secagg as secagg_pkg

    world = load_world(_tiny_world(tmp_path, "research-open"))
    events: list[str] = []
    real_authorize, real_make = policy_pkg.authorize, release_mod.make_secure_sum

    def spy_authorize(release, chain):  # type: ignore[no-untyped-def]
        events.append(f"auth:{release.source}")
        return real_authorize(release, chain)

    def spy_make(*args, **kwargs):  # type: ignore[no-untyped-def]
        events.append("sum")
        return real_make(*args, **kwargs)

    monkeypatch.setattr(policy_pkg, "authorize", spy_authorize)
    monkeypatch.setattr(release_mod, "make_secure_sum", spy_make)
    monkeypatch.setattr(secagg_pkg, "make_secure_sum", spy_make)
    members = ["eu-0", "eu-1", "eu-2"]
    path = release_mod.ReleasePath(world, {m: NodeIdentity.generate(m) for m in members})
    key = "model.layers.0.mlp.up_proj.weight"
    updates = {m: release_mod.MemberUpdate({key: torch.ones(4)}, np.ones(1)) for m in members}
    average = path.average_deltas(1, "key", "eu", updates, [key], {key: torch.Size([4])})
    assert torch.allclose(average[key], torch.ones(4))
    assert sorted(e for e in events if e.startswith("auth:")) == [f"auth:{m}" for m in members]
    assert events.index("sum") > max(i for i, e in enumerate(events) if e.startswith("auth:"))

    # a local tensor is refused and nothing is summed
    events.clear()
    with pytest.raises(PolicyViolation, match="layers.local"):
        head = {m: release_mod.MemberUpdate({"lm_head.weight": torch.ones(4)}, np.ones(1)) for m in members}
        path.average_deltas(2, "shared", "eu", head, ["lm_head.weight"], {"lm_head.weight": torch.Size([4])},
                            final_destination="world")
    assert "sum" not in events
