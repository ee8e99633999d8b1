"""The family-generic pieces of tensor-parallel attention blocks (no model family here).

Every family's TP blocks (:mod:`.flux2`, :mod:`.qwenimage`, :mod:`.flux3`) are built from these:

* :class:`HeadRMSNorm` / :class:`TPHeadNorm`: a replicated per-head Q/K norm whose weight gradient is summed over
  the group (each rank only sees its own heads, so its gradient is a partial sum);
* :class:`TPHeadsMixin`: attention over this rank's heads, with per-head masks cut to the local heads;
* :func:`diffusers_flavour`: a TP module that is also an instance of the diffusers class it replaces (``isinstance``,
  ``AttentionModuleMixin``, diffusers' block registry for caching hooks);
* :func:`hooked`, :func:`transparent_base`, :func:`plain`: when a fused path may read a module's weights instead of
  calling it (no hooks, no active LoRA);
* :func:`attention`, :class:`Projection`: diffusers' attention dispatch, and an out-projection left to the block so
  it can fold the gate and the residual into the row-parallel reduce;
* :func:`check_divisible`: one error listing the valid world sizes;
* :func:`tied_parameters` / :func:`describe_ties`: tied weights cannot be sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from ._flavour import flavour
from .comm import copy_to_tp_region, get_rank, get_world_size, resolve_group
from .linear import ColumnParallelLinear, RowParallelLinear
from .lora import shard_linear
from .sequence import SequenceParallel

__all__ = ["AttentionMaskError", "HeadRMSNorm", "Projection", "TPHeadNorm", "TPHeadsMixin", "attention",
           "attention_heads_major", "check_divisible", "describe_ties", "diffusers_flavour", "hooked", "modules_at",
           "perturb_norms",
           "plain", "shard_in_block", "shared_eps", "tied_parameters", "transparent_base", "valid_world_sizes"]


_UNLOADED = object()
_DISPATCH: Any = _UNLOADED


def _dispatch_attention_fn():
    """diffusers' ``dispatch_attention_fn`` (attention backends), or ``None`` without diffusers.

    Looked up once, by the attention modules' constructors, so that code traced by ``torch.compile`` only reads a
    global (a ``functools.cache`` wrapper made dynamo warn on every trace, an import inside it would break the
    graph)."""
    global _DISPATCH
    if _DISPATCH is _UNLOADED:
        try:
            from diffusers.models.attention_dispatch import dispatch_attention_fn as found
        except ImportError:
            found = None
        _DISPATCH = found
    return _DISPATCH


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend=None, parallel_config=None) -> torch.Tensor:
    """Attention on ``[B, S, H, D]`` inputs, returning ``[B, S, H*D]``: diffusers' ``dispatch_attention_fn`` (the
    ``backend`` a processor was given, else the active one; ``attention_backend(...)`` chooses it), SDPA without
    diffusers. ``parallel_config`` a :class:`~tpfuse.tp_layers.sequence.SequenceParallel` (a model on a mesh with
    sp > 1): Ulysses, the all-to-alls around the same call."""
    if isinstance(parallel_config, SequenceParallel):
        out = parallel_config.attend(lambda q_, k_, v_, m_: _attention(q_, k_, v_, m_, backend, None), q, k, v, mask)
    else:
        out = _attention(q, k, v, mask, backend, parallel_config)
    return out.flatten(2, 3).to(q.dtype)


def _attention(q, k, v, mask, backend, parallel_config) -> torch.Tensor:  # [B, S, H, D] -> [B, S, H, D]
    dispatch = _dispatch_attention_fn()
    if dispatch is None:
        if backend is not None:
            raise RuntimeError(f"attention backend {backend!r} needs diffusers installed")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)
    return dispatch(q, k, v, attn_mask=mask, backend=backend, parallel_config=parallel_config)


def attention_heads_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                          backend=None, parallel_config=None) -> torch.Tensor:
    """:func:`attention` on ``[B, H, S, D]`` inputs: passed as ``[B, S, H, D]`` views, which the native backend
    permutes back, so SDPA reads them without a copy."""
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, backend, parallel_config)


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: a diffusers/accelerate hook (they replace
    ``forward`` on the instance: caching, offloading, layerwise casting), a torch forward or backward hook on it, or
    a global module hook. Fused paths that read a module's weights without calling it are only taken when this is
    False."""
    return ("forward" in module.__dict__ or bool(module._forward_hooks) or bool(module._forward_pre_hooks)
            or bool(module._backward_hooks) or bool(module._backward_pre_hooks)
            or bool(torch_module._global_forward_hooks) or bool(torch_module._global_forward_pre_hooks)
            or bool(torch_module._global_backward_hooks) or bool(torch_module._global_backward_pre_hooks))


