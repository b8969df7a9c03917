"""The language-model loss with the output layer and cross-entropy fused (training.cross_entropy).

megatron-core computes the logits [tokens, vocab] with the output layer, upcasts them to fp32 and
takes the cross-entropy in several passes; with Qwen's 151,936-token vocabulary that tensor is the
largest of the step (10 GB at 16k tokens) and the passes over it cost as much GPU time as the
output layer's three GEMMs. Here the tokens go through in chunks: for each chunk the logits GEMM,
one fused pass (a Triton kernel on the GPU) that gives the loss and softmax - one-hot, then the
gradient GEMMs right away, so no logits tensor outlives its chunk. Plugged in through GPTModel's
`output_processor` hook; the output layer's weight and its checkpoint key stay megatron's.

The weight gradient sums over tokens, so forward must know how the caller weights each token's
loss: it weights them by `loss_mask` (ones when absent), and backward scales by the one factor
the caller applied on top. That holds for moe-lab's loss (sum of masked token losses over a token
count); the hidden-state gradient is exact for any upstream gradient.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels; absent, the torch ops run on the GPU too
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Tokens per chunk so that one chunk's logits hold about this many elements (2 GiB in bf16):
# fewer, larger gradient GEMMs. scripts/lm_head_probe.py on an H200 at Qwen's vocabulary:
# 4,096 tokens 12.6 ms against 13.1 with 2**29, 16,384 tokens 49.1 against 51.6 (+1.9 GB).
_CHUNK_ELEMENTS = 2**30


def fused_lm_loss(*, hidden_states, output_layer, output_weight, labels, loss_mask=None, **_):
    """GPTModel output_processor: [s, b, h] hidden states -> [b, s] fp32 token losses."""
    if labels is None:
        raise ValueError("training.cross_entropy=fused_linear computes a loss; it needs labels")
    weight = output_layer.weight if output_weight is None else output_weight
    s, b, h = hidden_states.shape
    labels_sb = labels.t().reshape(-1)  # token order of the flattened [s, b] hidden states
    mask = (torch.ones_like(labels_sb, dtype=torch.float32) if loss_mask is None
            else loss_mask.t().reshape(-1).float())
    # Under no_grad (validation) only the loss: parameters still say requires_grad there.
    loss = LinearCrossEntropy.apply(hidden_states.reshape(s * b, h), weight, labels_sb, mask,
                                    torch.is_grad_enabled())
    return loss.view(s, b).t()


def linear_cross_entropy_reference(hidden, weight, labels):
    """The unfused computation, for tests: fp32 cross-entropy of hidden @ weight.T."""
    return torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), labels,
                                             reduction="none")


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, with_grads: bool = True):
        n, vocab = hidden.shape[0], weight.shape[0]
        want_hidden = with_grads and ctx.needs_input_grad[0]
        want_weight = with_grads and ctx.needs_input_grad[1]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None  # fp32, summed over chunks
        loss_and_grad = _chunk_kernel(hidden.is_cuda)
        step = chunk_size(n, vocab)
        for start in range(0, n, step):
            end = min(n, start + step)
            h = hidden[start:end]
            logits = h @ weight.t()
            if not (want_hidden or want_weight):
                loss[start:end] = _loss_only(logits, labels[start:end])
                continue
            loss[start:end], grad_logits = loss_and_grad(logits, labels[start:end])
            del logits
            if want_hidden:
                grad_hidden[start:end] = grad_logits @ weight
            if want_weight:
                weighted = h * mask[start:end, None].to(h.dtype)
                grad_weight = _add_product(grad_weight, grad_logits.t(), weighted)
        if want_weight and grad_weight is None:  # no tokens
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None
                              else grad_weight.to(weight.dtype), mask)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, mask = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss[:, None].to(grad_hidden.dtype)
        if grad_weight is not None:
            # The caller's factor on the masked tokens (see the module docstring).
            scale = (grad_loss * mask).sum() / mask.sum().clamp(min=1.0)
            grad_weight = grad_weight * scale.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _add_product(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 (acc None: a @ b) for bf16 a and b. On CUDA the GEMM itself writes
    and accumulates fp32 (cuBLAS's out_dtype): no bf16 product and no separate add over the
    [vocab, hidden] weight gradient per chunk (torch's add of two dtypes is unvectorised)."""
    if a.is_cuda:
        if acc is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    product = (a @ b).float()
    return product if acc is None else acc.add_(product)


def chunk_size(tokens: int, vocab: int) -> int:
    chunks = max(1, -(-tokens * vocab // _CHUNK_ELEMENTS))
    return -(-tokens // chunks)


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor):
    """Token losses (fp32) and d loss / d logits = softmax - one-hot (in the logits' dtype)."""
    x = logits.float()
    loss, lse = _token_loss(x, labels)
    one_hot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    grad = torch.exp(x - lse[:, None]) - one_hot.float()
    return loss, grad.to(logits.dtype)


def _loss_only(logits, labels):
    return _token_loss(logits.float(), labels)[0]


def _token_loss(x, labels):
    """fp32 logits -> token losses and their logsumexp."""
    lse = torch.logsumexp(x, dim=-1)
    return lse - x.gather(1, labels[:, None]).squeeze(1), lse


def _chunk_kernel(cuda: bool):
    """On the GPU (with Triton) one kernel per chunk: two passes over each row of bf16 logits;
    on the CPU the torch ops above."""
    return _loss_and_grad_rows if cuda and triton is not None else _loss_and_grad


# Logits per step of the row loops (8 KB of bf16) and warps per row: chosen, not swept.
ROW_BLOCK, ROW_WARPS = 4096, 8


def _loss_and_grad_rows(logits: torch.Tensor, labels: torch.Tensor):
    """`_loss_and_grad` as one Triton kernel, a program per row: the logsumexp in one pass (a
    running max and a sum of exponentials rescaled when the max grows), then softmax - one-hot
    written in a second: 0.78 ms for a chunk of shape A (3,277 x 151,936) on an H200 against
    1.13 ms for torch.compile's kernel of the same arithmetic, used before (docs/performance.md)."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits)
    _loss_and_grad_kernel[(rows,)](logits, labels, loss, grad, VOCAB=vocab, BLOCK=ROW_BLOCK,
                                   num_warps=ROW_WARPS)
    return loss, grad


if triton is not None:

    @triton.jit
    def _loss_and_grad_kernel(logits_ptr, labels_ptr, loss_ptr, grad_ptr,
                              VOCAB: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = logits_ptr + row * VOCAB
        g_row = grad_ptr + row * VOCAB
        label = tl.load(labels_ptr + row)
        top = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
        total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, VOCAB, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + offsets, mask=offsets < VOCAB, other=float("-inf"))
            x = x.to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top = new_top
        lse = top + tl.log(total)
        tl.store(loss_ptr + row, lse - tl.load(x_row + label).to(tl.float32))
        for start in range(0, VOCAB, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < VOCAB
            x = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offsets == label, 1.0, 0.0)
            tl.store(g_row + offsets, g.to(grad_ptr.dtype.element_ty), mask=mask)
