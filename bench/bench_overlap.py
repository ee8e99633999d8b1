"""Benchmark the row-parallel all-reduce overlap.

One GPU (the only kind this project is lent):

(a) chunking overhead: the row-parallel GEMM (``row_parallel_matmul``, gate + residual epilogue) in C token
    chunks against one launch, at klein-4B, klein-9B and dev local shapes: equal chunks (C = 2, 4) and the
    wave-aligned schedule ``overlap="auto"`` uses (``tpfuse.tp_layers.schedule.wave_schedule``, row ``wave``).
    Target: <= 5% overhead for the schedule.
(b) simulated link: after each chunk's GEMM, a side stream "transfers" the chunk's ring all-reduce volume
    ``2(N-1)/N * bytes`` at ``--bus-gbps`` (default 360 GB/s, NVLink-class NCCL bus bandwidth) by copying a buffer
    sized so that the copy takes that long (calibrated against this GPU's copy speed). Sequential = every
    transfer after all GEMMs; overlapped = transfer i runs while GEMM i+1 computes. Exposed communication =
    (overlapped - compute-only) / (sequential - compute-only). Target: <= 15%.
(c) the all-reduce time per layer that TP 2, 4, 8 implies: ring volume over the stated bus bandwidth, next to the
    measured local GEMM time.

Several GPUs: ``torchrun --nproc-per-node N bench/bench_overlap.py --distributed`` times RowParallelLinear with
real NCCL: compute-only, sequential (C=1) and overlapped (auto) per layer, and the exposed fraction.

``--dry-run`` runs every path on tiny CPU shapes (torch backend, no side stream; numbers meaningless) so CI keeps
it working; ``--distributed --dry-run`` does the same on gloo ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    close_distributed, device_info, format_table, init_distributed, median_ms, model_shapes, run_main, write_results,
)

from tpfuse.kernels.row_parallel_matmul import row_parallel_matmul_forward  # noqa: E402
from tpfuse.tp_layers.linear import AUTO_ROW_ALIGN, _sm_count, chunk_bounds  # noqa: E402
from tpfuse.tp_layers.schedule import wave_schedule  # noqa: E402


def ring_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``nbytes``."""
    return 2 * (world_size - 1) / world_size * nbytes


def _layer_inputs(cfg, tp, tokens, device, dtype):
    """The single-stream to_out at TP degree ``tp``: inputs [attn | mlp] local, out = hidden."""
    g = torch.Generator(device=device).manual_seed(0)
    hidden, k_attn, k_mlp = cfg.hidden_size, cfg.hidden_size // tp, cfg.mlp_hidden // tp

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)

    parts = [rand(1, tokens, k_attn), rand(1, tokens, k_mlp)]
    weight = rand(hidden, k_attn + k_mlp, scale=(k_attn + k_mlp) ** -0.5)
    return parts, weight, rand(1, hidden), rand(1, tokens, hidden)


def _gemm_chunks(parts, weight, gate, res, chunks, out, backend):
    for r0, r1 in chunks:
        row_parallel_matmul_forward(parts, weight, gate, res, True, out, (r0, r1), backend)


