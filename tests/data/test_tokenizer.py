"""moe-lab's byte-level BPE and tokenizer loading: standard files, special tokens, exact
decoding, determinism, one-line errors.

Run: pytest tests/data/test_tokenizer.py
"""

import json

import pytest

from moe_lab.data import DataError
from moe_lab.data.bpe import SPECIAL_TOKENS, train_bpe
from moe_lab.data.tokenizer import load_tokenizer

TEXTS = ["Hello world", "def f(x):\n    return x + 1\n", "ünïcödé 日本語 🎉", "a\r\nb\t c  d"]


def test_trained_tokenizer_is_a_standard_hf_directory(tokenizer_dir):
    from transformers import AutoTokenizer

    assert (tokenizer_dir / "tokenizer.json").is_file()
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 and 5
    auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours = load_tokenizer(tokenizer_dir)
    assert auto.eos_token == "<|endoftext|>"
    assert [auto.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert ours.eod == 0 and ours.vocab_size == len(auto) == 320
    for text in TEXTS:
        assert auto(text, add_special_tokens=False)["input_ids"] == ours.encode([text])[0]


def test_decoding_gives_back_the_exact_text_and_special_tokens_stay_whole(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode([text])[0]) == text
    ids = tokenizer.encode(["<|im_start|>user\nhi<|im_end|><|endoftext|>"])[0]
    assert ids[0] == 1 and ids[-2:] == [2, 0]


def test_training_is_deterministic():
    texts = TEXTS * 20 + [f"line {i} of the corpus" for i in range(200)]
    first, second = train_bpe(texts, 300), train_bpe(texts, 300)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 300


def test_a_bare_tokenizer_json_loads_and_eos_comes_from_the_config(tokenizer_dir, tmp_path):
    assert load_tokenizer(tokenizer_dir / "tokenizer.json").eod == 0
    # A tokenizer without <|endoftext|>: the EOD is tokenizer_config.json's eos_token.
    raw = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for token in raw["added_tokens"]:
        token["content"] = token["content"].replace("<|endoftext|>", "</s>")
    raw["model"]["vocab"]["</s>"] = raw["model"]["vocab"].pop("<|endoftext|>")
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(raw))
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert load_tokenizer(other).eod == 0 and load_tokenizer(other).eod_token == "</s>"
    (other / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="no <\\|endoftext\\|> token and no eos_token"):
        load_tokenizer(other)


def test_bad_tokenizer_paths_and_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match="below 259"):
        train_bpe(TEXTS, 100)
