"""Tensor-parallel Qwen-Image blocks: diffusers' ``QwenImageTransformerBlock`` sharded in place.

Plan, per block (60 two-stream blocks in Qwen-Image; everything else in the model is replicated):

``attn.to_q/to_k/to_v``, ``attn.add_q_proj/add_k_proj/add_v_proj``   column (bias sharded with the rows)
``attn.to_out.0``, ``attn.to_add_out``                                 row (bias added once, after the reduce)
``img_mlp/txt_mlp.net.0.proj``                                         column; GELU(tanh) on the local slice
``img_mlp/txt_mlp.net.2``                                              row
``img_mod.1``, ``txt_mod.1`` (adaLN, ``D -> 6D``)                       column, output all-gathered
``attn.norm_q/norm_k/norm_added_q/norm_added_k``, the LayerNorms        replicated (Q/K norm gradients summed)

The adaLN modulation is 12 of a block's 36 D^2 weights (attention 8, MLPs 16): replicated, it would leave each rank
(24/N + 12)/36 of the block — 0.67 at TP 2, 6.8B of Qwen-Image's 20B parameters on every rank, the difference
between fitting a 24 GB card at TP 2 or not. Sharded by output features with the ``[B, 6D]`` output all-gathered,
it costs two all-gathers of 6D/N values per sample per block (microseconds, latency-bound) and holds 1/N; a LoRA
on it stays dense and replicated (input and output are replicated, so no collective is needed for it).

The block is sharded *in place*: its linears are swapped for parallel ones (the dense weights are dropped one by
one), and the block, its attention module and its default processor become flavours of diffusers' classes
(``isinstance`` holds; parameter names, hooks, LoRA, ``set_attention_backend`` and regional compilation see
diffusers' modules). diffusers' own processor already works on local heads (it reshapes by ``head_dim`` with ``-1``
heads), so every path that calls modules — LoRA, hooks, a user's processor, the ``zero_cond_t``/``modulate_index``
per-token modulation — runs diffusers' code on the shards and stays exact.

Where the block is plain (no hooks, no active adapter, tpfuse's default processor, one modulation row per batch
entry), the TP forward runs the fused ops instead of diffusers' eager ones:

* ``img_norm1/txt_norm1/...`` + ``x * (1 + scale) + shift``  ->  ``layernorm_modulate``
* per stream ``to_q/k/v`` (+ bias), Q/K RMSNorm + Qwen's complex RoPE, then ``cat`` of text and image Q/K/V  ->
  ``joint_qkv_proj``: each stream's GEMM with the norm + RoPE in its epilogue, written head-major into the joint
  Q/K/V (Qwen's ``freqs_cis`` multiply is RoPE on interleaved pairs with ``cos = Re``, ``sin = Im``); where the
  projections carry LoRA or hooks, the modules are called and ``qk_norm_rope_joint`` does the rest
* ``net[0]`` (``proj`` + GELU(tanh))  ->  ``fused_linear_act`` (the GELU in the GEMM's epilogue, bias included)
* ``residual + gate * out_proj(attn)`` for both streams  ->  ONE row-parallel reduce (:func:`joint_row_parallel`:
  gates, residuals and biases folded in); the same for the two MLP outputs: 2 all-reduces per block, not 4 (the
  last block, whose text output the model drops, reduces its streams one by one: see ``text_output_used``)
"""

from __future__ import annotations

import torch
from torch import nn

from tpfuse.kernels import fused_linear_act, joint_qkv_proj, layernorm_modulate, qk_norm_rope_joint
from tpfuse.kernels._dispatch import resolve_backend
from tpfuse.kernels.fused_qkv_mlp_proj import SUPPORTED_HEAD_DIMS

