"""Backend selection for every op, done per call in the launcher (never at import).

CUDA tensors run the Triton kernel; CPU tensors run the plain-torch reference. ``TPFUSE_BACKEND=torch|triton|cuda``
(or an explicit ``backend=`` argument) forces one: ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set
before triton is imported), otherwise the call raises instead of silently running something else. ``cuda`` is the
CUDA C++ backend (``csrc/``) of the ops that have one; ``backend="cuda"`` on another op raises, while
``TPFUSE_BACKEND=cuda`` means "csrc where it exists, Triton elsewhere". The backend that ran is logged at debug
level and recorded for :func:`record_backends` in eager code; under ``torch.compile`` the choice is made at trace
time (the environment variable is read then; change it and ``torch._dynamo.reset()``), passed to the op as a
constant, and neither logged nor recorded (a Python side effect in traced code would run once, at trace time).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from ._triton import HAS_TRITON

__all__ = ["select_backend", "resolve_backend", "record_backends", "interpreting", "BACKENDS"]

logger = logging.getLogger("tpfuse.kernels")
BACKENDS = ("torch", "triton", "cuda")
_RECORDERS: list[list[tuple[str, str]]] = []


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def record_backends() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(op, backend)`` for every op call inside the block."""
    events: list[tuple[str, str]] = []
    _RECORDERS.append(events)
    try:
        yield events
    finally:
        _RECORDERS.remove(events)


def select_backend(op: str, device: torch.device, backend: str | None = None, cuda_kernel: bool = False) -> str:
    """The backend ``op`` runs on for tensors on ``device`` (``cuda_kernel``: the op has a csrc kernel); logged
    and recorded."""
    chosen = resolve_backend(op, device, backend, cuda_kernel)
    if not torch.compiler.is_compiling():
        logger.debug("%s: %s backend on %s", op, chosen, device)
        for events in _RECORDERS:
            events.append((op, chosen))
    return chosen


def resolve_backend(op: str, device: torch.device, backend: str | None = None, cuda_kernel: bool = False) -> str:
    """What :func:`select_backend` would choose, without logging or recording it (or raising for a backend
    that cannot run: that is left to the call itself)."""
    requested = backend or os.environ.get("TPFUSE_BACKEND") or None
    if requested is not None and requested not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {requested!r} (from "
                         f"{'backend=' if backend else 'TPFUSE_BACKEND'}); choose one of {list(BACKENDS)}")
    if requested == "cuda":
        if not cuda_kernel:
            if backend == "cuda":
                raise ValueError(f"{op}: there is no CUDA C++ (csrc) kernel for this op; use backend='triton' or "
                                 "'torch'")
            requested = "triton"  # TPFUSE_BACKEND=cuda: csrc where it exists, Triton elsewhere
        elif device.type != "cuda":
            raise RuntimeError(f"{op}: the cuda (csrc) backend needs CUDA tensors, got {device} tensors")
        else:
            return "cuda"
    if requested == "triton" or (requested is None and device.type == "cuda"):
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: the triton backend was selected for {device} tensors but triton is not "
                               "installed; install triton or set TPFUSE_BACKEND=torch")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{op}: the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before "
                               f"triton is imported) for {device} tensors")
        return "triton"
    return "torch"
