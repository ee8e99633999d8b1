"""A tensor-parallel scaling model for FLUX.2 on paper: predicted step time and speedup at TP 1/2/4/8.

Nobody here has a multi-GPU machine, so the scaling question is answered with arithmetic whose assumptions are
written down below, and checked against single-GPU measurements when ``bench/results/`` has them. Per block
(double- and single-stream) and for the whole transformer of klein-4B, klein-9B and dev, at 1024^2 and 2048^2
images (4,096 and 16,384 image tokens + 512 text tokens), on H100 SXM, H200 (NVLink) and L40S (PCIe):

* **GEMMs** in 128 x 128 output tiles: ``waves x time per wave`` on the GPU's SMs (1 CTA per SM, what
  ``tpfuse compile-report`` finds for the GEMM kernels), so wave quantization at high TP shows. Each SM runs its
  tile at ``GEMM_EFFICIENCY`` of the dense bf16 tensor-core peak, or at the rate ``bench/bench_kernels.py``
  measured (the best TFLOP/s of the fused GEMM kernels, the closest to a full wave) when a
  ``bench/results/kernels-*.json`` exists for that GPU.
* **Attention**: ``4 S^2 D`` FLOPs over the local heads at ``ATTENTION_EFFICIENCY`` of peak (FlashAttention-3
  reaches ~60% of H100's bf16 peak at head dim 128 and long sequences; FA2 on Ada ~45%), in waves of one CTA per
  (head, 128-query tile).
* **Memory-bound ops** (LayerNorm+modulate, the double block's joint QK-norm/RoPE and SwiGLU; the single block
  fuses the latter into its GEMM epilogue): bytes / (``COPY_EFFICIENCY`` x HBM bandwidth), at least
  ``MIN_KERNEL_US`` each. LayerNorm+modulate runs on the replicated activation: TP does not shrink it.
* **All-reduce** of each row-parallel output: ``alpha + 2 (N - 1) / N x bytes / busbw`` (ring) or with NVLink
  SHARP (NVLS, H100/H200 only) a higher bus bandwidth and lower latency. Bus bandwidths from published nccl-tests
  figures: 8 x H100 SXM5 NVLink busbw 460-480 GB/s at large sizes, 8 x H100 PCIe (no NVSwitch) 35-45 GB/s
  (Alaya NeW, "NCCL-tests in practice", 2026-05-06, https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests);
  ring at the tens-of-MB messages of a block: 360 GB/s (the figure tpfuse's overlap design uses); L40S has PCIe
  Gen4 x16 and no NVLink: half the PCIe Gen5 figure, 20 GB/s.
* **Exposed communication** under ``RowParallelLinear(overlap="auto")``'s chunk schedule
  (:func:`tpfuse.tp_layers.schedule.wave_schedule`): chunk i's all-reduce starts when its GEMM ends (and the
  previous all-reduce is done) and runs while chunk i+1 computes, which NCCL slows by ``OVERLAP_SLOWDOWN`` (its
  kernels take SMs); what runs past the last GEMM is exposed. The next op needs the reduced output, so nothing
  else hides it.
* **Hybrid** TP x Ulysses sequence parallelism on a 2-D mesh (tp x sp = 4 or 8 GPUs): each GPU holds S / sp
  tokens and D / tp of the weights; attention needs 4 all-to-alls (Q, K, V in, O out) of ``(S / sp) x (D / tp)``
  per GPU over the sp group, at the all-reduce bus bandwidth; TP all-reduces carry S / sp tokens; memory-bound ops
  shrink by sp.

Anchors (measured by others, FLUX.1, for comparison only): cache-dit's FLUX.1 TP on L20 (PCIe): 1.62x at 2 GPUs,
2.22x at 4; xDiT's Ulysses-4 FLUX.1: 2.63x.

``python bench/scaling_model.py`` writes ``bench/results/scaling-model.{json,md,png}`` in seconds on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import statistics
from pathlib import Path

from tpfuse.tp_layers.flux2.config import PRESETS  # needs `pip install .`, as every script in bench/
from tpfuse.tp_layers.schedule import COL_TILE, ROW_TILE, wave_schedule

RESULTS = Path(__file__).resolve().parent / "results"

# Assumptions (each a stated guess until a GPU measures it; see the module doc).
GEMM_EFFICIENCY = 0.70  # of the dense bf16 tensor-core peak, per SM running a 128 x 128 tile
ATTENTION_EFFICIENCY = {"H100 SXM": 0.60, "H200": 0.60, "L40S": 0.45}
COPY_EFFICIENCY = 0.80  # of the HBM/GDDR bandwidth for the memory-bound kernels
MIN_KERNEL_US = 2.0  # a memory-bound kernel's floor (launch + tail); CUDA graphs keep it this small
OVERLAP_SLOWDOWN = 0.10  # a GEMM sharing the GPU with an NCCL all-reduce runs this much slower
TEXT_TOKENS = 512
IMAGES = {"1024^2": 4096, "2048^2": 16384}  # image tokens: (side / 16)^2 (VAE /8, 2x2 patches)
TP_DEGREES = (1, 2, 4, 8)
ELEMENT = 2  # bf16


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    bf16_tflops: float  # dense tensor-core peak
    mem_gbps: float
    links: dict  # algorithm -> (busbw GB/s, latency us)
    match: str = ""  # a measurement's device name must contain this ...
    exclude: tuple = ()  # ... and none of these

    def measured_on(self, device: str) -> bool:
        return self.match in device and not any(x in device for x in self.exclude)


GPUS = [
    GPU("H100 SXM", 132, 989.0, 3350.0, {"ring": (360.0, 15.0), "nvls": (470.0, 10.0)}, "H100", ("PCIe", "NVL")),
    GPU("H200", 132, 989.0, 4800.0, {"ring": (360.0, 15.0), "nvls": (470.0, 10.0)}, "H200"),
    GPU("L40S", 142, 362.0, 864.0, {"ring": (20.0, 30.0)}, "L40S"),
]


MEASURED_DIRS = [RESULTS]  # where measurements are read from (--results adds one)


def _payloads(prefix: str, gpu: GPU):
    """Non-dry-run benchmark payloads ``<prefix>-*.json`` measured on ``gpu`` (matched by its name)."""
    for root in MEASURED_DIRS:
        for path in sorted(glob.glob(str(Path(root) / f"{prefix}-*.json"))):
            try:
                payload = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not payload.get("dry_run") and gpu.measured_on(payload.get("info", {}).get("device", "")):
                yield payload


def _measured_gemm_tflops(gpu: GPU) -> float | None:
    """The best TFLOP/s bench_kernels measured for the fused GEMM kernels on this GPU, if it ran: the model applies
    wave quantization itself, so it wants the full-wave rate, which the largest shapes come closest to (a median
    over all shapes would count their partial waves twice)."""
    values = [r["tflops"] for p in _payloads("kernels", gpu) for r in p.get("rows", [])
              if r.get("op") in ("fused_qkv_mlp_proj", "row_parallel_matmul") and r.get("tflops")]
    return max(values) if values else None


def _measured_chunk_overhead(gpu: GPU) -> float | None:
    """The median GEMM-time overhead bench_overlap measured for the wave schedule (a fraction), if it ran."""
    values = [r["chunk_overhead_pct"] / 100 for p in _payloads("overlap", gpu) for r in p.get("rows", [])
              if r.get("plan") == "wave" and r.get("chunks", 1) > 1 and "chunk_overhead_pct" in r]
    return statistics.median(values) if values else None


@dataclasses.dataclass
class Rates:
    gpu: GPU
    gemm_tflops: float  # whole-GPU rate of a full wave
    gemm_source: str
    algo: str
    chunk_overhead: float = 0.0  # extra GEMM time of a chunked row-parallel layer
    chunk_source: str = "assumed 0 (the schedule adds no waves)"

    @property
    def per_sm_flops(self) -> float:
        return self.gemm_tflops * 1e12 / self.gpu.sms


def rates_for(gpu: GPU, algo: str) -> Rates:
    measured = _measured_gemm_tflops(gpu)
    r = (Rates(gpu, measured, "measured (bench_kernels)", algo) if measured else
         Rates(gpu, GEMM_EFFICIENCY * gpu.bf16_tflops, f"assumed {GEMM_EFFICIENCY:.0%} of peak", algo))
    overhead = _measured_chunk_overhead(gpu)
    if overhead is not None:
        r.chunk_overhead, r.chunk_source = max(0.0, overhead), "measured (bench_overlap)"
    return r


# --------------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------------


def gemm_us(r: Rates, rows: int, out: int, k: int) -> float:
    """Waves x time per wave: each SM computes one 128 x 128 tile over K per wave."""
    if rows == 0 or out == 0 or k == 0:
        return 0.0
    tiles = math.ceil(rows / ROW_TILE) * math.ceil(out / COL_TILE)
    waves = math.ceil(tiles / r.gpu.sms)
    return waves * 2.0 * ROW_TILE * COL_TILE * k / r.per_sm_flops * 1e6


def attention_us(r: Rates, tokens: int, heads_local: int, head_dim: int) -> float:
    """FlashAttention over ``heads_local`` heads of the full sequence: one CTA per (head, 128-query tile), each
    ``4 x 128 x tokens x head_dim`` FLOPs, in waves over the SMs (3 heads x 36 tiles = 108 CTAs on 132 SMs: one
    wave, 82% busy)."""
    ctas = heads_local * math.ceil(tokens / ROW_TILE)
    waves = math.ceil(ctas / r.gpu.sms)
    per_sm = ATTENTION_EFFICIENCY[r.gpu.name] * r.gpu.bf16_tflops * 1e12 / r.gpu.sms
    return waves * 4.0 * ROW_TILE * tokens * head_dim / per_sm * 1e6


def memory_us(r: Rates, nbytes: float) -> float:
    return max(MIN_KERNEL_US, nbytes / (COPY_EFFICIENCY * r.gpu.mem_gbps * 1e9) * 1e6)


def allreduce_us(r: Rates, nbytes: float, n: int) -> float:
    if n == 1 or nbytes == 0:
        return 0.0
    busbw, alpha = r.gpu.links[r.algo]
    return alpha + 2.0 * (n - 1) / n * nbytes / (busbw * 1e9) * 1e6


def alltoall_us(r: Rates, nbytes_per_gpu: float, n: int) -> float:
    """An all-to-all where each GPU holds ``nbytes_per_gpu`` and sends (n-1)/n of it."""
    if n == 1:
        return 0.0
    busbw, alpha = r.gpu.links["ring"]
    return alpha + (n - 1) / n * nbytes_per_gpu / (busbw * 1e9) * 1e6


def row_layer(r: Rates, rows: int, out: int, k_local: int, n: int) -> dict:
    """A row-parallel layer under the wave-aligned chunk schedule: GEMM time, all-reduce time, exposed part."""
    if n == 1:
        g = gemm_us(r, rows, out, k_local)
        return {"gemm": g, "comm": 0.0, "exposed": 0.0, "chunks": 1}
    sched = wave_schedule(rows, out, k_local, n, ELEMENT, r.gpu.sms)
    gemm_end = comm_end = 0.0
    comm_total = gemm_total = 0.0
    chunked = 1.0 + (r.chunk_overhead if len(sched.rows) > 1 else 0.0)
    for i, rows_i in enumerate(sched.rows):
        g = gemm_us(r, rows_i, out, k_local) * chunked * (1 + OVERLAP_SLOWDOWN if i > 0 else 1.0)
        c = allreduce_us(r, rows_i * out * ELEMENT, n)
        gemm_end += g
        comm_end = max(gemm_end, comm_end) + c
        comm_total += c
        gemm_total += g
    return {"gemm": gemm_total, "comm": comm_total, "exposed": max(0.0, comm_end - gemm_end),
            "chunks": len(sched.rows)}


# --------------------------------------------------------------------------------------------------------------
# Blocks and the transformer
# --------------------------------------------------------------------------------------------------------------


def single_block(cfg, r: Rates, img: int, tp: int, sp: int = 1) -> dict:
    s = (img + TEXT_TOKENS) // sp  # tokens on this GPU
    d, m = cfg.hidden_size, cfg.mlp_hidden
    col = gemm_us(r, s, (3 * d + 2 * m) // tp, d)  # fused QKV + MLP-in, epilogue fused
    attn = attention_us(r, img + TEXT_TOKENS, cfg.heads // (tp * sp), cfg.head_dim)  # full sequence, local heads
    mem = memory_us(r, 2 * s * d * ELEMENT)  # LayerNorm + modulate: read x, write x
    row = row_layer(r, s, d, (d + m) // tp, tp)
    a2a = 4 * alltoall_us(r, s * d // tp * ELEMENT, sp)
    compute = col + attn + mem + row["gemm"]
    return {"compute": compute, "comm": row["comm"] + a2a, "exposed": row["exposed"] + a2a,
            "total": compute + row["exposed"] + a2a}


def double_block(cfg, r: Rates, img: int, tp: int, sp: int = 1) -> dict:
    d, m = cfg.hidden_size, cfg.mlp_hidden
    streams = [img // sp, TEXT_TOKENS // sp]
    s = sum(streams)
    compute = attention_us(r, img + TEXT_TOKENS, cfg.heads // (tp * sp), cfg.head_dim)
    comm = exposed = 0.0
    for rows in streams:
        compute += gemm_us(r, rows, 3 * d // tp, d) + gemm_us(r, rows, 2 * m // tp, d)  # QKV, MLP-in
        compute += 2 * memory_us(r, 2 * rows * d * ELEMENT)  # norm1 and norm2 (+ modulate)
        compute += memory_us(r, 3 * rows * m // tp * ELEMENT)  # SwiGLU: read gate and up, write
        for k in (d // tp, m // tp):  # attention out, MLP out
            row = row_layer(r, rows, d, k, tp)
            compute += row["gemm"]
            comm += row["comm"]
            exposed += row["exposed"]
    compute += memory_us(r, 2 * 3 * s * d // tp * ELEMENT)  # joint QK-norm + RoPE, V into the joint layout
    a2a = 4 * alltoall_us(r, s * d // tp * ELEMENT, sp)
    return {"compute": compute, "comm": comm + a2a, "exposed": exposed + a2a, "total": compute + exposed + a2a}


def transformer(cfg, r: Rates, img: int, tp: int, sp: int = 1) -> dict:
    dbl, sgl = double_block(cfg, r, img, tp, sp), single_block(cfg, r, img, tp, sp)
    total = cfg.num_layers * dbl["total"] + cfg.num_single_layers * sgl["total"]
    exposed = cfg.num_layers * dbl["exposed"] + cfg.num_single_layers * sgl["exposed"]
    comm = cfg.num_layers * dbl["comm"] + cfg.num_single_layers * sgl["comm"]
    return {"double_us": dbl["total"], "single_us": sgl["total"], "step_ms": total / 1e3,
            "comm_ms": comm / 1e3, "exposed_ms": exposed / 1e3}


def _fits(cfg, tp: int, sp: int = 1) -> bool:
    return cfg.heads % (tp * sp) == 0 and cfg.mlp_hidden % tp == 0


def model(presets=("klein-4b", "klein-9b", "dev"), gpus=GPUS) -> dict:
    rows, hybrid, limits = [], [], []
    for gpu in gpus:
        for algo in gpu.links:
            r = rates_for(gpu, algo)
            for name in presets:
                cfg = PRESETS[name]
                for image, img in IMAGES.items():
                    base = transformer(cfg, r, img, 1)
                    prev = None
                    stop = None
                    for tp in TP_DEGREES:
                        if not _fits(cfg, tp):
                            continue
                        t = transformer(cfg, r, img, tp)
                        speedup = base["step_ms"] / t["step_ms"]
                        rows.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image, "tp": tp,
                                     **{k: round(v, 3) for k, v in t.items()}, "speedup": round(speedup, 3),
                                     "efficiency": round(speedup / tp, 3), "gemm_rate": r.gemm_source,
                                     "chunk_overhead": r.chunk_source})
                        if prev is not None and stop is None and speedup / prev < 1.25:
                            stop = tp  # doubling the GPUs gives < 1.25x: TP has stopped scaling
                        prev = speedup
                    limits.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image,
                                   "tp_stops_scaling_at": stop})
                    for gpus_n in (4, 8):
                        for tp in (1, 2, 4, 8):
                            sp = gpus_n // tp
                            if tp * sp != gpus_n or not _fits(cfg, tp, sp):
                                continue
                            t = transformer(cfg, r, img, tp, sp)
                            hybrid.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image,
                                           "gpus": gpus_n, "tp": tp, "sp": sp, "step_ms": round(t["step_ms"], 3),
                                           "speedup": round(base["step_ms"] / t["step_ms"], 3)})
    return {"assumptions": {
        "gemm_efficiency": GEMM_EFFICIENCY, "attention_efficiency": ATTENTION_EFFICIENCY,
        "copy_efficiency": COPY_EFFICIENCY, "min_kernel_us": MIN_KERNEL_US, "overlap_slowdown": OVERLAP_SLOWDOWN,
        "text_tokens": TEXT_TOKENS, "image_tokens": IMAGES, "dtype": "bf16",
        "gpus": [dataclasses.asdict(g) for g in gpus],
        "sources": ["nccl-tests busbw: https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests",
                    "anchors: cache-dit FLUX.1 TP on L20 1.62x/2.22x at 2/4; xDiT Ulysses-4 FLUX.1 2.63x"],
        "measured": "GEMM rate (bench_kernels) and the schedule's chunking overhead (bench_overlap) from "
                    "bench/results when present (columns gemm_rate, chunk_overhead); everything else modelled",
    }, "rows": rows, "tp_limits": limits, "hybrid": hybrid}


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


def markdown(result: dict, gpu: str = "H100 SXM", algo: str = "ring") -> str:
    lines = [f"Predicted TP speedup over 1 GPU (whole transformer, one step, bf16; {gpu}, {algo} all-reduce; "
             "modelled, not measured):", "",
             "| model | image | TP 1 ms | TP 2 | TP 4 | TP 8 | exposed comm at TP 8 | TP stops scaling at |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    limits = {(x["model"], x["image"]): x["tp_stops_scaling_at"] for x in result["tp_limits"]
              if x["gpu"] == gpu and x["allreduce"] == algo}
    keyed = {(x["model"], x["image"], x["tp"]): x for x in result["rows"] if x["gpu"] == gpu and x["allreduce"] == algo}
    for name in dict.fromkeys(x["model"] for x in result["rows"]):
        for image in IMAGES:
            one = keyed.get((name, image, 1))
            if one is None:
                continue
            cells = [f"{keyed[(name, image, tp)]['speedup']:.2f}x" if (name, image, tp) in keyed else "-"
                     for tp in (2, 4, 8)]
            t8 = keyed.get((name, image, 8))
            exposed = f"{t8['exposed_ms'] / t8['step_ms']:.0%} of the step" if t8 else "-"
            lines.append(f"| {name} | {image} | {one['step_ms']:.0f} | {' | '.join(cells)} | {exposed} | "
                         f"{limits.get((name, image)) or 'beyond 8'} |")
    lines += ["", f"Hybrid TP x Ulysses on {gpu} ({algo}), speedup over 1 GPU:", "",
              "| model | image | GPUs | tp x sp | speedup |", "| --- | --- | --- | --- | --- |"]
    for h in result["hybrid"]:
        if h["gpu"] == gpu and h["allreduce"] == algo:
            lines.append(f"| {h['model']} | {h['image']} | {h['gpus']} | {h['tp']} x {h['sp']} | {h['speedup']:.2f}x |")
    lines += ["", "All GPUs and all-reduce algorithms, TP 8 speedup (1024^2 / 2048^2):", "",
              "| GPU | all-reduce | " + " | ".join(dict.fromkeys(x["model"] for x in result["rows"])) + " |",
              "| --- | --- |" + " --- |" * len(dict.fromkeys(x["model"] for x in result["rows"]))]
    combos = dict.fromkeys((x["gpu"], x["allreduce"]) for x in result["rows"])
    allk = {(x["gpu"], x["allreduce"], x["model"], x["image"], x["tp"]): x["speedup"] for x in result["rows"]}
    for g, a in combos:
        cells = []
        for name in dict.fromkeys(x["model"] for x in result["rows"]):
            vals = [allk.get((g, a, name, im, 8)) for im in IMAGES]
            cells.append(" / ".join("-" if v is None else f"{v:.2f}x" for v in vals))
        lines.append(f"| {g} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(dict.fromkeys((x["gpu"], x["allreduce"]) for x in result["rows"]))
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.8), sharey=True)
    for ax, (gpu, algo) in zip(axes, combos):
        for name in dict.fromkeys(x["model"] for x in result["rows"]):
            for image, style in zip(IMAGES, ("-", "--")):
                pts = [(x["tp"], x["speedup"]) for x in result["rows"]
                       if (x["gpu"], x["allreduce"], x["model"], x["image"]) == (gpu, algo, name, image)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{name} {image}")
        ax.plot(TP_DEGREES, TP_DEGREES, ":", color="grey", label="linear")
        ax.set_title(f"{gpu} ({algo})")
        ax.set_xlabel("TP degree")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TP_DEGREES, [str(t) for t in TP_DEGREES])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted speedup over TP 1")
    axes[-1].legend(fontsize=7)
    fig.suptitle("tpfuse FLUX.2 TP scaling model (modelled, not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "scaling-model"),
                        help="path stem: writes STEM.json, STEM.md and STEM.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--results", default=None,
                        help="also read GPU measurements (kernels-*.json, overlap-*.json) from this folder")
    args = parser.parse_args(argv)
    if args.results:
        MEASURED_DIRS.append(Path(args.results))
    result = model()
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text("# TP scaling model\n\n" + table)
    plotted = False
    if not args.no_plot:
        try:
            plot(result, stem.with_suffix(".png"))
            plotted = True
        except ImportError:  # the GPU image has no matplotlib: the JSON and the table still come out
            print("matplotlib missing: no plot (pip install matplotlib, or tpfuse's [bench] extra)")
    print(table)
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
