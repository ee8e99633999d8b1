"""A parallelized model behaves as the dense one where users rely on it: tied weights are refused by name, a batch of
timesteps broadcasts over one latent as in diffusers, a fused LoRA takes the fused kernels, and tpfuse's default
attention processors are diffusers' processor classes. Dense vs parallelized on 1 and 2 gloo ranks; fp32 outputs
agree to ``tolerance(float32)`` (1e-5 relative).
"""

import copy
import dataclasses
import pickle

import pytest
import torch

from tpfuse.tp_layers import Flux2Config, TPDoubleStreamBlock, TPSingleStreamBlock, parallelize, run_ranks
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.verify import block_inputs, position_ids, random_dense_block, random_diffusers_model

pytest.importorskip("diffusers")
TINY = Flux2Config.preset("tiny")
GUIDED = dataclasses.replace(TINY, guidance_embeds=True, name="tiny-guidance")
TXT, IMG = 7, 29
F32 = tolerance(torch.float32)
WORLD_SIZES = [1, 2]


def _inputs(batch_img=1, batch_txt=1, timesteps=(0.7,), guidance=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = position_ids(TXT, IMG)
    x = dict(hidden_states=torch.randn(batch_img, IMG, TINY.in_channels, generator=g),
             encoder_hidden_states=torch.randn(batch_txt, TXT, TINY.joint_attention_dim, generator=g),
             timestep=torch.tensor(timesteps), img_ids=ids[TXT:], txt_ids=ids[:TXT])
    if guidance is not None:
        x["guidance"] = torch.tensor(guidance)
    return x


def _fwd(model, **kw):
    with torch.no_grad():
        return model(**_inputs(**kw)).sample


def _outcome(fn):
    """``("ok", result)`` or ``("error", exception)``: what dense and parallelized must agree on."""
    try:
        return "ok", fn()
    except (ValueError, RuntimeError) as exc:
        return "error", exc


# ---------------------------------------------------------------------------------------------------------------
# tied weights: refused by name at parallelize and at the blocks' from_dense
# ---------------------------------------------------------------------------------------------------------------


def _tie(model, a, b):
    """Make ``a``'s weight the Parameter of ``b`` (same shape), as weight tying does."""
    owner, name = a.rsplit(".", 1)
    setattr(model.get_submodule(owner), name, model.get_parameter(b))


# (tied name, the name it is tied to): inside a block (two column layers, then a column and a row layer), across
# blocks (replicated QK-norm scales), a block weight with a replicated module's.
TIES = [("transformer_blocks.0.attn.to_k.weight", "transformer_blocks.0.attn.to_q.weight"),
        ("transformer_blocks.0.attn.to_out.0.weight", "transformer_blocks.0.attn.to_q.weight"),
        ("single_transformer_blocks.0.attn.norm_q.weight", "transformer_blocks.0.attn.norm_q.weight"),
        ("transformer_blocks.0.attn.to_add_out.weight", "time_guidance_embed.timestep_embedder.linear_2.weight")]


def _ties_case():
    res = {}
    for a, b in TIES:
        model = random_diffusers_model(TINY, 0)
        _tie(model, a, b)
        with torch.no_grad():
            model(**_inputs())  # the dense model runs with the tie
        block = model.get_submodule(".".join(a.split(".")[:2]))
        cls = TPDoubleStreamBlock if a.startswith("transformer_blocks") else TPSingleStreamBlock
        res[("from_dense", a)] = _outcome(lambda: type(cls.from_dense(block)).__name__)
        res[("parallelize", a)] = _outcome(lambda: type(parallelize(model)).__name__)
    # a tie among replicated modules only is kept as it is (those modules are not sharded)
    model = random_diffusers_model(TINY, 0)
    _tie(model, "double_stream_modulation_txt.linear.weight", "double_stream_modulation_img.linear.weight")
    ref = _fwd(model)
    tp = parallelize(copy.deepcopy(model))
    res["replicated"] = (rel_error(_fwd(tp), ref), tp.double_stream_modulation_txt.linear.weight
                         is tp.double_stream_modulation_img.linear.weight)
    return res


def _check_ties(res):
    for a, b in TIES:
        kind, err = res[("parallelize", a)]
        assert kind == "error" and isinstance(err, ValueError), (a, kind, err)
        assert "parallelize: tied weights" in str(err) and " is ".join(sorted((a, b))) in str(err), str(err)
        kind, err = res[("from_dense", a)]
        if a.split(".")[:2] == b.split(".")[:2]:  # a tie inside the block
            local = [n.split(".", 2)[2] for n in sorted((a, b))]
            assert kind == "error" and isinstance(err, ValueError), (a, kind, err)
            assert "from_dense: tied weights" in str(err) and " is ".join(local) in str(err), str(err)
        else:  # a tie that leaves the block: from_dense sees no tie (parallelize, which sees the model, refuses it)
            assert kind == "ok", (a, err)
    rel, kept = res["replicated"]
    assert rel <= F32 and kept


def test_tied_weights_refused_naming_the_tie():
    _check_ties(_ties_case())  # world size 1, in this process


def test_tied_weights_refused_on_every_rank():
    # the checks run before any collective: every rank raises, none waits for the others
    for res in run_ranks(_ties_case, 2):
        _check_ties(res)


# ---------------------------------------------------------------------------------------------------------------
# batches: a batch of timesteps (or guidance) over one latent broadcasts as in diffusers; the rest is refused
# ---------------------------------------------------------------------------------------------------------------

# (hidden_states batch, encoder_hidden_states batch, timestep batch[, guidance batch]): diffusers' model accepts
# these when a batch of 1 broadcasts against the timestep's (both streams ending with one batch), refuses the rest.
MODEL_BATCHES = [(1, 1, 2), (2, 2, 1), (1, 1, 3), (2, 1, 2), (1, 2, 2), (2, 2, 3), (2, 1, 1), (1, 2, 1), (3, 1, 2)]
GUIDED_BATCHES = [(1, 1, 1, 2), (1, 1, 2, 2), (2, 2, 1, 2), (2, 1, 1, 2), (1, 1, 2, 3), (2, 2, 1, 3)]


def _model_batches_case():
    res = {}
    for cfg, cases in ((TINY, MODEL_BATCHES), (GUIDED, GUIDED_BATCHES)):
        dense = random_diffusers_model(cfg, 0)
        tp = parallelize(copy.deepcopy(dense))
        for case in cases:
            kw = dict(batch_img=case[0], batch_txt=case[1], timesteps=[0.3 + 0.2 * i for i in range(case[2])],
                      guidance=None if len(case) == 3 else [2.0 + i for i in range(case[3])])
            res[(cfg.name, case)] = (_outcome(lambda: _fwd(dense, **kw)), _outcome(lambda: _fwd(tp, **kw)))
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_timestep_and_guidance_batches_broadcast_as_in_diffusers(world_size):
    results = run_ranks(_model_batches_case, world_size)
    for key, ((d_kind, dense), (t_kind, tp)) in results[0].items():
        assert d_kind == t_kind, (key, dense, tp)
        if d_kind == "ok":
            assert tp.shape == dense.shape and rel_error(tp, dense) <= F32, key
        else:  # refused by name, not as a block's internal modulation tensor
            assert isinstance(tp, ValueError) and "timestep batch" in str(tp), (key, str(tp))
            assert isinstance(tp, type(dense)), (type(tp), type(dense))  # caught where the dense error is caught
            assert str(tp).startswith(f"hidden_states batch {key[1][0]} and encoder_hidden_states batch "
                                      f"{key[1][1]}, with timestep batch {key[1][2]}"), str(tp)
            assert "temb_mod" not in str(tp), str(tp)
    assert results[0][("tiny", (1, 1, 2))][0][1].shape[0] == 2  # the case of the issue: two timesteps, one latent
    for other in results[1:]:
        for key, (_, (kind, tp)) in other.items():
            assert kind == results[0][key][1][0]
            if kind == "ok":
                assert torch.equal(tp, results[0][key][1][1]), key


def _diffusers_block(kind):
    from diffusers.models.transformers import transformer_flux2 as f2

    cls = f2.Flux2TransformerBlock if kind == "double" else f2.Flux2SingleTransformerBlock
    block = cls(TINY.hidden_size, TINY.heads, TINY.head_dim, TINY.mlp_ratio, TINY.eps)
    block.load_state_dict(random_dense_block(TINY, kind, seed=0).state_dict())
    return block


# Block inputs by batch: (hidden_states, encoder_hidden_states or None, modulation(s)); "tok" is a per-token
# modulation (as in the KV-cache extract mode).
BLOCK_BATCHES = {
    "double": [(1, 1, 2, 2), (2, 1, 2, 2), (1, 2, 2, 2), (1, 1, "tok2", 2), (1, 1, 1, 1), (1, 1, 2, 1),
               (1, 1, 1, 2), (2, 2, 3, 3), (2, 1, 1, 1), (2, 2, 1, 3)],
    "single": [(1, 1, 2), (1, None, 2), (1, None, "tok2"), (2, 1, 2), (2, 2, 3), (1, 2, 2)],
}


def _block_case_inputs(kind, case):
    full, rope = block_inputs(TINY, kind, 3, TXT, IMG, seed=1)
    full = {k: v.detach() for k, v in full.items()}

    def batch(t, n, per_token_len):
        if isinstance(n, str):  # "tokN": a per-token modulation [N, S, width]
            return t[:int(n[3:])].unsqueeze(1).repeat(1, per_token_len, 1) * (1 + 0.01 * torch.arange(per_token_len)
                                                                               ).unsqueeze(-1)
        return t[:n]

    if kind == "double":
        h, e, mi, mt = case
        x = {"hidden_states": full["hidden_states"][:h], "encoder_hidden_states": full["encoder_hidden_states"][:e],
             "temb_mod_img": batch(full["temb_mod_img"], mi, IMG), "temb_mod_txt": batch(full["temb_mod_txt"], mt, TXT)}
    else:
        h, e, m = case
        hidden = full["hidden_states"][:h]
        if e is None:  # the model's call: text and image already joined
            hidden = torch.cat([full["encoder_hidden_states"][:h], hidden], dim=1)
        x = {"hidden_states": hidden, "encoder_hidden_states": None if e is None else full["encoder_hidden_states"][:e],
             "temb_mod": batch(full["temb_mod"], m, TXT + IMG)}
    return {k: None if v is None else v.clone().requires_grad_() for k, v in x.items()}, rope


def _block_run(block, inputs, rope):
    """Outputs and input gradients (seeded output gradients)."""
    for t in inputs.values():
        if t is not None:
            t.grad = None
    out = block(**inputs, image_rotary_emb=rope)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(5)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
    return [o.detach() for o in outs] + [t.grad for t in inputs.values() if t is not None]


def _block_batches_case():
    res = {}
    for kind, cases in BLOCK_BATCHES.items():
        theirs, ours = _diffusers_block(kind), random_dense_block(TINY, kind, seed=0)
        tp = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(ours)
        for case in cases:
            inputs, rope = _block_case_inputs(kind, case)
            res[(kind, case)] = [_outcome(lambda: _block_run(b, inputs, rope)) for b in (theirs, ours, tp)]
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_blocks_broadcast_batches_as_diffusers_blocks(world_size):
    """diffusers' blocks, tpfuse's dense blocks and the TP blocks accept and refuse the same batch combinations;
    accepted ones give the same outputs and input gradients."""
    results = run_ranks(_block_batches_case, world_size)
    for key, ((d_kind, ref), (o_kind, ours), (t_kind, tp)) in results[0].items():
        assert d_kind == o_kind == t_kind, (key, ref, ours, tp)
        if d_kind == "ok":
            for got in (ours, tp):
                assert len(got) == len(ref) and all(rel_error(a, b) <= F32 for a, b in zip(got, ref)), key
        else:
            assert isinstance(ours, ValueError) and isinstance(tp, ValueError) and str(ours) == str(tp), key
            assert "has batch" in str(tp), str(tp)
    accepted = [k for k, v in results[0].items() if v[0][0] == "ok"]
    assert ("double", (1, 1, 2, 2)) in accepted and ("single", (1, None, 2)) in accepted


# ---------------------------------------------------------------------------------------------------------------
# a fused LoRA takes the fused kernels
# ---------------------------------------------------------------------------------------------------------------

# every kind of gate on a plain linear: Q/K/V (one column-parallel call), the single-stream in-projection (the fused
# QKV+MLP kernel), out-projections folded with gate and residual into the row-parallel reduce, a replicated layer
LORA_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
                "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
                "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
                "proj_out"]


