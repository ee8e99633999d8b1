"""Column- and row-parallel linear layers.

Column-parallel: the weight ``[out, in]`` is split by output features, each rank computes its slice of the
output; no communication forward, an all-reduce of the input gradient backward. Row-parallel: the weight is split
by input features, the input arrives already split (the output of a column layer), each rank computes a partial
sum; an all-reduce forward, nothing backward. ``column -> (shard-safe ops) -> row`` is the tensor-parallel pair.

Both layers know a *packed* layout (``blocks``): the column layer's output features, or the row layer's input
features, may be a concatenation of logical blocks (``[Q, K, V, gate, up]``), each of which is sharded on its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tpfuse.kernels import select_backend
from tpfuse.kernels._autocast import _like, autocast_dtype, autocast_off
from tpfuse.kernels._math import each_needs
from tpfuse.kernels.row_parallel_matmul import (
    gate_layout,
    row_parallel_matmul_backward,
    row_parallel_matmul_forward,
)

from ._checks import check_like
from .comm import (
    _record,
    all_reduce_start,
    all_reduce_wait,
    gather_from_tp_region,
    get_rank,
    get_world_size,
    group_name,
    process_group,
    resolve_group,
    scatter_to_tp_region,
)
from .consistency import check_inputs_agree, inputs_check_due, sync_or_check
from .schedule import DEFAULT_SM_COUNT, ROW_TILE, wave_schedule
from .sharding import check_blocks, local_blocks, shard_tensor

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "check_input",
    "chunk_bounds",
    "column_parallel_linear",
]

logger = logging.getLogger("tpfuse.tp_layers")

# The GEMM row tile (bench_overlap aligns its equal chunks to it; "auto" uses .schedule, also tile-aligned).
AUTO_ROW_ALIGN = ROW_TILE
_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """The SM count "auto" overlap schedules for: the CUDA device's, else H100/H200's 132 (CPU runs and tests)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        if torch.compiler.is_compiling():
            return DEFAULT_SM_COUNT  # not queried while tracing; an eager call fills the cache
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def chunk_bounds(rows: int, chunks: int, align: int = 1) -> list[tuple[int, int]]:
    """``chunks`` contiguous row ranges covering ``rows`` (sizes differ by at most ``align``); empty ranges are
    dropped, so fewer may come back when ``rows`` is small."""
    if chunks < 1:
        raise ValueError(f"overlap chunks must be >= 1, got {chunks}")
    edges = [min(rows, round(rows * i / chunks / align) * align) for i in range(chunks + 1)]
    edges[-1] = rows
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def check_input(x: torch.Tensor, weight: torch.Tensor, features: int, name: str) -> None:
    """Raise a clear error when ``x`` cannot feed a layer whose weight is ``weight``."""
    check_like(x, weight, f"{name}: input", "the weight is")
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{name}: input has shape {tuple(x.shape)}, expected last dim {features}")


# --------------------------------------------------------------------------------------------------------------
# Column-parallel matmul: backward all-reduce of the input gradient overlapped with the weight-gradient GEMMs
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::column_parallel_matmul", mutates_args=())
def _column_parallel_matmul(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                            has_bias: list[bool], group: str) -> list[torch.Tensor]:
    """``[x @ W_i^T + b_i for i]`` for weights that share the input ``x``; ``biases`` holds the biases that exist,
    in layer order (``has_bias[i]``: layer i has one), so that every bias is a tracked tensor input. ``group``: the
    process group's name, used by the backward."""
    present = iter(biases)
    return [F.linear(x, w, next(present) if b else None) for w, b in zip(weights, has_bias)]


@_column_parallel_matmul.register_fake
def _(x, weights, biases, has_bias, group):
    return [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]


def _column_setup(ctx, inputs, output):
    x, weights, _biases, has_bias, group = inputs
    ctx.save_for_backward(x, *weights)
    ctx.group, ctx.has_bias = group, list(has_bias)


