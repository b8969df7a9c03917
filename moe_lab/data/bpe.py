"""Training moe-lab's own byte-level BPE tokenizer with the `tokenizers` library.

The recipe follows Qwen2's tokenizer: GPT-style pre-tokenisation regex (digits one by one), a
byte-level alphabet (any text encodes, nothing is unknown), no normaliser (decoding gives back
the exact text), and the special tokens <|endoftext|> (document end), <|im_start|>, <|im_end|>.
It is saved as a standard Hugging Face tokenizer directory (tokenizer.json plus
tokenizer_config.json), which `transformers.AutoTokenizer` and `load_tokenizer` both read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_lab.data.errors import DataError

ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenisation pattern (tokenizer.json of Qwen/Qwen2-0.5B).
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (special tokens and the 256 bytes included)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is below {MIN_VOCAB_SIZE} "
                         "(256 bytes plus the special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: Path, model_max_length: int = 32768) -> Path:
    """Write `directory` as a Hugging Face tokenizer (tokenizer.json, tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(directory))
    # transformers 5 writes its own class name (TokenizersBackend); the older name, which
    # transformers 5 aliases, keeps the directory loadable by transformers 4 (NGC containers).
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory
