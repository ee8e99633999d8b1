"""Text-to-image with FLUX.2 [klein] whose transformer is split across GPUs by tpfuse.

Real weights (one GPU per rank; each rank reads only its shard of the transformer):

    torchrun --nproc-per-node 2 examples/flux2_klein_tp.py --model black-forest-labs/FLUX.2-klein-4B \\
        --prompt "a red fox in the snow" --out fox.png

Offline, on CPU ranks (gloo), with a tiny random model: no download, checks that the whole pipeline runs with a
tensor-parallel transformer and that every rank computes the same image:

    torchrun --nproc-per-node 2 examples/flux2_klein_tp.py --random-weights --preset tiny
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist


def random_pipeline(preset: str, dtype: torch.dtype, device: str):
    """Flux2KleinPipeline with a seeded random transformer (identical on every rank before sharding), a small
    random VAE and no text encoder (prompt embeddings are passed directly)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel

    from tpfuse.tp_layers import Flux2Config, parallelize

    cfg = Flux2Config.preset(preset)
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(**cfg.to_diffusers_kwargs()).to(device, dtype)
    parallelize(transformer)
    latent_channels = cfg.in_channels // 4  # the pipeline packs 2x2 latent patches into in_channels
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32), layers_per_block=1, latent_channels=latent_channels,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=32).to(device, dtype)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=transformer, is_distilled=True)
    prompt_embeds = torch.randn(1, 8, cfg.joint_attention_dim, generator=torch.Generator().manual_seed(1))
    return pipe, {"prompt_embeds": prompt_embeds.to(device, dtype)}


def pretrained_pipeline(model: str, dtype: torch.dtype, device: str):
    from diffusers import Flux2KleinPipeline

    from tpfuse.tp_layers import from_pretrained

    transformer = from_pretrained(model, subfolder="transformer", dtype=dtype)  # this rank's shard only
    pipe = Flux2KleinPipeline.from_pretrained(model, transformer=transformer, torch_dtype=dtype)
    return pipe.to(device), {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="black-forest-labs/FLUX.2-klein-4B", help="Hub repo id or local dir")
    parser.add_argument("--random-weights", action="store_true", help="tiny random model, offline (CPU works)")
    parser.add_argument("--preset", default="tiny", help="with --random-weights: the transformer's shape")
    parser.add_argument("--prompt", default="a photograph of a red fox in the snow")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="flux2_klein_tp.png",
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
    try:
        if args.random_weights:
            pipe, extra = random_pipeline(args.preset, dtype, device)
            size, steps = (args.height or 32, args.width or 32), args.steps or 2
        else:
            pipe, extra = pretrained_pipeline(args.model, dtype, device)
            extra["prompt"] = args.prompt
            size, steps = (args.height or 1024, args.width or 1024), args.steps or 4
        generator = torch.Generator(device="cpu").manual_seed(args.seed)  # same noise on every rank
        out = pipe(height=size[0], width=size[1], num_inference_steps=steps, generator=generator,
                   output_type="pt", **extra).images  # [1, 3, H, W] in [0, 1]
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out.contiguous())
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if rank == 0:
            from PIL import Image

            image = (out[0].permute(1, 2, 0).float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            Image.fromarray(image).save(args.out)
            print(f"TP {world}: {tuple(out.shape)} image, identical on all ranks: {same}; wrote {args.out}")
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
