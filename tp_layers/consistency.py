"""Checks that every rank of a tensor-parallel group holds the same weights and gets the same inputs.

Tensor parallelism assumes both, and nothing else notices when they fail: ranks that built a model with different
seeds shard *different* dense weights and all-reduce a sum that matches no model (off by ~0.7 with no error), and
ranks fed different batch splits of the same numel compute garbage, while different sequence lengths abort inside
the collective library. These checks turn each into a clear error raised on every rank.

* **Weights** (:func:`check_weights_agree`): a checksum of each tensor's bytes, all-gathered once. ``parallelize``
  and the blocks' and layers' ``from_dense`` run it by default before sharding; ``broadcast_from=0`` copies rank
  0's weights instead (:func:`broadcast_weights`), the remedy when the ranks' weights differ on purpose or by
  accident. The checksum (:func:`tensor_checksum`) is a polynomial hash of the bytes modulo two primes, so no
  change cancels by construction (two sign flips, or one changed or two swapped elements of up to 32 bits, are
  always seen; any other change with probability 1 - 2^-62): 11 ms for a 56 MB bf16 weight on 2 CPU cores,
  against 27 ms to clone it, so it stays below the sharding copy it guards (command: :func:`tensor_checksum`).
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

import functools
import operator
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._guards import detect_fake_mode

from .comm import get_rank, get_world_size, resolve_group

__all__ = ["WeightMismatchError", "InputMismatchError", "check_weights_agree", "broadcast_weights",
           "check_inputs_agree", "inputs_check_due", "set_debug_checks", "debug_checks_enabled",
           "tensor_checksum"]

# The checksum is a polynomial hash of the bytes read as signed 16-bit words, modulo two primes below 2^31, whose
# bases are primitive roots (test_consistency checks both): x^k != +-1 for 0 < k < (p-1)/2, so two changes by equal
# or opposite amounts (two sign flips, a swap) never cancel. The bases are the first primitive roots above 10^9 (a
# small one such as 7 would let small patterns cancel: -7 and +1 in two adjacent words); with them, no change
# confined to two adjacent words (one 32-bit element) vanishes modulo both primes (the test checks that too).
_PRIMES = (2**31 - 1, 2147483629)
_BASES = (1000000005, 1000000004)
# Words per row of the matrix the hash folds them into. |word| <= 2^15 and x^c mod p taken in (-p/2, p/2), below
# 2^30: every partial sum of a row's sum_c word[c] x^c, 256 terms, is an integer below 2^53, so a float64 matmul
# (BLAS/cuBLAS, any order, FMA or not) computes it exactly, multiply and sum fused in one pass, where int64
# arithmetic would write and read several 8-byte temporaries per word (and int64 matmul does not exist on CUDA).
_COLS = 256
# Rows per matmul (the float64 copy of the words: 8 MB on a CPU, within its last-level cache, as few switches between
# torch's and BLAS's thread pools as that allows; 32 MB on a GPU, few launches) and matmuls per reduction of their
# row sums in int64 (int64 temporaries of 1-2 MB).
_MM_ROWS = {"cpu": 4096}
_MM_ROWS_DEFAULT = 16384
_MMS_PER_REDUCTION = {"cpu": 16}
_MMS_PER_REDUCTION_DEFAULT = 8
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


@functools.lru_cache(maxsize=16)
def _hash_tables(device: torch.device, rows: int, mms: int) -> tuple[torch.Tensor, ...]:
    """For :func:`tensor_checksum` on ``device``: the primes (int64 ``[2]``); ``x^c`` for ``c < _COLS`` (float64
    ``[2, _COLS]``, in ``(-p/2, p/2)``); the weights ``x^(_COLS r)`` of rows ``r < mms * rows`` (int64 ``[mms, 2,
    rows]``, the layout of the matmuls' outputs) and ``x^(_COLS mms rows)``, the step between reductions."""
    p = torch.tensor(_PRIMES, dtype=torch.int64, device=device).view(2, 1)

    def powers(base: list[int], n: int) -> torch.Tensor:  # [2, n]: base^k mod p, by doubling (log2 n steps)
        out = torch.ones(2, 1, dtype=torch.int64, device=device)
        step = torch.tensor(base, dtype=torch.int64, device=device).view(2, 1)  # base^len(out); products < 2^62
        while out.shape[1] < n:
            out = torch.cat([out, out * step % p], 1)
            step = step * step % p
        return out[:, :n]

    cols = powers(list(_BASES), _COLS)
    cols = torch.where(cols > p // 2, cols - p, cols).to(torch.float64)
    row_base = [pow(x, _COLS, q) for x, q in zip(_BASES, _PRIMES)]
    row_pow = powers(row_base, mms * rows).view(2, mms, rows).transpose(0, 1).contiguous()
    step = torch.tensor([pow(x, mms * rows, q) for x, q in zip(row_base, _PRIMES)], dtype=torch.int64, device=device)
    return p.view(2), cols, row_pow, step


def tensor_checksum(t: torch.Tensor) -> torch.Tensor:
    """A hash of ``t``'s bytes, int64 ``[2]`` on ``t``'s device: ``sum_i w_i x^i + nbytes x^n mod p`` for the two
    primes :data:`_PRIMES` (below 2^31) and bases :data:`_BASES`, where ``w_0 .. w_(n-1)`` are the bytes read as
    signed 16-bit words (a zero byte pads an odd count). Exact (bit patterns, integer arithmetic) and
    deterministic: the same on every rank and device, and equal tensors give equal sums, so different sums prove
    different bytes.

    No change cancels by construction: any change within two adjacent words (one fp32 element) is seen, and so are
    two such changes by the same or opposite amounts (two sign flips of 16- to 64-bit elements, two elements of up
    to 32 bits swapped) in a tensor under 2 GB; any other change goes unseen with probability ~2^-62.
    Pure torch on ``t``'s device: float64 matmuls of 256-word rows (exact, see :data:`_COLS`), then int64, in
    chunks of bounded memory. Cost, 2 CPU cores: 11 ms for a 56 MB bf16 weight, against 27 ms to clone it (the
    earlier int64 sums, which missed two sign flips: 7 ms)::

        python -m timeit -s "import torch; from tpfuse.tp_layers.consistency import tensor_checksum as f" \\
            -s "t = torch.randn(3072, 9216).bfloat16()" "f(t)"    # 20 loops, best of 5: 11 msec per loop
        python -m timeit -s "import torch; t = torch.randn(3072, 9216).bfloat16()" "t.clone()"    # 27 msec
    """
    flat = t.detach().resolve_conj().resolve_neg().reshape(-1)  # [numel]; copies only a non-contiguous tensor
    if flat.numel() and (flat.stride(0) != 1 or flat.storage_offset() * flat.element_size() % 2):
        flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)  # unit stride, aligned
    raw = flat.view(torch.uint8)  # [nbytes]
    nbytes = raw.numel()
    words = raw[: nbytes // 2 * 2].view(torch.int16)  # [n_words]
    dev = t.device
    mm_rows = _MM_ROWS.get(dev.type, _MM_ROWS_DEFAULT)
    mms = _MMS_PER_REDUCTION.get(dev.type, _MMS_PER_REDUCTION_DEFAULT)
    p, cols, row_pow, step = _hash_tables(dev, mm_rows, mms)
    p3 = p.view(1, 2, 1)
    full = words.numel() // _COLS  # full rows; the rest (and an odd byte) make a last, short row
    acc = None
    if full:
        buf = torch.empty(mm_rows * _COLS, dtype=torch.float64, device=dev) if full >= mm_rows else None
        inner = torch.empty(min(mms, -(-full // mm_rows)), 2, min(mm_rows, full), dtype=torch.float64, device=dev)
        for start in reversed(range(0, full, mms * mm_rows)):  # Horner: acc = acc * x^(_COLS rows) + these rows
            n_mm = 0
            for first in range(start, min(start + mms * mm_rows, full), mm_rows):
                rows = min(mm_rows, full - first)
                block = words[first * _COLS:(first + rows) * _COLS]
                if rows == mm_rows:
                    torch.mm(cols, buf.copy_(block).view(rows, _COLS).t(), out=inner[n_mm])  # sum_c w x^c, exact
                else:  # the last rows: two matrix-vector products, since a small matmul can wait milliseconds for a
                    # busy CPU's BLAS thread pool, a matrix-vector product not; zeros after them weigh nothing
                    block = block.to(torch.float64).view(rows, _COLS)
                    torch.mv(block, cols[0], out=inner[n_mm, 0, :rows])
                    torch.mv(block, cols[1], out=inner[n_mm, 1, :rows])
                    inner[n_mm, :, rows:].zero_()
                n_mm += 1
            width = inner.shape[2]
            sums = (inner[:n_mm].to(torch.int64) % p3 * row_pow[:n_mm, :, :width] % p3).sum((0, 2))  # < 2^17 p
            acc = sums % p if acc is None else (acc * step + sums) % p  # < 2^62 + 2^48 before the %
    n = words.numel() + nbytes % 2
    consts = torch.tensor([[pow(x, full * _COLS, q) for x, q in zip(_BASES, _PRIMES)],
                           [nbytes * pow(x, n, q) % q for x, q in zip(_BASES, _PRIMES)]], dtype=torch.int64,
                          device=dev)  # x^(the short row's first word), the byte count's term
    out = consts[1] if acc is None else acc + consts[1]
    if n > full * _COLS:  # the short row
        rest = words[full * _COLS:].to(torch.float64)
        if nbytes % 2:
            rest = torch.cat([rest, raw[-1:].to(torch.float64)])
        out = out + torch.mv(cols[:, : rest.numel()], rest).to(torch.int64) % p * consts[0] % p
    return out % p


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


def _describe(named: Iterable[tuple[str, torch.Tensor]],
              shapes_only: Collection[str] = ()) -> list[tuple[str, tuple, str, tuple | None]]:
    """(name, shape, dtype, checksum) for every tensor; the checksum is ``None`` for ``meta`` tensors (no storage)
    and for the names in ``shapes_only``."""
    items, sums = [], []
    for name, t in named:
        items.append([name, tuple(t.shape), str(t.dtype).removeprefix("torch."), None])
        if t.device.type != "meta" and name not in shapes_only:
            sums.append((len(items) - 1, tensor_checksum(t)))
    for (i, _), value in zip(sums, _to_host([s for _, s in sums])):
        items[i][3] = value
    return [tuple(it) for it in items]


def describe_error(exc: BaseException) -> str:
    """``Type: message``: how one rank's exception is sent to the others (a check here, a save, a LoRA save)."""
    return f"{type(exc).__name__}: {exc}"


class _LocalError:
    """An exception one rank hit while preparing its part of a check: sent in place of the data so that every
    rank raises it together (a rank raising alone would leave the others blocked in the collective)."""

    def __init__(self, exc: BaseException):
        self.text = describe_error(exc)


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


def check_weights_agree(module_or_named, group=None, what: str | None = None, *,
                        shapes_only: Collection[str] = (), remedy: str | None = None) -> None:
    """Raise :class:`WeightMismatchError` on every rank when the ranks of ``group`` hold different weights.

    ``module_or_named``: a module (its parameters and buffers), a dict or ``(name, tensor)`` pairs. Tensors on
    the ``meta`` device on any rank are skipped (nothing to compare; a load fills them). One all-gather of a
    checksum per tensor; nothing happens on one rank. ``shapes_only``: names whose values may differ (a rank's
    shard of a tensor-parallel weight): only their shapes and dtypes are compared, no checksum computed.
    ``remedy``: what the error tells the user to do (default: how to build the same model on every rank)."""
    group = resolve_group(group)
    world = get_world_size(group)
    if world == 1:
        return
    named = _named_state(module_or_named)
    what = what or (type(module_or_named).__name__ if isinstance(module_or_named, nn.Module) else "weights")
    skip = set(shapes_only)
    everyone = _gather_or_raise(lambda: _describe(named, skip), group, f"{what}: checking weights across ranks")
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
            f"({len(problems)} of {len(everyone[0])} tensors differ). " + (remedy or (
                "Tensor parallelism shards one model: seed every rank the same before building it "
                "(torch.manual_seed), load the same checkpoint everywhere, or pass broadcast_from=0 to copy rank 0's "
                "weights to every rank.")))


def broadcast_weights(module_or_named, group=None, src: int = 0) -> None:
    """Copy rank ``src``'s (a rank of ``group``) parameters and buffers to every rank of ``group``, in place.
    ``meta`` tensors are skipped; under NCCL, CPU tensors travel through the current CUDA device."""
    group = resolve_group(group)
    world = get_world_size(group)
    src = _source_rank(src, world)
    if world == 1:
        return
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


def _source_rank(src: Any, world: int) -> int:
    """``src`` as a rank of a ``world``-rank group, or a clear error (at every world size, so that a script tried on
    one process fails there rather than on the cluster)."""
    try:
        rank = None if isinstance(src, bool) else operator.index(src)  # True is an int, but no rank number
    except TypeError:  # a str, a float...; numpy and 0-dim torch integers pass
        rank = None
    if rank is None:
        raise TypeError(f"broadcast_from must be a rank number (an int) or None, got {src!r} ({type(src).__name__})")
    if not 0 <= rank < world:
        valid = "0" if world == 1 else f"0 to {world - 1}"
        raise ValueError(f"broadcast_from={rank} is not a rank of the {world}-rank tensor-parallel group "
                         f"(valid: {valid})")
    return rank


def sync_or_check(module_or_named, group, check: bool, broadcast_from: int | None, what: str | None = None):
    """What ``parallelize``/``from_dense`` run before sharding: broadcast from a rank (checked to be one, at any
    world size), else the check."""
    if broadcast_from is not None:
        broadcast_weights(module_or_named, group, broadcast_from)
    elif check:
        check_weights_agree(module_or_named, group, what)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def inputs_check_due(module: nn.Module, inputs: Mapping[str, Any] | None = None) -> bool:
    """Whether ``module``'s call should check its ``inputs`` across ranks: its first call, or every call in debug
    mode — but never while tracing. Under ``torch.compile`` the check would run once, at trace time; under a
    ``FakeTensorMode`` (shape-only tracing, which may run on one rank alone) its all-gather would need real values
    (``.item()`` on a fake tensor) and could wait for ranks that never join. The module stays unchecked then, so
    its first real call checks."""
    if not _DEBUG and module.__dict__.get("_tp_inputs_checked", False):
        return False  # checked: the common case, decided before the fake-mode scan (~13 us a call)
    if torch.compiler.is_compiling():
        return False
    tensors = [x for _, x in _flat_tensors(inputs or {}) if isinstance(x, torch.Tensor)]
    return detect_fake_mode(tensors) is None


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
    # The module's class travels with the description: ranks that run different modules (out of step, e.g. one
    # skipped a block) would otherwise pair up unrelated inputs and report them as a data mismatch.
    everyone = _gather_or_raise(lambda: (type(module).__qualname__, _describe_inputs(inputs, sharded)), group,
                                f"{type(module).__name__}: checking inputs across ranks")
    if all(d == everyone[0] for d in everyone[1:]):
        return
    where = [w for w, _ in everyone]
    if len(set(where)) > 1:
        raise InputMismatchError(
            "the ranks of the tensor-parallel group are out of step: they are checking the inputs of different "
            "modules (" + ", ".join(f"rank {r} {w}" for r, w in enumerate(where)) + "). Every rank must run the "
            "same modules in the same order (a rank that skips a layer or runs an extra one desynchronizes the "
            "collectives).")
    _raise_input_mismatch(module, world, [d for _, d in everyone])


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
