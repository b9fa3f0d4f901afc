"""Tokenizers: a Hugging Face tokenizer from a local folder when given, else the built-in byte tokenizer.

The byte tokenizer needs nothing from the internet: UTF-8 bytes are ids 0..255, and id 256 ends a
document. Its vocabulary is 260 (three ids spare, so embeddings stay a multiple of 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worldlm_secure.errors import ConfigError


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class ByteTokenizer:
    vocab_size: int = 260
    eos_id: int = 256

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """All documents as one int64 stream, each followed by the end-of-document id."""
        parts = []
        for text in texts:
            parts.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
            parts.append(np.array([self.eos_id], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (or the hub when online)."""

    name: str
    _tok: Any = field(init=False, repr=False, compare=False)  # the transformers tokenizer, set in __post_init__

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.name)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.tokenizer: cannot load tokenizer {self.name!r} ({exc.__class__.__name__}); "
                              "give a local folder or omit it for the built-in byte tokenizer") from None
        object.__setattr__(self, "_tok", tok)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        tok = self._tok
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        ids: list[int] = []
        for text in texts:
            ids.extend(tok(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
        return np.asarray(ids, dtype=np.int64)


def get_tokenizer(name: str | None) -> Tokenizer:
    return ByteTokenizer() if name is None else HFTokenizer(name)
