"""The FLUX.2 pipelines' other components as data shipped with tpfuse (no download, no weights): the text encoders'
and the VAE's configs, and their parameter counts computed from the configs (the groundwork of issue 25's
``tpfuse plan``; the transformers' are :func:`~tpfuse.tp_layers.flux2.presets_table.param_counts`).

Sources of the configs (each field as published):

* Qwen3-4B (FLUX.2 klein 4B's encoder) and Qwen3-8B (klein 9B's): the models' ``config.json`` (Qwen/Qwen3-4B,
  Qwen/Qwen3-8B on the Hugging Face Hub); the counts equal keras-hub's presets
  (``keras_hub/src/models/qwen3/qwen3_presets.py``: 4,022,468,096 and 8,190,735,360).
* Mistral-Small-3.2-24B-Instruct-2506 (FLUX.2 [dev]'s encoder, a ``Mistral3ForConditionalGeneration``: Mistral
  text decoder + Pixtral vision tower + projector): its ``config.json`` (as reproduced verbatim in kohya-ss's
  musubi-tuner, ``flux_2/flux2_utils.py``); 24,011,361,280 parameters as keras-hub's mistral3 presets count them.
  The file has no ``tie_word_embeddings`` key and the checkpoint holds a separate ``lm_head``: untied (transformers 5
  defaults the key to True and would count 671M fewer).
* FLUX.2's VAE (``AutoencoderKLFlux2``): diffusers' defaults, which ``scripts/convert_flux2_to_diffusers.py`` uses
  (Black Forest Labs' ``AutoEncoderParams``: ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, z 32).

FLUX.2 [dev]'s pipeline stacks the Mistral decoder's hidden states of layers 10, 20, 30; klein's the Qwen3 layers 9,
18, 27 (``OUTPUT_LAYERS``): the joint_attention_dim of the transformers (15360 = 3 x 5120, 7680 = 3 x 2560,
12288 = 3 x 4096).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

__all__ = ["DecoderConfig", "PIPELINES", "PIXTRAL", "PixtralConfig", "TEXT_ENCODERS", "VAEConfig", "VAE",
           "text_encoder_params"]

# transformers model_type -> whether its attention has Qwen3's per-head RMSNorm of Q and K. The decoders
# DecoderConfig describes: Llama-style layers (Q/K/V/O, SwiGLU gate/up/down, two RMSNorms), no biases.
_DECODER_TYPES = {"qwen3": True, "mistral": False, "llama": False}


def _field(config, name: str, what: str):
    value = getattr(config, name, None)
    if value is None:
        raise ValueError(f"{what}: the config has no {name!r}")
    return value


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A Qwen3 / Mistral text decoder (``qk_norm``: Qwen3's per-head RMSNorm of Q and K)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qk_norm: bool
    output_layers: tuple[int, ...] = ()  # the hidden states the FLUX.2 pipeline stacks

    def layer_params(self) -> dict[str, int]:
        """One decoder layer's parameters by kind: ``column`` (Q/K/V, gate/up), ``row`` (O, down) and
        ``replicated`` (norms), as a tensor-parallel plan shards them."""
        d, q, kv, i = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"column": d * q + 2 * d * kv + 2 * d * i, "row": q * d + i * d,
                "replicated": 2 * d + (2 * self.head_dim if self.qk_norm else 0)}

    def params(self) -> dict[str, int]:
        """Parameters by part: ``embed`` (the vocabulary table), ``layers``, ``norm`` (the final RMSNorm), ``lm_head``
        (0 when tied: the embedding's table serves)."""
        layer = sum(self.layer_params().values())
        return {"embed": self.vocab_size * self.hidden_size, "layers": self.num_hidden_layers * layer,
                "norm": self.hidden_size, "lm_head": 0 if self.tie_word_embeddings else
                self.vocab_size * self.hidden_size}

    def total(self) -> int:
        return sum(self.params().values())

    @classmethod
    def from_transformers(cls, config, output_layers: tuple[int, ...] = (), name: str | None = None) -> DecoderConfig:
        """The decoder of a transformers config: a ``Qwen3Config`` / ``MistralConfig`` / ``LlamaConfig``, or a model
        config holding one (``Mistral3Config``: its ``get_text_config()``). The tie of the vocabulary table and the
        ``lm_head`` is read from ``config`` itself, the top-level one: transformers (5.25) ties a
        ``Mistral3ForConditionalGeneration`` by the top-level ``tie_word_embeddings`` and ignores its text config's
        (which may say the opposite). ``output_layers``: the hidden states the FLUX.2 pipeline stacks (not in the
        config). ``ValueError`` for a decoder this class does not describe (another ``model_type``, biased
        projections)."""
        get_text = getattr(config, "get_text_config", None)
        text = get_text() if callable(get_text) else config
        kind = getattr(text, "model_type", None)
        what = f"DecoderConfig.from_transformers({type(config).__name__})"
        if kind not in _DECODER_TYPES:
            raise ValueError(f"{what}: model_type={kind!r} is not a decoder this describes "
                             f"({', '.join(sorted(_DECODER_TYPES))})")
        biased = [f for f in ("attention_bias", "mlp_bias") if getattr(text, f, False)]
        if biased:
            raise ValueError(f"{what}: {', '.join(f'{f}=True' for f in biased)}: DecoderConfig counts projections "
                             "without biases")
        heads = int(_field(text, "num_attention_heads", what))
        hidden = int(_field(text, "hidden_size", what))
        # MistralConfig may leave head_dim None: transformers then uses hidden_size // heads
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(name=name or getattr(config, "_name_or_path", "") or kind, hidden_size=hidden,
                   intermediate_size=int(_field(text, "intermediate_size", what)),
                   num_hidden_layers=int(_field(text, "num_hidden_layers", what)), num_attention_heads=heads,
                   num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), vocab_size=int(_field(text, "vocab_size", what)),
                   tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qk_norm=_DECODER_TYPES[kind], output_layers=tuple(output_layers))


