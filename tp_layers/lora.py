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

import os
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


def _local_delta_weight(self, adapter: str) -> torch.Tensor:
    """peft's ``get_delta_weight`` of a LoRA on a dense-io layer (see :func:`_dense_io`), cut to the rows this rank's
    weight holds: what ``merge``/``unmerge`` (``fuse_lora``) add to and subtract from it."""
    delta = type(self).get_delta_weight(self, adapter)  # [out, in], the dense update
    base = self.get_base_layer()
    return shard_tensor(delta, 0, base.rank, base.world_size, base.blocks)


def _dense_io(base: _ParallelLinear) -> bool:
    """A parallel layer whose input and output are both the dense layer's (a ColumnParallelLinear with
    ``gather_output``, e.g. Qwen-Image's sharded adaLN): its LoRA adapter stays dense and replicated — input and
    output replicated, so every rank computes the same update and the same gradients, with no collective."""
    return bool(getattr(base, "gather_output", False))


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


class RankSyncedDropout(nn.Dropout):
    """Dropout whose mask is the same on every rank of the group: a column-parallel layer's LoRA input is
    replicated, and per-rank masks would give the replicated ``lora_A`` different gradients on each rank (its
    copies would drift apart). The mask comes from a generator seeded with a seed shared at :func:`adapt_lora` plus
    a call counter (every rank calls the layer equally often), so no communication is needed per call."""

    tp_seed = 0
    tp_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        gen = torch.Generator(device=x.device)
        gen.manual_seed(self.tp_seed + self.tp_calls)
        self.tp_calls += 1
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """A view of ``t`` the collectives accept: 1-byte floats (fp8 storage under layerwise casting) as bytes."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _broadcast_(tensor: torch.Tensor, group) -> None:
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        dist.broadcast(_wire(tensor.data), src=src, group=group)


def adapt_lora(model: nn.Module) -> int:
    """Give every LoRA adapter on a tensor-parallel linear its collectives; returns how many layers it touched.

    A collective on 2+ ranks (every rank calls it): the replicated adapter matrices (a column layer's ``lora_A``,
    a row layer's ``lora_B``) are broadcast from the group's first rank, so that a randomly initialised adapter is
    the same everywhere, and a column layer's LoRA dropout gets a rank-synchronised mask."""
    count = 0
    for name, module in model.named_modules():
        base = _tp_base(module) if is_lora_layer(module) else None
        if base is None:
            continue
        _refuse_variants(module, name, base.world_size)
        if base.world_size > 1 and not getattr(base, "input_is_parallel", True):
            raise NotImplementedError(f"{name}: LoRA on a RowParallelLinear with input_is_parallel=False is not "
                                      "supported (the layer's input width is not its weight's)")
        dense_io = _dense_io(base)
        if dense_io and getattr(module.get_delta_weight, "__func__", None) is not _local_delta_weight:
            # merge/unmerge (fuse_lora) add the delta to the base weight, which holds this rank's rows only
            module.get_delta_weight = types.MethodType(_local_delta_weight, module)
        for adapter in module.lora_A:
            column = isinstance(base, ColumnParallelLinear)
            if not dense_io:  # a dense-io layer's adapter stays dense and replicated, with no collective
                if column:
                    _convert(module.lora_B[adapter], LoRAOutputShard, base.group)
                else:
                    _convert(module.lora_A[adapter], LoRAInputShard, base.group)
            if base.world_size == 1:
                continue
            replicated = (*module.lora_A[adapter].parameters(), *module.lora_B[adapter].parameters()) if dense_io \
                else (module.lora_A[adapter] if column else module.lora_B[adapter]).parameters()
            for p in replicated:
                _broadcast_(p, base.group)
            drop = module.lora_dropout[adapter] if hasattr(module, "lora_dropout") else None
            if column and isinstance(drop, nn.Dropout) and not isinstance(drop, RankSyncedDropout):
                # the input is replicated: every rank must drop the same entries (or the copies drift apart)
                seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
                _broadcast_(seed, base.group)
                drop.__class__ = RankSyncedDropout
                drop.tp_seed, drop.tp_calls = int(seed), 0
        count += 1
    return count


def check_adapters(linears) -> None:
    """Raise if a LoRA adapter on one of these tensor-parallel linears lacks its collectives (peft injected it
    after ``parallelize`` without :func:`adapt_lora`): on 2+ ranks it would compute a wrong result silently.
    Runs on every block call: plain parallel linears (no wrapper) return at once."""
    if all(type(lin) in (ColumnParallelLinear, RowParallelLinear) for lin in linears):
        return
    for lin in linears:
        if not hasattr(lin, "get_base_layer"):  # not wrapped by a peft tuner
            continue
        base = lin.get_base_layer()
        if not isinstance(base, _ParallelLinear) or base.world_size == 1 or (is_lora_layer(lin) and _dense_io(base)):
            continue
        if not is_lora_layer(lin):
            raise NotImplementedError(f"a {type(lin).__module__}.{type(lin).__name__} adapter sits on a "
                                      "tensor-parallel layer: only LoRA adapters are sharded (each rank would add "
                                      "an unreduced partial update)")
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
    if size == dense:
        return t if dense == local else shard_tensor(t, dim, base.rank, base.world_size, base.blocks)
    hint = (" (it looks like one rank's shard: save adapters of a parallelized model with save_lora_adapter or "
            "tpfuse.tp_layers.lora_state_dict, which gather them)" if size == local else "")
    raise ValueError(f"LoRA tensor {key!r} has shape {tuple(t.shape)}: dim {dim} should be the dense layer's "
                     f"{dense}{hint}")


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


def _sharded_dim(model: nn.Module, key: str, prefix: str | None) -> tuple[_ParallelLinear | None, int | None]:
    """(the TP linear a LoRA key's tensor belongs to, the dim of that tensor split across ranks or ``None``): a
    column layer's ``lora_B`` (and bias) by rows, a row layer's ``lora_A`` weight by columns."""
    side, base = _lora_target(model, key, prefix)
    if base is not None and _dense_io(base):
        return base, None
    if side == "B" and isinstance(base, ColumnParallelLinear):
        return base, 0
    if side == "A" and isinstance(base, RowParallelLinear) and key.endswith("weight"):
        return base, 1
    return base, None


def shard_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor],
                          prefix: str | None = None) -> dict[str, torch.Tensor]:
    """This rank's slice of a dense-model LoRA state dict: for column-parallel layers ``lora_B`` (and its bias) by
    the weight's packed row blocks, for row-parallel layers ``lora_A`` by its column blocks; all else as is."""
    out = {}
    for key, value in state_dict.items():
        base, dim = _sharded_dim(model, key, prefix)
        if dim is not None and isinstance(value, torch.Tensor):
            value = _shard_matrix(value, base, dim, key)
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
        for adapter in list(dense.lora_A) if not _dense_io(base) else []:
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
    if not _dense_io(base):  # peft's view of the layer: what its adapters read and write
        dense.in_features, dense.out_features = base.in_features, base.out_features
    adapt_lora(dense)
    return dense


