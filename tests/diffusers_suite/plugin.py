"""pytest plugin: run diffusers' own tests with every model of a tpfuse family's class (``Flux2Transformer2DModel``
by default) parallelized by tpfuse.

Loaded with ``-p plugin`` (``run.py`` puts this folder on ``PYTHONPATH``). With ``--tpfuse-mode=parallel`` (the
default) every instance of the diffusers class named by ``--tpfuse-class`` (default ``Flux2Transformer2DModel``;
repeatable, e.g. ``--tpfuse-class=QwenImageTransformer2DModel``) that a test builds is handed to
``tpfuse.tp_layers.parallelize`` before the test sees it:

- built directly or through ``from_config``: right after ``__init__``;
- loaded with ``from_pretrained`` (also by a pipeline's ``from_pretrained``) or ``from_single_file``: diffusers
  builds the model inside the loader (on the ``meta`` device with ``low_cpu_mem_usage``), so ``__init__`` does not
  parallelize while a loader of this class is running (a per-thread depth counter); the loader returns the dense
  model with its weights, and that is parallelized.

Under ``torchrun`` (``WORLD_SIZE`` >= 2) the plugin initialises a gloo process group from torchrun's environment
when pytest configures (with ``--tpfuse-pg-timeout``, so that ranks that fall out of step fail instead of hanging)
and destroys it at the end; each rank gets its own ``--basetemp``. Every rank runs the same tests in the same order.
transformers' models (the pipelines' text encoders) save, and diffusers logs, on every rank, unless
``--tpfuse-rank0-only`` (see :func:`_every_rank_as_one`).

Every test starts from ``torch.manual_seed(--tpfuse-seed)`` (default 0) on every rank, in every mode: torch seeds
each process differently, and a test that builds a model without seeding would otherwise give each rank different
weights. ``--tpfuse-mode=dense`` patches nothing else (the dense baseline). ``--tpfuse-results=FILE`` writes one JSON
line per test (outcome, phase, duration, skip reason or the error's last lines, and how many models the test
parallelized); at world size >= 2 each rank writes ``FILE`` with ``.rankN`` inserted before the suffix.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

_local = threading.local()  # depth of loaders of a patched class running in this thread
_counts = {"parallelized": 0}  # models parallelized since the current test started
_MISSING = object()
_patched: list[tuple[type, str, object]] = []  # (class, attribute, original or _MISSING) to restore at unconfigure
_config = None  # pytest's config, for the report hooks


def pytest_addoption(parser) -> None:
    group = parser.getgroup("tpfuse", "diffusers' tests on tpfuse-parallelized models")
    group.addoption("--tpfuse-mode", choices=("parallel", "dense"), default="parallel",
                    help="parallel: parallelize every model of the --tpfuse-class classes (default); dense: "
                         "patch nothing")
    group.addoption("--tpfuse-class", action="append", default=None, metavar="NAME",
                    help="a diffusers model class to parallelize (repeatable; default: Flux2Transformer2DModel)")
    group.addoption("--tpfuse-results", default=None, help="write one JSON line per test to this file")
    group.addoption("--tpfuse-pg-timeout", type=float, default=300.0,
                    help="seconds before a collective that a peer never joins fails (world size >= 2)")
    group.addoption("--tpfuse-seed", type=int, default=0,
                    help="torch.manual_seed at the start of every test, on every rank (-1: leave the RNG alone)")
    group.addoption("--tpfuse-rank0-only", action="store_true",
                    help="world size >= 2: keep transformers' saving and diffusers' logging on rank 0 only (default: "
                         "every rank saves and logs, as diffusers' tests, run whole on every rank, need)")


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _loading() -> int:
    return getattr(_local, "depth", 0)


def _dense_class(cls: type) -> type:
    """``cls`` itself, or for one of tpfuse's parallelized flavours the diffusers class it derives from (a fresh
    instance of the flavour class is a dense model; parallelize builds the flavour from the dense class)."""
    from tpfuse.tp_layers.model import TPModelMixin

    if not issubclass(cls, TPModelMixin):
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, TPModelMixin) and c.__name__ == cls.__name__)


def _parallelize(model) -> None:
    from tpfuse.tp_layers import parallelize

    if hasattr(model, "tp_world_size"):  # set by parallelize
        return
    model.__class__ = _dense_class(type(model))
    parallelize(model)
    _counts["parallelized"] += 1


def _patch(cls: type, name: str, value) -> None:
    _patched.append((cls, name, cls.__dict__.get(name, _MISSING)))
    setattr(cls, name, value)



def _install(cls: type) -> None:
    init = cls.__init__

    @functools.wraps(init)  # __wrapped__ keeps diffusers' signature introspection (config keys) working
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not _loading():  # inside a loader the model is (maybe) on meta: the loader's result is parallelized
            _parallelize(self)

    _patch(cls, "__init__", __init__)

    def wrap_loader(name: str) -> None:
        loader = getattr(cls, name).__func__  # the classmethod's function (ModelMixin's / the single-file mixin's)

        @functools.wraps(loader)
        def load(klass, *args, **kwargs):
            _local.depth = _loading() + 1
            try:
                out = loader(_dense_class(klass), *args, **kwargs)
            finally:
                _local.depth -= 1
            if not _loading():
                _parallelize(out[0] if isinstance(out, tuple) else out)  # output_loading_info=True: (model, info)
            return out

        _patch(cls, name, classmethod(load))

    for name in ("from_pretrained", "from_single_file"):
        if hasattr(cls, name):
            wrap_loader(name)


def _every_rank_as_one() -> None:
    """Under torch.distributed, transformers (5.x) writes a model only on global rank 0
    (``DistributedMixin.should_save_on_this_rank``) and diffusers logs only on rank 0 (``_RankZeroFilter``). diffusers'
    tests run whole on every rank: each saves into a temporary folder of its own and captures its own log. So rank 1
    would find its text encoder folder empty, or miss the warning a test asserts, and fail at a point rank 0 passes —
    leaving the ranks out of step in tpfuse's collectives for the rest of the test and the tests after it (the
    ``dense2`` run, nothing parallelized, shows these failures are the libraries' own). Neither concerns what is
    tensor-parallel: every rank writes its own folder (``is_main_process`` still applies) and logs, as at world size
    1."""
    try:
        from transformers.distributed.mixin import DistributedMixin
    except ImportError:  # older transformers: every rank saves already
        pass
    else:
        _patch(DistributedMixin, "should_save_on_this_rank", lambda self, is_main_process: is_main_process)
    from diffusers.utils import logging as diffusers_logging

    if hasattr(diffusers_logging, "_RankZeroFilter"):
        _patch(diffusers_logging._RankZeroFilter, "filter", lambda self, record: True)


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin reads --basetemp
def pytest_configure(config) -> None:
    global _config
    _config = config
    rank, world = _world()
    if world > 1:
        if config.option.basetemp is None:  # two ranks in one pytest base folder would clean each other's up
            config.option.basetemp = tempfile.mkdtemp(prefix=f"tpfuse-diffusers-rank{rank}-")
        import torch.distributed as dist

        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=config.getoption("--tpfuse-pg-timeout"))
            dist.init_process_group("gloo", timeout=timeout)
            config._tpfuse_owns_group = True
    results = config.getoption("--tpfuse-results")
    if results:
        path = Path(results)
        if world > 1:
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        config._tpfuse_results = path.open("w", buffering=1)
        config._tpfuse_reports = {}
    if world > 1 and not config.getoption("--tpfuse-rank0-only"):
        _every_rank_as_one()
    if config.getoption("--tpfuse-mode") == "parallel":
        import diffusers

        for name in config.getoption("--tpfuse-class") or ["Flux2Transformer2DModel"]:
            _install(getattr(diffusers, name))  # AttributeError: this diffusers has no such class


def pytest_unconfigure(config) -> None:
    while _patched:
        cls, name, original = _patched.pop()
        if original is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    out = getattr(config, "_tpfuse_results", None)
    if out is not None:
        out.close()
    if getattr(config, "_tpfuse_owns_group", False):
        import torch.distributed as dist

        try:
            dist.barrier()  # every rank done before any tears the group down
        finally:
            dist.destroy_process_group()


def pytest_runtest_logstart(nodeid, location) -> None:
    _counts["parallelized"] = 0


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures
def pytest_runtest_setup(item) -> None:
    # torch seeds each process differently, and some of diffusers' tests build a model without seeding: at world size
    # 2 the ranks would build different weights, which parallelize refuses (WeightMismatchError), as it should. Every
    # test (every run, dense too, so that the runs draw the same numbers) starts from the same seed; a test's own
    # torch.manual_seed calls apply on top.
    seed = item.config.getoption("--tpfuse-seed")
    if seed >= 0:
        import torch

        torch.manual_seed(seed)


def pytest_runtest_logreport(report) -> None:
    reports = getattr(_config, "_tpfuse_reports", None)
    if reports is not None:
        reports.setdefault(report.nodeid, []).append(report)


def _summarise(reports) -> dict:
    """One test's outcome from its setup/call/teardown reports, as pytest's summary counts it."""
    outcome, phase, detail, duration = "passed", "call", "", 0.0
    for r in reports:
        duration += r.duration
        if r.failed:
            if outcome in ("passed", "skipped"):
                outcome, phase = ("failed" if r.when == "call" else "error"), r.when
                text = str(r.longrepr)
                detail = "\n".join(text.rstrip().splitlines()[-25:])
        elif r.skipped and outcome == "passed":
            if hasattr(r, "wasxfail"):
                outcome, detail = "xfailed", r.wasxfail
            else:
                outcome, phase = "skipped", r.when
                detail = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        elif r.passed and hasattr(r, "wasxfail") and r.when == "call":
            outcome = "xpassed"
    return {"outcome": outcome, "phase": phase, "duration": round(duration, 3), "detail": detail}


def pytest_runtest_logfinish(nodeid, location) -> None:
    out = getattr(_config, "_tpfuse_results", None)
    if out is None:
        return
    rank, world = _world()
    line = {"nodeid": nodeid, "rank": rank, "world_size": world, "mode": _config.getoption("--tpfuse-mode"),
            "parallelized": _counts["parallelized"], "finished": time.strftime("%H:%M:%S"),
            **_summarise(_config._tpfuse_reports.pop(nodeid, []))}
    out.write(json.dumps(line) + "\n")
