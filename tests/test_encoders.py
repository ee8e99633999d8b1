"""Tensor-parallel text encoders (transformers' own plans run by tpfuse's layers) and the vocabulary-split layers,
against the dense models, on 1, 2 and 4 gloo ranks."""

import pytest
import torch
from torch import nn

from tpfuse.tp_layers import run_ranks
from tpfuse.tp_layers.embedding import VocabParallelEmbedding, VocabParallelLMHead, vocab_range

transformers = pytest.importorskip("transformers")

VOCAB = 103  # not divisible by 2 or 4: ragged vocabulary splits


def _qwen3(seed=0, tie=True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=8, vocab_size=VOCAB, tie_word_embeddings=tie)
    return Qwen3ForCausalLM(cfg).eval()


def _mistral3(seed=0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=VOCAB,
                         tie_word_embeddings=False),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=28, patch_size=14),
        tie_word_embeddings=False)  # the top-level flag decides (transformers 5.25 defaults it to True), as in dev
    return Mistral3ForConditionalGeneration(cfg).eval()


BUILDERS = {"qwen3": _qwen3, "mistral3": _mistral3}


def _inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on one prompt
    return ids, mask


def test_vocab_range_is_tensor_splits_rule():
    for vocab in (8, 103, 151936):
        for n in (1, 2, 3, 4, 8):
            ranges = [vocab_range(vocab, r, n) for r in range(n)]
            expect = [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(vocab).tensor_split(n)]
            assert ranges == expect
    with pytest.raises(ValueError, match="rank 2 is outside"):
        vocab_range(10, 2, 2)
    with pytest.raises(ValueError, match="vocabulary of 3 rows cannot be split over 4"):
        vocab_range(3, 0, 4)


