"""``tpfuse plan``: parameter counts (tiny configs exactly against the built modules, the shipped real configs
against the published sizes), bytes per rank against the modules' own parameters split by the sharding rules,
the activation estimates against torch's MemTracker on FakeTensors, the mesh choice against the scaling model, and
the command line (exit codes, the torchrun line, bad input, offline and fast)."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tpfuse.tp_layers import cli
from tpfuse.tp_layers import scaling_model as sm
from tpfuse.tp_layers.flux2.config import PRESETS, Flux2Config
from tpfuse.tp_layers.flux2.pipeline_configs import (
    PIPELINES,
    PIXTRAL,
    TEXT_ENCODERS,
    VAE,
    DecoderConfig,
    PixtralConfig,
    VAEConfig,
)
from tpfuse.tp_layers.flux2.presets_table import valid_world_sizes
from tpfuse.tp_layers.plan import (
    WORKSPACE_BYTES,
    encoder_ranks,
    estimate_activations,
    format_plan,
    image_tokens,
    plan_dict,
    plan_pipeline,
    text_encoder_activation_bytes,
    text_encoder_params_per_rank,
    transformer_activation_bytes,
    transformer_params_per_rank,
    vae_decode_activation_bytes,
    weight_bytes,
)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

GIB = 2 ** 30


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())  # a tied parameter once


# --------------------------------------------------------------------------------------------------------------
# Real configs: published sizes
# --------------------------------------------------------------------------------------------------------------

# Exact counts of the models diffusers / transformers build from the configs (the transformers' as
# Flux2Transformer2DModel builds each preset, checked below on meta; keras-hub's presets for the text encoders:
# qwen3_presets.py, mistral3_presets.py; diffusers' default AutoencoderKLFlux2), and the rounded sizes Black Forest
# Labs publishes ("FLUX.2 [dev] 32B", "klein 4B", "klein 9B").
TRANSFORMERS = {"dev": (32_223_281_152, 32), "klein-4b": (3_875_544_576, 4), "klein-9b": (9_078_581_248, 9)}
ENCODERS = {"dev": 24_011_361_280, "klein-4b": 4_022_468_096, "klein-9b": 8_190_735_360}
VAE_PARAMS = 84_046_115


@pytest.mark.parametrize("model", sorted(TRANSFORMERS))
def test_plan_counts_match_the_real_models(model):
    params = plan_pipeline(model, 8, 80).params
    exact, nominal = TRANSFORMERS[model]
    assert params["transformer"] == exact and round(exact / 1e9) == nominal
    with torch.device("meta"):
        built = diffusers.Flux2Transformer2DModel(**PRESETS[PIPELINES[model][0]].to_diffusers_kwargs())
    assert _count(built) == exact
    assert params["text_encoder"] + params["vision"] == ENCODERS[model]  # within 0%, so within 1%
    assert params["vae"] == VAE_PARAMS
    assert (params["vision"] > 0) == (model == "dev")  # only Mistral3 carries a vision tower


def _real_qwen3_config(name: str):
    enc = TEXT_ENCODERS[name]
    return transformers.Qwen3Config(hidden_size=enc.hidden_size, intermediate_size=enc.intermediate_size,
                                    num_hidden_layers=enc.num_hidden_layers, num_attention_heads=enc.num_attention_heads,
                                    num_key_value_heads=enc.num_key_value_heads, head_dim=enc.head_dim,
                                    vocab_size=enc.vocab_size, tie_word_embeddings=enc.tie_word_embeddings)


def test_from_transformers_reads_the_real_configs_as_shipped():
    """The published config.json values, read by from_transformers, give the shipped configs (name and the
    pipeline's output layers are not in a transformers config)."""
    import dataclasses

    for name in ("qwen3-4b", "qwen3-8b"):
        got = DecoderConfig.from_transformers(_real_qwen3_config(name), TEXT_ENCODERS[name].output_layers, name)
        assert got == TEXT_ENCODERS[name]
    name = "mistral-small-3.2-24b"
    enc, vis = TEXT_ENCODERS[name], PIXTRAL[name]
    # Mistral-Small-3.2-24B-Instruct-2506's config.json (no tie_word_embeddings key: untied, see pipeline_configs)
    config = transformers.Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072),
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, head_dim=64, patch_size=14, num_channels=3),
        spatial_merge_size=2, multimodal_projector_bias=False, tie_word_embeddings=False)
    got = DecoderConfig.from_transformers(config, enc.output_layers)
    assert dataclasses.replace(got, name=name) == enc
    assert PixtralConfig.from_transformers(config) == vis
    with torch.device("meta"):
        assert VAEConfig.from_diffusers(diffusers.AutoencoderKLFlux2().config) == VAE  # FLUX.2's: the defaults


