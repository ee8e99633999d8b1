"""The family registry and the Qwen-Image and FLUX.3 families: parallelized diffusers models equal to the dense
ones on 1, 2 and 4 gloo ranks (forward, input and weight gradients), identical on every rank, ~1/N of the sharded
weights per rank, the fused ops on the plain path, diffusers' own code on a hooked one; per-rank loading and a
bit-identical dense save; clear errors for an unknown model class and a world size that does not divide the heads.
"""

import contextlib
import copy
import importlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tpfuse.tp_layers import (UnsupportedModelError, from_pretrained, load_sharded, parallelize, run_ranks,
                              save_pretrained)
from tpfuse.tp_layers.families import family_named, families
from tpfuse.tp_layers.model import check_parallelizable
from tpfuse.tp_layers.numerics import rel_error, tolerance

pytest.importorskip("diffusers")
TOL = tolerance(torch.float32)
FAMILIES = ("qwenimage", "flux3")
# The fused op each family's plain path must run (module attribute patched with a counter in the rank).
# (Qwen-Image: layernorm_modulate, which only the block's fused forward calls; its processor also runs the joint
# QK-norm kernel on diffusers' path.)
FUSED = {"qwenimage": ("tpfuse.tp_layers.qwenimage.tp_blocks", "layernorm_modulate"),
         "flux3": ("tpfuse.tp_layers.flux3.tp_blocks", "fused_qkv_mlp_proj")}


@contextlib.contextmanager
def _count_calls(module_name: str, attr: str):
    """Count the calls of ``module.attr`` (restored afterwards: the ws=1 case runs in the test process)."""
    module = importlib.import_module(module_name)
    fn, calls = getattr(module, attr), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    setattr(module, attr, counted)
    try:
        yield calls
    finally:
        setattr(module, attr, fn)


def _hooked_output(family: str) -> torch.Tensor:
    """The parallelized tiny model's output with a no-op forward hook on every attention module: the blocks then run
    diffusers' own forward and processors on the shards (the path LoRA and caching hooks take)."""
    fam = family_named(family)
    model = parallelize(fam.random_model("tiny", 0))
    for block in model.modules():
        if hasattr(block, "attn") and hasattr(block.attn, "local_heads"):
            block.attn.register_forward_hook(lambda *a: None)
    with torch.no_grad():
        return model(**fam.random_inputs(model, 2, 7, 15, 1), return_dict=False)[0]


def _lora(family: str):
    """A LoRA made for the dense model (on column, row and, for Qwen-Image, the sharded adaLN layers) loaded into
    the dense and the parallelized model: (output error, LoRA weight-gradient error, the adapter gathered back)."""
    from tpfuse.tp_layers import lora_state_dict
    from tpfuse.tp_layers.verify_family import _run

    fam = family_named(family)
    dense = fam.random_model("tiny", 0)
    tp = parallelize(copy.deepcopy(dense))
    suffixes = {"qwenimage": ("attn.to_q", "attn.to_add_out", "img_mod.1", "txt_mlp.net.0.proj"),
                "flux3": ("attn.to_k", "attn.to_out.0", "ff.linear_in")}[family]
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, m in dense.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(suffixes):
            state[f"{name}.lora_A.weight"] = 0.1 * torch.randn(4, m.in_features, generator=g)
            state[f"{name}.lora_B.weight"] = 0.1 * torch.randn(m.out_features, 4, generator=g)
    for model in (dense, tp):
        model.load_lora_adapter(dict(state), prefix=None, adapter_name="a")
    inputs = fam.random_inputs(dense, 2, 7, 15, 1)
    ref, _, ref_w = _run(dense, inputs, 2)
    out, _, w = _run(tp, inputs, 2)
    from tpfuse.tp_layers.verify_family import _shard_of

    worst = max(rel_error(grad, _shard_of(tp, n, ref_w[n])) for n, grad in w.items() if ".lora_" in n)
    saved = lora_state_dict(tp, "a")
    fused = []  # fuse_lora merges each rank's rows of the update (the adaLN's dense adapter too), unfuse undoes it
    for step in ("fuse_lora", "unfuse_lora"):
        for model in (dense, tp):
            getattr(model, step)()
        with torch.no_grad():
            fused.append(rel_error(tp(**inputs, return_dict=False)[0], dense(**inputs, return_dict=False)[0]))
    return rel_error(out, ref), worst, saved, state, fused


def _fuse_refused(family: str) -> str:
    """diffusers' fuse_qkv_projections on a model parallelized over 2+ ranks: the error (a plain to_qkv over the
    shards would lose the input-gradient all-reduce)."""
    model = parallelize(family_named(family).random_model("tiny", 0))
    try:
        model.fuse_qkv_projections()
    except NotImplementedError as exc:
        return str(exc)
    # diffusers fuses nothing where the attention does not support it (Qwen-Image's joint attention)
    fused = [n for n, m in model.named_modules() if getattr(m, "fused_projections", False)]
    return f"fused, not refused: {fused[:2]}" if fused else "nothing to fuse"