def transparent_base(module: nn.Module) -> nn.Module:
    """What calling ``module`` computes exactly: the base layer of a peft LoRA ``Linear`` whose forward is just
    ``self.base_layer(x)`` (peft's ``LoraLayer.forward``: adapters merged into the weight by ``fuse_lora`` and not
    disabled, or disabled with none merged; disabled *and* merged unmerges first, a side effect), recursively;
    otherwise ``module`` itself. Fused paths gate on this, so that a fused LoRA takes the fused kernels; a wrapper
    with hooks is not transparent."""
    # peft's own class only, by name (peft stays optional): a subclass may compute something else.
    while (type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer"
           and not hooked(module) and bool(module.merged) != bool(module.disable_adapters)):
        module = module.base_layer
    return module


class Projection:
    """An out-projection not applied yet: ``proj(cat(parts))``. Blocks fold their gate and residual into it."""

    __slots__ = ("parts", "proj")

    def __init__(self, proj: nn.Module, parts: Sequence[torch.Tensor]):
        self.proj, self.parts = proj, list(parts)

    def materialize(self) -> torch.Tensor:
        # The class's own method only: a wrapper (peft) forwarding attribute lookups must not be bypassed, unless
        # it computes exactly its base layer (a fused LoRA).
        proj = transparent_base(self.proj)
        if hasattr(type(proj), "forward_fused") and not hooked(proj):
            return proj.forward_fused(self.parts)  # a row-parallel layer reads the parts without a cat
        return self.proj(self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=-1))


def _materialize(out):
    return out.materialize() if isinstance(out, Projection) else out


def modules_at(root: nn.Module, paths: Sequence[tuple[str, ...]]) -> list[nn.Module]:
    """The submodules of ``root`` at ``paths`` (each a tuple of names), by direct ``_modules`` lookups: a block's
    per-call adapter check reads them on every forward, and ``get_submodule`` costs ~10 us a name."""
    out = []
    for path in paths:
        m = root
        for part in path:
            m = m._modules[part]
        out.append(m)
    return out


def perturb_norms(module: nn.Module, scale: float = 0.1) -> None:
    """Add ``scale * N(0, 1)`` to every parameter named ``*norm*`` (norm scales default to 1, which would make
    their gradients and any mix-up of Q and K scales invisible to a check)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(scale * torch.randn_like(p))


def tied_parameters(module: nn.Module) -> list[list[str]]:
    """The names of each Parameter that ``module`` holds under two or more names (tied weights), one list per
    Parameter, sorted."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(sorted(n) for n in names.values() if len(n) > 1)


def describe_ties(ties: list[list[str]]) -> str:
    """Why tied weights are refused, and the remedy. Supporting them is not possible in general: the two uses may
    be sharded differently (a column and a row layer, a block weight and a replicated module), and where the shards
    would coincide every loader, checksum, save and LoRA path would still have to keep the tie; FLUX.2 ties no
    weights."""
    shown = "; ".join(" is ".join(t) for t in ties[:3]) + (" ..." if len(ties) > 3 else "")
    return (f"tied weights (one Parameter under several names) cannot be sharded: {shown}. Each tensor-parallel "
            "layer holds its own copy or shard of its weight and cannot keep the tie; untie them before sharding "
            "by giving each name its own Parameter (e.g. `attn.to_k.weight = "
            "nn.Parameter(attn.to_k.weight.detach().clone())`)")


