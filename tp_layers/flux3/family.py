"""The FLUX.3 family: how diffusers' ``Flux3Transformer2DModel`` is sharded (its entry in :mod:`..families`).

Plan: every per-mode block (``mode_blocks.image``, ``mode_blocks.image_cond``, ``txt_mode_blocks``) and every
joint single block (``single_transformer_blocks``) is sharded in place by :func:`.tp_blocks.shard_block`; the
embedders, the per-token modulations, ``norm_out`` and ``proj_out`` stay replicated. Heads and the MLP width must
divide by the world size.
"""

from __future__ import annotations

import torch

from ..families import Family

__all__ = ["FAMILY", "PRESETS", "random_inputs", "random_model"]

# diffusers kwargs. "flux3-block": diffusers' Flux3Transformer2DModel defaults (24 heads x 128, MLP ratio 3,
# joint_attention_dim 20480) with one per-mode block per mode and one joint single block, for checks at the real
# width.
PRESETS = {
    "tiny": dict(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=4, joint_attention_dim=24, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)),
    "flux3-block": dict(num_layers=1, num_single_layers=1),
}


def random_model(preset: str, seed: int = 0, meta: bool = False):
    """diffusers' ``Flux3Transformer2DModel`` of a preset in eval mode, seeded; Q/K-norm scales
    ``1 + 0.1 N(0, 1)``."""
    from diffusers.models.transformers.transformer_flux3 import Flux3Transformer2DModel

    from ..tp_attention import perturb_norms

    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return Flux3Transformer2DModel(**PRESETS[preset])
    model = Flux3Transformer2DModel(**PRESETS[preset]).eval()
    perturb_norms(model)
    return model


def random_inputs(model, batch: int, txt: int, img: int, seed: int) -> dict:
    """Seeded forward kwargs, with reference-image tokens (a third of ``img``, at least one) so that every mode's
    blocks run; position ids drawn at random (RoPE only reads them)."""
    g = torch.Generator().manual_seed(seed)
    dtype = model.context_embedder.weight.dtype
    cfg = model.config
    cond = max(1, img // 3)

    def ids(n):
        return torch.randint(0, 64, (n, len(cfg.axes_dims_rope)), generator=g)

    return dict(hidden_states=torch.randn(batch, img, cfg.in_channels, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g).to(dtype),
                timestep=torch.rand(batch, generator=g).to(dtype), img_ids=ids(img), txt_ids=ids(txt),
                image_cond_hidden_states=torch.randn(batch, cond, cfg.cond_in_channels, generator=g).to(dtype),
                image_cond_ids=ids(cond))


def _sizes(model) -> dict[str, int]:
    cfg = model.config
    heads = cfg.get("num_attention_heads") if hasattr(cfg, "get") else None
    block = next(iter(model.single_transformer_blocks), None) or next(iter(model.txt_mode_blocks), None)
    sizes = {"num_attention_heads": heads or block.attn.heads}
    if block is not None:
        sizes["mlp_hidden"] = block.ff.linear_in.out_features // 2
    return sizes


def _shard(block, group):
    from .tp_blocks import shard_block

    return shard_block(block, group)


def _check_block(block, world_size: int) -> None:
    from .tp_blocks import check_block

    check_block(block, world_size)


def _tp_block_classes() -> tuple[type, ...]:
    from .tp_blocks import TPFlux3ModeBlock, TPFlux3SingleBlock

    return (TPFlux3ModeBlock, TPFlux3SingleBlock)


FAMILY = Family(
    name="flux3",
    model_classes=("Flux3Transformer2DModel",),
    diffusers_class="diffusers.models.transformers.transformer_flux3:Flux3Transformer2DModel",
    block_lists=(("mode_blocks.image", _shard), ("mode_blocks.image_cond", _shard), ("txt_mode_blocks", _shard),
                 ("single_transformer_blocks", _shard)),
    check_block=_check_block,
    tp_block_classes=_tp_block_classes,
    sizes=_sizes,
    block_counts=(("num_layers", "txt_mode_blocks.", "per-mode", 5),
                  ("num_single_layers", "single_transformer_blocks.", "joint single", 28)),
    presets=PRESETS,
    random_model=random_model,
    random_inputs=random_inputs,
    # ids are [S, 4] or [B, S, 4]: the token dim is the second last
    token_inputs={"hidden_states": ("img", 1), "img_ids": ("img", -2), "encoder_hidden_states": ("txt", 1),
                  "txt_ids": ("txt", -2), "image_cond_hidden_states": ("cond", 1), "image_cond_ids": ("cond", -2)},
    batch_inputs=("hidden_states", "encoder_hidden_states", "timestep", "image_cond_hidden_states",
                  "target_timestep"),
    output_stream="img",
    # per-mode blocks attend within their stream, the joint single blocks over [text, image(, reference image)]
    attention_streams=(("txt",), ("img",), ("cond",), ("txt", "img", "cond")),
)