class _Link:
    """A side stream that spends ``seconds`` per transfer by copying a calibrated buffer."""

    def __init__(self, device: str, bus_gbps: float):
        self.device, self.bus_gbps = device, bus_gbps
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        src = torch.empty(2**28 if device == "cuda" else 2**22, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        self.copy_gbps = 2 * src.numel() / (median_ms(lambda: dst.copy_(src), device) * 1e-3) / 1e9
        self.buf_src, self.buf_dst = src, dst

    def transfer(self, nbytes: float) -> None:
        """Occupy the link for ``nbytes / bus_gbps`` seconds (a copy of that duration on the side stream)."""
        copy = int(min(self.buf_src.numel(), nbytes / self.bus_gbps * self.copy_gbps / 2))
        self.buf_dst[:copy].copy_(self.buf_src[:copy])


def simulate(parts, weight, gate, res, chunks, link: _Link, world_size: int, backend: str) -> dict:
    rows, n = parts[0].shape[1], weight.shape[0]
    out = torch.empty(rows, n, device=weight.device, dtype=weight.dtype)
    elt = out.element_size()
    device = link.device
    main = torch.cuda.current_stream() if device == "cuda" else None

    def compute_only():
        _gemm_chunks(parts, weight, gate, res, chunks, out, backend)

    def sequential():
        _gemm_chunks(parts, weight, gate, res, chunks, out, backend)
        for r0, r1 in chunks:
            link.transfer(ring_bytes((r1 - r0) * n * elt, world_size))

    def overlapped():
        if device != "cuda":  # CPU dry-run: no streams, same work
            return sequential()
        for r0, r1 in chunks:
            _gemm_chunks(parts, weight, gate, res, [(r0, r1)], out, backend)
            done = torch.cuda.Event()
            done.record(main)
            link.stream.wait_event(done)
            with torch.cuda.stream(link.stream):
                link.transfer(ring_bytes((r1 - r0) * n * elt, world_size))
        main.wait_stream(link.stream)

    t = {name: median_ms(fn, device) for name, fn in
         (("compute_ms", compute_only), ("sequential_ms", sequential), ("overlapped_ms", overlapped))}
    comm = t["sequential_ms"] - t["compute_ms"]
    t["exposed_comm"] = (t["overlapped_ms"] - t["compute_ms"]) / comm if comm > 0 else 0.0
    return t


def single_gpu(args, device, dtype, backend) -> list[dict]:
    rows = []
    token_pairs = [tuple(int(t) for t in p.split("+")) for p in args.tokens.split(",")]
    shapes = model_shapes(args.presets.split(","), [int(t) for t in args.tp.split(",")], token_pairs, args.dry_run)
    link = _Link(device, args.bus_gbps)
    for label, cfg, tp, tokens in shapes:
        parts, weight, gate, res = _layer_inputs(cfg, tp, tokens, device, dtype)
        n = weight.shape[0]
        out = torch.empty(tokens, n, device=device, dtype=dtype)
        one = median_ms(lambda: _gemm_chunks(parts, weight, gate, res, [(0, tokens)], out, backend), device)
        flops = 2 * tokens * n * weight.shape[1]
        msg = tokens * n * out.element_size()
        # the SM count RowParallelLinear(overlap="auto") schedules for on this device
        sched = wave_schedule(tokens, n, weight.shape[1], max(tp, 2), out.element_size(), _sm_count(weight.device))
        plans = [(str(c), chunk_bounds(tokens, c, AUTO_ROW_ALIGN if not args.dry_run else 1)) for c in (1, 2, 4)]
        plans.append(("wave", list(zip(sched.edges, sched.edges[1:]))))
        for name, chunks in plans:
            c = len(chunks)
            t_c = median_ms(lambda: _gemm_chunks(parts, weight, gate, res, chunks, out, backend), device)
            row = {"shape": label, "plan": name, "chunks": c, "auto": name == "wave", "gemm_1_ms": one,
                   "gemm_c_ms": t_c, "rows_per_chunk": [r1 - r0 for r0, r1 in chunks],
                   "chunk_overhead_pct": 100 * (t_c / one - 1), "tflops": flops / (t_c * 1e-3) / 1e12,
                   "message_mb": msg / 1e6,
                   "ring_comm_ms_est": ring_bytes(msg, max(tp, 2)) / (args.bus_gbps * 1e9) * 1e3}
            if c > 1:
                row.update(simulate(parts, weight, gate, res, chunks, link, max(tp, 2), backend))
            rows.append(row)
    return rows


SINGLE_COLUMNS = [("shape", "shape", ""), ("plan", "plan", ""), ("chunks", "C", "d"), ("gemm_1_ms", "GEMM ms", ".3f"),
                  ("gemm_c_ms", "C GEMMs ms", ".3f"), ("chunk_overhead_pct", "overhead %", ".1f"),
                  ("tflops", "TFLOP/s", ".1f"), ("message_mb", "msg MB", ".1f"),
                  ("ring_comm_ms_est", "ring AR ms", ".3f"), ("sequential_ms", "seq ms", ".3f"),
                  ("overlapped_ms", "ovl ms", ".3f"), ("exposed_comm", "exposed", ".2f")]


def distributed(args, dtype) -> list[dict]:
    """Under torchrun: RowParallelLinear with real collectives, compute-only vs sequential vs overlapped."""
    from tpfuse.tp_layers import RowParallelLinear

    rank, world, device = init_distributed(args.dry_run)
    rows = []
    token_pairs = [tuple(int(t) for t in p.split("+")) for p in args.tokens.split(",")]
    for label, cfg, _tp, tokens in model_shapes(args.presets.split(","), [world], token_pairs, args.dry_run):
        if cfg.heads % world or cfg.mlp_hidden % world:
            continue
        parts, weight, gate, res = _layer_inputs(cfg, world, tokens, device, dtype)
        k = weight.shape[1]
        layers = {}
        for name, overlap in (("sequential", 1), ("overlapped", "auto")):
            layer = RowParallelLinear(k * world, weight.shape[0], bias=False, overlap=overlap, device=device,
                                      dtype=dtype)
            with torch.no_grad():
                layer.weight.copy_(weight)
            layers[name] = layer
        kdev = "cuda" if device != "cpu" else "cpu"
        with torch.no_grad():
            t = {"compute_ms": median_ms(lambda: row_parallel_matmul_forward(
                parts, weight, gate, res, rank == 0, backend="torch" if args.dry_run else "triton"), kdev)}
            for name, layer in layers.items():
                t[f"{name}_ms"] = median_ms(lambda: layer.forward_fused(parts, gate, res), kdev)
        comm = t["sequential_ms"] - t["compute_ms"]
        t["exposed_comm"] = (t["overlapped_ms"] - t["compute_ms"]) / comm if comm > 0 else 0.0
        rows.append({"shape": label.replace("tp2", f"tp{world}"), "world_size": world,
                     "chunks": layers["overlapped"].last_chunks, **t})
    close_distributed()
    return rows if rank == 0 else []


DIST_COLUMNS = [("shape", "shape", ""), ("world_size", "N", "d"), ("chunks", "C", "d"),
                ("compute_ms", "compute ms", ".3f"), ("sequential_ms", "seq ms", ".3f"),
                ("overlapped_ms", "ovl ms", ".3f"), ("exposed_comm", "exposed", ".2f")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--distributed", action="store_true", help="under torchrun: real collectives")
    parser.add_argument("--presets", default="klein-4b,klein-9b,dev")
    parser.add_argument("--tp", default="2,4,8")
    parser.add_argument("--tokens", default="512+4096")
    parser.add_argument("--bus-gbps", type=float, default=360.0,
                        help="simulated all-reduce bus bandwidth, GB/s (NVLink-class NCCL busbw)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    backend = "torch" if args.dry_run else "triton"
    if args.distributed:
        rows, columns, name = distributed(args, dtype), DIST_COLUMNS, "overlap-distributed"
        if not rows:
            return 0
    else:
        rows, columns, name = single_gpu(args, device, dtype, backend), SINGLE_COLUMNS, "overlap"
    info = device_info(device)
    table = format_table(rows, columns)
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    if not args.distributed:
        print(f"simulated link: {args.bus_gbps:.0f} GB/s bus bandwidth; ring all-reduce volume 2(N-1)/N x message")
    print(table)
    path = write_results(name, {"info": info, "dry_run": args.dry_run, "bus_gbps": args.bus_gbps, "rows": rows},
                         table, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
