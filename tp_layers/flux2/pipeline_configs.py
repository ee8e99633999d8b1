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

__all__ = ["DecoderConfig", "PIPELINES", "PixtralConfig", "TEXT_ENCODERS", "VAEConfig", "VAE"]


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

    def params(self) -> dict[str, int]:
        d, i = self.hidden_size, self.intermediate_size
        # patch conv (no bias), ln_pre; per layer: attention q/k/v/o (no biases), SwiGLU gate/up/down, 2 RMSNorms
        layer = 4 * d * d + 3 * d * i + 2 * d
        tower = self.num_channels * self.patch_size ** 2 * d + d + self.num_hidden_layers * layer
        # projector: RMSNorm, patch merger (merge^2 * d -> d), linear_1 (d -> text), linear_2 (text -> text); no biases
        t, m = self.text_hidden_size, self.spatial_merge_size
        projector = d + m * m * d * d + d * t + t * t
        return {"vision_tower": tower, "projector": projector}

    def total(self) -> int:
        return sum(self.params().values())


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

    def params(self) -> dict[str, int]:
        def conv(cin, cout, k=3):
            return cin * cout * k * k + cout

        def norm(c):  # GroupNorm with affine weight and bias
            return 2 * c

        def resnet(cin, cout):
            shortcut = conv(cin, cout, 1) if cin != cout else 0
            return norm(cin) + conv(cin, cout) + norm(cout) + conv(cout, cout) + shortcut

        def mid(c):  # resnet, attention (GroupNorm + q/k/v/out with biases), resnet
            return 2 * resnet(c, c) + norm(c) + 4 * (c * c + c)

        ch = self.block_out_channels
        enc = conv(self.in_channels, ch[0])
        prev = ch[0]
        for idx, c in enumerate(ch):
            enc += resnet(prev, c) + sum(resnet(c, c) for _ in range(self.layers_per_block - 1))
            enc += conv(c, c) if idx < len(ch) - 1 else 0  # downsample
            prev = c
        enc += mid(ch[-1]) + norm(ch[-1]) + conv(ch[-1], 2 * self.latent_channels)
        rev = list(reversed(ch))
        dec = conv(self.latent_channels, rev[0]) + mid(rev[0])
        prev = rev[0]
        for idx, c in enumerate(rev):
            dec += resnet(prev, c) + sum(resnet(c, c) for _ in range(self.layers_per_block))
            dec += conv(c, c) if idx < len(rev) - 1 else 0  # upsample
            prev = c
        dec += norm(rev[-1]) + conv(rev[-1], self.out_channels)
        quant = conv(2 * self.latent_channels, 2 * self.latent_channels, 1) + conv(self.latent_channels,
                                                                                      self.latent_channels, 1)
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