from .._flavour import resolve
from ..comm import copy_to_tp_region, get_world_size, resolve_group
from ..consistency import check_inputs_agree, inputs_check_due
from ..linear import ColumnParallelLinear, RowParallelLinear, check_input, column_parallel_linear
from ..joint_row import joint_row_parallel
from ..lora import check_adapters, shard_linear
from ..tp_attention import (
    TPHeadNorm,
    TPHeadsMixin,
    attention,
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

__all__ = ["TPQwenImageAttention", "TPQwenImageBlock", "TPQwenDoubleStreamAttnProcessor", "shard_block"]

_DENSE_BLOCK = ("diffusers.models.transformers.transformer_qwenimage", "QwenImageTransformerBlock")
_DENSE_PROCESSOR = "QwenDoubleStreamAttnProcessor2_0"
_COLUMN = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


def _qwen_rope(image_rotary_emb, txt_len: int, img_len: int) -> bool:
    """Whether ``image_rotary_emb`` is None or Qwen's ``(img_freqs, txt_freqs)``: complex ``[Si, D/2]`` and
    ``[St, D/2]`` (what the fused path takes; anything else goes to diffusers' processor)."""
    if image_rotary_emb is None:
        return True
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        return False
    img, txt = image_rotary_emb
    return (isinstance(img, torch.Tensor) and isinstance(txt, torch.Tensor) and img.is_complex() and txt.is_complex()
            and img.dim() == 2 and txt.dim() == 2 and img.shape[0] == img_len and txt.shape[0] == txt_len)


def _rope_cos_sin(image_rotary_emb):
    """Qwen's ``(img_freqs, txt_freqs)`` (see :func:`_qwen_rope`) as the joint ``[St + Si, D]`` ``(cos, sin)`` of RoPE
    on interleaved pairs (text rows first, as the joint sequence); ``(None, None)`` without RoPE."""
    if image_rotary_emb is None:
        return None, None
    img, txt = image_rotary_emb
    freqs = torch.cat([txt, img], dim=0)  # [St + Si, D/2]
    return (freqs.real.float().repeat_interleave(2, dim=-1).contiguous(),
            freqs.imag.float().repeat_interleave(2, dim=-1).contiguous())


class TPQwenDoubleStreamAttnProcessor:
    """tpfuse's default Qwen-Image processor (a flavour of diffusers' ``QwenDoubleStreamAttnProcessor2_0``): the
    same outputs, with one fused QK-norm + RoPE kernel writing the joint Q/K/V. ``parts`` returns the attention
    outputs before the out-projections, so the block can fold its gates and residuals into the row reduce; any
    input it cannot fuse goes to diffusers' own ``__call__``."""

    _attention_backend = None
    _parallel_config = None

    @staticmethod
    def fusable(attn) -> bool:
        norms = [getattr(attn, n, None) for n in _NORMS]
        return (not hooked(attn) and all(isinstance(n, TPHeadNorm) and not hooked(n) and n.weight is not None
                                         and n.bias is None for n in norms)
                and norms[0].eps == norms[1].eps and norms[2].eps == norms[3].eps and attn.head_dim % 2 == 0)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if not (encoder_hidden_states is not None and attention_mask is None and self.fusable(attn)
                and self.takes(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, image_rotary_emb)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)  # diffusers' processor (also its errors)
        img, txt = self.parts(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                              image_rotary_emb)
        img = attn.to_out[0](img)
        if len(attn.to_out) > 1:
            img = attn.to_out[1](img)  # dropout
        return img, attn.to_add_out(txt)

    @staticmethod
    def takes(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, image_rotary_emb) -> bool:
        """Whether :meth:`parts` computes what diffusers' processor does for these inputs: Qwen's RoPE frequencies
        (or none), and no mask or a boolean one (diffusers concatenates a float mask as given, an additive mask;
        the model itself always passes a boolean one)."""
        mask = encoder_hidden_states_mask
        return ((mask is None or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool))
                and _qwen_rope(image_rotary_emb, encoder_hidden_states.shape[1], hidden_states.shape[1]))

    def parts(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None,
              image_rotary_emb=None):
        """``(image [B, Si, H_local*D], text [B, St, H_local*D])`` attention outputs before the out-projections, for
        inputs :meth:`takes` accepts."""
        txt_len, img_len = encoder_hidden_states.shape[1], hidden_states.shape[1]
        cos, sin = _rope_cos_sin(image_rotary_emb)
        attention_mask = None
        if encoder_hidden_states_mask is not None:  # as diffusers builds it: [B, 1, 1, St + Si], image all True
            image_mask = torch.ones((hidden_states.shape[0], img_len), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None]
        d = attn.head_dim
        img_lin, txt_lin = [getattr(attn, n) for n in _COLUMN[:3]], [getattr(attn, n) for n in _COLUMN[3:]]
        if _joint_projection_fits(attn, hidden_states, img_lin + txt_lin):
            # Each stream's Q/K/V GEMM (+ bias) with the QK RMSNorm + RoPE epilogue, head-major straight into the
            # joint [B, H_l, St + Si, D] Q/K/V: no projection written and read back, no cat.
            img_lin, txt_lin = [transparent_base(m) for m in img_lin], [transparent_base(m) for m in txt_lin]
            check_input(hidden_states, img_lin[0].weight, img_lin[0].input_size, type(attn).__name__)
            check_input(encoder_hidden_states, txt_lin[0].weight, txt_lin[0].input_size, type(attn).__name__)
            biased = img_lin[0].bias is not None
            q, k, v = joint_qkv_proj(
                [copy_to_tp_region(encoder_hidden_states, attn.group), copy_to_tp_region(hidden_states, attn.group)],
                [[m.weight for m in txt_lin], [m.weight for m in img_lin]],
                [attn.norm_added_q.tp_weight(), attn.norm_q.tp_weight()],
                [attn.norm_added_k.tp_weight(), attn.norm_k.tp_weight()], cos, sin, attn.local_heads, d,
                [attn.norm_added_q.eps, attn.norm_q.eps],
                biases=[[m.bias for m in txt_lin], [m.bias for m in img_lin]] if biased else None)
            out = attention_heads_major(q, k, v, attention_mask, self._attention_backend,
                                        self._parallel_config)  # [B, St + Si, H_l*D]
            return out[:, txt_len:], out[:, :txt_len]
        q, k, v = (t.unflatten(-1, (-1, d)) for t in _qkv(attn, hidden_states, _COLUMN[:3]))  # [B, Si, H_l, D]
        cq, ck, cv = (t.unflatten(-1, (-1, d)) for t in _qkv(attn, encoder_hidden_states, _COLUMN[3:]))
        # Per stream: RMSNorm with the stream's scales, RoPE with the stream's rows, all written with V into the
        # joint [B, St + Si, H_local, D] Q, K and V (one kernel, no torch.cat on Triton).
        q, k, v = qk_norm_rope_joint(
            (cq, q), (ck, k), (cv, v), (attn.norm_added_q.tp_weight(), attn.norm_q.tp_weight()),
            (attn.norm_added_k.tp_weight(), attn.norm_k.tp_weight()), cos, sin,
            (attn.norm_added_q.eps, attn.norm_q.eps))
        out = attention(q, k, v, attention_mask, self._attention_backend, self._parallel_config)  # [B, S, H_l*D]
        return out[:, txt_len:], out[:, :txt_len]


