"""Tokenizers: any Hugging Face tokenizer directory, or a bare tokenizer.json.

Encoding goes through the `tokenizers` library's fast tokenizer (tokenizer.json), which is what
transformers' fast tokenizers run underneath; a directory with only slow-tokenizer files is
converted once by `transformers.AutoTokenizer`. Documents are encoded without the tokenizer's
own BOS/EOS decorations; the document separator (EOD) is appended by the caller.
The EOD token is <|endoftext|> when the vocabulary has it (Qwen2, GPT-2, moe-lab's own BPE),
otherwise the tokenizer's eos_token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer

from moe_lab.data.bpe import ENDOFTEXT
from moe_lab.data.errors import DataError


class TextTokenizer:
    """A fast tokenizer with its end-of-document id and a fingerprint of its vocabulary."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.backend, eos_token = _read(path)
        self.path = str(path)
        self.fingerprint = hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]
        eod_token = ENDOFTEXT if self.backend.token_to_id(ENDOFTEXT) is not None else eos_token
        eod = self.backend.token_to_id(eod_token) if eod_token else None
        if eod is None:
            raise DataError(f"{path}: no {ENDOFTEXT} token and no eos_token to end "
                            "documents with")
        self.eod_token, self._eod = eod_token, eod
        self._vocab_size = max(self.vocab.values()) + 1

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id: the embedding rows a model needs."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod


def load_tokenizer(path: str | Path) -> TextTokenizer:
    return TextTokenizer(path)


def _read(path: Path) -> tuple[Tokenizer, str | None]:
    """(fast tokenizer, eos_token from tokenizer_config.json or None)."""
    if not path.exists():
        raise DataError(f"{path}: no such tokenizer directory or tokenizer.json")
    if path.is_file():
        return _from_file(path), None
    config = path / "tokenizer_config.json"
    eos = _eos_token(json.loads(config.read_text())) if config.is_file() else None
    if (path / "tokenizer.json").is_file():
        return _from_file(path / "tokenizer.json"), eos
    try:  # slow-tokenizer files only (vocab.json + merges.txt, sentencepiece model, ...)
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        return auto.backend_tokenizer, eos or auto.eos_token
    except Exception as err:  # transformers raises many kinds; the user needs the path and why
        raise DataError(f"{path}: not a tokenizer directory ({err})") from None


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust library raises plain Exception
        raise DataError(f"{path}: not a tokenizer.json ({err})") from None


def _eos_token(config: dict) -> str | None:
    eos = config.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
