"""Hugging Face causal LMs built from a config, with no hub access.

Sizes by name (parameter counts at vocab 512, untied head):
- ``tiny``: about 1.2M (d=128, 4 layers) — CPU tests and the default world;
- ``small``: about 20M (d=384, 10 layers);
- ``gpt2-124m``: the standard GPT-2 124M configuration (tied embeddings, vocab 50257).
Any local folder or hub name with a ``config.json`` works through ``AutoConfig`` too.

``pretrained`` (a local checkpoint folder, `model.pretrained`) loads weights instead of initialising
them; ``adapters`` (`model.adapters.lora`) wraps either with LoRA through peft, base weights frozen as
buffers so that only adapter tensors are parameters (`model.adapters`). Every built model carries
``base_hash``: the SHA-256 of its base weights (`model.pretrained.base_weights_hash`), checked against
``base_sha256`` when the world file pins one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig

from worldlm_secure.errors import ConfigError
from worldlm_secure.model.adapters import LoraSpec, apply_adapters
from worldlm_secure.model.pretrained import base_weights_hash, context_length, load_pretrained

Arch = Literal["llama", "gpt2"]

# name -> (d_model, layers, heads, ffn)
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 4, 4, 512),
    "small": (384, 10, 6, 1024),
}


@dataclass(frozen=True)
class ModelSpec:
    """What to build. ``config`` (a local path or hub name) overrides ``arch``/``size`` when given."""

    arch: Arch = "llama"
    size: str = "tiny"
    vocab_size: int = 512
    max_seq_len: int = 128
    config: str | None = None
    tie_embeddings: bool = False  # untied so the output head can stay local to a site
    pretrained: str | None = None  # a local Hugging Face checkpoint folder (weights loaded, not initialised)
    adapters: LoraSpec | None = None  # LoRA through peft: only adapter tensors train and can be released
    dtype: str = "float32"  # the base weights' dtype when loading ``pretrained`` (float32, bfloat16, float16)
    base_sha256: str | None = None  # pin: refuse to build when the base weights hash to something else


def build_config(spec: ModelSpec) -> PretrainedConfig:
    """The transformers config for ``spec``; raises ConfigError for an unknown size or architecture."""
    if spec.config is not None:
        try:
            return AutoConfig.from_pretrained(spec.config)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.config: cannot load {spec.config!r} ({exc.__class__.__name__})") from exc
    if spec.size == "gpt2-124m":
        return GPT2Config()  # the published 124M configuration: tied embeddings, vocab 50257, 1024 positions
    if spec.size not in _SIZES:
        raise ConfigError(
            f"model.size: unknown size {spec.size!r} (valid: {', '.join([*_SIZES, 'gpt2-124m'])}, or set model.config)"
        )
    d, layers, heads, ffn = _SIZES[spec.size]
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=d,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=spec.max_seq_len,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    if spec.arch == "gpt2":
        return GPT2Config(
            vocab_size=spec.vocab_size,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            n_positions=spec.max_seq_len,
            tie_word_embeddings=spec.tie_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
    raise ConfigError(f"model.arch: unknown architecture {spec.arch!r} (valid: llama, gpt2)")


def build_model(spec: ModelSpec, *, seed: int = 0) -> torch.nn.Module:
    """A causal LM: loaded from ``spec.pretrained`` or freshly initialised (the same ``seed`` gives
    bit-identical weights), then wrapped with ``spec.adapters`` if any. ``model.base_hash`` is set.

    Raises ConfigError naming the world-file field when the data's vocabulary (``spec.vocab_size``) or the
    sequence length does not fit a pretrained model, or when the base does not hash to ``base_sha256``.
    """
    model: torch.nn.Module
    if spec.pretrained is not None:
        model = load_pretrained(spec.pretrained, dtype=spec.dtype, seed=seed)
        # transformers types it as nn.Module; a causal LM's input embedding is an nn.Embedding
        n_vocab = cast(torch.nn.Embedding, model.get_input_embeddings()).num_embeddings
        if spec.vocab_size > n_vocab:
            raise ConfigError(
                f"model.pretrained: {spec.pretrained} has {n_vocab} token embeddings but the data's tokenizer uses "
                f"{spec.vocab_size} ids; encode the data with the checkpoint's own tokenizer (data.tokenizer)"
            )
        ctx = context_length(model.config)
        if ctx is not None and spec.max_seq_len > ctx:
            raise ConfigError(f"schedule.seq_len: {spec.max_seq_len} exceeds the {ctx} positions of {spec.pretrained}")
    else:
        config = build_config(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    base_hash = base_weights_hash(model)
    if spec.base_sha256 is not None and base_hash is not None and base_hash != spec.base_sha256.lower():
        raise ConfigError(
            f"model.base_sha256: the base weights loaded from {spec.pretrained or 'the config'} hash to {base_hash}, "
            f"not {spec.base_sha256}; this node has a different base model and must not join"
        )
    if spec.adapters is not None:
        model = apply_adapters(model, spec.adapters, seed=seed)
    model.base_hash = base_hash  # type: ignore[assignment]  # torch types Module.__setattr__ values as Tensor | Module
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_config(model: torch.nn.Module, path: Path) -> None:
    cast(PretrainedConfig, model.config).to_json_file(str(path))  # a transformers (or peft) model's config
