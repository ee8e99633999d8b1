"""Tensor-parallel FLUX.2 blocks: each rank keeps ~1/N of every matrix and runs attention on its own heads.

The sharding plan, per block (everything else — LayerNorm, modulation, residuals, QK-norm weights over
``head_dim`` — is replicated, because it needs the full hidden vector or is shard-safe):

single-stream
    ``attn.to_qkv_mlp_proj``  column, packed ``[Q, K, V, gate, up]``
    ``attn.to_out``           row, packed input ``[attn, mlp]``
double-stream
    ``attn.to_q/k/v``, ``attn.add_q/k/v_proj``  column (one input-gradient all-reduce per stream)
    ``attn.to_out.0``, ``attn.to_add_out``        row
    ``ff(_context).linear_in``  column, packed ``[gate, up]``
    ``ff(_context).linear_out`` row

The per-head RMSNorm weights are replicated, but each rank only sees its own heads, so their gradients are
partial sums: :class:`HeadRMSNorm` routes the weight through ``copy_to_tp_region`` so its gradient is all-reduced.

The blocks subclass the dense ones and reuse their ``forward``: sharding lives in the modules, not in the math.
Built from diffusers' blocks, they are also instances of diffusers' classes (``Flux2TransformerBlock``,
``Flux2Attention``, ...; see :func:`diffusers_flavour`), registered where diffusers' hooks look blocks up, and their
attention modules keep diffusers' processor interface: diffusers' own FLUX.2 processors (also the KV-cache ones)
work on the local heads unchanged, because they only read shapes and call the projections.
Where the dense block runs several eager ops, the TP block calls one fused op from :mod:`tpfuse.kernels`
(Triton on CUDA tensors, the op's torch reference on CPU):

* every ``norm -> (1 + scale) * x + shift``  ->  ``layernorm_modulate``
* single-stream ``to_qkv_mlp_proj -> split -> QK RMSNorm -> RoPE -> transpose -> SwiGLU``  ->
  ``fused_qkv_mlp_proj`` (one GEMM; Q/K/V come out head-major for SDPA)
* double-stream ``to_q/k/v`` + ``add_q/k/v_proj -> QK RMSNorm -> RoPE -> cat``  ->  ``joint_qkv_proj`` (one GEMM
  launch per stream, the norm and RoPE in its epilogue, head-major into the joint Q, K and V); with LoRA or hooks
  on the projections, the modules are called and ``qk_norm_rope_joint`` writes the joint Q/K/V
* double-stream feed-forward ``linear_in -> SwiGLU``  ->  ``fused_linear_act`` (:class:`TPFeedForward`)
* double-stream row-parallel outputs: the image and text attention out-projections in ONE gated all-reduce, the
  two feed-forward outputs in another (:func:`~tpfuse.tp_layers.joint_row.joint_row_parallel`: 2 per block)
"""

from __future__ import annotations

import torch
from torch import nn

from tpfuse.kernels import (
    fused_linear_act,
    fused_qkv_mlp_proj,
    joint_qkv_proj,
    layernorm_modulate,
    qk_norm_rope_joint,
)
from tpfuse.kernels._dispatch import resolve_backend
from tpfuse.kernels.fused_qkv_mlp_proj import SUPPORTED_HEAD_DIMS

from .._flavour import resolve
from ..comm import copy_to_tp_region, get_world_size, resolve_group
from ..consistency import check_inputs_agree, inputs_check_due, sync_or_check
from ..linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    check_input,
    column_parallel_linear,
)
from ..joint_row import joint_row_parallel
from ..lora import check_adapters
from ..tp_attention import (
    AttentionMaskError,
    HeadRMSNorm,
    Projection,
    TPHeadsMixin,
    _dispatch_attention_fn,
    attention_heads_major,
    check_divisible,
    describe_ties,
    diffusers_flavour,
    hooked,
    modules_at,
    plain,
    shard_in_block,
    shared_eps,
    tied_parameters,
    transparent_base,
)
from .blocks import (
    DoubleStreamBlock,
    FeedForward,
    JointAttention,
    SingleStreamAttention,
    SingleStreamBlock,
)

__all__ = ["AttentionMaskError", "HeadRMSNorm", "TPDoubleStreamBlock", "TPFeedForward", "TPSingleStreamBlock"]

# Dense block classes accepted by from_dense, by (module prefix, class name): ours and diffusers'. Matched by
# name so that diffusers stays an optional dependency.
_SINGLE_TYPES = {("tpfuse.tp_layers.flux2.blocks", "SingleStreamBlock"),
                 ("diffusers.models.transformers.transformer_flux2", "Flux2SingleTransformerBlock")}
