"""Hybrid parallelism on a DeviceMesh (tp x sp x cfg/dp): whole models of every family against the dense ones on
gloo ranks, with token counts sp does not divide; LoRA training; saving and loading; the bad inputs.

One launch per world size runs every mesh (a launch costs seconds; a mesh's check a fraction of one)."""

import copy

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import parallelize, run_ranks
from tpfuse.tp_layers.mesh import MESH_DIMS, mesh_name, parse_mesh_spec, valid_meshes
from tpfuse.tp_layers.numerics import rel_error, tolerance
from tpfuse.tp_layers.sequence import SequenceParallelError, split_sizes

pytest.importorskip("diffusers")
TOL = tolerance(torch.float32)
TXT, IMG = 7, 15  # neither divides by 2 or 4: uneven splits everywhere


def _check(family: str, spec: dict, batch: int = 2, txt: int = TXT, img: int = IMG):
    from tpfuse.tp_layers.verify_family import _rank_check

    out, checks, _, _ = _rank_check(family, "tiny", "float32", 0, batch, txt, img, spec)
    return out, {name.split(" (worst")[0]: err for name, err in checks}


def _lora_check(spec: dict):
    """FLUX.2 tiny with a LoRA adapter on the attention projections (B non-zero), trained one step's gradients on
    the mesh: every gradient (LoRA matrices included) equals the dense model's shard; a second backward doubles
    them (the replica-group reduction runs per backward, before accumulation)."""
    from peft import LoraConfig

    from tpfuse.tp_layers.flux2.family import random_inputs, random_model
    from tpfuse.tp_layers.verify_family import _run, _shard_of, build_mesh

    dense = random_model("tiny", 0)
    dense.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    for n, p in dense.named_parameters():
        p.requires_grad_("lora_" in n)  # LoRA training: only the adapter trains
    tp = parallelize(copy.deepcopy(dense), mesh=build_mesh(spec))
    inputs = random_inputs(dense, 2, TXT, IMG, 1)
    _, _, ref_w = _run(dense, inputs, 2)
    out, _, w = _run(tp, inputs, 2)
    assert set(w) == set(ref_w) and all("lora_" in n for n in w), sorted(set(w) ^ set(ref_w))
    errs = [rel_error(g, _shard_of(tp, n, ref_w[n])) for n, g in w.items()]
    first = {n: g.clone() for n, g in w.items()}
    _run(tp, inputs, 2)  # accumulate a second identical backward
    doubled = max(rel_error(p.grad, 2 * first[n]) for n, p in tp.named_parameters() if p.grad is not None)
    return max(errs), doubled, out


MESHES_4 = [("flux2", {"sp": 2, "tp": 2}), ("flux2", {"sp": 4, "tp": 1}), ("flux2", {"tp": 4}),
            ("flux2", {"cfg": 2, "tp": 2}), ("qwenimage", {"sp": 2, "tp": 2}), ("flux3", {"dp": 2, "sp": 2})]


def _save_and_load(folder: str, spec: dict):
    """save_pretrained on a mesh writes the dense checkpoint once (tp 1: diffusers' own save, from one rank);
    from_pretrained(mesh=...) reads it back; both equal the dense model."""
    import diffusers

    from tpfuse.tp_layers import from_pretrained
    from tpfuse.tp_layers.flux2.family import random_inputs, random_model
    from tpfuse.tp_layers.verify_family import build_mesh

    dense = random_model("tiny", 0)
    parallelize(copy.deepcopy(dense), mesh=build_mesh(spec)).save_pretrained(folder)
    saved = diffusers.Flux2Transformer2DModel.from_pretrained(folder).state_dict()
    same = all(torch.equal(saved[k], v) for k, v in dense.state_dict().items()) and saved.keys() == \
        dense.state_dict().keys()
    loaded = from_pretrained(folder, mesh=build_mesh(spec))
    inputs = random_inputs(dense, 1, TXT, IMG, 3)
    with torch.no_grad():
        err = rel_error(loaded(**inputs).sample, dense(**inputs).sample)
    return same, err


