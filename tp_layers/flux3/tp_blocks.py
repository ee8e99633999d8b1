"""Tensor-parallel FLUX.3 blocks: diffusers' ``Flux3ModeTransformerBlock`` and ``Flux3SingleTransformerBlock``
sharded in place.

Both block kinds are "parallel" blocks: attention and feed-forward read one modulated input and their outputs are
summed before the gate. The plan, per block:

``attn.to_q/to_k/to_v`` + ``ff.linear_in`` (SwiGLU, ``[gate | up]``)   column: ONE projection (see below)
``attn.to_out.0`` + ``ff.linear_out``                                   row: ONE gated all-reduce of their sum
``attn.norm_q/norm_k``                                                  replicated, fp32 (``_keep_in_fp32_modules``),
                                                                        gradient summed over the group
``norm`` and the per-token modulation                                   replicated

The four column weights stay diffusers' four parameters, but their shards are consecutive rows of one tensor
(:mod:`..packing`), so ``fused_qkv_mlp_proj`` reads them as the packed ``[Q | K | V | gate | up]`` weight without a
copy in inference: one GEMM whose epilogue does the Q/K RMSNorm (fp32 scales, fp32 math), RoPE, SwiGLU and the
head-major Q/K/V. The two row layers are ONE row-parallel GEMM over ``[attn | mlp]`` (each part read with its own
weight, no cat of ``to_out`` and ``linear_out``) with the per-token gate and the residual in its epilogue, chunked
and all-reduced once (:func:`..joint_row.joint_row_parallel`; a single block's text and image rows, each with its own
gate and residual, share that one all-reduce). The per-token modulation (``[B, S, D]`` shift/scale) runs in
``layernorm_modulate``.

The attention module's ``heads`` becomes the *local* head count: diffusers' ``Flux3AttnProcessor`` reshapes by
``attn.heads``, so every path that calls modules (LoRA, hooks, a user's processor) runs diffusers' code on the
shards and stays exact. ``global_heads`` keeps the dense count.
"""

from __future__ import annotations

import torch
from torch import nn

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate
from tpfuse.kernels._dispatch import resolve_backend
from tpfuse.kernels.fused_qkv_mlp_proj import SUPPORTED_HEAD_DIMS

from .._flavour import resolve
from ..comm import copy_to_tp_region, get_world_size, resolve_group
from ..consistency import check_inputs_agree, inputs_check_due
from ..joint_row import joint_row_parallel
from ..linear import ColumnParallelLinear, RowParallelLinear, check_input
from ..lora import check_adapters
from ..packing import packed_rows, share_rows
from ..tp_attention import (
    HeadRMSNorm,
    TPHeadsMixin,
    attention_heads_major,
    check_divisible,
    describe_ties,
    diffusers_flavour,
    hooked,
    modules_at,
    plain,
    shard_in_block,
    tied_parameters,
    transparent_base,
)

__all__ = ["TPFlux3Attention", "TPFlux3ModeBlock", "TPFlux3SingleBlock", "shard_block"]

_MODULE = "diffusers.models.transformers.transformer_flux3"
_DENSE = {"Flux3ModeTransformerBlock": "mode", "Flux3SingleTransformerBlock": "single"}
_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in", "ff.linear_out")


class TPFlux3Attention(TPHeadsMixin):
    """diffusers' ``Flux3Attention`` with sharded projections; ``heads`` is this rank's head count."""


