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


def _die_in_collective(how):
    """Rank 1 dies without a Python exception; rank 0 then fails in the all-reduce it was waiting on."""
    import os
    import signal

    if dist.get_rank() == 1:
        if how == "exit":
            os._exit(7)
        os.kill(os.getpid(), signal.SIGSEGV)
    dist.all_reduce(torch.ones(4))


@pytest.mark.parametrize("how,cause", [("exit", "died with exit code 7"), ("segv", "died with signal SIGSEGV")])
def test_a_rank_that_dies_is_reported_as_the_root_cause(how, cause):
    """Not the survivor's "connection reset by peer": the rank that died comes first, whichever was noticed first."""
    with pytest.raises(RankError) as info:
        run_ranks(_die_in_collective, 2, how, timeout=120)
    assert info.value.rank == 1 and info.value.exc_type == "ProcessDied"
    assert str(info.value).startswith(f"rank 1 {cause}")
