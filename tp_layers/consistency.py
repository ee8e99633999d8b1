"""Checks that every rank of a tensor-parallel group holds the same weights and gets the same inputs.

Tensor parallelism assumes both, and nothing else notices when they fail: ranks that built a model with different
seeds shard *different* dense weights and all-reduce a sum that matches no model (off by ~0.7 with no error), and
ranks fed different batch splits of the same numel compute garbage, while different sequence lengths abort inside
the collective library. These checks turn each into a clear error raised on every rank.

* **Weights** (:func:`check_weights_agree`): a checksum of each tensor's bytes, all-gathered once. ``parallelize``
  and the blocks' and layers' ``from_dense`` run it by default before sharding; ``broadcast_from=0`` copies rank
  0's weights instead (:func:`broadcast_weights`), the remedy when the ranks' weights differ on purpose or by
  accident. The checksum reads each byte once as int64 words: 2 ms for a 56 MB bf16 weight on 2 CPU cores,
  against 31 ms to clone it, so it is small next to the sharding copy it guards (measured with
  ``torch.randn(3072, 9216).bfloat16()``).
* **Inputs** (:func:`inputs_check_due` / :func:`check_inputs_agree`): at the first call of each tensor-parallel
  module (model, block, layer), the shapes and dtypes of its inputs are all-gathered and compared. An outer
  module's check covers the modules it calls, so a model's first forward costs one small all-gather. In debug
  mode (:func:`set_debug_checks` or ``TPFUSE_DEBUG_CHECKS=1``) every call is checked, and the checksums of the
  replicated inputs' values are compared too. Calls traced by ``torch.compile`` are never checked (run one eager
  call first).

Under NCCL the checks' all-gather stages its data on ``torch.cuda.current_device()``: call
``torch.cuda.set_device(local_rank)`` before ``parallelize`` (the README's recipe does), or every rank uses GPU 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import get_rank, get_world_size, resolve_group

__all__ = ["WeightMismatchError", "InputMismatchError", "check_weights_agree", "broadcast_weights",
           "check_inputs_agree", "inputs_check_due", "set_debug_checks", "debug_checks_enabled",
           "tensor_checksum"]

# Word count of the rows the checksum folds the bytes into: a prime, so tensor rows (powers of two times small
# factors) never line up with them and a swap of two elements changes a position-weighted sum.
_FOLD = 251
_DEBUG = os.environ.get("TPFUSE_DEBUG_CHECKS", "") not in ("", "0")


class WeightMismatchError(ValueError):
    """Ranks of a tensor-parallel group hold different values (or shapes) for a weight that must agree."""


class InputMismatchError(ValueError):
    """Ranks of a tensor-parallel group called a module with inputs of different shapes, dtypes or values."""


def set_debug_checks(enabled: bool = True) -> bool:
    """Check inputs (shapes, dtypes and the values' checksums) at every call of every tensor-parallel module, not
    only the first; returns the previous setting. Costs one all-gather per module call: for debugging."""
    global _DEBUG
    previous, _DEBUG = _DEBUG, bool(enabled)
    return previous


def debug_checks_enabled() -> bool:
    return _DEBUG


# --------------------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------------------


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of ``t``'s bytes read as int64 words (wrapping), ``[2]`` on ``t``'s device: rows of
    :data:`_FOLD` words weighted by odd row numbers, and columns weighted by odd column numbers. Exact (bit
    patterns, no float rounding, the same on every rank whatever the reduction order). Odd weights are
    invertible mod 2^64, so any change to a single word (a sign bit included) changes both sums; a moved element
    changes the weighted ones. Equal tensors give equal sums, so different sums prove different bytes."""
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)  # [numel]; copies only a non-contiguous tensor
    if flat.numel() and (flat.stride(0) != 1 or flat.storage_offset() * flat.element_size() % 8):
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)  # unit stride, aligned
    raw = flat.view(torch.uint8)  # [nbytes]
    head = raw.numel() // 8 * 8
    words = raw[:head].view(torch.int64)  # [nbytes // 8]
    full = words.numel() // _FOLD * _FOLD
    table = words[:full].view(-1, _FOLD)  # [R, FOLD]
    dev = t.device
    rows = 2 * torch.arange(table.shape[0], device=dev, dtype=torch.int64) + 1
    cols = 2 * torch.arange(_FOLD, device=dev, dtype=torch.int64) + 1
    by_row = (table.sum(1) * rows).sum()
    by_col = (table.sum(0) * cols).sum()
    rest = torch.cat([words[full:], raw[head:].to(torch.int64)])  # < FOLD words + < 8 bytes
    weights = 2 * torch.arange(_FOLD, _FOLD + rest.numel(), device=dev, dtype=torch.int64) + 1
    rest_sum = (rest * weights).sum()
    return torch.stack([by_row + rest_sum, by_col + rest_sum])


