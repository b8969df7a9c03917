"""The numbers a step reads back to the host, copied in one transfer queued before the update.

Reading a GPU tensor (`.item()`, `.cpu()`) waits for everything queued before it. Read one by
one after the backward pass (7 reads a step), they left the GPU idle while the host ran its
Python between them and only then queued the optimizer.
`Readout` packs the step's device numbers into one float64 vector, queues its copy into pinned
host memory and records an event; the trainer then queues the update, and `get()` waits on the
event only, so the host reads while the GPU runs the update.
"""

from __future__ import annotations

import numpy as np
import torch


class Readout:
    def __init__(self, parts: dict[str, torch.Tensor]):
        """parts: name -> a device tensor of any shape (read as float64)."""
        self.shapes = {name: tuple(t.shape) for name, t in parts.items()}
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in parts.values()])
        self.event = None
        if flat.is_cuda:
            self.host = torch.empty(flat.shape, dtype=torch.float64, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat

    def get(self) -> dict[str, np.ndarray]:
        """name -> the numbers, as arrays of the parts' shapes (0-d for scalars)."""
        if self.event is not None:
            self.event.synchronize()
        flat, out, start = self.host.numpy(), {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = flat[start:start + size].reshape(shape)
            start += size
        return out
