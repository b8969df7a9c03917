"""Hugging Face directory -> moe-lab: a weights-only checkpoint plus the matching experiment.

    OUT/config.yaml                      the experiment config (checkpoint.init_from: OUT)
    OUT/checkpoints/step_0000000/ + latest   megatron dist checkpoint, loadable in any layout
    OUT/hf/                              config.json, tokenizer and generation files of the source

`plan_import` reads only config.json and the safetensors headers and checks everything (the
architecture, unsupported options, every tensor name and shape, the layout against the model
sizes) before anything is written. `write_import` runs on every rank of the layout: each rank
builds its shard of the model, fills it tensor by tensor from the HF files (reading only the
tensors its shard holds) and megatron saves; OUT appears, by a rename, only when all is written.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moe_lab import config as config_lib
from moe_lab.config import ConfigError, ExperimentConfig
from moe_lab.convert import hf_files
from moe_lab.convert.errors import ConversionError
from moe_lab.convert.families import Family, family_for_architecture
from moe_lab.convert.tensors import TensorMap

STEP_NAME = "step_0000000"
# The HF tensor dtype -> training.precision of the written experiment. fp16 and fp64 weights
# become fp32 (fp16 -> fp32 is exact).
_PRECISION = {"F32": "fp32", "BF16": "bf16", "F16": "fp32", "F64": "fp32"}
_LAYOUT_KEYS = ("tp", "pp", "ep", "etp")


@dataclass
class ImportPlan:
    hf_dir: Path
    out: Path
    family: Family
    cfg: ExperimentConfig
    maps: list[TensorMap]
    reader: hf_files.HFReader

    @property
    def total_bytes(self) -> int:
        return sum(self._nbytes(name) for tm in self.maps for name in tm.hf)

    def _nbytes(self, name: str) -> int:
        count = 1
        for size in self.reader.shapes[name]:
            count *= size
        return count * self.reader.torch_dtype(name).itemsize


def parse_layout(text: str | None) -> dict[str, int]:
    """'tp=2,ep=2' -> {'tp': 2, 'ep': 2}."""
    layout: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.strip().partition("=")
        if not sep or key not in _LAYOUT_KEYS or not value.isdigit() or int(value) < 1:
            raise ConversionError(f"--layout: {part.strip()!r} is not one of "
                                  f"{', '.join(k + '=N' for k in _LAYOUT_KEYS)} (N >= 1)")
        layout[key] = int(value)
    return layout


def plan_import(hf_dir: str | Path, out: str | Path | None, layout: dict[str, int]) -> ImportPlan:
    """Everything checked, nothing written. `out` None: only read (e.g. for upcycling); the
    experiment then has no checkpoint.init_from and uses HF_DIR's tokenizer."""
    hf_dir = Path(hf_dir)
    out = Path(out).resolve() if out is not None else None
    if out is not None:
        _check_output(out)
    config_path = hf_dir / hf_files.CONFIG
    raw = hf_files.read_config_json(hf_dir)
    architectures = raw.get("architectures") or [None]
    try:
        family = family_for_architecture(architectures[0])
        hf = hf_files.parse_config(hf_dir)
        if hf.model_type != family.model_type:
            raise ConversionError(f"model_type: {hf.model_type} does not go with architectures "
                                  f"{architectures[0]} (model_type {family.model_type})")
        sections = family.sections_from_hf(hf)
    except ConversionError as err:
        raise ConversionError(f"{config_path}: {err}") from None
    reader = hf_files.HFReader(hf_dir)
    tokenizer = None
    if hf_files.has_tokenizer(hf_dir):
        tokenizer = out / "hf" if out is not None else hf_dir.resolve()
    cfg = _experiment(sections, reader, out, layout, tokenizer, config_path)
    maps = family.tensor_maps(cfg)
    _check_tensors(maps, reader, cfg, family, hf_dir)
    return ImportPlan(hf_dir, out, family, cfg, maps, reader)


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not empty; choose a new output "
                              "directory (nothing is overwritten)")


def _experiment(sections: dict, reader: hf_files.HFReader, out: Path | None,
                layout: dict[str, int], tokenizer: Path | None,
                config_path: Path) -> ExperimentConfig:
    embed = "model.embed_tokens.weight"
    precision = _PRECISION.get(reader.dtypes.get(embed, "F32"), "fp32")
    raw = {**sections, "parallel": dict(layout), "training": {"precision": precision},
           "checkpoint": {"init_from": str(out) if out is not None else None},
           "data": {"tokenizer": str(tokenizer) if tokenizer else None}}
    source = f"{config_path} with --layout {_describe(layout)}"
    cfg = config_lib.from_dict(raw, source=source)
    _check_layout_fits(cfg, source)
    return cfg


