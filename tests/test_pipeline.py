"""The whole FLUX.2 pipeline across gloo ranks: transformer, text encoder (Mistral3 for [dev], Qwen3 for klein) and
VAE, against the dense pipeline; loading a saved pipeline with each rank reading its slices; the refusals."""

import pytest
import torch

from tpfuse.tp_layers import run_ranks

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

PROMPT = "a red fox in the snow"


def _image(pipe, kwargs, seed=0):
    with torch.no_grad():
        return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


def _embeds(pipe, kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, **kwargs)[0]


def _parallel_ranks(kind, mesh_spec):
    from tpfuse.tp_layers.encoders import linear_weight_bytes
    from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline
    from tpfuse.tp_layers.pipeline import memory_report, parallelize_pipeline

    dense, kwargs = tiny_pipeline(kind, seed=0)
    ref_image, ref_embeds = _image(dense, kwargs), _embeds(dense, kwargs)
    dense_bytes = linear_weight_bytes(dense.text_encoder)
    del dense
    pipe, _ = tiny_pipeline(kind, seed=0)
    mesh = None
    if mesh_spec is not None:
        from torch.distributed.device_mesh import init_device_mesh

        from tpfuse.tp_layers.mesh import parse_mesh_spec

        dims = parse_mesh_spec(mesh_spec)
        mesh = init_device_mesh("cpu", tuple(dims.values()), mesh_dim_names=tuple(dims))
    parallelize_pipeline(pipe, mesh)
    report = memory_report(pipe, height=32, width=32)
    return {"weights": report.weights, "predicted": report.predicted, "activations": report.activations,
            "table": report.format(), "image": _image(pipe, kwargs), "ref_image": ref_image, "embeds": _embeds(pipe, kwargs),
            "ref_embeds": ref_embeds, "fraction": linear_weight_bytes(pipe.text_encoder) / dense_bytes,
            "sharding": str(pipe.tp_pipeline), "encoder_ranks": pipe.tp_pipeline.encoder_ranks}


@pytest.mark.parametrize("kind", ["dev", "klein"])
@pytest.mark.parametrize("world,mesh", [(2, None), (4, "sp2xtp2")])
def test_parallel_pipeline_image_equals_dense(kind, world, mesh):
    results = run_ranks(_parallel_ranks, world, kind, mesh)
    for r in results:
        # fp32: the row-parallel layers reorder sums of 32-48 terms (a few ulp of the largest value per layer,
        # |embeds| up to ~4, ulp(4) = 4.8e-7); the image goes on through 2 steps and the VAE
        torch.testing.assert_close(r["embeds"], r["ref_embeds"], rtol=1e-5,
                                   atol=2e-6 * r["ref_embeds"].abs().max().item())
        torch.testing.assert_close(r["image"], r["ref_image"], rtol=0, atol=1e-5)
        assert r["encoder_ranks"] == world  # the whole mesh: 4 heads divide by 2 and 4
        assert r["fraction"] <= (0.6 if world == 2 else 0.35), r["fraction"]
    for r in results[1:]:
        assert torch.equal(r["image"], results[0]["image"])
        assert torch.equal(r["embeds"], results[0]["embeds"])
    # The plan's per-rank weights are what the ranks hold: exactly on rank 0, the widest (a ragged vocabulary gives
    # the first ranks one row more), at most that elsewhere
    for rank, r in enumerate(results):
        for c in ("transformer", "text_encoder", "vae"):
            assert r["predicted"][c] is not None and r["activations"][c] > 0, (c, r["table"])
            if rank == 0:
                assert r["weights"][c] == r["predicted"][c], (c, r["table"])
            else:
                assert r["weights"][c] <= r["predicted"][c], (c, r["table"])


