"""Hugging Face checkpoint directories: config.json, safetensors (one file or sharded with
model.safetensors.index.json), tokenizer and generation files.

Reading opens every safetensors header first (names, shapes, dtypes), so a missing shard, an
index that disagrees with its files or an unreadable file is found before any data is read;
tensors are then read one at a time. Writing buffers at most one shard.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lab.convert.errors import ConversionError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Files that travel with the weights unchanged: tokenizer and generation settings.
ASSETS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
          "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "F64": torch.float64}


def read_config_json(directory: Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise ConversionError(f"{path}: not found (is {directory} a Hugging Face model "
                              "directory?)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return data


def parse_config(directory: Path):
    """config.json through transformers' own config class (its defaults, its legacy keys)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers' and huggingface_hub's own validation errors
        message = " ".join(str(err).split()) or type(err).__name__
        raise ConversionError(f"{Path(directory) / CONFIG}: {message}") from None


def has_tokenizer(directory: Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def copy_assets(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer and generation files of `source` that exist; returns their names."""
    copied = []
    for name in ASSETS:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


class HFReader:
    """The weights of an HF directory: `shapes`, `dtypes` and `files` per tensor name from the
    headers; `read(name)` loads one tensor."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._handles: dict[Path, object] = {}
        index_path, single = self.directory / INDEX, self.directory / SINGLE
        if index_path.is_file():
            self._read_index(index_path)
        elif single.is_file():
            self._read_header(single, expected=None)
        else:
            raise ConversionError(f"{self.directory}: no {SINGLE} or {INDEX} (only safetensors "
                                  "checkpoints are read; pytorch_model.bin is not)")

    def _read_index(self, index_path: Path) -> None:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConversionError(f"{index_path}: not a safetensors index with a weight_map "
                                  f"({err})") from None
        by_file: dict[str, set[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in sorted(by_file.items()):
            path = self.directory / file
            if not path.is_file():
                first = sorted(names)[0]
                raise ConversionError(f"{path}: missing shard (listed in {INDEX} for {first} and "
                                      f"{len(names) - 1} more tensors)")
            self._read_header(path, expected=names)

    def _read_header(self, path: Path, expected: set[str] | None) -> None:
        try:
            handle = safe_open(str(path), framework="pt")
            names = set(handle.keys())
            for name in names:
                piece = handle.get_slice(name)
                self.shapes[name] = tuple(piece.get_shape())
                self.dtypes[name] = piece.get_dtype()
                self.files[name] = path
        except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
            raise ConversionError(f"{path}: not a readable safetensors file ({err})") from None
        self._handles[path] = handle
        if expected is not None:
            if names - expected:
                name = sorted(names - expected)[0]
                raise ConversionError(f"{name}: stored in {path} but not listed in {INDEX}")
            if expected - names:
                name = sorted(expected - names)[0]
                raise ConversionError(f"{name}: {INDEX} places it in {path}, which does not "
                                      "hold it")

    def torch_dtype(self, name: str) -> torch.dtype:
        dtype = _DTYPES.get(self.dtypes[name])
        if dtype is None:
            raise ConversionError(f"{name}: dtype {self.dtypes[name]} in {self.files[name]} is "
                                  f"not a floating-point type this converter reads "
                                  f"({', '.join(_DTYPES)})")
        return dtype

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.files[name]].get_tensor(name)
        except Exception as err:
            raise ConversionError(f"{name}: cannot be read from {self.files[name]} ({err})") \
                from None


class HFWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own), then one model.safetensors or the shards plus index."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards as transformers does; returns the weight file names."""
        if self._buffer or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.directory / SINGLE)
            return [SINGLE]
        count = len(self._shards)
        weight_map, names = {}, []
        for number, (path, tensors) in enumerate(self._shards, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update({tensor: name for tensor in tensors})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' (10^9 bytes, as transformers counts), '512MiB', or a number of bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ConversionError(f"--max-shard-size: {text!r} is not a size like 5GB or 500MB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])
