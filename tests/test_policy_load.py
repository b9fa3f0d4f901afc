"""Loading policies: the examples validate; broken files fail with one line naming file:line, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy import LayerPatterns, Policy, load_policy

POLICIES = Path(__file__).resolve().parents[1] / "policies"
EXAMPLES = sorted(POLICIES.glob("*.yaml"))

LLAMA = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.11.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]
GPT2 = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.5.mlp.c_proj.weight",
    "transformer.ln_f.weight",
    "lm_head.weight",
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"eu.yaml", "us.yaml", "healthcare.yaml", "research-open.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    policy = load_policy(path)
    assert isinstance(policy, Policy)
    assert policy.source == str(path)
    assert policy.name == path.stem


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@pytest.mark.parametrize("names", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_example_layers_partition_both_architectures(path: Path, names: list[str]) -> None:
    layers = load_policy(path).layers
    groups = {n: layers.group_of(n) for n in names}
    # every parameter in exactly one group (group_of raises on none / key+shared)
    for n in names:
        hits = [g for g in ("local", "key", "shared") if layers.matches(g, n)]
        assert len(hits) == 1, (n, hits)
    assert groups["lm_head.weight"] == "local"
    assert {g for g in groups.values()} == {"local", "key", "shared"}


def test_eu_values_match_the_brief() -> None:
    eu = load_policy(POLICIES / "eu.yaml")
    assert eu.secure_aggregation.protocol == ("masking", "ckks")
    assert eu.differential_privacy.level == "user"
    assert eu.differential_privacy.epsilon_budget == 8.0
    assert eu.differential_privacy.delta == 1e-5
    assert 2 <= eu.secure_aggregation.min_cohort <= 3
    assert set(eu.egress.require) == {"differential_privacy", "secure_aggregation"}
    assert eu.residuals.allowed and eu.residuals.require_dp


def test_research_open_allows_plain_runs() -> None:
    ro = load_policy(POLICIES / "research-open.yaml")
    assert "none" in ro.secure_aggregation.protocol
    assert ro.differential_privacy.level == "none"
    assert ro.secure_aggregation.min_cohort <= 2


def test_yaml12_floats_are_numbers(tmp_path: Path) -> None:
    text = (POLICIES / "eu.yaml").read_text().replace("delta: 1.0e-5", "delta: 1e-5")
    assert "delta: 1e-5" in text
    assert load_policy(_write(tmp_path, "p.yaml", text)).differential_privacy.delta == 1e-5


def _error(tmp_path: Path, text: str, name: str = "bad.yaml") -> str:
    path = _write(tmp_path, name, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


def test_delta_error_names_file_line_field_and_bound(tmp_path: Path) -> None:
    text = (POLICIES / "eu.yaml").read_text().replace("delta: 1.0e-5", "delta: 0.5")
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.strip().startswith("delta:"))
    msg = _error(tmp_path, text)
    assert f"bad.yaml:{line} differential_privacy.delta:" in msg
    assert "1/min_cohort" in msg and "0.5" in msg


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    text = (POLICIES / "us.yaml").read_text().replace("  min_cohort: 3", "  min_cohort: 3\n  min_cohrot: 5")
    msg = _error(tmp_path, text)
    assert "secure_aggregation.min_cohrot: unknown key" in msg
    assert "min_cohort" in msg.split("valid keys here:")[1]


def test_wrong_type_is_not_coerced(tmp_path: Path) -> None:
    text = (POLICIES / "us.yaml").read_text().replace("min_cohort: 3", 'min_cohort: "3"')
    msg = _error(tmp_path, text)
    assert "secure_aggregation.min_cohort: must be an integer" in msg


def test_union_field_error(tmp_path: Path) -> None:
    text = (POLICIES / "eu.yaml").read_text().replace("noise_multiplier: auto", "noise_multiplier: lots")
    msg = _error(tmp_path, text)
    assert "differential_privacy.noise_multiplier:" in msg and "'auto'" in msg and "lots" in msg


@pytest.mark.parametrize("bad", ['""', '"model.layers.[0.mlp"', "3", '"a b"', '"x]"'])
def test_bad_layer_patterns(tmp_path: Path, bad: str) -> None:
    text = (POLICIES / "eu.yaml").read_text().replace('local: ["lm_head.*"', f'local: [{bad}, "lm_head.*"')
    msg = _error(tmp_path, text)
    assert "layers.local" in msg


def test_pattern_in_two_groups(tmp_path: Path) -> None:
    text = (POLICIES / "eu.yaml").read_text().replace('key: ["*.mlp.*"', 'key: ["lm_head.*", "*.mlp.*"')
    msg = _error(tmp_path, text)
    assert "both local and key" in msg and "layers.key:" in msg


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    text = (POLICIES / "us.yaml").read_text().replace("\nname: us\n", "\nname: us\nname: us2\n")
    assert "name: key appears twice" in _error(tmp_path, text)


@pytest.mark.parametrize(
    "text,needle",
    [("", "empty file"), ("- a\n- b\n", "must be a YAML mapping"), ("a: [1, 2\n", "YAML syntax error")],
)
def test_not_a_policy(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in _error(tmp_path, text)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy("does/not/exist.yaml")


def test_extends_overrides_fields_and_replaces_lists(tmp_path: Path) -> None:
    base = (POLICIES / "eu.yaml").read_text()
    _write(tmp_path, "base.yaml", base)
    child = _write(
        tmp_path,
        "child.yaml",
        "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: base.yaml\nname: eu-child\nsecure_aggregation:\n  protocol: [ckks]\n  min_cohort: 3\n"
        "layers:\n  local: [\"lm_head.*\"]\n",
    )
    p = load_policy(child)
    assert p.name == "eu-child"
    assert p.secure_aggregation.protocol == ("ckks",)  # list replaced, not merged
    assert p.secure_aggregation.max_dropout_fraction == 0.33  # sibling field inherited
    assert p.layers.local == ("lm_head.*",)  # list replaced
    assert p.layers.key == load_policy(tmp_path / "base.yaml").layers.key  # untouched group inherited
    assert p.where("differential_privacy.delta").startswith(str(tmp_path / "base.yaml"))
    assert p.where("secure_aggregation.protocol").startswith(str(child))


def test_extends_error_in_base_names_the_base_line(tmp_path: Path) -> None:
    base = (POLICIES / "eu.yaml").read_text().replace("bits: 32", "bits: 99")
    _write(tmp_path, "base.yaml", base)
    child = _write(tmp_path, "child.yaml", "apiVersion: worldlm-secure/v1\nkind: JurisdictionPolicy\nextends: base.yaml\nname: c\n")
    with pytest.raises(PolicyError) as info:
        load_policy(child)
    assert f"{tmp_path / 'base.yaml'}:" in str(info.value)
    assert "secure_aggregation.masking.bits" in str(info.value)


def test_extends_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "extends: b.yaml\napiVersion: worldlm-secure/v1\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "a.yaml")
    assert "extends: cycle" in str(info.value) and "a.yaml" in str(info.value)


def test_extends_self_and_missing(tmp_path: Path) -> None:
    _write(tmp_path, "s.yaml", "extends: s.yaml\n")
    with pytest.raises(PolicyError, match="cycle"):
        load_policy(tmp_path / "s.yaml")
    _write(tmp_path, "m.yaml", "extends: nowhere.yaml\n")
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "m.yaml")


def test_group_of_refuses_unmatched_and_ambiguous() -> None:
    layers = LayerPatterns(local=("lm_head.*",), key=("*.mlp.*",), shared=("*.mlp.c_fc.*",))
    assert layers.group_of("lm_head.weight") == "local"
    with pytest.raises(PolicyError, match="both key"):
        layers.group_of("transformer.h.0.mlp.c_fc.weight")
    with pytest.raises(PolicyError, match="matches no"):
        layers.group_of("transformer.wte.weight")


def test_copied_patterns_match_their_own_globs() -> None:
    layers = load_policy(POLICIES / "eu.yaml").layers
    assert layers.matches("local", "lm_head.weight")
    copy = layers.model_copy(update={"local": ("x.*",)})
    assert copy.matches("local", "x.y") and not copy.matches("local", "lm_head.weight")