def _load_ranks(kind, folder):
    import torch.distributed as dist

    from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline
    from tpfuse.tp_layers.pipeline import load_pipeline

    dense, kwargs = tiny_pipeline(kind, seed=0)
    if dist.get_rank() == 0:
        dense.save_pretrained(folder)
    dist.barrier()
    ref_image = _image(dense, kwargs)
    # A rank's memory is checked (the plan's estimate) before anything loads
    import tpfuse.tp_layers.model as model_module

    real = model_module.from_pretrained
    model_module.from_pretrained = None  # a load would call it
    try:
        with pytest.raises(ValueError, match=r"does not fit the mesh tp2 on 0.0 GiB per rank: a rank needs 2.0 GiB "
                                             r"\(weights: transformer 0.0, text encoder 0.0, VAE 0.0 GiB; .*"
                                             r"Nothing was loaded"):
            load_pipeline(folder, dtype=torch.float32, gpu_memory=1e-3, height=32, width=32)
        with pytest.raises(ValueError, match="gpu_memory must be a positive number of GiB, got -1"):
            load_pipeline(folder, dtype=torch.float32, gpu_memory=-1)
    finally:
        model_module.from_pretrained = real
    pipe = load_pipeline(folder, dtype=torch.float32, progress=False, gpu_memory=2.01, height=32, width=32)
    return {"image": _image(pipe, kwargs), "ref_image": ref_image,
            "encoder_read": pipe.text_encoder.tp_load_report.bytes_read,
            "transformer_read": pipe.transformer.tp_load_report.bytes_read,
            "tied": kind == "klein" and pipe.text_encoder.lm_head.weight is
            pipe.text_encoder.get_input_embeddings().weight,
            "sharding": str(pipe.tp_pipeline)}


@pytest.mark.parametrize("kind", ["dev", "klein"])
def test_load_pipeline_reads_only_its_slices_and_equals_dense(kind, tmp_path):
    folder = tmp_path / kind
    results = run_ranks(_load_ranks, 2, kind, str(folder))
    encoder_file = sum(f.stat().st_size for f in (folder / "text_encoder").glob("*.safetensors"))
    for r in results:
        torch.testing.assert_close(r["image"], r["ref_image"], rtol=0, atol=1e-5)
        # each rank reads its half of the decoder and of the vocabulary (and the whole small vision tower)
        assert r["encoder_read"] <= 0.6 * encoder_file, (r["encoder_read"], encoder_file)
        assert r["sharding"] == "transformer: tp2; text encoder: sharded over 2 ranks; VAE: replicated (2 ranks)"
        if kind == "klein":
            assert r["tied"]  # the checkpoint holds the table once; both modules share the loaded rows
    assert torch.equal(results[0]["image"], results[1]["image"])


def _refusal_ranks():
    from transformers import T5Config, T5EncoderModel

    from tpfuse.tp_layers.encoders import UnsupportedEncoderError
    from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline
    from tpfuse.tp_layers.pipeline import parallelize_pipeline

    out = {}
    pipe, kwargs = tiny_pipeline("klein", seed=0)
    with pytest.raises(ValueError, match=r"text_encoder must be one of \('shard', 'replicate'\), got 'tp'"):
        parallelize_pipeline(pipe, text_encoder="tp")
    # FLUX.1's T5 encoder: transformers declares no tensor-parallel plan for it
    encoder = pipe.text_encoder
    torch.manual_seed(0)
    pipe.text_encoder = T5EncoderModel(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                vocab_size=50))
    with pytest.raises(UnsupportedEncoderError, match=r"T5EncoderModel has no tensor-parallel plan .*"
                                                      r"text_encoder=\"replicate\""):
        parallelize_pipeline(pipe)
    out["untouched"] = getattr(pipe.transformer, "tp_world_size", None) is None and not hasattr(pipe, "tp_pipeline")
    parallelize_pipeline(pipe, text_encoder="replicate")
    out["replicated"] = str(pipe.tp_pipeline)
    # a replicated (Qwen3) encoder: the image is the dense one too
    dense, _ = tiny_pipeline("klein", seed=0)
    pipe, _ = tiny_pipeline("klein", seed=0)
    parallelize_pipeline(pipe, text_encoder="replicate")
    out["image"], out["ref_image"] = _image(pipe, kwargs), _image(dense, kwargs)
    out["encoder_untouched"] = not hasattr(pipe.text_encoder, "tp_encoder") and \
        sum(p.numel() for p in pipe.text_encoder.parameters()) == sum(p.numel() for p in encoder.parameters())
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize_pipeline(pipe)
    # Ranks holding different encoders: refused on every rank before the transformer is sharded
    import torch.distributed as dist

    from tpfuse.tp_layers.consistency import WeightMismatchError

    pipe, _ = tiny_pipeline("klein", seed=0)
    if dist.get_rank() == 1:
        with torch.no_grad():
            pipe.text_encoder.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.raises(WeightMismatchError, match="model.layers.0.mlp.up_proj.weight"):
        parallelize_pipeline(pipe)
    out["untouched_after_mismatch"] = getattr(pipe.transformer, "tp_world_size", None) is None
    return out