def register_block(flavour: type, dense_cls: type) -> None:
    """diffusers' hooks look blocks up by exact class: register the flavour with the dense class's metadata."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(dense_cls)
    except (ImportError, ValueError):  # an older diffusers, or a class its hooks do not know
        return
    TransformerBlockRegistry.register(flavour, dataclasses.replace(meta, _cls=None, _cached_parameter_indices=None))


def diffusers_flavour(tp_cls: type, dense_cls: type, module: str | None = None) -> type:
    """``tp_cls``, also deriving from the diffusers class it replaces (``Flux2TransformerBlock``,
    ``Flux2Attention``, ...), so that ``isinstance`` checks, ``AttentionModuleMixin`` (``set_attention_backend``)
    and diffusers' block registry (caching hooks) see the dense family's module. tpfuse's own method resolution
    comes first: ``forward`` is the tensor-parallel one. Blocks are registered with the dense class's hook metadata."""
    if not dense_cls.__module__.startswith("diffusers."):
        return tp_cls
    # ``module``: where pickle finds the flavour (that module's ``__getattr__`` resolves it); tp_cls's by default.
    return flavour(tp_cls, dense_cls, module or tp_cls.__module__, on_create=register_block)


def valid_world_sizes(*sizes: int, up_to: int = 64) -> list[int]:
    """The world sizes (up to ``up_to``) that divide every one of ``sizes``."""
    return [n for n in range(1, up_to + 1) if all(s % n == 0 for s in sizes)]


def check_divisible(world_size: int, **sizes: int) -> None:
    """Refuse a world size that does not divide every named size, listing the world sizes that would."""
    bad = {k: v for k, v in sizes.items() if v % world_size != 0}
    if bad:
        desc = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise ValueError(f"cannot shard across {world_size} ranks: {desc} not divisible by the world size (valid "
                         f"world sizes: {valid_world_sizes(*sizes.values())})")


class HeadRMSNorm(nn.RMSNorm):
    """RMSNorm over ``head_dim`` whose (replicated) weight gets the gradient summed over the group's heads."""

    group = None

    @classmethod
    def from_dense(cls, norm: nn.RMSNorm, group=None) -> HeadRMSNorm:
        if not isinstance(norm, nn.RMSNorm) or norm.weight is None:
            raise TypeError(f"expected an nn.RMSNorm with a weight, got {norm!r}")
        new = cls(norm.normalized_shape, eps=norm.eps, device="meta", dtype=norm.weight.dtype)
        new.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=norm.weight.requires_grad)
        new.group = resolve_group(group)
        return new

    def tp_weight(self) -> torch.Tensor:
        """The weight as seen by this rank's heads: identity forward, gradient all-reduced backward."""
        return copy_to_tp_region(self.weight, self.group)

    def eps_for(self, dtype: torch.dtype) -> float:
        return self.eps if self.eps is not None else torch.finfo(dtype).eps  # nn.RMSNorm's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.tp_weight(), self.eps)


def shared_eps(a: HeadRMSNorm, b: HeadRMSNorm, dtype: torch.dtype) -> float | None:
    """One eps for a fused Q/K norm, or None when Q and K were built with different ones."""
    ea, eb = a.eps_for(dtype), b.eps_for(dtype)
    return ea if ea == eb else None


class AttentionMaskError(ValueError, RuntimeError):
    """An attention mask that does not fit the attention scores. Also a ``RuntimeError``: what the dense block's
    attention raises for the same mask, so code written against the dense block catches it."""


