"""parallelize() on diffusers' Flux2Transformer2DModel, per-rank sharded safetensors loading, from_pretrained."""

import shutil

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import Flux2Config, from_pretrained, load_sharded, parallelize, run_ranks
from tpfuse.tp_layers.model import check_parallelizable
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.verify import position_ids, random_diffusers_model

pytest.importorskip("diffusers")
TINY = Flux2Config.preset("tiny")
TXT, IMG = 7, 29
TOL = tolerance(torch.float32)


def _model(meta=False, seed=0):
    return random_diffusers_model(TINY, seed, meta)  # non-trivial norm scales (they default to 1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = position_ids(TXT, IMG)
    return dict(hidden_states=torch.randn(1, IMG, TINY.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, TXT, TINY.joint_attention_dim, generator=g),
                timestep=torch.tensor([0.5]), img_ids=ids[TXT:], txt_ids=ids[:TXT])


def _forward(model):
    with torch.no_grad():
        return model(**_inputs()).sample


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A dense tiny model saved as several safetensors shards, and its output."""
    root = tmp_path_factory.mktemp("tiny")
    model = _model()
    model.save_pretrained(root / "transformer", max_shard_size="30KB")
    assert len(list((root / "transformer").glob("*.safetensors"))) > 3
    return root, _forward(model), {n: p.detach().clone() for n, p in model.state_dict().items()}


def _block_bytes(state):
    """(bytes of the block matrices that shard, bytes of everything replicated)."""
    sharded = sum(t.numel() * t.element_size() for n, t in state.items()
                  if "transformer_blocks." in n and "norm" not in n)
    total = sum(t.numel() * t.element_size() for t in state.values())
    return sharded, total - sharded


# ---------------------------------------------------------------------------------------------------------------
# meta model -> parallelize -> load_sharded on 2 and 4 ranks
# ---------------------------------------------------------------------------------------------------------------


def _meta_load(path):
    model = parallelize(_model(meta=True))
    report = load_sharded(model, path, progress=dist.get_rank() == 0)
    assert not any(p.is_meta for p in model.parameters())
    return _forward(model.eval()), report


@pytest.mark.parametrize("world_size", [2, 4])
def test_meta_parallelize_load_matches_dense(saved, world_size):
    root, ref, state = saved
    results = run_ranks(_meta_load, world_size, str(root / "transformer"))
    sharded, replicated = _block_bytes(state)
    for out, report in results:
        assert rel_error(out, ref) <= TOL
        assert torch.equal(out, results[0][0])  # replicated output, bitwise
        # Each rank reads exactly its 1/N of the block matrices and the replicated rest: nothing more.
        assert report.bytes_read == sharded // world_size + replicated
        assert report.key_format == "diffusers" and report.world_size == world_size


def _real_parallelize(seed):
    model = _model(seed=seed)
    ref = _forward(model)
    parallelize(model)
    assert model.tp_world_size == dist.get_world_size()
    return rel_error(_forward(model), ref)


def test_parallelize_model_with_real_weights():
    assert max(run_ranks(_real_parallelize, 2, 0)) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# BFL key names
# ---------------------------------------------------------------------------------------------------------------

_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1"}
_DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
           "attn.to_add_out": "txt_attn.proj", "ff_context.linear_in": "txt_mlp.0",
           "ff_context.linear_out": "txt_mlp.2"}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}


def _to_bfl(state):
    """diffusers -> BFL keys, written independently of the loader (the inverse of diffusers' conversion)."""
    out = {}
    for name, t in state.items():
        stem, param = name.rsplit(".", 1)
        bfl_param = "scale" if "norm" in stem else param
        if stem in _TOP:
            if stem == "norm_out.linear":
                scale, shift = t.chunk(2)
                t = torch.cat([shift, scale])  # BFL keeps (shift, scale)
            out[f"{_TOP[stem]}.{param}"] = t
        elif stem.startswith("transformer_blocks."):
            _, i, inner = stem.split(".", 2)
            if inner in ("attn.to_q", "attn.add_q_proj"):
                k = inner.replace("_q", "_k")
                v = inner.replace("_q", "_v")
                fused = torch.cat([t, state[f"transformer_blocks.{i}.{k}.{param}"],
                                   state[f"transformer_blocks.{i}.{v}.{param}"]])
                out[f"double_blocks.{i}.{'img' if inner == 'attn.to_q' else 'txt'}_attn.qkv.{param}"] = fused
            elif inner in _DOUBLE:
                out[f"double_blocks.{i}.{_DOUBLE[inner]}.{bfl_param}"] = t
        else:
            _, i, inner = stem.split(".", 2)
            out[f"single_blocks.{i}.{_SINGLE[inner]}.{bfl_param}"] = t
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def bfl_file(saved, tmp_path_factory):
    from safetensors.torch import save_file

    _, _, state = saved
    path = tmp_path_factory.mktemp("bfl") / "flux-2-tiny.safetensors"
    save_file(_to_bfl(state), str(path))
    return path


def _bfl_load(path, via_from_pretrained):
    if via_from_pretrained:  # config inferred from the shapes of a single file
        model = from_pretrained(path, progress=False)
        report = model.tp_load_report
    else:
        model = parallelize(_model(meta=True))
        report = load_sharded(model, path, progress=False)
    return _forward(model.eval()), report.key_format


@pytest.mark.parametrize("via_from_pretrained", [False, True])
def test_bfl_checkpoint_loads_the_same(saved, bfl_file, via_from_pretrained):
    _, ref, _ = saved
    for out, key_format in run_ranks(_bfl_load, 2, str(bfl_file), via_from_pretrained):
        assert key_format == "bfl"
        assert rel_error(out, ref) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained: a local pipeline directory, and the Hub cache offline
# ---------------------------------------------------------------------------------------------------------------


def _from_dir(path, dtype):
    model = from_pretrained(path, dtype=dtype, progress=False)
    assert next(model.parameters()).dtype == dtype and not model.training
    return _forward(model) if dtype == torch.float32 else None


def test_from_pretrained_local_pipeline_dir(saved):
    root, ref, _ = saved
    (root / "model_index.json").write_text("{}")  # a pipeline layout: the transformer is in transformer/
    for out in run_ranks(_from_dir, 2, str(root), torch.float32):
        assert rel_error(out, ref) <= TOL
    run_ranks(_from_dir, 2, str(root), torch.bfloat16)


def test_from_pretrained_hub_id_offline_from_cache(saved, tmp_path, monkeypatch):
    """A Hub repo id resolved from the local cache with HF_HUB_OFFLINE (no network here)."""
    import huggingface_hub.constants as hf_constants

    root, ref, _ = saved
    cache = tmp_path / "hub"
    commit = "0" * 40
    snapshot = cache / "models--tpfuse-test--tiny-flux2" / "snapshots" / commit
    shutil.copytree(root / "transformer", snapshot / "transformer")
    (cache / "models--tpfuse-test--tiny-flux2" / "refs").mkdir(parents=True)
    (cache / "models--tpfuse-test--tiny-flux2" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    model = from_pretrained("tpfuse-test/tiny-flux2", subfolder="transformer", progress=False)  # world size 1
    assert rel_error(_forward(model), ref) <= TOL
    assert str(cache) in model.tp_load_report.files[0]


# ---------------------------------------------------------------------------------------------------------------
# Refusals and load errors
# ---------------------------------------------------------------------------------------------------------------


def test_refuses_what_it_cannot_shard():
    with pytest.raises(TypeError, match=r"no tensor-parallel family for torch.nn.modules.linear.Linear; supported: "
                                        r"Flux2Transformer2DModel \(flux2\)"):
        parallelize(torch.nn.Linear(2, 2))
    m = _model()
    m.transformer_blocks[0].attn.to_q.weight = torch.nn.Parameter(
        torch.zeros_like(m.transformer_blocks[0].attn.to_q.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized or wrapped parameters cannot be sharded: "
                                         r"\['transformer_blocks.0.attn.to_q.weight: Parameter/torch.int8'\]"):
        parallelize(m)
    m = _model()
    m.hf_quantizer = object()
    with pytest.raises(ValueError, match="the model is quantized"):
        parallelize(m)
    m = _model()
    m.single_transformer_blocks[0].attn._hf_hook = object()  # what accelerate's cpu offload attaches
    with pytest.raises(ValueError, match=r"offloaded or dispatched \(hooks on \['single_transformer_blocks.0.attn'"):
        parallelize(m)
    m = parallelize(_model())
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(m)


def test_refuses_heads_not_divisible():
    # What parallelize runs first with its group's size (no ranks needed to see the refusal).
    with pytest.raises(ValueError, match=r"parallelize \(Flux2Transformer2DModel\): cannot shard across 3 ranks: "
                                         r"num_attention_heads=4 not divisible by the world size \(valid world "
                                         r"sizes: \[1, 2, 4\]\)"):
        check_parallelizable(_model(meta=True), 3)


def test_load_errors_are_listed_together(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _, state = saved
    bad = dict(state)
    bad.pop("proj_out.weight")
    bad.pop("transformer_blocks.0.attn.to_k.weight")
    bad["extra.weight"] = torch.zeros(3)
    bad["single_transformer_blocks.0.attn.to_out.weight"] = torch.zeros(64, 10)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "model.safetensors"))
    torch.save({}, tmp_path / "old.bin")
    model = parallelize(_model(meta=True))
    with pytest.raises(ValueError) as info:
        load_sharded(model, tmp_path, progress=False)
    msg = str(info.value)
    assert "non-safetensors" not in msg  # old.bin beside a safetensors checkpoint: left out, as diffusers does
    assert "missing keys (2): ['proj_out.weight', 'transformer_blocks.0.attn.to_k.weight']" in msg
    assert "unexpected keys (1): ['extra.weight']" in msg
    assert "single_transformer_blocks.0.attn.to_out.weight: checkpoint (64, 10) vs model (64, 256)" in msg
    with pytest.raises(FileNotFoundError, match="neither a local path nor a Hub repo id"):
        load_sharded(model, tmp_path / "nope", progress=False)
    assert load_file  # imported for symmetry with save_file; the loader itself never loads whole files


def test_verify_with_model_weights(saved, bfl_file):
    from tpfuse.tp_layers.verify import format_report, verify

    root, _, _ = saved
    for source in (str(root), str(bfl_file)):  # a pipeline directory (diffusers keys) and a BFL single file
        res = verify(model=source, world_size=2, img_tokens=29, txt_tokens=7)
        assert res.ok, format_report(res)
        assert "(block 0)" in res.preset
    with pytest.raises(ValueError, match="--block-index 5 is out of range for double blocks \\(the model has 1\\)"):
        verify(model=str(root), world_size=2, block_index=5)


def _with_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model()
    ref = _forward(model)
    parallelize(model, mesh)  # a 1-D DeviceMesh works as the group
    return rel_error(_forward(model), ref), model.tp_world_size


def test_parallelize_with_a_device_mesh():
    for err, ws in run_ranks(_with_mesh, 2):
        assert err <= TOL and ws == 2
