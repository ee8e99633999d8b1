"""Vocabulary-parallel layers: an embedding table and an LM head whose vocabulary rows are split across ranks.

A text encoder's vocabulary table is its largest single tensor (Mistral-Small-3.2: 131,072 x 5,120 = 671M
parameters, 1.34 GB in bf16; Qwen3-8B: 151,936 x 4,096 = 622M), and a causal LM has it twice (the embedding and
the ``lm_head``) unless they are tied. Both split by vocabulary rows, with the same rule, so a tied pair stays tied:
rank ``r`` holds rows ``vocab_range(V, r, N)``, ``torch.tensor_split``'s rule (the first ``V % N`` ranks one row
more), so a vocabulary need not divide by the world size (Megatron pads it instead, which changes the shapes the
checkpoint and the tokenizer agree on).

* :class:`VocabParallelEmbedding` — each rank looks up the ids in its rows (zeros elsewhere) and the partial
  lookups are summed (one all-reduce). Exact: every output element is one table value plus zeros.
* :class:`VocabParallelLMHead` — ``x @ W_local^T`` gives this rank's slice of the logits; the slices are all-gathered
  (uneven widths: padded to the widest, trimmed after), so every rank returns the whole ``[..., V]`` logits, as
  transformers' ``colwise_gather_output`` style does.

Both are the classes of the modules they replace (``nn.Embedding``, ``nn.Linear``) with the local table as
``weight`` and the checkpoint's names, and expose :meth:`tp_shard_spec` for the sharded checkpoint loader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import _record, copy_to_tp_region, get_rank, get_world_size, group_name, reduce_from_tp_region, resolve_group
from .consistency import sync_or_check

__all__ = ["VocabParallelEmbedding", "VocabParallelLMHead", "vocab_range"]


def vocab_range(vocab: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of the vocabulary rows rank ``rank`` holds: ``torch.tensor_split``'s contiguous split (the
    first ``vocab % world_size`` ranks hold one row more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if vocab < world_size:
        raise ValueError(f"a vocabulary of {vocab} rows cannot be split over {world_size} ranks")
    base, extra = divmod(vocab, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _VocabParallel:
    """What the two vocabulary-split layers share: the group, this rank's rows, and the loader's view of them."""

    def _init_split(self, vocab: int, group) -> tuple[int, int]:
        self.group = resolve_group(group)
        self.world_size = get_world_size(self.group)
        self.rank = get_rank(self.group)
        self.vocab_size = int(vocab)
        self.vocab_start, self.vocab_stop = vocab_range(self.vocab_size, self.rank, self.world_size)
        return self.vocab_start, self.vocab_stop

    def tp_shard_spec(self, name: str):
        """``(global shape, split dim, [(start, stop)])`` of parameter ``name`` (the checkpoint loader reads only
        those rows)."""
        if name != "weight":
            raise ValueError(f"{type(self).__name__} has no sharded parameter {name!r}")
        return (self.vocab_size, self.weight.shape[1]), 0, [(self.vocab_start, self.vocab_stop)]

    def _shard_of(self, dense: torch.Tensor) -> nn.Parameter:
        local = dense.detach()[self.vocab_start:self.vocab_stop].clone()  # fresh storage: the dense table can go
        return nn.Parameter(local, requires_grad=dense.requires_grad)


class VocabParallelEmbedding(_VocabParallel, nn.Embedding):
    """``nn.Embedding`` with the vocabulary rows split across the group; the output is replicated.

    ``num_embeddings`` is this rank's row count (``nn.Embedding``'s meaning: the table it holds); ``vocab_size``
    the dense table's. Forward: all-reduce of the partial lookups; backward: each rank's rows get the gradient of
    the ids that fall in them (the output gradient is the same on every rank).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, group=None,
                 device=None, dtype=None):
        nn.Module.__init__(self)  # not nn.Embedding.__init__: it would allocate the dense table
        start, stop = self._init_split(num_embeddings, group)
        self.num_embeddings, self.embedding_dim = stop - start, int(embedding_dim)
        # nn.Embedding's padding_idx (the row whose gradient is zero), in local coordinates where this rank holds it
        self.dense_padding_idx = padding_idx
        self.padding_idx = padding_idx - start if padding_idx is not None and start <= padding_idx < stop else None
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.weight = nn.Parameter(torch.empty(stop - start, embedding_dim, device=device, dtype=dtype))
        self.group_name = group_name(self.group) if self.world_size > 1 else ""

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, group=None, *, check_weights: bool = True,
                   broadcast_from: int | None = None) -> VocabParallelEmbedding:
        """This rank's rows of a dense ``nn.Embedding`` (works on ``meta`` tables; the dense one can be freed)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.sparse or embedding.scale_grad_by_freq:
            raise ValueError(f"{cls.__name__}: max_norm={embedding.max_norm}, sparse={embedding.sparse}, "
                             f"scale_grad_by_freq={embedding.scale_grad_by_freq}: only a plain lookup table can be "
                             "split by rows (max_norm renormalizes rows in place from the whole lookup)")
        sync_or_check(embedding, group, check_weights, broadcast_from, type(embedding).__name__)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, group,
                    device="meta", dtype=embedding.weight.dtype)
        layer.weight = layer._shard_of(embedding.weight)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.__dict__.get("_ids_checked", False) and not torch.compiler.is_compiling() and \
                torch._guards.detect_fake_mode((ids,)) is None and ids.device.type != "meta":
            # First call: an id outside the vocabulary would be a zero row here (no rank holds it), where the dense
            # table raises; one check (a host sync) rather than one per call.
            self._ids_checked = True
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise IndexError(f"{type(self).__name__}: token ids must lie in [0, {self.vocab_size}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        if self.world_size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        inside = (ids >= self.vocab_start) & (ids < self.vocab_stop)  # [...]
        local_ids = torch.where(inside, ids - self.vocab_start, torch.zeros_like(ids))
        rows = F.embedding(local_ids, self.weight, self.padding_idx)  # [..., D]
        rows = rows * inside.unsqueeze(-1).to(rows.dtype)  # exact: x*1 and x*0 (a finite table)
        return reduce_from_tp_region(rows, self.group)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, embedding_dim={self.embedding_dim}, rows=[{self.vocab_start}, "
                f"{self.vocab_stop}), world_size={self.world_size}, rank={self.rank}")


class _GatherVocab(torch.autograd.Function):
    """All-gather of uneven last-dim slices (rank order); backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.bounds = (layer.vocab_start, layer.vocab_stop)
        width = -(-layer.vocab_size // layer.world_size)  # the widest slice: every rank sends this many columns
        x = x.contiguous()
        padded = F.pad(x, (0, width - x.shape[-1]))
        _record("all_gather", "forward", padded)
        gathered = torch.ops._c10d_functional.all_gather_into_tensor(padded, layer.world_size, layer.group_name)
        parts = torch.ops._c10d_functional.wait_tensor(gathered).chunk(layer.world_size, dim=0)
        sizes = [b - a for a, b in (vocab_range(layer.vocab_size, r, layer.world_size)
                                    for r in range(layer.world_size))]
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start, stop = ctx.bounds
        return grad[..., start:stop], None


class VocabParallelLMHead(_VocabParallel, nn.Linear):
    """An LM head (``nn.Linear`` to the vocabulary, no bias) with the vocabulary rows split across the group; every
    rank returns the whole logits (all-gathered). ``out_features`` is the dense vocabulary (the output's width),
    ``weight`` this rank's rows — the same rows as a :class:`VocabParallelEmbedding` of that vocabulary, so a tied
    head shares its table."""

    def __init__(self, in_features: int, vocab: int, group=None, device=None, dtype=None):
        nn.Module.__init__(self)
        start, stop = self._init_split(vocab, group)
        self.in_features, self.out_features = int(in_features), self.vocab_size
        self.weight = nn.Parameter(torch.empty(stop - start, in_features, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_name = group_name(self.group) if self.world_size > 1 else ""

    @classmethod
    def from_dense(cls, linear: nn.Linear, group=None, *, check_weights: bool = True,
                   broadcast_from: int | None = None) -> VocabParallelLMHead:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
        if linear.bias is not None:
            raise ValueError(f"{cls.__name__}: the LM head has a bias; a vocabulary-split head takes none")
        sync_or_check(linear, group, check_weights, broadcast_from, type(linear).__name__)
        layer = cls(linear.in_features, linear.out_features, group, device="meta", dtype=linear.weight.dtype)
        layer.weight = layer._shard_of(linear.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.linear(x, self.weight)
        # the input's gradient is the sum of every rank's vocabulary slice's contribution
        logits = F.linear(copy_to_tp_region(x, self.group), self.weight)  # [..., V_local]
        return _GatherVocab.apply(logits, self)  # [..., V]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, vocab_size={self.vocab_size}, rows=[{self.vocab_start}, "
                f"{self.vocab_stop}), world_size={self.world_size}, rank={self.rank}")