def _describe(layout: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in layout.items()) or "(none)"


def _check_layout_fits(cfg: ExperimentConfig, source: str) -> None:
    """Sizes megatron splits across tensor-parallel ranks must divide evenly."""
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    checks = [("model.vocab_size", m.vocab_size, p.tp, "tp"),
              ("model.ffn_hidden_size", m.ffn_hidden_size, p.tp, "tp")]
    if moe.enabled:
        checks.append(("moe.expert_ffn", moe.expert_ffn, p.etp, "etp"))
    if moe.enabled and moe.shared_expert_ffn:
        checks.append(("moe.shared_expert_ffn", moe.shared_expert_ffn, p.tp, "tp"))
    for key, size, ways, name in checks:
        if size % ways:
            raise ConfigError(f"{source}: {key}: {size} is not divisible by {name}={ways}", key)


def _check_tensors(maps: list[TensorMap], reader: hf_files.HFReader, cfg: ExperimentConfig,
                   family: Family, hf_dir: Path) -> None:
    """Every tensor the mapping needs is there with its shape, and nothing else is."""
    expected = {name: shape for tm in maps for name, shape in zip(tm.hf, tm.hf_shapes)}
    missing = [name for name in expected if name not in reader.shapes]
    if missing:
        raise ConversionError(f"{missing[0]}: missing from {hf_dir} (needed by "
                              f"{family.architecture} as its config.json describes it)"
                              + _more(missing))
    extra = sorted(set(reader.shapes) - set(expected))
    if extra:
        hint = (" although config.json ties the word embeddings (tie_word_embeddings: true)"
                if extra[0] == "lm_head.weight" and cfg.model.tie_embeddings else
                f", but {family.architecture} as its config.json describes it has no such "
                "tensor")
        raise ConversionError(f"{extra[0]}: stored in {reader.files[extra[0]]}{hint}; refusing "
                              "to drop it" + _more(extra))
    for name, shape in expected.items():
        if reader.shapes[name] != tuple(shape):
            raise ConversionError(f"{name}: shape {list(reader.shapes[name])} in "
                                  f"{reader.files[name]}, expected {list(shape)} from config.json")
        reader.torch_dtype(name)  # refuses non-float tensors


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def write_import(plan: ImportPlan, use_gpu: bool) -> dict:
    """Run on every rank of plan.cfg.parallel's layout (process groups initialised)."""
    from moe_lab.convert.mcore_files import fill_model, save_model
    from moe_lab.model import build_model, build_transformer_config

    started = time.perf_counter()
    rank = dist.get_rank()
    staging = plan.out.with_name(plan.out.name + ".partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "checkpoints" / STEP_NAME).mkdir(parents=True)
    dist.barrier()
    try:
        config = build_transformer_config(plan.cfg, use_cpu_initialization=not use_gpu)
        # Every weight is overwritten from the HF files (fill_model checks it): skip random init.
        config.perform_initialization = False
        model = build_model(plan.cfg, config)
        if use_gpu:
            model.cuda()
        elements = fill_model(model, plan.maps, element_reader(plan),
                              plan.family.architecture)
        save_model(model, staging / "checkpoints" / STEP_NAME)
        dist.barrier()
        if rank == 0:
            _write_companions(plan, staging)
            staging.rename(plan.out)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()
    return {"elements": elements, "seconds": time.perf_counter() - started}


def element_reader(plan: ImportPlan):
    """TensorMap -> its full megatron-layout element, read from the HF files. Remembers the
    last one: SwiGLU's gate and up halves of one parameter ask for the same element."""
    last: dict[str, torch.Tensor] = {}

    def element(tm: TensorMap) -> torch.Tensor:
        if tm.mcore not in last:
            last.clear()
            last[tm.mcore] = tm.to_mcore([plan.reader.read(name) for name in tm.hf])
        return last[tm.mcore]

    return element


def _write_companions(plan: ImportPlan, staging: Path) -> None:
    (staging / "checkpoints" / "latest").write_text(STEP_NAME + "\n")
    (staging / "config.yaml").write_text(
        f"# Imported from {plan.hf_dir.resolve()} ({plan.family.architecture}).\n"
        f"# Train from it: moe-lab train {plan.out / 'config.yaml'} --run-dir runs/NAME\n"
        + config_lib.dump(plan.cfg))
    hf_dir = staging / "hf"
    hf_dir.mkdir()
    shutil.copy2(plan.hf_dir / hf_files.CONFIG, hf_dir / hf_files.CONFIG)
    hf_files.copy_assets(plan.hf_dir, hf_dir)
