"""A parallelized diffusers FLUX.2 model keeps diffusers' features: dense vs parallelized on 1 and 2 gloo ranks.

Each rank builds the same tiny dense model, parallelizes a copy, applies the feature to both and returns relative
errors and counts; the test asserts them (and that every rank got the same output). fp32 outputs agree to the
reordering bound of tensor parallelism (``tolerance(float32)`` = 1e-5); under bf16 autocast to bf16's.
"""

import copy

import pytest
import torch

from tpfuse.tp_layers import Flux2Config, parallelize, run_ranks
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.verify import position_ids, random_diffusers_model

pytest.importorskip("diffusers")
TINY = Flux2Config.preset("tiny")
TXT, IMG, REF = 7, 29, 6
F32 = tolerance(torch.float32)
WORLD_SIZES = [1, 2]


def _dense(seed=0):
    return random_diffusers_model(TINY, seed)


def _pair(seed=0):
    dense = _dense(seed)
    return dense, parallelize(copy.deepcopy(dense))


def _inputs(step=0, img=IMG, ids_img=None):
    g = torch.Generator().manual_seed(step)
    ids = position_ids(TXT, img)
    return dict(hidden_states=torch.randn(1, img, TINY.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, TXT, TINY.joint_attention_dim, generator=g),
                timestep=torch.tensor([0.9 - 0.1 * step]), img_ids=ids[TXT:] if ids_img is None else ids_img,
                txt_ids=ids[:TXT])


def _fwd(model, step=0, **kw):
    with torch.no_grad():
        return model(**_inputs(step), **kw).sample


def _rel(a, b):
    return rel_error(a.float(), b.float())


# ---------------------------------------------------------------------------------------------------------------
# attention processors and backends, isinstance, regional compile
# ---------------------------------------------------------------------------------------------------------------


def _attention_case():
    from diffusers import attention_backend
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.models.transformers import transformer_flux2 as f2

    dense, tp = _pair()
    ref = _fwd(dense)
    res = {"processors": (len(dense.attn_processors), len(tp.attn_processors)), "default": _rel(_fwd(tp), ref),
           "isinstance": [isinstance(tp.transformer_blocks[0], f2.Flux2TransformerBlock),
                          isinstance(tp.single_transformer_blocks[0], f2.Flux2SingleTransformerBlock),
                          isinstance(tp.transformer_blocks[0].attn, f2.Flux2Attention),
                          isinstance(tp.single_transformer_blocks[0].attn, f2.Flux2ParallelSelfAttention)],
           "out": _fwd(tp)}

    # diffusers' own processors, on the local heads
    procs = {name: f2.Flux2ParallelSelfAttnProcessor() if name.startswith("single") else f2.Flux2AttnProcessor()
             for name in tp.attn_processors}
    tp_d = copy.deepcopy(tp)
    tp_d.set_attn_processor(procs)
    res["diffusers_processors"] = _rel(_fwd(tp_d), ref)

    calls = []

    class Counting(f2.Flux2AttnProcessor):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    tp_d.transformer_blocks[0].attn.set_processor(Counting())
    res["custom"] = (_rel(_fwd(tp_d), ref), len(calls))

    # a subclass of tpfuse's own processor that overrides __call__ is called too (not bypassed by the fused path)
    from tpfuse.tp_layers.flux2 import JointAttnProcessor

    class Scaled(JointAttnProcessor):
        def __call__(self, *args, **kwargs):
            return tuple(2 * o for o in super().__call__(*args, **kwargs))

    tp_s = copy.deepcopy(tp)
    tp_s.transformer_blocks[0].attn.set_processor(Scaled())
    res["subclass_changes_output"] = _rel(_fwd(tp_s), ref)

    # torch.save / torch.load of the parallelized model (its classes are found by name)
    import io

    buf = io.BytesIO()
    torch.save(tp, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    res["pickle"] = (_rel(_fwd(loaded), ref), type(loaded).__name__,
                     isinstance(loaded.transformer_blocks[0], f2.Flux2TransformerBlock))

    # the attention backend: count the calls that reach the chosen one
    name = AttentionBackendName("_native_math")
    original = _AttentionBackendRegistry._backends[name]
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return original(*args, **kwargs)

    _AttentionBackendRegistry._backends[name] = counting
    try:
        with attention_backend("_native_math"):
            out = _fwd(tp)
        res["context_backend"] = (_rel(out, ref), len(counted))
        counted.clear()
        tp.set_attention_backend("_native_math")
        res["set_backend"] = (_rel(_fwd(tp), ref), len(counted))
        tp.reset_attention_backend()
    finally:
        _AttentionBackendRegistry._backends[name] = original

    tp.compile_repeated_blocks(backend="eager")
    regions = sum(getattr(m, "_compiled_call_impl", None) is not None for m in tp.modules())
    # The compiled forward (dynamo tracing: ~15 s on 2 cores) is run on 2 ranks, where collectives are traced too.
    res["compiled"] = (_rel(_fwd(tp), ref) if tp.tp_world_size > 1 else 0.0, regions)
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_attention_processors_backends_types_compile(world_size):
    results = run_ranks(_attention_case, world_size)
    r = results[0]
    assert r["processors"] == (2, 2)
    assert all(r["isinstance"])
    assert r["default"] <= F32
    assert r["diffusers_processors"] <= F32
    assert r["custom"][0] <= F32 and r["custom"][1] == 1
    assert r["subclass_changes_output"] > 1e-2
    assert r["pickle"][0] <= F32 and r["pickle"][1:] == ("Flux2Transformer2DModel", True)
    assert r["context_backend"][0] <= F32 and r["context_backend"][1] == 2  # one call per block
    assert r["set_backend"][0] <= F32 and r["set_backend"][1] == 2
    assert r["compiled"][0] <= F32 and r["compiled"][1] == 2
    for other in results[1:]:
        assert torch.equal(other["out"], r["out"])


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------

LORA_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
                "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
                "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
                "proj_out"]  # a replicated layer too


