"""moe-lab models for the bench, built by the same chain as `moe-lab train` (TransformerConfig ->
GPTModel -> DDP -> megatron optimizer with fp32 master weights -> Trainer), one micro-batch per
step. Variant names: mcore_<backend>_<precision>, e.g. mcore_torch_bf16, mcore_te_fp8."""

from __future__ import annotations

import dataclasses

from moe_lab.data import SyntheticTokens
from moe_lab.train.loop import build_training
from moe_lab.train.step import Trainer


def shape_overrides(layers: int, seq: int, mbs: int) -> list[str]:
    """The config overrides of a bench shape: `layers` layers, `seq` tokens a sequence, one
    micro-batch of `mbs` sequences a step, no checkpoints."""
    return [f"model.num_layers={layers}", f"training.seq_length={seq}",
            f"training.micro_batch_size={mbs}", f"training.global_batch_size={mbs}",
            "checkpoint.enabled=false"]


def variant_config(cfg, variant: str):
    _, backend, precision = variant.split("_")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, backend=backend),
        training=dataclasses.replace(cfg.training, precision=precision),
    )


def build_step(cfg, variant: str, device):
    cfg = variant_config(cfg, variant)
    config, model, optimizer, scheduler = build_training(cfg, use_gpu=device.type == "cuda")
    data = SyntheticTokens(cfg.model.vocab_size, cfg.training.seq_length, cfg.training.seed)
    batch = data.batch(list(range(cfg.training.micro_batch_size)))
    trainer = Trainer(cfg, config, model, optimizer, scheduler, data)
    counter = iter(range(10**9))

    def step():
        # as `moe-lab train` between checkpoints: the next step's forward and backward are
        # queued before this step's numbers are read (so each call queues one update and one
        # forward and backward; the very first call queues its own forward and backward too)
        trainer.step(next(counter), [batch], next_batches=[batch])

    return step, (model, optimizer, trainer)


def is_variant(name: str) -> bool:
    parts = name.split("_")
    return (len(parts) == 3 and parts[0] == "mcore" and parts[1] in ("local", "te", "torch")
            and parts[2] in ("fp32", "bf16", "fp8"))