_DOUBLE_TYPES = {("tpfuse.tp_layers.flux2.blocks", "DoubleStreamBlock"),
                 ("diffusers.models.transformers.transformer_flux2", "Flux2TransformerBlock")}

_SINGLE_WEIGHTS = ["attn.to_qkv_mlp_proj.weight", "attn.norm_q.weight", "attn.norm_k.weight", "attn.to_out.weight"]
_DOUBLE_WEIGHTS = (
    [f"attn.{n}.weight" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                                  "norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    + ["attn.to_out.0.weight"]
    + [f"{ff}.{lin}.weight" for ff in ("ff", "ff_context") for lin in ("linear_in", "linear_out")]
)


def _check_block(block: nn.Module, types: set[tuple[str, str]], weights: list[str], what: str) -> None:
    kind = (type(block).__module__, type(block).__name__)
    if kind not in types or isinstance(block, (TPSingleStreamBlock, TPDoubleStreamBlock)):
        names = sorted(f"{m}.{n}" for m, n in types)
        raise TypeError(f"{what}.from_dense expects one of {names}, got {kind[0]}.{kind[1]}")
    ties = tied_parameters(block)
    if ties:
        raise ValueError(f"{what}.from_dense: {describe_ties(ties)}")
    present = {n.replace(".base_layer.", "."): p for n, p in block.named_parameters()}  # through LoRA wrappers
    missing = [w for w in weights if present.get(w) is None]
    if missing:
        raise ValueError(f"{what}.from_dense: the block is missing weights {missing}")


def __getattr__(name: str):  # pickle finds the flavours by their __qualname__
    bases = {c.__name__: c for c in (TPSingleStreamBlock, TPDoubleStreamBlock, TPSingleStreamAttention,
                                     TPJointAttention)}
    return resolve(name, bases, lambda cls, dense: diffusers_flavour(cls, dense, __name__))


# diffusers' default FLUX.2 processors (and ours): replaced by tpfuse's fused default on parallelize. Any other
# processor (diffusers' KV processors, a user's) is kept: diffusers' FLUX.2 processors are tensor-parallel-agnostic.
_DEFAULT_PROCESSORS = {"Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor", "JointAttnProcessor",
                       "SingleAttnProcessor"}


def _init_heads(module, dense, group, world_size: int) -> None:
    nn.Module.__init__(module)
    module.group = resolve_group(group)
    module.heads, module.head_dim, module.inner_dim = dense.heads, dense.head_dim, dense.inner_dim
    module.global_heads = dense.heads
    module.local_heads = dense.heads // world_size
    module.norm_q = HeadRMSNorm.from_dense(dense.norm_q, group)
    module.norm_k = HeadRMSNorm.from_dense(dense.norm_k, group)
    proc = getattr(dense, "processor", None)
    if proc is None or type(proc).__name__ in _DEFAULT_PROCESSORS:
        new = module._default_processor_cls()
        new._attention_backend = getattr(proc, "_attention_backend", None)
        new._parallel_config = getattr(proc, "_parallel_config", None)
        proc = new
    module.processor = proc
    _dispatch_attention_fn()  # looked up here, not in traced code


class TPSingleStreamAttention(TPHeadsMixin, SingleStreamAttention):
    @classmethod
    def from_dense(cls, dense, group=None) -> TPSingleStreamAttention:
        world_size = get_world_size(group)
        self = object.__new__(diffusers_flavour(cls, type(dense), __name__))  # also the diffusers class it replaces
        _init_heads(self, dense, group, world_size)
        self.mlp_hidden_dim = dense.mlp_hidden_dim
        self.to_qkv_mlp_proj = shard_in_block(ColumnParallelLinear, dense.to_qkv_mlp_proj, group, self.col_blocks)
        self.to_out = shard_in_block(RowParallelLinear, dense.to_out, group, self.row_blocks)
        return self

    def _parts(self, hidden_states, attention_mask=None, image_rotary_emb=None, backend=None, parallel_config=None):
        proj = transparent_base(self.to_qkv_mlp_proj)
        eps = shared_eps(self.norm_q, self.norm_k, hidden_states.dtype)
        kernel_fits = (self.head_dim in SUPPORTED_HEAD_DIMS or
                       resolve_backend("fused_qkv_mlp_proj", hidden_states.device) != "triton")
        if (not plain(proj) or hooked(self.norm_q) or hooked(self.norm_k) or proj.bias is not None or eps is None
                or not kernel_fits):
            # unfused, same math, every module called (LoRA, hooks)
            return super()._parts(hidden_states, attention_mask, image_rotary_emb, backend, parallel_config)
        check_input(hidden_states, proj.weight, proj.in_features, type(self).__name__)
        x = copy_to_tp_region(hidden_states, self.group)  # [B, S, D]; backward: all-reduce of dx
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        q, k, v, mlp = fused_qkv_mlp_proj(  # q, k, v: [B, H_local, S, Dh]; mlp: [B, S, M_local]
            x, proj.weight, self.norm_q.tp_weight(), self.norm_k.tp_weight(), cos, sin,
            self.local_heads, self.head_dim, proj.local_blocks[3], eps,
        )
        mask = self._local_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2])
        attn = attention_heads_major(q, k, v, mask, backend, parallel_config)  # [B, S, H_local*Dh]
        return [attn, mlp]  # to_out reads both without a cat


