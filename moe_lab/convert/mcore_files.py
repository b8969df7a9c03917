"""Megatron dist checkpoints, element by element: fill a model's shard, list and read elements.

Writing goes through the model's own `sharded_state_dict()`: each rank's ShardedTensors say
which part of which global tensor its parameters hold (tensor-parallel slices, SwiGLU halves,
its experts, its pipeline stage), so one routine fills any layout, and megatron's
`dist_checkpointing.save` writes the same layout-free checkpoint that training writes. Reading
asks dist_checkpointing for one element at a time (a plain leading axis of size 1 per stacked
axis, which megatron reads as a partial load), so memory holds a batch of elements, never the
checkpoint.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)

from moe_lab.convert.errors import ConversionError
from moe_lab.convert.mcore_keys import element_name, elements, stacked_axes
from moe_lab.convert.tensors import TensorMap

# Keys of the optimizer state in a training checkpoint (megatron's ChainedOptimizer, used when
# expert parallelism splits the parameters, prefixes `chained_N.`); the rest are model tensors.
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


@dataclass(frozen=True)
class ElementRef:
    """Where one element lives in a checkpoint."""

    key: str
    indices: tuple[int, ...]
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.tensor([], dtype=self.dtype).element_size()


# ---- writing: a model's shard from elements -----------------------------------------------


def fill_model(model, maps: list[TensorMap], element: Callable[[TensorMap], torch.Tensor],
               architecture: str) -> int:
    """Copy into every parameter of this rank's model its part of the element that `element`
    returns (megatron layout, full size). Returns the number of elements used. Raises if a
    model tensor has no mapping or a parameter was left unwritten."""
    by_name = {name: tm for tm in maps for name in (tm.mcore, *tm.mcore_aliases)}
    filled, used = set(), set()
    with torch.no_grad():
        for local_name, item in model.sharded_state_dict().items():
            if isinstance(item, ShardedObject):  # per-module extra state, no weights
                continue
            for piece in _built(item):
                n = piece.prepend_axis_num
                assert len(stacked_axes(piece.key)) == n, (piece.key, n)
                name = element_name(piece.key, piece.global_offset[:n])
                if name not in by_name:
                    raise ConversionError(f"{name}: the moe-lab model has this tensor but the "
                                          f"{architecture} mapping does not")
                full = element(by_name[name])
                region = tuple(slice(offset, offset + size) for offset, size
                               in zip(piece.global_offset[n:], piece.local_shape))
                piece.data.copy_(full[region])
                used.add(by_name[name].mcore)
            filled.add(local_name)
    unwritten = [name for name, _ in model.named_parameters() if name not in filled]
    if unwritten:
        raise ConversionError(f"{unwritten[0]}: model parameter left unwritten by the "
                              f"{architecture} mapping")
    return len(used)


def _built(item) -> Iterable[ShardedTensor]:
    """The ShardedTensors of a state-dict entry; factories (SwiGLU halves) built into views
    of the parameter, so writing them writes the parameter."""
    if isinstance(item, ShardedTensorFactory):
        item = item.build()
    if isinstance(item, ShardedTensor):
        return [item]
    if isinstance(item, dict):
        item = list(item.values())
    return [piece for sub in item for piece in _built(sub)]


def save_model(model, directory: Path) -> None:
    """Weights only, in the format `moe_lab.train.checkpoint.load_checkpoint(dir, model)` reads."""
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory))


# ---- reading: elements of a checkpoint ----------------------------------------------------


def checkpoint_elements(directory: Path) -> dict[str, ElementRef]:
    """Every model element of a dist checkpoint (optimizer state left out), from its metadata."""
    try:
        with warnings.catch_warnings():
            # torch warns that no process group exists yet; reading metadata needs none.
            warnings.simplefilter("ignore", UserWarning)
            metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    except Exception as err:  # megatron raises CheckpointingException, FileNotFoundError, ...
        raise ConversionError(f"{directory}: not a readable megatron dist checkpoint "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                              ) from None
    refs = {}
    for key, tensor in metadata.items():
        if _OPTIMIZER_KEY.match(key):
            continue
        global_shape = tuple(tensor.global_shape)
        for name, indices, shape in elements(key, global_shape):
            refs[name] = ElementRef(key, indices, shape, global_shape, tensor.dtype)
    return refs


def load_elements(directory: Path, refs: dict[str, ElementRef]) -> dict[str, torch.Tensor]:
    """Read the given elements (and nothing else) from the checkpoint."""
    request = {}
    for name, ref in refs.items():
        lead = len(ref.indices)
        data = torch.empty((1,) * lead + ref.shape, dtype=ref.dtype)
        offsets = [(axis, index, ref.global_shape[axis]) for axis, index in enumerate(ref.indices)]
        request[name] = ShardedTensor.from_rank_offsets(ref.key, data, *offsets, replica_id=0)
    loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    return {name: loaded[name].reshape(refs[name].shape) for name in refs}
