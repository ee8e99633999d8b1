"""Sharding as data: which slice of a (possibly packed) feature dimension belongs to which rank.

A *packed* dimension is the concatenation of several logical blocks, e.g. FLUX.2's single-stream projection
``to_qkv_mlp_proj`` has output features ``[Q | K | V | gate | up]`` = blocks ``[D, D, D, M, M]``. Splitting such a
dimension contiguously would hand rank 0 all of Q and half of K; the correct tensor-parallel shard is rank ``r``'s
``1/N`` slice *of every block*, concatenated in block order. Everything here is a pure function of sizes (and, for
:func:`shard_tensor` / :func:`unshard_tensors`, tensors) so it is tested on its own, without any process group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "check_blocks",
    "local_blocks",
    "shard_ranges",
    "shard_tensor",
    "unshard_tensors",
    "divide",
]


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator``, raising when it does not divide exactly."""
    if denominator <= 0:
        raise ValueError(f"world size must be positive, got {denominator}")
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by the world size {denominator}")
    return numerator // denominator


def check_blocks(blocks: Sequence[int] | None, total: int, world_size: int, what: str = "features") -> list[int]:
    """Validate a packed layout and return it as a list (``None`` means one block of ``total``).

    Raises ``ValueError`` naming the offending values when the blocks do not sum to ``total`` or a block does not
    divide by ``world_size``.
    """
    if blocks is None:
        blocks = [total]
    blocks = [int(b) for b in blocks]
    if not blocks:
        raise ValueError(f"blocks for {what} must not be empty")
    if any(b <= 0 for b in blocks):
        raise ValueError(f"blocks for {what} must be positive, got {blocks}")
    if sum(blocks) != total:
        raise ValueError(f"blocks {blocks} for {what} sum to {sum(blocks)}, but the dimension has {total}")
    bad = [b for b in blocks if b % world_size != 0]
    if bad:
        raise ValueError(
            f"blocks {blocks} for {what}: block size(s) {bad} not divisible by the world size {world_size}"
        )
    return blocks


def local_blocks(blocks: Sequence[int], world_size: int) -> list[int]:
    """Per-rank block sizes of a packed dimension: ``[b // world_size for b in blocks]``."""
    return [divide(b, world_size, "block") for b in blocks]


def shard_ranges(blocks: Sequence[int], rank: int, world_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` in the packed (global) coordinates that rank ``rank`` owns, one per block."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    ranges = []
    offset = 0
    for b in blocks:
        per = divide(b, world_size, "block")
        ranges.append((offset + rank * per, offset + (rank + 1) * per))
        offset += b
    return ranges


def shard_tensor(
    tensor: torch.Tensor, dim: int, rank: int, world_size: int, blocks: Sequence[int] | None = None
) -> torch.Tensor:
    """Rank ``rank``'s shard of ``tensor`` along ``dim``: its slice of every block, concatenated in order.

    Works on ``meta`` tensors too (only shapes). Returns a new contiguous tensor (never a view of the dense one,
    so the dense weight can be freed).
    """
    dim = dim % tensor.dim()
    blocks = check_blocks(blocks, tensor.shape[dim], world_size, what=f"dim {dim} of a tensor of shape "
                                                                     f"{tuple(tensor.shape)}")
    pieces = [tensor.narrow(dim, start, stop - start) for start, stop in shard_ranges(blocks, rank, world_size)]
    return torch.cat(pieces, dim=dim).contiguous() if len(pieces) > 1 else pieces[0].contiguous().clone()


def unshard_tensors(shards: Sequence[torch.Tensor], dim: int, blocks: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: rebuild the dense tensor from every rank's shard (rank order).

    ``blocks`` are the *global* block sizes (``None``: one block).
    """
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("unshard_tensors needs at least one shard")
    dim = dim % shards[0].dim()
    local_total = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"shards have different shapes: {[tuple(s.shape) for s in shards]}")
    blocks = check_blocks(blocks, local_total * world_size, world_size)
    per_rank = [s.split(local_blocks(blocks, world_size), dim=dim) for s in shards]
    return torch.cat([per_rank[r][i] for i in range(len(blocks)) for r in range(world_size)], dim=dim)