class TPJointAttention(TPHeadsMixin, JointAttention):
    @classmethod
    def from_dense(cls, dense, group=None) -> TPJointAttention:
        world_size = get_world_size(group)
        self = object.__new__(diffusers_flavour(cls, type(dense), __name__))  # also the diffusers class it replaces
        _init_heads(self, dense, group, world_size)
        self.norm_added_q = HeadRMSNorm.from_dense(dense.norm_added_q, group)
        self.norm_added_k = HeadRMSNorm.from_dense(dense.norm_added_k, group)
        self.added_kv_proj_dim = dense.added_kv_proj_dim
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            setattr(self, name, shard_in_block(ColumnParallelLinear, getattr(dense, name), group))
        self.to_out = nn.ModuleList([shard_in_block(RowParallelLinear, dense.to_out[0], group), nn.Dropout(0.0)])
        self.to_add_out = shard_in_block(RowParallelLinear, dense.to_add_out, group)
        return self

    def _parts(self, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None, backend=None,
               parallel_config=None):
        eps_img = shared_eps(self.norm_q, self.norm_k, hidden_states.dtype)
        eps_txt = shared_eps(self.norm_added_q, self.norm_added_k, hidden_states.dtype)
        norms = (self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k)
        if eps_img is None or eps_txt is None or any(hooked(n) for n in norms):
            return super()._parts(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, backend,
                                  parallel_config)
        txt_len = encoder_hidden_states.shape[1]
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        img_lin, txt_lin = (self.to_q, self.to_k, self.to_v), (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        if self._joint_projection_fits(hidden_states, img_lin + txt_lin):
            # Each stream's Q/K/V GEMM with the QK RMSNorm + RoPE epilogue, written head-major into the joint
            # [B, H_local, St+Si, Dh] Q, K and V: no projection is written and read back, no torch.cat.
            img_lin, txt_lin = [transparent_base(m) for m in img_lin], [transparent_base(m) for m in txt_lin]
            check_input(hidden_states, img_lin[0].weight, img_lin[0].input_size, type(self).__name__)
            check_input(encoder_hidden_states, txt_lin[0].weight, txt_lin[0].input_size, type(self).__name__)
            q, k, v = joint_qkv_proj(  # [B, H_local, St+Si, Dh] each; backward: dx all-reduced per stream
                [copy_to_tp_region(encoder_hidden_states, self.group), copy_to_tp_region(hidden_states, self.group)],
                [[m.weight for m in txt_lin], [m.weight for m in img_lin]],
                [self.norm_added_q.tp_weight(), self.norm_q.tp_weight()],
                [self.norm_added_k.tp_weight(), self.norm_k.tp_weight()], cos, sin, self.local_heads,
                self.head_dim, [eps_txt, eps_img])
            mask = self._local_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2])
            out = attention_heads_major(q, k, v, mask, backend, parallel_config)  # [B, St+Si, H_local*Dh]
            return out[:, txt_len:], out[:, :txt_len]
        q, k, v = (self._heads(t) for t in self._qkv(hidden_states, (self.to_q, self.to_k, self.to_v)))
        cq, ck, cv = (self._heads(t) for t in
                      self._qkv(encoder_hidden_states, (self.add_q_proj, self.add_k_proj, self.add_v_proj)))
        # Per stream: RMSNorm with the stream's scales, then RoPE with the stream's rows of cos/sin, written with V
        # straight into the joint [B, St+Si, H_local, Dh] Q, K and V (one kernel, no torch.cat on Triton).
        q, k, v = qk_norm_rope_joint(
            (cq, q), (ck, k), (cv, v), (self.norm_added_q.tp_weight(), self.norm_q.tp_weight()),
            (self.norm_added_k.tp_weight(), self.norm_k.tp_weight()), cos, sin, (eps_txt, eps_img))
        out = self._attend(q, k, v, attention_mask, backend, parallel_config)  # [B, St+Si, H_local*Dh]
        return out[:, txt_len:], out[:, :txt_len]

    def _joint_projection_fits(self, x, linears) -> bool:
        """The fused joint projection applies: plain bias-free linears (no LoRA, no hooks) and, on Triton, a head
        width the kernel supports."""
        if not plain(*linears) or any(transparent_base(m).bias is not None for m in linears):
            return False
        return (self.head_dim in SUPPORTED_HEAD_DIMS
                or resolve_backend("joint_qkv_proj", x.device) != "triton")

    def _qkv(self, x, linears):
        if not plain(*linears):
            return [lin(x) for lin in linears]  # LoRA or hooks: each module called
        linears = [transparent_base(lin) for lin in linears]
        # Q, K and V read the same input: the backward all-reduces their summed input gradient once per stream
        # (instead of three times), overlapped with the three weight-gradient GEMMs.
        check_input(x, linears[0].weight, linears[0].input_size, type(self).__name__)
        return column_parallel_linear(x, linears, self.group)  # [B, S, inner/N] each