def _lora(model, seed=1, rank=4):
    """A dense-model LoRA (peft keys, non-zero B: it changes the output)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in LORA_TARGETS:
        lin = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(rank, lin.in_features, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(lin.out_features, rank, generator=g)
    return sd


def _traced(model):
    """The output, and the path it took: the kernels run (``record_backends``), each row-parallel reduce with or
    without the block's gate folded in, each column-parallel call of the double-stream Q/K/V."""
    from tpfuse.kernels import record_backends
    from tpfuse.tp_layers import RowParallelLinear
    from tpfuse.tp_layers.flux2 import tp_blocks as tp_flux2

    calls = []
    forward_fused, column = RowParallelLinear.forward_fused, tp_flux2.column_parallel_linear

    def counting_forward_fused(self, parts, gate=None, residual=None):
        calls.append(("row_parallel_linear", gate is not None))
        return forward_fused(self, parts, gate, residual)

    def counting_column(x, layers, group=None):
        calls.append(("column_parallel_linear", len(layers)))
        return column(x, layers, group)

    RowParallelLinear.forward_fused, tp_flux2.column_parallel_linear = counting_forward_fused, counting_column
    try:
        with record_backends() as ops:
            out = _fwd(model)
    finally:
        RowParallelLinear.forward_fused, tp_flux2.column_parallel_linear = forward_fused, column
    return out, (ops, calls)


