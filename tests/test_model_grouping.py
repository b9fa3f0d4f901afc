"""Parameter grouping: every parameter in exactly one of local, key, shared; clear errors otherwise."""

from __future__ import annotations

import pytest

from worldlm_secure.errors import ConfigError
from worldlm_secure.model import ModelSpec, assign_groups, build_model
from worldlm_secure.policy import LayerPatterns, load_policy

from conftest import POLICIES


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_example_policy_partitions_both_architectures(arch: str) -> None:
    model = build_model(ModelSpec(arch=arch, vocab_size=64))
    names = [n for n, _ in model.named_parameters()]
    layers = load_policy(POLICIES / "eu.yaml").layers
    groups = assign_groups(names, layers.group_of, source="eu.yaml layers")
    together = groups.local + groups.key + groups.shared
    assert sorted(together) == sorted(names)  # a partition: nothing lost ...
    assert len(set(together)) == len(names)  # ... nothing twice
    assert "lm_head.weight" in groups.local
    assert all(".mlp." in n or "ln_2" in n or "post_attention" in n for n in groups.key)
    assert groups.key and groups.shared


def test_unmatched_parameter_is_a_clear_error() -> None:
    layers = LayerPatterns(local=("a.*",), key=(), shared=())
    with pytest.raises(ConfigError, match=r"^eu.yaml layers: parameter 'b.weight' matches no local, key or shared"):
        assign_groups(["a.weight", "b.weight"], layers.group_of, source="eu.yaml layers")


def test_key_and_shared_overlap_is_a_clear_error() -> None:
    layers = LayerPatterns(local=(), key=("a.*",), shared=("*",))
    with pytest.raises(ConfigError, match=r"parameter 'a.weight' matches both key"):
        assign_groups(["a.weight"], layers.group_of, source="eu.yaml layers")


def test_local_wins_so_a_stricter_ancestor_can_keep_more_on_site() -> None:
    layers = LayerPatterns(local=("head.*",), key=(), shared=("*",))
    groups = assign_groups(["head.w", "body.w"], layers.group_of, source="x")
    assert groups.local == ("head.w",) and groups.shared == ("body.w",)
