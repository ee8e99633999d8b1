"""Black Forest Labs' original FLUX.2 checkpoint keys -> diffusers' names (read directly by the sharded loader).

The BFL -> diffusers mapping (the same one diffusers'
``convert_flux2_transformer_checkpoint_to_diffusers`` applies; ``.scale`` becomes ``.weight`` everywhere):

==============================================  ================================================================
BFL                                             diffusers
==============================================  ================================================================
``img_in`` / ``txt_in``                          ``x_embedder`` / ``context_embedder``
``time_in.{in,out}_layer``                       ``time_guidance_embed.timestep_embedder.linear_{1,2}``
``guidance_in.{in,out}_layer``                   ``time_guidance_embed.guidance_embedder.linear_{1,2}``
``{double_stream_modulation_img,_txt,single_stream_modulation}.lin``  ``... .linear``
``final_layer.linear``                           ``proj_out``
``final_layer.adaLN_modulation.1``               ``norm_out.linear`` (halves swapped: BFL is [shift, scale])
``double_blocks.N.img_attn.qkv``                 ``transformer_blocks.N.attn.to_{q,k,v}`` (rows split in 3)
``double_blocks.N.txt_attn.qkv``                 ``transformer_blocks.N.attn.add_{q,k,v}_proj``
``double_blocks.N.{img,txt}_attn.norm.{query,key}_norm``  ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}``
``double_blocks.N.img_attn.proj`` / ``txt_attn.proj``  ``attn.to_out.0`` / ``attn.to_add_out``
``double_blocks.N.{img,txt}_mlp.{0,2}``          ``{ff,ff_context}.linear_{in,out}``
``single_blocks.N.linear1`` / ``linear2``        ``single_transformer_blocks.N.attn.to_qkv_mlp_proj`` / ``to_out``
``single_blocks.N.norm.{query,key}_norm``        ``single_transformer_blocks.N.attn.norm_{q,k}``
==============================================  ================================================================

The split QKV of the BFL format costs nothing extra: rank r's rows of ``to_k`` are rows ``D + r*D/N ...`` of the
fused ``qkv`` tensor, read directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..checkpoint import Source

__all__ = ["bfl_to_diffusers", "is_bfl"]

_BFL_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_BFL_DOUBLE = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_BFL_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_BFL_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}


def is_bfl(keys: Iterable[str]) -> bool:
    """Whether a checkpoint's keys are BFL's: its block prefixes (``img_in``/``final_layer`` alone are not enough:
    Qwen-Image's diffusers checkpoints have an ``img_in``)."""
    return any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys)


def bfl_to_diffusers(key: str, shape: Sequence[int]) -> list[tuple[str, Source]] | None:
    """The diffusers name(s) of a BFL checkpoint tensor (``None`` if the key is not a FLUX.2 BFL key).

    Raises ``ValueError`` naming the key for a fused ``qkv`` that cannot be split in three equal parts (0-dim, or
    rows not a multiple of 3): splitting it anyway would drop rows silently."""
    stem, _, param = key.rpartition(".")
    param = "weight" if param == "scale" else param
    if stem in _BFL_TOP:
        return [(f"{_BFL_TOP[stem]}.{param}", Source(key, 0, None, swap_halves="adaLN_modulation" in stem))]
    m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", stem)
    if not m:
        return None
    kind, idx, inner = m.groups()
    if kind == "double":
        prefix = f"transformer_blocks.{idx}"
        if inner in _BFL_QKV:
            if len(shape) == 0 or shape[0] % 3:
                raise ValueError(f"{key}: a fused Q/K/V tensor of shape {tuple(shape)}, not 3 equal row blocks")
            third = shape[0] // 3
            return [(f"{prefix}.{name}.{param}", Source(key, i * third, third))
                    for i, name in enumerate(_BFL_QKV[inner])]
        target = _BFL_DOUBLE.get(inner)
    else:
        prefix = f"single_transformer_blocks.{idx}"
        target = _BFL_SINGLE.get(inner)
    return None if target is None else [(f"{prefix}.{target}.{param}", Source(key, 0, None))]
