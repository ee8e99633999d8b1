"""Shared benchmark plumbing: timing, measured hardware peaks, shapes, and result files.

Timing on a GPU is ``triton.testing.do_bench`` (CUDA events, median of repeated runs after warm-up, L2 flushed
between runs). ``--dry-run`` runs the same code on tiny CPU shapes with ``time.perf_counter`` medians, so CI keeps
every benchmark path exercised; its numbers mean nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], object], device: str, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_ms_fixed(fn: Callable[[], object], device: str, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` over a FIXED number of calls: for code with collectives, where every rank
    must call ``fn`` equally often (``do_bench`` sizes its repetitions from a first estimate, which may differ
    between ranks, and a rank left waiting in a collective hangs until the process group's timeout). CUDA events
    around each call; no L2 flush between calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclasses.dataclass
class Peaks:
    """Measured on this device (not datasheet numbers): what the roofline percentages are relative to."""

    matmul_tflops: float  # bf16 dense GEMM, 8192^3
    copy_gbps: float  # device-to-device copy of 1 GiB, read + write bytes

    @classmethod
    def measure(cls, device: str, dry_run: bool) -> Peaks:
        n, size = (256, 2**22) if dry_run else (8192, 2**30)
        dtype = torch.float32 if dry_run else torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = median_ms(lambda: a @ b, device)
        tflops = 2 * n**3 / (ms * 1e-3) / 1e12
        src = torch.empty(size, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device)
        return cls(tflops, 2 * size / (ms * 1e-3) / 1e9)


def init_distributed(dry_run: bool) -> tuple[int, int, str]:
    """Under torchrun: the process group (gloo for a CPU dry-run, NCCL otherwise) and this rank's device.
    Returns ``(rank, world_size, device)``."""
    import datetime
    import os

    import torch.distributed as dist

    # Bounded: a rank that fails must not leave the others blocked in a collective for torch's default.
    dist.init_process_group("gloo" if dry_run else "nccl", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu" if dry_run else f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if device != "cpu":
        torch.cuda.set_device(device)
    return rank, world, device


def close_distributed() -> None:
    """The counterpart of :func:`init_distributed`: a barrier (no rank tears the group down while a peer's last
    async collective still runs), then the group destroyed."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_main(main) -> None:
    """``raise SystemExit(main())`` for a bench script's ``__main__``. A distributed dry run (gloo ranks under
    torchrun) leaves with ``os._exit`` once its output is flushed instead: at interpreter finalization gloo's worker
    threads can still hold tensors of finished async work and abort the process ("terminate called without an
    active exception", pytorch/pytorch#179291) after the results are written; the group is already destroyed."""
    import os
    import sys

    code = main()
    if "--distributed" in sys.argv and "--dry-run" in sys.argv:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def device_info(device: str) -> dict:
    info = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def model_shapes(presets, tps, token_pairs, dry_run: bool):
    """``(label, cfg, tp, tokens)`` for every preset, TP degree and (text, image) token count that shards."""
    from tpfuse.tp_layers import Flux2Config
    from tpfuse.tp_layers.flux2.config import preset_shapes

    if dry_run:
        cfg = Flux2Config(num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 8, 8, 8),
                          name="dry-run")
        return [("dry-run tp2 5+11", cfg, 2, 16)]
    return [(label, cfg, tp, txt + img) for label, cfg, tp, txt, img in preset_shapes(presets, tps, token_pairs)]


def write_results(name: str, payload: dict, table: str, out: str | None) -> Path:
    """``bench/results/<name>-<device>-<date>.json`` plus the same table as ``.md``."""
    info = payload["info"]
    if out is None:
        slug = "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")[:40] or "device"
        out = RESULTS / f"{name}-{slug}-{info['date'][:10]}.json"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = (f"# {name}\n\n{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}\n\n"
          f"```\n{table}\n```\n")
    # Written aside and renamed: a benchmark killed by a timeout while writing leaves the previous whole file.
    for target, text in ((path, json.dumps(payload, indent=2)), (path.with_suffix(".md"), md)):
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text)
        partial.replace(target)
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec); a missing value prints as ``-``."""
    def cell(row, key, spec):
        return format(row[key], spec) if row.get(key) is not None else "-"

    widths = [max([len(h)] + [len(cell(r, k, f)) for r in rows]) for k, h, f in columns]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    for r in rows:
        lines.append("  ".join(cell(r, k, f).rjust(w) for (k, _, f), w in zip(columns, widths)))
    return "\n".join(lines)


def flux2_block_inputs(cfg, txt: int, img: int, device, dtype) -> tuple:
    """Seeded inputs of one FLUX.2 block pair: ``(image, text, double-block img mod, txt mod, single-block mod,
    (cos, sin))`` for ``txt`` text and ``img`` image tokens (bench_compile and bench_model time the same blocks)."""
    import torch

    from tpfuse.tp_layers.flux2 import rope_cos_sin
    from tpfuse.tp_layers.verify import position_ids

    g = torch.Generator().manual_seed(1)
    dim = cfg.hidden_size

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device, dtype)

    cos, sin = rope_cos_sin(position_ids(txt, img), cfg.axes_dims_rope, cfg.rope_theta)
    return (rand(1, img, dim), rand(1, txt, dim), rand(1, 6 * dim, scale=0.1), rand(1, 6 * dim, scale=0.1),
            rand(1, 3 * dim, scale=0.1), (cos.to(device), sin.to(device)))