def _joint_projection_fits(attn, x, linears) -> bool:
    """The fused joint projection applies: plain linears (no LoRA, no hooks), all with a bias or none, and on
    Triton a head width the kernel supports."""
    if not plain(*linears) or len({transparent_base(m).bias is None for m in linears}) != 1:
        return False
    return (attn.head_dim in SUPPORTED_HEAD_DIMS
            or resolve_backend("joint_qkv_proj", x.device) != "triton")


def _mlp_hidden(mlp, x: torch.Tensor) -> torch.Tensor:
    """``net[0](x)`` of a Qwen-Image MLP (diffusers' ``GELU``: a column-parallel ``proj`` then GELU(tanh)), with the
    GELU in the GEMM's epilogue where ``proj`` is plain: the ``[tokens, 4D/N]`` projection is never written."""
    act = mlp.net[0]
    proj = act.proj
    if not plain(proj) or getattr(act, "approximate", None) != "tanh" or type(act).__name__ != "GELU":
        return act(x)
    proj = transparent_base(proj)
    check_input(x, proj.weight, proj.input_size, type(mlp).__name__)
    return fused_linear_act(copy_to_tp_region(x, proj.group), proj.weight, proj.bias, "gelu_tanh")


def _qkv(attn, x, names):
    linears = [getattr(attn, n) for n in names]
    if not plain(*linears):
        return [lin(x) for lin in linears]  # LoRA or hooks: each module called
    linears = [transparent_base(lin) for lin in linears]
    check_input(x, linears[0].weight, linears[0].input_size, type(attn).__name__)
    # Q, K and V read the same input: one input-gradient all-reduce per stream instead of three.
    return column_parallel_linear(x, linears, attn.group)


class TPQwenImageAttention(TPHeadsMixin):
    """diffusers' ``Attention`` of a Qwen-Image block with sharded projections: ``heads`` and ``inner_dim`` are this
    rank's (what diffusers' processors reshape by), ``global_heads`` the dense count."""


