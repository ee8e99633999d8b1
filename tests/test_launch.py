"""The rank launcher used by tests and `tpfuse verify`."""

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import RankError, run_ranks


def _identity(x):
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "x": x, "backend": dist.get_backend()}


def _fail_on(rank_to_fail):
    if dist.get_rank() == rank_to_fail:
        raise KeyError("boom")
    dist.barrier()  # the other ranks block in a collective; the launcher must still come back
    return dist.get_rank()


def test_results_come_back_in_rank_order():
    out = run_ranks(_identity, 3, torch.arange(4))
    assert [o["rank"] for o in out] == [0, 1, 2]
    assert all(o["world"] == 3 and o["backend"] == "gloo" and torch.equal(o["x"], torch.arange(4)) for o in out)


def test_a_failing_rank_is_reported_and_the_next_launch_works():
    with pytest.raises(RankError, match="rank 1 raised KeyError") as info:
        run_ranks(_fail_on, 2, 1)
    assert info.value.rank == 1 and "boom" in info.value.tb
    assert run_ranks(_fail_on, 2, -1) == [0, 1]


def test_rejects_local_functions_and_bad_world_size():
    def local():
        return 0

    with pytest.raises(ValueError, match="module-level function"):
        run_ranks(local, 1)
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        run_ranks(_identity, 0, 1)
