"""The Qwen-Image family: how diffusers' ``QwenImageTransformer2DModel`` is sharded (its entry in
:mod:`..families`).

Plan: each of ``transformer_blocks`` (60 two-stream blocks in Qwen-Image 20B) is sharded in place by
:func:`.tp_blocks.shard_block` (Q/K/V, the MLP input and the adaLN modulation column, the out-projections and the
MLP output row: each rank holds 1/N of every block's matrices); ``img_in``, ``txt_in``, ``txt_norm``, the timestep
embedding, ``norm_out`` and ``proj_out`` stay replicated. The
heads (24 in Qwen-Image: world sizes 1, 2, 3, 4, 6, 8, 12, 24) must divide by the world size.
"""

from __future__ import annotations

import torch

from ..families import Family

__all__ = ["FAMILY", "PRESETS", "random_inputs", "random_model"]

# diffusers kwargs. "qwen-image-block": Qwen/Qwen-Image's transformer config (diffusers' defaults: 24 heads x 128,
# joint_attention_dim 3584, RoPE axes (16, 56, 56)) with one of its 60 blocks, for checks at the real width.
PRESETS = {
    "tiny": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
    "qwen-image-block": dict(num_layers=1),
}


def random_model(preset: str, seed: int = 0, meta: bool = False):
    """diffusers' ``QwenImageTransformer2DModel`` of a preset in eval mode, seeded; Q/K-norm scales
    ``1 + 0.1 N(0, 1)`` (their gradients are then not trivially symmetric)."""
    from diffusers import QwenImageTransformer2DModel

    from ..tp_attention import perturb_norms

    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            model = QwenImageTransformer2DModel(**PRESETS[preset])
        _after_meta_build(model)
        return model
    model = QwenImageTransformer2DModel(**PRESETS[preset]).eval()
    perturb_norms(model)
    return model


def random_inputs(model, batch: int, txt: int, img: int, seed: int) -> dict:
    """Seeded forward kwargs: ``img`` image tokens as one ``1 x h x w`` image (h the largest divisor of ``img`` up
    to its square root), ``txt`` text tokens of which the last two are padding in every other batch entry."""
    g = torch.Generator().manual_seed(seed)
    dtype = model.img_in.weight.dtype
    h = max(d for d in range(1, int(img ** 0.5) + 1) if img % d == 0)
    mask = torch.ones(batch, txt, dtype=torch.long)
    if txt > 2:
        mask[1::2, -2:] = 0
    cfg = model.config
    return dict(hidden_states=torch.randn(batch, img, cfg.in_channels, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g).to(dtype),
                encoder_hidden_states_mask=mask, timestep=torch.rand(batch, generator=g).to(dtype),
                img_shapes=[[(1, h, img // h)]] * batch)


def _sizes(model) -> dict[str, int]:
    heads = model.config.get("num_attention_heads") if hasattr(model.config, "get") else None
    return {"num_attention_heads": heads or model.transformer_blocks[0].attn.heads}


def _after_meta_build(model) -> None:
    """QwenEmbedRope's frequency tables are plain tensor attributes computed in its constructor (not buffers, so no
    checkpoint holds them): on a model built on ``meta`` they have no data. Rebuild the module on the CPU."""
    pe = model.pos_embed
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in vars(pe).values()):
        model.pos_embed = type(pe)(theta=pe.theta, axes_dim=list(pe.axes_dim), scale_rope=pe.scale_rope)


def _shard(block, group):
    from .tp_blocks import shard_block

    return shard_block(block, group)


def _after_parallelize(model) -> None:
    """The model drops the last block's text output: that block reduces its streams separately, so the text
    branch's weights get no gradient, as in the dense model (a joint reduce would give them zeros)."""
    if len(model.transformer_blocks):
        model.transformer_blocks[-1].text_output_used = False


def _check_block(block, world_size: int) -> None:
    from .tp_blocks import check_block

    check_block(block, world_size)


def _tp_block_classes() -> tuple[type, ...]:
    from .tp_blocks import TPQwenImageBlock

    return (TPQwenImageBlock,)


def _check_mesh_inputs(model, args: dict, mesh) -> None:
    """``zero_cond_t`` builds a per-token ``modulate_index`` for the whole image inside the forward; under sp a
    rank holds only its tokens (refused rather than modulating the wrong rows)."""
    if mesh.sp > 1 and getattr(model, "zero_cond_t", False):
        from ..sequence import SequenceParallelError

        raise SequenceParallelError(f"QwenImageTransformer2DModel(zero_cond_t=True) is not supported with sequence "
                                    f"parallelism (mesh {mesh.name()}): its per-token modulate_index covers the whole "
                                    "image; use a mesh without sp")


def _attach_sequence(model, sp) -> None:
    """QwenEmbedRope computes the image and text frequency tables for the whole sequence from ``img_shapes`` and
    the text length: under sp it is asked for the global text length and its tables are cut to this rank's
    tokens (the RoPE angles of the local tokens)."""

    def pre(module, args, kwargs):
        if "txt" in sp.streams and "max_txt_seq_len" in kwargs:
            kwargs = {**kwargs, "max_txt_seq_len": sp.streams["txt"]}
        return args, kwargs

    def post(module, args, kwargs, output):
        if not sp.streams:
            return output  # called outside the model's forward
        vid, txt = output
        (i0, ni), (t0, nt) = sp.local_range("img"), sp.local_range("txt")
        return vid[i0:i0 + ni], txt[t0:t0 + nt]

    model.pos_embed.register_forward_pre_hook(pre, with_kwargs=True)
    model.pos_embed.register_forward_hook(post, with_kwargs=True)


FAMILY = Family(
    name="qwenimage",
    model_classes=("QwenImageTransformer2DModel",),
    diffusers_class="diffusers:QwenImageTransformer2DModel",
    block_lists=(("transformer_blocks", _shard),),
    check_block=_check_block,
    tp_block_classes=_tp_block_classes,
    sizes=_sizes,
    block_counts=(("num_layers", "transformer_blocks.", "two-stream", 60),),
    after_meta_build=_after_meta_build,
    after_parallelize=_after_parallelize,
    presets=PRESETS,
    random_model=random_model,
    random_inputs=random_inputs,
    token_inputs={"hidden_states": ("img", 1), "encoder_hidden_states": ("txt", 1),
                  "encoder_hidden_states_mask": ("txt", 1), "controlnet_block_samples": ("img", 1)},
    batch_inputs=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance",
                  "additional_t_cond", "controlnet_block_samples", "img_shapes"),
    output_stream="img",
    attention_streams=(("txt", "img"),),
    check_mesh_inputs=_check_mesh_inputs,
    attach_sequence=_attach_sequence,
)
