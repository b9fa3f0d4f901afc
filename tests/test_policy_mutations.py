"""Property test: any single broken field of an example policy is refused by `policy check`
with ONE line naming the file and the field — never a traceback, never accepted."""

from __future__ import annotations

import re
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worldlm_secure.cli import main
from worldlm_secure.policy.loader import parse_yaml
from worldlm_secure.policy.schema import (
    Audit, CkksParams, Destination, DifferentialPrivacy, Egress, MaskingParams, Policy, RecordDP, Residuals,
    SecureAggregation,
)
from worldlm_secure.policy.patterns import LayerPatterns

POLICIES = Path(__file__).resolve().parents[1] / "policies"
EXAMPLES = sorted(POLICIES.glob("*.yaml"))
ALL_FIELDS = {
    f
    for m in (Policy, LayerPatterns, SecureAggregation, MaskingParams, CkksParams, DifferentialPrivacy, RecordDP,
              Residuals, Egress, Destination, Audit)
    for f in m.model_fields
}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


DOCS = {p.name: _plain(parse_yaml(p).data) for p in EXAMPLES}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple, value: Any) -> None:
    _get(doc, path[:-1])[path[-1]] = value


def _copy(name: str) -> dict:
    return _plain(DOCS[name])


def _run(capsys: pytest.CaptureFixture[str], file: Path) -> str:
    capsys.readouterr()
    rc = main(["policy", "check", str(file)])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert rc != 0, f"accepted a broken policy:\n{file.read_text()}"
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert str(file) in lines[0], out
    return lines[0]


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _write(dir_: str, doc: dict, name: str = "mutant.yaml") -> Path:
    path = Path(dir_) / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _wrong_values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [[1, 2], 7, False]
    if isinstance(value, list):
        return [{"a": 1}, 7, True]
    if isinstance(value, bool):
        return ["yes", 1, {"a": 1}]
    if isinstance(value, (int, float)):
        return ["three", True, {"a": 1}, [1]]
    if isinstance(value, str):
        return [{"a": 1}, True, [[1]]]
    return [{"a": 1}]


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(DOCS)))
def test_wrong_type(capsys: pytest.CaptureFixture[str], data: st.DataObject, name: str) -> None:
    doc = _copy(name)
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    bad = data.draw(st.sampled_from(_wrong_values(_get(doc, path))), label="value")
    _set(doc, path, bad)
    with tempfile.TemporaryDirectory() as d:
        line = _run(capsys, _write(d, doc))
    assert _names(line, path), line


def _names(line: str, path: tuple) -> bool:
    """The line names the field at `path` (or an item inside it)."""
    return re.search(rf" {re.escape(_dotted(path))}(\.[\w]+)*:", line) is not None


_UPPER = {
    "threshold": 1.5, "max_dropout_fraction": 1.0, "bits": 99, "gain": 1.5, "scale_bits": 61,
    "delta": 1.0, "rank": 5000, "poly_modulus_degree": 1000,
}


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(DOCS)))
def test_out_of_range(capsys: pytest.CaptureFixture[str], data: st.DataObject, name: str) -> None:
    doc = _copy(name)
    numeric = [p for p in _paths(doc) if isinstance(_get(doc, p), (int, float)) and not isinstance(_get(doc, p), bool)]
    path = data.draw(st.sampled_from(numeric), label="path")
    choices: list[Any] = [-1, -0.5] if isinstance(_get(doc, path), float) else [-1, 0]
    if path[-1] in _UPPER:
        choices.append(_UPPER[path[-1]])
    if isinstance(path[-1], int):  # an item of coeff_mod_bit_sizes
        choices = [-1, 0, 61]
    if path[-1] in {"retention_days", "gain", "max_dropout_fraction"}:
        choices = [c for c in choices if c not in (0, -0.0)] or [-1]
    bad = data.draw(st.sampled_from(choices), label="value")
    _set(doc, path, bad)
    with tempfile.TemporaryDirectory() as d:
        line = _run(capsys, _write(d, doc))
    field = _dotted(path[:-1]) if isinstance(path[-1], int) else _dotted(path)
    assert f" {field}" in line, line


@SETTINGS
@given(
    data=st.data(),
    name=st.sampled_from(sorted(DOCS)),
    key=st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12).filter(lambda k: k not in ALL_FIELDS),
)
def test_unknown_key(capsys: pytest.CaptureFixture[str], data: st.DataObject, name: str, key: str) -> None:
    doc = _copy(name)
    mappings = [()] + [p for p in _paths(doc) if isinstance(_get(doc, p), dict)]
    path = data.draw(st.sampled_from(mappings), label="where")
    _get(doc, path)[key] = data.draw(st.sampled_from([1, "x", [1], {"a": 1}, True, None]), label="value")
    with tempfile.TemporaryDirectory() as d:
        line = _run(capsys, _write(d, doc))
    assert f" {_dotted(path + (key,))}: unknown key" in line, line


@SETTINGS
@given(
    data=st.data(),
    name=st.sampled_from(sorted(DOCS)),
    bad=st.sampled_from(["", "   ", "model.layers.[0", "a]b", 5, None, "a b", ["x"], "*.mlp.[", "lm_head.*"]),
)
def test_bad_pattern(capsys: pytest.CaptureFixture[str], data: st.DataObject, name: str, bad: Any) -> None:
    doc = _copy(name)
    group = data.draw(st.sampled_from(["local", "key", "shared"]), label="group")
    patterns = doc["layers"][group]
    index = data.draw(st.integers(0, len(patterns)), label="index")
    groups = {group}
    if bad == "lm_head.*":  # a pattern that another group already has
        bad, other = ("*.mlp.*", "key") if group == "local" else ("lm_head.*", "local")
        groups.add(other)
    patterns.insert(index, bad)
    with tempfile.TemporaryDirectory() as d:
        line = _run(capsys, _write(d, doc))
    assert any(re.search(rf" layers\.{g}(\.\d+)?:", line) for g in groups), line


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.sampled_from(sorted(DOCS)), min_size=1, max_size=4))
def test_extends_cycle(capsys: pytest.CaptureFixture[str], names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i, name in enumerate(names):
            doc = _copy(name)
            doc["name"] = f"p{i}"
            doc["extends"] = f"p{(i + 1) % len(names)}.yaml"  # p0 -> p1 -> ... -> p0
            files.append(_write(d, doc, f"p{i}.yaml"))
        capsys.readouterr()
        rc = main(["policy", "check", str(files[0])])
        captured = capsys.readouterr()
        out = captured.out + captured.err
        lines = [line for line in out.splitlines() if line.strip()]
        assert rc != 0 and "Traceback" not in out and len(lines) == 1, out
        assert d in lines[0] and " extends: cycle" in lines[0], out
