"""``tpfuse plan``: which mesh runs a whole FLUX.2 pipeline on N GPUs of a given memory, decided on paper.

From configs shipped in the package (no download, no weights; sources in :mod:`.flux2.config` and
:mod:`.flux2.pipeline_configs`), for every candidate mesh of the GPUs: each rank's bytes of the transformer, the
text encoder and the VAE (weights + activations + workspace), whether that fits the GPU, the predicted denoising
step time (:mod:`.scaling_model`), and the recommended launch (mesh and ``torchrun`` line).

**Weights per rank** (:func:`weight_bytes`; exact parameter counts times the dtype's bytes):

* transformer: the replicated part plus 1/tp of the block matrices
  (:func:`~tpfuse.tp_layers.flux2.presets_table.param_counts`); sp, dp replicate it;
* text encoder: sharded over an *encoder group* of ``E`` ranks (:func:`encoder_ranks`: the whole mesh if its size
  divides the encoder's attention and key/value heads, else the tp group if tp does, else ``E = 1``, replicated;
  ``text_encoder="replicate"`` forces 1). Split over E: every decoder layer's Q/K/V/gate/up (column) and O/down
  (row) matrices, the vocabulary table (rows, ``ceil(V / E)`` on the widest rank: an uneven split is allowed) and
  the ``lm_head`` (vocabulary rows; nothing when tied to the table); whole on every rank: the RMSNorms and, for
  Mistral3, the Pixtral vision tower and projector (FLUX.2's text-only prompts never run them, but the pipeline
  loads them);
* VAE: whole on every rank.

**Activations per rank** (:func:`estimate_activations`; documented estimates, not measurements): the phases run
one after the other (encode the prompt once, denoise, decode), so the peak holds the largest phase's activations on
top of all the weights, which stay resident. See :func:`transformer_activation_bytes`,
:func:`text_encoder_activation_bytes`, :func:`vae_decode_activation_bytes` for each coefficient and why.

**Workspace**: :data:`WORKSPACE_BYTES`, a fixed 2 GiB per rank.

**Units**: every size is printed in GiB (2^30 bytes). ``--gpu-memory`` takes the card's marketed size and reads it
as GiB: GPU memory is built in binary sizes (an H100 80GB is 5 stacks of 16 GiB HBM3, an RTX 4090's 24 GB is
24 GiB of GDDR6X); what the driver keeps for itself (H100: 80 GiB built, 79.6 GiB visible to CUDA) is inside the
workspace. Reading "80" as 80 x 10^9 bytes (74.5 GiB) would refuse plans that run.

**dp**: a dp mesh dimension splits a batch of images (each dp group denoises ``batch / dp`` of them, the pipeline
refuses a batch it does not divide), so only meshes whose dp divides ``batch`` are candidates; at batch 1, dp > 1
would leave dp - 1 groups idle at the latency of the smaller mesh. **cfg** is never used: FLUX.2 [dev] and klein
are guidance-distilled (one transformer call per step), and the pipelines run any CFG branch as its own call, not
as a batch a cfg dimension could split.
"""

from __future__ import annotations

import dataclasses
import math

from . import scaling_model as sm
from .flux2.config import Flux2Config
from .flux2.pipeline_configs import PIPELINES, PIXTRAL, TEXT_ENCODERS, VAE, DecoderConfig, PixtralConfig, VAEConfig
from .flux2.presets_table import DTYPE_BYTES, param_counts
from .mesh import mesh_name, parse_mesh_spec

__all__ = ["GiB", "WORKSPACE_BYTES", "TEXT_TOKENS", "REPOS", "MeshPlan", "Plan", "image_tokens", "encoder_ranks",
           "transformer_params_per_rank", "text_encoder_params_per_rank", "weight_bytes",
           "transformer_activation_bytes", "text_encoder_activation_bytes", "vae_decode_activation_bytes",
           "estimate_activations", "rank_bytes", "launch_command", "plan_pipeline", "format_plan", "plan_dict"]

GiB = 2 ** 30
# Per rank, outside the weights and activations: the CUDA context and the kernel images of torch, cuBLAS, cuDNN,
# NCCL and Triton (~0.5-0.6 GiB on an H100 with CUDA 12's lazy loading), cuBLAS workspaces (torch's default on
# Hopper: 32 MiB per handle and stream), cuDNN's workspace for the VAE's full-resolution 3x3 convolutions (a few
# hundred MiB at 1024^2), NCCL's buffers (NCCL_BUFFSIZE 4 MiB x channels x peers per communicator: the tp, sp and
# world groups each have one, ~0.1-0.3 GiB each) and the caching allocator's fragmentation. A round 2 GiB: an upper
# guess of their sum, the same on every mesh (one GPU has no NCCL, but the slack is the least certain part).
WORKSPACE_BYTES = 2 * GiB
# FLUX.2's pipelines pad every prompt to max_sequence_length = 512 tokens (Flux2Pipeline, Flux2KleinPipeline).
TEXT_TOKENS = 512
# Hugging Face repos of the models `plan` knows (the --model of examples/flux2_pipeline.py).
REPOS = {"dev": "black-forest-labs/FLUX.2-dev", "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
         "klein-9b": "black-forest-labs/FLUX.2-klein-9B"}
