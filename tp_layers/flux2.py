"""Dense FLUX.2 blocks in plain torch: the reference every tensor-parallel block is checked against.

Parameter names and ``forward`` signatures are those of diffusers' ``Flux2SingleTransformerBlock`` and
``Flux2TransformerBlock`` (diffusers 0.42), so a state dict loads either way and a block can replace diffusers'
inside ``Flux2Transformer2DModel``.

The block math is written once. The attention and feed-forward modules expose small hooks (projection, per-head
norm, attention over local heads) that the tensor-parallel versions in :mod:`.tp_flux2` override; the block
``forward`` (norm, modulation, gated residual) is shared because every op in it is replicated on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tpfuse.kernels.qk_norm_rope import rope_reference

from ._checks import check_like
from .config import Flux2Config

__all__ = [
    "SingleStreamBlock",
    "DoubleStreamBlock",
    "SingleStreamAttention",
    "JointAttention",
    "FeedForward",
    "rope_cos_sin",
    "apply_rope",
    "split_modulation",
    "modulate",
    "swiglu",
    "attention",
]

# Keys of ``joint_attention_kwargs`` that only matter for diffusers' reference-image KV cache; harmless when
# ``kv_cache_mode`` is None (the model forwards them as ``None``/0 in that case).
_KV_CACHE_KEYS = {"kv_cache", "kv_cache_mode", "num_txt_tokens", "num_ref_tokens"}


# --------------------------------------------------------------------------------------------------------------
# Math shared by the dense and the tensor-parallel blocks
# --------------------------------------------------------------------------------------------------------------


def rope_cos_sin(ids: torch.Tensor, axes_dims: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[S, sum(axes_dims)]`` float32, from position ids ``[S, n_axes]`` (or ``[1, S, n]``).

    Same values as diffusers' ``Flux2PosEmbed``: per axis, frequencies ``theta^(-2i/d)`` in float64, angles
    ``pos * freq``, each cos/sin repeated twice (interleaved pairs).
    """
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[-1] < len(axes_dims):
        raise ValueError(f"ids must be [S, {len(axes_dims)}] (or [1, S, n]), got shape {tuple(ids.shape)}")
    pos = ids.float()
    # float64 frequencies as diffusers uses them (MPS has no float64).
    fdtype = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=fdtype, device=ids.device) / d))  # [d/2]
        angles = torch.outer(pos[:, i], freqs)  # [S, d/2]
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs ``(x[2i], x[2i+1])``; ``x`` ``[B, S, H, D]``, ``cos``/``sin`` ``[S, D]``.

    fp32 math, result in ``x``'s dtype (as diffusers' ``apply_rotary_emb(..., sequence_dim=1)``); fp64 inputs
    stay fp64 (diffusers would round them to fp32), so an fp64 run checks sharding to fp64 precision.
    """
    return rope_reference(x, cos.to(x.device), sin.to(x.device)).to(x.dtype)


def split_modulation(mod: torch.Tensor, sets: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]:
    """``[B, 3*sets*D]`` (or ``[B, 1, ...]``) -> ``sets`` tuples of ``(shift, scale, gate)``, each ``[B, 1, D]``."""
    if mod.dim() == 2:
        mod = mod.unsqueeze(1)
    chunks = mod.chunk(3 * sets, dim=-1)
    return tuple(chunks[3 * i: 3 * i + 3] for i in range(sets))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * x + shift


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` on the last dim (each rank's shard has the same layout)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on ``[B, S, H, D]`` inputs, returning ``[B, S, H*D]`` (diffusers' native attention backend)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def attention_heads_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on ``[B, H, S, D]`` inputs (no transposes), returning ``[B, S, H*D]``."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def _check_stream(x: torch.Tensor, ref: torch.Tensor, dim: int, name: str) -> None:
    check_like(x, ref, name, "the block's weights are")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be [B, S, {dim}], got shape {tuple(x.shape)}")


def _check_mod(mod: torch.Tensor, ref: torch.Tensor, width: int, name: str) -> None:
    check_like(mod, ref, name, "the block's weights are")
    if mod.shape[-1] != width or mod.dim() not in (2, 3):
        raise ValueError(f"{name} must be [B, {width}] or [B, 1, {width}], got shape {tuple(mod.shape)}")


def _attention_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The subset of diffusers' ``joint_attention_kwargs`` these blocks honour; refuse what they would ignore."""
    kwargs = dict(kwargs or {})
    if kwargs.get("kv_cache_mode") is not None:
        raise NotImplementedError(
            f"kv_cache_mode={kwargs['kv_cache_mode']!r} (reference-image KV caching) is not supported by tpfuse blocks"
        )
    unknown = sorted(set(kwargs) - _KV_CACHE_KEYS - {"attention_mask"})
    if unknown:
        raise ValueError(f"unsupported joint_attention_kwargs {unknown}; supported: ['attention_mask']")
    return {"attention_mask": kwargs.get("attention_mask")}


# --------------------------------------------------------------------------------------------------------------
# Attention and feed-forward modules (dense); hooks are what tensor parallelism overrides
# --------------------------------------------------------------------------------------------------------------


