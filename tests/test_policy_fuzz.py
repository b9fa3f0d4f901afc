"""Arbitrary input never escapes as anything but a one-line PolicyError naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy import Policy, load_policy

POLICIES = Path(__file__).resolve().parents[1] / "policies"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            assert isinstance(load_policy(path), Policy)
        except PolicyError as exc:
            msg = str(exc)
            assert "\n" not in msg and str(path) in msg, msg


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    _load(text)


@settings(max_examples=150, deadline=None)
@given(doc=documents)
def test_arbitrary_yaml_structures(doc: object) -> None:
    _load(yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None)
@given(doc=documents, cut=st.integers(0, 2000))
def test_example_with_arbitrary_section(doc: object, cut: int) -> None:
    text = (POLICIES / "eu.yaml").read_text()
    text = text[: cut % len(text)] + "\n" + yaml.safe_dump({"differential_privacy": doc})
    _load(text)
