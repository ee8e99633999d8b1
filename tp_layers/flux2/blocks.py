"""Dense FLUX.2 blocks in plain torch: the reference every tensor-parallel block is checked against.

Parameter names and ``forward`` signatures are those of diffusers' ``Flux2SingleTransformerBlock`` and
``Flux2TransformerBlock`` (diffusers 0.42), so a state dict loads either way and a block can replace diffusers'
inside ``Flux2Transformer2DModel``.

The block math is written once. The attention and feed-forward modules expose small hooks (projection, per-head
norm, attention over local heads) that the tensor-parallel versions in :mod:`.tp_blocks` override; the block
``forward`` (norm, modulation, gated residual) is shared because every op in it is replicated on every rank.

Attention runs through a *processor*, as in diffusers (``attn.processor``, ``set_processor``; the attention kernel is
diffusers' ``dispatch_attention_fn`` when diffusers is installed, so ``set_attention_backend`` applies). The
default processors return the attention outputs *before* the out-projection as :class:`Projection` objects, so
that a block can fold the gate and the residual into that projection; any other processor, or a hooked attention
module (caching hooks, offloading), is called as a module and returns projected outputs, as in diffusers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tpfuse.kernels.qk_norm_rope import rope_reference

from .._checks import check_like
from .._flavour import flavour, resolve
from ..tp_attention import (  # noqa: F401 - re-exported: tpfuse.tp_layers.flux2's names before the move
    Projection,
    _dispatch_attention_fn,
    _materialize,
    attention,
    attention_heads_major,
    hooked,
    transparent_base,
)
from .config import Flux2Config

__all__ = [
    "DoubleStreamBlock",
    "FeedForward",
    "JointAttention",
    "SingleStreamAttention",
    "SingleStreamBlock",
    "apply_rope",
    "attention",
    "modulate",
    "rope_cos_sin",
    "split_modulation",
    "swiglu",
]

logger = logging.getLogger("tpfuse.tp_layers")


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


def _check_like(x, ref: torch.Tensor | None, name: str) -> None:
    if ref is not None:
        check_like(x, ref, name, "the block's weights are")
    elif not isinstance(x, torch.Tensor):  # weights managed by hooks: their dtype/device is decided per call
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _check_stream(x: torch.Tensor, ref: torch.Tensor | None, dim: int, name: str) -> None:
    _check_like(x, ref, name)
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be [B, S, {dim}], got shape {tuple(x.shape)}")


class BatchMismatchError(ValueError, RuntimeError):
    """Batches (latents, text, timesteps, modulation) that do not broadcast to one. Also a ``RuntimeError``: what
    the dense model raises for the same inputs (a failed broadcast), so code written against it catches it."""


def _check_mod(mod: torch.Tensor, ref: torch.Tensor | None, width: int, name: str, seq: int,
               batch: int) -> None:
    _check_like(mod, ref, name)
    if mod.shape[-1] != width or mod.dim() not in (2, 3) or (mod.dim() == 3 and mod.shape[1] not in (1, seq)):
        raise ValueError(f"{name} must be [B, {width}], [B, 1, {width}] or per token [B, {seq}, {width}], got shape "
                         f"{tuple(mod.shape)}")
    if mod.shape[0] not in (1, batch) and batch != 1:
        raise BatchMismatchError(f"{name} has batch {mod.shape[0]} but the hidden states have batch {batch} "
                                 f"(shape {tuple(mod.shape)}; a batch of 1 on either side broadcasts)")


def _broadcast_batch(x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
    """A stream of batch 1 repeated to its modulation's batch M (M timesteps for one latent): the dense block
    broadcasts it, ``(1 + scale) * norm(x)`` and ``x + gate * out`` having M rows, so every op runs on M rows here
    too. A copy, not a stride-0 view: the fused kernels read rows with unit strides."""
    if x.shape[0] == mod.shape[0] or mod.shape[0] == 1:
        return x
    return x.expand(mod.shape[0], *x.shape[1:]).contiguous()


_PARAMETERS: dict[Any, frozenset[str]] = {}


def _parameters(fn) -> frozenset[str]:
    names = _PARAMETERS.get(fn)
    if names is None:
        names = _PARAMETERS[fn] = frozenset(inspect.signature(fn).parameters)
    return names


def _filter_kwargs(processor, fn, kwargs: dict[str, Any]) -> dict[str, Any]:
    """diffusers' rule for ``joint_attention_kwargs``: what the processor does not take is dropped with a warning,
    except by tpfuse's own processors, which refuse it (they would otherwise compute something else silently)."""
    if not kwargs:  # the common call: nothing to look up
        return {}
    accepted = _parameters(getattr(fn, "__func__", fn))
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        if isinstance(processor, _TPFuseProcessor):
            inputs = {"self", "attn", "hidden_states", "encoder_hidden_states", "image_rotary_emb"}
            raise ValueError(f"unsupported joint_attention_kwargs {unknown} for {type(processor).__name__}; "
                             f"supported: {sorted(accepted - inputs)}")
        logger.warning("joint_attention_kwargs %s are not expected by %s and will be ignored.", unknown,
                       type(processor).__name__)
    return {k: v for k, v in kwargs.items() if k in accepted}