def _to_host(sums: list[torch.Tensor]) -> list[tuple[int, int]]:
    """``[2]`` checksums on any devices -> Python ints, one transfer per device."""
    out: list[Any] = [None] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([sums[i] for i in idx]).cpu().tolist()):
            out[i] = tuple(v)
    return out


def _describe(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple, str, tuple | None]]:
    """(name, shape, dtype, checksum) for every tensor that has storage (``meta`` ones: checksum ``None``)."""
    items, sums = [], []
    for name, t in named:
        items.append([name, tuple(t.shape), str(t.dtype).removeprefix("torch."), None])
        if t.device.type != "meta":
            sums.append((len(items) - 1, tensor_checksum(t)))
    for (i, _), value in zip(sums, _to_host([s for _, s in sums])):
        items[i][3] = value
    return [tuple(it) for it in items]


class _LocalError:
    """An exception one rank hit while preparing its part of a check: sent in place of the data so that every
    rank raises it together (a rank raising alone would leave the others blocked in the collective)."""

    def __init__(self, exc: BaseException):
        self.text = f"{type(exc).__name__}: {exc}"


def _gather_or_raise(make: Callable[[], Any], group, what: str) -> list[Any]:
    try:
        mine = make()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        mine = _LocalError(exc)
    everyone = _gather(mine, group)
    bad = [(r, x) for r, x in enumerate(everyone) if isinstance(x, _LocalError)]
    if bad:
        if isinstance(mine, _LocalError):
            raise RuntimeError(f"{what}: rank {get_rank(group)} failed: {mine.text}")
        raise RuntimeError(f"{what}: rank {bad[0][0]} failed: {bad[0][1].text}")
    return everyone


def _gather(obj: Any, group) -> list[Any]:
    out = [None] * get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def _named_state(module_or_named) -> list[tuple[str, torch.Tensor]]:
    if isinstance(module_or_named, nn.Module):
        return list(module_or_named.named_parameters(remove_duplicate=True)) + list(module_or_named.named_buffers())
    if isinstance(module_or_named, Mapping):
        return list(module_or_named.items())
    return list(module_or_named)