class TPFeedForward(FeedForward):
    """The sharded ``Flux2FeedForward``: ``linear_in`` column-parallel (packed ``[gate | up]``), ``linear_out``
    row-parallel. Where ``linear_in`` is plain, the SwiGLU is the GEMM's epilogue (``fused_linear_act``): the
    ``[tokens, 2M/N]`` projection is never written."""

    @classmethod
    def from_dense(cls, dense, group) -> TPFeedForward:
        ff = cls.__new__(cls)
        nn.Module.__init__(ff)
        ff.mlp_hidden_dim = dense.linear_in.out_features // 2
        ff.linear_in = shard_in_block(ColumnParallelLinear, dense.linear_in, group, [ff.mlp_hidden_dim] * 2)
        ff.linear_out = shard_in_block(RowParallelLinear, dense.linear_out, group)
        return ff

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear_in
        if not plain(lin) or transparent_base(lin).bias is not None:
            return super().hidden(x)  # LoRA or hooks: the module is called
        lin = transparent_base(lin)
        check_input(x, lin.weight, lin.input_size, type(self).__name__)
        # [B, S, M_local] = silu(gate) * up; backward: the input gradient all-reduced (copy_to_tp_region)
        return fused_linear_act(copy_to_tp_region(x, lin.group), lin.weight, None, "swiglu")


def _tp_feed_forward(dense, group) -> FeedForward:
    return TPFeedForward.from_dense(dense, group)


class _FusedBlockMixin:
    _linear_names: tuple[str, ...]

    def _norm_modulate(self, norm, x, shift, scale):
        if hooked(norm) or shift.shape != scale.shape:
            # hooks, or a per-token shift with a per-batch scale (the dense block broadcasts them): the dense path
            return super()._norm_modulate(norm, x, shift, scale)
        # Per batch entry ([B, 1, D]) or per token ([B, S, D]: KV-extract mode), one kernel either way. The kernels read rows with unit stride; the dense block takes any layout, so a copy, not an error.
        x, shift, scale = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, shift, scale))
        return layernorm_modulate(x, shift, scale, norm.eps)

    def _gated_residual(self, residual, gate, out):
        if isinstance(out, Projection) and plain(out.proj):
            # gate (per batch entry, or per token in KV-extract mode) applied before the (chunked, overlapped)
            # all-reduce and residual added by rank 0: the reduced sum is already residual + gate * out.
            return transparent_base(out.proj).forward_fused(out.parts, gate, residual)
        return super()._gated_residual(residual, gate, out)

    def _gated_residuals(self, items):
        """``[residual + gate * out for (residual, gate, out) in items]``: the streams' row-parallel projections in
        ONE all-reduce (:func:`~tpfuse.tp_layers.joint_row.joint_row_parallel`) where every ``out`` is a plain
        row-parallel :class:`Projection` of one group, else one by one."""
        outs = [out for _, _, out in items]
        if (all(isinstance(o, Projection) and plain(o.proj) for o in outs)
                and len({id(transparent_base(o.proj).group) for o in outs}) == 1):
            return joint_row_parallel([transparent_base(o.proj) for o in outs], [o.parts for o in outs],
                                      [g for _, g, _ in items], [r for r, _, _ in items])
        return super()._gated_residuals(items)

    def _check_inputs(self, inputs):
        # The first call (every call in debug mode) all-gathers the input shapes: ranks fed different batch splits
        # or sequence lengths get an error instead of garbage or an abort inside the collective.
        if inputs_check_due(self, inputs):
            check_inputs_agree(self, self.attn.group, inputs)

    def _pre_forward(self):
        check_adapters(modules_at(self, self._linear_paths))