def _four_ranks(folder: str):
    results = [(fam, mesh_name(spec), *_check(fam, spec)) for fam, spec in MESHES_4]
    lora = _lora_check({"sp": 2, "tp": 2})
    saves = [_save_and_load(f"{folder}/{mesh_name(spec)}", spec) for spec in ({"sp": 2, "tp": 2}, {"sp": 4})]
    return results, lora, saves, _bad_inputs()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return run_ranks(_four_ranks, 4, str(tmp_path_factory.mktemp("mesh")))


def test_meshes_of_four_ranks_equal_dense(four_ranks):
    per_rank = four_ranks
    for results, (lora_err, doubled, lora_out), saves, _ in per_rank:
        assert all(same and load_err <= TOL for same, load_err in saves), saves
        for i, (fam, mesh, out, errs) in enumerate(results):
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            assert not bad, f"{fam} on {mesh}: {bad}"
            assert {"output", "grad hidden_states", "grad encoder_hidden_states", "weight grads"} <= set(errs)
            assert torch.equal(out, per_rank[0][0][i][2]), f"{fam} on {mesh}: outputs differ across ranks"
        assert lora_err <= TOL and doubled <= TOL, (lora_err, doubled)
        assert torch.equal(lora_out, per_rank[0][1][2])


def _compiled(spec: dict):
    """The whole sp model under torch.compile(fullgraph=True): the splits, the all-to-alls and the gathers are
    graph nodes (no graph break), and the output is the dense one."""
    from tpfuse.tp_layers.flux2.family import random_inputs, random_model
    from tpfuse.tp_layers.verify_family import build_mesh

    dense = random_model("tiny", 0)
    model = parallelize(copy.deepcopy(dense), mesh=build_mesh(spec))
    inputs = random_inputs(dense, 2, TXT, IMG, 0)
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True)(**inputs).sample
        return rel_error(out, dense(**inputs).sample), out


def test_sequence_parallel_model_compiles_fullgraph():
    per_rank = run_ranks(_compiled, 2, {"sp": 2})
    for err, out in per_rank:
        assert err <= TOL
        assert torch.equal(out, per_rank[0][1])


def _eight_ranks():
    return _check("flux2", {"dp": 2, "sp": 2, "tp": 2}, batch=2)


def test_dp2_sp2_tp2_on_eight_ranks():
    per_rank = run_ranks(_eight_ranks, 8)
    for out, errs in per_rank:
        assert all(v <= TOL for v in errs.values()), errs
        assert {"output", "grad hidden_states", "grad encoder_hidden_states", "weight grads"} <= set(errs)
        assert torch.equal(out, per_rank[0][0])


# ---------------------------------------------------------------------------------------------------------------
# Bad input, refused by name
# ---------------------------------------------------------------------------------------------------------------


def _bad_inputs():
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    from tpfuse.tp_layers.flux2.family import random_inputs, random_model

    errors = {}

    def expect(key, exc, fn):
        try:
            fn()
        except exc as e:
            errors[key] = str(e)
        else:
            errors[key] = None

    model = random_model("tiny", 0)
    expect("unknown", ValueError,
           lambda: parallelize(copy.deepcopy(model), mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("sq", "tp"))))
    expect("unnamed", ValueError, lambda: parallelize(copy.deepcopy(model), mesh=init_device_mesh("cpu", (4,))))
    half = DeviceMesh("cpu", [0, 1], mesh_dim_names=("tp",))  # (built by every rank: it creates groups)
    expect("cover", ValueError, lambda: parallelize(copy.deepcopy(model), mesh=half))
    expect("both", ValueError, lambda: parallelize(copy.deepcopy(model), dist.group.WORLD,
                                                  mesh=init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))))
    expect("not a mesh", TypeError, lambda: parallelize(copy.deepcopy(model), mesh="sp2xtp2"))
    two_heads = copy.deepcopy(model)
    for block in list(two_heads.transformer_blocks) + list(two_heads.single_transformer_blocks):
        block.attn.heads = 2  # the dense block would attend with 2 heads of 32
    two_heads.register_to_config(num_attention_heads=2)
    expect("heads", ValueError,
           lambda: parallelize(two_heads, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp", "tp"))))

    cfg = parallelize(copy.deepcopy(model), mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("cfg", "tp")))
    expect("batch", ValueError, lambda: cfg(**random_inputs(model, 3, TXT, IMG, 0)))

    sp = parallelize(copy.deepcopy(model), mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("sp", "tp")))
    inputs = random_inputs(model, 1, TXT, IMG, 0)
    expect("kv cache", SequenceParallelError, lambda: sp(**inputs, kv_cache_mode="extract", num_ref_tokens=3))
    expect("short stream", ValueError, lambda: sp(**random_inputs(model, 1, 1, IMG, 0)))  # 1 text token, sp 2
    q = torch.randn(1, 11, 2, 16)
    mask = torch.ones(1, 1, 11, 11, dtype=torch.bool)  # a query dimension: not splittable by tokens
    proc = sp.transformer_blocks[0].attn.processor
    from tpfuse.tp_layers.tp_attention import attention

    expect("query mask", SequenceParallelError, lambda: attention(q, q, q, mask, None, proc._parallel_config))
    from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor

    sp.single_transformer_blocks[0].attn.set_processor(Flux2AttnProcessor())
    expect("processor", SequenceParallelError, lambda: sp(**inputs))
    return errors


