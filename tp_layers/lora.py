"""LoRA (peft) on tensor-parallel linears: each rank holds its slice of the adapter.

``ColumnParallelLinear`` and ``RowParallelLinear`` are ``nn.Linear``s whose ``in_features``/``out_features`` are
their local weight's, so peft wraps them like any linear and sizes the adapter to the shard:

column-parallel  ``W_r = W[rows of r]``: ``lora_A`` ``[rank, in]`` replicated, ``lora_B`` ``[rows of r, rank]``
                 (the same packed blocks as the weight). ``lora_B`` reads ``copy_to_tp_region(lora_A(x))``, so the
                 gradient of that ``[tokens, rank]`` intermediate (a partial sum over the rank's output rows) is
                 all-reduced:
                 ``x`` and the replicated ``lora_A`` get the full gradient, equal on every rank.
row-parallel     ``W_r = W[:, columns of r]``: ``lora_A`` ``[rank, columns of r]``, ``lora_B`` ``[out, rank]``
                 replicated. ``lora_A``'s output is a partial sum: it is all-reduced (``[tokens, rank]``, a tiny
                 message) before ``lora_B``, so the adapter's output is already replicated, like the layer's.

``fuse_lora`` adds ``lora_B @ lora_A`` to the weight: with these shapes that is exactly this rank's shard of the
dense delta. A LoRA file made for the dense model is sharded on load by :func:`shard_lora_state_dict`, which
``parallelize`` installs in front of diffusers' ``load_lora_adapter``; :func:`adapt_lora` gives the adapters of TP
linears their collectives (after ``load_lora_adapter``/``add_adapter``; call it after injecting adapters with
peft directly).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .comm import copy_to_tp_region, reduce_from_tp_region
from .linear import ColumnParallelLinear, RowParallelLinear, _ParallelLinear
from .sharding import shard_tensor

__all__ = [
    "adapt_lora",
    "check_adapters",
    "install_lora_loaders",
    "is_lora_layer",
    "shard_linear",
    "shard_lora_state_dict",
]

# Key markers of the two LoRA matrices in the formats diffusers accepts (peft, and the unet/kohya style it converts).
_A_MARKERS = (".lora_A.", ".lora.down.", ".lora_down.")
_B_MARKERS = (".lora_B.", ".lora.up.", ".lora_up.")


class LoRAOutputShard(nn.Linear):
    """``lora_B`` of a column-parallel layer: this rank's output rows; its input's gradient is all-reduced."""

    tp_group = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp_region(h, self.tp_group), self.weight, self.bias)


class LoRAInputShard(nn.Linear):
    """``lora_A`` of a row-parallel layer: this rank's input columns; its output is all-reduced."""

    tp_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp_region(F.linear(x, self.weight, self.bias), self.tp_group)


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer (``lora_A``/``lora_B`` around a ``base_layer``)."""
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "get_base_layer")


def _tp_base(module: nn.Module) -> _ParallelLinear | None:
    if is_lora_layer(module):
        module = module.get_base_layer()
    return module if isinstance(module, _ParallelLinear) else None


def _refuse_variants(layer: nn.Module, name: str, world_size: int) -> None:
    if world_size == 1:  # nothing spans ranks: every peft variant computes what it computes on the dense layer
        return
    dora = getattr(layer, "use_dora", {}) or {}
    magnitude = getattr(layer, "lora_magnitude_vector", None)
    if any(dora.values()) or (magnitude is not None and len(magnitude)):
        raise NotImplementedError(f"{name}: DoRA adapters on tensor-parallel layers are not supported (the weight "
                                  "norm spans ranks); use plain LoRA, or fuse the adapter before parallelize")
    for kind in ("lora_embedding_A", "lora_variant"):
        if getattr(layer, kind, None):
            raise NotImplementedError(f"{name}: peft {kind} adapters on tensor-parallel layers are not supported")


def _convert(module: nn.Linear, cls: type, group) -> None:
    if type(module) is not cls:
        if type(module) is not nn.Linear:
            raise TypeError(f"cannot give a LoRA matrix of type {type(module).__name__} tensor-parallel collectives")
        module.__class__ = cls
    module.tp_group = group


def adapt_lora(model: nn.Module) -> int:
    """Give every LoRA adapter on a tensor-parallel linear its collectives; returns how many layers it touched."""
    count = 0
    for name, module in model.named_modules():
        base = _tp_base(module) if is_lora_layer(module) else None
        if base is None:
            continue
        _refuse_variants(module, name, base.world_size)
        for adapter in module.lora_A:
            if isinstance(base, ColumnParallelLinear):
                _convert(module.lora_B[adapter], LoRAOutputShard, base.group)
            elif isinstance(base, RowParallelLinear):
                _convert(module.lora_A[adapter], LoRAInputShard, base.group)
        count += 1
    return count


def check_adapters(linears) -> None:
    """Raise if a LoRA adapter on one of these tensor-parallel linears lacks its collectives (peft injected it
    after ``parallelize`` without :func:`adapt_lora`): on 2+ ranks it would compute a wrong result silently."""
    for lin in linears:
        if not is_lora_layer(lin):
            continue
        base = lin.get_base_layer()
        if not isinstance(base, _ParallelLinear) or base.world_size == 1:
            continue
        mats = lin.lora_B if isinstance(base, ColumnParallelLinear) else lin.lora_A
        want = LoRAOutputShard if isinstance(base, ColumnParallelLinear) else LoRAInputShard
        if any(not isinstance(m, want) for m in mats.values()):
            raise RuntimeError("a LoRA adapter was added to a tensor-parallel layer without its collectives; load "
                               "adapters with load_lora_adapter/load_lora_weights/add_adapter on the parallelized "
                               "model, or call tpfuse.tp_layers.adapt_lora(model) after injecting them with peft")


def _shard_matrix(t: torch.Tensor, base: _ParallelLinear, dim: int, key: str) -> torch.Tensor:
    """``t`` (a LoRA matrix or bias) sharded along ``dim`` like ``base``'s weight; already-local tensors pass."""
    dense = base.output_size if dim == 0 else base.input_size
    local = base.out_features if dim == 0 else base.in_features
    size = t.shape[dim] if t.dim() > dim else None
    if size == dense and dense != local:
        return shard_tensor(t, dim, base.rank, base.world_size, base.blocks)
    if size == local:
        return t
    raise ValueError(f"LoRA tensor {key!r} has shape {tuple(t.shape)}: dim {dim} should be the dense layer's "
                     f"{dense} (or this rank's {local})")