# --------------------------------------------------------------------------------------------------------------
# diffusers' adapter entry points on a parallelized model (called by tp_layers.model.TPModelMixin)
# --------------------------------------------------------------------------------------------------------------

_FETCH_KEYS = ("weight_name", "use_safetensors", "local_files_only", "cache_dir", "force_download", "proxies",
               "token", "revision", "subfolder")
# peft initialisations computed from the weight (SVD, quantization error, ...): on a shard they would give each
# rank an adapter that is not a slice of the dense model's.
_WEIGHT_DERIVED_INITS = ("pissa", "olora", "loftq", "eva", "corda", "orthogonal")


def load_lora_adapter(model, base_method, source, prefix="transformer", hotswap=False, **kwargs: Any):
    """diffusers' ``load_lora_adapter`` (``base_method``) with the dense state dict sharded for this rank first."""
    if not isinstance(source, dict):
        from diffusers.loaders.lora_base import _fetch_state_dict

        fetch = {k: kwargs.pop(k, None) for k in _FETCH_KEYS}
        source, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=source, user_agent={"file_type": "attn_procs_weights",
                                                                      "framework": "pytorch"},
            allow_pickle=False, metadata=kwargs.pop("metadata", None), **fetch)
        kwargs["metadata"] = metadata
    if getattr(model, "tp_world_size", 1) > 1 and any(".lokr_" in k for k in source):
        raise NotImplementedError("LoKr adapters cannot be sharded over tensor-parallel ranks; fuse them into a dense "
                                  "model before parallelize")
    source = shard_lora_state_dict(model, source, prefix)
    result = base_method(source, prefix=prefix, hotswap=hotswap, **kwargs)
    adapt_lora(model)
    return result


