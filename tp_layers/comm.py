"""Tensor-parallel communication as autograd functions over an explicit process group.

The four regions of Megatron-style tensor parallelism, each the other's transpose:

==========================  =================================  ==================================
function                    forward                            backward
==========================  =================================  ==================================
``copy_to_tp_region``       identity                           all-reduce of the gradient
``reduce_from_tp_region``   all-reduce                         identity
``gather_from_tp_region``   all-gather on the last dim         this rank's slice
``scatter_to_tp_region``    this rank's slice of the last dim  all-gather
==========================  =================================  ==================================

``group=None`` is the default (world) group; a world size of 1 (or no initialized process group) makes every
function the identity. Gather/scatter take an optional packed ``blocks`` layout (see :mod:`.sharding`).

The collectives are PyTorch's functional ones (``_c10d_functional.all_reduce`` / ``all_gather_into_tensor`` +
``wait_tensor``, addressed by the group's name), so ``torch.compile(fullgraph=True)`` traces them as graph nodes
(inductor may reorder them for overlap) and eager code runs them as before.

:func:`comm_stats` counts the bytes each collective moves, so ``tpfuse verify`` reports measured traffic rather
than a formula. It counts eager calls: code traced by ``torch.compile`` records nothing (a Python side effect in a
graph would run once, at trace time), except the row-parallel layer's overlapped all-reduce, which runs inside its
op at every call (and not on a CUDA-graph replay).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .sharding import check_blocks, shard_tensor, unshard_tensors

__all__ = [
    "CommStats",
    "comm_stats",
    "resolve_group",
    "get_rank",
    "get_world_size",
    "copy_to_tp_region",
    "reduce_from_tp_region",
    "gather_from_tp_region",
    "scatter_to_tp_region",
    "all_reduce",
    "group_name",
]


def resolve_group(group=None):
    """A ``ProcessGroup`` from ``None`` (world), a ``ProcessGroup`` or a 1-D ``DeviceMesh``."""
    if group is None:
        return None
    mesh_cls = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_cls is not None and isinstance(group, mesh_cls):
        if group.ndim != 1:
            raise ValueError(f"a tensor-parallel DeviceMesh must be 1-D, got mesh shape {tuple(group.shape)}")
        return group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, int) and not isinstance(group, bool) and group == dist.GroupMember.NON_GROUP_MEMBER:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise ValueError(f"rank {rank} is not a member of the group it was given (dist.new_group returns "
                         "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out): build the tensor-parallel "
                         "layers only on the group's ranks")
    raise TypeError(f"group must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}")


def group_name(group=None) -> str:
    """The name functional collectives and tpfuse's ops address ``group`` by (``""`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    pg = resolve_group(group)
    return (pg if pg is not None else dist.distributed_c10d._get_default_group()).group_name


def process_group(name: str):
    """The ``ProcessGroup`` called ``name`` (see :func:`group_name`)."""
    return dist.distributed_c10d._resolve_process_group(name)


def _uninitialized() -> bool:
    """True when there is no process group, after checking that the launcher did not expect one: under
    ``torchrun -n 2`` without ``init_process_group`` every rank would otherwise keep the full model (a world size of
    1) and nobody would notice."""
    if dist.is_available() and dist.is_initialized():
        return False
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > 1:
        raise RuntimeError(f"WORLD_SIZE={launched} in the environment (a torchrun launch?) but torch.distributed is "
                           "not initialized: call torch.distributed.init_process_group(...) before parallelize, "
                           "from_pretrained or building tensor-parallel layers, or every process keeps the whole "
                           "model. (Unset WORLD_SIZE to run one process on purpose.)")
    return True


def get_world_size(group=None) -> int:
    if _uninitialized():
        return 1
    return dist.get_world_size(resolve_group(group))


def get_rank(group=None) -> int:
    if _uninitialized():
        return 0
    return dist.get_rank(resolve_group(group))


