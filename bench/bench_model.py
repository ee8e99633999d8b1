"""Full FLUX.2 transformer forward: tpfuse against diffusers' eager and compiled model (and DTensor TP).

One GPU: klein-4B shapes (random weights, bf16), 512 text + 4096 image tokens; diffusers eager, diffusers
``torch.compile``, then the same model parallelized by tpfuse at TP 1 (the fused kernels: LayerNorm-modulation,
fused QKV+MLP projection, QK-norm+RoPE, row matmul with gate/residual epilogue).

Several GPUs: ``torchrun --nproc-per-node N bench/bench_model.py --distributed`` times tpfuse at TP N against
diffusers' ``enable_parallelism(config=TensorParallelConfig(tp_degree=N))`` on the same weights.

``--dry-run``: tiny preset on CPU (torch backends), to keep the code exercised in CI.

Without diffusers (the model under test and both baselines come from it) the script prints why it skipped, writes
a result file with ``"skipped"`` set to the reason and no rows, and exits 0: the GPU image has no diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, format_table, init_distributed, median_ms, write_results  # noqa: E402

from tpfuse.tp_layers import Flux2Config, parallelize  # noqa: E402
from tpfuse.tp_layers.verify import position_ids  # noqa: E402


def build(cfg: Flux2Config, device, dtype, seed=0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
    return model.to(dtype).eval()


def inputs(cfg: Flux2Config, txt: int, img: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    ids = position_ids(txt, img)
    return dict(hidden_states=torch.randn(1, img, cfg.in_channels, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g).to(device, dtype),
                timestep=torch.tensor([0.5], device=device, dtype=dtype), img_ids=ids[txt:].to(device),
                txt_ids=ids[:txt].to(device),
                guidance=torch.tensor([4.0], device=device, dtype=dtype) if cfg.guidance_embeds else None)


def _timed(model, x, device):
    with torch.no_grad():
        return median_ms(lambda: model(**x), device, rep_ms=500)


def single(args, cfg, device, dtype) -> list[dict]:
    txt, img = args.txt_tokens, args.img_tokens
    model = build(cfg, device, dtype)
    x = inputs(cfg, txt, img, device, dtype)
    rows = [{"impl": "diffusers eager", "tp": 1, "ms": _timed(model, x, device)}]
    if not args.dry_run and not args.no_compile:
        compiled = torch.compile(model)
        rows.append({"impl": "diffusers torch.compile", "tp": 1, "ms": _timed(compiled, x, device)})
        del compiled
        torch._dynamo.reset()
    with torch.no_grad():
        ref = model(**x).sample
    parallelize(model)  # world size 1: same weights, fused kernels
    with torch.no_grad():
        out = model(**x).sample
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    rows.append({"impl": "tpfuse (fused kernels)", "tp": 1, "ms": _timed(model, x, device), "rel_err": err})
    base = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_eager"] = base / r["ms"]
        r["shape"] = f"{cfg.name} {txt}+{img}"
    return rows


def distributed(args, cfg, dtype) -> list[dict]:
    import torch.distributed as dist

    rank, world, device = init_distributed(args.dry_run)
    x = inputs(cfg, args.txt_tokens, args.img_tokens, device, dtype)
    rows = []
    model = parallelize(build(cfg, device, dtype))
    rows.append({"impl": "tpfuse", "tp": world, "ms": _timed(model, x, device)})
    del model
    if not args.dry_run:  # diffusers' DTensor TP needs CUDA
        from diffusers import TensorParallelConfig

        model = build(cfg, device, dtype)
        model.enable_parallelism(config=TensorParallelConfig(tp_degree=world))
        rows.append({"impl": "diffusers TensorParallelConfig", "tp": world, "ms": _timed(model, x, device)})
    for r in rows:
        r["shape"] = f"{cfg.name} {args.txt_tokens}+{args.img_tokens}"
        r["speedup_vs_first"] = rows[0]["ms"] / r["ms"]
    dist.destroy_process_group()
    return rows if rank == 0 else []


COLUMNS = [("impl", "implementation", ""), ("shape", "shape", ""), ("tp", "TP", "d"), ("ms", "forward ms", ".2f"),
           ("speedup_vs_eager", "x eager", ".2f"), ("speedup_vs_first", "x tpfuse", ".2f"),
           ("rel_err", "rel err vs eager", ".2e")]


def _skip(args, device, reason: str) -> int:
    """Say why nothing was timed, in the output and in the result file (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    info = device_info(device)
    print(f"bench_model: skipped: {reason}")
    path = write_results("model-distributed" if args.distributed else "model",
                         {"info": info, "dry_run": args.dry_run, "skipped": reason, "rows": []},
                         f"skipped: {reason}", args.out)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--txt-tokens", type=int, default=512)
    parser.add_argument("--img-tokens", type=int, default=4096)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return _skip(args, device, f"diffusers missing ({exc})")
    if args.dry_run:
        cfg, dtype = Flux2Config.preset("tiny"), torch.float32
        args.txt_tokens, args.img_tokens = 7, 29
    else:
        cfg, dtype = Flux2Config.preset(args.preset), torch.bfloat16
    rows = distributed(args, cfg, dtype) if args.distributed else single(args, cfg, device, dtype)
    if not rows:
        return 0
    info = device_info(device)
    table = format_table(rows, COLUMNS)
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print(table)
    path = write_results("model-distributed" if args.distributed else "model",
                         {"info": info, "dry_run": args.dry_run, "rows": rows}, table, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
