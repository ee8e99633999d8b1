"""Pure sharding helpers: no process group involved."""

import pytest
import torch

from tpfuse.tp_layers.sharding import check_blocks, divide, local_blocks, shard_ranges, shard_tensor, unshard_tensors


def test_divide():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="heads=10 is not divisible by the world size 4"):
        divide(10, 4, "heads")
    with pytest.raises(ValueError, match="world size must be positive, got 0"):
        divide(10, 0)


def test_check_blocks_defaults_and_errors():
    assert check_blocks(None, 12, 4) == [12]
    assert check_blocks((4, 8), 12, 2) == [4, 8]
    with pytest.raises(ValueError, match=r"sum to 11, but the dimension has 12"):
        check_blocks([4, 7], 12, 1)
    with pytest.raises(ValueError, match=r"block size\(s\) \[6\] not divisible by the world size 4"):
        check_blocks([8, 6], 14, 4)
    with pytest.raises(ValueError, match="must be positive"):
        check_blocks([0, 12], 12, 1)
    with pytest.raises(ValueError, match="must not be empty"):
        check_blocks([], 0, 1)


def test_shard_ranges_packed():
    # [Q, K, V, gate, up] with D=4, M=6 on 2 ranks: each rank takes half of every block.
    blocks = [4, 4, 4, 6, 6]
    assert shard_ranges(blocks, 0, 2) == [(0, 2), (4, 6), (8, 10), (12, 15), (18, 21)]
    assert shard_ranges(blocks, 1, 2) == [(2, 4), (6, 8), (10, 12), (15, 18), (21, 24)]
    assert local_blocks(blocks, 2) == [2, 2, 2, 3, 3]
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        shard_ranges(blocks, 2, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_unshard_roundtrip(world_size, dim):
    blocks = [6, 12, 6]
    shape = [24, 5] if dim == 0 else [5, 24]
    t = torch.arange(120.0).reshape(shape)
    shards = [shard_tensor(t, dim, r, world_size, blocks) for r in range(world_size)]
    assert all(s.shape[dim] == 24 // world_size for s in shards)
    assert torch.equal(unshard_tensors(shards, dim, blocks), t)


def test_shard_tensor_is_blockwise_not_contiguous():
    # A contiguous split of a packed weight is the classic bug: rank 0 would get all of block 0.
    t = torch.arange(8.0)
    assert shard_tensor(t, 0, 0, 2, [4, 4]).tolist() == [0.0, 1.0, 4.0, 5.0]
    assert shard_tensor(t, 0, 1, 2, [4, 4]).tolist() == [2.0, 3.0, 6.0, 7.0]
    assert shard_tensor(t, 0, 1, 2).tolist() == [4.0, 5.0, 6.0, 7.0]


def test_shard_tensor_owns_storage_and_works_on_meta():
    t = torch.arange(8.0)
    s = shard_tensor(t, 0, 0, 2)
    s.zero_()
    assert t[0] == 0 and t[1] == 1  # the dense tensor is untouched
    m = torch.empty(12, 3, device="meta")
    assert shard_tensor(m, 0, 1, 3, [6, 6]).shape == (4, 3)


def test_unshard_rejects_mismatched_shards():
    with pytest.raises(ValueError, match="different shapes"):
        unshard_tensors([torch.zeros(2, 3), torch.zeros(2, 4)], -1)
    with pytest.raises(ValueError, match="at least one shard"):
        unshard_tensors([], 0)
