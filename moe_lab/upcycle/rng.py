"""Seeded random streams: one generator per (seed, layer, purpose).

Each purpose (channel permutations, re-initialisation, router, ...) draws from its own stream,
so changing one setting does not move the others' draws: qwen2 with re-init 0 and with re-init
0.5 under the same seed share the same permutations, and differ only in the re-initialised
channels. Streams are derived by hashing, so they do not depend on the order layers are built.
"""

from __future__ import annotations

import hashlib

import torch

DERIVATION = "first 8 bytes of sha256('{seed}/{layer}/{stream}'), as a 63-bit integer"


def stream_seed(seed: int, layer: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{layer}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, layer: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, layer, stream))
