"""Offline stand-ins for the two Hub repos diffusers' FLUX.2 pipeline tests download tokenizers from.

The pipeline tests build every component from a config except the tokenizer, which they fetch from the Hub
(``hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration`` for the klein pipelines,
``hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor`` for FLUX.2 dev). This machine has no
network, so :func:`build_hub_cache` writes a Hugging Face cache holding byte-level BPE tokenizers with a chat template
under those repo ids; with ``HF_HUB_CACHE`` pointing at it and ``HF_HUB_OFFLINE=1`` the tests' own
``from_pretrained`` calls resolve to them. The token ids differ from the real tokenizers', so a test that compares a
pipeline output with recorded numbers fails on the dense model too (the baseline run shows which); everything that
compares two runs of the same pipeline is unaffected. The Mistral processor is replaced by its tokenizer alone
(``PixtralProcessor`` needs torchvision, and the tests give it only text).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["REPOS", "build_hub_cache"]

_REVISION = "0" * 40  # the snapshot "commit" refs/main points at

# A Qwen3 chat template reduced to what Flux2KleinPipeline renders (user turns, generation prompt, no thinking).
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral-Small-3.1's template reduced to the message shapes diffusers' format_input builds (content lists).
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% for c in m['content'] %}{{ c['text'] }}{% endfor %}"
    "[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)

# repo id -> (special tokens in id order, tokenizer kwargs, chat template, entries added to tokenizer_config.json).
# The Mistral ids follow the test's Mistral3Config (image_token_index=1, bos 2, eos 3, pad 4); every id stays below
# both tests' text-encoder vocabularies (32000 and 151936).
REPOS: dict[str, tuple[list[str], dict[str, str], str, dict[str, str]]] = {
    "hf-internal-testing/tiny-random-Qwen2VLForConditionalGeneration": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        _QWEN_TEMPLATE, {"tokenizer_class": "Qwen2Tokenizer"}),  # the class the test loads it with
    "hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor": (
        ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        # AutoProcessor finds no processor config: this names the class it loads instead (offline it would look
        # for the model's config.json otherwise, and fail)
        _MISTRAL_TEMPLATE, {"processor_class": "PreTrainedTokenizerFast"}),
}


def _tokenizer(specials: list[str], kwargs: dict[str, str], template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE without merges: every byte is a token, so any prompt encodes (ids = specials, then bytes).
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)


def build_hub_cache(cache: str | Path) -> Path:
    """Write the stand-in repos into the Hugging Face cache folder ``cache`` (``HF_HUB_CACHE``) and return it."""
    cache = Path(cache)
    for repo, (specials, kwargs, template, extra) in REPOS.items():
        root = cache / ("models--" + repo.replace("/", "--"))
        snapshot = root / "snapshots" / _REVISION
        _tokenizer(specials, kwargs, template).save_pretrained(snapshot)
        config_file = snapshot / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **extra}, indent=2))
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(_REVISION)
    return cache
