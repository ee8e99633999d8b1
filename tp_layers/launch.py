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
import hashlib
import importlib
import importlib.util
import inspect
import io
import math
import multiprocessing as mp
import numbers
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
# How long a rank's process must have been gone without a report before it counts as dead: a rank puts its report
# in the queue just before it exits, and the report may still be in the pipe when the exit is seen.
_DEATH_CONFIRM_S = 1.0


class RankError(RuntimeError):
    """A rank raised; ``rank``, ``exc_type`` (the exception's class name) and the traceback text are kept."""

    def __init__(self, rank: int, exc_type: str, tb: str):
        # A rank that died (exit code or signal, no Python exception) says so first: it is the root cause of the
        # peers' "connection reset" errors. A timeout names the first rank that did not finish.
        plain = exc_type in ("ProcessDied", "Timeout")
        head = f"rank {rank} {tb}" if plain else f"rank {rank} raised {exc_type}:\n{tb}"
        super().__init__(head)
        self.rank, self.exc_type, self.tb = rank, exc_type, tb


def _death(exitcode: int) -> str:
    """``died with exit code 7`` / ``died with signal SIGSEGV``."""
    if exitcode == 0:  # os._exit(0) in fn (sys.exit is an exception, reported as such)
        return "exited with code 0 before returning a result or raising"
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


def _fn_ref(fn: Callable) -> tuple[str, str, str | None, str | None]:
    """How a child finds ``fn``: by module name for installed code, by file for test modules (pytest's importlib
    mode does not put them on ``sys.path``), loaded there as the module named by the last field."""
    # Only what a child can find again by name: a plain function (or a class's classmethod). A bound method's
    # instance, a partial's arguments or a builtin would not travel, or would be found as something else.
    if not (inspect.isfunction(fn) or (inspect.ismethod(fn) and isinstance(fn.__self__, type))):
        what = "a bound method (its instance cannot travel to the ranks: pass it as an argument)" \
            if inspect.ismethod(fn) else type(fn).__name__
        raise TypeError(f"run_ranks needs a module-level function, got {fn!r}: {what}")
    if "<locals>" in fn.__qualname__ or fn.__qualname__ == "<lambda>":
        raise ValueError(f"run_ranks needs a module-level function, got {fn.__qualname__}")
    module = fn.__module__
    if module.startswith("tpfuse."):
        return module, fn.__qualname__, None, None
    path = inspect.getfile(inspect.unwrap(fn))  # a decorated function's file, not its decorator's
    if not os.path.isfile(path):
        raise ValueError(f"run_ranks needs a module-level function defined in a file the ranks can load, got "
                         f"{fn.__qualname__} from {path} (python -c, a notebook cell): move it into a .py file")
    # The same name in every process (hash() is salted per process): the parent maps it to fn's module, so what
    # a rank returns that is defined in that file (a class, an exception) loads here as the parent's own class.
    alias = "_tpfuse_rank_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    return module, fn.__qualname__, path, alias


def _resolve(ref: tuple[str, str, str | None, str | None]) -> Callable:
    module_name, qualname, path, name = ref
    if path is None:
        obj = importlib.import_module(module_name)
    else:
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
        if "nccl" in backend:  # "nccl" or per device "cpu:gloo,cuda:nccl"
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if world_size > 1:
            # Every rank is through its rendezvous before any starts fn: a rank whose fn returns at once would
            # otherwise tear its group down while a slower peer is still connecting ("connection closed by peer"
            # in the peer's init_process_group).
            dist.barrier(device_ids=[rank] if backend == "nccl" else None)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, type(exc).__name__, traceback.format_exc(), time.time()))
        return
    try:
        fn = _resolve(ref)
        args, kwargs = _loads(payload)
        value = fn(*args, **kwargs)
        try:
            data = _dumps(value)
        except BaseException as exc:  # noqa: BLE001
            results.put((rank, type(exc).__name__, f"fn returned a {type(value).__name__} that cannot be sent back "
                         f"to the caller (results travel through torch.save/pickle): {type(exc).__name__}: {exc}\n"
                         f"{traceback.format_exc()}", time.time()))
            return
        results.put((rank, "ok", data, time.time()))
    except BaseException as exc:  # noqa: BLE001
        # Time-stamped before this rank tears its group down: the peers' errors that the teardown causes
        # ("connection closed by peer") come later, so the parent can report the root cause.
        results.put((rank, type(exc).__name__, traceback.format_exc(), time.time()))
    finally:
        dist.destroy_process_group()


def _last_line(error: RankError) -> str:
    """A reported error in one line: the last line of its traceback (``Type: message``)."""
    last = error.tb.strip().splitlines()[-1] if error.tb.strip() else ""
    return last if last.startswith(error.exc_type) else f"{error.exc_type}: {last}"