_LABELS = {"dev": "FLUX.2 [dev]", "klein-4b": "FLUX.2 [klein] 4B", "klein-9b": "FLUX.2 [klein] 9B"}
_PHASES = {"text_encoder": "text encoder", "transformer": "transformer", "vae": "VAE decode"}
_ENCODER_LABELS = {"qwen3-4b": "Qwen3-4B", "qwen3-8b": "Qwen3-8B",
                   "mistral-small-3.2-24b": "Mistral-Small-3.2-24B-Instruct-2506"}
TEXT_ENCODER_MODES = ("shard", "replicate")
# "What would fit" looks at up to 8 nodes of 8 GPUs (GPU counts 1-8, then whole nodes).
_SEARCH_COUNTS = (*range(1, 9), *range(16, 65, 8))


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------


def image_tokens(height: int, width: int, vae: VAEConfig | None = None) -> int:
    """The transformer's image tokens for an ``height x width`` image: the VAE downsamples by its
    :attr:`~VAEConfig.scale_factor` (8 for FLUX.2's) and the pipeline patchifies the latents 2 x 2, so
    ``(height / 16) * (width / 16)`` for FLUX.2. ``ValueError`` unless both sides are positive multiples of that
    step (the pipelines refuse other sizes)."""
    step = 2 * (vae or VAE).scale_factor
    _check_side("height", height, step)
    _check_side("width", width, step)
    return (height // step) * (width // step)


def _check_side(name: str, value, step: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % step:
        raise ValueError(f"{name}={value!r} must be a positive multiple of {step} (the VAE's {step // 2}x "
                         f"downsampling x the 2x2 latent patches)")


def encoder_ranks(encoder: DecoderConfig, gpus: int, tp: int, mode: str = "shard") -> int:
    """How many ranks the text encoder is sharded over on a mesh of ``gpus`` ranks with tensor parallelism ``tp``:
    the whole mesh if ``gpus`` divides both ``num_attention_heads`` and ``num_key_value_heads`` (every rank takes
    whole query and key/value heads), else ``tp`` if it does, else 1 (replicated). ``mode="replicate"``: 1."""
    if mode not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder={mode!r} must be one of {list(TEXT_ENCODER_MODES)}")
    if mode == "replicate":
        return 1
    for ranks in (gpus, tp):
        if encoder.num_attention_heads % ranks == 0 and encoder.num_key_value_heads % ranks == 0:
            return ranks
    return 1


def transformer_params_per_rank(cfg: Flux2Config, tp: int) -> int:
    """Parameters one rank holds of ``cfg``'s transformer under tensor parallelism ``tp``: the replicated ones
    (embedders, modulation, input/output layers, QK norms) and 1/tp of the block matrices."""
    if cfg.heads % tp or cfg.mlp_hidden % tp:
        raise ValueError(f"tp={tp} must divide {cfg.name}'s {cfg.heads} attention heads and MLP width "
                         f"{cfg.mlp_hidden}")
    replicated, sharded = param_counts(cfg)
    return replicated + sharded // tp


def text_encoder_params_per_rank(encoder: DecoderConfig, ranks: int, vision: PixtralConfig | None = None) -> int:
    """Parameters the widest rank holds of a text encoder sharded over ``ranks`` (see the module doc): the layers'
    column and row matrices / ranks, ``ceil(vocab / ranks)`` rows of the vocabulary table and of an untied
    ``lm_head``, the norms and ``vision`` (Mistral3's tower + projector) whole. ``ValueError`` when a matrix does
    not split into whole heads or equal MLP slices."""
    bad = [f"{name}={value}" for name, value in (("num_attention_heads", encoder.num_attention_heads),
                                                 ("num_key_value_heads", encoder.num_key_value_heads),
                                                 ("intermediate_size", encoder.intermediate_size))
           if value % ranks]
    if bad:
        raise ValueError(f"{encoder.name}: cannot shard the text encoder over {ranks} ranks: {', '.join(bad)} not "
                         f"divisible by {ranks}")
    layer = encoder.layer_params()
    rows = -(-encoder.vocab_size // ranks)  # tensor_split: the first vocab % ranks ranks hold one row more
    table = rows * encoder.hidden_size
    parts = encoder.params()
    per_layer = (layer["column"] + layer["row"]) // ranks + layer["replicated"]
    return (table + encoder.num_hidden_layers * per_layer + parts["norm"]
            + (0 if encoder.tie_word_embeddings else table) + (vision.total() if vision else 0))


def weight_bytes(transformer_cfg: Flux2Config | None, encoder_cfg: DecoderConfig | None,
                 vae_cfg: VAEConfig | None, *, tp: int = 1, encoder_ranks: int = 1,
                 vision: PixtralConfig | None = None, dtype_bytes: int = 2) -> dict[str, int]:
    """Weight bytes one rank holds: ``{"transformer", "text_encoder", "vae"}`` (0 for a component passed as None).

    ``tp``: the mesh's tensor-parallel size (the transformer's split); ``encoder_ranks``: the text encoder's group
    (:func:`encoder_ranks`); ``vision``: Mistral3's vision tower and projector (replicated), None for a Qwen3
    encoder; ``dtype_bytes``: bytes per parameter (2 for bf16). For a live pipeline: ``Flux2Config.from_dict(
    pipe.transformer.config)``, ``DecoderConfig.from_transformers(pipe.text_encoder.config)`` (+
    ``PixtralConfig.from_transformers`` for Mistral3), ``VAEConfig.from_diffusers(pipe.vae.config)``."""
    return {"transformer": transformer_params_per_rank(transformer_cfg, tp) * dtype_bytes if transformer_cfg else 0,
            "text_encoder": (text_encoder_params_per_rank(encoder_cfg, encoder_ranks, vision) * dtype_bytes
                             if encoder_cfg else 0),
            "vae": vae_cfg.total() * dtype_bytes if vae_cfg else 0}


# --------------------------------------------------------------------------------------------------------------
# Activations (inference: no autograd graph, so a tensor lives while a Python name holds it)
# --------------------------------------------------------------------------------------------------------------


def transformer_activation_bytes(cfg: Flux2Config, image: int, *, tp: int = 1, sp: int = 1, batch: int = 1,
                                 dtype_bytes: int = 2, text_tokens: int = TEXT_TOKENS) -> int:
    """Peak activation bytes of one transformer forward on one rank (``image`` image tokens per sample, ``batch``
    samples on this rank's group; sp splits the tokens, tp the heads and the MLP).

    The peak is inside a single-stream block (its fused projection is the widest tensor of the model; a double
    block's widest, the feed-forward's ``[tokens, 2M/tp]`` gate|up, is narrower), for ``s = batch x (image + text)
    / sp`` tokens on the rank, per token:

    * ``4 D`` replicated over tp: the residual stream (block input), its LayerNorm + modulate output, the
      row-parallel ``to_out`` output (partial sums, all-reduced in place) and the block output ``x + gate * out``;
    * ``(8 D + 4 M) / tp`` over the local heads and MLP slice: the fused projection ``[s, (3D + 2M)/tp]`` (Q, K, V,
      gate, up: the plain-torch path's width; the fused Triton kernel writes ``3D + M``, so this over-counts it by
      ``M/tp``), Q/K/V in the head-major layout attention reads after QK-norm + RoPE (``3D``), the attention
      output (``D``), SwiGLU's output (``M``) and their concatenation, ``to_out``'s input (``D + M``);
    * with sp > 1, ``8 D / tp`` more: the Ulysses all-to-alls' send and receive buffers of the packed Q/K/V
      (``2 x 3D``) and of the attention output going back (``2 x D``).

    Plus what stays whole on every rank through the forward: the text encoder's hidden states
    ``[batch, text, joint_attention_dim]``, the packed latents ``[batch, image, in_channels]``, the gathered output
    ``[batch, image, out_channels]``, and RoPE's cos and sin tables, fp32 ``[image + text, head_dim]`` each.
    Attention itself adds only per-row statistics (FlashAttention / SDPA's fused kernels keep no S x S scores).

    Checked on FakeTensors with torch's ``MemTracker`` (bf16): diffusers' dense forward (tp = sp = 1) peaks 12-15%
    below this (klein-4B and dev at 1024^2, klein-9B at 2048^2; tests/test_plan.py checks the bound on klein-4B):
    the margin is for tpfuse's layouts and buffers, which that check does not run."""
    d, m = cfg.hidden_size, cfg.mlp_hidden
    tokens = -(-batch * (image + text_tokens) // sp)
    sharded = 8 * d + 4 * m + (8 * d if sp > 1 else 0)
    per_token = 4 * d + -(-sharded // tp)
    out_channels = cfg.out_channels or cfg.in_channels
    whole = batch * (text_tokens * cfg.joint_attention_dim + image * (cfg.in_channels + out_channels))
    rope = 2 * (image + text_tokens) * cfg.head_dim * 4  # fp32 cos, sin
    return (tokens * per_token + whole) * dtype_bytes + rope


def text_encoder_activation_bytes(encoder: DecoderConfig, *, ranks: int = 1, batch: int = 1, dtype_bytes: int = 2,
                                  text_tokens: int = TEXT_TOKENS) -> int:
    """Peak activation bytes of the text encoder's forward over ``batch`` prompts of ``text_tokens`` tokens on one
    rank of its ``ranks``-rank group. Per sample, per token (``d`` hidden, ``q`` = heads x head_dim, ``kv`` =
    key/value heads x head_dim, ``I`` the MLP width, ``V`` the vocabulary, ``L`` layers, ``k`` output layers), the
    hidden states transformers keeps plus the larger of two moments:

    * ``(L + 1) d`` throughout: transformers keeps every layer's hidden state (the embeddings' and each layer's
      output) when the pipeline asks for ``output_hidden_states=True``;
    * inside a layer: ``2 d`` (the RMSNorm output and the row-parallel output; the layer's input and output are
      kept hidden states) + ``max(5q + 3kv, 3I) / ranks``, the larger half: attention holds Q/K/V (``q + 2kv``),
      Q and K after the norm/RoPE (``q + kv``), K and V repeated to every query head (``2q``: transformers' SDPA
      path repeats them when a padding mask is passed) and the output (``q``), with no ``[tokens, tokens]``
      scores (SDPA's memory-efficient kernel takes the mask); the MLP holds ``silu(gate)``, up and their product
      (``3I``; gate's own output is freed once SiLU has read it);
    * after the layers: the logits the causal LM computes for every token (FLUX.2 discards them), ``V``, with the
      pipeline's stack of the ``k`` output layers and its reshape to ``[tokens, k d]`` (``2 k d``); on ``ranks``
      ranks the vocabulary-parallel head momentarily holds its ``ceil(V/ranks)`` slice, the padded copy it sends,
      the gathered ``ranks x ceil(V/ranks)`` and the concatenated ``V``.

    On FakeTensors with torch's ``MemTracker`` (one rank: transformers 5.25, bf16, a padded 512-token prompt) this
    is the tracked peak of Qwen3-4B and Mistral-Small-3.2's decoder to 0.1% (tests/test_plan.py checks it on
    Qwen3-4B)."""
    d, q, kv = encoder.hidden_size, encoder.num_attention_heads * encoder.head_dim, \
        encoder.num_key_value_heads * encoder.head_dim
    k = len(encoder.output_layers) or 3  # FLUX.2 stacks 3 layers
    vocab, rows = encoder.vocab_size, -(-encoder.vocab_size // ranks)
    layer = 2 * d + -(-max(5 * q + 3 * kv, 3 * encoder.intermediate_size) // ranks)
    head = vocab if ranks == 1 else 2 * rows + ranks * rows + vocab
    after = max(head, vocab + 2 * k * d)
    per_token = (encoder.num_hidden_layers + 1) * d + max(layer, after)
    return batch * text_tokens * per_token * dtype_bytes


def _resnet_peak(cin: int, cout: int) -> int:
    """Channels live at once in a diffusers ``ResnetBlock2D`` (no in-place ops), per pixel: its input (kept for
    the shortcut) with norm1's and SiLU's outputs (``3 cin``), with SiLU's and conv1's (``2 cin + cout``), with
    two of norm2 / SiLU / conv2 (``cin + 2 cout``), and at the end the shortcut, conv2's output, their sum and
    the division by ``output_scale_factor`` (``4 cout``)."""
    return max(3 * cin, 2 * cin + cout, cin + 2 * cout, 4 * cout)


def vae_decode_activation_bytes(vae: VAEConfig, height: int, width: int, *, batch: int = 1,
                                dtype_bytes: int = 2) -> int:
    """Peak activation bytes of the VAE decoding ``batch`` images of ``height x width`` on one rank: the largest
    live set of a walk through diffusers' ``Decoder`` (per image, channels x pixels at each stage's resolution):

    * mid block at the latent resolution (``C`` = the last decoder channels): the caller's input, the attention's
      residual, GroupNorm output, Q, K, V and output (``7 C``; one head of ``C`` channels: SDPA's memory-efficient
      kernel, no ``[pixels, pixels]`` scores) and its ResNets (:func:`_resnet_peak`);
    * each up block: the block's input stays alive in the caller (``Decoder.forward``'s ``sample``) while its
      ResNets run (the first one takes it as its own input), and its upsampler holds its input, the 2x nearest
      interpolation and the conv output (``c`` at the low resolution + ``2 x c`` at 4x the pixels);
    * the output GroupNorm + SiLU + conv: 2 x ``block_out_channels[0]`` at full resolution.

    For FLUX.2's VAE (channels 512, 512, 256, 128 from the latents up) the peak is the last up block's first
    ResNet at full resolution: 256-channel input, its norm and SiLU = 768 channels x H x W (1.5 GiB at 1024^2 in
    bf16). GroupNorm adds nothing: torch's kernels accumulate in fp32 but write the input's dtype.

    Checked on FakeTensors with torch's ``MemTracker`` (diffusers 0.42, bf16): the tracked peak of
    ``AutoencoderKLFlux2().decode`` at 512^2 and 1024^2 to 0.1% (tests/test_plan.py checks it)."""
    factor = vae.scale_factor
    if height % factor or width % factor:
        raise ValueError(f"height={height}, width={width} must be multiples of the VAE's scale factor {factor}")
    ch = list(reversed(vae.decoder_channels))
    px = (height // factor) * (width // factor)
    top = ch[0]
    # post_quant_conv and conv_in: the latents and conv_in's output
    peak = (2 * vae.latent_channels + top) * px
    # its second ResNet runs while the caller still holds the block's input; the attention (between the two)
    # holds 7 C
    mid = max(_resnet_peak(top, top) + top, 7 * top if vae.mid_block_add_attention else 0)
    peak = max(peak, mid * px)
    prev = top
    for i, c in enumerate(ch):
        first = _resnet_peak(prev, c)
        rest = prev + _resnet_peak(c, c) if vae.layers_per_block >= 1 else 0  # layers_per_block + 1 ResNets
        peak = max(peak, max(first, rest) * px)
        if i < len(ch) - 1:  # the upsampler: input, interpolated, conv output; the block's input in the caller
            peak = max(peak, (prev + c) * px + 2 * c * 4 * px)
            px *= 4
        prev = c
    peak = max(peak, (2 * ch[-1] + vae.out_channels) * px)
    return batch * peak * dtype_bytes


def estimate_activations(transformer_cfg: Flux2Config | None, encoder_cfg: DecoderConfig | None,
                         vae_cfg: VAEConfig | None, *, tp: int = 1, sp: int = 1, encoder_ranks: int = 1,
                         height: int = 1024, width: int = 1024, batch: int = 1, dtype_bytes: int = 2,
                         text_tokens: int = TEXT_TOKENS) -> dict[str, int]:
    """Peak activation bytes per rank of each phase: ``{"transformer", "text_encoder", "vae"}`` (0 for a component
    passed as None). The phases run one after another, so a rank's peak is all weights + the largest of these +
    :data:`WORKSPACE_BYTES`.

    ``tp``, ``sp``: the transformer's mesh sizes; ``encoder_ranks``: the text encoder's group; ``height``,
    ``width``: the image (the transformer's image tokens follow from ``vae_cfg``'s scale factor, FLUX.2's 8 when
    None); ``batch``: images on this rank's group (the transformer's is ``batch / dp`` on a dp mesh; the text
    encoder and the VAE run the whole batch on every rank); ``dtype_bytes``: 2 for bf16; ``text_tokens``: the
    prompt length (FLUX.2 pads to 512). Formulas: :func:`transformer_activation_bytes`,
    :func:`text_encoder_activation_bytes`, :func:`vae_decode_activation_bytes`."""
    img = image_tokens(height, width, vae_cfg)
    return {"transformer": (transformer_activation_bytes(transformer_cfg, img, tp=tp, sp=sp, batch=batch,
                                                         dtype_bytes=dtype_bytes, text_tokens=text_tokens)
                            if transformer_cfg else 0),
            "text_encoder": (text_encoder_activation_bytes(encoder_cfg, ranks=encoder_ranks, batch=batch,
                                                           dtype_bytes=dtype_bytes, text_tokens=text_tokens)
                             if encoder_cfg else 0),
            "vae": (vae_decode_activation_bytes(vae_cfg, height, width, batch=batch, dtype_bytes=dtype_bytes)
                    if vae_cfg else 0)}


# --------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """One candidate mesh: its ``--mesh`` spelling and sizes, the encoder group, bytes per rank (``weights`` and
    ``activations`` by component, ``workspace``, ``peak`` = all weights + the largest phase's activations +
    workspace), whether it fits, how far over it is (``over``, bytes; 0 when it fits), the largest part of the
    peak (``dominant``), the predicted step time of the whole batch (ms) and the dims whose groups span nodes."""

    mesh: str
    dp: int
    sp: int
    tp: int
    encoder_ranks: int
    weights: dict
    activations: dict
    workspace: int
    peak_phase: str
    peak: int
    fits: bool
    over: int
    dominant: str
    dominant_bytes: int
    step_ms: float
    across_nodes: tuple = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """:func:`plan_pipeline`'s answer. ``meshes``: fitting ones first, best first (the scaling model's ranking),
    then the others, smallest peak first; ``recommended``: the best fitting mesh or None; ``launch``: its
    ``torchrun`` line; ``reason`` (why nothing fits) and ``suggestion`` (what would), empty when something fits."""

    model: str
    repo: str
    transformer: str
    text_encoder: str
    text_encoder_mode: str
    height: int
    width: int
    batch: int
    dtype: str
    gpus: int
    nodes: int
    gpu: str
    gpu_memory_gb: float
    gpu_memory_bytes: int
    params: dict
    meshes: tuple
    recommended: MeshPlan | None
    launch: str | None
    reason: str = ""
    suggestion: str = ""

    @property
    def fits(self) -> bool:
        return self.recommended is not None


def _gib(n: int) -> str:
    """Bytes as GiB: one decimal from 1 GiB up, two below (the VAE's 0.16)."""
    x = n / GiB
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def _mem_label(gb: float) -> str:
    return f"{gb:g} GiB"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def launch_command(repo: str, mesh: str, gpus: int, nodes: int, height: int, width: int) -> str:
    """The ``torchrun`` line of ``examples/flux2_pipeline.py`` on ``gpus`` GPUs over ``nodes`` nodes (run it on
    every node; ``$MASTER_ADDR`` is the first node's address)."""
    per_node = gpus // nodes
    head = (f"torchrun --nproc-per-node {per_node}" if nodes == 1 else
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} --rdzv-backend c10d "
            "--rdzv-endpoint $MASTER_ADDR:29500")
    return (f'{head} examples/flux2_pipeline.py --model {repo} --mesh {mesh} --height {height} --width {width} '
            '--prompt "..."')


def _components(model: str):
    preset, encoder = PIPELINES[model]
    return Flux2Config.preset(preset), TEXT_ENCODERS[encoder], PIXTRAL.get(encoder), VAE


def _candidates(model: str, img: int, gpus: int, batch: int) -> list[dict]:
    """The scaling model's factorizations of ``gpus`` for the model's transformer (heads divide by tp x sp, the
    MLP by tp, the tokens by sp), without cfg, whose dp divides the batch."""
    shape = sm.MODELS[PIPELINES[model][0]]
    return [m for m in sm.factorizations(shape, img, gpus) if m["cfg"] == 1 and batch % m["dp"] == 0]


def rank_bytes(transformer_cfg: Flux2Config | None, encoder_cfg: DecoderConfig | None, vae_cfg: VAEConfig | None,
               *, tp: int = 1, sp: int = 1, dp: int = 1, encoder_ranks: int = 1, vision: PixtralConfig | None = None,
               height: int = 1024, width: int = 1024, batch: int = 1,
               dtype_bytes: int = 2) -> tuple[dict[str, int], dict[str, int]]:
    """``(weight_bytes(...), estimate_activations(...))`` of one rank on a mesh of ``dp`` x ``sp`` x ``tp`` (``dp``:
    every group splitting the batch, dp x cfg): the transformer's group denoises ``ceil(batch / dp)`` images, the
    text encoder and the VAE run the whole batch on every rank. What ``tpfuse plan``, ``load_pipeline``'s fit check
    and ``memory_report`` all count."""
    weights = weight_bytes(transformer_cfg, encoder_cfg, vae_cfg, tp=tp, encoder_ranks=encoder_ranks, vision=vision,
                           dtype_bytes=dtype_bytes)
    acts = estimate_activations(None, encoder_cfg, vae_cfg, encoder_ranks=encoder_ranks, height=height, width=width,
                                batch=batch, dtype_bytes=dtype_bytes)
    acts["transformer"] = estimate_activations(transformer_cfg, None, vae_cfg, tp=tp, sp=sp, height=height,
                                               width=width, batch=-(-batch // dp),
                                               dtype_bytes=dtype_bytes)["transformer"]
    return weights, acts


def _memory(model: str, dims: dict, gpus: int, height: int, width: int, batch: int, dtype_bytes: int, mode: str,
            memory: int) -> dict:
    """Bytes per rank of ``model`` on the mesh ``dims`` (dp/sp/tp) of ``gpus`` ranks, and the fit against
    ``memory`` bytes."""
    transformer, encoder, vision, vae = _components(model)
    ranks = encoder_ranks(encoder, gpus, dims["tp"], mode)
    weights, acts = rank_bytes(transformer, encoder, vae, tp=dims["tp"], sp=dims["sp"], dp=dims["dp"],
                               encoder_ranks=ranks, vision=vision, height=height, width=width, batch=batch,
                               dtype_bytes=dtype_bytes)
    phase = max(acts, key=lambda k: (acts[k], k))
    peak = sum(weights.values()) + acts[phase] + WORKSPACE_BYTES
    parts = {"transformer weights": weights["transformer"], "text encoder weights": weights["text_encoder"],
             "VAE weights": weights["vae"], f"{_PHASES[phase]} activations": acts[phase],
             "workspace": WORKSPACE_BYTES}
    dominant = max(parts, key=lambda k: (parts[k], k))
    return {"mesh": mesh_name(dims), "dp": dims["dp"], "sp": dims["sp"], "tp": dims["tp"], "encoder_ranks": ranks,
            "weights": weights, "activations": acts, "workspace": WORKSPACE_BYTES, "peak_phase": phase,
            "peak": peak, "fits": peak <= memory, "over": max(0, peak - memory), "dominant": dominant,
            "dominant_bytes": parts[dominant]}


def _check_inputs(model, gpus, gpu_memory_gb, nodes, batch, dtype, gpu, text_encoder) -> None:
    if model not in PIPELINES:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(sorted(PIPELINES))}")
    _positive_int("gpus", gpus)
    _positive_int("nodes", nodes)
    _positive_int("batch", batch)
    if gpus % nodes:
        raise ValueError(f"gpus={gpus} must divide evenly over nodes={nodes} (the same GPUs on every node)")
    if (isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float))
            or not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0):
        raise ValueError(f"gpu_memory={gpu_memory_gb!r} must be a positive number of GiB (e.g. 80)")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_BYTES)}")
    if gpu not in [g.name for g in sm.GPUS]:
        raise ValueError(f"gpu={gpu!r} must be one of {[g.name for g in sm.GPUS]} (the scaling model's GPUs)")
    if text_encoder not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder={text_encoder!r} must be one of {list(TEXT_ENCODER_MODES)}")


def _parse_mesh(mesh: str, gpus: int, model: str, img: int, batch: int) -> dict:
    """``--mesh`` as dims, refused (``ValueError`` naming it) unless it is one of the candidates."""
    dims = parse_mesh_spec(mesh)
    full = {d: dims.get(d, 1) for d in ("dp", "cfg", "sp", "tp")}
    size = math.prod(full.values())
    if size != gpus:
        raise ValueError(f"mesh {mesh!r} has {size} ranks, not gpus={gpus}")
    if full["cfg"] > 1:
        raise ValueError(f"mesh {mesh!r}: FLUX.2 pipelines have no cfg batch to split (guidance-distilled; any CFG "
                         "branch is its own transformer call)")
    valid = _candidates(model, img, gpus, batch)
    if not any(all(m[d] == full[d] for d in ("dp", "sp", "tp")) for m in valid):
        names = ", ".join(mesh_name(m) for m in valid) or "none"
        raise ValueError(f"mesh {mesh!r} cannot run {model} at batch {batch}: tp x sp must divide the attention "
                         f"heads, tp the MLP width, sp the image and text tokens, dp the batch; valid meshes of "
                         f"{gpus} GPUs: {names}")
    return full


def plan_pipeline(model: str, gpus: int, gpu_memory_gb: float, resolution: int = 1024, nodes: int = 1,
                  batch: int = 1, dtype: str = "bfloat16", gpu: str = "H100 SXM", text_encoder: str = "shard", *,
                  height: int | None = None, width: int | None = None, mesh: str | None = None) -> Plan:
    """Plan ``model`` (a key of :data:`~tpfuse.tp_layers.flux2.pipeline_configs.PIPELINES`: dev, klein-4b,
    klein-9b) on ``gpus`` GPUs of ``gpu_memory_gb`` GiB each over ``nodes`` nodes, for ``batch`` images of
    ``height x width`` (default ``resolution`` square) in ``dtype``. Every candidate mesh (``mesh``: only that
    one) gets its bytes per rank and the scaling model's step time on ``gpu`` (ring all-reduce); the recommendation
    is the fastest fitting mesh (within the scaling model's 2% tie, the one with more dp). ``ValueError`` naming the
    offending value for an unknown model, a count < 1, GPUs that do not split over the nodes, a memory <= 0, a
    size that is not a multiple of 16, or a ``mesh`` that cannot run the model."""
    _check_inputs(model, gpus, gpu_memory_gb, nodes, batch, dtype, gpu, text_encoder)
    transformer, encoder, vision, vae = _components(model)
    if height is None or width is None:  # the square side is used: its error names it
        _check_side("resolution", resolution, 2 * vae.scale_factor)
    height = resolution if height is None else height
    width = resolution if width is None else width
    img = image_tokens(height, width, vae)
    dtype_bytes = DTYPE_BYTES[dtype]
    memory = int(gpu_memory_gb * GiB)
    candidates = ([_parse_mesh(mesh, gpus, model, img, batch)] if mesh is not None else
                  _candidates(model, img, gpus, batch))
    preset = PIPELINES[model][0]
    steps = {(x["dp"], x["sp"], x["tp"]): x for x in sm.meshes(preset, img, gpus, nodes, gpu, "ring")}
    rows = []
    for dims in candidates:
        x = steps[(dims["dp"], dims["sp"], dims["tp"])]
        # each dp group denoises batch / dp images back to back (the scaling model's batch-1 step each, as it
        # counts a guidance pipeline's two forwards)
        step = batch // dims["dp"] * x["step_ms"]
        rows.append(MeshPlan(**_memory(model, dims, gpus, height, width, batch, dtype_bytes, text_encoder, memory),
                             step_ms=step, across_nodes=tuple(x["across_nodes"])))
    fitting = [r for r in rows if r.fits]
    # the scaling model's ranking (lowest step; within its 2% tie the most dp, then throughput, then name)
    ranked = sm._ranked([{"dp": r.dp, "step_ms": r.step_ms, "throughput_speedup": batch / r.step_ms,
                          "mesh": r.mesh, "row": r} for r in fitting])
    others = sorted((r for r in rows if not r.fits), key=lambda r: (r.peak, r.mesh))
    meshes = tuple([x["row"] for x in ranked] + others)
    best = ranked[0]["row"] if ranked else None
    params = {"transformer": sum(param_counts(transformer)), "text_encoder": sum(encoder.params().values()),
              "vision": vision.total() if vision else 0, "vae": vae.total()}
    plan = Plan(model=model, repo=REPOS[model], transformer=preset, text_encoder=PIPELINES[model][1],
                text_encoder_mode=text_encoder, height=height, width=width, batch=batch, dtype=dtype, gpus=gpus,
                nodes=nodes, gpu=gpu, gpu_memory_gb=gpu_memory_gb, gpu_memory_bytes=memory, params=params,
                meshes=meshes, recommended=best,
                launch=launch_command(REPOS[model], best.mesh, gpus, nodes, height, width) if best else None)
    if best is None:
        plan = dataclasses.replace(plan, reason=_why_not(plan, img), suggestion=_suggest(plan, img, dtype_bytes,
                                                                                         memory))
    return plan


def _why_not(plan: Plan, img: int) -> str:
    label = f"{plan.model} on {plan.gpus} x {_mem_label(plan.gpu_memory_gb)}"
    if not plan.meshes:
        shape = sm.MODELS[plan.transformer]
        return (f"{label}: no mesh of {plan.gpus} GPUs runs {plan.model} at batch {plan.batch}: tp x sp must divide "
                f"its {shape.heads} attention heads, tp its MLP width {shape.mlp_hidden}, sp the {img} image and "
                f"{TEXT_TOKENS} text tokens, and the rest is dp, which must divide the batch")
    m = min(plan.meshes, key=lambda r: (r.peak, r.mesh))
    alone = m.dominant_bytes > plan.gpu_memory_bytes
    cause = (f"{m.dominant} alone {_gib(m.dominant_bytes)} GiB > {_mem_label(plan.gpu_memory_gb)}" if alone else
             f"the largest part is {m.dominant}, {_gib(m.dominant_bytes)} GiB")
    w = m.weights
    return (f"{label} does not fit: {cause}. The lowest peak per rank ({m.mesh}) is {_gib(m.peak)} GiB, "
            f"{_gib(m.over)} GiB over (weights: transformer {_gib(w['transformer'])}, text encoder "
            f"{_gib(w['text_encoder'])}, VAE {_gib(w['vae'])}; {_PHASES[m.peak_phase]} activations "
            f"{_gib(m.activations[m.peak_phase])}; workspace {_gib(m.workspace)} GiB)")


def _suggest(plan: Plan, img: int, dtype_bytes: int, memory: int) -> str:
    """The fewest GPUs of this memory that hold the model (whole nodes of 8 beyond 8), and the memory the given
    GPU count would need."""
    out = []
    # with a --mesh that does not fit, another mesh of the same GPUs may (plan.meshes holds only that one)
    counts = ([plan.gpus] if len(plan.meshes) == 1 and len(_candidates(plan.model, img, plan.gpus, plan.batch)) > 1
              else []) + [n for n in _SEARCH_COUNTS if n > plan.gpus]
    for n in counts:
        fits = [_memory(plan.model, d, n, plan.height, plan.width, plan.batch, dtype_bytes, plan.text_encoder_mode,
                        memory) for d in _candidates(plan.model, img, n, plan.batch)]
        fits = [f for f in fits if f["fits"]]
        if fits:
            f = min(fits, key=lambda f: (f["peak"], f["mesh"]))
            nodes = plan.nodes if n == plan.gpus else (1 if n <= 8 else n // 8)
            flags = (f" --nodes {nodes}" if nodes > 1 else "") + (f" --mesh {f['mesh']}" if n == plan.gpus else "")
            what = (f"{f['mesh']} fits these {n} GPUs ({_gib(f['peak'])} GiB per rank)" if n == plan.gpus else
                    f"{n} x {_mem_label(plan.gpu_memory_gb)} would fit (e.g. {f['mesh']}: {_gib(f['peak'])} GiB per "
                    "rank)")
            out.append(f"{what}: tpfuse plan --model {plan.model} --gpus {n}{flags} --gpu-memory "
                       f"{plan.gpu_memory_gb:g}")
            break
    else:
        out.append(f"no mesh of up to {_SEARCH_COUNTS[-1]} GPUs of {_mem_label(plan.gpu_memory_gb)} holds it")
    if plan.meshes:
        m = min(plan.meshes, key=lambda r: (r.peak, r.mesh))
        out.append(f"on {plan.gpus} GPU{'s' if plan.gpus > 1 else ''} it needs at least "
                   f"{math.ceil(m.peak / GiB)} GiB each ({m.mesh})")
    return "; ".join(out)


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def format_plan(plan: Plan) -> str:
    """The plan as Markdown: a header (model, image, GPUs, parameters and their sources), one table row per mesh
    (bytes per rank in GiB), then the recommendation and its ``torchrun`` line, or why nothing fits and what
    would. Deterministic (no timings, no paths)."""
    p = plan.params
    enc = _ENCODER_LABELS.get(plan.text_encoder, plan.text_encoder)
    vision = f", incl. the Pixtral vision tower + projector {_params(p['vision'])}" if p["vision"] else ""
    lines = [f"{_LABELS.get(plan.model, plan.model)} ({plan.repo}), {plan.width}x{plan.height}, batch {plan.batch}, "
             f"{plan.dtype}: {plan.gpus} x {_mem_label(plan.gpu_memory_gb)} ({plan.gpu}), {plan.nodes} "
             f"node{'s' if plan.nodes > 1 else ''}",
             "",
             f"Parameters (from the configs shipped with tpfuse, no download): transformer {_params(p['transformer'])} "
             f"(preset {plan.transformer}), text encoder {enc} {_params(p['text_encoder'] + p['vision'])}{vision}, "
             f"VAE {_params(p['vae'])}.",
             "",
             "GiB per rank (2^30 bytes; --gpu-memory is read as GiB). Weights of each component (the text encoder "
             "sharded over the whole mesh, the tp group or not at all: N-way), the activations of the largest phase "
             "(text encoder, transformer step, VAE decode run one after another), a fixed workspace; step: one "
             f"denoising step of the batch, modelled for {plan.gpu} (not measured).",
             "",
             "| mesh | transformer | text encoder | VAE | activations (peak phase) | workspace | peak per rank | fits "
             "| step ms |",
             "|---|---:|---:|---:|---|---:|---:|---|---:|"]
    if not plan.meshes:  # no table: the text below says why
        lines = lines[:-3]
    for m in plan.meshes:
        w, split = m.weights, ("replicated" if m.encoder_ranks == 1 else f"{m.encoder_ranks}-way")
        fits = ("yes" if m.fits else f"no: {_gib(m.over)} over; {m.dominant} {_gib(m.dominant_bytes)}")
        star = " (recommended)" if plan.recommended and m.mesh == plan.recommended.mesh else ""
        lines.append(f"| {m.mesh}{star} | {_gib(w['transformer'])} | {_gib(w['text_encoder'])} ({split}) | "
                     f"{_gib(w['vae'])} | {_gib(m.activations[m.peak_phase])} ({_PHASES[m.peak_phase]}) | "
                     f"{_gib(m.workspace)} | {_gib(m.peak)} | {fits} | {m.step_ms:.1f} |")
    lines.append("")
    if plan.recommended is not None:
        m = plan.recommended
        nodes = f"; {', '.join(m.across_nodes)} across nodes" if m.across_nodes else ""
        lines += [f"Recommended: {m.mesh}: {_gib(m.peak)} GiB of {_mem_label(plan.gpu_memory_gb)} per rank, "
                  f"{m.step_ms:.1f} ms per denoising step{nodes}.", "", f"    {plan.launch}"]
        if plan.batch > 1:
            lines += ["", f"(The example generates one image; a batch of {plan.batch} is one pipeline call with "
                          f"{plan.batch} prompts on this mesh.)"]
    else:
        lines += [f"{plan.reason}.", "", f"What would fit: {plan.suggestion}."]
    return "\n".join(lines)


def plan_dict(plan: Plan) -> dict:
    """The plan as JSON-ready data (``tpfuse plan --json``): every field, ``fits``, and sizes in bytes."""
    out = dataclasses.asdict(plan)
    out["fits"] = plan.fits
    return out