def _column_backward(ctx, grads):
    """As Megatron-Core: the input gradient ``sum_i g_i @ W_i`` first, its all-reduce launched (a functional
    collective: in eager it runs while the next lines compute; a compiled graph gets the same order), the weight
    gradients computed while it is in flight, then waited on."""
    x, *weights = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    n_bias = sum(ctx.has_bias)
    need_w, need_b = each_needs(need_w, len(grads)), each_needs(need_b, n_bias)
    dx = None
    if need_x:
        dx = sum(g @ w for g, w in zip(grads, weights) if g is not None)  # [..., in]
        dx = all_reduce_start(dx, ctx.group, phase="backward")
    x2 = x.reshape(-1, x.shape[-1])
    dws, dbs = [], []
    for i, g in enumerate(grads):
        g2 = None if g is None else g.reshape(-1, g.shape[-1])
        dws.append(g2.T @ x2 if need_w[i] and g2 is not None else None)  # overlaps the all-reduce
        if ctx.has_bias[i]:
            dbs.append(g2.sum(0) if need_b[len(dbs)] and g2 is not None else None)
    if dx is not None:
        dx = all_reduce_wait(dx)
    return dx, dws, dbs, None, None


_column_parallel_matmul.register_autograd(_column_backward, setup_context=_column_setup)


def column_parallel_linear(x: torch.Tensor, layers: Sequence[ColumnParallelLinear], group=None) -> list[torch.Tensor]:
    """Apply several column-parallel layers to one input with a single (overlapped) input-gradient all-reduce."""
    if get_world_size(group) == 1:
        return [F.linear(x, layer.weight, layer.bias) for layer in layers]
    weights = [layer.weight for layer in layers]
    has_bias = [layer.bias is not None for layer in layers]
    biases = [layer.bias for layer in layers if layer.bias is not None]
    # The name each layer resolved when it was built: no process-group lookups in code torch.compile traces.
    name = layers[0].group_name if resolve_group(group) is layers[0].group else group_name(group)
    cast = autocast_dtype(x.device)
    if cast is not None:  # as F.linear under autocast: input, weight and bias in the autocast dtype
        with autocast_off(x.device):
            return _column_parallel_matmul(x.to(cast), [w.to(cast) for w in weights],
                                           [b.to(cast) for b in biases], has_bias, name)
    return _column_parallel_matmul(x, weights, biases, has_bias, name)


# --------------------------------------------------------------------------------------------------------------
# Row-parallel matmul: chunked, each chunk's all-reduce in flight while the next chunk computes
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("tpfuse::row_parallel_linear", mutates_args=())
def _row_parallel_linear(parts: list[torch.Tensor], weight: torch.Tensor, gate: torch.Tensor | None,
                         residual: torch.Tensor | None, add_residual: bool, edges: list[int], group: str,
                         backend: str) -> torch.Tensor:
    """``residual + gate * all_reduce(cat(parts) @ W^T)`` as ``[B, S, N]``, computed in the token chunks
    ``edges[i]..edges[i+1]``: chunk i's partial product is written into its rows of the output and all-reduced
    asynchronously (NCCL on its own stream; gloo in a background thread) while chunk i+1 computes; every handle is
    waited on before the op returns. ``gate`` is applied before the reduce (it distributes over the sum) and only
    the rank passing ``add_residual`` adds ``residual``. ``group``: the process group's name (``""``: no reduce).

    One op, so a compiled graph keeps the overlap: the chunks and their collectives run inside it.
    """
    B, S = parts[0].shape[:2]
    rows, n = B * S, weight.shape[0]
    out = torch.empty((rows, n), device=weight.device, dtype=weight.dtype)
    # Rows with a unit last stride, once: a part that is not such a view (e.g. a token slice with B > 1) is
    # copied here, not once per chunk.
    parts = [p if p.is_contiguous() else p.contiguous() for p in parts]
    pg = process_group(group) if group else None
    handles = []
    if backend == "torch":
        # CPU BLAS picks other micro-kernels for small row counts (1-4 rows differ in the last bit), so per-chunk
        # GEMMs would not reproduce one GEMM: the torch path multiplies once and chunks only the reduction. The
        # Triton kernel computes every row range with the same tiles and K order, so there each chunk is its own
        # launch and overlaps the previous chunk's all-reduce.
        row_parallel_matmul_forward(parts, weight, gate, residual, add_residual, out, (0, rows), backend)
    for r0, r1 in zip(edges, edges[1:]):
        if backend != "torch":
            row_parallel_matmul_forward(parts, weight, gate, residual, add_residual, out, (r0, r1), backend)
        if pg is not None:
            _record("all_reduce", "forward", out[r0:r1])
            handles.append(dist.all_reduce(out[r0:r1], group=pg, async_op=True))
    for h in handles:
        h.wait()
    return out.view(B, S, n)


