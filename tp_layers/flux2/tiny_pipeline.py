"""Tiny random but complete FLUX.2 pipelines, built offline: text encoder, tokenizer, transformer, VAE, scheduler.

diffusers' own tests build tiny FLUX.2 pipelines too, but download their tokenizers from the Hub; here the
tokenizers are built locally with the ``tokenizers`` library (a word-level vocabulary over a fixed word list,
lower-cased, split on whitespace and punctuation, with an unknown token), so that ``pipe(prompt="a red fox", ...)``
runs end to end with no network at all::

    pipe, kwargs = tiny_pipeline("klein")
    image = pipe(prompt="a red fox in the snow", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images  # (1, 3, 32, 32)

The shapes follow the published models where it matters to tensor parallelism: 4 attention heads of 8 (and 4
key/value heads, so 1, 2 and 4 ranks take whole heads), an MLP width of 48, a vocabulary of 101 / 103 tokens (not
divisible by 2 or 4, so a vocabulary-parallel split is ragged), tied input/output embeddings for Qwen3 (as
Qwen3-4B) and untied ones for Mistral 3 (as Mistral-Small-3.x). The transformer is the ``tiny`` preset (its
``joint_attention_dim`` of 32 is the 2 stacked encoder layers x hidden size 16); the [dev] one also embeds the
guidance scale, as FLUX.2 [dev] does.

diffusers and transformers are imported inside the functions: this module imports without them.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import Flux2Config

__all__ = ["KINDS", "TINY_TEXT_ENCODERS", "tiny_pipeline", "tiny_tokenizer"]

KINDS = ("dev", "klein")

# The tiny text encoders' shapes (shared by both kinds except the vocabulary and the embedding tying).
_HIDDEN = 16
_HEADS = 4
_KV_HEADS = 4
_HEAD_DIM = 8
_INTERMEDIATE = 48
_LAYERS = 3
# hidden_states[0] is the embedding output, hidden_states[k] block k's: (1, 3) puts every block in the path.
_OUT_LAYERS = (1, 3)

TINY_TEXT_ENCODERS = {
    "dev": {"class": "Mistral3ForConditionalGeneration", "vocab_size": 103, "hidden_size": _HIDDEN,
            "num_attention_heads": _HEADS, "num_key_value_heads": _KV_HEADS, "head_dim": _HEAD_DIM,
            "intermediate_size": _INTERMEDIATE, "num_hidden_layers": _LAYERS, "tie_word_embeddings": False,
            "text_encoder_out_layers": _OUT_LAYERS,
            # The [dev] pipeline prepends its system message (26 words) to every prompt and truncates on the
            # right: 16 tokens would hold only the system message, and the prompt would not reach the encoder.
            "max_sequence_length": 48},
    "klein": {"class": "Qwen3ForCausalLM", "vocab_size": 101, "hidden_size": _HIDDEN,
              "num_attention_heads": _HEADS, "num_key_value_heads": _KV_HEADS, "head_dim": _HEAD_DIM,
              "intermediate_size": _INTERMEDIATE, "num_hidden_layers": _LAYERS, "tie_word_embeddings": True,
              "text_encoder_out_layers": _OUT_LAYERS,
              # The Qwen3 chat template adds 9 tokens around the prompt.
              "max_sequence_length": 24},
}

# Filler words for the vocabulary, in order: the words of the test prompts and of the [dev] system message come
# first so that they are in even the smallest vocabulary; a vocabulary larger than the list gets "w<i>" words.
_WORDS = (
    "a", "an", "the", "red", "fox", "in", "snow", "blue", "cat", "dog", "on", "of", "and", "with", "green", "tree",
    "house", "sky", "sun", "photo", "painting", "white", "black", "small", "big",
    # roles and the [dev] system message
    "system", "user", "assistant", "you", "are", "ai", "that", "reasons", "about", "image", "descriptions", "give",
    "structured", "responses", "focusing", "object", "relationships", "attribution", "actions", "without",
    "speculation",
    # punctuation (the pre-tokenizer splits it off words)
    ".", ",", "!", "?", ":", "'", "-", "\"",
    # more common words
    "is", "at", "by", "to", "from", "under", "over", "near", "water", "river", "mountain", "forest", "city",
    "street", "night", "day", "light", "dark", "bird", "flower", "car", "boat", "man", "woman", "child", "hat",
    "yellow", "orange", "purple", "grey", "brown", "old", "new", "tall", "field", "grass", "stone", "wall", "window",
    "door", "table", "chair", "book", "cup", "road", "bridge", "cloud", "rain", "moon", "star", "sea", "beach",
)

# Qwen3's chat template, reduced to what the klein pipeline renders: text (or text blocks) per message and, with
# add_generation_prompt and enable_thinking=False, an empty thinking block after the assistant header.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Mistral-Small-3.x's chat template, reduced: BOS, the system message in [SYSTEM_PROMPT] tags, user turns in
# [INST] tags. The [dev] pipeline's format_input passes content as a list of {"type": "text", "text": ...} blocks
# (and {"type": "image"} ones for image inputs, rendered as [IMG]); plain strings work too.
_MISTRAL3_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for block in content -%}"
    "{%- if block['type'] == 'text' -%}{{- block['text'] -}}"
    "{%- elif block['type'] in ['image', 'image_url'] -%}{{- '[IMG]' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + render(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' + render(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- render(message['content']) + eos_token -}}"
    "{%- else -%}{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_QWEN3_SPECIALS = {"pad_token": "<|endoftext|>", "unk_token": "<unk>", "eos_token": "<|im_end|>",
                   "additional": ("<|im_start|>", "<think>", "</think>")}
_MISTRAL3_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
                      "additional": ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]")}


def tiny_tokenizer(vocab_size: int, *, pad_token: str = "<pad>", unk_token: str = "<unk>",
                   bos_token: str | None = None, eos_token: str | None = None,
                   additional_special_tokens=(), chat_template: str | None = None, padding_side: str = "right",
                   truncation_side: str = "right", model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens, built offline.

    Ids: the special tokens first (pad, unk, bos, eos, then ``additional_special_tokens``; matched whole before
    any splitting), then words of a fixed English list (then ``w<i>`` fillers) up to ``vocab_size``. Text is
    lower-cased and split on whitespace and punctuation (``tokenizers``' ``Whitespace``: ``\\w+|[^\\w\\s]+``); a
    piece not in the vocabulary becomes ``unk_token``. No special tokens are added around encoded text (the chat
    templates render BOS themselves, as the real Mistral and Qwen ones do); decoding joins pieces with spaces.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (pad_token, unk_token, bos_token, eos_token) if t is not None]
    specials += [t for t in additional_special_tokens if t not in specials]
    if len(set(specials)) != len(specials):
        raise ValueError(f"special tokens repeat: {specials}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(specials) + 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be an int >= {len(specials) + 1} (the special tokens "
                         f"{specials} and at least one word)")
    words = [w for w in _WORDS if w not in specials][: vocab_size - len(specials)]
    i = 0
    while len(specials) + len(words) < vocab_size:
        if f"w{i}" not in words:
            words.append(f"w{i}")
        i += 1
    vocab = {tok: idx for idx, tok in enumerate(specials + words)}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Already in the vocabulary (same ids); registering them makes them whole, unsplit, unnormalized matches.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    kwargs = {"pad_token": pad_token, "unk_token": unk_token}
    if bos_token is not None:
        kwargs["bos_token"] = bos_token
    if eos_token is not None:
        kwargs["eos_token"] = eos_token
    extra = [t for t in additional_special_tokens if t not in kwargs.values()]
    if extra:
        kwargs["additional_special_tokens"] = extra
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side=padding_side,
                                  truncation_side=truncation_side, model_max_length=model_max_length,
                                  chat_template=chat_template, **kwargs)
    if len(tok) != vocab_size:  # a transformers version that appends its own tokens would break ids < vocab
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected {vocab_size}")
    return tok


def _tokenizer_for(kind: str):
    spec = TINY_TEXT_ENCODERS[kind]
    specials = _MISTRAL3_SPECIALS if kind == "dev" else _QWEN3_SPECIALS
    template = _MISTRAL3_CHAT_TEMPLATE if kind == "dev" else _QWEN3_CHAT_TEMPLATE
    return tiny_tokenizer(spec["vocab_size"], pad_token=specials["pad_token"], unk_token=specials["unk_token"],
                          bos_token=specials.get("bos_token"), eos_token=specials.get("eos_token"),
                          additional_special_tokens=specials["additional"], chat_template=template)


def _text_encoder_for(kind: str, tokenizer):
    spec = TINY_TEXT_ENCODERS[kind]
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = {"vocab_size": spec["vocab_size"], "hidden_size": spec["hidden_size"],
            "num_attention_heads": spec["num_attention_heads"], "num_key_value_heads": spec["num_key_value_heads"],
            "head_dim": spec["head_dim"], "intermediate_size": spec["intermediate_size"],
            "num_hidden_layers": spec["num_hidden_layers"], "max_position_embeddings": 256,
            "tie_word_embeddings": spec["tie_word_embeddings"], "rms_norm_eps": 1e-6,
            # 1/sqrt(hidden) rather than 0.02: the pipelines read raw residual streams (hidden_states[1] here), which
            # 0.02-scale weights would leave ~50x smaller than the final normed layer's and the prompt's effect on
            # the image faint.
            "initializer_range": spec["hidden_size"] ** -0.5}
    if kind == "klein":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(**text, **ids, bos_token_id=None, rope_theta=1000000.0)
        return Qwen3ForCausalLM(config)

    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids["bos_token_id"] = tokenizer.bos_token_id
    text_config = {"model_type": "mistral", **text, **ids, "rope_theta": 1000000000.0, "sliding_window": None}
    # The vision tower (replicated: it has no tensor-parallel plan, and FLUX.2's text prompts never run it) is kept
    # small next to the decoder, as in the real model (0.44B of 24.0B parameters): 7% of the tiny encoder's
    # linear weights, not the 22% a tower as wide as the decoder would be.
    vision_config = {"model_type": "pixtral", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "head_dim": 4, "intermediate_size": 16, "image_size": 32, "patch_size": 4, "num_channels": 3}
    config = Mistral3Config(text_config=text_config, vision_config=vision_config,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
                            vision_feature_layer=-1, tie_word_embeddings=spec["tie_word_embeddings"], **ids)
    return Mistral3ForConditionalGeneration(config)


def tiny_pipeline(kind: str = "klein", *, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu"):
    """A tiny random FLUX.2 pipeline built offline: kind ``"dev"`` -> ``Flux2Pipeline`` (Mistral 3 text encoder
    with a Pixtral vision tower), ``"klein"`` -> ``Flux2KleinPipeline`` (Qwen3 text encoder, ``is_distilled=True``).
    Same seed -> bitwise the same weights (on every rank): each component is initialised on CPU in fp32 from its
    own seed, inside a forked RNG (the caller's global RNG state is left as it was), then moved to ``device`` and
    ``dtype``.

    Returns ``(pipe, call_kwargs)``: ``call_kwargs`` is what to pass to ``pipe(...)`` besides the prompt,
    generator, size and steps (``text_encoder_out_layers`` and ``max_sequence_length``); ``pipe.encode_prompt``
    takes the same two.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; known kinds: {list(KINDS)}")
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, \
        Flux2Transformer2DModel

    cfg = Flux2Config.preset("tiny")
    if kind == "dev":  # FLUX.2 [dev] is guidance-distilled: it embeds the guidance scale
        cfg = dataclasses.replace(cfg, guidance_embeds=True)
    spec = TINY_TEXT_ENCODERS[kind]
    if len(spec["text_encoder_out_layers"]) * spec["hidden_size"] != cfg.joint_attention_dim:
        raise AssertionError("tiny text encoder does not match the transformer's joint_attention_dim")

    tokenizer = _tokenizer_for(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
        torch.manual_seed(seed + 1)
        text_encoder = _text_encoder_for(kind, tokenizer)
        torch.manual_seed(seed + 2)
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32), layers_per_block=1, latent_channels=cfg.in_channels // 4,
                                 down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)
    text_encoder.eval()
    for module in (transformer, text_encoder, vae):
        module.to(device=device)
        if dtype != torch.float32:  # (diffusers warns on any dtype cast, even a no-op one)
            module.to(dtype=dtype)
    components = {"scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "text_encoder": text_encoder,
                  "tokenizer": tokenizer, "transformer": transformer}
    pipe = Flux2Pipeline(**components) if kind == "dev" else Flux2KleinPipeline(**components, is_distilled=True)
    call_kwargs = {"text_encoder_out_layers": spec["text_encoder_out_layers"],
                   "max_sequence_length": spec["max_sequence_length"]}
    return pipe, call_kwargs