def test_bad_meshes_and_inputs_are_refused_by_name(four_ranks):
    errors = four_ranks[0][3]
    assert "'sq'" in errors["unknown"] and "dp" in errors["unknown"]
    assert "mesh_dim_names" in errors["unnamed"]
    assert "covers 2 ranks" in errors["cover"]
    assert "not both" in errors["both"]
    assert "DeviceMesh" in errors["not a mesh"]
    assert "num_attention_heads=2" in errors["heads"] and "tp*sp=4" in errors["heads"] and "'dp2xtp2'" in errors[
        "heads"]
    assert "batch of 3" in errors["batch"] and "dp*cfg=2" in errors["batch"]
    assert "kv_cache_mode='extract'" in errors["kv cache"]
    assert "txt stream has 1 token(s), fewer than sp=2" in errors["short stream"]
    assert "query dimension" in errors["query mask"]
    assert "single_transformer_blocks.0.attn.processor" in errors["processor"]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def test_split_sizes_follow_tensor_split():
    for n in (0, 1, 5, 7, 16, 29):
        for parts in (1, 2, 3, 4):
            assert split_sizes(n, parts) == [t.numel() for t in torch.arange(n).tensor_split(parts)]


def test_mesh_specs_and_valid_meshes():
    assert parse_mesh_spec("sp2xtp2") == {"sp": 2, "tp": 2}
    assert parse_mesh_spec("dp2,cfg2,sp2,tp2") == dict(zip(MESH_DIMS, (2, 2, 2, 2)))
    for bad, words in (("sp2xsp2", "twice"), ("ep2", "unknown dimension 'ep'"), ("sp", "<dim><size>"),
                       ("tp0", ">= 1"), ("", "like")):
        with pytest.raises(ValueError, match=words):
            parse_mesh_spec(bad)
    assert mesh_name({"tp": 1}) == "tp1" and mesh_name({"dp": 2, "sp": 1, "tp": 4}) == "dp2xtp4"
    # 6 heads, MLP 9216, 8 ranks: tp*sp must divide 6 (1 or 2), tp the MLP
    assert valid_meshes(8, 6, 9216) == ["dp8", "dp4xsp2", "dp4xtp2"]
    assert len(valid_meshes(8, 24, 9216)) == 10  # every (sp, tp) of 8 divides 24 heads


def test_layernorm_modulate_backward_of_no_tokens_is_zero():
    """A rank may hold no rows of a per-token op's input: the modulation's gradient is zeros of its shape."""
    from tpfuse.kernels import layernorm_modulate

    x = torch.randn(2, 0, 8, requires_grad=True)
    shift, scale = (torch.randn(2, 1, 8, requires_grad=True) for _ in range(2))
    layernorm_modulate(x, shift, scale).sum().backward()
    assert torch.equal(shift.grad, torch.zeros(2, 1, 8)) and torch.equal(scale.grad, torch.zeros(2, 1, 8))