# --------------------------------------------------------------------------------------------------------------
# Traffic accounting
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes and calls per (collective, phase); phase is "forward" or "backward"."""

    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    calls: dict[tuple[str, str], int] = field(default_factory=dict)

    def record(self, op: str, phase: str, nbytes: int) -> None:
        key = (op, phase)
        self.bytes[key] = self.bytes.get(key, 0) + nbytes
        self.calls[key] = self.calls.get(key, 0) + 1

    def total(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(v for (o, p), v in self.bytes.items() if op in (None, o) and phase in (None, p))

    def count(self, op: str | None = None, phase: str | None = None) -> int:
        return sum(v for (o, p), v in self.calls.items() if op in (None, o) and phase in (None, p))


# A plain list, not thread-local: autograd runs CUDA backward on its own worker thread.
_STACK: list[CommStats] = []


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count the payload bytes of every collective issued by this module inside the block.

    The payload is the local tensor handed to the collective (for an all-reduce: the full message, the quantity the
    ring all-reduce volume ``2(N-1)/N * bytes`` is computed from). Backward-pass collectives are counted when
    ``backward()`` runs inside the block.
    """
    stats = CommStats()
    _STACK.append(stats)
    try:
        yield stats
    finally:
        _STACK.remove(stats)


def _record(op: str, phase: str, tensor: torch.Tensor) -> None:
    if not _STACK:
        return
    # Traced code (dynamo, or AOTAutograd tracing a registered backward, which older torch does not report as
    # compiling): a side effect here would run once, at trace time, with symbolic sizes.
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None:
        return
    for stats in _STACK:
        stats.record(op, phase, tensor.numel() * tensor.element_size())


# --------------------------------------------------------------------------------------------------------------
# Raw collectives (no autograd)
# --------------------------------------------------------------------------------------------------------------


def all_reduce_start(tensor: torch.Tensor, name: str, phase: str = "forward") -> torch.Tensor:
    """Launch the sum of ``tensor`` over the group called ``name``; the result is valid after
    :func:`all_reduce_wait` (work issued in between overlaps the collective). A new tensor: the input is never
    modified (autograd may hold it)."""
    tensor = tensor.contiguous()
    _record("all_reduce", phase, tensor)
    return torch.ops._c10d_functional.all_reduce(tensor, "sum", name)


def all_reduce_wait(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ops._c10d_functional.wait_tensor(tensor)


def all_reduce(tensor: torch.Tensor, group=None, phase: str = "forward") -> torch.Tensor:
    """Sum of ``tensor`` over the group, as a new tensor (the input is never modified: autograd may hold it)."""
    if get_world_size(group) == 1:
        return tensor
    return all_reduce_wait(all_reduce_start(tensor, group_name(group), phase))


def _all_gather_last(tensor: torch.Tensor, group, blocks: Sequence[int] | None, phase: str) -> torch.Tensor:
    world_size = get_world_size(group)
    tensor = tensor.contiguous()
    _record("all_gather", phase, tensor)
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(tensor, world_size, group_name(group))
    parts = torch.ops._c10d_functional.wait_tensor(gathered).chunk(world_size, dim=0)  # rank-major on dim 0
    return unshard_tensors(list(parts), dim=-1, blocks=blocks)


def _slice_last(tensor: torch.Tensor, group, blocks: Sequence[int] | None) -> torch.Tensor:
    return shard_tensor(tensor, -1, get_rank(group), get_world_size(group), blocks)


# --------------------------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group, phase="backward"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, blocks):
        ctx.group, ctx.blocks = group, blocks
        return _all_gather_last(x, group, blocks, phase="forward")

    @staticmethod
    def backward(ctx, grad):
        return _slice_last(grad, ctx.group, ctx.blocks), None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, blocks):
        ctx.group, ctx.blocks = group, blocks
        return _slice_last(x, group, blocks)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last(grad, ctx.group, ctx.blocks, phase="backward"), None, None


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward identity; backward all-reduce (the input of a column-parallel layer)."""
    if get_world_size(group) == 1:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Forward all-reduce (sum); backward identity (the output of a row-parallel layer)."""
    if get_world_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group=None, blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Forward all-gather along the last dim (packed ``blocks`` in global sizes); backward this rank's slice."""
    world_size = get_world_size(group)
    if world_size == 1:
        return x
    blocks = check_blocks(blocks, x.shape[-1] * world_size, world_size, what="gathered features")
    return _GatherFromTP.apply(x, group, blocks)


def scatter_to_tp_region(x: torch.Tensor, group=None, blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Forward this rank's slice of the last dim (packed ``blocks``); backward all-gather."""
    world_size = get_world_size(group)
    if world_size == 1:
        return x
    blocks = check_blocks(blocks, x.shape[-1], world_size, what="scattered features")
    return _ScatterToTP.apply(x, group, blocks)