def check_weights_agree(module_or_named, group=None, what: str | None = None) -> None:
    """Raise :class:`WeightMismatchError` on every rank when the ranks of ``group`` hold different weights.

    ``module_or_named``: a module (its parameters and buffers), a dict or ``(name, tensor)`` pairs. Tensors on
    the ``meta`` device on any rank are skipped (nothing to compare; a load fills them). One all-gather of a
    checksum per tensor; nothing happens on one rank."""
    group = resolve_group(group)
    world = get_world_size(group)
    if world == 1:
        return
    named = _named_state(module_or_named)
    what = what or (type(module_or_named).__name__ if isinstance(module_or_named, nn.Module) else "weights")
    everyone = _gather_or_raise(lambda: _describe(named), group, f"{what}: checking weights across ranks")
    by_rank = [{n: (shape, dtype, s) for n, shape, dtype, s in desc} for desc in everyone]
    problems = []
    for name, shape, dtype, _ in everyone[0]:
        seen = [r.get(name) for r in by_rank]
        if any(v is None for v in seen):
            missing = [r for r, v in enumerate(seen) if v is None]
            problems.append(f"{name!r}: missing on rank(s) {missing}")
        elif len({(s, d) for s, d, _ in seen}) > 1:
            desc = ", ".join(f"rank {r} {list(s)} {d}" for r, (s, d, _) in enumerate(seen))
            problems.append(f"{name!r}: shapes or dtypes differ ({desc})")
        elif any(c is None for _, _, c in seen):
            continue  # meta on some rank: nothing to compare
        elif len({c for _, _, c in seen}) > 1:
            groups: dict[tuple, list[int]] = {}
            for r, (_, _, c) in enumerate(seen):
                groups.setdefault(c, []).append(r)
            problems.append(f"{name!r}: values differ (ranks grouped by equal values: {list(groups.values())})")
    extra = sorted({n for r in by_rank[1:] for n in r} - set(by_rank[0]))
    if extra:
        problems.append(f"{extra[:3]}{' ...' if len(extra) > 3 else ''}: missing on rank 0")
    if problems:
        raise WeightMismatchError(
            f"{what}: the {world} ranks of the tensor-parallel group hold different weights; first: {problems[0]} "
            f"({len(problems)} of {len(everyone[0])} tensors differ). Tensor parallelism shards one model: seed "
            "every rank the same before building it (torch.manual_seed), load the same checkpoint everywhere, or "
            "pass broadcast_from=0 to copy rank 0's weights to every rank.")


def broadcast_weights(module_or_named, group=None, src: int = 0) -> None:
    """Copy rank ``src``'s (a rank of ``group``) parameters and buffers to every rank of ``group``, in place.
    ``meta`` tensors are skipped; under NCCL, CPU tensors travel through the current CUDA device."""
    group = resolve_group(group)
    world = get_world_size(group)
    if world == 1:
        return
    if not 0 <= src < world:
        raise ValueError(f"broadcast_from={src} is not a rank of the {world}-rank tensor-parallel group")
    global_src = src if group is None else dist.get_global_rank(group, src)
    nccl = dist.get_backend(group) == "nccl"
    named = _named_state(module_or_named)
    # Broadcasts pair up by position: every rank must walk the same tensors, so their names, shapes, dtypes and
    # meta-ness are compared first (an error on every rank, instead of a size error or a wrong pairing).
    layout = [(n, tuple(t.shape), str(t.dtype), t.device.type == "meta") for n, t in named]
    everyone = _gather(layout, group)
    if any(x != everyone[0] for x in everyone[1:]):
        first = next((a, b) for x in everyone[1:] for a, b in zip(everyone[0], x) if a != b) if all(
            len(x) == len(everyone[0]) for x in everyone) else None
        detail = (f"first: rank 0 {first[0]} vs {first[1]}" if first else
                  f"tensor counts per rank {[len(x) for x in everyone]}")
        raise WeightMismatchError(f"broadcast_from={src}: the ranks' models differ in their tensors' names, shapes, "
                                  f"dtypes or meta-ness ({detail}); build the same model on every rank")
    with torch.no_grad():
        for _, t in named:
            if t.device.type == "meta":
                continue
            buf = t if t.is_contiguous() else t.contiguous()
            if nccl and buf.device.type != "cuda":
                buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(buf, global_src, group=group)
            if buf is not t:
                t.copy_(buf)


def sync_or_check(module_or_named, group, check: bool, broadcast_from: int | None, what: str | None = None):
    """What ``parallelize``/``from_dense`` run before sharding: broadcast from a rank, else the check."""
    if broadcast_from is not None:
        broadcast_weights(module_or_named, group, broadcast_from)
    elif check:
        check_weights_agree(module_or_named, group, what)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def inputs_check_due(module: nn.Module) -> bool:
    """Whether ``module``'s call should check its inputs: its first call, or every call in debug mode. Read it
    behind ``not torch.compiler.is_compiling()`` so that traced code never sees it."""
    return _DEBUG or not module.__dict__.get("_tp_inputs_checked", False)