def check_new_adapter(model: nn.Module, config) -> None:
    """Refuse, before peft builds it, an adapter that cannot be sharded (2+ ranks)."""
    if getattr(model, "tp_world_size", 1) == 1:
        return
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_WEIGHT_DERIVED_INITS):
        raise NotImplementedError(f"init_lora_weights={init!r} is computed from the weight: on tensor-parallel "
                                  "shards it would not be a slice of the dense adapter; initialise on the dense model "
                                  "and parallelize it, or load the adapter from a file")
    if type(config).__name__ != "LoraConfig":
        raise NotImplementedError(f"{type(config).__name__} adapters on tensor-parallel layers are not supported "
                                  "(only LoRA is sharded)")


def init_new_adapter(model: nn.Module, adapter_name: str, config) -> None:
    """A freshly initialised adapter as the dense model would draw it: a row-parallel layer's ``lora_A`` slice with
    the dense fan-in (peft's default Kaiming bound 1/sqrt(fan_in) used the local one)."""
    for module in model.modules():
        base = _tp_base(module) if is_lora_layer(module) else None
        if isinstance(base, RowParallelLinear) and adapter_name in module.lora_A and base.world_size > 1:
            if getattr(config, "init_lora_weights", True) is True:  # peft's default: Kaiming-uniform A
                with torch.no_grad():
                    module.lora_A[adapter_name].weight.mul_((base.in_features / base.input_size) ** 0.5)


def unshard_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense-model LoRA state dict from every rank's (a collective: every rank calls it with the same keys)."""
    import torch.distributed as dist

    from .sharding import unshard_tensors

    out = {}
    for key, value in state_dict.items():
        base, dim = _sharded_dim(model, key, None)
        if dim is None or base.world_size == 1 or value.dim() <= dim:
            out[key] = value
            continue
        shards = [torch.empty_like(value) for _ in range(base.world_size)]
        dist.all_gather([_wire(s) for s in shards], _wire(value.contiguous()), group=base.group)
        out[key] = unshard_tensors(shards, dim, base.blocks)
    return out


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The dense-model state dict of an adapter of a parallelized model (peft keys; a collective): what
    ``save_lora_adapter`` writes, and what a pipeline's ``save_lora_weights(transformer_lora_layers=...)`` needs."""
    from peft.utils import get_peft_model_state_dict

    return unshard_lora_state_dict(model, get_peft_model_state_dict(model, adapter_name=adapter_name))


def save_lora_adapter(model, save_directory, adapter_name="default", upcast_before_saving=False,
                      safe_serialization=True, weight_name=None, is_main_process=True) -> None:
    """diffusers' ``save_lora_adapter`` for a parallelized model, a collective: every rank calls it (the adapter's
    shards are gathered) and ONE rank writes the dense adapter, in diffusers' format, so that it loads into a dense
    model or at any world size: rank 0, or more exactly the first rank with ``is_main_process`` for each distinct
    (host, folder), as :func:`tpfuse.tp_layers.save_pretrained` chooses its writers. The file is written under a
    temporary name unique to the process, fsynced and renamed into place; any rank's failure is raised on every
    rank."""
    import json

    import safetensors.torch
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_SAFE

    from .comm import get_rank, get_world_size
    from .consistency import describe_error
    from .save import _share, _writers, atomic_write

    if adapter_name is None:
        adapter_name = next(iter(getattr(model, "peft_config", {}) or {"default": None}))
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"Adapter name {adapter_name} not found in the model.")
    group = getattr(model, "tp_group", None)
    rank, world = get_rank(group), get_world_size(group)
    state = lora_state_dict(model, adapter_name)
    if upcast_before_saving:
        state = {k: v.float() for k, v in state.items()}
    target = os.path.realpath(os.fspath(save_directory))
    writers, _, _ = _writers(group, world, rank, target, is_main_process, None)
    error = None
    if rank in writers:
        try:
            if os.path.isfile(target):
                raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
            os.makedirs(target, exist_ok=True)
            path = os.path.join(target, weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else
                                                        LORA_WEIGHT_NAME))
            state = {k: v.contiguous() for k, v in state.items()}
            if safe_serialization:
                config = {k: list(v) if isinstance(v, set) else v
                          for k, v in model.peft_config[adapter_name].to_dict().items()}
                metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
                atomic_write(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=metadata))
            else:
                atomic_write(path, lambda tmp: torch.save(state, tmp))
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            error = describe_error(exc)
    _share(error, group, world, f"saving adapter {adapter_name!r} to {save_directory}", what="save_lora_adapter",
           outcome="an adapter file already at that path is unchanged")
