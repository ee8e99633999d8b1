"""Text-to-image with a whole FLUX.2 pipeline across GPUs: transformer, text encoder and VAE placed by tpfuse.

Real weights (one GPU per rank; each rank reads only its slices of the transformer and the text encoder). Ask
`tpfuse plan` which mesh fits and is fastest; it prints this line:

    tpfuse plan --model dev --gpus 4 --gpu-memory 80
    torchrun --nproc-per-node 4 examples/flux2_pipeline.py --model black-forest-labs/FLUX.2-dev --mesh tp4 \\
        --height 1024 --width 1024 --prompt "a red fox in the snow"

Offline, on CPU ranks (gloo), with a tiny random pipeline (its own tokenizer, Mistral3 or Qwen3 text encoder,
transformer and VAE): no download; checks that every rank computes the same image:

    torchrun --nproc-per-node 2 examples/flux2_pipeline.py --random-weights --kind dev
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist


def build_mesh(spec: str | None, device_type: str):
    """``--mesh sp2xtp2`` -> a named DeviceMesh over the world (``None``: plain tensor parallelism over it)."""
    if spec is None:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    from tpfuse.tp_layers.mesh import parse_mesh_spec

    dims = parse_mesh_spec(spec)
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="black-forest-labs/FLUX.2-klein-4B",
                        help="a FLUX.2 pipeline: Hub repo id or local folder (default: %(default)s)")
    parser.add_argument("--mesh", default=None,
                        help="dimensions of the GPUs, e.g. tp4 or sp2xtp2 (`tpfuse plan` recommends one; default: "
                             "tensor parallelism over all ranks)")
    parser.add_argument("--text-encoder", default="shard", choices=["shard", "replicate"])
    parser.add_argument("--random-weights", action="store_true", help="a tiny random pipeline, offline (CPU works)")
    parser.add_argument("--kind", default="klein", choices=["klein", "dev"],
                        help="with --random-weights: Flux2KleinPipeline (Qwen3) or Flux2Pipeline (Mistral3)")
    parser.add_argument("--prompt", default="a photograph of a red fox in the snow")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="flux2_pipeline.png",
                        help="where rank 0 writes the image (default: %(default)s, in the working directory)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a rank waits in a collective for the others before failing (default: %(default)s)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    # Bounded: a rank that fails mid-step must not leave its peers blocked in an all-reduce for torch's default
    # (10 minutes for NCCL, 30 for gloo).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    from tpfuse.tp_layers.pipeline import load_pipeline, memory_report, parallelize_pipeline

    try:
        mesh = build_mesh(args.mesh, "cuda" if cuda else "cpu")
        if args.random_weights:
            from tpfuse.tp_layers.flux2.tiny_pipeline import tiny_pipeline

            pipe, extra = tiny_pipeline(args.kind, seed=0, dtype=dtype, device=device)  # same weights on every rank
            parallelize_pipeline(pipe, mesh, text_encoder=args.text_encoder)
            size, steps = (args.height or 32, args.width or 32), args.steps or 2
        else:
            pipe = load_pipeline(args.model, mesh, dtype=dtype, device=device, text_encoder=args.text_encoder)
            extra = {}
            size, steps = (args.height or 1024, args.width or 1024), args.steps or (50 if "dev" in args.model.lower()
                                                                                   else 4)
        if rank == 0:
            print(pipe.tp_pipeline)
            print(memory_report(pipe, height=size[0], width=size[1]).format())
        generator = torch.Generator(device="cpu").manual_seed(args.seed)  # same noise on every rank
        out = pipe(prompt=args.prompt, height=size[0], width=size[1], num_inference_steps=steps,
                   generator=generator, output_type="pt", **extra).images  # [1, 3, H, W] in [0, 1]
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out.contiguous())
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if rank == 0:
            from PIL import Image

            image = (out[0].permute(1, 2, 0).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(image).save(args.out)
            print(f"{pipe.tp_pipeline.mesh} on {world} ranks: {tuple(out.shape)} image, identical on all ranks: "
                  f"{same}; wrote {args.out}")
        if not same:
            raise SystemExit("ranks computed different images")
        # No rank tears the group down while a peer's last collective still runs (rank 0 is still writing the PNG).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    if not torch.cuda.is_available():
        # On gloo ranks, interpreter finalization can abort the process after its work is done: gloo's worker
        # threads still hold tensors of finished async collectives ("terminate called without an active
        # exception", pytorch/pytorch#179291; seen once in CI after the image was written). The group is already
        # destroyed and the output flushed, so leave without finalizing.
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