class TPQwenImageBlock:
    """A sharded ``QwenImageTransformerBlock`` (a flavour of it): the fused forward where the block is plain,
    diffusers' own forward on the shards otherwise."""

    group = None
    # False where the model drops the block's text output (its last block): the streams are then reduced one by one,
    # so the text branch gets no gradient at all, as in the dense model, instead of zeros from a joint reduce.
    text_output_used = True
    _linear_names = (tuple(f"attn.{n}" for n in _COLUMN) + ("attn.to_out.0", "attn.to_add_out")
                     + tuple(f"{m}.net.{i}" for m in ("img_mlp", "txt_mlp") for i in ("0.proj", "2"))
                     + ("img_mod.1", "txt_mod.1"))
    _linear_paths = tuple(tuple(n.split(".")) for n in _linear_names)

    def _fusable(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
                 modulate_index, joint_attention_kwargs) -> bool:
        attn = self.attn
        proc = getattr(attn, "processor", None)
        # zero_cond_t (the edit models) modulates per token through modulate_index: diffusers' forward
        if (modulate_index is not None or self.zero_cond_t or joint_attention_kwargs
                or not isinstance(proc, TPQwenDoubleStreamAttnProcessor)
                or type(proc).__call__ is not TPQwenDoubleStreamAttnProcessor.__call__ or not proc.fusable(attn)):
            return False
        if not all(isinstance(t, torch.Tensor) and t.dim() == d for t, d in
                   ((hidden_states, 3), (encoder_hidden_states, 3), (temb, 2))):
            return False
        batch = hidden_states.shape[0]
        if encoder_hidden_states.shape[0] != batch or temb.shape[0] != batch:
            return False  # broadcasting batches: diffusers' forward broadcasts them
        if not proc.takes(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, image_rotary_emb):
            return False
        rows = [attn.to_out[0], attn.to_add_out, self.img_mlp.net[2], self.txt_mlp.net[2]]
        mlps = [self.img_mlp, self.txt_mlp, self.img_mlp.net[0], self.txt_mlp.net[0]]
        dropouts = [m for m in (*attn.to_out[1:], self.img_mlp.net[1], *self.img_mlp.net[3:], self.txt_mlp.net[1],
                                *self.txt_mlp.net[3:]) if isinstance(m, nn.Dropout)]
        norms = (self.img_norm1, self.img_norm2, self.txt_norm1, self.txt_norm2)
        return (plain(*rows) and not any(hooked(m) for m in (*mlps, *norms))
                and all(isinstance(n, nn.LayerNorm) and n.weight is None for n in norms)
                and not any(d.p > 0 and d.training for d in dropouts) and len(self.img_mlp.net) == 3
                and len(self.txt_mlp.net) == 3)

    def _reduce(self, rows, inputs, gates, residuals):
        return _reduce_streams(self, rows, inputs, gates, residuals)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                image_rotary_emb=None, joint_attention_kwargs=None, modulate_index=None):
        check_adapters(modules_at(self, self._linear_paths))
        inputs = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                  "encoder_hidden_states_mask": encoder_hidden_states_mask, "temb": temb,
                  "joint_attention_kwargs": joint_attention_kwargs, "modulate_index": modulate_index}
        if not torch.compiler.is_compiling() and inputs_check_due(self, inputs):
            check_inputs_agree(self, self.group, inputs)
        if not self._fusable(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
                             modulate_index, joint_attention_kwargs):
            return super().forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb,
                                   image_rotary_emb, joint_attention_kwargs, modulate_index)
        attn = self.attn
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)  # [B, 3D] each
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        (s1, c1, g1), (s2, c2, g2) = img_mod1.chunk(3, dim=-1), img_mod2.chunk(3, dim=-1)  # [B, D] each
        (ts1, tc1, tg1), (ts2, tc2, tg2) = txt_mod1.chunk(3, dim=-1), txt_mod2.chunk(3, dim=-1)

        x = _norm_modulate(self.img_norm1, hidden_states, s1, c1)
        c = _norm_modulate(self.txt_norm1, encoder_hidden_states, ts1, tc1)
        img_attn, txt_attn = attn.processor.parts(attn, x, c, encoder_hidden_states_mask, image_rotary_emb)
        # residual + gate * (attn @ W_out^T + b) for both streams, ONE all-reduce with the gates, residuals and
        # biases folded in (then the same for the two MLPs): 2 reductions per block instead of 4
        hidden_states, encoder_hidden_states = self._reduce(
            [attn.to_out[0], attn.to_add_out], [img_attn, txt_attn], [g1, tg1], [hidden_states, encoder_hidden_states])
        x = _norm_modulate(self.img_norm2, hidden_states, s2, c2)
        c = _norm_modulate(self.txt_norm2, encoder_hidden_states, ts2, tc2)
        hidden_states, encoder_hidden_states = self._reduce(
            [self.img_mlp.net[2], self.txt_mlp.net[2]], [_mlp_hidden(self.img_mlp, x), _mlp_hidden(self.txt_mlp, c)],
            [g2, tg2], [hidden_states, encoder_hidden_states])
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def _reduce_streams(block, rows, inputs, gates, residuals):
    """``residual + gate * row(input)`` per stream, reduced over the group: ONE all-reduce for both streams
    (:func:`joint_row_parallel`), or one each where the text output is dropped (see ``text_output_used``)."""
    rows = [transparent_base(r) for r in rows]
    if block.text_output_used:
        return joint_row_parallel(rows, [[x] for x in inputs], gates, residuals)
    return [r.forward_fused([x], g, res) for r, x, g, res in zip(rows, inputs, gates, residuals)]


def _norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` for ``[B, D]`` shift/scale, as one kernel (rows read with unit stride)."""
    x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
    return layernorm_modulate(x, shift, scale, norm.eps)


def check_block(block: nn.Module, world_size: int) -> None:
    """What :func:`shard_block` refuses, without sharding anything (the family runs it on every block first)."""
    kind = (type(block).__module__, type(block).__name__)
    if kind != _DENSE_BLOCK:
        raise TypeError(f"qwenimage.shard_block expects {'.'.join(_DENSE_BLOCK)}, got {'.'.join(kind)}")
    ties = tied_parameters(block)
    if ties:
        raise ValueError(f"qwenimage.shard_block: {describe_ties(ties)}")
    if getattr(block.attn, "fused_projections", False):
        raise ValueError("qwenimage.shard_block: the attention's projections are fused (fuse_qkv_projections()); "
                         "call unfuse_qkv_projections() before parallelizing")
    check_divisible(world_size, num_attention_heads=block.attn.heads,
                    **{f"{m}_hidden": getattr(block, m).net[0].proj.out_features for m in ("img_mlp", "txt_mlp")})


def shard_block(block: nn.Module, group=None) -> nn.Module:
    """Shard a diffusers ``QwenImageTransformerBlock`` for this rank, in place, and return it (the weights must
    already agree across ranks: :func:`~tpfuse.tp_layers.parallelize` checks them first)."""
    group = resolve_group(group)
    world_size = get_world_size(group)
    check_block(block, world_size)
    attn = block.attn
    heads, head_dim = attn.heads, attn.inner_dim // attn.heads
    for name in _COLUMN:
        setattr(attn, name, shard_in_block(ColumnParallelLinear, getattr(attn, name), group))
    attn.to_out[0] = shard_in_block(RowParallelLinear, attn.to_out[0], group)
    attn.to_add_out = shard_in_block(RowParallelLinear, attn.to_add_out, group)
    for name in _NORMS:
        norm = getattr(attn, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            setattr(attn, name, TPHeadNorm.from_dense(norm, group))
    for mlp in (block.img_mlp, block.txt_mlp):
        mlp.net[0].proj = shard_in_block(ColumnParallelLinear, mlp.net[0].proj, group)
        mlp.net[2] = shard_in_block(RowParallelLinear, mlp.net[2], group)
    for mod in (block.img_mod, block.txt_mod):  # adaLN: 12 of the block's 36 D^2 weights, see the module doc
        mod[1] = shard_linear(ColumnParallelLinear, mod[1], group, None, check_weights=False, gather_output=True)
    attn.__class__ = diffusers_flavour(TPQwenImageAttention, type(attn), __name__)
    attn.group, attn.global_heads, attn.local_heads, attn.head_dim = group, heads, heads // world_size, head_dim
    # What diffusers' processors reshape by: this rank's heads (0.42's by inner_dim // heads, older ones by heads).
    attn.heads, attn.inner_dim = heads // world_size, heads // world_size * head_dim
    proc = attn.processor
    if type(proc).__name__ == _DENSE_PROCESSOR and type(proc).__module__ == _DENSE_BLOCK[0]:
        new = object.__new__(diffusers_flavour(TPQwenDoubleStreamAttnProcessor, type(proc), __name__))
        new.__dict__.update(proc.__dict__)  # _attention_backend, _parallel_config
        attn.processor = new
    block.__class__ = diffusers_flavour(TPQwenImageBlock, type(block), __name__)
    block.group = group
    return block


def __getattr__(name: str):  # pickle finds the flavours by their __qualname__
    bases = {c.__name__: c for c in (TPQwenImageBlock, TPQwenImageAttention, TPQwenDoubleStreamAttnProcessor)}
    return resolve(name, bases, lambda cls, dense: diffusers_flavour(cls, dense, __name__))
