"""Tokenising documents into a megatron-core IndexedDataset (PREFIX.bin + PREFIX.idx).

One document is one sequence of the dataset, its tokens followed by the EOD token, so samples
drawn across documents see where one ends. Outputs are written under PREFIX.bin.partial /
PREFIX.idx.partial and renamed only when complete: an interrupted run leaves nothing under the
final names (and removes its partial files when it can). PREFIX.stats.json records the counts
and the tokenizer, so training can check that a blend's parts share one tokenizer.

Inputs: JSONL (one JSON object per line, the text under --text-key) or plain text files (one
document per file). A malformed line is reported as FILE:LINE and skipped, or fatal with strict.
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moe_lab.data.errors import DataError
from moe_lab.data.tokenizer import TextTokenizer, load_tokenizer

_CHUNK_BYTES = 1 << 20  # documents are tokenised in chunks of about this much text
_SHOWN_PROBLEMS = 20  # malformed lines printed one by one; the rest are only counted


@dataclass
class PrepareStats:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0  # malformed lines or unreadable files
    empty: int = 0  # documents with no text
    input_bytes: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def as_lines(self) -> list[str]:
        per_doc = self.tokens / self.documents if self.documents else 0.0
        return [f"documents: {self.documents:,}  tokens: {self.tokens:,} "
                f"({per_doc:,.1f} per document, EOD included)",
                f"skipped: {self.skipped:,} malformed, {self.empty:,} empty",
                f"input: {self.input_bytes / 1e6:,.1f} MB from {len(self.files)} file(s) "
                f"in {self.seconds:.1f} s"]


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by each pattern (a file, a directory: every file under it, or a glob with
    `**` recursive), in sorted order, each once."""
    files: dict[Path, None] = {}  # ordered, without repeats
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        elif Path(pattern).is_dir():
            matches = sorted(Path(pattern).rglob("*"))
        else:
            matches = [Path(pattern)]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"--input: no file matches {pattern!r}")
        files.update(dict.fromkeys(matches))
    return list(files)


def prepare(patterns: list[str], fmt: str, tokenizer_path: str, out: str, text_key: str = "text",
            workers: int = 1, strict: bool = False, progress: bool | None = None) -> PrepareStats:
    """`moe-lab data prepare`: tokenise the input files into OUT.bin/.idx (+ OUT.stats.json)."""
    files = expand_inputs(patterns)
    tokenizer = load_tokenizer(tokenizer_path)
    check_free(out)
    stats = PrepareStats(files=[str(f) for f in files])
    reporter = _ProblemReporter(strict)
    documents = read_documents(files, fmt, text_key, stats, reporter)
    total = sum(f.stat().st_size for f in files)
    write_indexed(out, documents, tokenizer, stats, workers=workers, total_bytes=total,
                  progress=progress)
    reporter.summary()
    return stats


def check_free(prefix: str) -> None:
    """Refuse to overwrite a dataset: what was written stays."""
    for suffix in (".bin", ".idx"):
        if Path(prefix + suffix).exists():
            raise DataError(f"--out: {prefix}{suffix} already exists; choose another prefix or "
                            "remove the old dataset first")