# --------------------------------------------------------------------------------------------------------------
# Attention processors (diffusers' interface)
# --------------------------------------------------------------------------------------------------------------


def _diffusers_kv_processor(name: str):
    try:
        from diffusers.models.transformers import transformer_flux2
    except ImportError as exc:
        raise RuntimeError("kv_cache_mode (reference-image KV caching) needs diffusers installed") from exc
    return getattr(transformer_flux2, name)()


# diffusers' processor that each default processor stands for, by class name: looked up once, on first use
# (diffusers stays optional and is not imported with tpfuse).
_DIFFUSERS_PROCESSORS = {"JointAttnProcessor": "Flux2AttnProcessor",
                         "SingleAttnProcessor": "Flux2ParallelSelfAttnProcessor"}
_UNLOADED = object()
_DIFFUSERS_FLUX2: Any = _UNLOADED


def _processor_flavour(cls: type) -> type:
    """``cls`` also deriving from the diffusers processor it stands for (tpfuse's ``__call__``/``parts`` first in
    the MRO), so that code selecting "every ``Flux2AttnProcessor``" finds it; ``cls`` itself without diffusers."""
    global _DIFFUSERS_FLUX2
    if _DIFFUSERS_FLUX2 is _UNLOADED:
        try:
            from diffusers.models.transformers import transformer_flux2 as found
        except ImportError:
            found = None
        except Exception as exc:  # noqa: BLE001 - a broken diffusers: plain processors now, retried next time
            logger.warning("tpfuse: diffusers' FLUX.2 processors could not be imported (%s: %s); tpfuse's processors "
                           "do not derive from them", type(exc).__name__, exc)
            return cls
        _DIFFUSERS_FLUX2 = found
    dense = getattr(_DIFFUSERS_FLUX2, _DIFFUSERS_PROCESSORS[cls.__name__], None)
    return cls if dense is None else flavour(cls, dense, __name__)


def __getattr__(name: str):  # pickle finds the processor flavours by their __qualname__
    return resolve(name, {"JointAttnProcessor": JointAttnProcessor, "SingleAttnProcessor": SingleAttnProcessor},
                   lambda cls, dense: flavour(cls, dense, __name__))


class _TPFuseProcessor:
    """Base of tpfuse's default processors. ``parts`` returns the out-projection's inputs as :class:`Projection`
    objects (the block folds gate and residual into it); ``__call__`` applies them, as a diffusers processor does.

    With diffusers installed, ``JointAttnProcessor()`` and ``SingleAttnProcessor()`` are also instances of
    diffusers' ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor`` (a class deriving from both; a user's
    subclass of tpfuse's class is left as written).

    With ``kv_cache_mode`` set (``Flux2KleinKVPipeline``), the call goes to diffusers' KV processor of the same
    kind, which works per local head (each rank caches its own heads' reference K/V).
    """

    _attention_backend = None
    _parallel_config = None
    _kv_processor: str

    def __new__(cls, *args, **kwargs):
        # Unpickling and copying build the flavour class directly (cls is then the flavour, left alone).
        if cls in (JointAttnProcessor, SingleAttnProcessor):
            cls = _processor_flavour(cls)
        return object.__new__(cls)

    def _kv(self, attn, *args, **kwargs):
        proc = _diffusers_kv_processor(self._kv_processor)
        proc._attention_backend, proc._parallel_config = self._attention_backend, self._parallel_config
        return proc(attn, *args, **kwargs)


