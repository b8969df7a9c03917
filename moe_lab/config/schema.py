"""The experiment schema: one frozen dataclass per YAML section.

Each dataclass validates its own fields in `__post_init__` and raises `ConfigError` naming the
dotted key; `ExperimentConfig` checks the rules that span sections. Names follow
../shared/notes/interfaces.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in an experiment config. `key` is the dotted key, when one is to blame."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}", key=key)


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name}", f"must be > 0, got {value}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Qwen2-style decoder: GQA with QKV bias, SwiGLU, RMSNorm pre-norm, RoPE."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: as many KV heads as query heads
    ffn_hidden_size: int = 256  # dense layers' intermediate size
    vocab_size: int = 512
    rope_base: float = 1000000.0
    tie_embeddings: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    backend: Literal["local", "te", "torch"] = "local"
    # Transformer Engine's fused RoPE kernel (Megatron-LM's default, `--no-rope-fusion` turns it
    # off) wherever TE is installed and the model trains on the GPU; false: megatron's unfused
    # RoPE, several elementwise passes over the queries and keys each way.
    rope_fusion: bool = True
    # Megatron-LM's --attention-backend. The te backend hands it to Transformer Engine; the torch
    # backend maps it onto torch's SDPA kernels: flash (torch's FlashAttention-2), fused (cuDNN's
    # fused attention), unfused (the math path), auto (cuDNN where it takes the shape, then
    # flash). The local backend has megatron's unfused attention only.
    attention_backend: Literal["auto", "flash", "fused", "unfused"] = "auto"

    def __post_init__(self):
        _positive("model", self, "num_layers", "hidden_size", "num_attention_heads",
                  "ffn_hidden_size", "vocab_size", "rope_base", "norm_eps", "init_std")
        _require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                 f"{self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        if self.num_query_groups is not None:
            _positive("model", self, "num_query_groups")
            _require(self.num_attention_heads % self.num_query_groups == 0,
                     "model.num_query_groups", f"{self.num_query_groups} does not divide "
                     f"num_attention_heads {self.num_attention_heads}")
        _one_of("model.backend", self.backend, ("local", "te", "torch"))
        _one_of("model.attention_backend", self.attention_backend,
                ("auto", "flash", "fused", "unfused"))
        _require(self.backend != "local" or self.attention_backend == "auto",
                 "model.attention_backend", f"{self.attention_backend} needs model.backend te "
                 "or torch; the local backend has megatron's unfused attention only")

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class BalanceConfig:
    """Load-balancing loss coefficients; 0 switches a term off."""

    aux: float = 0.001  # switch/GShard loss per micro-batch
    seq_aux: float = 0.0  # per sequence
    global_aux: float = 0.0  # over the global batch
    z: float = 0.0  # router z-loss

    def __post_init__(self):
        for name in ("aux", "seq_aux", "global_aux", "z"):
            _require(getattr(self, name) >= 0, f"moe.balance.{name}", "must be >= 0")


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts plus an optional gated shared expert. num_experts 0 means dense."""

    num_experts: int = 0
    topk: int = 2
    expert_ffn: int = 0
    shared_expert_ffn: int = 0  # 0: no shared expert
    shared_expert_gate: bool = True  # Qwen2-MoE scales the shared expert by sigmoid(x . w)
    # HF's rule: layer i is MoE when (i + 1) % layer_freq == 0; or an explicit 0/1 list.
    layer_freq: int | list[int] = 1
    # megatron's exchange of tokens between expert ranks. model.backend=torch with one expert
    # rank (ep=1, etp=1) and dropless routing sorts tokens locally instead (experts/local_dispatch)
    dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    capacity_factor: float | None = None  # None: dropless
    # The router's own config: {name: ..., plus that router's parameters}. Validated by
    # moe_lab.routers, which owns the router names.
    router: dict[str, Any] = field(default_factory=lambda: {"name": "topk_softmax"})
    balance: BalanceConfig = field(default_factory=BalanceConfig)

    def __post_init__(self):
        if not self.enabled:
            _require(self.num_experts == 0, "moe.num_experts", "must be >= 0")
            return
        _positive("moe", self, "topk", "expert_ffn")
        _require(self.topk <= self.num_experts, "moe.topk",
                 f"{self.topk} exceeds num_experts {self.num_experts}")
        _require(self.shared_expert_ffn >= 0, "moe.shared_expert_ffn", "must be >= 0")
        _one_of("moe.dispatcher", self.dispatcher, ("alltoall", "allgather"))
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0, "moe.capacity_factor", "must be > 0 or null")
        _require("name" in self.router, "moe.router", "needs a name, e.g. {name: topk_softmax}")
        if isinstance(self.layer_freq, int):
            _require(self.layer_freq > 0, "moe.layer_freq", "must be > 0")
        else:
            _require(all(v in (0, 1) for v in self.layer_freq), "moe.layer_freq",
                     "an explicit list holds only 0 (dense) and 1 (MoE)")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def moe_layers(self, num_layers: int) -> list[int]:
        """0/1 per layer: 1 where the layer is MoE (HF Qwen2-MoE's decoder_sparse_step rule)."""
        if not self.enabled:
            return [0] * num_layers
        if isinstance(self.layer_freq, list):
            return list(self.layer_freq)
        return [int((i + 1) % self.layer_freq == 0) for i in range(num_layers)]


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool | None = None  # None: on when tp > 1
    # megatron DDP's overlap_grad_reduce (Megatron-LM's --overlap-grad-reduce): each bucket of
    # gradients starts its reduction over data parallel in the backward pass, as soon as the
    # bucket is complete, instead of all of them after it. Every trainable parameter must then
    # get a gradient in every step (megatron refuses the step otherwise).
    overlap_grad_reduce: bool = False

    def __post_init__(self):
        _positive("parallel", self, "tp", "pp", "ep", "etp", "cp")

    @property
    def use_sequence_parallel(self) -> bool:
        return self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def describe(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-ep{self.ep}-etp{self.etp}-cp{self.cp}"


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up and cosine decay to min_lr over training.max_steps."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad: float = 1.0  # 0: no clipping
    distributed: bool = True  # megatron's DistributedOptimizer (ZeRO-1 over data parallel)
    # megatron's precision-aware optimizer (Transformer Engine's FusedAdam; Megatron-LM's
    # --use-precision-aware-optimizer): the dtypes below may then be bf16; the master weights
    # stay fp32. Needs distributed=true, bf16 or fp8 training and Transformer Engine.
    precision_aware: bool = False
    main_grads_dtype: Literal["fp32", "bf16"] = "fp32"  # gradient buffers and their reduction
    exp_avg_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam's first moment
    exp_avg_sq_dtype: Literal["fp32", "bf16"] = "fp32"  # Adam's second moment
    # Keep the fp32 master weights as the bf16 weight plus its 16 low bits (2 bytes a parameter
    # less; megatron-core's default). Checkpoints hold the fp32 master weights either way
    # (train/master_remainders.py).
    store_param_remainders: bool = False
    # The update of the fp32 master weights (train/master_adamw.py): "triton" is one kernel for
    # AdamW and the bf16 weight copy (with the precision-aware optimizer: on TE FusedAdam's
    # state, in its dtypes); "megatron" is megatron's step with megatron's choice of Adam
    # (Transformer Engine's FusedAdam when TE is installed, else torch's fused AdamW), then its
    # copy; "auto" takes "triton" where it applies (CUDA).
    update_impl: Literal["auto", "triton", "megatron"] = "auto"

    def __post_init__(self):
        _positive("optimizer", self, "lr")
        _require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", "must be in [0, lr]")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 "optimizer.betas", f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _require(self.clip_grad >= 0, "optimizer.clip_grad", "must be >= 0")
        for key in ("main_grads_dtype", "exp_avg_dtype", "exp_avg_sq_dtype"):
            _one_of(f"optimizer.{key}", getattr(self, key), ("fp32", "bf16"))
            _require(self.precision_aware or getattr(self, key) == "fp32", f"optimizer.{key}",
                     "bf16 needs optimizer.precision_aware=true")
        _require(not self.precision_aware or self.distributed, "optimizer.precision_aware",
                 "needs optimizer.distributed=true (megatron's distributed optimizer)")
        _require(self.precision_aware or not self.store_param_remainders,
                 "optimizer.store_param_remainders", "needs optimizer.precision_aware=true")
        _one_of("optimizer.update_impl", self.update_impl, ("auto", "triton", "megatron"))


@dataclass(frozen=True)
class TrainingConfig:
    max_steps: int = 100
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_length: int = 128
    log_interval: int = 1
    eval_interval: int = 0  # 0: no validation
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["tensorwise", "delayed", "blockwise", "mxfp8"] = "tensorwise"
    recompute: Literal["none", "selective", "full"] = "none"
    # The LM loss: `fused_linear` (output layer + cross-entropy in token chunks, no logits
    # tensor; model/lm_loss.py), `megatron` (megatron-core's logits then vocab-parallel
    # cross-entropy) or `auto` (fused_linear when parallel.tp == 1, else megatron).
    cross_entropy: Literal["auto", "fused_linear", "megatron"] = "auto"
    peak_tflops: float = 989.0  # per GPU, for throughput/mfu (H100/H200 dense bf16)
    # A NaN/Inf loss or grad norm: `stop` (save the last good state, exit 3) or `skip` the update.
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def __post_init__(self):
        _positive("training", self, "max_steps", "micro_batch_size", "global_batch_size",
                  "seq_length", "log_interval", "peak_tflops")
        _require(self.eval_interval >= 0, "training.eval_interval", "must be >= 0")
        _require(self.global_batch_size % self.micro_batch_size == 0,
                 "training.global_batch_size", f"{self.global_batch_size} is not a multiple of "
                 f"micro_batch_size {self.micro_batch_size}")
        _one_of("training.precision", self.precision, ("fp32", "bf16", "fp8"))
        _one_of("training.fp8_recipe", self.fp8_recipe,
                ("tensorwise", "delayed", "blockwise", "mxfp8"))
        _one_of("training.recompute", self.recompute, ("none", "selective", "full"))
        _one_of("training.cross_entropy", self.cross_entropy, ("auto", "fused_linear", "megatron"))
        _one_of("training.on_nonfinite", self.on_nonfinite, ("stop", "skip"))


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True  # false: never save (benchmarks, smoke tests)
    interval: int = 0  # save every N steps (0: only at the end of training)
    keep_last: int = 0  # 0: keep every checkpoint
    keep_every: int = 0  # with keep_last: also keep every step that is a multiple of this
    async_save: bool = False  # write tensors in a background process while training goes on
    init_from: str | None = None  # weights only: fresh optimizer, schedule and step

    def __post_init__(self):
        _require(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        _require(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
        _require(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Training data: megatron indexed datasets mixed by weight, or synthetic tokens."""

    tokenizer: str | None = None  # HF tokenizer directory or tokenizer.json; needed with a blend
    blend: list[list[Any]] = field(default_factory=list)  # [[weight, prefix], ...]; empty: synthetic
    split: str = "98,1,1"  # train,valid,test shares of each prefix's documents
    valid_samples: int = 64  # sequences in the fixed held-out set behind valid/loss
    # The held-out set's mixture when it should not follow blend (comparing mixtures); the
    # valid split of each prefix, so it never overlaps training on the same prefixes.
    valid_blend: list[list[Any]] = field(default_factory=list)

    def __post_init__(self):
        for name in ("blend", "valid_blend"):
            _check_blend(f"data.{name}", getattr(self, name))
            _require(not getattr(self, name) or bool(self.tokenizer), "data.tokenizer",
                     f"is required with data.{name} (the tokenizer the datasets were prepared "
                     "with)")
        _require(not self.valid_blend or bool(self.blend), "data.valid_blend",
                 "needs data.blend (synthetic runs have their own held-out set)")
        shares = self.split.split(",")
        _require(len(shares) == 3 and all(_is_share(s) for s in shares) and
                 float(shares[0]) > 0, "data.split",
                 f"must be three shares 'train,valid,test' with train > 0, got {self.split!r}")
        _positive("data", self, "valid_samples")


def _check_blend(key: str, blend: list) -> None:
    for i, entry in enumerate(blend):
        _require(isinstance(entry, (list, tuple)) and len(entry) == 2
                 and isinstance(entry[0], (int, float)) and not isinstance(entry[0], bool)
                 and entry[0] > 0 and isinstance(entry[1], str), f"{key}[{i}]",
                 f"must be [weight > 0, prefix], got {entry!r}")


def _is_share(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


@dataclass(frozen=True)
class TrackingConfig:
    """Every run is an MLflow run unless enabled is false (docs/tracking.md)."""

    enabled: bool = True
    uri: str | None = None  # default: sqlite:///<cwd>/mlruns.db, artifacts in <cwd>/mlartifacts
    experiment: str | None = None  # default: moe-lab
    run_name: str | None = None  # default: the run directory's name
    # Set by `moe-lab sweep` for each member: the member's MLflow run becomes a child of the
    # sweep's parent run (tag mlflow.parentRunId) and carries the sweep id as a tag.
    parent_run_id: str | None = None
    sweep_id: str | None = None
    # Log the [MoE layers, experts] load matrix (.npy + heatmap) every N steps and at the last
    # step; 0: never.
    expert_load_interval: int = 100

    def __post_init__(self):
        _require(self.expert_load_interval >= 0, "tracking.expert_load_interval", "must be >= 0")


@dataclass(frozen=True)
class UpcycleConfig:
    """Start the MoE from a dense checkpoint (moe_lab.upcycle; docs/upcycling.md). With `source`
    set, `moe-lab train` upcycles into RUN_DIR/upcycled when the run starts for the first time;
    `moe-lab upcycle` reads the same keys."""

    source: str | None = None  # a dense moe-lab run or checkpoint directory; None: no upcycling
    method: str | None = None  # qwen2 | granular | sparse (moe_lab.upcycle owns the names)
    reinit_fraction: float | None = None  # None: 0.5 for qwen2, 0 for the others
    reinit_granularity: Literal["channel", "element"] = "channel"
    router_init: Literal["zeros", "normal", "virtual-group"] | None = None  # None: the method's
    weight_scale: float | Literal["auto"] = "auto"  # auto: NVIDIA's rule (granular, sparse), 1 (qwen2)
    shared_gate_init: Literal["zeros", "normal"] = "zeros"  # zeros: the shared gate starts at 0.5
    seed: int = 0

    def __post_init__(self):
        _require(self.source is None or self.method is not None, "upcycle.method",
                 "choose the method (qwen2, granular or sparse) when upcycle.source is set")
        if self.reinit_fraction is not None:
            _require(0 <= self.reinit_fraction <= 1, "upcycle.reinit_fraction",
                     f"must be in [0, 1], got {self.reinit_fraction}")
        _one_of("upcycle.reinit_granularity", self.reinit_granularity, ("channel", "element"))
        if self.router_init is not None:
            _one_of("upcycle.router_init", self.router_init, ("zeros", "normal", "virtual-group"))
        _one_of("upcycle.shared_gate_init", self.shared_gate_init, ("zeros", "normal"))
        if self.weight_scale != "auto":
            _require(self.weight_scale > 0, "upcycle.weight_scale",
                     f"must be > 0 or auto, got {self.weight_scale}")


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    def __post_init__(self):
        m, moe, p = self.model, self.moe, self.parallel
        _require(m.num_attention_heads % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide model.num_attention_heads {m.num_attention_heads}")
        _require(m.kv_heads % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide the {m.kv_heads} KV heads (model.num_query_groups)")
        _require(m.num_layers % p.pp == 0, "parallel.pp",
                 f"{p.pp} does not divide model.num_layers {m.num_layers}")
        _require(self.training.seq_length % (p.tp * p.cp) == 0 or p.tp == 1,
                 "training.seq_length", f"must be divisible by tp*cp = {p.tp * p.cp}")
        _require(p.cp == 1 or m.backend == "te", "parallel.cp",
                 f"context parallelism (cp={p.cp}) needs model.backend=te; "
                 f"the {m.backend} backend has no context-parallel attention")
        if moe.enabled:
            _require(moe.num_experts % p.ep == 0, "parallel.ep",
                     f"moe.num_experts {moe.num_experts} is not divisible by ep {p.ep}")
            if isinstance(moe.layer_freq, list):
                _require(len(moe.layer_freq) == m.num_layers, "moe.layer_freq",
                         f"has {len(moe.layer_freq)} entries for {m.num_layers} layers")
        else:
            _require(p.ep == 1 and p.etp == 1, "parallel.ep",
                     "expert parallelism needs a MoE model (moe.num_experts > 0)")
        _require(self.optimizer.warmup_steps < self.training.max_steps, "optimizer.warmup_steps",
                 f"{self.optimizer.warmup_steps} must be below training.max_steps "
                 f"{self.training.max_steps}")
        _require(self.training.cross_entropy != "fused_linear" or p.tp == 1,
                 "training.cross_entropy", f"fused_linear needs parallel.tp=1 (the output layer "
                 f"is split over the vocabulary with tp={p.tp}); use auto or megatron")
        _require(not self.optimizer.precision_aware or self.training.precision != "fp32",
                 "optimizer.precision_aware", "needs bf16 model weights (training.precision "
                 "bf16 or fp8)")
        if m.backend != "te":
            _require(self.training.precision != "fp8", "training.precision",
                     "fp8 needs model.backend=te (Transformer Engine)")

    @property
    def fused_cross_entropy(self) -> bool:
        """Whether the LM loss runs through model/lm_loss.py (training.cross_entropy)."""
        choice = self.training.cross_entropy
        return choice == "fused_linear" or (choice == "auto" and self.parallel.tp == 1)