@dataclasses.dataclass(frozen=True)
class PixtralConfig:
    """Mistral3's vision tower (Pixtral) and its multimodal projector into a ``text_hidden_size`` decoder."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    patch_size: int
    num_channels: int
    text_hidden_size: int
    spatial_merge_size: int
    projector_bias: bool = False  # Mistral3Config.multimodal_projector_bias (Mistral-Small-3.2: false)
    feature_layers: int = 1  # how many vision layers the projector reads (vision_feature_layer: -1, one)

    def params(self) -> dict[str, int]:
        d, i = self.hidden_size, self.intermediate_size
        # patch conv (no bias), ln_pre; per layer: attention q/k/v/o (no biases), SwiGLU gate/up/down, 2 RMSNorms
        layer = 4 * d * d + 3 * d * i + 2 * d
        tower = self.num_channels * self.patch_size ** 2 * d + d + self.num_hidden_layers * layer
        # projector: RMSNorm, patch merger (merge^2 * d -> d, no bias), linear_1 (features * d -> text), linear_2
        # (text -> text); the two linears biased when projector_bias
        t, m = self.text_hidden_size, self.spatial_merge_size
        projector = d + m * m * d * d + self.feature_layers * d * t + t * t + (2 * t if self.projector_bias else 0)
        return {"vision_tower": tower, "projector": projector}

    def total(self) -> int:
        return sum(self.params().values())

    @classmethod
    def from_transformers(cls, config) -> PixtralConfig:
        """The vision tower and projector of a transformers ``Mistral3Config`` (``ValueError`` when it has no
        ``vision_config``, or a non-square patch)."""
        what = f"PixtralConfig.from_transformers({type(config).__name__})"
        vision = _field(config, "vision_config", what)
        patch = _field(vision, "patch_size", what)
        if not isinstance(patch, int):
            if len(set(patch)) != 1:
                raise ValueError(f"{what}: patch_size={patch!r} is not square")
            patch = patch[0]
        layer = getattr(config, "vision_feature_layer", -1)
        return cls(hidden_size=int(_field(vision, "hidden_size", what)),
                   intermediate_size=int(_field(vision, "intermediate_size", what)),
                   num_hidden_layers=int(_field(vision, "num_hidden_layers", what)), patch_size=int(patch),
                   num_channels=int(_field(vision, "num_channels", what)),
                   text_hidden_size=int(_field(config.get_text_config(), "hidden_size", what)),
                   spatial_merge_size=int(_field(config, "spatial_merge_size", what)),
                   projector_bias=bool(getattr(config, "multimodal_projector_bias", False)),
                   feature_layers=1 if isinstance(layer, int) else len(layer))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """``AutoencoderKLFlux2``'s sizes: an encoder and a decoder of ResNet blocks over ``block_out_channels`` (one
    mid-block attention each), quant / post-quant 1x1 convs, and a non-affine BatchNorm over the patchified
    latents (buffers only)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 32
    decoder_block_out_channels: tuple[int, ...] | None = None  # diffusers: None = block_out_channels
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(self.decoder_block_out_channels or self.block_out_channels)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along a side: ``2 ** (len(block_out_channels) - 1)``, as the FLUX.2 pipelines compute
        ``vae_scale_factor`` (8 for FLUX.2's VAE; they then patchify the latents 2 x 2 into transformer tokens)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config) -> VAEConfig:
        """From ``AutoencoderKLFlux2``'s config (``vae.config``, a mapping; or the model itself). Absent keys take
        diffusers' defaults (this class's). ``ValueError`` for block types other than the ResNet-only
        ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` the counts describe."""
        config = getattr(config, "config", config)
        if not isinstance(config, Mapping):
            raise ValueError(f"VAEConfig.from_diffusers: expected the VAE's config (a mapping), got "
                             f"{type(config).__name__}")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            other = sorted({b for b in config.get(key, ()) if b != want})
            if other:
                raise ValueError(f"VAEConfig.from_diffusers: {key} {other}: only {want} is described")
        names = [f.name for f in dataclasses.fields(cls)]
        values = {k: config[k] for k in names if config.get(k) is not None}
        for k in ("block_out_channels", "decoder_block_out_channels"):
            if k in values:
                values[k] = tuple(int(c) for c in values[k])
        return cls(**values)

    def params(self) -> dict[str, int]:
        def conv(cin, cout, k=3):
            return cin * cout * k * k + cout

        def norm(c):  # GroupNorm with affine weight and bias
            return 2 * c

        def resnet(cin, cout):
            shortcut = conv(cin, cout, 1) if cin != cout else 0
            return norm(cin) + conv(cin, cout) + norm(cout) + conv(cout, cout) + shortcut

        def mid(c):  # resnet, attention (GroupNorm + q/k/v/out with biases), resnet
            return 2 * resnet(c, c) + (norm(c) + 4 * (c * c + c) if self.mid_block_add_attention else 0)

        ch = self.block_out_channels
        enc = conv(self.in_channels, ch[0])
        prev = ch[0]
        for idx, c in enumerate(ch):
            enc += resnet(prev, c) + sum(resnet(c, c) for _ in range(self.layers_per_block - 1))
            enc += conv(c, c) if idx < len(ch) - 1 else 0  # downsample
            prev = c
        enc += mid(ch[-1]) + norm(ch[-1]) + conv(ch[-1], 2 * self.latent_channels)
        rev = list(reversed(self.decoder_channels))
        dec = conv(self.latent_channels, rev[0]) + mid(rev[0])
        prev = rev[0]
        for idx, c in enumerate(rev):
            dec += resnet(prev, c) + sum(resnet(c, c) for _ in range(self.layers_per_block))
            dec += conv(c, c) if idx < len(rev) - 1 else 0  # upsample
            prev = c
        dec += norm(rev[-1]) + conv(rev[-1], self.out_channels)
        quant = ((conv(2 * self.latent_channels, 2 * self.latent_channels, 1) if self.use_quant_conv else 0)
                 + (conv(self.latent_channels, self.latent_channels, 1) if self.use_post_quant_conv else 0))
        return {"encoder": enc, "decoder": dec, "quant_convs": quant}

    def total(self) -> int:
        return sum(self.params().values())


QWEN3_VOCAB = 151936
TEXT_ENCODERS = {
    "qwen3-4b": DecoderConfig("qwen3-4b", 2560, 9728, 36, 32, 8, 128, QWEN3_VOCAB, tie_word_embeddings=True,
                              qk_norm=True, output_layers=(9, 18, 27)),
    "qwen3-8b": DecoderConfig("qwen3-8b", 4096, 12288, 36, 32, 8, 128, QWEN3_VOCAB, tie_word_embeddings=False,
                              qk_norm=True, output_layers=(9, 18, 27)),
    "mistral-small-3.2-24b": DecoderConfig("mistral-small-3.2-24b", 5120, 32768, 40, 32, 8, 128, 131072,
                                           tie_word_embeddings=False, qk_norm=False, output_layers=(10, 20, 30)),
}
PIXTRAL = {"mistral-small-3.2-24b": PixtralConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                  patch_size=14, num_channels=3, text_hidden_size=5120,
                                                  spatial_merge_size=2)}
VAE = VAEConfig()
# model -> (transformer preset, text encoder): the FLUX.2 pipelines tpfuse knows
PIPELINES = {"klein-4b": ("klein-4b", "qwen3-4b"), "klein-9b": ("klein-9b", "qwen3-8b"),
             "dev": ("dev", "mistral-small-3.2-24b")}


def text_encoder_params(name: str) -> dict[str, int]:
    """A shipped text encoder's parameters by part (the decoder's, and for Mistral3 the vision tower and
    projector, which the pipeline loads but its text-only prompts never run)."""
    out = dict(TEXT_ENCODERS[name].params())
    if name in PIXTRAL:
        out.update(PIXTRAL[name].params())
    return out