def test_from_transformers_refuses_what_it_does_not_describe():
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not a decoder this describes"):
        DecoderConfig.from_transformers(transformers.GPT2Config())
    with pytest.raises(ValueError, match=r"attention_bias=True: DecoderConfig counts projections without biases"):
        DecoderConfig.from_transformers(transformers.LlamaConfig(attention_bias=True))
    with pytest.raises(ValueError, match=r"up_block_types \['AttnUpDecoderBlock2D'\]: only UpDecoderBlock2D"):
        VAEConfig.from_diffusers({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]})


# --------------------------------------------------------------------------------------------------------------
# Tiny configs: exact, against the modules' own parameters
# --------------------------------------------------------------------------------------------------------------


def _tiny_text(tied: bool, **kw) -> dict:
    return dict(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=101, tie_word_embeddings=tied, **kw)


def _tiny_qwen3(tied: bool):
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_tiny_text(tied)))


def _tiny_mistral3(tied: bool = False, projector_bias: bool = False):
    text = _tiny_text(tied, model_type="mistral")
    text.pop("tie_word_embeddings")  # Mistral3 ties by the top-level flag (see DecoderConfig.from_transformers)
    config = transformers.Mistral3Config(
        text_config=text, vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=24,
                                             num_hidden_layers=2, num_attention_heads=2, head_dim=8, patch_size=4),
        spatial_merge_size=2, multimodal_projector_bias=projector_bias, tie_word_embeddings=tied)
    return transformers.Mistral3ForConditionalGeneration(config)


def _split_count(model, ranks: int) -> int:
    """Parameters the widest rank holds when ``model``'s own tensor-parallel plan (transformers' ``_tp_plan``)
    shards it over ``ranks``: column layers split their rows, row layers their columns, the vocabulary table and
    head their rows (uneven: the widest rank ceil(V / ranks)); everything else whole; a tied table once."""
    plan = [(re.compile(re.escape(k).replace(r"\*", r"\d+")), style) for k, style in model._tp_plan.items()]
    seen, total = set(), 0
    for name, module in model.named_modules():
        style = next((s for pattern, s in plan if pattern.fullmatch(name)), None)
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if style == "colwise":
                assert p.shape[0] % ranks == 0
                total += p.numel() // ranks
            elif style == "rowwise":
                assert p.shape[1] % ranks == 0
                total += p.numel() // ranks
            elif style in ("embedding_rowwise", "colwise_gather_output"):
                total += math.ceil(p.shape[0] / ranks) * p.shape[1]
            else:
                total += p.numel()
    return total


@pytest.mark.parametrize("build", [lambda: _tiny_qwen3(True), lambda: _tiny_qwen3(False),
                                   lambda: _tiny_mistral3(False), lambda: _tiny_mistral3(True, projector_bias=True)],
                         ids=["qwen3-tied", "qwen3", "mistral3", "mistral3-tied-biased-projector"])
