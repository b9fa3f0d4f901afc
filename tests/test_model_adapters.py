"""LoRA adapters (`model.adapters`, through peft) as the unit of sharing.

A tiny saved checkpoint is fine-tuned with LoRA across a 2x2 world under SecAgg+ masking and record-level
DP (Opacus DP-SGD): the base weights are bit-identical before and after at every site, only adapter
tensors are parameters, trained, released or written to a ledger, and a policy that would release a
frozen base weight is refused naming the field.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from test_model_pretrained import save_tiny_checkpoint, write_text_world

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import Engine
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.simulate import prepare
from worldlm_secure.ledger import read_entries, verify
from worldlm_secure.model import LoraSpec, ModelSpec, assign_groups, base_weights_hash, build_model
from worldlm_secure.model.adapters import is_adapter_name
from worldlm_secure.policy import LayerPatterns

LORA = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj, gate_proj, up_proj, lm_head]}"
# attention adapters shared up the tree, MLP adapters key (federation only), head adapters local
ADAPTER_POLICY = textwrap.dedent(
    """\
    apiVersion: worldlm-secure/v1
    kind: JurisdictionPolicy
    name: adapters-record-masking
    jurisdiction: test
    extends: research-open.yaml
    layers:
      local: ["*lm_head.lora_*"]
      key: ["*.mlp.*.lora_*"]
      shared: ["*.self_attn.*.lora_*"]
    secure_aggregation: {protocol: [masking], min_cohort: 2}
    differential_privacy:
      level: record
      epsilon_budget: 8.0
      delta: 1.0e-5
      record: {max_grad_norm: 1.0, noise_multiplier: auto}
    """
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def test_only_adapters_are_parameters_and_their_names_match_policy_globs(checkpoint: Path) -> None:
    spec = ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=32,
                     adapters=LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj", "lm_head")))
    model = build_model(spec, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert names and all(is_adapter_name(n) for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in names
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_B.default.weight" in names
    assert "base_model.model.lm_head.lora_A.default.weight" in names
    buffers = dict(model.named_buffers())
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in buffers  # frozen, not a parameter
    assert "base_model.model.model.embed_tokens.weight" in buffers
    # the same seed gives the same adapters on every node
    again = build_model(spec, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    # the base hash is taken over the base only, under its own names: equal to the plain checkpoint's
    assert model.base_hash == base_weights_hash(model) == build_model(
        ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=32)).base_hash
    layers = LayerPatterns(local=("*lm_head.lora_*",), key=("*.mlp.*.lora_*",), shared=("*.self_attn.*.lora_*",))
    groups = assign_groups(names, layers.group_of, source="p.yaml layers")
    assert groups.local == ("base_model.model.lm_head.lora_A.default.weight", "base_model.model.lm_head.lora_B.default.weight")
    assert all(".mlp." in n for n in groups.key) and all(".self_attn." in n for n in groups.shared)
    # the repository's example policies already group adapter names (attention shared, MLP key)
    from worldlm_secure.policy import load_policy
    from conftest import POLICIES

    open_layers = load_policy(POLICIES / "research-open.yaml").layers
    no_head = [n for n in names if "lm_head" not in n]
    g = assign_groups(no_head, open_layers.group_of, source="research-open.yaml layers")
    assert g.key and g.shared and not g.local


def test_grouping_refuses_a_frozen_base_weight_in_a_released_group() -> None:
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    layers = LayerPatterns(local=(), key=(), shared=("*",))
    with pytest.raises(ConfigError, match=r"^p.yaml layers \(site a\): layers.shared selects "
                                          r"'base_model.*base_layer.weight', a frozen base weight"):
        assign_groups(names, layers.group_of, source="p.yaml layers (site a)")
    # frozen names given explicitly (a model whose frozen weights are still parameters)
    with pytest.raises(ConfigError, match=r"layers.key selects 'model.embed_tokens.weight', a frozen base weight"):
        assign_groups(["model.embed_tokens.weight"], LayerPatterns(key=("*",)).group_of, source="p.yaml layers",
                      frozen={"model.embed_tokens.weight"})
    # kept local, a frozen weight is fine: it never leaves the site
    g = assign_groups(names, LayerPatterns(local=("*.base_layer.*",), shared=("*",)).group_of, source="p")
    assert g.local == (names[1],)


def test_lora_world_under_masking_and_record_dp_releases_adapters_only(tmp_path: Path, checkpoint: Path) -> None:
    world = write_text_world(tmp_path, model=f"{{pretrained: {checkpoint}, adapters: {{lora: {LORA}}}}}",
                             policy="adapters.yaml", policy_text=ADAPTER_POLICY, rounds=2)
    prep = prepare(world, device="cpu")
    ledgers = tmp_path / "ledgers"
    engine = Engine(prep.world, METHODS["worldlm"], prep.data, prep.settings, vocab_size=prep.vocab, ledger_dir=ledgers)
    assert engine.private is not None and set(engine.record) == {s.name for s in engine.sites}  # Opacus DP-SGD
    model = engine.model
    adapters = {n for n, _ in model.named_parameters()}
    assert adapters and all(is_adapter_name(n) for n in adapters)
    base_before = {n: b.clone() for n, b in model.named_buffers() if n in set(model.base_weight_names)}
    assert base_before and not set(base_before) & adapters
    start_hash = engine.base_hash
    trained_before = {s.name: {n: t.clone() for n, t in s.params.items()} for s in engine.sites}

    result = engine.run()

    # (a) base weights bit-identical, at every site: each site's model is the base + its own adapters
    for s in engine.sites:
        assert set(s.params) == adapters  # a site's state is its adapters; the base is never copied or moved
        model.load_state_dict(s.params, strict=False)
        for n, b in model.named_buffers():
            if n in base_before:
                assert torch.equal(b, base_before[n]), (s.name, n)
        assert base_weights_hash(model) == start_hash
        assert any(not torch.equal(s.params[n], trained_before[s.name][n]) for n in adapters)  # adapters did train
    # (b) only adapter tensors were released and written to any ledger; under masking
    assert result.stats.releases > 0 and set(result.stats.by_protocol) == {"masking"}
    entries = [e for f in sorted(ledgers.glob("*.sqlite")) for e in read_entries(f)]
    released = {n for e in entries for n in e.tensor_names}  # every ledger entry's `tensors` field
    assert entries and released and released <= adapters
    assert not any("lm_head" in n for n in released)  # head adapters are local
    for f in sorted(ledgers.glob("*.sqlite")):
        report = verify(f)
        assert report.problem is None and len(report.entries) == report.total_rows, report.problem
    # (c) record-level DP-SGD charged its steps on every site's record stream
    assert any(e.mechanism == "dp_sgd" for e in entries)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.sites.values())
    assert result.base_hash == start_hash


def test_adapter_bytes_per_round_are_a_fraction_of_full_fine_tuning(tmp_path: Path, checkpoint: Path) -> None:
    """Bytes each site sends up per round (engine stats, plain sums) for LoRA vs full fine-tuning of the
    same checkpoint, with the same policy globs (attention shared, MLP key, head local)."""
    full_policy = ADAPTER_POLICY.replace('["*lm_head.lora_*"]', '["lm_head.*", "model.norm.*"]').replace(
        '["*.mlp.*.lora_*"]', '["*.mlp.*", "*.post_attention_layernorm.*"]').replace(
        '["*.self_attn.*.lora_*"]', '["*.self_attn.*", "*.embed_tokens.*", "*.input_layernorm.*"]').replace(
        "differential_privacy:\n  level: record", "differential_privacy:\n  level: none").replace(
        "secure_aggregation: {protocol: [masking], min_cohort: 2}", "secure_aggregation: {protocol: [none], min_cohort: 1}")
    out = {}
    for kind, model in (("full", f"{{pretrained: {checkpoint}}}"),
                        ("lora", f"{{pretrained: {checkpoint}, adapters: {{lora: {LORA}}}}}")):
        text = full_policy if kind == "full" else full_policy.replace('["lm_head.*", "model.norm.*"]', '["*lm_head.lora_*"]').replace(
            '["*.mlp.*", "*.post_attention_layernorm.*"]', '["*.mlp.*.lora_*"]').replace(
            '["*.self_attn.*", "*.embed_tokens.*", "*.input_layernorm.*"]', '["*.self_attn.*.lora_*"]')
        world = write_text_world(tmp_path / kind, model=model, policy="p.yaml", policy_text=text, rounds=1)
        prep = prepare(world, device="cpu")
        engine = Engine(prep.world, METHODS["worldlm"], prep.data, prep.settings, vocab_size=prep.vocab)
        res = engine.run()
        # from the parameter counts: a site sends its key and its shared tensors once per round, float32
        per_site = 4 * (res.groups["key"] + res.groups["shared"])
        # from the engine: every release's plain bytes of the round (sites -> federations, federations -> root,
        # residual embeddings), what masking then expands by its own per-member overhead
        out[kind] = (per_site, res.stats.plain_bytes_up / prep.settings.rounds)
        assert res.stats.plain_bytes_up >= per_site * len(engine.sites)
    assert out["lora"][0] < out["full"][0] / 10 and out["lora"][1] < out["full"][1] / 10
