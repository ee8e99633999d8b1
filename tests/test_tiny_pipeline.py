"""The tiny offline FLUX.2 pipelines (tp_layers/flux2/tiny_pipeline.py): complete diffusers pipelines, text encoder
and tokenizer included, that run end to end on CPU from a prompt with no network."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tpfuse.tp_layers.flux2.tiny_pipeline import KINDS, TINY_TEXT_ENCODERS, tiny_pipeline, tiny_tokenizer  # noqa: E402

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    pipe, kwargs = tiny_pipeline(request.param)
    return request.param, pipe, kwargs


def _generate(pipe, kwargs, prompt=PROMPT, seed=0):
    # klein is step-distilled (is_distilled=True): it ignores guidance and warns about any scale above 1
    guidance = 1.0 if type(pipe).__name__ == "Flux2KleinPipeline" else 4.0
    return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def test_pipeline_classes(built):
    kind, pipe, kwargs = built
    want = {"dev": ("Flux2Pipeline", "Mistral3ForConditionalGeneration"),
            "klein": ("Flux2KleinPipeline", "Qwen3ForCausalLM")}[kind]
    assert (type(pipe).__name__, type(pipe.text_encoder).__name__) == want
    assert set(kwargs) == {"text_encoder_out_layers", "max_sequence_length"}
    if kind == "klein":
        assert pipe.config.is_distilled


def test_image_from_prompt(built):
    _, pipe, kwargs = built
    image = _generate(pipe, kwargs)
    assert image.shape == (1, 3, 32, 32)
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1


def test_prompt_changes_image(built):
    """The text encoder is in the path: another prompt, another image (same noise)."""
    _, pipe, kwargs = built
    assert not torch.equal(_generate(pipe, kwargs), _generate(pipe, kwargs, prompt="a blue cat on a tree"))


def test_same_seed_same_pipeline_and_image(built):
    kind, pipe, kwargs = built
    again, kwargs_again = tiny_pipeline(kind, seed=0)
    assert kwargs_again == kwargs
    for name in ("transformer", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(_generate(pipe, kwargs), _generate(again, kwargs))

    other, _ = tiny_pipeline(kind, seed=1)
    for name in ("transformer", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(other, name).state_dict()
        assert not all(torch.equal(a[k], b[k]) for k in a), name


def test_caller_rng_untouched():
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    tiny_pipeline("klein", seed=7)
    assert torch.equal(torch.rand(4), want)


def test_prompt_embeds_match_joint_attention_dim(built):
    kind, pipe, kwargs = built
    embeds, text_ids = pipe.encode_prompt(PROMPT, **kwargs)
    joint = pipe.transformer.config.joint_attention_dim
    assert embeds.shape == (1, kwargs["max_sequence_length"], joint)
    assert joint == len(kwargs["text_encoder_out_layers"]) * pipe.text_encoder.config.get_text_config().hidden_size
    assert text_ids.shape == (1, kwargs["max_sequence_length"], 4)
    other, _ = pipe.encode_prompt("a blue cat on a tree", **kwargs)
    assert not torch.allclose(embeds, other)


def test_padding_does_not_change_real_tokens(built):
    """Right padding under a causal mask: the real tokens' embeddings do not depend on max_sequence_length, and the
    whole prompt fits (the [dev] system message does not crowd it out)."""
    kind, pipe, kwargs = built
    n = kwargs["max_sequence_length"]
    short, _ = pipe.encode_prompt(PROMPT, **kwargs)
    long, _ = pipe.encode_prompt(PROMPT, **{**kwargs, "max_sequence_length": n + 8})
    real = _prompt_mask(kind, pipe, PROMPT, n).sum()
    assert 0 < real < n
    torch.testing.assert_close(long[:, :real], short[:, :real], rtol=1e-5, atol=1e-6)


def _prompt_mask(kind, pipe, prompt, max_length):
    ids = _prompt_ids(kind, pipe, prompt, max_length)
    return ids != pipe.tokenizer.pad_token_id


def _prompt_ids(kind, pipe, prompt, max_length):
    """The token ids each pipeline feeds its text encoder, built the way the pipeline builds them."""
    tok = pipe.tokenizer
    if kind == "dev":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        out = tok.apply_chat_template(format_input([prompt], system_message=pipe.system_message),
                                      add_generation_prompt=False, tokenize=True, return_dict=True,
                                      return_tensors="pt", padding="max_length", truncation=True,
                                      max_length=max_length)
    else:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        out = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=max_length)
    assert out["input_ids"].shape == (1, max_length)
    assert torch.equal(out["attention_mask"].bool(), out["input_ids"] != tok.pad_token_id)
    return out["input_ids"][0]


def test_chat_template_renders_the_prompt(built):
    kind, pipe, kwargs = built
    tok = pipe.tokenizer
    ids = _prompt_ids(kind, pipe, PROMPT, kwargs["max_sequence_length"])
    tokens = tok.convert_ids_to_tokens(ids.tolist())
    words = PROMPT.split()
    assert any(tokens[i:i + len(words)] == words for i in range(len(tokens))), tokens
    assert tok.unk_token not in tokens  # every test-prompt and system-message word is in the vocabulary
    if kind == "dev":
        assert tokens[:2] == ["<s>", "[SYSTEM_PROMPT]"]
        assert "[INST]" in tokens and "[/INST]" in tokens
    else:
        assert tokens[:2] == ["<|im_start|>", "user"]
        assert tokens[tokens.index("assistant") + 1:tokens.index("assistant") + 3] == ["<think>", "</think>"]
    assert tokens[-1] == tok.pad_token


def test_tokenizer_round_trip(built):
    kind, pipe, _ = built
    tok = pipe.tokenizer
    vocab = TINY_TEXT_ENCODERS[kind]["vocab_size"]
    assert len(tok) == vocab == pipe.text_encoder.config.get_text_config().vocab_size
    assert vocab % 2 and vocab % 4  # ragged vocabulary split on 2 and 4 ranks

    ids = tok("A red fox in the Snow.")["input_ids"]
    assert all(0 <= i < vocab for i in ids)
    assert tok.decode(ids) == "a red fox in the snow ."
    assert tok.unk_token_id not in ids

    unknown = tok("a zyzzyva fox")["input_ids"]
    assert unknown[1] == tok.unk_token_id and unknown[0] != tok.unk_token_id

    padded = tok(["a red fox", "a"], padding="max_length", max_length=6, return_tensors="pt")
    assert padded["input_ids"].shape == (2, 6)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert (padded["input_ids"][1, 1:] == tok.pad_token_id).all()
    truncated = tok("a red fox in the snow", truncation=True, max_length=3)["input_ids"]
    assert tok.convert_ids_to_tokens(truncated) == ["a", "red", "fox"]

    # every id decodes and re-encodes to itself (special tokens are whole tokens)
    every = list(range(vocab))
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(every)) == every


def test_tiny_tokenizer_sizes():
    for vocab in (12, 101, 103, 300):
        tok = tiny_tokenizer(vocab)
        assert len(tok) == vocab
        assert max(tok.get_vocab().values()) == vocab - 1
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_tokenizer(2)


def test_text_encoder_shapes_shard():
    """Shapes that split over 2 and 4 ranks: whole query and key/value heads, an even MLP split, and
    embeddings tied for Qwen3 (as Qwen3-4B) but not for Mistral 3 (as Mistral-Small-3.x)."""
    for kind in KINDS:
        pipe, _ = tiny_pipeline(kind)
        text = pipe.text_encoder.config.get_text_config()
        for ranks in (2, 4):
            assert text.num_attention_heads % ranks == 0 and text.num_key_value_heads % ranks == 0
            assert text.intermediate_size % ranks == 0
        assert text.head_dim == 8
        tied = pipe.text_encoder.lm_head.weight is pipe.text_encoder.get_input_embeddings().weight
        assert tied == (kind == "klein")
        assert max(TINY_TEXT_ENCODERS[kind]["text_encoder_out_layers"]) == text.num_hidden_layers


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"'schnell'.*'dev'.*'klein'"):
        tiny_pipeline("schnell")


def test_bfloat16():
    pipe, kwargs = tiny_pipeline("klein", dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    image = _generate(pipe, kwargs)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None; "
            "sys.modules['tokenizers'] = None; import tpfuse.tp_layers.flux2.tiny_pipeline as m; print(m.KINDS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
