"""The four communication regions, forward and backward, on 1, 2 and 4 gloo ranks.

Values are small integers in float64, so every sum is exact and the comparisons are equalities.
"""

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import (
    comm_stats,
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    run_ranks,
    scatter_to_tp_region,
)
from tpfuse.tp_layers.sharding import shard_tensor

WORLD_SIZES = [1, 2, 4]


def _rank_tensor(rank, *shape):
    return (torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float64).reshape(shape) + 100 * rank)


def _copy(world_size):
    rank = dist.get_rank()
    x = _rank_tensor(0, 3, 8).requires_grad_()
    y = copy_to_tp_region(x)
    assert torch.equal(y, x)
    grad = _rank_tensor(rank, 3, 8)
    with comm_stats() as stats:
        y.backward(grad)
    expected = sum(_rank_tensor(r, 3, 8) for r in range(world_size))
    assert torch.equal(x.grad, expected)
    assert stats.total("all_reduce", "backward") == (0 if world_size == 1 else 3 * 8 * 8)
    return x.grad


def _reduce(world_size):
    rank = dist.get_rank()
    x = _rank_tensor(rank, 2, 5).requires_grad_()
    x_before = x.detach().clone()
    with comm_stats() as stats:
        y = reduce_from_tp_region(x)
    assert torch.equal(y, sum(_rank_tensor(r, 2, 5) for r in range(world_size)))
    assert torch.equal(x.detach(), x_before)  # the input is never reduced in place
    assert stats.count("all_reduce", "forward") == (0 if world_size == 1 else 1)
    grad = torch.randn(2, 5, dtype=torch.float64)
    y.backward(grad)
    assert torch.equal(x.grad, grad)
    return y.detach()


def _gather(world_size, blocks):
    rank = dist.get_rank()
    full = _rank_tensor(0, 2, 24)
    local = shard_tensor(full, -1, rank, world_size, blocks).requires_grad_()
    y = gather_from_tp_region(local, blocks=blocks)
    assert torch.equal(y, full)  # dense feature order, also for a packed layout
    grad = _rank_tensor(7, 2, 24)
    y.backward(grad)
    assert torch.equal(local.grad, shard_tensor(grad, -1, rank, world_size, blocks))
    return y.detach()


def _scatter(world_size, blocks):
    rank = dist.get_rank()
    full = _rank_tensor(0, 2, 24).requires_grad_()
    y = scatter_to_tp_region(full, blocks=blocks)
    assert torch.equal(y, shard_tensor(full.detach(), -1, rank, world_size, blocks))
    # Each rank's gradient is its own slice of one global gradient; backward gathers it back.
    g_full = _rank_tensor(3, 2, 24)
    y.backward(shard_tensor(g_full, -1, rank, world_size, blocks))
    assert torch.equal(full.grad, g_full)
    return y.detach()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_copy_to_tp_region(world_size):
    grads = run_ranks(_copy, world_size, world_size)
    assert all(torch.equal(g, grads[0]) for g in grads)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_reduce_from_tp_region(world_size):
    outs = run_ranks(_reduce, world_size, world_size)
    assert all(torch.equal(o, outs[0]) for o in outs)  # replicated, bitwise


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("blocks", [None, [8, 16]])
def test_gather_from_tp_region(world_size, blocks):
    outs = run_ranks(_gather, world_size, world_size, blocks)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("blocks", [None, [8, 16]])
def test_scatter_to_tp_region(world_size, blocks):
    outs = run_ranks(_scatter, world_size, world_size, blocks)
    assert len({tuple(o.shape) for o in outs}) == 1


def test_without_process_group_everything_is_identity():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, requires_grad=True)
    for fn in (copy_to_tp_region, reduce_from_tp_region, gather_from_tp_region, scatter_to_tp_region):
        assert fn(x) is x


def _bad_scatter():
    scatter_to_tp_region(torch.zeros(2, 5))


def test_scatter_rejects_indivisible_width():
    with pytest.raises(Exception, match=r"block size\(s\) \[5\] not divisible by the world size 2"):
        run_ranks(_bad_scatter, 2)