class JointAttnProcessor(_TPFuseProcessor):
    """Default processor of the double-stream attention (dense and tensor-parallel: ``attn._parts`` decides)."""

    _kv_processor = "Flux2KVAttnProcessor"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        if kv_cache_mode is not None:
            return self._kv(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                            kv_cache=kv_cache, kv_cache_mode=kv_cache_mode, num_ref_tokens=num_ref_tokens)
        img, txt = self.parts(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return img.materialize(), txt.materialize()

    def parts(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
              kv_cache=None, kv_cache_mode=None, num_ref_tokens=0):
        if kv_cache_mode is not None:
            return self.__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 kv_cache, kv_cache_mode, num_ref_tokens)
        img, txt = attn._parts(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                               backend=self._attention_backend, parallel_config=self._parallel_config)
        return Projection(attn.to_out[0], [img]), Projection(attn.to_add_out, [txt])


class SingleAttnProcessor(_TPFuseProcessor):
    """Default processor of the single-stream (parallel) attention."""

    _kv_processor = "Flux2KVParallelSelfAttnProcessor"

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
                 kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
        if kv_cache_mode is not None:
            return self._kv(attn, hidden_states, attention_mask, image_rotary_emb, kv_cache=kv_cache,
                            kv_cache_mode=kv_cache_mode, num_txt_tokens=num_txt_tokens, num_ref_tokens=num_ref_tokens)
        return self.parts(attn, hidden_states, attention_mask, image_rotary_emb).materialize()

    def parts(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, kv_cache=None,
              kv_cache_mode=None, num_txt_tokens=0, num_ref_tokens=0):
        if kv_cache_mode is not None:
            return self.__call__(attn, hidden_states, attention_mask, image_rotary_emb, kv_cache, kv_cache_mode,
                                 num_txt_tokens, num_ref_tokens)
        parts = attn._parts(hidden_states, attention_mask, image_rotary_emb, backend=self._attention_backend,
                            parallel_config=self._parallel_config)
        return Projection(attn.to_out, parts)


_OWN_CALLS = (JointAttnProcessor.__call__, SingleAttnProcessor.__call__)


class _ProcessorMixin:
    """diffusers' attention-module interface: ``processor``, ``set_processor``/``get_processor``, ``forward``
    through the processor (diffusers' ``AttentionModuleMixin`` adds ``set_attention_backend`` where the module is
    also a diffusers class)."""

    _default_processor_cls: type
    fused_projections = False  # diffusers' processors read it; QKV fusion is not offered (see _supports_qkv_fusion)
    _supports_qkv_fusion = False

    def set_processor(self, processor) -> None:
        if isinstance(getattr(self, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
            self._modules.pop("processor")
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False):
        return None if return_deprecated_lora else self.processor

    def _call_processor(self, args, kwargs):
        kwargs = _filter_kwargs(self.processor, self.processor.__call__, kwargs)
        return self.processor(self, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Attention and feed-forward modules (dense); hooks are what tensor parallelism overrides
# --------------------------------------------------------------------------------------------------------------


class _HeadsMixin:
    head_dim: int
    heads: int

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """Per-head RMSNorm over ``head_dim`` (shard-safe: a head never spans ranks)."""
        return norm(x)

    def _attend(self, q, k, v, mask, backend=None, parallel_config=None):
        return attention(q, k, v, mask, backend, parallel_config)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.head_dim))  # [B, S, H(_local), D]


