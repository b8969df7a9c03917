"""moe-lab checkpoint -> Hugging Face directory that transformers (and vLLM) load.

    OUT_DIR/config.json                       from the experiment config (+ carried keys)
    OUT_DIR/model.safetensors                 or model-0000i-of-0000n.safetensors + index
    OUT_DIR/tokenizer*, generation_config.json   copied from the template directory, if any

CKPT is a run directory (its `checkpoints/latest` and `config.yaml`), a checkpoint directory
inside one, or the output of `convert hf-to-mcore`. `plan_export` checks, from the checkpoint's
metadata alone, that every tensor the HF model needs is there with its shape and that no model
tensor of the checkpoint is left over; `write_export` then reads a batch of elements at a time
and writes shard by shard. OUT_DIR appears, by a rename, only when all is written.

The template directory gives what moe-lab does not model (token ids, context length, tokenizer
files): `--hf-template`, else RUN/hf, else <checkpoint.init_from>/hf (so a run started from an
imported model exports with the source's tokenizer), else data.tokenizer when it is a directory.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lab import config as config_lib
from moe_lab.config import ExperimentConfig
from moe_lab.convert import hf_files
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.families import Family, family_for_experiment
from moe_lab.convert.mcore_files import ElementRef, checkpoint_elements, load_elements
from moe_lab.convert.mcore_keys import element_name
from moe_lab.convert.tensors import TensorMap
from moe_lab.train.checkpoint import latest_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class ExportPlan:
    checkpoint: Path
    config_path: Path
    cfg: ExperimentConfig
    family: Family
    maps: list[TensorMap]
    refs: dict[str, ElementRef]  # TensorMap.mcore -> where its element is
    dtype: torch.dtype
    template: Path | None
    out: Path


def plan_export(ckpt: str | Path, out: str | Path, config_path: str | Path | None = None,
                dtype: str = "auto", template: str | Path | None = None) -> ExportPlan:
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not empty; choose a new output "
                              "directory (nothing is overwritten)")
    checkpoint, found_config, run_dir = resolve_checkpoint(Path(ckpt))
    config_path = Path(config_path) if config_path else found_config
    if config_path is None:
        raise ConversionError(f"{ckpt}: no config.yaml found next to this checkpoint; "
                              "pass --config")
    cfg = config_lib.load(config_path)
    family = family_for_experiment(cfg)
    try:
        family.hf_config(cfg)  # refuses what the HF architecture cannot express
    except ConversionError as err:
        raise ConversionError(f"{config_path}: {err}") from None
    maps = family.tensor_maps(cfg)
    refs = _match_elements(maps, checkpoint_elements(checkpoint), checkpoint, family, config_path)
    return ExportPlan(checkpoint, config_path, cfg, family, maps, refs,
                      _dtype(dtype, refs, maps), _template(template, run_dir, cfg), out)


def resolve_checkpoint(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(dist checkpoint dir, its experiment config if found, its run directory if any)."""
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None:
        return latest, _existing(path / "config.yaml"), path
    if (path / "metadata.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        config = _existing(run_dir / "config.yaml") if run_dir else _existing(path / "config.yaml")
        return path, config, run_dir
    raise ConversionError(f"{path}: neither a run directory (no checkpoints/latest) nor a "
                          "megatron dist checkpoint (no metadata.json)")


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _match_elements(maps: list[TensorMap], elements: dict[str, ElementRef], checkpoint: Path,
                    family: Family, config_path: Path) -> dict[str, ElementRef]:
    refs, missing = {}, []
    for tm in maps:
        name = next((n for n in (tm.mcore, *tm.mcore_aliases) if n in elements), None)
        if name is None:
            missing.append(tm.mcore)
            continue
        if elements[name].shape != tm.mcore_shape:
            raise ConversionError(f"{name}: shape {list(elements[name].shape)} in {checkpoint}, "
                                  f"expected {list(tm.mcore_shape)} from {config_path}")
        refs[tm.mcore] = elements[name]
    if missing:
        raise ConversionError(f"{missing[0]}: missing from {checkpoint} (needed by "
                              f"{family.architecture} for the model in {config_path})"
                              + _more(missing))
    used = {element_of(ref) for ref in refs.values()}
    left = sorted(set(elements) - used)
    if left:
        raise ConversionError(f"{left[0]}: in {checkpoint} but {family.architecture} has no "
                              "such tensor; refusing to drop it" + _more(left))
    return refs


def element_of(ref: ElementRef) -> str:
    return element_name(ref.key, ref.indices)


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _dtype(name: str, refs: dict[str, ElementRef], maps: list[TensorMap]) -> torch.dtype:
    if name == "auto":
        return refs[maps[0].mcore].dtype  # the embedding's: what the model was saved in
    if name not in DTYPES:
        raise ConversionError(f"--dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _template(explicit, run_dir: Path | None, cfg: ExperimentConfig) -> Path | None:
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise ConversionError(f"--hf-template: {explicit} is not a directory")
        return Path(explicit)
    candidates = [run_dir / "hf" if run_dir else None,
                  Path(cfg.checkpoint.init_from) / "hf" if cfg.checkpoint.init_from else None,
                  Path(cfg.data.tokenizer) if cfg.data.tokenizer else None]
    return next((c for c in candidates if c is not None and c.is_dir()), None)


def hf_config(plan: ExportPlan) -> dict:
    """config.json: the family's fields, the template's carried keys, the dtype."""
    template = {}
    if plan.template is not None and (plan.template / hf_files.CONFIG).is_file():
        template = hf_files.read_config_json(plan.template)
    fields = {k: template[k] for k in plan.family.carried_keys if k in template}
    fields.update(plan.family.hf_config(plan.cfg))
    name = _DTYPE_NAMES[plan.dtype]
    fields.update(torch_dtype=name, dtype=name)  # transformers 4 / vLLM read torch_dtype, 5 dtype
    return dict(sorted(fields.items()))


def write_export(plan: ExportPlan, max_shard_bytes: int) -> dict:
    """Needs torch.distributed initialised (a world of one): dist_checkpointing reads through it.

    Elements are read in batches of at most max_shard_bytes (one dist_checkpointing.load call
    each) and written into shards of at most that size, so memory holds about two shards.
    """
    started = time.perf_counter()
    staging = plan.out.with_name(plan.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        writer = hf_files.HFWriter(staging, max_shard_bytes)
        for batch in _batches(plan.maps, plan.refs, max_shard_bytes):
            loaded = load_elements(plan.checkpoint, {tm.mcore: plan.refs[tm.mcore] for tm in batch})
            for tm in batch:
                for name, tensor in tm.to_hf(loaded.pop(tm.mcore)).items():
                    writer.add(name, tensor.to(plan.dtype))
        files = writer.finish()
        (staging / hf_files.CONFIG).write_text(json.dumps(hf_config(plan), indent=2) + "\n")
        assets = hf_files.copy_assets(plan.template, staging) if plan.template else []
        _check_loadable_config(staging)
        staging.rename(plan.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"files": files, "assets": assets, "bytes": writer.total_bytes,
            "seconds": time.perf_counter() - started}


def _batches(maps: list[TensorMap], refs: dict[str, ElementRef], max_bytes: int):
    batch, size = [], 0
    for tm in maps:
        nbytes = refs[tm.mcore].nbytes
        if batch and size + nbytes > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(tm)
        size += nbytes
    if batch:
        yield batch


def _check_loadable_config(directory: Path) -> None:
    """transformers parses what was written (its own validation of every field)."""
    hf_files.parse_config(directory)
