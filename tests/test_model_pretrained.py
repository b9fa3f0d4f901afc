"""Pretrained checkpoints (`model.pretrained`), the base-weights hash, and the `central` reference method.

The checkpoints are tiny Llama-style models the tests save themselves with `save_pretrained`, with a
byte-level BPE tokenizer built by the `tokenizers` library: no hub access, the same loading code a user
points at a real Llama or GPT-2 folder.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import POLICIES

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import Engine
from worldlm_secure.federation.methods import METHODS, parse_methods
from worldlm_secure.federation.simulate import prepare, simulate
from worldlm_secure.model import ModelSpec, base_weights_hash, build_model, load_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 320  # model rows; the tokenizer uses fewer (a checkpoint's embedding may be larger than its tokenizer)
WORDS = {  # two "languages" (one per federation), so sites differ by construction
    "f0": "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split(),
    "f1": "uno dos tres cuatro cinco seis siete ocho nueve diez once doce".split(),
}


def save_tiny_checkpoint(folder: Path, *, seed: int = 1, tokenizer_text: list[str] | None = None) -> Path:
    """A ~50K-parameter Llama (hidden 32, 2 layers) and a byte-level BPE tokenizer, saved in the HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_text or [" ".join(w) for w in WORDS.values()] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(folder))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
    return folder


def write_text_world(folder: Path, *, model: str, policy: str = "research-open.yaml", rounds: int = 1,
                     policy_text: str | None = None, tokens_per_site: int = 2400) -> Path:
    """2 federations x 2 sites whose text (one JSON-lines table, a `site` column) the checkpoint's tokenizer encodes."""
    pol = folder / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    for p in POLICIES.glob("*.yaml"):
        (pol / p.name).write_text(p.read_text())
    if policy_text is not None:
        (pol / policy).write_text(policy_text)
    rng = random.Random(0)
    rows = []
    for f, words in WORDS.items():
        for s in range(2):
            site = f"{f}-s{s}"
            favourite = words[rng.randrange(len(words)) :] + words  # each site prefers its own words
            for _ in range(tokens_per_site // 8):
                rows.append({"site": site, "text": " ".join(rng.choice(favourite) for _ in range(8))})
    (folder / "text.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    nodes = [f"  - {{name: world, policy: policies/{policy}}}"]
    for f in WORDS:
        nodes.append(f"  - {{name: {f}, parent: world, policy: policies/{policy}}}")
        nodes += [f"  - {{name: {f}-s{s}, parent: {f}, policy: policies/{policy}}}" for s in range(2)]
    text = textwrap.dedent(
        f"""\
        name: pretrained-world
        seed: 0
        model: {model}
        schedule: {{rounds: {rounds}, local_steps: 2, batch_size: 4, seq_len: 32, lr: 0.003, warmup_steps: 1}}
        data:
          files: {{path: text.jsonl, site_column: site}}
        nodes:
        """
    ) + "\n".join(nodes) + "\n"
    path = folder / "world.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def test_world_setting_loads_the_checkpoint_and_its_tokenizer(tmp_path: Path, checkpoint: Path) -> None:
    world = write_text_world(tmp_path, model=f"{{pretrained: {checkpoint}}}")
    prep = prepare(world, device="cpu")
    assert prep.settings.model.pretrained == str(checkpoint.resolve())
    assert prep.settings.data.tokenizer == str(checkpoint.resolve())  # the checkpoint's own tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert prep.vocab == len(tok) < VOCAB
    # every site's ids are the checkpoint tokenizer's encoding of its text (not bytes)
    assert max(int(d.train.max()) for d in prep.data.values()) < len(tok)
    model = build_model(prep.settings.model, seed=prep.settings.seed)
    saved = load_pretrained(str(checkpoint))
    for (n, a), (m, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert n == m and torch.equal(a, b)  # loaded, not initialised


def test_relative_pretrained_path_resolves_against_the_world_file(tmp_path: Path) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt")
    world = write_text_world(tmp_path, model="{pretrained: ckpt}")
    assert prepare(world, device="cpu").settings.model.pretrained == str((tmp_path / "ckpt").resolve())


def test_base_hash_is_canonical_recorded_and_pinnable(tmp_path: Path, checkpoint: Path) -> None:
    spec = ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=32)
    h = build_model(spec).base_hash
    assert h is not None and len(h) == 64
    assert h == base_weights_hash(load_pretrained(str(checkpoint)))  # deterministic across loads
    # a re-saved copy (other file layout, same tensors) hashes the same; one changed value does not
    model = load_pretrained(str(checkpoint))
    model.save_pretrained(str(tmp_path / "copy"), max_shard_size="20KB")
    (tmp_path / "copy" / "tokenizer.json").write_text((checkpoint / "tokenizer.json").read_text())
    assert build_model(ModelSpec(pretrained=str(tmp_path / "copy"), vocab_size=64, max_seq_len=32)).base_hash == h
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert base_weights_hash(model) != h
    # a world file can pin the hash: a node that loaded another base refuses to build its model
    assert build_model(ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=32, base_sha256=h)).base_hash == h
    with pytest.raises(ConfigError, match=r"^model.base_sha256: .* must not join"):
        build_model(ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=32, base_sha256="0" * 64))
    # the engine records it in every method's result
    world = write_text_world(tmp_path / "w", model=f"{{pretrained: {checkpoint}, base_sha256: {h}}}")
    result = simulate(world, methods=[METHODS["fedavg"]], device="cpu", rounds=1)
    assert result.methods["fedavg"].base_hash == h
    assert result.settings.model.base_sha256 == h


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("{pretrained: missing}", r"model.pretrained: .*missing is not a folder"),
        ("{pretrained: ckpt, config: ckpt}", r"model.pretrained: give model.pretrained .* or model.config"),
        ("{pretrained: ckpt, adapters: {lora: {r: 0}}}", r"model.adapters.lora.r"),
        ("{pretrained: ckpt, adapters: {ia3: {}}}", r"model.adapters.ia3"),
        ("{pretrained: ckpt, base_sha256: abc}", r"model.base_sha256"),
    ],
)
def test_bad_model_settings_name_the_field(tmp_path: Path, model: str, error: str) -> None:
    save_tiny_checkpoint(tmp_path / "ckpt")
    world = write_text_world(tmp_path, model=model)
    with pytest.raises(ConfigError, match=error):
        prepare(world, device="cpu")