class SingleStreamAttention(_ProcessorMixin, _HeadsMixin, nn.Module):
    """Parameters of diffusers' ``Flux2ParallelSelfAttention``: one fused in-projection ``[Q|K|V|gate|up]``,
    QK RMSNorm, one fused out-projection over ``cat(attn, mlp)``."""

    _default_processor_cls = SingleAttnProcessor
    mlp_mult_factor = 2  # what diffusers' processors read: [gate | up]
    mlp_act_fn = staticmethod(swiglu)

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
        self.processor = self._default_processor_cls()
        _dispatch_attention_fn()  # looked up here, not in traced code

    @property
    def col_blocks(self) -> list[int]:
        """Packed layout of ``to_qkv_mlp_proj``'s output features."""
        return [self.inner_dim] * 3 + [self.mlp_hidden_dim] * 2

    @property
    def row_blocks(self) -> list[int]:
        """Packed layout of ``to_out``'s input features."""
        return [self.inner_dim, self.mlp_hidden_dim]

    def forward(self, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        return self._call_processor((hidden_states, attention_mask, image_rotary_emb), kwargs)

    def _parts(self, hidden_states, attention_mask=None, image_rotary_emb=None, backend=None,
               parallel_config=None) -> list[torch.Tensor]:
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
        attn = self._attend(q, k, v, attention_mask, backend, parallel_config)  # [B, S, H*D]
        return [attn, swiglu(mlp)]


class JointAttention(_ProcessorMixin, _HeadsMixin, nn.Module):
    """Parameters of diffusers' ``Flux2Attention`` with ``added_kv_proj_dim``: separate Q/K/V per stream, joint
    attention over ``cat(text, image)``, separate out-projections."""

    _default_processor_cls = JointAttnProcessor

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads, self.head_dim = heads, head_dim
        self.inner_dim = heads * head_dim
        self.added_kv_proj_dim = dim
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
        self.processor = self._default_processor_cls()
        _dispatch_attention_fn()  # looked up here, not in traced code

    def _qkv(self, x: torch.Tensor, linears: Sequence[nn.Module]) -> list[torch.Tensor]:
        return [lin(x) for lin in linears]

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                **kwargs):
        """``(image, text)`` attention outputs after their out-projections, through ``self.processor``."""
        return self._call_processor((hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb), kwargs)

    def _parts(self, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None, backend=None,
               parallel_config=None):
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
        out = self._attend(q, k, v, attention_mask, backend, parallel_config)  # [B, St+Si, H*D]
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


