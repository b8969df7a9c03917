"""Fixtures for the data tests: a small BPE tokenizer and small prepared datasets.

Everything is built here from text the tests write; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moe_lab.data.bpe import save_tokenizer, train_bpe
from moe_lab.data.prepare import prepare

WORDS = ["alpha", "beta", "gamma", "delta", "mixture", "expert", "router", "token", "über",
         "naïve", "日本語", "emoji🎉"]


def words_document(rng: random.Random, n: int = 40) -> str:
    """Letters and spaces only (no digits, no newlines)."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def digits_document(rng: random.Random, n: int = 40) -> str:
    """Digits and newlines only (no letters, no spaces)."""
    return "\n".join(str(rng.randrange(10_000)) for _ in range(n))


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    texts = [words_document(rng) for _ in range(50)] + [digits_document(rng) for _ in range(50)]
    texts.append("def f(x):\n    return {'a': [1, 2]}  # ünïcödé\r\n\ttab")
    return save_tokenizer(train_bpe(texts, 320), tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def two_datasets(tmp_path_factory, tokenizer_dir) -> dict[str, str]:
    """{'words': prefix, 'digits': prefix}: 200 documents each, disjoint token sets."""
    root = tmp_path_factory.mktemp("datasets")
    rng = random.Random(1)
    prefixes = {}
    for name, make in (("words", words_document), ("digits", digits_document)):
        source = write_jsonl(root / f"{name}.jsonl", [make(rng) for _ in range(200)])
        prefixes[name] = str(root / name)
        prepare([str(source)], "jsonl", str(tokenizer_dir), prefixes[name], progress=False)
    return prefixes