def test_tiny_text_encoders_count_and_split_exactly(build):
    torch.manual_seed(0)
    model = build()
    config = model.config
    enc = DecoderConfig.from_transformers(config)
    vision = PixtralConfig.from_transformers(config) if hasattr(config, "vision_config") else None
    assert enc.total() + (vision.total() if vision else 0) == _count(model)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert enc.tie_word_embeddings == tied
    for ranks in (1, 2):  # 101 vocabulary rows: 51 on the widest of 2 ranks
        expected = _split_count(model, ranks)
        assert text_encoder_params_per_rank(enc, ranks, vision) == expected
        assert weight_bytes(None, enc, None, encoder_ranks=ranks, vision=vision, dtype_bytes=4) == {
            "transformer": 0, "text_encoder": 4 * expected, "vae": 0}
    # 4 query heads, 2 key/value heads: 4 ranks would split a key/value head, so the group is the tp group or 1
    assert [encoder_ranks(enc, gpus, tp) for gpus, tp in ((2, 1), (4, 4), (4, 2), (8, 1))] == [2, 1, 2, 1]
    with pytest.raises(ValueError, match=r"cannot shard the text encoder over 4 ranks: num_key_value_heads=2 "):
        text_encoder_params_per_rank(enc, 4)


def test_tiny_transformer_counts_and_splits_exactly():
    cfg = Flux2Config.preset("tiny")
    model = diffusers.Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    for tp in valid_world_sizes(cfg):  # 1, 2, 4
        # a rank holds 1/tp of every block matrix (the column- and row-parallel projections), the rest whole
        expected = sum(p.numel() // tp if n.startswith(blocks) and p.ndim == 2 else p.numel()
                       for n, p in model.named_parameters())
        assert transformer_params_per_rank(cfg, tp) == expected
        assert weight_bytes(cfg, None, None, tp=tp, dtype_bytes=4)["transformer"] == 4 * expected
    assert transformer_params_per_rank(cfg, 1) == _count(model)
    with pytest.raises(ValueError, match="tp=3 must divide tiny's 4 attention heads"):
        transformer_params_per_rank(cfg, 3)


@pytest.mark.parametrize("kw", [
    dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=2),
    dict(block_out_channels=(16, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
         use_quant_conv=False, mid_block_add_attention=False),
    dict(block_out_channels=(16, 32), decoder_block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
         norm_num_groups=8, use_post_quant_conv=False),
], ids=["tiny", "no-quant-conv-no-attention", "own-decoder-channels"])
def test_tiny_vae_counts_exactly(kw):
    n = len(kw["block_out_channels"])
    vae = diffusers.AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * n,
                                       up_block_types=("UpDecoderBlock2D",) * n, **kw)
    cfg = VAEConfig.from_diffusers(vae.config)
    assert cfg.total() == _count(vae) and VAEConfig.from_diffusers(vae) == cfg
    assert weight_bytes(None, None, cfg, dtype_bytes=2)["vae"] == 2 * _count(vae)
    assert cfg.scale_factor == 2 and image_tokens(64, 32, cfg) == 16 * 8  # 2x VAE, 2x2 patches


# --------------------------------------------------------------------------------------------------------------
# Activations against torch's MemTracker (FakeTensors: the real shapes without the memory)
# --------------------------------------------------------------------------------------------------------------


# MemTracker's module-hierarchy tracker warns on transformers' decoder layers; the totals it reports do not use it.
_QUIET = pytest.mark.filterwarnings("ignore:The module hierarchy tracking")


