"""Ulysses sequence parallelism (the ``sp`` dimension of a mesh, see :mod:`.mesh`): token splits, gathers and the
all-to-all attention, as autograd functions over an explicit process group.

Every rank of an sp group holds a contiguous part of each token stream (text, image, ...): a stream of ``n`` tokens
is split as ``torch.tensor_split`` does (the first ``n % sp`` ranks hold one token more), so resolutions need not be
chosen for the mesh and nothing is padded. Everything per token (LayerNorm + modulation, the projections, the
row-parallel reduce over tp) runs on the local tokens unchanged. Attention is the only op that mixes tokens:

* Q, K, V ``[B, L_r, H, D]`` (``L_r``: this rank's tokens, ``H``: the heads of its tp shard) -> ONE all-to-all for the
  three (``all_to_all_single`` with uneven splits: rank ``r`` sends heads ``[j*H/sp, (j+1)*H/sp)`` of its tokens to
  rank ``j``) -> ``[B, S, H/sp, D]``: all ``S = sum(L_r)`` tokens, rank-major (rank 0's text and image tokens, then
  rank 1's, ...). Attention does not depend on the order of the keys, and every query comes back to its rank, so the
  result is the dense one without reordering anything.
* the attention output ``[B, S, H/sp, D]`` -> the reverse all-to-all -> ``[B, L_r, H, D]``.
* a key mask (``[..., 1, L_r]``: text padding) is gathered rank-major the same way; a per-head mask keeps the
  rank's heads; a mask with a query dimension cannot be split this way and is refused.

The backward of an all-to-all is the reverse all-to-all; of a split, the all-gather of the gradient; of a gather,
the rank's slice. The all-to-all needs every rank's token count: :class:`SequenceParallel` computes them from the
global stream lengths the model's forward records (:meth:`SequenceParallel.layout`), without communication; a call
whose count is ambiguous or unknown (a block called outside the model) exchanges the counts (one tiny all-gather).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .comm import _record, get_rank, get_world_size, group_name

__all__ = ["SequenceParallel", "SequenceParallelError", "gather_tokens", "split_sizes", "split_tokens",
           "wrap_dispatch"]


class SequenceParallelError(NotImplementedError):
    """What Ulysses sequence parallelism cannot compute exactly (a mask with a query dimension, a KV cache, a
    processor that bypasses tpfuse's attention)."""


def split_sizes(n: int, parts: int) -> list[int]:
    """Tokens per rank of a stream of ``n`` tokens split in ``parts`` contiguous pieces (``torch.tensor_split``'s
    rule: the first ``n % parts`` pieces hold one more)."""
    base, extra = divmod(int(n), parts)
    return [base + (r < extra) for r in range(parts)]


def _offset(sizes: Sequence[int], rank: int) -> int:
    return sum(sizes[:rank])


# --------------------------------------------------------------------------------------------------------------
# Raw collectives (functional, so that the all-to-all is one graph node under torch.compile)
# --------------------------------------------------------------------------------------------------------------


def _all_to_all(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], name: str,
                phase: str) -> torch.Tensor:
    """``all_to_all_single`` on dim 0 with (possibly uneven) splits, in units of dim-0 rows."""
    x = x.contiguous()
    _record("all_to_all", phase, x)
    out = torch.ops._c10d_functional.all_to_all_single(x, list(out_splits), list(in_splits), name)
    return torch.ops._c10d_functional.wait_tensor(out)