def _weight_of(linear: nn.Module) -> torch.Tensor | None:
    """A linear's weight, through a peft LoRA wrapper: the dtype/device reference of a block's inputs; ``None``
    when hooks manage it (layerwise casting stores it in another dtype, offloading on another device)."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    return None if hooked(base) or hooked(linear) else base.weight


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class _BlockHooks:
    """The places where a tensor-parallel block fuses what the dense block does with eager ops."""

    def _pre_forward(self) -> None:
        """Checks a block subclass runs before its forward (tensor-parallel blocks: adapters)."""

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        """Checks of the inputs a block subclass runs (tensor-parallel blocks: the same inputs on every rank)."""

    def _norm_modulate(self, norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor,
                       scale: torch.Tensor) -> torch.Tensor:
        """``(1 + scale) * norm(x) + shift`` (replicated on every rank; TP blocks fuse it into one kernel)."""
        return modulate(norm(x), shift, scale)

    def _gated_residual(self, residual: torch.Tensor, gate: torch.Tensor, out) -> torch.Tensor:
        """``residual + gate * out`` for a tensor or a :class:`Projection` (TP blocks fold gate and residual into
        the projection's all-reduce)."""
        return residual + gate * _materialize(out)

    def _gated_residuals(self, items) -> list[torch.Tensor]:
        """:meth:`_gated_residual` of each ``(residual, gate, out)`` (TP blocks: the streams in one all-reduce)."""
        return [self._gated_residual(r, g, o) for r, g, o in items]

    @staticmethod
    def _attention(attn: nn.Module, inputs: dict[str, Any], kwargs: dict[str, Any]):
        """The attention module's outputs: :class:`Projection` objects from a tpfuse processor's ``parts`` (the
        out-projection left to the block), else what calling the module returns (its processor, its hooks)."""
        proc = getattr(attn, "processor", None)
        # parts() only for a processor whose __call__ is tpfuse's own: a subclass overriding __call__ is called.
        if isinstance(proc, _TPFuseProcessor) and type(proc).__call__ in _OWN_CALLS and not hooked(attn):
            return proc.parts(attn, **inputs, **_filter_kwargs(proc, proc.parts, kwargs))
        return attn(**inputs, **kwargs)

    @staticmethod
    def _feed_forward(ff: nn.Module, x: torch.Tensor):
        """``ff(x)``, its out-projection left to the block as a :class:`Projection` when ``ff`` is not hooked."""
        if hooked(ff) or not hasattr(ff, "hidden"):
            return ff(x)
        return Projection(ff.linear_out, [ff.hidden(x)])


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
        self._pre_forward()
        self._check_inputs({"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                            "temb_mod": temb_mod, "image_rotary_emb": image_rotary_emb,
                            "joint_attention_kwargs": joint_attention_kwargs, "text_seq_len": text_seq_len})
        ref = _weight_of(self.attn.to_out)
        _check_stream(hidden_states, ref, self.dim, "hidden_states")
        if encoder_hidden_states is not None:
            _check_stream(encoder_hidden_states, ref, self.dim, "encoder_hidden_states")
            if encoder_hidden_states.shape[0] != hidden_states.shape[0]:  # torch.cat does not broadcast
                raise BatchMismatchError(f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]}, "
                                         f"hidden_states has batch {hidden_states.shape[0]}")
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, St+Si, D]
        _check_mod(temb_mod, ref, 3 * self.dim, "temb_mod", hidden_states.shape[1], hidden_states.shape[0])
        hidden_states = _broadcast_batch(hidden_states, temb_mod)
        kwargs = dict(joint_attention_kwargs or {})

        (shift, scale, gate), = split_modulation(temb_mod, 1)
        x = self._norm_modulate(self.norm, hidden_states, shift, scale)
        out = self._attention(self.attn, {"hidden_states": x, "image_rotary_emb": image_rotary_emb}, kwargs)
        hidden_states = self._gated_residual(hidden_states, gate, out)
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
        self._pre_forward()
        self._check_inputs({"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                            "temb_mod_img": temb_mod_img, "temb_mod_txt": temb_mod_txt,
                            "image_rotary_emb": image_rotary_emb, "joint_attention_kwargs": joint_attention_kwargs})
        ref = _weight_of(self.attn.to_add_out)
        _check_stream(hidden_states, ref, self.dim, "hidden_states")
        _check_stream(encoder_hidden_states, ref, self.dim, "encoder_hidden_states")
        _check_mod(temb_mod_img, ref, 6 * self.dim, "temb_mod_img", hidden_states.shape[1], hidden_states.shape[0])
        _check_mod(temb_mod_txt, ref, 6 * self.dim, "temb_mod_txt", encoder_hidden_states.shape[1],
                   encoder_hidden_states.shape[0])
        # Each stream broadcasts against its own modulation first (as in the dense block); the joint attention then
        # needs one batch.
        batches = (hidden_states.shape[0], encoder_hidden_states.shape[0])
        hidden_states = _broadcast_batch(hidden_states, temb_mod_img)
        encoder_hidden_states = _broadcast_batch(encoder_hidden_states, temb_mod_txt)
        if encoder_hidden_states.shape[0] != hidden_states.shape[0]:
            raise BatchMismatchError(f"encoder_hidden_states has batch {batches[1]}, hidden_states has batch "
                                     f"{batches[0]} (temb_mod_txt has batch {temb_mod_txt.shape[0]}, temb_mod_img "
                                     f"batch {temb_mod_img.shape[0]}): the joint attention needs one batch")
        kwargs = dict(joint_attention_kwargs or {})

        (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = split_modulation(temb_mod_img, 2)
        (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = split_modulation(
            temb_mod_txt, 2)

        x = self._norm_modulate(self.norm1, hidden_states, shift_msa, scale_msa)
        c = self._norm_modulate(self.norm1_context, encoder_hidden_states, c_shift_msa, c_scale_msa)
        attn_img, attn_txt = self._attention(
            self.attn, {"hidden_states": x, "encoder_hidden_states": c, "image_rotary_emb": image_rotary_emb}, kwargs)

        # The two streams side by side (independent until the next block): a tensor-parallel block reduces each
        # pair of row-parallel outputs (attention, then feed-forward) with one all-reduce.
        hidden_states, encoder_hidden_states = self._gated_residuals(
            [(hidden_states, gate_msa, attn_img), (encoder_hidden_states, c_gate_msa, attn_txt)])
        x = self._norm_modulate(self.norm2, hidden_states, shift_mlp, scale_mlp)
        c = self._norm_modulate(self.norm2_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp)
        hidden_states, encoder_hidden_states = self._gated_residuals(
            [(hidden_states, gate_mlp, self._feed_forward(self.ff, x)),
             (encoder_hidden_states, c_gate_mlp, self._feed_forward(self.ff_context, c))])
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states