def _tracked_activations(build, run) -> int:
    """Peak activation bytes torch's MemTracker sees while ``run(module)`` runs under no_grad, on FakeTensors
    (bf16; ``build`` makes the module and its inputs inside the fake mode)."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    from torch._subclasses.fake_tensor import FakeTensorMode

    default = torch.get_default_dtype()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            torch.set_default_dtype(torch.bfloat16)
            module, inputs = build()
            tracker = mem_tracker.MemTracker()
            tracker.track_external(module, *inputs)
            with tracker, torch.no_grad():
                run(module, *inputs)
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    finally:
        torch.set_default_dtype(default)
    return next(v for k, v in peak.items() if getattr(k, "value", None) == "Activation")


@pytest.mark.parametrize("kw, side", [
    ({}, 512),  # FLUX.2's VAE
    # a decoder widening towards the output: there the blocks' inputs held by the caller set the peak
    (dict(block_out_channels=(16, 32), decoder_block_out_channels=(64, 16), layers_per_block=2, latent_channels=4,
          norm_num_groups=8), 256),
    (dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
          mid_block_add_attention=False), 256),
], ids=["flux2", "widening-decoder", "no-mid-attention"])
def test_vae_decode_estimate_is_the_tracked_peak(kw, side):
    n = len(kw.get("block_out_channels", VAE.block_out_channels))
    types = dict(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)
    cfg = VAEConfig(**{k: v for k, v in kw.items() if k != "norm_num_groups"})
    latent = side // cfg.scale_factor
    tracked = _tracked_activations(
        lambda: (diffusers.AutoencoderKLFlux2(**types, **kw), [torch.randn(1, cfg.latent_channels, latent, latent)]),
        lambda vae, z: vae.decode(z))
    est = vae_decode_activation_bytes(cfg, side, side)
    if not kw:
        assert est == 384 * 2 ** 20  # 768 channels x 512^2 x 2 bytes: the last up block's first ResNet
    assert 0 <= tracked / est - 1 < 0.005  # the decoded image's few channels on top


@_QUIET
def test_text_encoder_estimate_is_the_tracked_peak():
    """A Qwen3 decoder run as the FLUX.2 klein pipeline runs it: a padded 512-token prompt, every hidden state
    kept, three stacked and reshaped."""
    enc = DecoderConfig("small-qwen3", 256, 768, 6, 8, 4, 32, 3000, tie_word_embeddings=False, qk_norm=True,
                        output_layers=(2, 4, 6))

    def build():
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, vocab_size=3000, tie_word_embeddings=False))
        model.config._attn_implementation = "sdpa"
        mask = torch.ones(1, 512, dtype=torch.long)
        mask[:, 100:] = 0
        return model, [torch.zeros(1, 512, dtype=torch.long), mask]

    def run(model, ids, mask):  # Flux2KleinPipeline._get_qwen3_prompt_embeds
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in enc.output_layers], dim=1)
        b, c, s, h = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(b, s, c * h)

    assert DecoderConfig.from_transformers(build()[0].config, enc.output_layers, enc.name) == enc
    tracked = _tracked_activations(build, run)
    assert abs(tracked / text_encoder_activation_bytes(enc) - 1) < 0.002


def test_transformer_estimate_bounds_the_tracked_peak():
    """diffusers' dense forward peaks below the estimate, by less than 15% (the margin is for tpfuse's layouts)."""
    cfg = Flux2Config(num_attention_heads=8, attention_head_dim=128, num_layers=1, num_single_layers=2,
                      joint_attention_dim=2048, guidance_embeds=False)
    img = image_tokens(512, 512)

    def build():
        model = diffusers.Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
        return model, [torch.randn(1, img, 128), torch.randn(1, 512, 2048), torch.ones(1), torch.zeros(img, 4),
                       torch.zeros(512, 4)]

    def run(model, x, ctx, t, img_ids, txt_ids):
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)

    tracked, est = _tracked_activations(build, run), transformer_activation_bytes(cfg, img)
    assert tracked < est < 1.15 * tracked  # 1.13 here; 1.12-1.15 for klein-4B, dev, klein-9B at full size


def test_activation_formulas_scale_as_documented():
    dev, enc = Flux2Config.preset("dev"), TEXT_ENCODERS["mistral-small-3.2-24b"]
    d, m = dev.hidden_size, dev.mlp_hidden
    img = image_tokens(1024, 1024)
    base = transformer_activation_bytes(dev, img)
    # tp divides the (8D + 4M) per token of the head/MLP slice, sp the tokens and adds the all-to-alls' 8D / tp
    assert base - transformer_activation_bytes(dev, img, tp=2) == 4608 * (8 * d + 4 * m) // 2 * 2
    whole = base - 4608 * (12 * d + 4 * m) * 2  # inputs and RoPE tables: the same on every rank
    assert transformer_activation_bytes(dev, img, sp=2) == 2304 * (20 * d + 4 * m) * 2 + whole
    assert vae_decode_activation_bytes(VAE, 2048, 2048) == 4 * vae_decode_activation_bytes(VAE, 1024, 1024)
    assert estimate_activations(dev, enc, VAE, batch=2) == {
        "transformer": transformer_activation_bytes(dev, img, batch=2),
        "text_encoder": 2 * text_encoder_activation_bytes(enc), "vae": 2 * vae_decode_activation_bytes(VAE, 1024,
                                                                                                      1024)}
    # sharding the encoder shrinks its layer's working set, but the gathered logits stay whole on every rank
    assert text_encoder_activation_bytes(enc, ranks=4) > text_encoder_activation_bytes(enc, ranks=1)


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


def test_dev_on_4_x_80_gib():
    plan = plan_pipeline("dev", 4, 80)
    rows = {m.mesh: m for m in plan.meshes}
    assert set(rows) == {"tp4", "sp2xtp2", "sp4"}  # dp > 1 needs a batch of dp images
    tp4 = rows["tp4"]
    # Mistral-Small-3.2 over the 4 ranks (32 and 8 heads divide by 4): its config.json's sizes, by hand
    d, q, kv, inter, layers, vocab = 5120, 4096, 1024, 32768, 40, 131072
    per_layer = d * q + 2 * d * kv + 2 * d * inter + q * d + inter * d
    decoder = layers * (per_layer + 2 * d) + 2 * vocab * d + d
    vision = 24_011_361_280 - decoder  # Pixtral tower + projector, whole on every rank
    encoder = layers * (per_layer // 4 + 2 * d) + 2 * (vocab // 4) * d + d + vision
    assert tp4.encoder_ranks == 4
    assert tp4.weights == {"transformer": 2 * (816_332_800 + 31_406_948_352 // 4), "text_encoder": 2 * encoder,
                           "vae": 2 * VAE_PARAMS}
    for m in plan.meshes:
        assert m.peak == sum(m.weights.values()) + max(m.activations.values()) + WORKSPACE_BYTES
        assert m.activations[m.peak_phase] == max(m.activations.values()) and m.fits == (m.peak <= 80 * GIB)
    assert rows["sp4"].weights["transformer"] == 2 * 32_223_281_152  # sp does not shard weights
    # step times and the choice are the scaling model's: the fastest (2% tie: the most dp)
    model_rows = [x for x in sm.meshes("dev", 4096, 4) if x["dp"] == 1]
    for x in model_rows:
        assert rows[{"tp4": "tp4", "sp2 x tp2": "sp2xtp2", "sp4": "sp4"}[x["mesh"]]].step_ms == x["step_ms"]
    best = min(model_rows, key=lambda x: x["step_ms"])
    assert plan.fits and (plan.recommended.sp, plan.recommended.tp) == (best["sp"], best["tp"])
    assert plan.launch == ("torchrun --nproc-per-node 4 examples/flux2_pipeline.py --model "
                           f"black-forest-labs/FLUX.2-dev --mesh {plan.recommended.mesh} --height 1024 --width 1024 "
                           '--prompt "..."')


def test_dev_on_one_48_gib_gpu_does_not_fit_and_says_why():
    plan = plan_pipeline("dev", 1, 48)
    assert not plan.fits and plan.recommended is None and plan.launch is None
    (tp1,) = plan.meshes
    assert tp1.weights["transformer"] == 2 * 32_223_281_152 and tp1.over == tp1.peak - 48 * GIB
    assert tp1.dominant == "transformer weights"
    assert "transformer weights alone 60.0 GiB > 48 GiB" in plan.reason
    # what would fit: independently, 2 and 3 GPUs of 48 GiB hold no mesh and 4 do
    assert [plan_pipeline("dev", n, 48).fits for n in (2, 3, 4)] == [False, False, True]
    assert "4 x 48 GiB would fit" in plan.suggestion
    assert f"needs at least {math.ceil(tp1.peak / GIB)} GiB each (tp1)" in plan.suggestion


def test_a_mesh_that_cannot_hold_the_model_is_refused_with_the_one_that_can():
    plan = plan_pipeline("dev", 2, 80, mesh="sp2")
    assert not plan.fits and [m.mesh for m in plan.meshes] == ["sp2"]
    assert "tp2 fits these 2 GPUs" in plan.suggestion
    assert plan_pipeline("dev", 2, 80, mesh="tp2").fits


@pytest.mark.parametrize("gpus, tp, ranks", [(4, 1, 4), (8, 8, 8), (16, 8, 8), (16, 16, 1), (6, 2, 2), (6, 3, 1)])
def test_encoder_group_is_the_mesh_else_tp_else_one(gpus, tp, ranks):
    mistral = TEXT_ENCODERS["mistral-small-3.2-24b"]  # 32 query heads, 8 key/value heads
    assert encoder_ranks(mistral, gpus, tp) == ranks
    assert encoder_ranks(mistral, gpus, tp, "replicate") == 1


def test_dp_meshes_only_for_a_batch_they_divide():
    assert all(m.dp == 1 for m in plan_pipeline("klein-4b", 4, 80).meshes)
    plan = plan_pipeline("klein-4b", 4, 80, batch=4)
    rows = {m.mesh: m for m in plan.meshes}
    assert {"dp4", "dp2xtp2", "tp4"} <= set(rows)
    per_request = {(x["dp"], x["sp"], x["tp"]): x["step_ms"] for x in sm.meshes("klein-4b", 4096, 4)}
    assert rows["dp4"].step_ms == per_request[(4, 1, 1)]  # one image per dp group
    assert rows["tp4"].step_ms == 4 * per_request[(1, 1, 4)]  # four back to back
    klein, enc = Flux2Config.preset("klein-4b"), TEXT_ENCODERS["qwen3-4b"]
    assert rows["dp4"].activations["transformer"] == transformer_activation_bytes(klein, 4096, batch=1)
    assert rows["dp4"].activations["text_encoder"] == text_encoder_activation_bytes(enc, ranks=4, batch=4)


def test_format_plan_is_the_readme_table():
    plan = plan_pipeline("dev", 4, 80)
    text = format_plan(plan)
    assert text == format_plan(plan_pipeline("dev", 4, 80))  # deterministic
    lines = text.splitlines()
    assert lines[0] == ("FLUX.2 [dev] (black-forest-labs/FLUX.2-dev), 1024x1024, batch 1, bfloat16: 4 x 80 GiB "
                        "(H100 SXM), 1 node")
    header = next(i for i, line in enumerate(lines) if line.startswith("| mesh |"))
    rows = lines[header + 2:header + 2 + len(plan.meshes)]
    tp4 = plan.recommended
    assert rows[0] == (f"| tp4 (recommended) | 16.1 | 11.8 (4-way) | 0.16 | 1.5 (VAE decode) | 2.0 | "
                       f"{tp4.peak / GIB:.1f} | yes | {tp4.step_ms:.1f} |")
    assert f"    {plan.launch}" in lines


# --------------------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------------------


def test_cli_dev_on_one_48_gib_gpu_exits_1_with_the_reason(capsys):
    assert cli.main(["plan", "--model", "dev", "--gpus", "1", "--gpu-memory", "48"]) == 1
    out = capsys.readouterr().out
    assert "dev on 1 x 48 GiB does not fit: transformer weights alone 60.0 GiB > 48 GiB" in out
    assert "What would fit: 4 x 48 GiB would fit" in out and "torchrun" not in out


def test_cli_dev_on_4_x_80_recommends_a_mesh_and_its_launch(capsys):
    assert cli.main(["plan", "--model", "dev", "--gpus", "4", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    mesh = plan_pipeline("dev", 4, 80).recommended.mesh
    assert f"Recommended: {mesh}:" in out
    (line,) = [x.strip() for x in out.splitlines() if x.strip().startswith("torchrun")]
    assert line.startswith("torchrun --nproc-per-node 4 examples/flux2_pipeline.py --model black-forest-labs/FLUX.2-dev")
    assert f"--mesh {mesh} --height 1024 --width 1024" in line


def test_cli_two_nodes_and_json(capsys):
    assert cli.main(["plan", "--model", "dev", "--gpus", "16", "--nodes", "2", "--gpu-memory", "80"]) == 0
    (line,) = [x.strip() for x in capsys.readouterr().out.splitlines() if x.strip().startswith("torchrun")]
    assert line.startswith("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "
                           "$MASTER_ADDR:29500 examples/flux2_pipeline.py")
    assert cli.main(["plan", "--model", "klein-4b", "--gpus", "1", "--gpu-memory", "24", "--height", "768",
                     "--width", "1360", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(plan_dict(plan_pipeline("klein-4b", 1, 24, height=768, width=1360))))
    assert data["fits"] and data["recommended"]["mesh"] == "tp1" and (data["height"], data["width"]) == (768, 1360)


@pytest.mark.parametrize("args, message", [
    (["--model", "flux3"], "unknown model 'flux3'; known: dev, klein-4b, klein-9b"),
    (["--gpus", "0"], "gpus=0 must be a positive integer"),
    (["--gpus", "6", "--nodes", "4"], "gpus=6 must divide evenly over nodes=4"),
    (["--gpu-memory", "0"], "gpu_memory=0.0 must be a positive number of GiB"),
    (["--gpu-memory", "-80"], "gpu_memory=-80.0 must be a positive number of GiB"),
    (["--resolution", "1000"], "resolution=1000 must be a positive multiple of 16"),
    (["--width", "1032"], "width=1032 must be a positive multiple of 16"),
    (["--batch", "0"], "batch=0 must be a positive integer"),
    (["--mesh", "tp2"], "mesh 'tp2' has 2 ranks, not gpus=4"),
    (["--mesh", "dp2xtp2"], "mesh 'dp2xtp2' cannot run dev at batch 1"),
    (["--mesh", "cfg2xtp2"], "mesh 'cfg2xtp2': FLUX.2 pipelines have no cfg batch to split"),
])
def test_cli_bad_input_exits_2_naming_the_value(args, message, capsys):
    argv = {"--model": "dev", "--gpus": "4", "--gpu-memory": "80"}
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = value
    assert cli.main(["plan", *[x for kv in argv.items() for x in kv]]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.splitlines()) == 1 and err.startswith("tpfuse plan: error: ")


def test_cli_runs_offline_in_seconds_without_diffusers():
    """A fresh interpreter: the plan prints in well under 10 s, importing neither diffusers nor transformers (no
    weights, no download: the configs ship with tpfuse)."""
    code = ("import sys, time; t = time.perf_counter(); from tpfuse.tp_layers import cli; "
            "rc = cli.main(['plan', '--model', 'dev', '--gpus', '8', '--gpu-memory', '80']); "
            "print('heavy:', [m for m in ('diffusers', 'transformers') if m in sys.modules], rc, "
            "round(time.perf_counter() - t, 2))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("heavy: [] 0 ") and wall < 10, (proc.stdout[-300:], wall)