def _vocab_layers(world):
    rank = torch.distributed.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    emb, head = nn.Embedding(VOCAB, 12, padding_idx=5).double(), nn.Linear(12, VOCAB, bias=False).double()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    pemb, phead = VocabParallelEmbedding.from_dense(emb), VocabParallelLMHead.from_dense(head)
    x = pemb(ids)
    y = phead(x)
    y.square().sum().backward()
    dense_y = head(emb(ids))
    dense_y.square().sum().backward()
    a, b = vocab_range(VOCAB, rank, world)
    return {"x": x.detach(), "y": y.detach(), "dense_x": emb(ids).detach(), "dense_y": dense_y.detach(),
            "emb_grad": pemb.weight.grad, "dense_emb_grad": emb.weight.grad[a:b],
            "head_grad": phead.weight.grad, "dense_head_grad": head.weight.grad[a:b],
            "rows": tuple(pemb.weight.shape), "padding_idx": pemb.padding_idx}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_vocab_parallel_layers_equal_dense_forward_and_backward(world):
    results = run_ranks(_vocab_layers, world, world)
    for rank, r in enumerate(results):
        # fp64: the lookup is exact (a row plus zeros); each logit is the same 12-term dot product, which a GEMM of
        # another width may block differently: a few ulp (12 * 2^-53 relative)
        torch.testing.assert_close(r["x"], r["dense_x"], rtol=0, atol=0)
        torch.testing.assert_close(r["y"], r["dense_y"], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(r["head_grad"], r["dense_head_grad"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["emb_grad"], r["dense_emb_grad"], rtol=1e-12, atol=1e-12)
        a, b = vocab_range(VOCAB, rank, world)
        assert r["rows"] == (b - a, 12)
        assert r["padding_idx"] == (5 - a if a <= 5 < b else None)


def _encoder_ranks(kind, world):
    from tpfuse.tp_layers.encoders import linear_weight_bytes, shard_text_encoder

    dense = BUILDERS[kind]()
    model = BUILDERS[kind]()
    dense_bytes = linear_weight_bytes(model)
    shard_text_encoder(model)
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        ref = dense(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    # What this rank should hold, from the dense model: 1/N of every column/row matrix, its vocabulary rows of the
    # tables (a tied table once), every other linear whole.
    rank = torch.distributed.get_rank() if world > 1 else 0
    a, b = vocab_range(VOCAB, rank, world)
    styles, expect, seen = model.tp_encoder.modules, 0, set()
    for name, m in dense.named_modules():
        if not isinstance(m, (nn.Linear, nn.Embedding)) or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        style = styles.get(name)
        full = m.weight.numel() * m.weight.element_size()
        expect += (full // world if style in ("colwise", "rowwise") else
                   full // VOCAB * (b - a) if style in ("embedding_rowwise", "colwise_gather_output") else full)
    # backward: every weight's gradient is this rank's slice of the dense one (q_norm/k_norm: summed over ranks)
    for m in (model, dense):
        o = m(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        (o.hidden_states[-2].square().sum() + o.logits.square().mean()).backward()
    grads = {}
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        mod = model.get_submodule(name.rpartition(".")[0])
        g = dense_params[name].grad
        if isinstance(mod, (VocabParallelEmbedding, VocabParallelLMHead)):
            g = g[a:b]
        elif getattr(mod, "split_dim", None) is not None and mod.split_dim(name.rpartition(".")[2]) is not None:
            g = g.tensor_split(world, dim=mod.split_dim(name.rpartition(".")[2]))[rank]
        grads[name] = (p.grad, g)
    return {"grads": grads, "hidden": [h for h in out.hidden_states], "ref_hidden": list(ref.hidden_states),
            "logits": out.logits, "ref_logits": ref.logits, "fraction": linear_weight_bytes(model) / dense_bytes,
            "bytes": linear_weight_bytes(model), "expect": expect,
            "tied": tied, "styles": sorted(set(model.tp_encoder.modules.values()))}


@pytest.mark.parametrize("kind", ["qwen3", "mistral3"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_encoder_equals_dense(kind, world):
    results = run_ranks(_encoder_ranks, world, kind, world)
    for r in results:
        # fp32: a row-parallel layer sums N partial dot products (a reordered sum) -> a few ulp per layer
        for h, ref in zip(r["hidden"], r["ref_hidden"]):
            torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["logits"], r["ref_logits"], rtol=1e-5, atol=1e-6)
        assert r["bytes"] == r["expect"]
        # fp32 gradients through 3 layers of reordered sums: relative 1e-4 of the largest (a vanished one is 0)
        for name, (g, ref) in r["grads"].items():
            if ref is None:  # the vision tower: not in a text-only graph
                assert g is None, name
                continue
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)
        if world == 2:
            assert r["fraction"] <= 0.6, r["fraction"]
        assert r["tied"] == (kind == "qwen3")  # Qwen3-4B ties its table; Mistral-Small does not
    for r in results[1:]:  # identical on every rank
        for h, h0 in zip(r["hidden"], results[0]["hidden"]):
            assert torch.equal(h, h0)
        assert torch.equal(r["logits"], results[0]["logits"])


LEGACY = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
          ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]


def _load_ranks(folder):
    from tpfuse.tp_layers.pipeline import load_text_encoder

    dense = _mistral3()
    model = load_text_encoder(folder, dtype=torch.float32, progress=False)
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        ref = dense(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    return {"hidden": out.hidden_states[-1], "ref": ref.hidden_states[-1], "format": model.tp_load_report.key_format,
            "meta": [n for n, p in model.named_parameters() if p.device.type == "meta"]}


@pytest.mark.parametrize("module_names", [False, True])
def test_load_text_encoder_reads_its_slices_in_either_key_layout(tmp_path, module_names):
    """transformers (5.x too) writes Mistral3 in llava's original layout, language_model.model.* (it renames the keys
    to the module names, model.language_model.*, on load, and back on save); tpfuse reads either."""
    from safetensors.torch import load_file, save_file

    _mistral3().save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert any(k.startswith("language_model.model.") for f in files for k in load_file(f))
    if module_names:
        for f in files:
            renamed = {next((o + key[len(n):] for o, n in LEGACY if key.startswith(n)), key): t
                       for key, t in load_file(f).items()}
            assert any(k.startswith("model.language_model.") for k in renamed)
            save_file(renamed, f, metadata={"format": "pt"})
    for r in run_ranks(_load_ranks, 2, str(tmp_path)):
        torch.testing.assert_close(r["hidden"], r["ref"], rtol=1e-5, atol=1e-6)
        assert r["format"] == ("diffusers" if module_names else "transformers-legacy-llava")
        assert r["meta"] == []


def test_refusals_name_the_problem():
    from tpfuse.tp_layers.encoders import UnsupportedEncoderError, shard_text_encoder

    class ScaledEmbedding(nn.Embedding):  # as Gemma3's: its forward adds a scale the sharded lookup would drop
        def forward(self, ids):
            return super().forward(ids) * 2.0

    model = _qwen3()
    model.model.embed_tokens = ScaledEmbedding(VOCAB, 32)
    with pytest.raises(UnsupportedEncoderError, match=r"model.embed_tokens: ScaledEmbedding has its own forward "
                                                      r"\(not Embedding's\)"):
        shard_text_encoder(model)
    assert not hasattr(model, "tp_encoder") and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    with pytest.raises(UnsupportedEncoderError, match=r"style\(s\) \['sequence_parallel'\] that tpfuse does not run"):
        shard_text_encoder(_qwen3(), plan={"model.norm": "sequence_parallel"})
    model = shard_text_encoder(_qwen3())
    with pytest.raises(ValueError, match="is already sharded"):
        shard_text_encoder(model)
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 103\), got \[0, 103\]"):
        model(input_ids=torch.tensor([[0, 103]]))


def _loaded_grads(folder):
    from tpfuse.tp_layers.pipeline import load_text_encoder

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dense, model = _qwen3(), load_text_encoder(folder, dtype=torch.float32, progress=False)
    ids, mask = _inputs()
    for m in (model, dense):
        m(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    out = {}
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        out[name] = (model.get_parameter(name).grad, dense.get_parameter(name).grad)
    name = "model.layers.1.mlp.up_proj.weight"
    out[name] = (model.get_parameter(name).grad, dense.get_parameter(name).grad.tensor_split(world)[rank])
    return out


def test_a_loaded_encoder_sums_its_per_head_norm_gradients(tmp_path):
    """The per-head norms' gradient all-reduce survives the loader replacing the meta Parameters."""
    _qwen3().save_pretrained(tmp_path)
    for r in run_ranks(_loaded_grads, 2, str(tmp_path)):
        for name, (g, ref) in r.items():
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(), msg=name)


def _qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=8, vocab_size=VOCAB,
                         rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0]))
    return Qwen3VLForConditionalGeneration(cfg).eval()


def _qwen3_vl_ranks():
    import logging

    from tpfuse.tp_layers.encoders import encoder_tp_plan, shard_text_encoder

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tpfuse.tp_layers").addHandler(handler)
    shard_text_encoder(_qwen3_vl())  # transformers 5.25's plan: the table and the head only
    warned = any("splits no decoder layer" in r.getMessage() for r in records)
    dense, model = _qwen3_vl(), _qwen3_vl()
    layers = "model.language_model.layers.*."
    plan = {**encoder_tp_plan(model), **{layers + n: "colwise" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                       "self_attn.v_proj", "mlp.gate_proj",
                                                                       "mlp.up_proj")},
            **{layers + n: "rowwise" for n in ("self_attn.o_proj", "mlp.down_proj")},
            **{layers + n: "replicated_with_grad_allreduce" for n in ("self_attn.q_norm", "self_attn.k_norm")}}
    shard_text_encoder(model, plan=plan)
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ref = dense(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return warned, out, ref, type(model.model.language_model.layers[0].mlp.up_proj).__name__


def test_qwen3_vl_encoder_with_a_plan_override():
    """FLUX.3's encoder family: transformers (5.25) ships Qwen3-VL a plan for the vocabulary only; tpfuse says so,
    and runs a fuller plan passed in."""
    if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen3-VL")
    for warned, out, ref, cls in run_ranks(_qwen3_vl_ranks, 2):
        assert warned and cls == "ColumnParallelLinear"
        for h, r in zip(out, ref):
            torch.testing.assert_close(h, r, rtol=1e-5, atol=1e-6)