def _flat_tensors(inputs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(path, leaf) for tensors and plain scalars in nested dicts/lists/tuples: ``image_rotary_emb[0]`` ..."""
    out = []

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            out.append((prefix, x))
        elif isinstance(x, Mapping):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}[{i}]", v)
        elif x is None or isinstance(x, (bool, int, float, str)):
            out.append((prefix, x))

    walk("", dict(inputs))
    return out


def check_inputs_agree(module: nn.Module, group, inputs: Mapping[str, Any], sharded: Iterable[str] = ()) -> None:
    """All-gather the shapes and dtypes of ``inputs`` (tensors, nested in dicts/lists, and plain scalars) and
    raise :class:`InputMismatchError` on every rank when they differ; in debug mode the values' checksums too.

    ``sharded``: inputs that are this rank's slice of the last dim (a row-parallel layer's parallel input): their
    last dim and values may differ. Marks ``module`` and every module under it as checked."""
    world = get_world_size(group)
    if world > 1:
        _compare_inputs(module, group, world, inputs, set(sharded))
    for m in module.modules():  # after the check passed: a caller that fixes its inputs is checked again
        m.__dict__["_tp_inputs_checked"] = True


def _compare_inputs(module, group, world, inputs, sharded) -> None:
    everyone = _gather_or_raise(lambda: _describe_inputs(inputs, sharded), group,
                                f"{type(module).__name__}: checking inputs across ranks")
    if all(d == everyone[0] for d in everyone[1:]):
        return
    _raise_input_mismatch(module, world, everyone)


def _describe_inputs(inputs, sharded) -> list[tuple]:
    desc, sums = [], []
    for name, x in _flat_tensors(inputs):
        root = name.split("[", 1)[0].split(".", 1)[0]
        if isinstance(x, torch.Tensor):
            shape = list(x.shape)
            if root in sharded and shape:
                shape[-1] = "local"
            desc.append([name, f"{shape} {str(x.dtype).removeprefix('torch.')}", None])
            if _DEBUG and root not in sharded and x.device.type != "meta":
                sums.append((len(desc) - 1, tensor_checksum(x)))
        else:
            desc.append([name, repr(x), None])
    for (i, _), v in zip(sums, _to_host([s for _, s in sums])):
        desc[i][2] = v
    return [tuple(d) for d in desc]


def _raise_input_mismatch(module, world, everyone) -> None:
    lines = []
    tables = [{n: (shown, checksum) for n, shown, checksum in d} for d in everyone]
    for name in dict.fromkeys(n for d in everyone for n, _, _ in d):
        seen = [t.get(name) for t in tables]
        if len(set(seen)) == 1:
            continue
        if None not in seen and len({shown for shown, _ in seen}) == 1:
            groups: dict[Any, list[int]] = {}
            for r, (_, checksum) in enumerate(seen):
                groups.setdefault(checksum, []).append(r)
            lines.append(f"{name} {seen[0][0]}: values differ (ranks grouped by equal values: "
                         f"{list(groups.values())})")
        else:
            lines.append(f"{name}: " + ", ".join(f"rank {r} {'absent' if s is None else s[0]}"
                                                 for r, s in enumerate(seen)))
    when = "a call (debug checks)" if _DEBUG else "the first call"
    raise InputMismatchError(
        f"{type(module).__name__}: the {world} ranks of the tensor-parallel group got different inputs at {when}: "
        + "; ".join(lines) + ". Every rank of a tensor-parallel group must get the same inputs (the same batch, "
        "sequence lengths and values): tensor parallelism shards the weights, not the data.")