def _lora_target(model: nn.Module, key: str, prefix: str | None) -> tuple[str, _ParallelLinear | None]:
    """(``'A'``/``'B'``/``''``, the tensor-parallel linear the key's adapter sits on)."""
    name = key.removeprefix(f"{prefix}.") if prefix else key
    for side, markers in (("A", _A_MARKERS), ("B", _B_MARKERS)):
        for marker in markers:
            if marker in name:
                path = name.split(marker)[0]
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    return side, None
                return side, _tp_base(module)
    return "", None


def shard_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                          prefix: str | None = None) -> dict[str, torch.Tensor]:
    """This rank's slice of a dense-model LoRA state dict: for column-parallel layers ``lora_B`` (and its bias) by
    the weight's packed row blocks, for row-parallel layers ``lora_A`` by its column blocks; all else as is."""
    out = {}
    for key, value in state_dict.items():
        side, base = _lora_target(model, key, prefix)
        if base is not None and isinstance(value, torch.Tensor):
            if side == "B" and isinstance(base, ColumnParallelLinear):
                value = _shard_matrix(value, base, 0, key)
            elif side == "A" and isinstance(base, RowParallelLinear) and key.endswith("weight"):
                value = _shard_matrix(value, base, 1, key)
        out[key] = value
    return out


def shard_linear(cls: type[_ParallelLinear], dense: nn.Module, group, blocks=None, **kwargs) -> nn.Module:
    """``cls.from_dense(dense)``, also for a peft LoRA layer around a dense linear: its base layer becomes the
    tensor-parallel shard and each adapter is sharded to match (the wrapper is kept, so peft still manages it)."""
    if not is_lora_layer(dense):
        return cls.from_dense(dense, group, blocks, **kwargs)
    base = cls.from_dense(dense.get_base_layer(), group, blocks, **kwargs)
    _refuse_variants(dense, type(dense).__name__, base.world_size)
    with torch.no_grad():
        for adapter in list(dense.lora_A):
            a, b = dense.lora_A[adapter], dense.lora_B[adapter]
            if cls is ColumnParallelLinear:
                b.weight = nn.Parameter(_shard_matrix(b.weight.detach(), base, 0, f"{adapter}.lora_B"),
                                        requires_grad=b.weight.requires_grad)
                if b.bias is not None:
                    b.bias = nn.Parameter(_shard_matrix(b.bias.detach(), base, 0, f"{adapter}.lora_B.bias"),
                                          requires_grad=b.bias.requires_grad)
                b.out_features = base.out_features
            else:
                a.weight = nn.Parameter(_shard_matrix(a.weight.detach(), base, 1, f"{adapter}.lora_A"),
                                        requires_grad=a.weight.requires_grad)
                a.in_features = base.in_features
    dense.base_layer = base
    dense.in_features, dense.out_features = base.in_features, base.out_features
    adapt_lora(dense)
    return dense


# --------------------------------------------------------------------------------------------------------------
# diffusers' loaders on a parallelized model
# --------------------------------------------------------------------------------------------------------------

_FETCH_KEYS = ("weight_name", "use_safetensors", "local_files_only", "cache_dir", "force_download", "proxies",
               "token", "revision", "subfolder")


def _load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False,
                       **kwargs: Any):
    """diffusers' ``load_lora_adapter`` with the (dense) state dict sharded for this rank first."""
    source = pretrained_model_name_or_path_or_dict
    if not isinstance(source, dict):
        from diffusers.loaders.lora_base import _fetch_state_dict

        fetch = {k: kwargs.pop(k, None) for k in _FETCH_KEYS}
        source, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source, user_agent={"file_type": "attn_procs_weights",
                                                                      "framework": "pytorch"},
            allow_pickle=False, metadata=kwargs.pop("metadata", None), **fetch)
        kwargs["metadata"] = metadata
    source = shard_lora_state_dict(self, source, prefix)
    result = type(self).load_lora_adapter(self, source, prefix=prefix, hotswap=hotswap, **kwargs)
    adapt_lora(self)
    return result


def _add_adapter(self, *args, **kwargs):
    result = type(self).add_adapter(self, *args, **kwargs)
    adapt_lora(self)
    return result


def install_lora_loaders(model: nn.Module) -> None:
    """Route the model's adapter entry points (diffusers' ``load_lora_adapter``, which the pipelines'
    ``load_lora_weights`` calls, and ``add_adapter``) through the sharding above."""
    if hasattr(type(model), "load_lora_adapter"):
        model.load_lora_adapter = types.MethodType(_load_lora_adapter, model)
    if hasattr(type(model), "add_adapter"):
        model.add_adapter = types.MethodType(_add_adapter, model)
