"""The Qwen2-MoE model on megatron-core: structure, parameter count, forward and backward.

Runs in this process as a world of one (gloo) with the CPU compatibility layer.
Run: pytest tests/model
"""

import pytest
import torch

from moe_lab import config as C
from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed
from moe_lab.model import build_model, build_transformer_config

from ..conftest import TINY_DENSE, TINY_MOE


@pytest.fixture(scope="module")
def world():
    from moe_lab.compat import enable_cpu_compat

    enable_cpu_compat()
    cfg = C.load(TINY_MOE)
    init_distributed(cfg, detect_env({}), use_gpu=False)
    yield
    shutdown_distributed()


def build(path, overrides=()):
    cfg = C.load(path, list(overrides))
    torch.manual_seed(0)
    return cfg, build_model(cfg, build_transformer_config(cfg, use_cpu_initialization=True))


def forward_backward(cfg, model):
    tokens = torch.randint(cfg.model.vocab_size, (2, cfg.training.seq_length))
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    return loss


def test_tiny_moe_structure_matches_qwen2_moe(world):
    cfg, model = build(TINY_MOE)
    assert sum(p.numel() for p in model.parameters()) == C.derive(cfg).total_params
    layer = model.decoder.layers[0]
    assert layer.self_attention.linear_qkv.bias is not None  # QKV bias
    moe = layer.mlp
    assert len(moe.experts.local_experts) == 8 and moe.router.topk == 2
    assert moe.shared_experts.gate_weight.shape == (1, 64)  # sigmoid-gated shared expert
    assert moe.experts.local_experts[0].linear_fc1.weight.shape == (2 * 32, 64)  # SwiGLU
    assert model.rotary_pos_emb is not None
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)


def test_tiny_moe_forward_backward_reaches_every_part(world):
    cfg, model = build(TINY_MOE)
    loss = forward_backward(cfg, model)
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(256.0))) < 0.5
    moe = model.decoder.layers[0].mlp
    for name, param in [("router", moe.router.weight),
                        ("shared gate", moe.shared_experts.gate_weight),
                        ("embedding", model.embedding.word_embeddings.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_tiny_dense_forward_backward(world):
    cfg, model = build(TINY_DENSE)
    assert sum(p.numel() for p in model.parameters()) == C.derive(cfg).total_params
    loss = forward_backward(cfg, model)
    assert torch.isfinite(loss)
    assert model.decoder.layers[0].mlp.linear_fc1.weight.grad.abs().sum() > 0


def test_moe_on_a_subset_of_layers_and_tied_embeddings(world):
    cfg, model = build(TINY_MOE, ["moe.layer_freq=2", "model.tie_embeddings=true"])
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["MLP", "MoELayer", "MLP", "MoELayer"]
    assert model.output_layer.weight is None  # the LM head reuses the embedding
    assert sum(p.numel() for p in model.parameters()) == C.derive(cfg).total_params


def test_norm_topk_prob_renormalises_the_topk_weights(world):
    _, plain = build(TINY_MOE, ["moe.router.norm_topk_prob=false"])
    _, renorm = build(TINY_MOE, ["moe.router.norm_topk_prob=true"])
    x = torch.randn(16, 64)
    probs, routing_map = renorm.decoder.layers[0].mlp.router(x.unsqueeze(1))
    assert torch.allclose(probs.sum(-1), torch.ones(16), atol=1e-5)
    assert (routing_map.sum(-1) == 2).all()
    probs, _ = plain.decoder.layers[0].mlp.router(x.unsqueeze(1))
    assert (probs.sum(-1) < 1).all()  # the k experts' share of the full softmax


def test_cpu_checkpoint_results_queue_is_forked_not_spawned(world):
    """A spawned Manager re-imports torch at every process's first save (~3.5 s each, ~300 s of
    this suite); the CPU layer hands megatron a forked one."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        get_write_results_queue,
    )

    queue = get_write_results_queue()  # megatron's own call, default mode 'spawn'
    assert queue._manager._ctx.get_start_method() == "fork"
    queue.put({"shape": torch.Size([2, 3])})
    assert queue.get(timeout=10) == {"shape": torch.Size([2, 3])}


def test_torch_backend_sorts_tokens_for_one_expert_rank_as_megatrons_dispatcher_does(world):
    """With all experts on this rank the torch backend's MoE layers use LocalTokenDispatcher
    and compute exactly what megatron's alltoall dispatcher computes; routing with a capacity
    keeps megatron's. (That it never waits for the GPU: tests/gpu/test_backends.py.)"""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from moe_lab.experts import LocalTokenDispatcher

    cfg, model = build(TINY_MOE, ["model.backend=torch"])
    _, reference = build(TINY_MOE, ["model.backend=torch"])  # same seed: same weights
    moes = [layer.mlp for layer in model.decoder.layers]
    assert all(isinstance(m.token_dispatcher, LocalTokenDispatcher) for m in moes)
    for m in (layer.mlp for layer in reference.decoder.layers):
        m.token_dispatcher = MoEAlltoAllTokenDispatcher(
            m.num_local_experts, m.local_expert_indices, config=m.config,
            pg_collection=get_default_pg_collection())
    torch.manual_seed(1)
    loss = forward_backward(cfg, model)
    torch.manual_seed(1)
    assert torch.equal(loss, forward_backward(cfg, reference))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name

    _, capped = build(TINY_MOE, ["model.backend=torch", "moe.router.name=expert_choice",
                                 "moe.balance.aux=0"])
    assert isinstance(capped.decoder.layers[0].mlp.token_dispatcher, MoEAlltoAllTokenDispatcher)


def test_fused_swiglu_computes_what_the_unfused_one_does(world):
    """config.bias_activation_fusion (on for GPU training): megatron's fused SwiGLU x prob in
    the torch backend's experts and SwiGLU in the shared expert give the unfused forward and
    backward within bf16 rounding. (On the CPU its torch.compile is off: same formula, eager.)"""
    cfg, model = build(TINY_MOE, ["model.backend=torch", "training.precision=bf16"])
    assert not model.config.bias_activation_fusion  # the CPU path builds it off
    runs = []
    for fused in (False, True):
        model.config.bias_activation_fusion = fused
        model.zero_grad()
        torch.manual_seed(1)
        loss = forward_backward(cfg, model)
        runs.append((loss.item(), {n: p.grad.float().clone()
                                   for n, p in model.named_parameters()}))
    (loss, grads), (fused_loss, fused_grads) = runs
    assert fused_loss == pytest.approx(loss, rel=1e-2)
    for name, grad in grads.items():
        rel = (fused_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert rel < 5e-2, name
    assert any("fc1_weight" in n for n in grads)  # the experts' weights were compared



@pytest.mark.parametrize("recipe, fp8_format", [
    ("tensorwise", "hybrid"), ("delayed", "hybrid"), ("blockwise", "e4m3"), ("mxfp8", "e4m3")])
def test_fp8_recipes_map_to_megatrons_settings(recipe, fp8_format):
    """Each training.fp8_recipe picks megatron's FP8 format and recipe; delayed scaling follows the
    largest amax of 1024 steps (Transformer Engine's default; megatron's is the last step's).
    The config itself needs Transformer Engine: checked on the GPU (docs/performance.md)."""
    from moe_lab.model.build import fp8_fields

    fields = fp8_fields(recipe)
    assert (fields["fp8"], fields["fp8_recipe"]) == (fp8_format, recipe)
    history = (1024, "max") if recipe == "delayed" else (None, None)
    assert (fields.get("fp8_amax_history_len"), fields.get("fp8_amax_compute_algo")) == history
