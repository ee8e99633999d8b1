"""The FLUX.2 family: how diffusers' ``Flux2Transformer2DModel`` is sharded (its entry in :mod:`..families`).

Plan: every ``transformer_blocks`` (double-stream) and ``single_transformer_blocks`` (single-stream) block becomes
its tensor-parallel version (:mod:`.tp_blocks`: which linear is column/row, the packed single-block projection);
embedders, modulation and the final layer stay replicated. Heads and the MLP width must divide by the world size.
"""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path

import torch

from ..families import Family, OriginalFormat
from .blocks import BatchMismatchError
from .config import Flux2Config
from .keymap import bfl_to_diffusers, is_bfl

__all__ = ["FAMILY", "check_batches", "infer_config"]


@functools.cache
def _forward_signature(model_cls: type) -> inspect.Signature:
    return inspect.signature(model_cls.forward)


def check_batches(self, args, kwargs) -> None:
    """The model-level batch check of a parallelized ``Flux2Transformer2DModel``'s forward."""
    # The timestep's batch (broadcast with guidance's, for a guidance model) reaches the blocks as the
    # modulation's. The dense model broadcasts a stream of batch 1 to it (one latent, several timesteps) and the
    # blocks do the same; what it cannot broadcast is refused here naming the arguments, not a block's internal
    # modulation tensor. Anything else malformed is left to the dense forward's own errors.
    try:
        bound = _forward_signature(type(self)).bind_partial(self, *args, **kwargs).arguments
    except TypeError:
        return
    x, ctx, t, g = (bound.get(k) for k in ("hidden_states", "encoder_hidden_states", "timestep", "guidance"))
    if not all(isinstance(v, torch.Tensor) for v in (x, ctx, t)) or (x.dim(), ctx.dim(), t.dim()) != (3, 3, 1):
        return
    sizes = {"timestep": t.shape[0]}
    embedder = getattr(getattr(self, "time_guidance_embed", None), "guidance_embedder", None)
    if isinstance(g, torch.Tensor) and g.dim() == 1 and embedder is not None:  # else guidance is ignored
        sizes["guidance"] = g.shape[0]
    try:
        mod = torch.broadcast_shapes(*((n,) for n in sizes.values()))
        if not len(self.transformer_blocks) and x.shape[0] != ctx.shape[0]:
            raise RuntimeError  # no double block: the streams are concatenated before any modulation
        img, txt = torch.broadcast_shapes(x.shape[:1], mod), torch.broadcast_shapes(ctx.shape[:1], mod)
        ok = img == txt
    except RuntimeError:
        ok = False
    if not ok:
        given = ", ".join(f"{k} batch {v}" for k, v in sizes.items())
        raise BatchMismatchError(
            f"hidden_states batch {x.shape[0]} and encoder_hidden_states batch {ctx.shape[0]}, with {given}, do "
            "not broadcast to one batch: the image and text streams must end up with the same batch; a batch "
            "of 1 broadcasts against the others (one latent with several timesteps, one prompt for several "
            "latents), other batches must be equal")