def test_pipeline_refusals_and_a_replicated_encoder():
    for r in run_ranks(_refusal_ranks, 2):
        assert r["untouched"]  # the refusal came before the transformer was sharded
        assert r["replicated"] == "transformer: tp2; text encoder: replicated; VAE: replicated (2 ranks)"
        assert r["encoder_untouched"]
        assert r["untouched_after_mismatch"]
        torch.testing.assert_close(r["image"], r["ref_image"], rtol=0, atol=1e-5)


def _three_ranks(folder):
    import torch.distributed as dist

    from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline
    from tpfuse.tp_layers.pipeline import load_pipeline, parallelize_pipeline

    pipe, _ = tiny_pipeline("klein", seed=0)
    if dist.get_rank() == 0:
        pipe.save_pretrained(folder)
        for f in (folder / "transformer").glob("*.safetensors"):
            f.unlink()  # a load would fail on these; the mesh check must come first
    dist.barrier()
    with pytest.raises(ValueError, match=r"num_attention_heads=4, num_key_value_heads=4 not divisible by 3"):
        parallelize_pipeline(pipe)
    untouched = getattr(pipe.transformer, "tp_world_size", None) is None
    with pytest.raises(ValueError, match=r"cannot use the mesh tp3: num_attention_heads=\d+ not divisible by "
                                         r"tp\*sp=3"):
        load_pipeline(folder, dtype=torch.float32, text_encoder="replicate", progress=False)
    return untouched


def test_a_mesh_that_cannot_hold_the_model_is_refused_before_loading(tmp_path):
    assert all(run_ranks(_three_ranks, 3, tmp_path / "klein"))


def test_tpfuse_verify_pipeline_cli(capsys):
    from tpfuse.tp_layers.cli import main

    assert main(["verify", "--pipeline", "klein", "--mesh", "sp2xtp2"]) == 0
    out = capsys.readouterr().out
    assert "tpfuse verify --pipeline klein: tiny Flux2KleinPipeline (Qwen3 text encoder), mesh sp2xtp2 (4 ranks)" in out
    assert "transformer: sp2xtp2; text encoder: sharded over 4 ranks; VAE: replicated (4 ranks)" in out
    for check in ("prompt embeddings", "image:", "identical on every rank", "tpfuse plan's prediction"):
        assert any(line.strip().startswith("PASS") and check in line for line in out.splitlines()), (check, out)
    assert out.rstrip().endswith("OK")
    assert main(["verify", "--pipeline", "dev", "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot shard the text encoder over 3 ranks: num_attention_heads=4, num_key_value_heads=4 not divisible " \
        "by 3" in err, err
    assert main(["verify", "--pipeline", "dev", "--preset", "tiny"]) == 2
    assert "--pipeline checks a tiny FLUX.2 pipeline: it takes no --model, --family or --preset" in \
        capsys.readouterr().err


def _load_refusal_ranks(folder):
    import json

    import torch.distributed as dist

    from tpfuse.tp_layers.encoders import UnsupportedEncoderError
    from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline
    from tpfuse.tp_layers.pipeline import load_pipeline

    dense, kwargs = tiny_pipeline("klein", seed=0)
    if dist.get_rank() == 0:
        dense.save_pretrained(folder)
    dist.barrier()
    # A replicated encoder: read whole, straight to the device, the same image
    pipe = load_pipeline(folder, dtype=torch.float32, text_encoder="replicate", progress=False)
    out = {"image": _image(pipe, kwargs), "ref_image": _image(dense, kwargs), "sharding": str(pipe.tp_pipeline),
           "whole": not hasattr(pipe.text_encoder, "tp_encoder") and
           sum(p.numel() for p in pipe.text_encoder.parameters()) ==
           sum(p.numel() for p in dense.text_encoder.parameters())}
    dist.barrier()
    if dist.get_rank() == 0:  # now an encoder transformers has no plan for, and no transformer weights to read
        for f in (folder / "transformer").glob("*.safetensors"):
            f.unlink()
        from transformers import T5Config

        config = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50,
                          architectures=["T5EncoderModel"]).to_dict()
        (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    dist.barrier()
    with pytest.raises(UnsupportedEncoderError, match=r"T5EncoderModel has no tensor-parallel plan"):
        load_pipeline(folder, dtype=torch.float32, progress=False)
    return out


def test_load_pipeline_replicated_encoder_and_an_encoder_without_a_plan(tmp_path):
    for r in run_ranks(_load_refusal_ranks, 2, tmp_path / "klein"):
        torch.testing.assert_close(r["image"], r["ref_image"], rtol=0, atol=1e-5)
        assert r["sharding"] == "transformer: tp2; text encoder: replicated; VAE: replicated (2 ranks)"
        assert r["whole"]