def _all_gather_dim(x: torch.Tensor, dim: int, sizes: Sequence[int], name: str, phase: str) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank ``r`` holding ``sizes[r]``). Uneven parts are padded to
    the largest for one ``all_gather_into_tensor`` and trimmed after."""
    world, most = len(sizes), max(sizes)
    x = x.movedim(dim, 0)
    if x.shape[0] < most:
        x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
    x = x.contiguous()
    _record("all_gather", phase, x)
    g = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_gather_into_tensor(x, world, name))
    if min(sizes) != most:
        g = torch.cat([g[r * most:r * most + sizes[r]] for r in range(world)])
    return g.movedim(0, dim)


# --------------------------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------------------------


class _Split(torch.autograd.Function):
    """Forward: this rank's part of ``dim``; backward: the all-gather of the gradient (every rank gets the whole
    input gradient, as the dense model computes it)."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, name):
        ctx.dim, ctx.sizes, ctx.name = dim, sizes, name
        return x.narrow(dim, _offset(sizes, rank), sizes[rank]).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.dim, ctx.sizes, ctx.name, "backward"), None, None, None, None


class _Gather(torch.autograd.Function):
    """Forward: every rank's part of ``dim`` concatenated; backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, sizes, rank, name):
        ctx.dim, ctx.offset, ctx.size = dim, _offset(sizes, rank), sizes[rank]
        return _all_gather_dim(x, dim, sizes, name, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(ctx.dim, ctx.offset, ctx.size).contiguous(), None, None, None, None


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on dim 0; the backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, name):
        ctx.out_splits, ctx.in_splits, ctx.name = out_splits, in_splits, name
        return _all_to_all(x, out_splits, in_splits, name, "forward")

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.name, "backward"), None, None, None


def split_tokens(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    """This rank's contiguous part of ``x`` along ``dim`` (``sizes``: every rank's count); backward: all-gather."""
    if len(sizes) == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] != sum(sizes):
        raise ValueError(f"split_tokens: dim {dim} of a {tuple(x.shape)} tensor is not the {sum(sizes)} tokens "
                         f"the split expects ({list(sizes)})")
    return _Split.apply(x, dim, tuple(sizes), get_rank(group), group_name(group))


def gather_tokens(x: torch.Tensor, dim: int, sizes: Sequence[int], group) -> torch.Tensor:
    """Every rank's part of ``x`` along ``dim`` concatenated in rank order; backward: this rank's slice."""
    if len(sizes) == 1:
        return x
    dim = dim % x.dim()
    rank = get_rank(group)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"gather_tokens: rank {rank} holds {x.shape[dim]} rows on dim {dim}, the layout says "
                         f"{sizes[rank]} ({list(sizes)})")
    return _Gather.apply(x, dim, tuple(sizes), rank, group_name(group))


# --------------------------------------------------------------------------------------------------------------
# The sequence-parallel attention
# --------------------------------------------------------------------------------------------------------------


class SequenceParallel:
    """The Ulysses sp group of a parallelized model. Attention processors carry it as their ``_parallel_config``;
    tpfuse's :func:`~tpfuse.tp_layers.tp_attention.attention` and diffusers' ``dispatch_attention_fn`` (wrapped by
    :func:`wrap_dispatch`) run :meth:`attend` when they see it.

    ``streams`` (set by the model's forward through :meth:`layout`): each token stream's global length; every
    attention call's sequence is the concatenation of some of them (``compositions``), which gives every rank's
    token count for a local count without communication."""

    def __init__(self, group):
        self.group = group
        self.size = get_world_size(group)
        self.rank = get_rank(group)
        self.name = group_name(group)
        self.streams: dict[str, int] = {}
        self._counts: dict[int, tuple[int, ...]] | None = None  # local count -> every rank's, for this forward

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, rank={self.rank})"

    # A processor holding this object must survive deepcopy (diffusers copies processors) and refuse pickling
    # with a reason rather than fail on the process group.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        raise TypeError("a sequence-parallel model holds process groups and cannot be pickled; save it with "
                        "save_pretrained instead")

    @property
    def context_parallel_config(self):
        # diffusers' attention backends read this when a processor passes its _parallel_config straight to an
        # unwrapped dispatch_attention_fn: the processor bypassed tpfuse's attention, which would attend over this
        # rank's tokens only.
        raise SequenceParallelError(
            "an attention processor called diffusers' dispatch_attention_fn directly (not through tpfuse's "
            "attention or the model module's wrapped dispatch), which would attend over this rank's tokens only; "
            "sequence parallelism (sp > 1) needs tpfuse's processors or diffusers' processors from the model's own "
            "module")

    # ---- per-forward layout ------------------------------------------------------------------------------------

    def sizes(self, stream: str) -> list[int]:
        return split_sizes(self.streams[stream], self.size)

    def local_range(self, stream: str) -> tuple[int, int]:
        """(first token, count) of this rank's part of ``stream`` in the current forward."""
        sizes = self.sizes(stream)
        return _offset(sizes, self.rank), sizes[self.rank]

    @contextlib.contextmanager
    def layout(self, streams: Mapping[str, int], compositions: Sequence[Sequence[str]]) -> Iterator[None]:
        """Within the block, attention calls know every rank's token count from ``streams`` (global lengths) and
        the stream sequences attention runs over. Where two compositions give one rank the same count but other
        ranks different ones (possible at tiny sizes), the counts are exchanged per call instead, decided alike on
        every rank (all of them know every rank's counts)."""
        previous = self.streams, self._counts
        self.streams = dict(streams)
        table: dict[int, tuple[int, ...]] = {}
        ambiguous = False
        per_rank = [dict() for _ in range(self.size)]
        sizes = {s: self.sizes(s) for s in self.streams}
        for comp in compositions:
            comp = [s for s in comp if s in sizes]
            if not comp:
                continue
            counts = tuple(sum(sizes[s][r] for s in comp) for r in range(self.size))
            for r in range(self.size):
                if per_rank[r].setdefault(counts[r], counts) != counts:
                    ambiguous = True
            table[counts[self.rank]] = counts
        self._counts = None if ambiguous else table
        try:
            yield
        finally:
            self.streams, self._counts = previous

    def counts(self, local: int) -> tuple[int, ...]:
        """Every rank's token count for an attention call holding ``local`` tokens here."""
        if self._counts is not None and local in self._counts:
            return self._counts[local]
        # Outside a model forward, or ambiguous: exchange (every rank reaches the same attention calls).
        mine = torch.tensor([local], dtype=torch.int64)
        backend = str(dist.get_backend(self.group))
        if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
            mine = mine.cuda()
        everyone = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(everyone, mine, group=self.group)
        return tuple(int(t.item()) for t in everyone)

    # ---- attention ---------------------------------------------------------------------------------------------

    def _to_heads(self, xs: Sequence[torch.Tensor], counts: tuple[int, ...]) -> list[torch.Tensor]:
        """[B, L, H, D] each (this rank's tokens, all its heads) -> [B, S, H/sp, D] each (all tokens, its sp share
        of the heads), in ONE all-to-all: Q, K and V (same shape) travel together, so an attention costs two
        collectives (in, out) instead of four; the send buffer is the one copy a permuted view needs anyway."""
        b, n, h, d = xs[0].shape
        share = h // self.size
        # [sp, L, k, B, h, D]: rank j's heads of every tensor, token-major (the all-to-all splits dim 0)
        send = torch.stack([x.reshape(b, n, self.size, share, d).permute(2, 1, 0, 3, 4) for x in xs], dim=2)
        send = send.reshape(self.size * n, len(xs), b, share, d)
        recv = _AllToAll.apply(send, counts, (n,) * self.size, self.name)  # [S, k, B, h, D], rank-major tokens
        return [recv[:, i].permute(1, 0, 2, 3) for i in range(len(xs))]

    def _to_tokens(self, o: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        # [B, S, h, D] -> [B, L, sp*h, D]: the head order of the input (rank j computed heads [j*h, (j+1)*h))
        b, _, h, d = o.shape
        n = counts[self.rank]
        recv = _AllToAll.apply(o.permute(1, 0, 2, 3), (n,) * self.size, counts, self.name)  # [sp*L, B, h, D]
        return recv.reshape(self.size, n, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, n, self.size * h, d)

    def _mask(self, mask, heads: int, kv_counts: tuple[int, ...]):
        if mask is None:
            return None
        if mask.dim() < 2 or mask.dim() > 4:
            raise SequenceParallelError(f"sequence parallelism: attention_mask of shape {tuple(mask.shape)} is not "
                                        "a [B, S_kv] or [B, heads|1, 1, S_kv] key mask")
        if mask.dim() >= 3 and mask.shape[-2] != 1:
            raise SequenceParallelError(
                f"sequence parallelism: attention_mask of shape {tuple(mask.shape)} has a query dimension "
                f"({mask.shape[-2]}); under sp > 1 a rank holds only its tokens' rows, so only key masks "
                "([B, S_kv] or [B, heads|1, 1, S_kv], e.g. text padding) can be split. Run with sp = 1 for this mask")
        if mask.shape[-1] != kv_counts[self.rank]:
            raise SequenceParallelError(f"sequence parallelism: attention_mask of shape {tuple(mask.shape)} does "
                                        f"not cover this rank's {kv_counts[self.rank]} keys")
        if mask.dim() == 4 and mask.shape[1] not in (1, heads):
            raise SequenceParallelError(f"sequence parallelism: attention_mask of shape {tuple(mask.shape)}: dim 1 "
                                        f"is neither 1 nor this rank's {heads} heads")
        full = gather_tokens(mask, -1, kv_counts, self.group)  # rank-major keys, as the all-to-all orders them
        if full.dim() == 4 and full.shape[1] == heads and heads > 1:
            share = heads // self.size
            full = full[:, self.rank * share:(self.rank + 1) * share]  # the heads this rank attends with
        return full

    def attend(self, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """``fn(q, k, v, mask) -> [B, S, h, D]`` run on all tokens and this rank's ``1/sp`` of the heads; returns
        ``[B, L, H, D]`` for this rank's tokens and all its heads. q, k, v: ``[B, L, H, D]``."""
        heads = q.shape[2]
        if heads % self.size or k.shape[2] % self.size:
            raise ValueError(f"sequence parallelism: {heads} heads on this rank do not split over sp={self.size} "
                             "(the heads must divide by tp * sp)")
        q_counts = self.counts(q.shape[1])
        if q.shape == k.shape == v.shape:  # self-attention: one all-to-all for all three
            kv_counts = q_counts
            q, k, v = self._to_heads((q, k, v), q_counts)
        else:
            kv_counts = self.counts(k.shape[1])
            (q,), (k, v) = self._to_heads((q,), q_counts), self._to_heads((k, v), kv_counts)
        mask = self._mask(mask, heads, kv_counts)
        out = fn(q, k, v, mask)
        if out.dim() == 3:  # a backend that returned [B, S, h*D]
            out = out.unflatten(-1, (heads // self.size, -1))
        return self._to_tokens(out, q_counts)


def wrap_dispatch(module) -> None:
    """Wrap ``module.dispatch_attention_fn`` (the global diffusers' processors in a model's module call) so that a
    call whose ``parallel_config`` is a :class:`SequenceParallel` runs the Ulysses all-to-alls around it; every
    other call passes through unchanged. Idempotent."""
    orig = getattr(module, "dispatch_attention_fn", None)
    if orig is None or getattr(orig, "_tpfuse_sequence_parallel", False):
        return

    @functools.wraps(orig)
    def dispatch_attention_fn(query, key, value, attn_mask=None, *args, parallel_config=None, **kwargs):
        if isinstance(parallel_config, SequenceParallel):
            def call(q, k, v, m):
                return orig(q, k, v, m, *args, parallel_config=None, **kwargs)
            return parallel_config.attend(call, query, key, value, attn_mask)
        return orig(query, key, value, attn_mask, *args, parallel_config=parallel_config, **kwargs)

    dispatch_attention_fn._tpfuse_sequence_parallel = True
    module.dispatch_attention_fn = dispatch_attention_fn

