"""Measure the meshes this machine can: each (sp, tp) mesh's per-rank compute of one FLUX.2 block pair on one GPU,
plus the scaling model's communication, against the scaling model's pure prediction.

One GPU (the only kind this project is lent): for every ``sp x tp`` factorization of 2/4/8 GPUs (``--gpus``) that
shards the preset (heads divide by ``tp x sp``, the MLP width by tp, the tokens by sp) and for 1 GPU, it times with
``triton.testing.do_bench`` (median, CUDA events, L2 flushed; each block captured in a CUDA graph unless
``--no-graphs``, as the model's ``MIN_KERNEL_US`` assumes) what ONE rank of that mesh computes in

* one two-stream (double) block: per stream (image ``img / sp`` rows, text ``txt / sp`` rows) LayerNorm + modulate,
  the Q/K/V GEMM at ``3 D / tp`` columns, QK RMSNorm + RoPE; attention; per stream the out-projection
  (``D / tp`` in), gate + residual, LayerNorm + modulate, ``linear_in`` (``2 M / tp``), SwiGLU, ``linear_out``
  (``M / tp`` in), gate + residual;
* one single-stream block: LayerNorm + modulate of ``S / sp`` tokens, the fused QKV + MLP-in GEMM
  (``(3 D + 2 M) / tp`` columns), QK RMSNorm + RoPE, attention, SwiGLU, the ``[attention | MLP]`` out GEMM
  (``(D + M) / tp`` in), gate + residual;

(dp and cfg split the batch: they change no rank's work for one forward; the scaling model adds their gathers)
where attention is torch SDPA over ALL ``S`` tokens with ``heads / (tp x sp)`` heads: the shape after Ulysses'
all-to-all (the all-to-alls and all-reduces themselves are not run on one GPU: their time is the scaling model's,
``bench/scaling_model.py``, on one node of the GPU this runs on, H100 SXM if it matches none). Plain torch ops in
bf16, no tpfuse kernels: the measured compute is that of unfused eager code, so the double block is compared with
the model's ``before`` accounting (plain GEMMs + the QK-norm/RoPE and activation passes); the model's single block
assumes the fused projection's epilogue, so plain torch runs more passes there than it counts.

Per mesh and block: measured compute, the model's compute (``ratio`` = measured / modelled), the model's exposed
communication, predicted = measured compute + modelled communication, and the model's pure prediction; per mesh
the whole transformer step from those blocks (the preset's block counts) and its speedup over the 1-GPU step.

Several GPUs: ``torchrun --nproc-per-node N bench/bench_mesh.py --distributed`` times NCCL's all-to-all of one
attention input (sp = N: ``(S / N) x D`` per GPU) and all-reduce of one block output (tp = N: ``S x D``) at the
preset's sizes, against the model's ``alltoall_us`` / ``allreduce_us``. With world size 1 it says so and skips.

``--dry-run`` runs every path on a tiny shape on the CPU (fp32, ``time.perf_counter``; numbers meaningless) and
prints the shapes the real sweep would time: CI keeps it working without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling_model as sm  # noqa: E402
from common import (  # noqa: E402
    close_distributed, device_info, format_table, init_distributed, median_ms, median_ms_fixed, run_main, write_results,
)

FLUX2 = ("klein-4b", "klein-9b", "dev")
DRY_RUN_SHAPE = sm.Shape("dry-run", 64, 4, 16, 192, 1, 1, out_channels=8)
DRY_RUN_TOKENS = (8, 32)  # text, image


def mesh_grid(cfg: sm.Shape, gpus: list[int], txt: int, img: int) -> list[tuple[int, int]]:
    """``(sp, tp)`` of 1 GPU and of every factorization of ``gpus`` that shards ``cfg`` at these token counts."""
    out = [(1, 1)]
    for n in gpus:
        for tp in (d for d in range(1, n + 1) if n % d == 0):
            sp = n // tp
            if cfg.heads % (tp * sp) == 0 and cfg.mlp_hidden % tp == 0 and txt % sp == 0 and img % sp == 0:
                out.append((sp, tp))
    return list(dict.fromkeys(out))


def shapes(cfg: sm.Shape, sp: int, tp: int, txt: int, img: int) -> dict:
    """What one rank of an ``sp x tp`` mesh holds: token rows, weight widths, the attention it runs."""
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim
    heads_tp = cfg.heads // tp
    return {"txt": txt // sp, "img": img // sp, "tokens": (txt + img) // sp, "all_tokens": txt + img,
            "hidden": d, "head_dim": hd, "heads_tp": heads_tp, "heads_local": cfg.heads // (tp * sp),
            "qkv_out": 3 * heads_tp * hd, "attn_in": heads_tp * hd, "mlp_in_out": 2 * m // tp, "mlp_out_in": m // tp}


def describe(cfg: sm.Shape, sp: int, tp: int, txt: int, img: int) -> str:
    s = shapes(cfg, sp, tp, txt, img)
    return (f"{cfg.name} {sm.mesh_name({'sp': sp, 'tp': tp})}: tokens/rank {s['tokens']} ({s['txt']} txt + "
            f"{s['img']} img) x D {s['hidden']}; double: qkv [{s['qkv_out']}, {s['hidden']}] x2, out "
            f"[{s['hidden']}, {s['attn_in']}] x2, linear_in [{s['mlp_in_out']}, {s['hidden']}] x2, linear_out "
            f"[{s['hidden']}, {s['mlp_out_in']}] x2; single: in [{s['qkv_out'] + s['mlp_in_out']}, {s['hidden']}],"
            f" out [{s['hidden']}, {s['attn_in'] + s['mlp_out_in']}]; SDPA [1, {s['heads_local']}, "
            f"{s['all_tokens']}, {s['head_dim']}]")


def _rope(x, cos, sin):
    """Interleaved-pair RoPE (FLUX): ``x * cos + rotate(x) * sin``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin


