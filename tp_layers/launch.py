"""Run a function on N local ranks, each in its own process with an initialized process group.

Used by ``tpfuse verify`` and by the test suite: gloo on CPU (``file://`` rendezvous in a temporary directory, so
no ports), NCCL when there is one CUDA device per rank. Every rank's return value comes back to the caller (in
rank order); the first rank that raises makes :func:`run_ranks` raise :class:`RankError` with that rank's
traceback, after the remaining ranks are stopped. The process group is destroyed in every rank, also on failure.

Processes come from a ``forkserver`` that has already imported torch (fork of a process that has not run any op
is safe; importing torch once instead of per rank saves ~2 s per launch here), or from ``spawn`` where forkserver
does not exist.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import inspect
import io
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_ranks", "RankError", "default_backend"]

# After the first failure, how long to wait for the other ranks' reports before picking the earliest one (a
# rank's failure makes its peers fail in their next collective a few milliseconds later).
_GRACE_S = 3.0


class RankError(RuntimeError):
    """A rank raised; ``rank``, ``exc_type`` (the exception's class name) and the traceback text are kept."""

    def __init__(self, rank: int, exc_type: str, tb: str):
        # A rank that died (exit code or signal, no Python exception) says so first: it is the root cause of the
        # peers' "connection reset" errors.
        head = f"rank {rank} {tb}" if exc_type == "ProcessDied" else f"rank {rank} raised {exc_type}:\n{tb}"
        super().__init__(head)
        self.rank, self.exc_type, self.tb = rank, exc_type, tb


def _death(exitcode: int) -> str:
    """``died with exit code 7`` / ``died with signal SIGSEGV``."""
    if exitcode < 0:
        try:
            return f"died with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"died with signal {-exitcode}"
    return f"died with exit code {exitcode}"


def default_backend(world_size: int) -> str:
    """``nccl`` when there is a CUDA device per rank, else ``gloo``."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size and torch.distributed.is_nccl_available():
        return "nccl"
    return "gloo"


def _dumps(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _fn_ref(fn: Callable) -> tuple[str, str, str | None]:
    """How a child finds ``fn``: by module name for installed code, by file for test modules (pytest's importlib
    mode does not put them on ``sys.path``)."""
    if "<locals>" in fn.__qualname__ or fn.__qualname__ == "<lambda>":
        raise ValueError(f"run_ranks needs a module-level function, got {fn.__qualname__}")
    module = fn.__module__
    if module.startswith("tpfuse."):
        return module, fn.__qualname__, None
    return module, fn.__qualname__, inspect.getfile(fn)


def _resolve(ref: tuple[str, str, str | None]) -> Callable:
    module_name, qualname, path = ref
    if path is None:
        obj = importlib.import_module(module_name)
    else:
        name = f"_tpfuse_rank_{abs(hash(path))}"
        obj = sys.modules.get(name)
        if obj is None:
            spec = importlib.util.spec_from_file_location(name, path)
            obj = importlib.util.module_from_spec(spec)
            sys.modules[name] = obj
            spec.loader.exec_module(obj)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank, world_size, backend, init_method, timeout_s, threads, ref, payload, results):
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, type(exc).__name__, traceback.format_exc(), time.time()))
        return
    try:
        fn = _resolve(ref)
        args, kwargs = _loads(payload)
        results.put((rank, "ok", _dumps(fn(*args, **kwargs)), time.time()))
    except BaseException as exc:  # noqa: BLE001
        # Time-stamped before this rank tears its group down: the peers' errors that the teardown causes
        # ("connection closed by peer") come later, so the parent can report the root cause.
        results.put((rank, type(exc).__name__, traceback.format_exc(), time.time()))
    finally:
        dist.destroy_process_group()


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        return ctx
    return mp.get_context("spawn")


def run_ranks(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 600.0,
              **kwargs) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ranks ``0..world_size-1``; return the per-rank results in rank order.

    ``fn`` must be a module-level function; arguments and results travel through ``torch.save``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or default_backend(world_size)
    threads = max(1, (os.cpu_count() or 1) // world_size)
    ref = _fn_ref(fn)
    payload = _dumps((args, kwargs))
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tpfuse-rdzv-") as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, backend, init_method, timeout, threads, ref, payload, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        errors: list[tuple[float, RankError]] = []
        deadline = time.monotonic() + timeout
        grace_end = None  # after the first error, wait briefly for the others and report the earliest
        try:
            while len(out) + len(errors) < world_size:
                now = time.monotonic()
                if grace_end is not None and now > grace_end:
                    break
                try:
                    rank, status, data, stamp = results.get(timeout=0.2)
                except queue_mod.Empty:
                    reported = set(out) | {e.rank for _, e in errors}
                    dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
                    if dead:
                        errors.append((time.time(), RankError(dead[0], "ProcessDied",
                                                              _death(procs[dead[0]].exitcode))))
                    elif now > deadline:
                        missing = sorted(set(range(world_size)) - reported)
                        errors.append((time.time(), RankError(-1, "Timeout", f"ranks {missing} did not finish "
                                                                             f"within {timeout:.0f} s")))
                        break
                    if errors and grace_end is None:
                        grace_end = time.monotonic() + _GRACE_S
                    continue
                if status == "ok":
                    out[rank] = _loads(data)
                else:
                    errors.append((stamp, RankError(rank, status, data)))
                    if grace_end is None:
                        grace_end = time.monotonic() + _GRACE_S
        finally:
            for p in procs:
                p.join(timeout=0 if errors else 30)
            killed = set()
            for r, p in enumerate(procs):
                if p.is_alive():
                    p.kill()
                    p.join()
                    killed.add(r)
            results.close()
    if errors:
        # A rank that died without reporting (os._exit, a signal, an abort inside a collective) is the root cause,
        # whenever its death was noticed: its peers fail after it, with "connection reset by peer".
        reported = set(out) | {e.rank for _, e in errors}
        for r, p in enumerate(procs):
            if r not in reported and r not in killed and p.exitcode not in (None, 0):
                errors.append((0.0, RankError(r, "ProcessDied", _death(p.exitcode))))
        died = [e for e in errors if e[1].exc_type == "ProcessDied"]
        error = min(died or errors, key=lambda e: e[0])[1]
        others = [e for _, e in sorted(errors, key=lambda e: e[0]) if e is not error]
        if others and error.exc_type == "ProcessDied":
            error.args = (f"{error.args[0]}; then: " + "; ".join(
                f"rank {e.rank} {e.exc_type}: {e.tb.strip().splitlines()[-1] if e.tb.strip() else ''}"
                for e in others),)
        raise error
    return [out[r] for r in range(world_size)]