def read_documents(files: list[Path], fmt: str, text_key: str, stats: PrepareStats,
                   reporter: Callable[[str], None]) -> Iterator[tuple[str, int]]:
    """(text, input bytes) per document; malformed input goes to `reporter` and is counted."""
    if fmt not in ("jsonl", "text"):
        raise DataError(f"--format: must be jsonl or text, got {fmt!r}")
    for path in files:
        if fmt == "text":
            data = path.read_bytes()
            try:
                yield data.decode("utf-8"), len(data)
            except UnicodeDecodeError as err:
                stats.skipped += 1
                reporter(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                text, problem = _parse_jsonl_line(raw, text_key)
                if problem:
                    stats.skipped += 1
                    reporter(f"{path}:{number}: {problem}")
                elif text is not None:
                    yield text, len(raw)


def _parse_jsonl_line(raw: bytes, text_key: str) -> tuple[str | None, str | None]:
    """(text, None), (None, None) for a blank line, or (None, what is wrong)."""
    if not raw.strip():
        return None, None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"malformed JSON ({err})"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if text_key not in record:
        return None, f"no {text_key!r} key (--text-key)"
    if not isinstance(record[text_key], str):
        return None, f"{text_key!r} is {type(record[text_key]).__name__}, not a string"
    return record[text_key], None


class _ProblemReporter:
    """Prints the first malformed inputs, counts the rest; under strict the first one is fatal."""

    def __init__(self, strict: bool):
        self.strict, self.count = strict, 0

    def __call__(self, message: str) -> None:
        if self.strict:
            raise DataError(f"{message} (--strict)")
        self.count += 1
        if self.count <= _SHOWN_PROBLEMS:
            _print_above_bar(f"skipped {message}")

    def summary(self) -> None:
        if self.count > _SHOWN_PROBLEMS:
            print(f"... and {self.count - _SHOWN_PROBLEMS} more skipped lines", file=sys.stderr)


def write_indexed(prefix: str, documents: Iterable[tuple[str, int]], tokenizer: TextTokenizer,
                  stats: PrepareStats, workers: int = 1, total_bytes: int | None = None,
                  progress: bool | None = None, tokenizer_label: str | None = None
                  ) -> PrepareStats:
    """Tokenise `documents` into PREFIX.bin/.idx with megatron-core's IndexedDatasetBuilder.
    PREFIX.stats.json names the tokenizer as `tokenizer_label` (default: its path)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    started = time.perf_counter()
    bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
    partial_bin, partial_idx = Path(f"{bin_path}.partial"), Path(f"{idx_path}.partial")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(str(partial_bin), dtype=dtype)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=Path(prefix).name,
               disable=None if progress is None else not progress, file=sys.stderr)
    try:
        for ids_per_doc, chunk_bytes in _encoded_chunks(documents, tokenizer, workers):
            _add_documents(builder, ids_per_doc, tokenizer.eod, dtype, stats)
            stats.input_bytes += chunk_bytes
            bar.update(chunk_bytes)
        builder.finalize(str(partial_idx))
        bar.close()
        if not stats.documents:
            raise DataError(f"--input: no documents to write to {prefix}")
        stats.seconds = time.perf_counter() - started
        _publish([(partial_bin, bin_path), (partial_idx, idx_path)])
    except BaseException:  # KeyboardInterrupt included: leave nothing half-written behind
        bar.close()
        builder.data_file.close()
        partial_bin.unlink(missing_ok=True)
        partial_idx.unlink(missing_ok=True)
        raise
    _write_json(Path(prefix + ".stats.json"),
                _stats_record(stats, tokenizer, tokenizer_label or tokenizer.path))
    return stats


def _add_documents(builder, ids_per_doc: list[list[int]], eod: int, dtype,
                   stats: PrepareStats) -> None:
    """One sequence per document, EOD last; empty documents are counted, not written."""
    for ids in ids_per_doc:
        if not ids:
            stats.empty += 1
            continue
        ids.append(eod)
        builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
        stats.documents += 1
        stats.tokens += len(ids)


def _publish(renames: list[tuple[Path, Path]]) -> None:
    """Rename the finished files to their final names; if one rename fails, undo the others
    (the final names did not exist before: check_free)."""
    done = []
    try:
        for partial, final in renames:
            os.replace(partial, final)
            done.append(final)
    except BaseException:
        for final in done:
            final.unlink(missing_ok=True)
        raise


def _encoded_chunks(documents: Iterable[tuple[str, int]], tokenizer: TextTokenizer,
                    workers: int) -> Iterator[tuple[list[list[int]], int]]:
    """(token ids per document, input bytes) per chunk, in input order for any worker count."""
    chunks = _chunked(documents)
    if workers <= 1:
        for texts, nbytes in chunks:
            yield tokenizer.encode(texts), nbytes
        return
    # fork: workers inherit the loaded tokenizer; the parent never encodes, so the tokenizers
    # library's thread pool is not forked mid-use.
    with multiprocessing.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_in_worker, chunks)


def _chunked(documents: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    texts, nbytes = [], 0
    for text, size in documents:
        texts.append(text)
        nbytes += size
        if nbytes >= _CHUNK_BYTES:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts:
        yield texts, nbytes


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(chunk: tuple[list[str], int]) -> tuple[list[list[int]], int]:
    texts, nbytes = chunk
    return _worker_tokenizer.encode(texts), nbytes


def _stats_record(stats: PrepareStats, tokenizer: TextTokenizer, label: str) -> dict:
    return {**asdict(stats), "tokenizer": label,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}


def read_stats(prefix: str) -> dict | None:
    """PREFIX.stats.json as written by `data prepare`, or None for datasets made elsewhere."""
    path = Path(prefix + ".stats.json")
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _print_above_bar(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