def _rank(families_, hooked=True):
    from tpfuse.tp_layers.verify_family import _rank_check

    out = {}
    for family in families_:
        with _count_calls(*FUSED[family]) as calls:
            result = _rank_check(family, "tiny", "float32", 0, 2, 7, 15)
        out[family] = (*result, calls[0], _hooked_output(family) if hooked else None,
                       _lora(family) if hooked else None,
                       _fuse_refused(family) if hooked and dist.is_initialized() else None)
    return out


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_families_match_dense_diffusers(world_size):
    # One rank runs in this process (no process group: a world of one); 2 and 4 on gloo ranks.
    hooked = world_size <= 2  # diffusers' path on the shards and LoRA: once sharded is enough (saves 4 ranks' time)
    ranks = [_rank(FAMILIES)] if world_size == 1 else run_ranks(_rank, world_size, FAMILIES, hooked)
    for family in FAMILIES:
        first = ranks[0][family][0]
        for rank, per in enumerate(ranks):
            out, checks, (share, sharded_share), _, fused_calls, hooked_out, lora, fuse = per[family]
            assert fuse in (None, "nothing to fuse") or "fused Q/K/V projections are not supported" in fuse, fuse
            assert torch.equal(out, first), (family, rank)  # replicated output, bitwise
            for name, err in checks:  # output, every input gradient, every weight gradient (worst named)
                assert err <= TOL, (family, world_size, name, err)
            assert len(checks) >= 4
            assert sharded_share == pytest.approx(1 / world_size), (family, sharded_share)
            # every block matrix is sharded (Qwen-Image's adaLN included); norms and row biases are replicated
            assert share == pytest.approx(1 / world_size, rel=0.03), (family, share)
            assert fused_calls > 0, f"{family}: the fused path did not run"
            if hooked_out is not None:
                assert rel_error(hooked_out, out) <= TOL, (family, "diffusers' path on the shards")
            if lora is not None:  # a dense-model LoRA, sharded on load, gathered back on save
                out_err, grad_err, saved, state, fused = lora
                assert out_err <= TOL and grad_err <= TOL and max(fused) <= TOL, (family, out_err, grad_err, fused)
                assert sorted(saved) == sorted(state) and all(torch.equal(saved[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: per-rank loading of diffusers' layout, and a bit-identical dense save
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        fam = family_named(family)
        root = tmp_path_factory.mktemp(family)
        model = fam.random_model("tiny", 3)
        model.save_pretrained(root / "dense", max_shard_size="20KB")
        assert len(list((root / "dense").glob("*.safetensors"))) > 2
        with torch.no_grad():
            ref = model(**fam.random_inputs(model, 2, 7, 15, 1), return_dict=False)[0]
        out[family] = (root, ref, {n: t.clone() for n, t in model.state_dict().items()})
    return out


def _load_and_save(paths):
    from safetensors.torch import load_file

    result = {}
    for family, root in paths.items():
        fam = family_named(family)
        model = from_pretrained(f"{root}/dense", progress=False)
        assert type(model).__name__ == fam.model_classes[0]
        by_hand = None
        if family == "qwenimage":  # built on meta by hand, parallelized, loaded: its RoPE tables are rebuilt too
            with torch.device("meta"):
                by_hand = type(fam.random_model("tiny", 0, meta=True)).from_config(model.config)
            load_sharded(parallelize(by_hand), f"{root}/dense", progress=False)
            with torch.no_grad():
                by_hand = by_hand(**fam.random_inputs(model, 2, 7, 15, 1), return_dict=False)[0]
        with torch.no_grad():
            out = model(**fam.random_inputs(model, 2, 7, 15, 1), return_dict=False)[0]
        packed = []
        if family == "flux3":  # the four column shards are one tensor again after loading (zero-copy packing)
            from tpfuse.tp_layers.packing import _consecutive

            for block in model.single_transformer_blocks:
                ws = [block.attn.to_q.weight, block.attn.to_k.weight, block.attn.to_v.weight,
                      block.ff.linear_in.weight]
                packed.append(_consecutive(ws))
        save_pretrained(model, f"{root}/resaved", max_shard_size="20KB")
        state = {}
        if dist.get_rank() == 0:
            for f in sorted(Path(root, "resaved").glob("*.safetensors")):
                state.update(load_file(f))
        result[family] = (out, model.tp_load_report.bytes_read, packed, state, by_hand)
    return result


def test_from_pretrained_loads_shards_and_saves_the_dense_checkpoint(saved):
    results = run_ranks(_load_and_save, 2, {f: str(saved[f][0]) for f in FAMILIES})
    for family in FAMILIES:
        root, ref, state = saved[family]
        dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
        for rank, per in enumerate(results):
            out, bytes_read, packed, resaved, by_hand = per[family]
            assert rel_error(out, ref) <= TOL and torch.equal(out, results[0][family][0])
            assert by_hand is None or torch.equal(by_hand, out)
            assert bytes_read < 0.8 * dense_bytes  # only this rank's slices of the block matrices
            assert all(packed)
            if rank == 0:
                assert sorted(resaved) == sorted(state)
                assert all(torch.equal(resaved[n], state[n]) for n in state), family  # bit-identical


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_model_class_names_it_and_the_supported_ones():
    class SomeTransformer2DModel(nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match=r"SomeTransformer2DModel.*Flux2Transformer2DModel.*"
                                                     r"QwenImageTransformer2DModel"):
        parallelize(SomeTransformer2DModel())
    assert issubclass(UnsupportedModelError, TypeError)
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        family_named("sd3")
    assert [f.name for f in families()][:3] == ["flux2", "qwenimage", "flux3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_world_size_not_dividing_the_heads_lists_the_valid_sizes(family):
    model = family_named(family).random_model("tiny", 0, meta=True)  # 4 heads
    with pytest.raises(ValueError, match=r"num_attention_heads=4 .*valid world sizes: \[1, 2, 4\]"):
        check_parallelizable(model, 3)


def test_fused_projections_are_refused_with_the_remedy_and_the_model_left_as_it_was():
    model = family_named("flux3").random_model("tiny", 0)
    model.single_transformer_blocks[0].attn.fused_projections = True  # the last block list: the others come first
    with pytest.raises(ValueError, match=r"single_transformer_blocks\.0: .*unfuse_projections"):
        parallelize(model)
    assert not any("TP" in type(m).__name__ for m in model.modules())  # every block checked before any is sharded
    model.single_transformer_blocks[0].attn.fused_projections = False
    parallelize(model)  # (after parallelize, fusing is refused on 2+ ranks: see _fuse_refused)


def test_flux3_from_pretrained_in_bf16_keeps_the_qk_norms_in_fp32(saved):
    root, ref, _ = saved["flux3"]
    model = from_pretrained(root / "dense", dtype=torch.bfloat16, progress=False)  # one rank, in this process
    block = model.single_transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.bfloat16
    assert block.attn.norm_q.weight.dtype == block.attn.norm_k.weight.dtype == torch.float32
    inputs = family_named("flux3").random_inputs(model, 2, 7, 15, 1)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and rel_error(out, ref) <= tolerance(torch.bfloat16)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallelized_model_compiles_to_one_graph(family):
    # fullgraph: any graph break (in tpfuse's blocks, processors or packing) raises; the eager backend keeps the
    # check about capture, not codegen.
    fam = family_named(family)
    model = parallelize(fam.random_model("tiny", 0))
    inputs = fam.random_inputs(model, 2, 7, 15, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        out = torch.compile(model, fullgraph=True, backend="eager")(**inputs, return_dict=False)[0]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("args, message", [
    (["--family", "flux3", "--preset", "klein-4b"], "--preset 'klein-4b' is not a flux3 preset; choose from "
                                                    "['flux3-block', 'tiny']"),
    (["--family", "qwenimage", "--world-size", "3"], "num_attention_heads=4 not divisible by the world size (valid "
                                                     "world sizes: [1, 2, 4])"),
    (["--family", "qwenimage", "--dtype", "bfloat16"], "--dtype must be one of ['float32', 'float64']"),
    (["--family", "qwenimage", "--model", "some/repo"], "--model is not supported with --family qwenimage"),
    (["--mesh", "sp2xtp2", "--model", "some/repo"], "--model is not supported with --mesh"),
    (["--mesh", "sp3xtp2"], "num_attention_heads=4 not divisible by tp*sp=6 (valid meshes of 6 ranks: ['dp6', "
                            "'dp3xsp2', 'dp3xtp2']"),
    (["--mesh", "sp2xtp2", "--world-size", "2"], "--world-size 2 and --mesh sp2xtp2 (4 ranks) disagree"),
    (["--mesh", "cfg2xtp2", "--batch", "3"], "--batch 3 does not split over dp*cfg=2"),
    (["--mesh", "ep2"], "unknown dimension 'ep'"),
    (["--mesh", "sp2xtp2", "--preset", "dev"], "--preset 'dev' is not a model preset for --mesh"),
    (["--preset", "qwen-image-block"], "--preset 'qwen-image-block' is not a flux2 preset"),
])
def test_verify_family_bad_arguments_exit_2_before_any_rank_starts(args, message, capsys):
    from tpfuse.tp_layers import cli

    assert cli.main(["verify", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.splitlines()) == 1 and out == "", (out, err)