def build(cfg: sm.Shape, sp: int, tp: int, txt: int, img: int, device, dtype):
    """``(double_fn, single_fn, attention_fn)``: one rank's compute, on seeded random tensors."""
    s = shapes(cfg, sp, tp, txt, img)
    d, hd, h_tp, h_loc = s["hidden"], s["head_dim"], s["heads_tp"], s["heads_local"]
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: dev's weights are 1e9 numbers

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    def weight(out, k):
        return rand(out, k, scale=k ** -0.5)

    def rope_tables(rows):
        angles = torch.randn(rows, 1, hd // 2, generator=g, device=device).repeat_interleave(2, dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    qn, kn = torch.ones(hd, device=device, dtype=dtype), torch.ones(hd, device=device, dtype=dtype)
    # After the all-to-all: every token, this rank's heads (and back: this rank's tokens, its tp heads)
    q_all, k_all, v_all = (rand(1, h_loc, s["all_tokens"], hd) for _ in range(3))

    def attention():
        return F.scaled_dot_product_attention(q_all, k_all, v_all)

    def qk(qkv, rows, cos, sin):
        q, k, v = qkv.view(rows, 3, h_tp, hd).unbind(1)
        return (_rope(F.rms_norm(q, (hd,), qn, 1e-6), cos, sin), _rope(F.rms_norm(k, (hd,), kn, 1e-6), cos, sin), v)

    def modulate(x, shift, scale):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + scale) + shift

    streams = []
    for rows in (s["img"], s["txt"]):
        streams.append({"rows": rows, "x": rand(rows, d), "mod": rand(6, d, scale=0.1), "rope": rope_tables(rows),
                        "qkv": weight(s["qkv_out"], d), "out": weight(d, s["attn_in"]),
                        "lin_in": weight(s["mlp_in_out"], d), "lin_out": weight(d, s["mlp_out_in"]),
                        "o": rand(rows, s["attn_in"])})  # this rank's attention output after the all-to-all back

    def double():
        for st in streams:
            sh, sc, _, _, _, _ = st["mod"].unbind(0)
            qk(modulate(st["x"], sh, sc) @ st["qkv"].T, st["rows"], *st["rope"])
        attention()
        outs = []
        for st in streams:
            _, _, g1, sh2, sc2, g2 = st["mod"].unbind(0)
            x = st["x"] + g1 * (st["o"] @ st["out"].T)  # + the all-reduce (modelled)
            gate, up = (modulate(x, sh2, sc2) @ st["lin_in"].T).chunk(2, dim=-1)
            outs.append(x + g2 * ((F.silu(gate) * up) @ st["lin_out"].T))  # + the all-reduce (modelled)
        return outs

    rows = s["tokens"]
    x, mod, rope = rand(rows, d), rand(3, d, scale=0.1), rope_tables(rows)
    w_in, w_out = weight(s["qkv_out"] + s["mlp_in_out"], d), weight(d, s["attn_in"] + s["mlp_out_in"])
    o = rand(rows, s["attn_in"])

    def single():
        sh, sc, gt = mod.unbind(0)
        qkv, mlp = (modulate(x, sh, sc) @ w_in.T).split([s["qkv_out"], s["mlp_in_out"]], dim=-1)
        qk(qkv, rows, *rope)
        attention()
        gate, up = mlp.chunk(2, dim=-1)
        return x + gt * (torch.cat([o, F.silu(gate) * up], dim=-1) @ w_out.T)  # + the all-reduce (modelled)

    return double, single, attention