@_row_parallel_linear.register_fake
def _(parts, weight, gate, residual, add_residual, edges, group, backend):
    return weight.new_empty((*parts[0].shape[:2], weight.shape[0]))


def _row_setup(ctx, inputs, output):
    parts, weight, gate, _residual, _add, _edges, group, _backend = inputs
    ctx.save_for_backward(weight, gate, *parts)
    ctx.group = group


def _row_backward(ctx, grad):
    weight, gate, *parts = ctx.saved_tensors
    need_parts, need_w, need_gate, need_res = ctx.needs_input_grad[:4]
    need_parts = each_needs(need_parts, len(parts))
    *dparts, dweight, dgate, dres = row_parallel_matmul_backward(grad.contiguous(), parts, weight, gate,
                                                                 [*need_parts, need_w, need_gate, need_res])
    if dgate is not None and ctx.group:  # every rank held a partial sum
        dgate = all_reduce_wait(all_reduce_start(dgate, ctx.group, phase="backward"))
    return dparts, dweight, dgate, dres, None, None, None, None


_row_parallel_linear.register_autograd(_row_backward, setup_context=_row_setup)


class _ParallelLinear(nn.Linear):
    """Shared construction and sharding; subclasses say which weight dim is split.

    An ``nn.Linear`` whose ``weight`` is this rank's shard, so that what recognises linears by type (peft's LoRA,
    diffusers' layerwise casting and group offloading) sees these layers. As for any ``nn.Linear``,
    ``in_features``/``out_features`` are the dims of the (local) weight; ``input_size``/``output_size`` are the
    dense layer's (the names Megatron-Core and vLLM use).
    """

    _shard_dim: int  # dim of the [out, in] weight that is split across ranks
    _bias_sharded: bool

    def __init__(self, in_features, out_features, bias, group, device, dtype, blocks):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the dense weight
        self.group = resolve_group(group)
        self.world_size = get_world_size(self.group)
        self.rank = get_rank(self.group)
        # What tpfuse's ops address the group by, resolved here rather than in code torch.compile traces.
        self.group_name = group_name(self.group) if self.world_size > 1 else ""
        self.input_size = int(in_features)
        self.output_size = int(out_features)
        split = self.output_size if self._shard_dim == 0 else self.input_size
        what = "out_features" if self._shard_dim == 0 else "in_features"
        if split % self.world_size != 0 and blocks is None:
            raise ValueError(f"{type(self).__name__}: {what}={split} is not divisible by the world size "
                             f"{self.world_size}")
        # Global block sizes of the split dimension; the local layout is local_blocks(self.blocks, world_size).
        self.blocks = check_blocks(blocks, split, self.world_size, what=f"{type(self).__name__}.{what}")
        self.local_blocks = local_blocks(self.blocks, self.world_size)
        local = split // self.world_size
        shape = (local, self.input_size) if self._shard_dim == 0 else (self.output_size, local)
        self.out_features, self.in_features = shape  # nn.Linear's meaning: the weight this rank holds
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(local if self._bias_sharded else self.output_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init with the *global* fan-in, applied to the local shard.

        Each rank draws from its own RNG state; to reproduce a dense layer exactly, build it densely and use
        :meth:`from_dense`.
        """
        if self.weight.device.type == "meta":
            return
        bound = 1.0 / math.sqrt(self.input_size) if self.input_size > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def split_dim(self, name: str) -> int | None:
        """The dim of the dense ``weight``/``bias`` that is split across ranks (``None``: replicated) — the one
        sharding rule that ``from_dense``, the checkpoint loader and ``tpfuse verify`` all follow."""
        if name == "weight":
            return self._shard_dim
        if name == "bias":
            return 0 if self._bias_sharded else None
        raise ValueError(f"{type(self).__name__} has no parameter {name!r}")

    @classmethod
    def from_dense(cls, linear: nn.Linear, group=None, blocks: Sequence[int] | None = None, *,
                   check_weights: bool = True, broadcast_from: int | None = None, **layer_kwargs):
        """This rank's shard of a dense ``nn.Linear`` (``blocks``: packed sizes of the split dimension).

        Works on ``meta`` layers (only shapes are kept). The returned layer owns fresh storage, so the dense
        layer can be freed afterwards. ``check_weights``: first verify that every rank holds the same dense
        weight and bias (one checksum all-gather; :class:`~tpfuse.tp_layers.consistency.WeightMismatchError`
        otherwise); ``broadcast_from``: copy that rank's instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
        sync_or_check(linear, group, check_weights, broadcast_from, type(linear).__name__)
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group=group,
            device="meta",
            dtype=w.dtype,
            blocks=blocks,
            **layer_kwargs,
        )
        with torch.no_grad():
            for name in ("weight", "bias"):
                dense = getattr(linear, name)
                if dense is None:
                    continue
                dim = layer.split_dim(name)
                local = (dense.detach().clone() if dim is None else
                         shard_tensor(dense.detach(), dim, layer.rank, layer.world_size, layer.blocks))
                setattr(layer, name, nn.Parameter(local, requires_grad=dense.requires_grad))
        return layer

    def extra_repr(self) -> str:
        packed = f", blocks={self.blocks}" if len(self.blocks) > 1 else ""
        return (f"input_size={self.input_size}, output_size={self.output_size}, bias={self.bias is not None}, "
                f"world_size={self.world_size}, rank={self.rank}, local_weight={tuple(self.weight.shape)}{packed}")


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W`` split by output features; ``y`` is this rank's slice of the output.

    Args:
        gather_output: all-gather the output so every rank has all features (in the dense order, also when the
            output is packed); ``out_features`` is then that output's width (``out_features_per_partition`` the
            weight's rows).
        blocks: packed layout of the output features, e.g. ``[D, D, D, M, M]`` for ``[Q|K|V|gate|up]``.
    """

    _shard_dim = 0
    _bias_sharded = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group=None, device=None, dtype=None, blocks: Sequence[int] | None = None):
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, group, device, dtype, blocks)
        self.out_features_per_partition = self.out_features
        if gather_output:
            # The layer's output is the dense one, and out_features says so: what wraps a linear by its output
            # width (peft sizes a LoRA's lora_B by it) then builds the dense, replicated adapter it needs.
            self.out_features = self.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inputs_check_due(self, {"x": x}):
            check_inputs_agree(self, self.group, {"x": x})  # the same input on every rank (first call)
        check_input(x, self.weight, self.input_size, type(self).__name__)
        y = column_parallel_linear(x, [self], self.group)[0]  # [..., out/N]
        if self.gather_output:
            y = gather_from_tp_region(y, self.group, self.blocks)  # [..., out]
        return y


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W`` split by input features; partial sums are all-reduced, ``y`` is replicated.

    Args:
        input_is_parallel: the input is already this rank's slice (the output of a column layer). When ``False``
            the full input is split here (by ``blocks`` when packed).
        blocks: packed layout of the input features, e.g. ``[D, M]`` for ``cat(attn, mlp)``.
        overlap: ``"auto"`` or a number of token chunks C: the output is computed in C chunks and each chunk's
            all-reduce runs while the next chunk computes. ``"auto"`` picks C from the message size
            (:func:`~tpfuse.tp_layers.schedule.wave_schedule`: chunk boundaries on the GEMM's row tile, as many
            GEMM waves as one launch, front-loaded so the last chunk, whose all-reduce nothing hides, is small; 1
            below 4 MiB); ``last_chunks`` holds the count the last eager call used
            (calls traced by ``torch.compile`` leave it alone).
            The chunked GEMM is exact, so on 2 ranks any C gives bitwise the C=1 output; on 3+ ranks the
            all-reduce itself (gloo's and NCCL's ring) orders each element's sum by its position in the message,
            so outputs agree to the reordering bound of an N-term sum (a few ulp), not bitwise.

    The bias is added once, after the reduction. :meth:`forward_fused` also folds a gate and a residual into the
    reduction (``residual + gate * (x @ W^T)`` with no pass after the all-reduce).
    """

    _shard_dim = 1
    _bias_sharded = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group=None, device=None, dtype=None, blocks: Sequence[int] | None = None,
                 overlap: str | int = "auto"):
        if overlap != "auto" and not (isinstance(overlap, int) and not isinstance(overlap, bool) and overlap >= 1):
            raise ValueError(f"RowParallelLinear: overlap must be 'auto' or an int >= 1, got {overlap!r}")
        self.input_is_parallel = input_is_parallel
        self.overlap = overlap
        self.last_chunks = None
        super().__init__(in_features, out_features, bias, group, device, dtype, blocks)
        self.in_features_per_partition = self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if inputs_check_due(self, {"x": x}):
            # the same input on every rank (first call); a parallel input agrees but for its last dim
            check_inputs_agree(self, self.group, {"x": x}, sharded=("x",) if self.input_is_parallel else ())
        if not self.input_is_parallel:
            check_input(x, self.weight, self.input_size, type(self).__name__)
            x = scatter_to_tp_region(x, self.group, self.blocks)
        return self.forward_fused([x])

    def forward_fused(self, parts: Sequence[torch.Tensor], gate: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + gate * (cat(parts) @ W^T + bias)``, reduced over the group, replicated on every rank.

        ``parts`` are this rank's slices of the input (their widths sum to the local in-features, e.g.
        ``[attn, mlp]``); the cat is never materialized on the triton backend. ``gate``: ``[B, out]`` or
        ``[B, 1, out]`` (one per batch entry), or ``[B, S, out]`` (per token), ``B`` may be 1 (broadcast over the
        batch); ``residual``: ``[B, S, out]``.

        Precision: with the residual folded into the reduction, each of the all-reduce's N-1 additions rounds at
        the residual stream's magnitude; in bf16 that is up to ~(N-1) u |residual| where adding it after the
        reduce costs u |residual| (u = 2^-8). fp32 and N = 2 are unaffected in practice; pass ``residual=None``
        and add it afterwards if a bf16 run at large N needs the tighter bound.
        """
        name = type(self).__name__
        if isinstance(parts, torch.Tensor):
            parts = [parts]
        elif isinstance(parts, (list, tuple)):
            parts = list(parts)
        else:
            raise TypeError(f"{name}: parts must be a tensor or a list of tensors, got {type(parts).__name__}")
        inputs = {"parts": parts, "gate": gate, "residual": residual}
        if inputs_check_due(self, inputs):
            check_inputs_agree(self, self.group, inputs, sharded=("parts",))
        group_size = get_world_size(self.group)
        if self.weight.shape[1] * group_size != self.input_size:
            raise ValueError(f"{name}: the weight shard has {self.weight.shape[1]} of {self.input_size} input "
                             f"features, which does not match a group of size {group_size}")
        for i, p in enumerate(parts):  # the input itself first: "widths [None]" would not say what is wrong
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}: input {i} must be a torch.Tensor, got {type(p).__name__}")
            if p.dim() == 0:
                raise ValueError(f"{name}: input {i} is a 0-dim tensor; it needs a feature dim "
                                 f"(local in_features {self.in_features_per_partition})")
        widths = [p.shape[-1] for p in parts]
        if not parts or sum(widths) != self.in_features_per_partition:
            raise ValueError(f"{name}: input widths {widths} must sum to the local in_features "
                             f"{self.in_features_per_partition}")
        for i, p in enumerate(parts):
            check_input(p, self.weight, p.shape[-1], f"{name} input {i}")
        lead = parts[0].shape[:-1]
        bad = [tuple(p.shape) for p in parts if p.shape[:-1] != lead]
        if bad:
            raise ValueError(f"{name}: inputs must share their leading dims {tuple(lead)}, got {bad}")
        x3 = [p.reshape(1, -1, p.shape[-1]) if p.dim() != 3 else p for p in parts]  # [B, S, K_i]
        B, S = x3[0].shape[:2]
        for t, what in ((gate, "gate"), (residual, "residual")):
            if t is not None:
                check_input(t, self.weight, self.out_features, f"{name} {what}")
        if residual is not None and residual.shape != (B, S, self.out_features):
            raise ValueError(f"{name}: residual must be [{B}, {S}, {self.out_features}], got {tuple(residual.shape)}")
        if gate is not None and gate_layout(gate.shape, B, S, self.out_features) is None:
            raise ValueError(f"{name}: gate must be [B, out] or [B, 1, out] with B={B}, got {tuple(gate.shape)}; per "
                             f"token it must be [B, S, out] = [{B}, {S}, {self.out_features}] (B may be 1: broadcast "
                             "over the batch)")
        rows = B * S
        if self.overlap == "auto":
            # Wave-aligned, front-loaded chunks: as many GEMM waves as one launch, a small exposed last chunk.
            edges = wave_schedule(rows, self.out_features, self.in_features_per_partition, self.world_size,
                                  self.weight.element_size(), _sm_count(self.weight.device)).edges
            chunks = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
        else:
            chunks = chunk_bounds(rows, self.overlap)
        if not torch.compiler.is_compiling():  # eager only: a traced side effect would run once, at trace time
            self.last_chunks = len(chunks)
            logger.debug("%s: %d rows x %d features in %d chunk(s)", name, rows, self.out_features, len(chunks))
        edges = [0] + [r1 for _, r1 in chunks]
        backend = select_backend("row_parallel_matmul", self.weight.device)
        weight, bias, cast = self.weight, self.bias, autocast_dtype(self.weight.device)
        if cast is not None:
            # Autocast: the GEMM (and its all-reduce) in the autocast dtype, as F.linear; bias, gate and residual
            # then in torch with autocast's type promotion, as the dense block applies them.
            weight, bias, x3 = weight.to(cast), _like(bias, dtype=cast), [p.to(cast) for p in x3]
        fold = bias is None and cast is None  # gate and residual folded into the reduction
        with autocast_off(weight.device) if cast is not None else contextlib.nullcontext():
            fold_res = residual if fold else None
            y = _row_parallel_linear(x3, weight, gate if fold else None, fold_res,
                                     fold_res is not None and get_rank(self.group) == 0, edges,
                                     self.group_name if group_size > 1 else "", backend)
        if not fold:  # after the reduce, once: bias, then gate and residual in torch
            if bias is not None:
                y = y + bias
            if gate is not None:
                y = y * (gate.unsqueeze(1) if gate.dim() == 2 else gate)
            if residual is not None:
                y = y + residual
        return y.reshape(*lead, self.out_features)