def _fused_lora_case():
    from diffusers import Flux2KleinPipeline

    dense = random_diffusers_model(TINY, 0)
    tp = parallelize(copy.deepcopy(dense))
    base, fused_path = _traced(tp)
    pipes = [Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=m)
             for m in (dense, tp)]
    for p in pipes:
        p.load_lora_weights(copy.deepcopy(_lora(dense)), adapter_name="a")
    res = {"fused_path": fused_path, "out": base}
    lora_out, res["lora_path"] = _traced(tp)
    res["lora"] = (rel_error(lora_out, _fwd(dense)), rel_error(lora_out, base))

    for p in pipes:
        p.fuse_lora()
    out, res["fused_lora_path"] = _traced(tp)
    res["fused_lora"] = (rel_error(out, _fwd(dense)), rel_error(out, lora_out))
    res["merged"] = tp.transformer_blocks[0].attn.to_q.merged

    for m in (dense, tp):  # back to the adapter's own path
        m.unfuse_lora()
    out, res["unfused_path"] = _traced(tp)
    res["unfused"] = (rel_error(out, _fwd(dense)), rel_error(out, lora_out))

    for m in (dense, tp):  # adapters disabled, none merged: the wrappers compute their base layers
        m.disable_lora()
    out, res["disabled_path"] = _traced(tp)
    res["disabled"] = (rel_error(out, _fwd(dense)), rel_error(out, base))
    for m in (dense, tp):
        m.enable_lora()

    for p in pipes:  # the documented fast path: fuse, then drop the wrappers
        p.fuse_lora()
        p.unload_lora_weights()
    out, res["unloaded_path"] = _traced(tp)
    res["unloaded"] = (rel_error(out, _fwd(dense)), rel_error(out, lora_out), type(tp.transformer_blocks[0].attn.to_q)
                       .__name__)
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_fused_lora_takes_the_fused_kernels(world_size):
    pytest.importorskip("peft")
    results = run_ranks(_fused_lora_case, world_size)
    r = results[0]
    ops, calls = r["fused_path"]
    # the model without adapters takes every fused kernel
    assert {op for op, _ in ops} >= {"layernorm_modulate", "fused_qkv_mlp_proj", "joint_qkv_proj",
                                   "fused_linear_act", "row_parallel_matmul"}
    # the single block's gated reduce; the double block's Q/K/V are joint_qkv_proj, not column-parallel GEMMs
    assert ("row_parallel_linear", True) in calls and ("column_parallel_linear", 3) not in calls
    assert r["lora_path"] != r["fused_path"]  # an active adapter: its layers are called (the test can tell)
    assert r["lora"][0] <= F32 and r["lora"][1] > 1e-2
    assert r["merged"]
    assert r["fused_lora_path"] == r["fused_path"], r["fused_lora_path"]
    assert r["fused_lora"][0] <= F32 and r["fused_lora"][1] <= F32
    assert r["unfused_path"] == r["lora_path"]
    assert r["unfused"][0] <= F32 and r["unfused"][1] <= F32
    assert r["disabled_path"] == r["fused_path"]
    assert r["disabled"][0] <= F32 and r["disabled"][1] <= F32
    assert r["unloaded_path"] == r["fused_path"]
    assert r["unloaded"][0] <= F32 and r["unloaded"][1] <= F32 and r["unloaded"][2] == "ColumnParallelLinear"
    for other in results[1:]:
        assert torch.equal(other["out"], r["out"])


