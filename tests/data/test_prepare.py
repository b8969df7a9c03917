"""`moe-lab data prepare`: text -> .bin/.idx -> tokens -> text, malformed input, refusing to
overwrite, and interrupted runs that leave nothing under the final names.

Run: pytest tests/data/test_prepare.py
"""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moe_lab.data import DataError
from moe_lab.data.prepare import PrepareStats, prepare, write_indexed
from moe_lab.data.tokenizer import load_tokenizer
from moe_lab.testing import run_cli
from moe_lab.testing.distributed import REPO, child_env

from .conftest import words_document, write_jsonl

DOCUMENTS = ["Hello world.", "Two\nlines\n", "ünïcödé 日本語 🎉 and\ttabs\r\n", "x" * 5000,
             "def f(x):\n    return {'a': [1, 2]}\n"]


def read_back(prefix, tokenizer):
    """The documents of PREFIX.bin/.idx, each checked to end with the EOD token."""
    dataset = IndexedDataset(str(prefix))
    texts = []
    for i in range(len(dataset)):
        ids = dataset[i].tolist()
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        texts.append(tokenizer.decode(ids[:-1]))
    return texts


def test_jsonl_round_trip_through_the_cli(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "in.jsonl", DOCUMENTS, key="body")
    prefix = tmp_path / "out" / "docs"
    result = run_cli(["data", "prepare", "--input", str(source), "--format", "jsonl",
                      "--text-key", "body", "--tokenizer", str(tokenizer_dir),
                      "--out", str(prefix)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "documents: 5" in result.stdout and "skipped: 0 malformed" in result.stdout
    tokenizer = load_tokenizer(tokenizer_dir)
    assert read_back(prefix, tokenizer) == DOCUMENTS
    stats = json.loads((tmp_path / "out" / "docs.stats.json").read_text())
    assert stats["documents"] == 5 and stats["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert stats["tokens"] == len(IndexedDataset(str(prefix)).index.sequence_lengths) + sum(
        len(ids) for ids in tokenizer.encode(DOCUMENTS))  # one EOD per document
    assert not list((tmp_path / "out").glob("*.partial"))


def test_text_files_by_glob_one_document_each_and_workers_give_the_same_bytes(
        tmp_path, tokenizer_dir):
    rng = random.Random(3)
    texts = [words_document(rng, n=rng.randrange(1, 3000)) for _ in range(12)]
    for i, text in enumerate(texts):
        (tmp_path / "docs" / f"{i:02d}").mkdir(parents=True)
        (tmp_path / "docs" / f"{i:02d}" / "page.txt").write_text(text)
    pattern = str(tmp_path / "docs" / "**" / "*.txt")
    prepare([pattern], "text", str(tokenizer_dir), str(tmp_path / "one"), progress=False)
    prepare([pattern], "text", str(tokenizer_dir), str(tmp_path / "two"), workers=2,
            progress=False)
    assert read_back(tmp_path / "one", load_tokenizer(tokenizer_dir)) == texts
    prepare([str(tmp_path / "docs")], "text", str(tokenizer_dir), str(tmp_path / "dir"),
            progress=False)  # a directory: every file under it
    assert read_back(tmp_path / "dir", load_tokenizer(tokenizer_dir)) == texts
    for suffix in (".bin", ".idx"):
        one, two = (tmp_path / f"one{suffix}").read_bytes(), (tmp_path / f"two{suffix}").read_bytes()
        assert one == two


def test_malformed_lines_are_reported_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "mixed.jsonl"
    source.write_text('{"text": "good one"}\n'
                      'not json\n'
                      '{"txt": "wrong key"}\n'
                      '\n'
                      '{"text": 7}\n'
                      '["a list"]\n'
                      '{"text": "good two"}\n'
                      '{"text": ""}\n'
                      '{"text": "truncated\n')
    stats = prepare([str(source)], "jsonl", str(tokenizer_dir), str(tmp_path / "out"),
                    progress=False)
    err = capsys.readouterr().err
    for line, why in ((2, "malformed JSON"), (3, "no 'text' key"), (5, "'text' is int"),
                      (6, "expected a JSON object"), (9, "malformed JSON")):
        assert f"{source}:{line}: {why}" in err
    assert (stats.documents, stats.skipped, stats.empty) == (2, 5, 1)
    assert read_back(tmp_path / "out", load_tokenizer(tokenizer_dir)) == ["good one", "good two"]


def test_strict_stops_at_the_first_malformed_line_and_writes_nothing(tmp_path, tokenizer_dir):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": "fine"}\n{oops}\n')
    with pytest.raises(DataError) as err:
        prepare([str(source)], "jsonl", str(tokenizer_dir), str(tmp_path / "out"), strict=True)
    assert str(err.value) == (f"{source}:3: malformed JSON (Expecting property name enclosed "
                              "in double quotes: line 1 column 2 (char 1)) (--strict)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cli_input_mistakes_are_one_line_errors(tmp_path, tokenizer_dir):
    result = run_cli(["data", "prepare", "--format", "jsonl", "--out", str(tmp_path / "out"),
                      "--input", str(tmp_path / "none*.jsonl"), "--tokenizer", str(tokenizer_dir)])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"moe-lab: error: --input: no file matches '{tmp_path}/none*.jsonl'"]
    assert not list(tmp_path.iterdir())


def test_existing_datasets_are_never_overwritten(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "in.jsonl", ["one", "two"])
    prepare([str(source)], "jsonl", str(tokenizer_dir), str(tmp_path / "out"), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_jsonl(source, ["three"])
    with pytest.raises(DataError, match="out.bin already exists"):
        prepare([str(source)], "jsonl", str(tokenizer_dir), str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "in.jsonl"} == {
        k: v for k, v in before.items() if k != "in.jsonl"}
    with pytest.raises(DataError, match="--input: no file matches"):
        prepare([str(tmp_path / "nothing*.jsonl")], "jsonl", str(tokenizer_dir), "x")


def test_a_failure_mid_write_removes_the_partial_files(tmp_path, tokenizer_dir):
    def documents():
        for i in range(3000):
            yield f"document {i} " * 50, 600
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_indexed(str(tmp_path / "out"), documents(), load_tokenizer(tokenizer_dir),
                      PrepareStats(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_runs_leave_nothing_under_the_final_names(tmp_path, tokenizer_dir):
    """SIGINT (Ctrl-C) and SIGKILL, each once the first chunk is written."""
    rng = random.Random(4)
    write_jsonl(tmp_path / "big.jsonl", [words_document(rng, 400) for _ in range(8000)])
    procs = {}
    for name in ("sigint", "sigkill"):
        cmd = [sys.executable, "-m", "moe_lab", "data", "prepare", "--input",
               str(tmp_path / "big.jsonl"), "--format", "jsonl", "--tokenizer",
               str(tokenizer_dir), "--out", str(tmp_path / name)]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, sig in (("sigint", signal.SIGINT), ("sigkill", signal.SIGKILL)):
        proc, partial = procs[name], tmp_path / f"{name}.bin.partial"
        deadline = time.monotonic() + 120
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
    for proc in procs.values():
        proc.communicate(timeout=60)
        assert proc.returncode != 0
    # SIGINT cleans up; SIGKILL leaves sigkill.bin.partial, never a final name.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "sigkill.bin.partial"]


def test_data_and_eval_command_surfaces_are_frozen():
    from moe_lab.launch.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    actions = commands["data"]._subparsers._group_actions[0].choices
    options = {name: {o for a in parser._actions for o in a.option_strings}
               for name, parser in {**actions, "eval": commands["eval"]}.items()}
    assert {"--input", "--format", "--text-key", "--tokenizer", "--out", "--workers",
            "--strict"} <= options["prepare"]
    assert {"--out", "--vocab-size", "--workers"} <= options["builtin"]
    assert {"--data", "--json"} <= options["eval"]
