"""One GPU: train/grad_accumulation.py's kernel adds bf16 gradients into fp32 main gradients
exactly as torch's add does, faster (and writes a step's first one over the zeroed buffer with
the same values), and in a training model its hooks take over megatron's add.

Run: pytest tests/gpu/test_grad_accumulation.py -s
"""

from ..conftest import TINY_MOE
from .conftest import needs_gpus, report


@needs_gpus(1)
def test_kernel_adds_like_torch_and_faster():
    import torch

    from moe_lab.bench.timing import cuda_event_ms
    from moe_lab.train.grad_accumulation import accumulate

    # shape A's largest gradients (embedding, 60 experts' fc1 and fc2), an odd size, one element
    numels = [151936 * 2048, 60 * 2 * 1408 * 2048, 60 * 1408 * 2048, 4097, 1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    mains = [torch.randn(n, device="cuda", generator=gen) for n in numels]
    grads = [torch.randn(n, device="cuda", generator=gen).bfloat16() for n in numels]
    ref = [m.clone() for m in mains]
    for m, r, g in zip(mains, ref, grads):
        accumulate(m, g)
        r.add_(g)
    equal = all(torch.equal(m, r) for m, r in zip(mains, ref))
    # a step's first gradient is written over the zeroed buffer instead of added to it
    firsts = [torch.zeros_like(m) for m in mains]
    for f, g in zip(firsts, grads):
        accumulate(f, g, overwrite=True)
    first_equal = all(torch.equal(f, torch.zeros_like(f).add_(g)) for f, g in zip(firsts, grads))
    kernel_ms = cuda_event_ms(lambda: [accumulate(m, g) for m, g in zip(mains, grads)])
    overwrite_ms = cuda_event_ms(lambda: [accumulate(f, g, overwrite=True)
                                          for f, g in zip(firsts, grads)])
    torch_ms = cuda_event_ms(lambda: [r.add_(g) for r, g in zip(ref, grads)])
    params = sum(numels)
    report("grad_accumulation_kernel", {
        "params": params, "bit_equal_to_torch_add": equal, "kernel_ms": kernel_ms,
        "torch_add_ms": torch_ms, "kernel_GBps": 10 * params / kernel_ms / 1e6,
        "torch_GBps": 10 * params / torch_ms / 1e6, "first_write_equal_to_add_into_zeros":
        first_equal, "first_write_ms": overwrite_ms,
        "first_write_GBps": 6 * params / overwrite_ms / 1e6})
    assert equal and first_equal
    assert kernel_ms < torch_ms


@needs_gpus(1)
def test_hooks_take_over_megatrons_add_in_a_training_model():
    import torch

    from moe_lab import config as C
    from moe_lab.launch.distributed import detect_env, init_distributed, shutdown_distributed
    from moe_lab.model import build_model, build_transformer_config
    from moe_lab.train.grad_accumulation import fuse_main_grad_accumulation
    from moe_lab.train.loop import build_training
    from moe_lab.train.optim import wrap_ddp

    cfg = C.load(TINY_MOE, ["model.backend=torch", "training.precision=bf16",
                            "tracking.enabled=false"])
    init_distributed(cfg, detect_env({}), use_gpu=True)
    try:
        tokens = torch.randint(cfg.model.vocab_size, (2, cfg.training.seq_length),
                               device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        positions = torch.arange(tokens.shape[1], device="cuda").expand_as(tokens)

        def main_grads(model):
            params = [p for p in model.module.parameters() if p.requires_grad]
            model.zero_grad_buffer()
            model(tokens, positions, None, labels=tokens).float().mean().backward()
            flags = sorted({bool(p.grad_added_to_main_grad) for p in params})
            buffers = [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]
            return buffers, flags, len(params)

        _, trained, _, _ = build_training(cfg, use_gpu=True)
        _, training_flags, _ = main_grads(trained)  # build_training registered the hooks
        config = build_transformer_config(cfg, use_cpu_initialization=False)
        model = wrap_ddp(cfg, config, build_model(cfg, config).cuda())
        plain, plain_flags, params = main_grads(model)  # megatron's own add
        handles = fuse_main_grad_accumulation(model)
        hooked, hooked_flags, _ = main_grads(model)
    finally:
        shutdown_distributed()
    rel = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
              for a, b in zip(hooked, plain))
    report("grad_accumulation_training", {
        "params": params, "hooked": len(handles), "flags (build_training, plain, hooked)": [
            training_flags, plain_flags, hooked_flags], "max_rel_vs_megatron_add": rel})
    assert len(handles) == params
    assert training_flags == hooked_flags == [True] and plain_flags == [False]
    assert rel < 1e-2  # same sums; the backward's own kernels are not bit-deterministic
