"""The checkpoint manifest: what a checkpoint holds, and the test that it is whole.

`step_NNNNNNN/manifest.json` is written by rank 0 after every rank's files are on disk and before
the directory gets its final name. It records the step, tokens and data position, a hash of the
resolved config and the model's own config sections, the parallel layout that wrote it, the
MLflow run id, rank 0's RNG states, the size of every file and a SHA-256 of every metadata file
(all but the `.distcp` tensor data, which is checked by size), and a checksum of itself.
A checkpoint whose manifest is missing, unreadable or contradicted by the files, or whose model
differs from the config, is not loaded (`verify` raises `CheckpointInvalid` naming the file or key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from moe_lab.config import ExperimentConfig, to_dict

MANIFEST = "manifest.json"
FORMAT = "moe-lab-checkpoint/1"
# The sections that define the weights: a checkpoint of another model is refused.
MODEL_SECTIONS = ("model", "moe")


class CheckpointInvalid(Exception):
    """This checkpoint must not be loaded; the message names the file or key to blame."""


def build(cfg: ExperimentConfig | None, *, step: int, consumed_samples: int, layout: dict,
          optimizer_format: str | None, mlflow_run_id: str | None) -> dict:
    """Everything but the file list, captured when the save starts (the RNG states then).
    Without a config (a checkpoint written outside `train`, e.g. by a converter) the
    config fields are null and the model is not checked on load."""
    config = to_dict(cfg) if cfg is not None else None
    t = cfg.training if cfg is not None else None
    return {
        "format": FORMAT,
        "step": step,
        "consumed_samples": consumed_samples,
        "tokens": consumed_samples * t.seq_length if t else None,
        "config_hash": _digest(json.dumps(config, sort_keys=True).encode()) if config else None,
        "model_config": {s: config[s] for s in MODEL_SECTIONS} if config else None,
        "parallel": layout,
        "optimizer_format": optimizer_format,
        "mlflow_run_id": mlflow_run_id,
        # Sample i of the data depends only on (seed, i): the next step starts at this index.
        "data": {"next_sample": consumed_samples, "seed": t.seed if t else None,
                 "global_batch_size": t.global_batch_size if t else None},
        "rng": capture_rng(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write(directory: Path, manifest: dict) -> None:
    """Add the file list and the self-checksum, and write manifest.json (rank 0 only)."""
    manifest = dict(manifest, files=_describe_files(directory))
    manifest["checksum"] = _digest(_canonical(manifest))
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointInvalid(f"{path} is missing (the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
        claimed = manifest.pop("checksum")
    except (ValueError, KeyError, AttributeError, UnicodeDecodeError):
        raise CheckpointInvalid(f"{path} is truncated or not a moe-lab manifest") from None
    if claimed != _digest(_canonical(manifest)):
        raise CheckpointInvalid(f"{path} does not match its own checksum (edited or damaged)")
    return manifest


def verify(directory: Path, cfg: ExperimentConfig | None = None) -> dict:
    """The manifest of a whole checkpoint of this config's model; CheckpointInvalid otherwise."""
    directory = Path(directory)
    manifest = read(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointInvalid(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointInvalid(f"{path} has {size} bytes, the manifest says "
                                    f"{expected['bytes']} (truncated or overwritten)")
        if "sha256" in expected and _file_digest(path) != expected["sha256"]:
            raise CheckpointInvalid(f"{path} does not match its SHA-256 in the manifest")
    if cfg is not None and manifest["model_config"] is not None:
        _check_model(directory, manifest["model_config"], to_dict(cfg))
    return manifest


def capture_rng() -> dict:
    states = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = _b64(torch.cuda.get_rng_state())
    return states


def restore_rng(states: dict) -> None:
    torch.set_rng_state(_unb64(states["torch_cpu"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(states["cuda"]))


# The config keys that decide which weights exist and their shapes: checkpoint.init_from may
# change anything else (router, balancing losses, backend, ...), not these.
WEIGHT_SHAPE_KEYS = ("model.num_layers", "model.hidden_size", "model.num_attention_heads",
                     "model.num_query_groups", "model.ffn_hidden_size", "model.vocab_size",
                     "model.qkv_bias", "model.tie_embeddings", "moe.num_experts",
                     "moe.expert_ffn", "moe.shared_expert_ffn", "moe.shared_expert_gate",
                     "moe.layer_freq")


def check_weights_fit(directory: Path, cfg: ExperimentConfig) -> None:
    """checkpoint.init_from: the source's weights must have this config's shapes. Checked when
    the source has a manifest with its config (a Hugging Face import has none)."""
    if not (Path(directory) / MANIFEST).is_file():
        return
    model_config = read(directory)["model_config"]
    if model_config is None:
        return
    saved = _flatten(model_config)
    config = to_dict(cfg)
    now = _flatten({s: config[s] for s in MODEL_SECTIONS})
    for key in WEIGHT_SHAPE_KEYS:
        if key in now and saved.get(key) != now[key]:
            upcycle = key == "moe.num_experts" and not saved.get(key)
            raise CheckpointInvalid(
                f"checkpoint.init_from: {key} is {saved.get(key)!r} in {directory} but "
                f"{now[key]!r} in the config"
                + (" (a dense checkpoint becomes an MoE with `moe-lab upcycle`, "
                   "docs/upcycling.md)" if upcycle else ""))


def _check_model(directory: Path, saved: dict, config: dict) -> None:
    for key, value in _flatten({s: config[s] for s in MODEL_SECTIONS}).items():
        old = _flatten(saved).get(key)
        if old != value:
            raise CheckpointInvalid(f"{key} is {old!r} in {directory / MANIFEST} but {value!r} "
                                    f"in the config (a checkpoint of another model)")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe_files(directory: Path) -> dict:
    """Sizes of every file; SHA-256 of the metadata files (the .distcp tensor data is large and
    checked by size, which catches the truncation a crash leaves)."""
    files = {}
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file() or path.name.startswith(MANIFEST):
            continue
        entry = {"bytes": path.stat().st_size}
        if not path.name.endswith(".distcp"):
            entry["sha256"] = _file_digest(path)
        files[path.name] = entry
    return files


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True).encode()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