# ---------------------------------------------------------------------------------------------------------------
# tpfuse's default attention processors are diffusers' processor classes
# ---------------------------------------------------------------------------------------------------------------


def _processors_case(pickled):
    from diffusers.models.transformers import transformer_flux2 as f2
    from tpfuse.kernels import record_backends
    from tpfuse.tp_layers.flux2 import JointAttention, JointAttnProcessor, SingleAttnProcessor, SingleStreamAttention

    dense = random_diffusers_model(TINY, 0)
    tp = parallelize(copy.deepcopy(dense))
    ref = _fwd(dense)
    want = {"transformer_blocks": (f2.Flux2AttnProcessor, JointAttnProcessor),
            "single_transformer_blocks": (f2.Flux2ParallelSelfAttnProcessor, SingleAttnProcessor)}
    res = {"defaults": {name: (isinstance(p, want[name.split(".")[0]][0]), type(p).__mro__[1] is
                               want[name.split(".")[0]][1], type(p).__name__)
                        for name, p in tp.attn_processors.items()}}
    # tpfuse's dense modules too, and a processor pickled in the parent process (its class found by name here)
    res["dense_modules"] = (isinstance(JointAttention(64, 4, 16, 1e-6).processor, f2.Flux2AttnProcessor),
                            isinstance(SingleStreamAttention(64, 4, 16, 3.0, 1e-6).processor,
                                       f2.Flux2ParallelSelfAttnProcessor))
    loaded = pickle.loads(pickled)
    res["unpickled"] = (isinstance(loaded, f2.Flux2AttnProcessor), isinstance(loaded, JointAttnProcessor))
    with record_backends() as ops:  # the defaults still take the fused path
        res["default"] = rel_error(_fwd(tp), ref)
    res["fused"] = sorted({op for op, _ in ops})

    calls = {"joint": 0, "single": 0}

    class CountingJoint(f2.Flux2AttnProcessor):
        def __call__(self, *args, **kwargs):
            calls["joint"] += 1
            return super().__call__(*args, **kwargs)

    class CountingSingle(f2.Flux2ParallelSelfAttnProcessor):
        def __call__(self, *args, **kwargs):
            calls["single"] += 1
            return super().__call__(*args, **kwargs)

    # what user code does to swap "every Flux2AttnProcessor" for its own
    replaced = {}
    for name, proc in tp.attn_processors.items():
        if isinstance(proc, f2.Flux2ParallelSelfAttnProcessor):
            proc = CountingSingle()
        elif isinstance(proc, f2.Flux2AttnProcessor):
            proc = CountingJoint()
        replaced[name] = proc
    tp.set_attn_processor(replaced)
    res["replaced"] = (rel_error(_fwd(tp), ref), dict(calls),
                       sorted(type(p).__name__ for p in tp.attn_processors.values()))
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_default_processors_are_diffusers_processors(world_size):
    from tpfuse.tp_layers.flux2 import JointAttnProcessor

    results = run_ranks(_processors_case, world_size, pickle.dumps(JointAttnProcessor()))
    for r in results:
        assert len(r["defaults"]) == 2 and all(ok and first for ok, first, _ in r["defaults"].values()), r["defaults"]
        assert sorted(name for _, _, name in r["defaults"].values()) == ["JointAttnProcessor", "SingleAttnProcessor"]
        assert r["dense_modules"] == (True, True) and r["unpickled"] == (True, True)
        assert r["default"] <= F32 and "fused_qkv_mlp_proj" in r["fused"]
        rel, calls, names = r["replaced"]
        assert calls == {"joint": 1, "single": 1} and names == ["CountingJoint", "CountingSingle"]
        assert rel <= F32