class _TPFlux3Block:
    group = None
    _linear_paths = tuple(tuple(n.split(".")) for n in _LINEARS)

    def _pre_forward(self, inputs) -> bool:
        """Adapter and cross-rank input checks; whether the fused path applies."""
        linears = modules_at(self, self._linear_paths)
        check_adapters(linears)
        if not torch.compiler.is_compiling() and inputs_check_due(self, inputs):
            check_inputs_agree(self, self.group, inputs)
        attn, ff = self.attn, self.ff
        proc = getattr(attn, "processor", None)
        dropout = attn.to_out[1] if len(attn.to_out) > 1 else None
        return (type(proc).__name__ == "Flux3AttnProcessor" and type(proc).__module__ == _MODULE
                and not getattr(attn, "fused_projections", False) and plain(*linears)
                and not any(hooked(m) for m in (attn, ff, ff.act_fn, self.norm, attn.norm_q, attn.norm_k))
                and all(transparent_base(m).bias is None for m in linears)  # the fused path has no biases
                and isinstance(self.norm, nn.LayerNorm) and self.norm.weight is None
                and type(ff.act_fn).__name__ == "Flux3SwiGLU" and isinstance(attn.norm_q, HeadRMSNorm)
                and isinstance(attn.norm_k, HeadRMSNorm) and attn.norm_q.eps == attn.norm_k.eps
                and not (isinstance(dropout, nn.Dropout) and dropout.p > 0 and dropout.training)
                and (attn.head_dim in SUPPORTED_HEAD_DIMS
                     or resolve_backend("fused_qkv_mlp_proj", attn.norm_q.weight.device) != "triton"))

    def tp_after_load(self) -> None:
        """Make the four column shards consecutive rows of one tensor again (called after sharding, and by the
        loader after it assigned new tensors), so the fused projection reads them without a copy."""
        cols = [transparent_base(m) for m in (self.attn.to_q, self.attn.to_k, self.attn.to_v, self.ff.linear_in)]
        if all(isinstance(m, ColumnParallelLinear) for m in cols):
            share_rows(cols)

    def _attn_and_mlp(self, x: torch.Tensor, image_rotary_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's attention output and SwiGLU activation for ``x``: ``[B, S, H_local*D]``, ``[B, S, M_local]``
        (one fused projection; the row reduce is left to the caller)."""
        attn, ff = self.attn, self.ff
        cols = [transparent_base(m) for m in (attn.to_q, attn.to_k, attn.to_v, ff.linear_in)]
        check_input(x, cols[0].weight, cols[0].input_size, type(self).__name__)
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        q, k, v, mlp = fused_qkv_mlp_proj(  # q, k, v: [B, H_local, S, D]; mlp: [B, S, M_local] = silu(gate) * up
            copy_to_tp_region(x, self.group), packed_rows(cols), attn.norm_q.tp_weight(), attn.norm_k.tp_weight(),
            cos, sin, attn.local_heads, attn.head_dim, cols[3].local_blocks[0], attn.norm_q.eps_for(torch.float32))
        proc = attn.processor
        a = attention_heads_major(q, k, v, None, proc._attention_backend, proc._parallel_config)  # [B, S, H_l*D]
        return a, mlp

    def _row_pair(self):
        """``to_out.0`` and ``ff.linear_out``: one row-parallel GEMM over ``[attn | mlp]`` with each part's own
        weight, reduced once (:func:`joint_row_parallel` with a layer per part)."""
        return (transparent_base(self.attn.to_out[0]), transparent_base(self.ff.linear_out))


def _norm_modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(1 + scale) * norm(x) + shift`` with per-token ``[B, S, D]`` shift/scale, one kernel (rows read with unit
    stride: the chunks of the modulation are strided views, made contiguous here)."""
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    return layernorm_modulate(x, shift, scale, norm.eps)


class TPFlux3ModeBlock(_TPFlux3Block):
    """A sharded ``Flux3ModeTransformerBlock`` (a flavour of it); same ``forward``."""

    def forward(self, hidden_states, temb_mod, image_rotary_emb):
        if not self._pre_forward({"hidden_states": hidden_states, "temb_mod": temb_mod,
                                  "image_rotary_emb": image_rotary_emb}):
            return super().forward(hidden_states, temb_mod, image_rotary_emb)
        shift, scale, gate = torch.chunk(temb_mod, 3, dim=-1)  # [B, S, D] each: per-token modulation
        x = _norm_modulate(self.norm, hidden_states, shift, scale)
        a, mlp = self._attn_and_mlp(x, image_rotary_emb)
        # residual + gate * (a W_o^T + mlp W_f^T): the per-token gate and the residual folded into one reduce
        return joint_row_parallel([self._row_pair()], [[a, mlp]], [gate], [hidden_states])[0]


class TPFlux3SingleBlock(_TPFlux3Block):
    """A sharded ``Flux3SingleTransformerBlock`` (a flavour of it); same ``forward``."""

    def forward(self, hidden_states, encoder_hidden_states, temb_mod, temb_mod_context, image_rotary_emb):
        if not self._pre_forward({"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                                  "temb_mod": temb_mod, "temb_mod_context": temb_mod_context,
                                  "image_rotary_emb": image_rotary_emb}):
            return super().forward(hidden_states, encoder_hidden_states, temb_mod, temb_mod_context,
                                   image_rotary_emb)
        shift, scale, gate = torch.chunk(temb_mod, 3, dim=-1)
        c_shift, c_scale, c_gate = torch.chunk(temb_mod_context, 3, dim=-1)
        x = _norm_modulate(self.norm, hidden_states, shift, scale)
        c = _norm_modulate(self.norm, encoder_hidden_states, c_shift, c_scale)
        a, mlp = self._attn_and_mlp(torch.cat([c, x], dim=1), image_rotary_emb)  # [B, St + Si, ...]
        t = encoder_hidden_states.shape[1]
        # Both streams' rows, each with its own per-token gate and residual, in ONE all-reduce.
        context_out, content_out = joint_row_parallel(
            [self._row_pair()] * 2, [[a[:, :t], mlp[:, :t]], [a[:, t:], mlp[:, t:]]], [c_gate, gate],
            [encoder_hidden_states, hidden_states])
        return context_out, content_out


def check_block(block: nn.Module, world_size: int) -> None:
    """What :func:`shard_block` refuses, without sharding anything (the family runs it on every block first)."""
    kind = _DENSE.get(type(block).__name__) if type(block).__module__ == _MODULE else None
    if kind is None:
        raise TypeError(f"flux3.shard_block expects {_MODULE}.{' or '.join(_DENSE)}, got "
                        f"{type(block).__module__}.{type(block).__name__}")
    ties = tied_parameters(block)
    if ties:
        raise ValueError(f"flux3.shard_block: {describe_ties(ties)}")
    if getattr(block.attn, "fused_projections", False):
        raise ValueError("flux3.shard_block: the attention's projections are fused (fuse_projections()); call "
                         "unfuse_projections() before parallelizing")
    check_divisible(world_size, num_attention_heads=block.attn.heads,
                    mlp_hidden=block.ff.linear_in.out_features // 2)


def shard_block(block: nn.Module, group=None) -> nn.Module:
    """Shard a diffusers FLUX.3 block (mode or single) for this rank, in place, and return it (the weights must
    already agree across ranks: :func:`~tpfuse.tp_layers.parallelize` checks them first)."""
    group = resolve_group(group)
    world_size = get_world_size(group)
    check_block(block, world_size)
    kind = _DENSE[type(block).__name__]
    attn, ff = block.attn, block.ff
    heads = attn.heads
    mlp_hidden = ff.linear_in.out_features // 2
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, shard_in_block(ColumnParallelLinear, getattr(attn, name), group))
    attn.to_out[0] = shard_in_block(RowParallelLinear, attn.to_out[0], group)
    attn.norm_q = HeadRMSNorm.from_dense(attn.norm_q, group)
    attn.norm_k = HeadRMSNorm.from_dense(attn.norm_k, group)
    ff.linear_in = shard_in_block(ColumnParallelLinear, ff.linear_in, group, [mlp_hidden, mlp_hidden])
    ff.linear_out = shard_in_block(RowParallelLinear, ff.linear_out, group)
    attn.__class__ = diffusers_flavour(TPFlux3Attention, type(attn), __name__)
    attn.group, attn.global_heads, attn.local_heads = group, heads, heads // world_size
    attn.heads = heads // world_size  # diffusers' processor reshapes by attn.heads
    attn.inner_dim = attn.heads * attn.head_dim
    block.__class__ = diffusers_flavour(TPFlux3ModeBlock if kind == "mode" else TPFlux3SingleBlock, type(block),
                                        __name__)
    block.group = group
    block.tp_after_load()
    return block


def __getattr__(name: str):  # pickle finds the flavours by their __qualname__
    bases = {c.__name__: c for c in (TPFlux3ModeBlock, TPFlux3SingleBlock, TPFlux3Attention)}
    return resolve(name, bases, lambda cls, dense: diffusers_flavour(cls, dense, __name__))
