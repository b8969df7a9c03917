"""`moe-lab data builtin --out DIR`: the built-in corpus, tokenised and ready to train on.

DIR/tokenizer/ (moe-lab's byte-level BPE trained on the corpus), DIR/code.{bin,idx} and
DIR/text.{bin,idx} (the two parts of stdlib_corpus.py), DIR/corpus.json (Python version,
counts, unigram entropies, timings). Everything is built in DIR.partial and renamed to DIR at
the end, so DIR is either complete or absent. Preparing again with the same Python version and
vocabulary size finds the finished corpus and does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from moe_lab.data.bpe import save_tokenizer, train_bpe
from moe_lab.data.errors import DataError
from moe_lab.data.prepare import PrepareStats, write_indexed
from moe_lab.data.stats import unigram_entropy
from moe_lab.data.stdlib_corpus import read_stdlib
from moe_lab.data.tokenizer import load_tokenizer

DEFAULT_VOCAB_SIZE = 2048
MANIFEST = "corpus.json"


def prepare_builtin(out: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, workers: int = 1,
                    progress: bool | None = None) -> dict:
    """Build the corpus in `out` (or find it already built); returns its manifest."""
    out = Path(out)
    existing = _finished(out, vocab_size)
    if existing is not None:
        return {**existing, "already_prepared": True}
    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous interrupted build
    corpus = read_stdlib()
    read_s = time.perf_counter() - started
    tokenizer_dir = save_tokenizer(train_bpe(corpus.code + corpus.text, vocab_size),
                                   partial / "tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    trained_s = time.perf_counter() - started
    parts = {}
    for name, documents in corpus.parts().items():
        stats = write_indexed(str(partial / name), ((d, len(d.encode())) for d in documents),
                              tokenizer, PrepareStats(), workers=workers, progress=progress,
                              tokenizer_label=str(out / "tokenizer"))
        parts[name] = {"documents": stats.documents, "tokens": stats.tokens,
                       "unigram_entropy": unigram_entropy([str(partial / name)])}
    manifest = {
        "python_version": corpus.python_version, "stdlib": corpus.root, "files": corpus.files,
        "vocab_size": vocab_size, "tokenizer": "tokenizer", "parts": parts,
        "unigram_entropy": unigram_entropy([str(partial / n) for n in parts]),
        "seconds": {"read": round(read_s, 2), "tokenizer": round(trained_s - read_s, 2),
                    "total": round(time.perf_counter() - started, 2)},
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # _finished() allowed only an empty directory
    os.replace(partial, out)
    return manifest


def _finished(out: Path, vocab_size: int) -> dict | None:
    """The manifest of a finished corpus in `out` for this Python and vocabulary size; None when
    `out` is absent or empty; an error for anything else, which is not ours to replace."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"--out: {out} exists and is not a built-in corpus; choose another "
                        "directory")
    manifest = json.loads(manifest_path.read_text())
    version = sys.version.split()[0]
    if (manifest.get("python_version"), manifest.get("vocab_size")) != (version, vocab_size):
        raise DataError(
            f"--out: {out} holds the corpus of Python {manifest.get('python_version')} with "
            f"vocabulary size {manifest.get('vocab_size')}, not {version} / {vocab_size}; "
            "choose another directory or remove it")
    return manifest