def _lora_state_dict(model, seed, rank=4):
    """A dense-model LoRA (peft keys) with non-zero B, so every adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in LORA_TARGETS:
        lin = model.get_submodule(name)
        sd[f"{name}.lora_A.weight"] = 0.3 * torch.randn(rank, lin.in_features, generator=g)
        sd[f"{name}.lora_B.weight"] = 0.3 * torch.randn(lin.out_features, rank, generator=g)
    return sd


def _lora_case(tmp):
    import os

    import torch.distributed as dist
    from peft.utils import get_peft_model_state_dict

    dense, tp = _pair()
    base = _fwd(dense)
    sd_a, sd_b, sd_c = (_lora_state_dict(dense, s) for s in (1, 2, 3))
    res = {}
    for m in (dense, tp):
        m.load_lora_adapter(copy.deepcopy(sd_a), prefix=None, adapter_name="a")
    ref = _fwd(dense)
    res["load"] = (_rel(_fwd(tp), ref), _rel(ref, base))
    res["out"] = _fwd(tp)
    local = tp.transformer_blocks[0].attn.to_q.lora_B["a"].weight.shape[0]
    res["sharded"] = (local, dense.transformer_blocks[0].attn.to_q.lora_B["a"].weight.shape[0])

    # save from the parallelized model (gathered; rank 0 writes), reload into a dense and a parallelized model
    path = os.path.join(tmp, "lora")
    tp.save_lora_adapter(path, adapter_name="a")
    dist.barrier()
    reloaded = [_dense(), parallelize(_dense())]
    for m in reloaded:
        m.load_lora_adapter(path, prefix=None, adapter_name="a", use_safetensors=True)
    res["save_reload"] = max(_rel(_fwd(m), ref) for m in reloaded)
    try:  # one rank's shard is not a dense adapter: refused on 2+ ranks
        parallelize(_dense()).load_lora_adapter(get_peft_model_state_dict(tp, adapter_name="a"), prefix=None)
        res["local_shard"] = None
    except ValueError as exc:
        res["local_shard"] = str(exc)

    for m in (dense, tp):
        m.load_lora_adapter(copy.deepcopy(sd_b), prefix=None, adapter_name="b")
        m.set_adapters(["a", "b"], [0.7, 1.3])
    res["set_adapters"] = _rel(_fwd(tp), _fwd(dense))

    # training: the adapters' gradients (B of a column layer: this rank's rows; A of a row layer: its columns)
    x = _inputs(0)
    losses = []
    for m in (dense, tp):
        m.zero_grad()
        out = m(**x).sample
        (out.double() ** 2).sum().backward()
        losses.append(out)
    col_d = dense.transformer_blocks[0].attn.to_q
    col_t = tp.transformer_blocks[0].attn.to_q
    row_d = dense.single_transformer_blocks[0].attn.to_out
    row_t = tp.single_transformer_blocks[0].attn.to_out
    rank, world = torch.distributed.get_rank(), tp.tp_world_size
    from tpfuse.tp_layers import shard_tensor

    res["grads"] = max(
        _rel(col_t.lora_A["a"].weight.grad, col_d.lora_A["a"].weight.grad),
        _rel(col_t.lora_B["a"].weight.grad, shard_tensor(col_d.lora_B["a"].weight.grad, 0, rank, world)),
        _rel(row_t.lora_B["b"].weight.grad, row_d.lora_B["b"].weight.grad),
        _rel(row_t.lora_A["b"].weight.grad,
             shard_tensor(row_d.lora_A["b"].weight.grad, 1, rank, world, row_t.get_base_layer().blocks)),
    )

    for m in (dense, tp):
        m.fuse_lora(lora_scale=0.5)
    res["fuse"] = _rel(_fwd(tp), _fwd(dense))
    for m in (dense, tp):
        m.unfuse_lora()
    res["unfuse"] = _rel(_fwd(tp), _fwd(dense))

    for m in (dense, tp):
        m.load_lora_adapter(copy.deepcopy(sd_c), prefix=None, adapter_name="a", hotswap=True)
    res["hotswap"] = _rel(_fwd(tp), _fwd(dense))

    for m in (dense, tp):
        m.delete_adapters(["b"])
    res["delete"] = _rel(_fwd(tp), _fwd(dense))

    # parallelize a model that already carries adapters
    tp2 = parallelize(copy.deepcopy(dense))
    res["parallelize_with_adapters"] = _rel(_fwd(tp2), _fwd(dense))

    for m in (dense, tp):
        m.unload_lora()
    res["unload"] = (_rel(_fwd(tp), base), type(tp.transformer_blocks[0].attn.to_q).__name__)

    # the pipeline entry point (load_lora_weights -> load_lora_into_transformer -> load_lora_adapter)
    from diffusers import Flux2KleinPipeline

    pipes = [Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=m)
             for m in (dense, tp)]
    sd = {f"transformer.{k}": v for k, v in sd_a.items()}
    for p in pipes:
        p.load_lora_weights(copy.deepcopy(sd), adapter_name="p")
    res["pipeline"] = _rel(_fwd(tp), _fwd(dense))
    for p in pipes:
        p.unload_lora_weights()
    res["pipeline_unload"] = _rel(_fwd(tp), base)

    # adapters injected with peft directly need adapt_lora(); DoRA is refused on 2+ ranks
    from peft import LoraConfig, inject_adapter_in_model

    from tpfuse.tp_layers import adapt_lora

    # a fresh adapter for training: replicated matrices equal on every rank, dropout masks synchronised (the
    # replicated lora_A of a column layer gets equal gradients); LoKr is refused on 2+ ranks
    from peft import LoKrConfig

    train = parallelize(_dense())
    torch.manual_seed(100 + dist.get_rank())  # per-rank RNG streams, as without a common seed
    targets = ["to_q", "single_transformer_blocks.0.attn.to_out"]
    train.add_adapter(LoraConfig(r=2, target_modules=targets, lora_dropout=0.5, init_lora_weights=False),
                      adapter_name="t")
    train.train()
    out = train(**_inputs(0)).sample
    (out.double() ** 2).sum().backward()
    q = train.transformer_blocks[0].attn.to_q
    res["train"] = (q.lora_A["t"].weight.detach().clone(), q.lora_A["t"].weight.grad.clone(), out.detach())
    res["train_grad_norm"] = q.lora_A["t"].weight.grad.norm().item()  # non-zero: B is not initialised to zero
    try:
        parallelize(_dense()).add_adapter(LoKrConfig(r=2, target_modules=["to_add_out"]))
        res["lokr"] = None
    except NotImplementedError as exc:
        res["lokr"] = str(exc)

    raw = copy.deepcopy(tp)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), raw)
    try:
        _fwd(raw)
        res["raw_peft"] = None
    except RuntimeError as exc:
        res["raw_peft"] = str(exc)
    adapt_lora(raw)
    _fwd(raw)
    from tpfuse.tp_layers import ColumnParallelLinear

    # A LoRA on a ColumnParallelLinear with gather_output (Qwen-Image's adaLN) is the dense adapter, replicated.
    torch.manual_seed(3)
    dense_lin = torch.nn.Sequential(torch.nn.Linear(8, 6))
    gathered = torch.nn.Sequential(ColumnParallelLinear.from_dense(dense_lin[0], gather_output=True))
    for m in (dense_lin, gathered):
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), m)
    with torch.no_grad():
        src = dict(dense_lin.named_parameters())
        for n, p in src.items():
            if "lora_B" in n:
                p.normal_()  # peft initialises lora_B to zero: make the update visible
        for n, p in gathered.named_parameters():
            if "lora_" in n:
                p.copy_(src[n])  # the same (dense-shaped) adapter
    adapt_lora(gathered)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    res["gather_output"] = rel_error(gathered(x), dense_lin(x))
    try:
        copy.deepcopy(tp).add_adapter(LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
        res["dora"] = None
    except NotImplementedError as exc:
        res["dora"] = str(exc)
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lora(world_size, tmp_path):
    pytest.importorskip("peft")
    results = run_ranks(_lora_case, world_size, str(tmp_path))
    r = results[0]
    assert r["load"][1] > 1e-2  # the adapter changes the output
    assert r["load"][0] <= F32
    assert r["sharded"] == (r["sharded"][1] // world_size, r["sharded"][1])
    for key in ("save_reload", "set_adapters", "grads", "fuse", "unfuse", "hotswap", "delete",
                "parallelize_with_adapters", "pipeline", "pipeline_unload"):
        assert r[key] <= F32, (key, r[key])
    assert r["unload"][0] <= F32 and r["unload"][1] == "ColumnParallelLinear"
    if world_size == 1:  # nothing spans ranks: no collectives needed, every peft variant allowed
        assert r["raw_peft"] is None and r["dora"] is None and r["lokr"] is None and r["local_shard"] is None
    else:
        assert "without its collectives" in r["raw_peft"]
        assert "DoRA adapters on tensor-parallel layers are not supported" in r["dora"]
        assert "LoKrConfig adapters on tensor-parallel layers are not supported" in r["lokr"]
        assert "looks like one rank's shard" in r["local_shard"]
    assert r["gather_output"] <= F32
    assert r["train_grad_norm"] > 0
    for other in results[1:]:  # replicated adapter weights, their gradients (synchronised dropout), the output
        for a, b in zip(other["train"], r["train"]):
            assert torch.equal(a, b)
    for other in results[1:]:
        assert torch.equal(other["out"], r["out"])


# ---------------------------------------------------------------------------------------------------------------
# autocast, layerwise casting, group offloading
# ---------------------------------------------------------------------------------------------------------------


def _block_fp8_fraction(model):
    sizes = [(p.numel(), p.dtype == torch.float8_e4m3fn) for n, p in model.named_parameters()
             if "transformer_blocks." in n]
    return sum(n for n, fp8 in sizes if fp8) / sum(n for n, _ in sizes)


def _memory_case(tmp):
    import os

    dense, tp = _pair()
    ref = _fwd(dense)
    res = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d, t = _fwd(dense), _fwd(tp)
    res["autocast"] = (_rel(t, d), _rel(d, ref), str(t.dtype), str(d.dtype))
    res["out"] = t
    # backward under autocast: fp32 weight gradients through the bf16 GEMMs (this rank's shards vs dense)
    from tpfuse.tp_layers import shard_tensor

    for m in (dense, tp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**_inputs(0)).sample
        (out.float() ** 2).sum().backward()
    rank, world = torch.distributed.get_rank(), tp.tp_world_size
    pairs = [(tp.transformer_blocks[0].attn.to_q.weight.grad,
              shard_tensor(dense.transformer_blocks[0].attn.to_q.weight.grad, 0, rank, world)),
             (tp.single_transformer_blocks[0].attn.to_out.weight.grad,
              shard_tensor(dense.single_transformer_blocks[0].attn.to_out.weight.grad, 1, rank, world,
                           tp.single_transformer_blocks[0].attn.to_out.blocks))]
    res["autocast_grads"] = (max(_rel(a, b) for a, b in pairs), [str(a.dtype) for a, _ in pairs])
    dense.zero_grad(), tp.zero_grad()

    cast = [copy.deepcopy(m) for m in (dense, tp)]
    for m in cast:
        m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    res["layerwise"] = (_rel(_fwd(cast[1]), _fwd(cast[0])), _block_fp8_fraction(cast[0]),
                        _block_fp8_fraction(cast[1]), _rel(_fwd(cast[0]), ref))

    for kind in ("block_level", "leaf_level"):
        for disk in (False, True):
            m = copy.deepcopy(tp)
            path = os.path.join(tmp, f"{kind}-{disk}-{torch.distributed.get_rank()}") if disk else None
            m.enable_group_offload(torch.device("cpu"), offload_type=kind, num_blocks_per_group=1,
                                   offload_to_disk_path=path)
            res[f"offload-{kind}-{'disk' if disk else 'cpu'}"] = _rel(_fwd(m), ref)
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_autocast_layerwise_casting_group_offloading(world_size, tmp_path):
    results = run_ranks(_memory_case, world_size, str(tmp_path))
    r = results[0]
    rel, dense_vs_fp32, dtype_tp, dtype_dense = r["autocast"]
    assert dtype_tp == dtype_dense
    assert dense_vs_fp32 > 1e-4  # autocast did change the dense model's arithmetic
    # Both run their GEMMs in bf16 from the same bf16 inputs; they differ by where bf16 rounds (partial sums before
    # the all-reduce, the fused epilogue's fp32 math): within bf16's u = 2^-8 for the output (measured 1.5e-3; a TP
    # model ignoring autocast would be 5.8e-3 away, and return fp32), 2.5u for weight gradients, which sum bf16
    # products over tokens (measured 7.2e-3 to 8.3e-3; ignoring autocast: 1.2e-2).
    assert rel <= 2**-8, rel
    grad_rel, grad_dtypes = r["autocast_grads"]
    assert grad_rel <= 2.5 * 2**-8 and grad_dtypes == ["torch.float32"] * 2, r["autocast_grads"]
    lw_rel, frac_dense, frac_tp, _ = r["layerwise"]
    assert frac_dense > 0.99 and frac_tp == pytest.approx(frac_dense, abs=1e-3)
    assert lw_rel <= F32
    for kind in ("block_level", "leaf_level"):
        for where in ("cpu", "disk"):
            assert r[f"offload-{kind}-{where}"] <= F32, (kind, where)
    for other in results[1:]:
        assert torch.equal(other["out"], r["out"])


# ---------------------------------------------------------------------------------------------------------------
# caching hooks, the Klein KV pipeline's reference-image KV cache
# ---------------------------------------------------------------------------------------------------------------


def _hooked_modules(model):
    return sum(1 for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
               and m._diffusers_hook.hooks)


def _cache_steps(model, steps=4):
    outs = []
    with torch.no_grad():
        for s in range(steps):
            with model.cache_context("cond"):
                # small input changes: the first-block cache reuses some steps, recomputes others
                x = _inputs(0)
                x["hidden_states"] = x["hidden_states"] + 0.02 * s
                x["timestep"] = torch.tensor([0.9 - 0.01 * s])
                outs.append(model(**x).sample)
    return outs


def _cache_kv_case():
    from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)
    from diffusers.models.transformers import transformer_flux2 as f2
    from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import Flux2KleinKVPipeline

    res = {}
    configs = {"pab": lambda: PyramidAttentionBroadcastConfig(
                   spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                   spatial_attention_block_identifiers=("transformer_blocks", "single_transformer_blocks"),
                   current_timestep_callback=lambda: 500),
               "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1),
               "magcache": lambda: MagCacheConfig(num_inference_steps=4, mag_ratios=[1.0] * 4, threshold=0.5,
                                                  max_skip_steps=2, retention_ratio=0.25)}
    fresh = _cache_steps(_dense())  # no cache: the hooks must actually skip work for the comparison to mean much
    for name, config in configs.items():
        dense, tp = _pair()
        for m in (dense, tp):
            m.enable_cache(config())
        hooks = (_hooked_modules(dense), _hooked_modules(tp))
        d, t = _cache_steps(dense), _cache_steps(tp)
        res[name] = (hooks, max(_rel(a, b) for a, b in zip(t, d)), max(_rel(a, b) for a, b in zip(d, fresh)))
        res[f"{name}_out"] = t[-1]

    # First-Block Cache attaches to both, and fails on both the same way: diffusers 0.42 subtracts the double
    # (head) block's output list from the single (tail) block's tensor; equal behaviour is what is checked.
    errors = []
    for m in _pair():
        m.enable_cache(FirstBlockCacheConfig(threshold=0.05))
        try:
            _cache_steps(m)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - the dense model's error, whatever it is, is the expectation
            errors.append(f"{type(exc).__name__}: {exc}")
        errors.append(_hooked_modules(m))
    res["fbc"] = errors

    # KV cache: step 0 extracts the reference tokens' K/V, step 1 reuses them
    ids = position_ids(TXT, IMG + REF)
    ref_ids = ids[TXT:].clone()
    ref_ids[:REF, 0] = 10  # reference tokens sit at another time index
    for processors in ("diffusers_kv", "tpfuse_default"):
        dense, tp = _pair()
        Flux2KleinKVPipeline._set_kv_attn_processors(type("P", (), {"transformer": dense})())
        if processors == "diffusers_kv":
            Flux2KleinKVPipeline._set_kv_attn_processors(type("P", (), {"transformer": tp})())
        outs = []
        for m in (dense, tp):
            with torch.no_grad():
                x0 = _inputs(0, img=IMG + REF, ids_img=ref_ids)
                out0, cache = m(**x0, kv_cache_mode="extract", num_ref_tokens=REF, return_dict=False)
                out1 = m(**_inputs(1), kv_cache=cache, kv_cache_mode="cached", return_dict=False)[0]
            outs.append((out0, out1, cache.get_double(0).get()[0].shape))
        (d0, d1, dshape), (t0, t1, tshape) = outs
        res[processors] = (_rel(t0, d0), _rel(t1, d1), tuple(dshape), tuple(tshape),
                           isinstance(tp.transformer_blocks[0].attn.processor, f2.Flux2KVAttnProcessor))
        res[f"{processors}_out"] = t1
    return res


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_caching_hooks_and_kv_cache(world_size):
    results = run_ranks(_cache_kv_case, world_size)
    r = results[0]
    assert r["fbc"][0] == r["fbc"][2] and r["fbc"][1] == r["fbc"][3] > 0, r["fbc"]
    for name in ("pab", "taylorseer", "magcache"):
        (hooks_dense, hooks_tp), rel, vs_uncached = r[name]
        assert hooks_dense > 0 and hooks_tp == hooks_dense, (name, hooks_dense, hooks_tp)
        assert rel <= F32, (name, rel)
        assert vs_uncached > 1e-3, (name, vs_uncached)  # the hooks did skip computation
    for processors in ("diffusers_kv", "tpfuse_default"):
        rel0, rel1, dshape, tshape, _ = r[processors]
        assert rel0 <= F32 and rel1 <= F32, (processors, rel0, rel1)
        heads = TINY.heads
        assert dshape == (1, REF, heads, TINY.head_dim) and tshape == (1, REF, heads // world_size, TINY.head_dim)
    assert r["diffusers_kv"][4] and not r["tpfuse_default"][4]
    for other in results[1:]:
        for key in ("pab_out", "taylorseer_out", "magcache_out", "diffusers_kv_out", "tpfuse_default_out"):
            assert torch.equal(other[key], r[key]), key
