"""`moe-lab data prepare ...` and `moe-lab data builtin --out DIR`: tokenise text into
megatron-core indexed datasets; build the built-in corpus."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="prepare training data",
        description="Tokenise text into megatron indexed datasets.",
        epilog="examples:\n  moe-lab data builtin --out data/builtin\n"
               "  moe-lab data prepare --input 'web/*.jsonl' --format jsonl "
               "--tokenizer data/builtin/tokenizer --out data/web",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    _register_prepare(actions)
    _register_builtin(actions)


def _register_prepare(actions) -> None:
    prepare = actions.add_parser(
        "prepare", help="tokenise JSONL or text files into PREFIX.bin/.idx",
        description="Tokenise documents into a megatron-core IndexedDataset (PREFIX.bin, "
                    "PREFIX.idx) with an end-of-document token after each document, plus "
                    "PREFIX.stats.json. Malformed JSONL lines are reported as FILE:LINE and "
                    "skipped. Nothing is written under PREFIX.bin/.idx until they are complete.",
        epilog="examples:\n"
               "  moe-lab data prepare --input 'corpus/*.jsonl' --format jsonl "
               "--tokenizer data/builtin/tokenizer --out data/web\n"
               "  moe-lab data prepare --input notes/ --input 'docs/**/*.md' --format text "
               "--tokenizer ~/hf/Qwen2-0.5B --out data/docs --workers 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("--input", action="append", required=True, metavar="FILES_OR_GLOB",
                         help="a file, a directory (all files under it) or a quoted glob (** recurses); "
                              "repeat for more")
    prepare.add_argument("--format", required=True, choices=["jsonl", "text"],
                         help="jsonl: one JSON object per line; text: one document per file")
    prepare.add_argument("--text-key", default="text",
                         help="the JSONL key holding the document text (default: text)")
    prepare.add_argument("--tokenizer", required=True, metavar="T",
                         help="a Hugging Face tokenizer directory or a tokenizer.json file")
    prepare.add_argument("--out", required=True, metavar="PREFIX",
                         help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.stats.json")
    prepare.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                         help="tokeniser processes (default 1: in this process)")
    prepare.add_argument("--strict", action="store_true",
                         help="stop at the first malformed line instead of skipping it")
    prepare.set_defaults(handler=run_prepare)


def _register_builtin(actions) -> None:
    builtin = actions.add_parser(
        "builtin", help="build the built-in corpus (Python's standard library)",
        description="Build the built-in corpus from this Python's standard library: a code "
                    "part (sources without docstrings) and a text part (the docstrings), a "
                    "byte-level BPE tokenizer trained on both, and DIR/code and DIR/text "
                    "datasets. Offline and deterministic given the Python version. Does "
                    "nothing when DIR already holds the same corpus.",
        epilog="example: moe-lab data builtin --out data/builtin --vocab-size 2048",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    builtin.add_argument("--out", required=True, metavar="DIR",
                         help="directory to create (absent or empty)")
    builtin.add_argument("--vocab-size", type=_positive_int, default=2048, metavar="N",
                         help="tokenizer vocabulary, special tokens included (default 2048)")
    builtin.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                         help="tokeniser processes (default 1: in this process)")
    builtin.set_defaults(handler=run_builtin)


def run_prepare(args) -> int:
    from moe_lab.data.errors import DataError
    from moe_lab.data.prepare import prepare
    from moe_lab.launch.cli import UserError
    from moe_lab.launch.progress import quiet

    try:
        stats = prepare(args.input, args.format, args.tokenizer, args.out,
                        text_key=args.text_key, workers=args.workers, strict=args.strict,
                        progress=False if quiet() else None)
    except DataError as err:
        raise UserError(str(err)) from None
    print(f"wrote {args.out}.bin, {args.out}.idx")
    for line in stats.as_lines():
        print(f"  {line}")
    return 0


def run_builtin(args) -> int:
    from moe_lab.data.builtin import prepare_builtin
    from moe_lab.data.errors import DataError
    from moe_lab.launch.cli import UserError
    from moe_lab.launch.progress import quiet

    try:
        manifest = prepare_builtin(args.out, vocab_size=args.vocab_size, workers=args.workers,
                                   progress=False if quiet() else None)
    except DataError as err:
        raise UserError(str(err)) from None
    state = "already prepared" if manifest.get("already_prepared") else "built"
    print(f"{args.out}: built-in corpus {state} (Python {manifest['python_version']}, "
          f"{manifest['files']} modules, vocabulary {manifest['vocab_size']})")
    for name, part in manifest["parts"].items():
        print(f"  {name}: {part['documents']:,} documents, {part['tokens']:,} tokens, "
              f"unigram entropy {part['unigram_entropy']:.3f} nats")
    print(f"  unigram entropy of the whole corpus: {manifest['unigram_entropy']:.3f} nats")
    print(f"  build seconds: {json.dumps(manifest['seconds'])}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