def test_data_vocabulary_larger_than_the_checkpoint_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.pretrained: .* 320 token embeddings but the data's tokenizer uses 50257"):
        build_model(ModelSpec(pretrained=str(checkpoint), vocab_size=50257, max_seq_len=32))
    with pytest.raises(ConfigError, match=r"schedule.seq_len: 128 exceeds the 64 positions"):
        build_model(ModelSpec(pretrained=str(checkpoint), vocab_size=64, max_seq_len=128))


# ------------------------------------------------------------------------------------------- central
def test_central_is_registered_but_not_in_all() -> None:
    assert [m.name for m in parse_methods("central")] == ["central"]
    assert "central" not in [m.name for m in parse_methods("all")]
    assert [m.name for m in parse_methods(None)] == ["worldlm", "fedavg", "local", "fedper", "hierfavg"]


def test_central_pools_the_data_takes_the_same_total_steps_and_releases_nothing(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = write_text_world(tmp_path, model=f"{{pretrained: {checkpoint}}}", rounds=2)
    prep = prepare(world, device="cpu")
    steps: list[int] = []
    batches: list[int] = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    engine = Engine(prep.world, METHODS["central"], prep.data, prep.settings, vocab_size=prep.vocab,
                    ledger_dir=tmp_path / "ledgers")
    pooled = sum(s.examples for s in engine.sites)
    real_train_round = type(engine.trainer).train_round

    def spy(self, sequences, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        batches.append(int(sequences.shape[0]))
        return real_train_round(self, sequences, *args, **kwargs)

    monkeypatch.setattr(type(engine.trainer), "train_round", spy)
    result = engine.run()
    cfg = prep.settings.train
    assert len(steps) == prep.settings.rounds * cfg.local_steps * len(engine.sites)  # what 4 sites take together
    assert batches == [pooled] * prep.settings.rounds  # every round samples from all sites' sequences
    assert result.stats.releases == 0 and result.stats.bytes_up == 0
    assert set(result.sites) == {s.name for s in engine.sites} and len(result.rounds) == 2
    assert result.groups["key"] == result.groups["shared"] == 0
    assert result.base_hash == engine.base_hash is not None
    assert not list((tmp_path / "ledgers").glob("*.sqlite"))  # nothing released, nothing in a ledger