def infer_config(path: Path, variant: str | None = None) -> dict:
    """A config from a single-file checkpoint's tensor shapes (BFL or diffusers keys)."""
    from ..checkpoint import _weight_files, block_count, checkpoint_shapes

    files, others = _weight_files(path, variant)
    if not files:
        raise ValueError(f"cannot infer a FLUX.2 config from {path}: no safetensors file (tpfuse reads only "
                         f"safetensors; found {[str(f) for f in others] or 'none'})")
    shapes = checkpoint_shapes(path, variant)
    needed = {"x_embedder.weight": 2, "context_embedder.weight": 2, "transformer_blocks.0.attn.norm_q.weight": 1,
              "transformer_blocks.0.ff.linear_in.weight": 2,
              "time_guidance_embed.timestep_embedder.linear_1.weight": 2}
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ValueError(f"cannot infer a FLUX.2 config from {path}: no {', '.join(absent)} (BFL: "
                         "img_in, txt_in, double_blocks.0.img_attn.norm.query_norm, double_blocks.0.img_mlp.0, "
                         "time_in.in_layer)")
    wrong = [f"{k} has shape {shapes[k]}, not {n}-D" for k, n in needed.items() if len(shapes[k]) != n]
    if wrong:
        raise ValueError(f"cannot infer a FLUX.2 config from {path}: {'; '.join(wrong)}")
    hidden, in_channels = shapes["x_embedder.weight"]
    _, joint = shapes["context_embedder.weight"]
    (head_dim,) = shapes["transformer_blocks.0.attn.norm_q.weight"]
    mlp2 = shapes["transformer_blocks.0.ff.linear_in.weight"][0]
    t_channels = shapes["time_guidance_embed.timestep_embedder.linear_1.weight"][1]
    if head_dim == 0 or hidden % head_dim:  # hidden // head_dim would build a model of other shapes
        raise ValueError(f"cannot infer a FLUX.2 config from {path}: x_embedder.weight's {hidden} rows (the hidden "
                         f"size) are not a whole number of heads of transformer_blocks.0.attn.norm_q's {head_dim}")
    mlp_ratio = mlp2 / 2 / hidden
    while int(hidden * mlp_ratio) < mlp2 // 2:  # m / h * h can round below m (61 / 56): diffusers' int() would
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)  # build a narrower MLP than the checkpoint's
    try:
        config = Flux2Config(
            num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
            num_layers=block_count(shapes, "transformer_blocks."),
            num_single_layers=block_count(shapes, "single_transformer_blocks."),
            mlp_ratio=mlp_ratio, in_channels=in_channels, joint_attention_dim=joint,
            timestep_guidance_channels=t_channels,
            guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in shapes,
            axes_dims_rope=(head_dim // 4,) * 4,
        )
    except ValueError as exc:
        raise ValueError(f"cannot infer a FLUX.2 config from {path} (RoPE axes split evenly in 4): {exc}") from None
    return config.to_diffusers_kwargs()


def _sizes(model) -> dict[str, int]:
    """What the world size must divide: the heads, and the MLP width (checked again by each block)."""
    heads = model.config.get("num_attention_heads") if hasattr(model.config, "get") else None
    sizes = {"num_attention_heads": heads or model.transformer_blocks[0].attn.heads}
    if len(model.transformer_blocks):
        sizes["mlp_hidden"] = model.transformer_blocks[0].ff.linear_in.out_features // 2
    elif len(model.single_transformer_blocks):
        sizes["mlp_hidden"] = model.single_transformer_blocks[0].attn.mlp_hidden_dim
    return sizes


def _shard_double(block, group):
    from .tp_blocks import TPDoubleStreamBlock

    return TPDoubleStreamBlock.from_dense(block, group, check_weights=False)


def _shard_single(block, group):
    from .tp_blocks import TPSingleStreamBlock

    return TPSingleStreamBlock.from_dense(block, group, check_weights=False)


def _check_block(block, world_size: int) -> None:
    from .tp_blocks import check_dense_block

    check_dense_block(block, world_size)


def _tp_block_classes() -> tuple[type, ...]:
    from .tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock

    return (TPDoubleStreamBlock, TPSingleStreamBlock)


# `tpfuse verify --family flux2 --mesh ...` builds a whole model, its dense copy and both gradients on every rank:
# the tiny preset only (one double + one single block at klein-4B's width is ~0.54 B parameters, ~9 GB per fp32
# rank: 4 ranks were killed for memory on a 24 GiB machine). Real widths are checked per block by `tpfuse verify`.
MODEL_PRESETS = {"tiny": {}}


def random_model(preset: str, seed: int = 0, meta: bool = False):
    """diffusers' ``Flux2Transformer2DModel`` of a :data:`MODEL_PRESETS` config in eval mode, seeded, with
    perturbed norm scales (``tpfuse verify --family flux2 --mesh ...``)."""
    from ..verify import random_diffusers_model

    return random_diffusers_model(Flux2Config.preset(preset), seed, meta)


def random_inputs(model, batch: int, txt: int, img: int, seed: int) -> dict:
    """Seeded forward kwargs: latents, prompt embeddings, per-sample timesteps (and guidance), FLUX.2 position
    ids."""
    from ..verify import position_ids

    g = torch.Generator().manual_seed(seed)
    dtype = model.context_embedder.weight.dtype
    cfg = model.config
    ids = position_ids(txt, img)
    out = dict(hidden_states=torch.randn(batch, img, cfg.in_channels, generator=g).to(dtype),
               encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g).to(dtype),
               timestep=torch.rand(batch, generator=g).to(dtype), img_ids=ids[txt:], txt_ids=ids[:txt])
    if cfg.guidance_embeds:
        out["guidance"] = (1 + 4 * torch.rand(batch, generator=g)).to(dtype)
    return out


def check_mesh_inputs(model, args: dict, mesh) -> None:
    """What a hybrid mesh (sp / cfg / dp) refuses for FLUX.2: the KV-cache modes (the cache holds one rank's
    reference tokens and samples, not the model's)."""
    if args.get("kv_cache_mode") is not None or args.get("kv_cache") is not None:
        from ..sequence import SequenceParallelError

        raise SequenceParallelError(f"Flux2Transformer2DModel: kv_cache_mode={args.get('kv_cache_mode')!r} is not "
                                    f"supported on the mesh {mesh.name()} (the cache would hold one rank's share of "
                                    "the reference tokens): use a tensor-parallel-only mesh for the KV-cache "
                                    "pipeline")


FAMILY = Family(
    name="flux2",
    model_classes=("Flux2Transformer2DModel",),
    diffusers_class="diffusers:Flux2Transformer2DModel",
    block_lists=(("transformer_blocks", _shard_double), ("single_transformer_blocks", _shard_single)),
    check_block=_check_block,
    tp_block_classes=_tp_block_classes,
    sizes=_sizes,
    block_counts=(("num_layers", "transformer_blocks.", "double-stream", Flux2Config.num_layers),
                  ("num_single_layers", "single_transformer_blocks.", "single-stream", Flux2Config.num_single_layers)),
    validate_config=Flux2Config.validate_dict,
    infer_config=infer_config,
    check_model_inputs=check_batches,
    original_format=OriginalFormat("bfl", is_bfl, bfl_to_diffusers),
    presets=MODEL_PRESETS,
    random_model=random_model,
    random_inputs=random_inputs,
    # ids are [S, 4] or [B, S, 4]: the token dim is the second last
    token_inputs={"hidden_states": ("img", 1), "img_ids": ("img", -2), "encoder_hidden_states": ("txt", 1),
                  "txt_ids": ("txt", -2)},
    batch_inputs=("hidden_states", "encoder_hidden_states", "timestep", "guidance"),  # (ids: the model reads [0])
    output_stream="img",
    attention_streams=(("txt", "img"),),  # double and single blocks attend over [text, image]
    check_mesh_inputs=check_mesh_inputs,
)