class TPSingleStreamBlock(_FusedBlockMixin, SingleStreamBlock):
    """Tensor-parallel single-stream block; same ``forward`` and parameter names as the dense block."""

    _linear_names = ("attn.to_qkv_mlp_proj", "attn.to_out")
    _linear_paths = tuple(tuple(n.split(".")) for n in _linear_names)

    @classmethod
    def from_dense(cls, block: nn.Module, group=None, *, check_weights: bool = True,
                   broadcast_from: int | None = None) -> TPSingleStreamBlock:
        """This rank's shard of a dense block (ours or diffusers' ``Flux2SingleTransformerBlock``).

        ``check_weights``: first verify that every rank holds the same dense weights (one checksum all-gather,
        :func:`~tpfuse.tp_layers.consistency.check_weights_agree`); ``broadcast_from``: copy that rank's weights to
        every rank instead."""
        _check_block(block, _SINGLE_TYPES, _SINGLE_WEIGHTS, cls.__name__)
        world_size = get_world_size(group)
        check_divisible(world_size, heads=block.attn.heads, mlp_hidden=block.attn.mlp_hidden_dim)
        sync_or_check(block, group, check_weights, broadcast_from, type(block).__name__)
        self = object.__new__(diffusers_flavour(cls, type(block), __name__))  # also the diffusers class it replaces
        nn.Module.__init__(self)
        self.dim = block.attn.to_out.out_features
        self.norm = nn.LayerNorm(self.dim, elementwise_affine=False, eps=block.norm.eps)
        self.attn = TPSingleStreamAttention.from_dense(block.attn, group)
        return self


class TPDoubleStreamBlock(_FusedBlockMixin, DoubleStreamBlock):
    """Tensor-parallel double-stream block; same ``forward`` and parameter names as the dense block."""

    _linear_names = tuple(f"attn.{n}" for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                                 "to_out.0", "to_add_out")) + tuple(
        f"{ff}.{lin}" for ff in ("ff", "ff_context") for lin in ("linear_in", "linear_out"))
    _linear_paths = tuple(tuple(n.split(".")) for n in _linear_names)

    @classmethod
    def from_dense(cls, block: nn.Module, group=None, *, check_weights: bool = True,
                   broadcast_from: int | None = None) -> TPDoubleStreamBlock:
        """This rank's shard of a dense block (ours or diffusers' ``Flux2TransformerBlock``); ``check_weights`` and
        ``broadcast_from`` as in :meth:`TPSingleStreamBlock.from_dense`."""
        _check_block(block, _DOUBLE_TYPES, _DOUBLE_WEIGHTS, cls.__name__)
        world_size = get_world_size(group)
        mlp_hidden = block.ff.linear_in.out_features // 2
        check_divisible(world_size, heads=block.attn.heads, mlp_hidden=mlp_hidden)
        sync_or_check(block, group, check_weights, broadcast_from, type(block).__name__)
        self = object.__new__(diffusers_flavour(cls, type(block), __name__))  # also the diffusers class it replaces
        nn.Module.__init__(self)
        self.dim = block.attn.to_add_out.out_features
        self.mlp_hidden_dim = mlp_hidden
        for name in ("norm1", "norm1_context", "norm2", "norm2_context"):
            setattr(self, name, nn.LayerNorm(self.dim, elementwise_affine=False, eps=getattr(block, name).eps))
        self.attn = TPJointAttention.from_dense(block.attn, group)
        self.ff = _tp_feed_forward(block.ff, group)
        self.ff_context = _tp_feed_forward(block.ff_context, group)
        return self


def check_dense_block(block: nn.Module, world_size: int) -> None:
    """What :meth:`TPDoubleStreamBlock.from_dense` / :meth:`TPSingleStreamBlock.from_dense` refuse, without
    sharding anything (the family runs it on every block first)."""
    if (type(block).__module__, type(block).__name__) in _SINGLE_TYPES:
        _check_block(block, _SINGLE_TYPES, _SINGLE_WEIGHTS, "TPSingleStreamBlock")
        check_divisible(world_size, heads=block.attn.heads, mlp_hidden=block.attn.mlp_hidden_dim)
    else:
        _check_block(block, _DOUBLE_TYPES, _DOUBLE_WEIGHTS, "TPDoubleStreamBlock")
        check_divisible(world_size, heads=block.attn.heads, mlp_hidden=block.ff.linear_in.out_features // 2)
