"""The FLUX.2 pipelines' text encoders and VAE as shipped data: parameter counts from the configs equal the models
transformers / diffusers build from them (tiny configs, exactly) and the published sizes (real configs)."""

import dataclasses

import pytest
import torch

from tpfuse.tp_layers.flux2.pipeline_configs import (
    PIPELINES,
    PIXTRAL,
    TEXT_ENCODERS,
    VAE,
    DecoderConfig,
    PixtralConfig,
    VAEConfig,
    text_encoder_params,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())  # (a tied parameter once)


def _qwen3(cfg: DecoderConfig):
    with torch.device("meta"):
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
            tie_word_embeddings=cfg.tie_word_embeddings))


def _mistral3(cfg: DecoderConfig, vision: PixtralConfig):
    text = dict(model_type="mistral", hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size)
    vis = dict(model_type="pixtral", hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
               num_hidden_layers=vision.num_hidden_layers, num_attention_heads=4, head_dim=vision.hidden_size // 4,
               patch_size=vision.patch_size, num_channels=vision.num_channels)
    config = transformers.Mistral3Config(text_config=text, vision_config=vis,
                                         spatial_merge_size=vision.spatial_merge_size,
                                         multimodal_projector_bias=False,
                                         tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("meta"):
        return transformers.Mistral3ForConditionalGeneration(config)


TINY_QWEN = [DecoderConfig("tiny-tied", 64, 96, 3, 4, 2, 16, 101, tie_word_embeddings=True, qk_norm=True),
             DecoderConfig("tiny", 48, 80, 2, 6, 3, 8, 77, tie_word_embeddings=False, qk_norm=True)]


@pytest.mark.parametrize("cfg", TINY_QWEN, ids=lambda c: c.name)
def test_qwen3_count_equals_the_built_model(cfg):
    model = _qwen3(cfg)
    assert cfg.total() == _count(model)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert layer == sum(cfg.layer_params().values())


def test_mistral3_count_equals_the_built_model():
    text = DecoderConfig("tiny-mistral", 64, 96, 2, 4, 2, 16, 101, tie_word_embeddings=False, qk_norm=False)
    vision = PixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, patch_size=4, num_channels=3,
                           text_hidden_size=64, spatial_merge_size=2)
    model = _mistral3(text, vision)
    parts = {**text.params(), **vision.params()}
    assert sum(parts.values()) == _count(model)
    assert parts["vision_tower"] == _count(model.model.vision_tower)
    assert parts["projector"] == _count(model.model.multi_modal_projector)


@pytest.mark.parametrize("vae", [VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4),
                                 VAEConfig(block_out_channels=(8, 8, 16), layers_per_block=2, latent_channels=8)])
def test_vae_count_equals_the_built_model(vae):
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        n = len(vae.block_out_channels)
        model = AutoencoderKLFlux2(block_out_channels=vae.block_out_channels, layers_per_block=vae.layers_per_block,
                                   latent_channels=vae.latent_channels, norm_num_groups=4,
                                   down_block_types=("DownEncoderBlock2D",) * n,
                                   up_block_types=("UpDecoderBlock2D",) * n)
    assert vae.total() == _count(model)


# Published sizes: keras-hub's presets count every parameter (qwen3_presets.py, mistral3_presets.py); FLUX.2's VAE
# as diffusers builds it from its default config (the one convert_flux2_to_diffusers.py uses).
PUBLISHED = {"qwen3-4b": 4_022_468_096, "qwen3-8b": 8_190_735_360, "mistral-small-3.2-24b": 24_011_361_280}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_text_encoders_match_published_sizes(name):
    assert sum(text_encoder_params(name).values()) == PUBLISHED[name]


def test_real_configs_build_to_the_same_counts():
    """The shipped real configs, built on meta by transformers / diffusers, hold exactly the counted parameters."""
    from diffusers import AutoencoderKLFlux2

    assert _count(_qwen3(TEXT_ENCODERS["qwen3-4b"])) == TEXT_ENCODERS["qwen3-4b"].total()
    name = "mistral-small-3.2-24b"
    vision = dataclasses.replace(PIXTRAL[name])
    model = _mistral3(TEXT_ENCODERS[name], vision)
    assert _count(model) == sum(text_encoder_params(name).values())
    with torch.device("meta"):
        assert _count(AutoencoderKLFlux2()) == VAE.total() == 84_046_115


def test_pipelines_pair_transformers_with_their_encoders():
    from tpfuse.tp_layers.flux2.config import Flux2Config

    for model, (preset, encoder) in PIPELINES.items():
        enc = TEXT_ENCODERS[encoder]
        # the transformer reads the stacked hidden states of the encoder's output layers
        assert Flux2Config.preset(preset).joint_attention_dim == len(enc.output_layers) * enc.hidden_size, model
