"""GPU probe for model/lm_loss.py: the fused LM loss (logits GEMM, loss kernel, both gradient
GEMMs per chunk of tokens) at Qwen's vocabulary for shape A's token counts, timed with several
chunk sizes (`_CHUNK_ELEMENTS`: logits elements per chunk). Prints JSON.

Run on a GPU: python scripts/lm_head_probe.py [--out probe.json]
"""

import argparse
import json

import torch

from moe_lab.bench.timing import cuda_event_ms
from moe_lab.model import lm_loss

VOCAB, HIDDEN = 151936, 2048


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda")).to(torch.bfloat16)
    weight.requires_grad_(True)
    rows = {}
    for tokens in (4096, 8192, 16384):
        hidden = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16,
                             requires_grad=True)
        labels = torch.randint(VOCAB, (tokens,), device="cuda")
        mask = torch.ones(tokens, device="cuda")
        for log2 in (28, 29, 30, 31):
            lm_loss._CHUNK_ELEMENTS = 2 ** log2

            def step():
                loss = lm_loss.LinearCrossEntropy.apply(hidden, weight, labels, mask, True)
                loss.sum().backward()
                hidden.grad = weight.grad = None

            torch.cuda.reset_peak_memory_stats()
            ms = cuda_event_ms(step, repeat=5)
            rows[f"tokens{tokens}_chunk2^{log2}"] = {
                "ms": ms, "chunks": -(-tokens // lm_loss.chunk_size(tokens, VOCAB)),
                "tflops": 6 * tokens * VOCAB * HIDDEN / ms / 1e9,
                "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
            print(tokens, log2, json.dumps(rows[f"tokens{tokens}_chunk2^{log2}"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
