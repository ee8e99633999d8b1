"""Column- and row-parallel linear layers.

Column-parallel: the weight ``[out, in]`` is split by output features, each rank computes its slice of the
output; no communication forward, an all-reduce of the input gradient backward. Row-parallel: the weight is split
by input features, the input arrives already split (the output of a column layer), each rank computes a partial
sum; an all-reduce forward, nothing backward. ``column -> (shard-safe ops) -> row`` is the tensor-parallel pair.

Both layers know a *packed* layout (``blocks``): the column layer's output features, or the row layer's input
features, may be a concatenation of logical blocks (``[Q, K, V, gate, up]``), each of which is sharded on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .comm import (
    copy_to_tp_region,
    gather_from_tp_region,
    get_rank,
    get_world_size,
    reduce_from_tp_region,
    resolve_group,
    scatter_to_tp_region,
)
from .sharding import check_blocks, local_blocks, shard_tensor

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "check_input"]


def check_input(x: torch.Tensor, weight: torch.Tensor, features: int, name: str) -> None:
    """Raise a clear error when ``x`` cannot feed a layer whose weight is ``weight``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if weight.device.type != "meta" and x.device != weight.device:
        raise ValueError(f"{name}: input is on {x.device} but the weight is on {weight.device}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} differs from the weight dtype {weight.dtype}")
    if x.dim() == 0 or x.shape[-1] != features:
        raise ValueError(f"{name}: input has shape {tuple(x.shape)}, expected last dim {features}")


class _ParallelLinear(nn.Module):
    """Shared construction and sharding; subclasses say which weight dim is split."""

    _shard_dim: int  # dim of the [out, in] weight that is split across ranks
    _bias_sharded: bool

    def __init__(self, in_features, out_features, bias, group, device, dtype, blocks):
        super().__init__()
        self.group = resolve_group(group)
        self.world_size = get_world_size(self.group)
        self.rank = get_rank(self.group)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        split = self.out_features if self._shard_dim == 0 else self.in_features
        what = "out_features" if self._shard_dim == 0 else "in_features"
        if split % self.world_size != 0 and blocks is None:
            raise ValueError(f"{type(self).__name__}: {what}={split} is not divisible by the world size "
                             f"{self.world_size}")
        # Global block sizes of the split dimension; the local layout is local_blocks(self.blocks, world_size).
        self.blocks = check_blocks(blocks, split, self.world_size, what=f"{type(self).__name__}.{what}")
        self.local_blocks = local_blocks(self.blocks, self.world_size)
        local = split // self.world_size
        shape = (local, self.in_features) if self._shard_dim == 0 else (self.out_features, local)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(local if self._bias_sharded else self.out_features, **factory))
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
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_dense(cls, linear: nn.Linear, group=None, blocks: Sequence[int] | None = None, **layer_kwargs):
        """This rank's shard of a dense ``nn.Linear`` (``blocks``: packed sizes of the split dimension).

        Works on ``meta`` layers (only shapes are kept). The returned layer owns fresh storage, so the dense
        layer can be freed afterwards.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_dense expects an nn.Linear, got {type(linear).__name__}")
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
            layer.weight = nn.Parameter(
                shard_tensor(w.detach(), layer._shard_dim, layer.rank, layer.world_size, layer.blocks),
                requires_grad=w.requires_grad,
            )
            if linear.bias is not None:
                b = linear.bias.detach()
                b = shard_tensor(b, 0, layer.rank, layer.world_size, layer.blocks) if cls._bias_sharded else b.clone()
                layer.bias = nn.Parameter(b, requires_grad=linear.bias.requires_grad)
        return layer

    def extra_repr(self) -> str:
        packed = f", blocks={self.blocks}" if len(self.blocks) > 1 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"world_size={self.world_size}, rank={self.rank}, local_weight={tuple(self.weight.shape)}{packed}")


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W`` split by output features; ``y`` is this rank's slice of the output.

    Args:
        gather_output: all-gather the output so every rank has all features (in the dense order, also when the
            output is packed).
        blocks: packed layout of the output features, e.g. ``[D, D, D, M, M]`` for ``[Q|K|V|gate|up]``.
    """

    _shard_dim = 0
    _bias_sharded = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 group=None, device=None, dtype=None, blocks: Sequence[int] | None = None):
        self.gather_output = gather_output
        super().__init__(in_features, out_features, bias, group, device, dtype, blocks)
        self.out_features_per_partition = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.weight, self.in_features, type(self).__name__)
        x = copy_to_tp_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # [..., out/N]
        if self.gather_output:
            y = gather_from_tp_region(y, self.group, self.blocks)  # [..., out]
        return y


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with ``W`` split by input features; partial sums are all-reduced, ``y`` is replicated.

    Args:
        input_is_parallel: the input is already this rank's slice (the output of a column layer). When ``False``
            the full input is split here (by ``blocks`` when packed).
        blocks: packed layout of the input features, e.g. ``[D, M]`` for ``cat(attn, mlp)``.

    The bias is added once, after the reduction.
    """

    _shard_dim = 1
    _bias_sharded = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 group=None, device=None, dtype=None, blocks: Sequence[int] | None = None):
        self.input_is_parallel = input_is_parallel
        super().__init__(in_features, out_features, bias, group, device, dtype, blocks)
        self.in_features_per_partition = self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            check_input(x, self.weight, self.in_features_per_partition, type(self).__name__)
        else:
            check_input(x, self.weight, self.in_features, type(self).__name__)
            x = scatter_to_tp_region(x, self.group, self.blocks)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.group)  # [..., out], replicated
        if self.bias is not None:
            y = y + self.bias
        return y