def _graphed(fn):
    """``fn`` captured in a CUDA graph (its replay), as a model step under CUDA graphs runs it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _model_gpu(device_name: str) -> sm.GPU:
    return next((g for g in sm.GPUS if g.measured_on(device_name)), sm.GPUS[0])


def single_gpu(args, cfgs, txt: int, img: int, device, dtype, rates) -> tuple[list[dict], list[dict]]:
    """Block rows (per preset, mesh, block) and step rows (per preset and mesh)."""
    rows, steps = [], []
    kdev = "cuda" if device != "cpu" else "cpu"
    for cfg in cfgs:
        base_measured = base_modelled = None
        for sp, tp in mesh_grid(cfg, args.gpu_counts, txt, img):
            double, single, attention = build(cfg, sp, tp, txt, img, device, dtype)
            graphs = kdev == "cuda" and not args.no_graphs
            measured = {}
            with torch.no_grad():
                for name, fn in (("double", double), ("single", single), ("attention", attention)):
                    if graphs:
                        try:
                            fn = _graphed(fn)
                        except RuntimeError as exc:  # a capture that fails: eager, and say so
                            print(f"{cfg.name} sp{sp} tp{tp} {name}: no CUDA graph ({exc}); eager")
                    measured[name] = median_ms(fn, kdev)
            del double, single, attention, fn  # the tensors and graphs of this mesh
            modelled = {"double": sm.double_block(cfg, rates, img, tp, sp, accounting="before"),
                        "single": sm.single_block(cfg, rates, img, tp, sp)}
            attn_model = sm.attention_us(rates, txt + img, cfg.heads // (tp * sp), cfg.head_dim) / 1e3
            s = shapes(cfg, sp, tp, txt, img)
            mesh = sm.mesh_name({"sp": sp, "tp": tp})
            for block in ("double", "single"):
                mod = modelled[block]
                rows.append({"preset": cfg.name, "mesh": mesh, "gpus": sp * tp, "sp": sp, "tp": tp, "block": block,
                             "tokens_per_rank": s["tokens"], "heads_per_rank": s["heads_local"],
                             "measured_ms": measured[block], "attention_ms": measured["attention"],
                             "attention_model_ms": attn_model, "model_compute_ms": mod["compute"] / 1e3,
                             "ratio": measured[block] / (mod["compute"] / 1e3),
                             "model_comm_ms": mod["exposed"] / 1e3,
                             "predicted_ms": measured[block] + mod["exposed"] / 1e3,
                             "model_ms": mod["total"] / 1e3, "cuda_graphs": graphs})
            dbl, sgl = rows[-2], rows[-1]
            step = cfg.num_layers * dbl["predicted_ms"] + cfg.num_single_layers * sgl["predicted_ms"]
            model_step = cfg.num_layers * dbl["model_ms"] + cfg.num_single_layers * sgl["model_ms"]
            if (sp, tp) == (1, 1):
                base_measured, base_modelled = step, model_step
            steps.append({"preset": cfg.name, "mesh": mesh, "gpus": sp * tp, "step_ms": step,
                          "model_step_ms": model_step, "ratio": step / model_step,
                          "speedup": base_measured / step, "model_speedup": base_modelled / model_step})
            if kdev == "cuda":
                torch.cuda.empty_cache()
    return rows, steps


BLOCK_COLUMNS = [("preset", "preset", ""), ("mesh", "mesh", ""), ("block", "block", ""),
                 ("tokens_per_rank", "tok/rank", "d"), ("heads_per_rank", "heads", "d"),
                 ("measured_ms", "measured ms", ".3f"), ("model_compute_ms", "model compute", ".3f"),
                 ("ratio", "meas/model", ".2f"), ("attention_ms", "attn ms", ".3f"),
                 ("attention_model_ms", "attn model", ".3f"), ("model_comm_ms", "+comm (model)", ".3f"),
                 ("predicted_ms", "predicted ms", ".3f"), ("model_ms", "model ms", ".3f")]
STEP_COLUMNS = [("preset", "preset", ""), ("mesh", "mesh", ""), ("gpus", "GPUs", "d"),
                ("step_ms", "predicted step ms", ".2f"), ("model_step_ms", "model step ms", ".2f"),
                ("ratio", "pred/model", ".2f"), ("speedup", "speedup", ".2f"),
                ("model_speedup", "model speedup", ".2f")]


def distributed(args, cfgs, txt: int, img: int, dtype, rates) -> list[dict]:
    """Under torchrun: NCCL's all-to-all (sp = N) and all-reduce (tp = N) at the preset's message sizes."""
    import torch.distributed as dist

    rank, world, device = init_distributed(args.dry_run)
    kdev = "cuda" if device != "cpu" else "cpu"
    rows = []
    for cfg in cfgs:
        s_all, d = txt + img, cfg.hidden_size
        cases = []
        if s_all % world == 0:  # one of Q/K/V/O: this rank's S/N tokens x D (sp = N, tp = 1)
            a2a_in = torch.randn(s_all // world * d, device=device).to(dtype)
            a2a_out = torch.empty_like(a2a_in)
            cases.append(("all_to_all", a2a_in.numel() * a2a_in.element_size(),
                          lambda: dist.all_to_all_single(a2a_out, a2a_in),
                          sm.alltoall_us(rates, a2a_in.numel() * a2a_in.element_size(), world, 1)))
        buf = torch.randn(s_all * d, device=device).to(dtype)  # one block output, S x D (tp = N, sp = 1)
        cases.append(("all_reduce", buf.numel() * buf.element_size(), lambda: dist.all_reduce(buf),
                      sm.allreduce_us(rates, buf.numel() * buf.element_size(), world, 1)))
        for op, nbytes, fn, model_us in cases:
            ms = median_ms_fixed(fn, kdev, *((1, 3) if args.dry_run else (5, 20)))
            rows.append({"preset": cfg.name, "op": op, "world_size": world, "mbytes_per_gpu": nbytes / 1e6,
                         "measured_ms": ms, "model_ms": model_us / 1e3, "ratio": ms / (model_us / 1e3)})
    close_distributed()
    return rows if rank == 0 else []


DIST_COLUMNS = [("preset", "preset", ""), ("op", "op", ""), ("world_size", "N", "d"),
                ("mbytes_per_gpu", "MB/GPU", ".2f"), ("measured_ms", "measured ms", ".3f"),
                ("model_ms", "model ms", ".3f"), ("ratio", "meas/model", ".2f")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes; prints the real sweep's shapes")
    parser.add_argument("--distributed", action="store_true",
                        help="under torchrun (>= 2 ranks): time NCCL all-to-all and all-reduce at the message sizes")
    parser.add_argument("--presets", default="klein-4b,klein-9b,dev", help="FLUX.2 presets: " + ", ".join(FLUX2))
    parser.add_argument("--gpus", default="2,4,8", help="GPU counts whose sp x tp meshes are timed (and 1 GPU)")
    parser.add_argument("--image", default="1024^2", choices=list(sm.IMAGES))
    parser.add_argument("--no-graphs", action="store_true", help="time eager launches, not CUDA graph replays")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    if unknown := [p for p in presets if p not in FLUX2]:
        parser.error(f"unknown preset(s) {unknown}: one of {', '.join(FLUX2)}")
    args.gpu_counts = [int(n) for n in args.gpus.split(",") if n]
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    txt, img = sm.TEXT_TOKENS, sm.IMAGES[args.image]
    if args.dry_run and not args.distributed:
        print("would time on a GPU (per rank):")
        for name in presets:
            for sp, tp in mesh_grid(sm.MODELS[name], args.gpu_counts, txt, img):
                print("  " + describe(sm.MODELS[name], sp, tp, txt, img))
    if args.dry_run:
        cfgs, (txt, img) = [DRY_RUN_SHAPE], DRY_RUN_TOKENS
    else:
        cfgs = [sm.MODELS[name] for name in presets]
    info = device_info(device)
    gpu = _model_gpu(info["device"])
    rates = sm.rates_for(gpu, "ring")
    if args.distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            print("bench_mesh: collectives skipped: world size 1 (run under torchrun --nproc-per-node N >= 2)")
            return 0
        rows = distributed(args, cfgs, txt, img, dtype, rates)
        if not rows:
            return 0
        table = format_table(rows, DIST_COLUMNS)
        print(table)
        path = write_results("mesh-distributed", {"info": info, "dry_run": args.dry_run, "model_gpu": gpu.name,
                                                  "rows": rows}, table, args.out)
        print(f"wrote {path}")
        return 0
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}; communication and "
          f"model figures: scaling_model.py on one node of {gpu.name} (ring), {args.image} ({txt} + {img} tokens)")
    print("bench_mesh: collectives not run: one process (torchrun --nproc-per-node N bench/bench_mesh.py "
          "--distributed times them on N GPUs)")
    rows, steps = single_gpu(args, cfgs, txt, img, device, dtype, rates)
    table = format_table(rows, BLOCK_COLUMNS) + "\n\n" + format_table(steps, STEP_COLUMNS)
    print(table)
    path = write_results("mesh", {"info": info, "dry_run": args.dry_run, "model_gpu": gpu.name, "image": args.image,
                                  "text_tokens": txt, "image_tokens": img, "rows": rows, "steps": steps}, table,
                         args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
