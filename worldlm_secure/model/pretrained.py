"""Pretrained checkpoints from a local folder, and the hash that proves every node loaded the same base.

`load_pretrained` loads any `AutoModelForCausalLM` from a folder in the Hugging Face layout
(``config.json``, safetensors weights, tokenizer files), without network access: the folder a user
downloaded once (e.g. ``huggingface-cli download gpt2 --local-dir ./gpt2``) or one written by
``save_pretrained``. The folder's tokenizer is the one the world's text is encoded with
(`federation.settings` points ``data.tokenizer`` at it unless the world file names another).

**The base-weights hash** (`base_weights_hash`, hex SHA-256, algorithm tag ``worldlm-base-v1``):
over the module's ``state_dict()`` as loaded (every parameter and persistent buffer, before any
adapter is added and before the model is moved to a device), in this canonical order and encoding:

    sha256( b"worldlm-base-v1\\0"
            + for name in sorted(state_dict)  (Python string order, i.e. by code point):
                name (UTF-8) + b"\\0" + dtype (e.g. b"torch.float32") + b"\\0"
                + shape as decimal comma-joined (b"" for a scalar) + b"\\0"
                + byte length (8 bytes, little-endian) + the tensor's bytes (contiguous, little-endian) )

Two nodes get the same hash exactly when they loaded bit-identical tensors under the same names and
dtypes: the hash does not depend on how the checkpoint is sharded or which file format holds it, but it
does depend on ``model.dtype`` (a float32 and a bfloat16 load of one checkpoint are different bases).
Tied weights appear under each of their names. A randomly initialised model (``model.config`` /
``model.size``) gets the hash of its seeded initial weights, so the same check covers both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from worldlm_secure.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HASH_TAG = b"worldlm-base-v1\0"

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_weights_hash(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str | None:
    """Hex SHA-256 of the base weights in the canonical order above; None for a model on the meta device.

    ``model``: a module (a model with adapters is hashed over its base weights only, under the base model's
    own names, so the hash after training equals the one taken at load time), or a state dict.
    """
    if isinstance(model, torch.nn.Module):
        from worldlm_secure.model.adapters import base_state_dict

        state = base_state_dict(model)
    else:
        state = dict(model)
    if any(t.is_meta for t in state.values()):
        return None
    h = hashlib.sha256(HASH_TAG)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(name.encode("utf-8") + b"\0" + str(t.dtype).encode() + b"\0"
                 + ",".join(str(d) for d in t.shape).encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def check_pretrained_folder(path: str) -> Path:
    """The folder as a Path, or a ConfigError naming ``model.pretrained`` when it is not a checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: {path} is not a folder (give a local folder in the Hugging Face "
                          "layout: config.json, *.safetensors weights, tokenizer files)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained: {path} has no config.json (is it a Hugging Face checkpoint folder?)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ConfigError(f"model.pretrained: {path} has no weights (*.safetensors or *.bin)")
    return folder


def load_pretrained(path: str, *, dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """The causal LM saved in the local folder ``path``, its weights as stored (cast to ``dtype``).

    ``seed`` seeds the initialisation of any weight the checkpoint lacks (transformers warns about those),
    so that every node still builds the same model.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run's own progress is what the CLI shows
    folder = check_pretrained_folder(path)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype], local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.pretrained: cannot load {path} as a causal LM "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model


def context_length(config: object) -> int | None:
    """The longest sequence the model's position embeddings cover (None when the config does not say)."""
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