class TPHeadsMixin:
    """Attention over this rank's heads: ``global_heads`` is the dense count, ``local_heads`` this rank's
    (``heads`` is whichever of the two the family's processors expect: FLUX.2's and Qwen-Image's the global one,
    diffusers' FLUX.3 processor the local one)."""

    group = None
    global_heads: int
    local_heads: int

    def _local_mask(self, mask, batch: int, q_len: int, kv_len: int):
        """This rank's part of an attention mask, accepted and refused exactly as the dense block's attention
        does: a mask of 3+ dims broadcasts against the scores ``[B, heads, Sq, Skv]`` with the *global* head
        count (a ``[B, S, S]`` mask with B != 1 and B != heads is an error there, not a per-head mask here)."""
        if mask is None or mask.dim() < 3 or self.local_heads == self.global_heads:
            return mask  # 2-D masks are the backend's business, the same on every rank; one rank: dense's path
        scores = (batch, self.global_heads, q_len, kv_len)
        try:
            ok = torch.broadcast_shapes(tuple(mask.shape), scores) == scores
        except RuntimeError:
            ok = False
        if not ok:
            raise AttentionMaskError(f"attention_mask of shape {tuple(mask.shape)} does not broadcast to the "
                                     f"attention scores [batch, heads, q_len, kv_len] = {list(scores)} (the dense "
                                     "block refuses it too)")
        if mask.dim() == 3:
            mask = mask.unsqueeze(0)  # [heads|1, Sq, Skv]: the leading dim lines up with the heads
        if mask.shape[1] == self.global_heads:
            start = get_rank(self.group) * self.local_heads
            mask = mask[:, start:start + self.local_heads]  # a per-head mask: keep this rank's heads
        return mask

    def _attend(self, q, k, v, mask, backend=None, parallel_config=None):
        # q, k, v: [B, S, H_local, Dh] (FLUX.2's blocks; the other families call diffusers' processors)
        mask = self._local_mask(mask, q.shape[0], q.shape[1], k.shape[1])
        return super()._attend(q, k, v, mask, backend, parallel_config)

    def fuse_projections(self, *args, **kwargs):
        """Refused on 2+ ranks: diffusers' fused ``to_qkv`` would be a plain ``nn.Linear`` over this rank's Q/K/V
        rows, without the input-gradient all-reduce of a column-parallel layer (wrong input gradients,
        per-rank-shaped state dict). On one rank nothing is sharded: diffusers' own."""
        if get_world_size(self.group) == 1:
            return super().fuse_projections(*args, **kwargs)
        raise NotImplementedError(f"{type(self).__name__}.fuse_projections: fused Q/K/V projections are not supported "
                                  "on a tensor-parallel model (tpfuse's fused path already reads Q, K and V in one "
                                  "GEMM where it applies)")


def shard_in_block(cls, dense, group, blocks=None):
    """A linear's shard inside a block: the block's ``from_dense`` already checked (or broadcast) its weights."""
    return shard_linear(cls, dense, group, blocks, check_weights=False)


def plain(*linears) -> bool:
    """Tensor-parallel linears that fused code may read directly (through :func:`transparent_base`: a LoRA wrapper
    whose adapters are merged counts as its base layer): not wrapped by an active adapter, and not hooked."""
    return all(isinstance(lin, (ColumnParallelLinear, RowParallelLinear)) and not hooked(lin)
               for lin in map(transparent_base, linears))


class TPHeadNorm:
    """diffusers' ``RMSNorm`` over ``head_dim`` (Qwen-Image's Q/K norms), tensor-parallel like :class:`HeadRMSNorm`:
    the replicated weight (and bias) get their gradients summed over the group. Built by :meth:`from_dense` as a
    flavour of the dense norm's class (``isinstance`` holds, parameter names are kept)."""

    group = None

    @classmethod
    def from_dense(cls, norm: nn.Module, group=None):
        if not all(hasattr(norm, a) for a in ("eps", "dim", "weight", "bias")):
            raise TypeError(f"TPHeadNorm.from_dense expects diffusers' RMSNorm, got {type(norm).__name__}")
        new = object.__new__(diffusers_flavour(cls, type(norm), __name__))
        nn.Module.__init__(new)
        new.eps, new.dim = norm.eps, norm.dim
        new.elementwise_affine = getattr(norm, "elementwise_affine", norm.weight is not None)
        for name in ("weight", "bias"):
            p = getattr(norm, name)
            setattr(new, name, None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        new.group = resolve_group(group)
        return new

    def tp_weight(self) -> torch.Tensor | None:
        """The weight as seen by this rank's heads: identity forward, gradient all-reduced backward."""
        return None if self.weight is None else copy_to_tp_region(self.weight, self.group)

    def eps_for(self, dtype: torch.dtype) -> float:
        return self.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # diffusers' RMSNorm (0.42, non-NPU path) with the group-reduced weight and bias.
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        if self.weight is None:
            return hidden_states.to(input_dtype)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        hidden_states = hidden_states * self.tp_weight()
        if self.bias is not None:
            hidden_states = hidden_states + copy_to_tp_region(self.bias, self.group)
        return hidden_states


def __getattr__(name: str):  # pickle finds the flavours by their __qualname__
    from ._flavour import resolve

    return resolve(name, {"TPHeadNorm": TPHeadNorm}, lambda cls, dense: diffusers_flavour(cls, dense, __name__))