class _HeadsMixin:
    head_dim: int
    heads: int

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Per-head RMSNorm over ``head_dim`` (shard-safe: a head never spans ranks)."""
        return norm(x)

    def _attend(self, q, k, v, mask):
        return attention(q, k, v, mask)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # [B, S, H(_local), D]


class SingleStreamAttention(_HeadsMixin, nn.Module):
    """Parameters of diffusers' ``Flux2ParallelSelfAttention``: one fused in-projection ``[Q|K|V|gate|up]``,
    QK RMSNorm, one fused out-projection over ``cat(attn, mlp)``."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, eps: float, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads, self.head_dim = heads, head_dim
        self.inner_dim = heads * head_dim
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * self.inner_dim + 2 * self.mlp_hidden_dim, bias=bias, **factory)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.to_out = nn.Linear(self.inner_dim + self.mlp_hidden_dim, dim, bias=bias, **factory)

    @property
    def col_blocks(self) -> list[int]:
        """Packed layout of ``to_qkv_mlp_proj``'s output features."""
        return [self.inner_dim] * 3 + [self.mlp_hidden_dim] * 2

    @property
    def row_blocks(self) -> list[int]:
        """Packed layout of ``to_out``'s input features."""
        return [self.inner_dim, self.mlp_hidden_dim]

    def forward(self, hidden_states, attention_mask=None, image_rotary_emb=None):
        return self.to_out(torch.cat(self._parts(hidden_states, attention_mask, image_rotary_emb), dim=-1))

    def _parts(self, hidden_states, attention_mask=None, image_rotary_emb=None) -> list[torch.Tensor]:
        """The two inputs of ``to_out``: ``[attention [B, S, H*D], silu(gate) * up [B, S, M]]``."""
        proj = self.to_qkv_mlp_proj(hidden_states)  # [B, S, (3*inner + 2*mlp)(/N)]
        q_w = self.to_qkv_mlp_proj.weight.shape[0] * self.inner_dim // sum(self.col_blocks)  # local Q width
        q, k, v, mlp = proj.split([q_w, q_w, q_w, proj.shape[-1] - 3 * q_w], dim=-1)
        q = self._norm(self._heads(q), self.norm_q)  # [B, S, H, D]
        k = self._norm(self._heads(k), self.norm_k)
        v = self._heads(v)
        if image_rotary_emb is not None:
            q = apply_rope(q, *image_rotary_emb)
            k = apply_rope(k, *image_rotary_emb)
        attn = self._attend(q, k, v, attention_mask)  # [B, S, H*D]
        return [attn, swiglu(mlp)]


class JointAttention(_HeadsMixin, nn.Module):
    """Parameters of diffusers' ``Flux2Attention`` with ``added_kv_proj_dim``: separate Q/K/V per stream, joint
    attention over ``cat(text, image)``, separate out-projections."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads, self.head_dim = heads, head_dim
        self.inner_dim = heads * head_dim
        self.to_q = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.to_k = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.to_v = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=bias, **factory), nn.Dropout(0.0)])
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps, **factory)
        self.add_q_proj = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.add_k_proj = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.add_v_proj = nn.Linear(dim, self.inner_dim, bias=bias, **factory)
        self.to_add_out = nn.Linear(self.inner_dim, dim, bias=bias, **factory)

    def _qkv(self, x: torch.Tensor, linears: Sequence[nn.Module]) -> list[torch.Tensor]:
        return [lin(x) for lin in linears]

    def forward(self, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        out, context_out = self._parts(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self.to_out[1](self.to_out[0](out)), self.to_add_out(context_out)

    def _parts(self, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        """Attention outputs before the out-projections: ``(image [B, Si, H*D], text [B, St, H*D])``."""
        q, k, v = (self._heads(t) for t in self._qkv(hidden_states, (self.to_q, self.to_k, self.to_v)))
        cq, ck, cv = (self._heads(t) for t in
                      self._qkv(encoder_hidden_states, (self.add_q_proj, self.add_k_proj, self.add_v_proj)))
        q = torch.cat([self._norm(cq, self.norm_added_q), self._norm(q, self.norm_q)], dim=1)  # [B, St+Si, H, D]
        k = torch.cat([self._norm(ck, self.norm_added_k), self._norm(k, self.norm_k)], dim=1)
        v = torch.cat([cv, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rope(q, *image_rotary_emb)
            k = apply_rope(k, *image_rotary_emb)
        out = self._attend(q, k, v, attention_mask)  # [B, St+Si, H*D]
        txt_len = encoder_hidden_states.shape[1]
        return out[:, txt_len:], out[:, :txt_len]


class FeedForward(nn.Module):
    """diffusers' ``Flux2FeedForward``: ``linear_in`` to ``[gate | up]``, SwiGLU, ``linear_out``."""

    def __init__(self, dim: int, mlp_ratio: float, bias: bool = False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.linear_in = nn.Linear(dim, 2 * self.mlp_hidden_dim, bias=bias, **factory)
        self.linear_out = nn.Linear(self.mlp_hidden_dim, dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``linear_out``: ``silu(gate) * up``."""
        return swiglu(self.linear_in(x))


# --------------------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------------------


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class _BlockHooks:
    """The places where a tensor-parallel block fuses what the dense block does with eager ops."""

    def _norm_modulate(self, norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
        """``(1 + scale) * norm(x) + shift`` (replicated on every rank; TP blocks fuse it into one kernel)."""
        return modulate(norm(x), shift, scale)

    @staticmethod
    def _gated_residual(residual: torch.Tensor, gate: torch.Tensor, out_proj: nn.Module,
                        parts: list[torch.Tensor]) -> torch.Tensor:
        """``residual + gate * out_proj(cat(parts))`` (TP blocks fold gate and residual into the all-reduce)."""
        return residual + gate * out_proj(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))


class SingleStreamBlock(_BlockHooks, nn.Module):
    """FLUX.2 single-stream ("parallel") block, ``Flux2SingleTransformerBlock``-compatible."""

    def __init__(self, cfg: Flux2Config, device=None, dtype=None):
        super().__init__()
        dim = cfg.hidden_size
        self.dim = dim
        self.norm = _layer_norm(dim, cfg.eps)
        self.attn = SingleStreamAttention(dim, cfg.heads, cfg.head_dim, cfg.mlp_ratio, cfg.eps, device=device,
                                          dtype=dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb_mod: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        split_hidden_states: bool = False,
        text_seq_len: int | None = None,
    ):
        ref = self.attn.to_out.weight
        _check_stream(hidden_states, ref, self.dim, "hidden_states")
        _check_mod(temb_mod, ref, 3 * self.dim, "temb_mod")
        if encoder_hidden_states is not None:
            _check_stream(encoder_hidden_states, ref, self.dim, "encoder_hidden_states")
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, St+Si, D]
        kwargs = _attention_kwargs(joint_attention_kwargs)

        (shift, scale, gate), = split_modulation(temb_mod, 1)
        x = self._norm_modulate(self.norm, hidden_states, shift, scale)
        parts = self.attn._parts(x, image_rotary_emb=image_rotary_emb, **kwargs)
        hidden_states = self._gated_residual(hidden_states, gate, self.attn.to_out, parts)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        if split_hidden_states:
            return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
        return hidden_states


class DoubleStreamBlock(_BlockHooks, nn.Module):
    """FLUX.2 double-stream block, ``Flux2TransformerBlock``-compatible; returns ``(encoder_hidden_states,
    hidden_states)``."""

    def __init__(self, cfg: Flux2Config, device=None, dtype=None):
        super().__init__()
        dim = cfg.hidden_size
        self.dim = dim
        self.mlp_hidden_dim = cfg.mlp_hidden
        self.norm1 = _layer_norm(dim, cfg.eps)
        self.norm1_context = _layer_norm(dim, cfg.eps)
        self.attn = JointAttention(dim, cfg.heads, cfg.head_dim, cfg.eps, device=device, dtype=dtype)
        self.norm2 = _layer_norm(dim, cfg.eps)
        self.ff = FeedForward(dim, cfg.mlp_ratio, device=device, dtype=dtype)
        self.norm2_context = _layer_norm(dim, cfg.eps)
        self.ff_context = FeedForward(dim, cfg.mlp_ratio, device=device, dtype=dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb_mod_img: torch.Tensor,
        temb_mod_txt: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ):
        ref = self.attn.to_add_out.weight
        _check_stream(hidden_states, ref, self.dim, "hidden_states")
        _check_stream(encoder_hidden_states, ref, self.dim, "encoder_hidden_states")
        _check_mod(temb_mod_img, ref, 6 * self.dim, "temb_mod_img")
        _check_mod(temb_mod_txt, ref, 6 * self.dim, "temb_mod_txt")
        kwargs = _attention_kwargs(joint_attention_kwargs)

        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split_modulation(temb_mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split_modulation(
            temb_mod_txt, 2)

        x = self._norm_modulate(self.norm1, hidden_states, shift_msa, scale_msa)
        c = self._norm_modulate(self.norm1_context, encoder_hidden_states, c_shift_msa, c_scale_msa)
        attn_img, attn_txt = self.attn._parts(x, c, image_rotary_emb=image_rotary_emb, **kwargs)

        hidden_states = self._gated_residual(hidden_states, gate_msa, self.attn.to_out[0], [attn_img])
        x = self._norm_modulate(self.norm2, hidden_states, shift_mlp, scale_mlp)
        hidden_states = self._gated_residual(hidden_states, gate_mlp, self.ff.linear_out, [self.ff.hidden(x)])

        encoder_hidden_states = self._gated_residual(encoder_hidden_states, c_gate_msa, self.attn.to_add_out,
                                                     [attn_txt])
        c = self._norm_modulate(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp)
        encoder_hidden_states = self._gated_residual(encoder_hidden_states, c_gate_mlp, self.ff_context.linear_out,
                                                     [self.ff_context.hidden(c)])
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states
