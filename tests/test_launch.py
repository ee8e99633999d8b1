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


class _Box:
    """Defined in this test file: the ranks load it by path, and what they return must come back as this class."""

    def __init__(self, value):
        self.value = value

    def method(self):
        return self.value


def _box(value):
    return _Box(value)


def _unpicklable_result():
    return lambda: 0


def test_bad_arguments_are_refused_before_any_rank_starts():
    import functools

    for bad in ("2", 2.0, True):
        with pytest.raises(TypeError, match=f"world_size must be an int, got {bad!r}"):
            run_ranks(_identity, bad, 1)
    with pytest.raises(TypeError, match="timeout must be a number of seconds, got '5'"):
        run_ranks(_identity, 1, 1, timeout="5")
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"timeout must be a positive, finite number of seconds .* got {bad}"):
            run_ranks(_identity, 1, 1, timeout=bad)
    for bad in ("foo", "cpu:foo", "cpu:gloo,nccl", ":gloo", 7):
        with pytest.raises(ValueError, match=f"unknown backend {bad!r}"):
            run_ranks(_identity, 1, 1, backend=bad)
    (out,) = run_ranks(_identity, 1, 5, backend="CPU:gloo")  # init_process_group's per-device form
    assert out["x"] == 5 and out["backend"] == "cpu:gloo"
    # Callables a rank cannot find again by name: the instance, the partial's arguments, a builtin's module.
    for fn, what in ((_Box(1).method, "a bound method"), (functools.partial(_identity, 1), "partial"),
                     (len, "builtin_function_or_method")):
        with pytest.raises(TypeError, match=f"run_ranks needs a module-level function, got .*: {what}"):
            run_ranks(fn, 1)
    with pytest.raises(TypeError, match=r"argument 1 of fn \(function\) cannot be sent to the ranks"):
        run_ranks(_identity, 1, 1, lambda: 0)


def test_return_values_come_back_or_are_named():
    """A class defined in the test file comes back as that class; a return value that cannot be pickled is a
    RankError that says so, not a pickling traceback of the launcher."""
    out = run_ranks(_box, 1, 7)
    assert type(out[0]) is _Box and out[0].value == 7
    with pytest.raises(RankError, match="fn returned a function that cannot be sent back to the caller"):
        run_ranks(_unpicklable_result, 1)


def _exit_quietly():
    import os

    if dist.get_rank() == 1:
        os._exit(0)  # no result, no exception, exit code 0
    return dist.get_rank()


def _hang_on_rank_1():
    import time

    if dist.get_rank() == 1:
        time.sleep(600)
    return dist.get_rank()


def test_a_rank_that_exits_with_code_0_early_is_reported_not_waited_for():
    with pytest.raises(RankError) as info:
        run_ranks(_exit_quietly, 2, timeout=30)
    assert info.value.rank == 1 and info.value.exc_type == "ProcessDied"
    assert str(info.value).startswith("rank 1 exited with code 0 before returning a result")


def test_a_hanging_rank_is_named_when_the_timeout_stops_it():
    with pytest.raises(RankError) as info:
        run_ranks(_hang_on_rank_1, 2, timeout=5)
    assert info.value.rank == 1 and info.value.exc_type == "Timeout"
    assert str(info.value) == ("rank 1 did not finish within the 5 s timeout of run_ranks (ranks still running: [1]; "
                               "stopped)")


def _mark_then_hang(folder):
    import pathlib
    import time

    (pathlib.Path(folder) / f"rank{dist.get_rank()}").touch()
    time.sleep(600)


def test_ctrl_c_stops_the_ranks_at_once(tmp_path):
    """A KeyboardInterrupt while the ranks run (Ctrl-C in a notebook or a terminal) kills them: it used to wait 30 s
    for each rank to finish on its own first."""
    import _thread
    import threading
    import time

    interrupted = []

    def interrupt_when_running():
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        interrupted.append(time.monotonic())
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_ranks(_mark_then_hang, 2, str(tmp_path), timeout=300)
    assert time.monotonic() - interrupted[0] < 10


@torch.no_grad()
def _decorated(x):
    return dist.get_rank() + x, torch.is_grad_enabled()


def test_a_decorated_function_runs_on_the_ranks():
    """``functools.wraps`` decorators (``@torch.no_grad()``) keep the function's name and module; its file is found
    through ``inspect.unwrap`` (before: the decorator's file, and AttributeError in every rank)."""
    assert run_ranks(_decorated, 2, 10, timeout=120) == [(10, False), (11, False)]