def _check_backend(backend: str | None, world_size: int) -> str:
    """The backend to use, checked here rather than as the same error from every rank's init."""
    import torch
    import torch.distributed as dist

    if backend is None:
        return default_backend(world_size)
    known = [b for b in dist.Backend.backend_list if b != "undefined"]
    # One backend, or init_process_group's per-device form "cpu:gloo,cuda:nccl".
    parts = [p.split(":", 1) for p in backend.lower().split(",")] if isinstance(backend, str) else [["?"]]
    names = [p[-1].strip() for p in parts]
    if not all(n in known and (len(p) == 1 or p[0].strip()) for p, n in zip(parts, names)) or (
            len(parts) > 1 and any(len(p) == 1 for p in parts)):
        raise ValueError(f"run_ranks: unknown backend {backend!r}; choose one of {known}, or per device as "
                         "'cpu:gloo,cuda:nccl'")
    backend = backend.lower()
    if "nccl" in names and torch.cuda.device_count() < world_size:
        raise ValueError(f"run_ranks: backend 'nccl' needs one CUDA device per rank: world_size {world_size}, "
                         f"{torch.cuda.device_count()} visible (use 'gloo')")
    return backend


def _payload(args: tuple, kwargs: dict) -> bytes:
    """``(args, kwargs)`` as sent to every rank; an argument that cannot be pickled is named."""
    try:
        return _dumps((args, kwargs))
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
        named = [(f"argument {i} of fn", a) for i, a in enumerate(args)]
        named += [(f"keyword argument {k!r} of fn", v) for k, v in kwargs.items()]
        culprit = "an argument of fn"
        for name, value in named:
            try:
                _dumps(value)
            except Exception:  # noqa: BLE001
                culprit = f"{name} ({type(value).__name__})"
                break
        raise TypeError(f"run_ranks: {culprit} cannot be sent to the ranks (arguments travel through "
                        f"torch.save/pickle): {type(exc).__name__}: {exc}") from exc


def _context():
    methods = mp.get_all_start_methods()
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        # Every rank of the test suite and of `tpfuse verify` builds a diffusers model: importing its transformer
        # modules once in the server instead of in every rank saves ~2.5 s of CPU per rank (a module that is not
        # installed is skipped by the server).
        ctx.set_forkserver_preload(["torch", "torch.distributed", "diffusers.models.transformers.transformer_flux2"])
        return ctx
    return mp.get_context("spawn")


def run_ranks(fn: Callable, world_size: int, *args, backend: str | None = None, timeout: float = 600.0,
              **kwargs) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ranks ``0..world_size-1``; return the per-rank results in rank order.

    ``fn`` must be a module-level function; arguments and results travel through ``torch.save``. ``timeout``
    (seconds) bounds the whole run and each rank's collectives.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral):
        raise TypeError(f"run_ranks: world_size must be an int, got {world_size!r}")
    world_size = int(world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"run_ranks: timeout must be a number of seconds, got {timeout!r}")
    if not math.isfinite(timeout) or timeout <= 0 or timeout > 10**9:
        raise ValueError(f"run_ranks: timeout must be a positive, finite number of seconds (at most 1e9), got "
                         f"{timeout!r}")
    backend = _check_backend(backend, world_size)
    threads = max(1, (os.cpu_count() or 1) // world_size)
    ref = _fn_ref(fn)
    payload = _payload(args, kwargs)
    if ref[3] is not None:
        sys.modules.setdefault(ref[3], inspect.getmodule(fn))  # see _fn_ref
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
        gone: dict[int, float] = {}  # rank -> when its process was first seen exited without a report
        completed = False
        try:
            while len(out) + len(errors) < world_size:
                now = time.monotonic()
                if grace_end is not None and now > grace_end:
                    break
                try:
                    rank, status, data, stamp = results.get(timeout=0.2)
                except queue_mod.Empty:
                    reported = set(out) | {e.rank for _, e in errors}
                    for r, p in enumerate(procs):
                        if r not in reported and p.exitcode is not None:
                            gone.setdefault(r, now)
                    dead = [r for r in sorted(gone) if r not in reported and now - gone[r] >= _DEATH_CONFIRM_S]
                    if dead:
                        errors.append((time.time(), RankError(dead[0], "ProcessDied",
                                                              _death(procs[dead[0]].exitcode))))
                    elif now > deadline:
                        missing = sorted(set(range(world_size)) - reported)
                        errors.append((time.time(), RankError(missing[0], "Timeout", (
                            f"did not finish within the {timeout:g} s timeout of run_ranks (ranks still running: "
                            f"{missing}; stopped)"))))
                        break
                    if errors and grace_end is None:
                        grace_end = time.monotonic() + _GRACE_S
                    continue
                if status == "ok":
                    try:
                        out[rank] = _loads(data)
                    except Exception as exc:  # noqa: BLE001 - e.g. a class the calling process cannot import
                        errors.append((stamp, RankError(rank, type(exc).__name__, (
                            f"fn's return value cannot be loaded in the calling process: {type(exc).__name__}: "
                            f"{exc}\n{traceback.format_exc()}"))))
                        if grace_end is None:
                            grace_end = time.monotonic() + _GRACE_S
                else:
                    errors.append((stamp, RankError(rank, status, data)))
                    if grace_end is None:
                        grace_end = time.monotonic() + _GRACE_S
            completed = not errors
        finally:
            for p in procs:
                # A clean finish lets each rank tear its group down; anything else (an error, Ctrl-C here) kills.
                p.join(timeout=30 if completed else 0)
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
                f"rank {e.rank} {_last_line(e)}" for e in others),)
        raise error
    return [out[r] for r in range(world_size)]
