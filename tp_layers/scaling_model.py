"""A tensor-parallel scaling model for FLUX.2 and Qwen-Image on paper: predicted step time and speedup at TP 1/2/4/8.

Nobody here has a multi-GPU machine, so the scaling question is answered with arithmetic whose assumptions are
written down below, and checked against single-GPU measurements when ``bench/results/`` has them. Per block
(double- and single-stream) and for the whole transformer of klein-4B, klein-9B, dev and Qwen-Image (60 two-stream
blocks, no single-stream ones), at 1024^2 and 2048^2 images (4,096 and 16,384 image tokens + 512 text tokens), on
H100 SXM, H200 (NVLink) and L40S (PCIe):

* **GEMMs** in 128 x 128 output tiles: ``waves x time per wave`` on the GPU's SMs (``ceil(tiles / SMs)`` tiles per
  SM: the row-parallel GEMM runs 1 CTA per SM, the fused projections 2, as ``tpfuse compile-report`` finds), so
  wave quantization at high TP shows. Each SM runs its
  tile at ``GEMM_EFFICIENCY`` of the dense bf16 tensor-core peak, or at the rate ``bench/bench_kernels.py``
  measured (the best TFLOP/s of the fused GEMM kernels, the closest to a full wave) when a
  ``bench/results/kernels-*.json`` exists for that GPU.
* **Attention**: ``4 S^2 D`` FLOPs over the local heads at ``ATTENTION_EFFICIENCY`` of peak (FlashAttention-3
  reaches ~60% of H100's bf16 peak at head dim 128 and long sequences; FA2 on Ada ~45%), in waves of one CTA per
  (head, 128-query tile).
* **Memory-bound ops**: bytes / (``COPY_EFFICIENCY`` x HBM bandwidth), at least ``MIN_KERNEL_US`` each.
  LayerNorm+modulate runs on the replicated activation: TP does not shrink it. A GEMM's own output write is under
  its compute time here (D >= 3,072 FLOPs per output byte), so what fusing an epilogue saves is the separate pass
  that reads the output back.
* **The two-stream (double) block**, three accountings (``ACCOUNTINGS``; ``--accounting``):

  - ``after`` (tpfuse now, issue 23): per stream one Q/K/V GEMM whose epilogue does the QK-norm + RoPE and writes
    head-major into the joint Q/K/V (``joint_qkv_proj``), and the feed-forward's ``linear_in`` with the SwiGLU
    (FLUX.2) or GELU(tanh) (Qwen-Image) epilogue (``fused_linear_act``): no memory-bound pass but the 4
    LayerNorm+modulates. The image and text streams' row-parallel outputs are reduced together
    (``tp_layers/joint_row.py``): one all-reduce of ``[img + txt tokens, D]`` for the two attention
    out-projections and one for the two feed-forward outputs, chunked on the wave schedule of the JOINT row count
    (image rows first, as the blocks order them); a chunk that spans both streams is ONE launch over both streams'
    row tiles (``row_parallel_matmul_segments_triton``), so it fills whole waves. 2 all-reduces per block.
  - ``before`` (the accounting this model had before issue 23's fusion, unchanged so the saving can be shown):
    plain per-stream GEMMs, a joint QK-norm/RoPE pass reading and writing Q/K/V (``qk_norm_rope_joint``), the
    activation as a pass over the ``[tokens, 2M/N]`` gate|up (SwiGLU, one pass counted; the eager code ran two,
    ``silu`` then ``mul``, so "before" is if anything optimistic) or ``[tokens, M/N]`` (GELU), and each stream's
    two row-parallel layers reduced on their own: 4 all-reduces per block, the text stream's (512 tokens, 3 MiB
    at D = 3,072) one unchunked, latency-bound message each.
  - ``per-stream``: the fused projections of ``after`` with the 4 per-stream reductions of ``before``: Qwen-Image's
    last block (its text output is dropped, so it reduces the streams one by one), and the reductions' share of
    the saving.

  The fused projections run 2 CTAs per SM (``kernels/fused_qkv_mlp_proj.py``): the tiles per SM, and so the wave
  quantization below, are the same as at 1 CTA per SM; the second CTA hides the epilogue, so they run at the GEMM
  rate. Qwen-Image's blocks each carry their own adaLN (``img_mod``/``txt_mod``, ``D -> 6D``, column-parallel): a
  GEMV reading ``6 D^2 / N`` weights per stream and an all-gather of ``[B, 6D]`` per stream (latency-bound,
  exposed), in both accountings. FLUX.2's modulation is shared by all blocks (outside them).
* **All-reduce** of each row-parallel output: ``alpha + 2 (N - 1) / N x bytes / busbw`` (ring) or with NVLink
  SHARP (NVLS, H100/H200 only) a higher bus bandwidth and lower latency. Bus bandwidths from published nccl-tests
  figures: 8 x H100 SXM5 NVLink busbw 460-480 GB/s at large sizes, 8 x H100 PCIe (no NVSwitch) 35-45 GB/s
  (Alaya NeW, "NCCL-tests in practice", 2026-05-06, https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests);
  ring at the tens-of-MB messages of a block: 360 GB/s (the figure tpfuse's overlap design uses); L40S has PCIe
  Gen4 x16 and no NVLink: half the PCIe Gen5 figure, 20 GB/s. All-gathers and all-to-alls: ``alpha + (N - 1) / N x
  bytes / busbw`` (ring latency and bandwidth).
* **Exposed communication** under ``RowParallelLinear(overlap="auto")``'s chunk schedule
  (:func:`tpfuse.tp_layers.schedule.wave_schedule`): chunk i's all-reduce starts when its GEMM ends (and the
  previous all-reduce is done) and runs while chunk i+1 computes, which NCCL slows by ``OVERLAP_SLOWDOWN`` (its
  kernels take SMs); what runs past the last GEMM is exposed. The next op needs the reduced output, so nothing
  else hides it.
* **Hybrid** TP x Ulysses sequence parallelism on a 2-D mesh (tp x sp = 4 or 8 GPUs): each GPU holds S / sp tokens and
  D / tp of the weights; attention needs 2 all-to-alls (Q, K, V together in, O out) moving 4 x ``(S / sp) x (D / tp)``
  per GPU over the sp group, at the all-reduce bus bandwidth; TP all-reduces carry S / sp tokens; memory-bound ops
  shrink by sp.


* **Meshes** (issue 24, ``--meshes``; :func:`meshes`, :func:`best_mesh`): every factorization ``dp x cfg x sp x tp``
  of 2/4/8 GPUs on one node and of 2/4/8/16 GPUs on two nodes (a node is an HGX board of at most ``GPUS_PER_NODE`` = 8
  GPUs on NVLink/NVSwitch; 16 GPUs on one node is not swept). The dims lie on the ranks outer to inner
  (``init_device_mesh``'s row-major order): tp innermost (consecutive ranks, inside a node while ``tp <= 8``), then
  sp, then cfg, then dp outermost, so the outer dims are the ones that span nodes. Rules: heads divide by ``tp x sp``,
  the MLP width by tp, the tokens by sp. **Between nodes** (an assumption: 400 Gb/s InfiniBand/RoCE per GPU, one NIC
  per GPU, as on DGX/HGX H100): ``INTER_NODE_GBPS`` = 50 GB/s per GPU each way, ``INTER_NODE_LATENCY_US`` = 30 us per
  collective; a group that spans nodes pays them: an all-reduce is a ring through every GPU's NIC, bottlenecked by the
  slowest link (``alpha + 2 (n - 1) / n x bytes / 50 GB/s``, no NVLS), an all-to-all or all-gather sends the part
  bound for other nodes (``(n - m) / n`` of the bytes, ``m`` group members per node) through the NIC at 50 GB/s while
  the part for the own node goes over NVLink. tp: the block's all-reduces (``tokens / sp`` rows); sp: the 2 all-to-
  alls per attention (Q/K/V in one, O); every step the sp group all-gathers the transformer's sequence-sharded output
  (``[image tokens, out channels]``), a cfg group the cond/uncond outputs (the guidance combine), a dp group the
  batch's outputs (a parallelized transformer returns the whole batch: every step; small). **cfg** exists only for a
  classifier-free-guidance pipeline (``guidance=True``: 2 forwards per step, cond and uncond): cfg = 2 runs one on
  each half of the GPUs with no communication but that gather; a (sp, tp) group running both runs them back to back (2
  x its batch-1 time: the model does not let the two share GEMM waves). **dp** splits a batch of independent requests:
  each dp group serves one request on the remaining mesh, so a request's latency is that mesh's and ``dp`` requests
  are in flight. Two figures per mesh: ``speedup`` = one GPU's step time for one request / the mesh's (the latency a
  user waiting for one image sees) and ``throughput_speedup`` = ``dp x speedup`` (requests per second against one GPU
  serving one request at a time, when at least ``dp`` requests are waiting). **"Best" ranks by latency**: the lowest
  per-request step time; among meshes within ``TIE`` (2%) of it, the one with the most requests in flight (dp) wins,
  so GPUs that would buy a request no latency serve more requests instead. By throughput alone pure dp would always
  win (no communication) wherever the weights fit on one GPU.

Anchors (measured by others, FLUX.1, for comparison only): cache-dit's FLUX.1 TP on L20 (PCIe): 1.62x at 2 GPUs,
2.22x at 4; xDiT's Ulysses-4 FLUX.1: 2.63x.

This module is the model (pure arithmetic, no torch): ``tpfuse plan`` (:mod:`tpfuse.tp_layers.plan`) predicts
its step times with it, so it ships in the package. Its command line, the plot and the default results folder
live in ``bench/scaling_model.py``: ``python bench/scaling_model.py`` writes
``bench/results/scaling-model.{json,md,png}`` in seconds on a CPU; ``--meshes`` writes
``bench/results/scaling-model-meshes.{json,md}`` (``--gpu``, ``--algo``: H100 SXM, ring). Measured rates are read
from the folders in :data:`MEASURED_DIRS`: none here (an installed tpfuse has no ``bench/results``, so
``tpfuse plan`` uses the stated assumptions); the bench script adds ``bench/results`` and ``--results``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import statistics
from pathlib import Path

from .flux2.config import PRESETS
from .schedule import COL_TILE, ROW_TILE, wave_schedule

__all__ = [
    # assumptions and constants
    "GEMM_EFFICIENCY", "ATTENTION_EFFICIENCY", "COPY_EFFICIENCY", "MIN_KERNEL_US", "OVERLAP_SLOWDOWN", "TEXT_TOKENS",
    "IMAGES", "TP_DEGREES", "ELEMENT", "GPUS_PER_NODE", "INTER_NODE_GBPS", "INTER_NODE_LATENCY_US", "MESH_DIMS",
    "MESH_SWEEP", "TIE", "GPU", "GPUS", "Shape", "QWEN_IMAGE", "MODELS", "ACCOUNTINGS", "MEASURED_DIRS", "Rates",
    # pieces, blocks, the transformer
    "rates_for", "gemm_us", "attention_us", "memory_us", "allreduce_us", "ulysses_us", "alltoall_us", "allgather_us",
    "joint_row_layer", "row_layer", "single_block", "double_block", "transformer", "double_blocks", "model",
    # meshes
    "mesh_name", "group_nodes", "factorizations", "mesh_step", "meshes", "best_mesh", "mesh_sweep",
    # output
    "markdown", "double_block_table", "mesh_markdown",
]

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
# Meshes across nodes (see the module doc).
GPUS_PER_NODE = 8  # an HGX H100/H200 board: 8 GPUs on NVSwitch
INTER_NODE_GBPS = 50.0  # 400 Gb/s per GPU (one NIC each), each way
INTER_NODE_LATENCY_US = 30.0  # per collective that spans nodes
MESH_DIMS = ("dp", "cfg", "sp", "tp")  # outer to inner, as on the ranks
MESH_SWEEP = ((2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (8, 2), (16, 2))  # (GPUs, nodes)
TIE = 0.02  # meshes within 2% of the lowest latency count as equally fast: the one with more dp wins


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


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the model needs of a transformer: widths, block counts, the feed-forward's activation."""

    name: str
    hidden_size: int
    heads: int
    head_dim: int
    mlp_hidden: int  # M: the feed-forward's hidden width (one SwiGLU half for a gated MLP)
    num_layers: int  # two-stream (double) blocks
    num_single_layers: int
    gated: bool = True  # SwiGLU: linear_in is [gate | up], 2M wide; GELU(tanh): M wide
    block_adaln: bool = False  # each block computes its own modulation (Qwen-Image's img_mod/txt_mod)
    last_block_per_stream: bool = False  # the last block reduces its streams one by one (Qwen-Image)
    out_channels: int = 128  # the transformer's output per image token (what the sp/cfg/dp gathers move)

    @classmethod
    def from_flux2(cls, name: str) -> Shape:
        cfg = PRESETS[name]
        return cls(name, cfg.hidden_size, cfg.heads, cfg.head_dim, cfg.mlp_hidden, cfg.num_layers,
                   cfg.num_single_layers, out_channels=cfg.in_channels)


# Qwen-Image (20B; Qwen/Qwen-Image's transformer config, diffusers' QwenImageTransformer2DModel defaults): 60
# two-stream blocks of 24 heads x 128, a GELU(tanh) MLP 4 x 3,072 wide (not gated), biased linears, per-block adaLN.
QWEN_IMAGE = Shape("qwen-image", 3072, 24, 128, 4 * 3072, 60, 0, gated=False, block_adaln=True,
                   last_block_per_stream=True, out_channels=64)
MODELS = {**{name: Shape.from_flux2(name) for name in ("klein-4b", "klein-9b", "dev")}, QWEN_IMAGE.name: QWEN_IMAGE}

# The double block's accountings (see the module doc): (fused projections, joint reductions).
ACCOUNTINGS = {"after": (True, True), "per-stream": (True, False), "before": (False, False)}

# Where measurements (kernels-*.json, overlap-*.json) are read from: none in the package (an installed tpfuse
# ships no bench/results); bench/scaling_model.py adds bench/results, and --results one more.
MEASURED_DIRS: list = []


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
    tp_nodes: int = 1  # nodes one tp group spans (its all-reduces and all-gathers cross them when > 1)
    sp_nodes: int = 1  # nodes one sp group spans (its all-to-alls)

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


def allreduce_us(r: Rates, nbytes: float, n: int, nodes: int | None = None) -> float:
    """A tp group's all-reduce (``nodes``: the nodes it spans, ``r.tp_nodes`` unless given)."""
    if n == 1 or nbytes == 0:
        return 0.0
    busbw, alpha = r.gpu.links[r.algo]
    if (r.tp_nodes if nodes is None else nodes) > 1:  # a ring through every GPU's NIC: the slowest link sets the
        # pace; NVLS (NVLink SHARP) does not reach across nodes
        busbw, alpha = min(r.gpu.links["ring"][0], INTER_NODE_GBPS), INTER_NODE_LATENCY_US
    return alpha + 2.0 * (n - 1) / n * nbytes / (busbw * 1e9) * 1e6


def ulysses_us(r: Rates, nbytes_per_gpu: float, n: int) -> float:
    """One attention's Ulysses exchange (tpfuse's ``SequenceParallel``): Q, K and V in ONE all-to-all (3x the
    bytes, one latency), the output back in a second."""
    return alltoall_us(r, 3 * nbytes_per_gpu, n) + alltoall_us(r, nbytes_per_gpu, n)


def alltoall_us(r: Rates, nbytes_per_gpu: float, n: int, nodes: int | None = None) -> float:
    """An all-to-all where each GPU holds ``nbytes_per_gpu`` and sends (n-1)/n of it; over ``nodes`` nodes
    (``r.sp_nodes`` unless given) the part bound for other nodes goes through the GPU's NIC while the rest crosses
    NVLink."""
    if n == 1:
        return 0.0
    busbw, alpha = r.gpu.links["ring"]
    nodes = r.sp_nodes if nodes is None else nodes
    if nodes <= 1:
        return alpha + (n - 1) / n * nbytes_per_gpu / (busbw * 1e9) * 1e6
    m = n // nodes  # group members on this GPU's node
    inside = (m - 1) / n * nbytes_per_gpu / (busbw * 1e9)
    outside = (n - m) / n * nbytes_per_gpu / (min(busbw, INTER_NODE_GBPS) * 1e9)
    return INTER_NODE_LATENCY_US + max(inside, outside) * 1e6


def allgather_us(r: Rates, nbytes: float, n: int, nodes: int | None = None) -> float:
    """An all-gather whose gathered result is ``nbytes``: each GPU receives (n-1)/n of it (over ``nodes`` nodes,
    ``r.tp_nodes`` unless given: the tp group's all-gathers)."""
    return alltoall_us(r, nbytes, n, r.tp_nodes if nodes is None else nodes)


def joint_row_layer(r: Rates, streams, out: int, k_local: int, n: int) -> dict:
    """Row-parallel layers of several streams (rows ``streams``, in the buffer's order) reduced as ONE all-reduce
    (``tp_layers/joint_row.py``), chunked on the wave schedule of the joint row count: chunk i's GEMM is one launch
    over the rows of every stream it covers, its all-reduce runs while chunk i+1 computes; GEMM time, all-reduce time,
    exposed part. One stream: :func:`row_layer`."""
    rows = sum(streams)
    starts = [sum(streams[:i]) for i in range(len(streams))]

    def gemm(r0: int, r1: int) -> float:  # the joint rows [r0, r1): ONE launch over every stream's piece, each
        # piece's rows in whole row tiles (row_parallel_matmul_segments_triton puts both in one grid)
        pieces = [max(0, min(r1, a + s) - max(r0, a)) for a, s in zip(starts, streams)]
        if sum(1 for p in pieces if p) <= 1:
            return gemm_us(r, sum(pieces), out, k_local)
        return gemm_us(r, sum(math.ceil(p / ROW_TILE) * ROW_TILE for p in pieces), out, k_local)

    if n == 1:
        return {"gemm": gemm(0, rows), "comm": 0.0, "exposed": 0.0, "chunks": 1, "allreduces": 0}
    edges = wave_schedule(rows, out, k_local, n, ELEMENT, r.gpu.sms).edges
    gemm_end = comm_end = 0.0
    comm_total = gemm_total = 0.0
    chunked = 1.0 + (r.chunk_overhead if len(edges) > 2 else 0.0)
    for i, (r0, r1) in enumerate(zip(edges, edges[1:])):
        g = gemm(r0, r1) * chunked * (1 + OVERLAP_SLOWDOWN if i > 0 else 1.0)
        c = allreduce_us(r, (r1 - r0) * out * ELEMENT, n)
        gemm_end += g
        comm_end = max(gemm_end, comm_end) + c
        comm_total += c
        gemm_total += g
    return {"gemm": gemm_total, "comm": comm_total, "exposed": max(0.0, comm_end - gemm_end),
            "chunks": len(edges) - 1, "allreduces": 1}


def row_layer(r: Rates, rows: int, out: int, k_local: int, n: int) -> dict:
    """A row-parallel layer under the wave-aligned chunk schedule: GEMM time, all-reduce time, exposed part."""
    return joint_row_layer(r, [rows], out, k_local, n)


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
    a2a = ulysses_us(r, s * d // tp * ELEMENT, sp)
    compute = col + attn + mem + row["gemm"]
    return {"compute": compute, "comm": row["comm"] + a2a, "exposed": row["exposed"] + a2a,
            "total": compute + row["exposed"] + a2a, "allreduces": row["allreduces"]}


def double_block(cfg, r: Rates, img: int, tp: int, sp: int = 1, accounting: str = "after") -> dict:
    """One two-stream block under ``accounting`` (``ACCOUNTINGS``: "after" = fused projections and 2 joint
    all-reduces; "before" = this model's accounting before issue 23, 4 per-stream all-reduces; "per-stream")."""
    fused, joint = ACCOUNTINGS[accounting]
    d, m = cfg.hidden_size, cfg.mlp_hidden
    mlp_in = 2 * m if cfg.gated else m  # linear_in's width: [gate | up] or the GELU input
    streams = [img // sp, TEXT_TOKENS // sp]  # image rows first, as the joint buffer holds them
    s = sum(streams)
    compute = attention_us(r, img + TEXT_TOKENS, cfg.heads // (tp * sp), cfg.head_dim)
    comm = exposed = 0.0
    allreduces = 0
    for rows in streams:
        # Q/K/V and linear_in: plain GEMMs (before) or the fused projections (joint_qkv_proj, fused_linear_act:
        # norm + RoPE, the activation in the epilogue); the same tiles either way.
        compute += gemm_us(r, rows, 3 * d // tp, d) + gemm_us(r, rows, mlp_in // tp, d)
        compute += 2 * memory_us(r, 2 * rows * d * ELEMENT)  # norm1 and norm2 (+ modulate)
        if not fused:  # the activation pass: SwiGLU reads gate and up and writes; GELU reads and writes
            compute += memory_us(r, (3 if cfg.gated else 2) * rows * m // tp * ELEMENT)
    if not fused:
        compute += memory_us(r, 2 * 3 * s * d // tp * ELEMENT)  # joint QK-norm + RoPE, V into the joint layout
    for k in (d // tp, m // tp):  # attention out, MLP out
        layers = [joint_row_layer(r, streams, d, k, tp)] if joint else [row_layer(r, rows, d, k, tp)
                                                                       for rows in streams]
        for row in layers:
            compute += row["gemm"]
            comm += row["comm"]
            exposed += row["exposed"]
            allreduces += row["allreduces"]
    if cfg.block_adaln:  # per stream: the [B, D] x [6D/N, D] GEMV (a weight read) and the [B, 6D] all-gather
        compute += 2 * memory_us(r, 6 * d * d // tp * ELEMENT)
        gather = 2 * allgather_us(r, 6 * d * ELEMENT, tp)
        comm += gather
        exposed += gather
    a2a = ulysses_us(r, s * d // tp * ELEMENT, sp)
    return {"compute": compute, "comm": comm + a2a, "exposed": exposed + a2a, "total": compute + exposed + a2a,
            "allreduces": allreduces}


def transformer(cfg, r: Rates, img: int, tp: int, sp: int = 1, accounting: str = "after") -> dict:
    dbl, sgl = double_block(cfg, r, img, tp, sp, accounting), single_block(cfg, r, img, tp, sp)
    blocks = [(cfg.num_layers, dbl), (cfg.num_single_layers, sgl)]
    if cfg.last_block_per_stream and cfg.num_layers and accounting == "after":
        # the last block's text output is dropped: it reduces its streams one by one (4 all-reduces)
        blocks = [(cfg.num_layers - 1, dbl), (1, double_block(cfg, r, img, tp, sp, "per-stream")),
                  (cfg.num_single_layers, sgl)]
    total, exposed, comm = (sum(n * b[key] for n, b in blocks) for key in ("total", "exposed", "comm"))
    return {"double_us": dbl["total"], "single_us": sgl["total"] if cfg.num_single_layers else 0.0,
            "step_ms": total / 1e3, "comm_ms": comm / 1e3, "exposed_ms": exposed / 1e3,
            "allreduces": sum(n * b["allreduces"] for n, b in blocks)}


def _fits(cfg, tp: int, sp: int = 1) -> bool:
    return cfg.heads % (tp * sp) == 0 and cfg.mlp_hidden % tp == 0


def double_blocks(cfg, r: Rates, img: int, tp: int) -> dict:
    """One two-stream block under every accounting, flattened: ``{f"{key}_{accounting}": value}``; and the text
    stream's ``[512, D]`` all-reduce on its own against what its rows add to a joint one (bandwidth only)."""
    out = {}
    for accounting in ACCOUNTINGS:
        b = double_block(cfg, r, img, tp, accounting=accounting)
        out.update({f"{k}_{accounting}": (round(v, 3) if isinstance(v, float) else v) for k, v in b.items()})
    nbytes = TEXT_TOKENS * cfg.hidden_size * ELEMENT
    alone = allreduce_us(r, nbytes, tp)
    out["text_allreduce_alone_us"] = round(alone, 3)
    out["text_allreduce_in_joint_us"] = round(alone - r.gpu.links[r.algo][1], 3) if tp > 1 else 0.0
    return out


def model(presets=tuple(MODELS), gpus=GPUS, accounting: str = "after") -> dict:
    """Every GPU x all-reduce algorithm x model x image x TP degree. ``rows`` (the whole transformer under
    ``accounting``, with the step time under "before" alongside), ``tp_limits``, ``hybrid`` (TP x Ulysses) and
    ``double_blocks`` (one two-stream block under every accounting)."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {sorted(ACCOUNTINGS)}, got {accounting!r}")
    rows, hybrid, limits, doubles = [], [], [], []
    for gpu in gpus:
        for algo in gpu.links:
            r = rates_for(gpu, algo)
            for name in presets:
                cfg = MODELS[name]
                for image, img in IMAGES.items():
                    base = transformer(cfg, r, img, 1, accounting=accounting)
                    base_before = transformer(cfg, r, img, 1, accounting="before")
                    prev = None
                    stop = None
                    for tp in TP_DEGREES:
                        if not _fits(cfg, tp):
                            continue
                        t = transformer(cfg, r, img, tp, accounting=accounting)
                        before = transformer(cfg, r, img, tp, accounting="before")
                        speedup = base["step_ms"] / t["step_ms"]
                        rows.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image, "tp": tp,
                                     **{k: round(v, 3) for k, v in t.items()}, "speedup": round(speedup, 3),
                                     "efficiency": round(speedup / tp, 3), "accounting": accounting,
                                     "step_ms_before": round(before["step_ms"], 3),
                                     "speedup_before": round(base_before["step_ms"] / before["step_ms"], 3),
                                     "gemm_rate": r.gemm_source, "chunk_overhead": r.chunk_source})
                        if cfg.num_layers:
                            doubles.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image,
                                            "tp": tp, **double_blocks(cfg, r, img, tp)})
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
                            t = transformer(cfg, r, img, tp, sp, accounting=accounting)
                            hybrid.append({"gpu": gpu.name, "allreduce": algo, "model": name, "image": image,
                                           "gpus": gpus_n, "tp": tp, "sp": sp, "step_ms": round(t["step_ms"], 3),
                                           "speedup": round(base["step_ms"] / t["step_ms"], 3)})
    return {"assumptions": {
        "gemm_efficiency": GEMM_EFFICIENCY, "attention_efficiency": ATTENTION_EFFICIENCY,
        "copy_efficiency": COPY_EFFICIENCY, "min_kernel_us": MIN_KERNEL_US, "overlap_slowdown": OVERLAP_SLOWDOWN,
        "text_tokens": TEXT_TOKENS, "image_tokens": IMAGES, "dtype": "bf16", "accounting": accounting,
        "double_block_accountings": {
            "after": "fused projections (joint_qkv_proj, fused_linear_act), 2 joint all-reduces per block",
            "per-stream": "fused projections, 4 per-stream all-reduces (Qwen-Image's last block)",
            "before": "plain GEMMs + QK-norm/RoPE and activation passes, 4 per-stream all-reduces (pre issue 23)"},
        "models": {name: dataclasses.asdict(MODELS[name]) for name in presets},
        "gpus": [dataclasses.asdict(g) for g in gpus],
        "sources": ["nccl-tests busbw: https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests",
                    "anchors: cache-dit FLUX.1 TP on L20 1.62x/2.22x at 2/4; xDiT Ulysses-4 FLUX.1 2.63x"],
        "measured": "GEMM rate (bench_kernels) and the schedule's chunking overhead (bench_overlap) from "
                    "bench/results when present (columns gemm_rate, chunk_overhead); everything else modelled",
    }, "rows": rows, "tp_limits": limits, "hybrid": hybrid, "double_blocks": doubles}


# --------------------------------------------------------------------------------------------------------------
# Meshes: dp x cfg x sp x tp on one or two nodes
# --------------------------------------------------------------------------------------------------------------


def mesh_name(mesh: dict) -> str:
    """``{"dp": 2, "cfg": 1, "sp": 2, "tp": 2}`` -> ``"dp2 x sp2 x tp2"`` (dims of size 1 left out)."""
    return " x ".join(f"{d}{mesh[d]}" for d in MESH_DIMS if mesh.get(d, 1) > 1) or "1 GPU"


def group_nodes(size: int, stride: int, per_node: int) -> int:
    """The nodes one group of a mesh dim spans: ``size`` ranks ``stride`` apart, ``per_node`` ranks per node."""
    return len({i * stride // per_node for i in range(size)})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(cfg: Shape, img: int, gpus: int, guidance: bool = False) -> list[dict]:
    """Every ``{dp, cfg, sp, tp}`` whose product is ``gpus`` and that shards ``cfg``: heads divide by tp x sp, the
    MLP width by tp, image and text tokens by sp; cfg is 1, or 2 for a guidance pipeline."""
    out = []
    for tp in _divisors(gpus):
        for sp in _divisors(gpus // tp):
            for cfg_n in ((1, 2) if guidance else (1,)):
                if (gpus // (tp * sp)) % cfg_n:
                    continue
                if not _fits(cfg, tp, sp) or img % sp or TEXT_TOKENS % sp:
                    continue
                out.append({"dp": gpus // (tp * sp * cfg_n), "cfg": cfg_n, "sp": sp, "tp": tp})
    return out


_TRANSFORMER_CACHE: dict = {}


def _transformer_cached(cfg: Shape, r: Rates, img: int, tp: int, sp: int) -> dict:
    key = (cfg, r.gpu.name, r.algo, r.gemm_tflops, r.chunk_overhead, r.tp_nodes, r.sp_nodes, img, tp, sp)
    if key not in _TRANSFORMER_CACHE:
        _TRANSFORMER_CACHE[key] = transformer(cfg, r, img, tp, sp)
    return _TRANSFORMER_CACHE[key]


def _gpu(name: str) -> GPU:
    for g in GPUS:
        if g.name == name:
            return g
    raise ValueError(f"gpu must be one of {[g.name for g in GPUS]}, got {name!r}")


def _image_tokens(image) -> tuple[str, int]:
    if isinstance(image, int):
        return f"{image} tokens", image
    if image not in IMAGES:
        raise ValueError(f"image must be one of {list(IMAGES)} or a token count, got {image!r}")
    return image, IMAGES[image]


def mesh_step(cfg: Shape, r: Rates, img: int, mesh: dict, gpus_per_node: int, guidance: bool = False) -> dict:
    """One denoising step of one request on ``mesh`` (``{dp, cfg, sp, tp}``, dims on the ranks outer to inner):
    where each dim's groups lie (``nodes_<dim>``), the step time of the request (its (sp, tp) group runs
    ``2 / cfg`` forwards under guidance, else 1) and the output gathers."""
    dp, cfg_n, sp, tp = (mesh[d] for d in MESH_DIMS)
    stride = {"tp": 1, "sp": tp, "cfg": tp * sp, "dp": tp * sp * cfg_n}
    nodes = {d: group_nodes(mesh[d], stride[d], gpus_per_node) for d in MESH_DIMS}
    rm = dataclasses.replace(r, tp_nodes=nodes["tp"], sp_nodes=nodes["sp"])
    t = _transformer_cached(cfg, rm, img, tp, sp)
    forwards = (2 if guidance else 1) // cfg_n  # forwards per step on one (sp, tp) group
    out_bytes = img * cfg.out_channels * ELEMENT  # one forward's output
    gather_us = (allgather_us(rm, forwards * out_bytes, sp, nodes["sp"])  # the sequence-sharded output, every step
                 + allgather_us(rm, 2 * out_bytes, cfg_n, nodes["cfg"])  # cond + uncond for the guidance combine
                 + allgather_us(rm, dp * out_bytes, dp, nodes["dp"]))  # the batch's outputs
    step = forwards * t["step_ms"] + gather_us / 1e3
    return {**mesh, "mesh": mesh_name(mesh), **{f"nodes_{d}": nodes[d] for d in MESH_DIMS},
            "across_nodes": [d for d in MESH_DIMS if nodes[d] > 1], "forwards_per_group": forwards,
            "step_ms": step, "comm_ms": forwards * t["comm_ms"] + gather_us / 1e3,
            "exposed_ms": forwards * t["exposed_ms"] + gather_us / 1e3, "gather_ms": gather_us / 1e3}


def _ranked(rows: list[dict]) -> list[dict]:
    """Best first: the lowest per-request step time, where a mesh within ``TIE`` of it with more requests in flight
    (dp) wins; then the rest by step time (ties by throughput, then name: deterministic)."""
    if not rows:
        return []
    fastest = min(x["step_ms"] for x in rows)
    near = [x for x in rows if x["step_ms"] <= fastest * (1 + TIE)]
    best = max(near, key=lambda x: (x["dp"], x["throughput_speedup"], -x["step_ms"], x["mesh"]))
    rest = sorted((x for x in rows if x is not best), key=lambda x: (x["step_ms"], -x["throughput_speedup"],
                                                                     x["mesh"]))
    return [best, *rest]


def meshes(preset: str, image, gpus: int, nodes: int = 1, gpu: str = "H100 SXM", algo: str = "ring",
           guidance: bool = False) -> list[dict]:
    """Every mesh of ``gpus`` GPUs on ``nodes`` nodes (equal GPUs per node) for ``preset`` (a key of ``MODELS``) at
    ``image`` (a key of ``IMAGES`` or an image token count), best first (see :func:`_ranked` and the module doc):
    dicts with the dims, ``mesh`` ("dp2 x sp2 x tp2"), ``step_ms`` (one request's step), ``speedup`` (against one
    GPU serving one request), ``throughput_speedup`` (``dp x speedup``), where each dim's groups lie
    (``nodes_<dim>``, ``across_nodes``) and the communication. ``guidance``: a classifier-free-guidance pipeline
    (2 forwards per step; the cfg dim may split them)."""
    if preset not in MODELS:
        raise ValueError(f"preset must be one of {list(MODELS)}, got {preset!r}")
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"gpus ({gpus}) must split evenly over nodes ({nodes})")
    cfg, g = MODELS[preset], _gpu(gpu)
    if algo not in g.links:
        raise ValueError(f"algo must be one of {list(g.links)} on {gpu}, got {algo!r}")
    label, img = _image_tokens(image)
    r = rates_for(g, algo)
    base = (2 if guidance else 1) * _transformer_cached(cfg, r, img, 1, 1)["step_ms"]
    rows = []
    for mesh in factorizations(cfg, img, gpus, guidance):
        x = mesh_step(cfg, r, img, mesh, gpus // nodes, guidance)
        speedup = base / x["step_ms"]
        rows.append({"model": preset, "image": label, "gpus": gpus, "nodes": nodes, "gpu": gpu, "allreduce": algo,
                     "guidance": guidance, **x, "speedup": speedup, "throughput_speedup": x["dp"] * speedup,
                     "one_gpu_step_ms": base})
    return _ranked(rows)


def best_mesh(preset: str, image, gpus: int, nodes: int = 1, gpu: str = "H100 SXM", algo: str = "ring",
              guidance: bool = False) -> dict:
    """The best of :func:`meshes` (lowest per-request latency; within 2% of it, the most requests in flight)."""
    return meshes(preset, image, gpus, nodes, gpu, algo, guidance)[0]


def mesh_sweep(gpu: str = "H100 SXM", algo: str = "ring", presets=tuple(MODELS), sweep=MESH_SWEEP) -> dict:
    """Every model x image x (GPUs, nodes) of ``sweep``, without and with guidance: ``best`` (one row per case:
    the best mesh with all its fields, the runner-up, pure TP's step) and ``meshes`` (per case every mesh, best
    first, in brief)."""
    best, every = [], []
    for guidance in (False, True):
        for name in presets:
            for image in IMAGES:
                for gpus_n, nodes in sweep:
                    ranked = meshes(name, image, gpus_n, nodes, gpu, algo, guidance)
                    rounded = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in x.items()}
                               for x in ranked]
                    every.append({"model": name, "image": image, "gpus": gpus_n, "nodes": nodes,
                                  "guidance": guidance, "ranked": [
                                      {k: x[k] for k in ("mesh", "step_ms", "exposed_ms", "speedup",
                                                         "throughput_speedup", "across_nodes")} for x in rounded]})
                    top, second = rounded[0], (rounded[1] if len(rounded) > 1 else None)
                    best.append({**top, "runner_up": second and second["mesh"],
                                 "runner_up_step_ms": second and second["step_ms"],
                                 "pure_tp_step_ms": next((x["step_ms"] for x in rounded if x["tp"] == gpus_n), None)})
    return {"assumptions": {
        "gpu": gpu, "allreduce": algo, "gpus_per_node_max": GPUS_PER_NODE, "inter_node_gbps_per_gpu":
        INTER_NODE_GBPS, "inter_node_latency_us": INTER_NODE_LATENCY_US, "mesh_dims_outer_to_inner": MESH_DIMS,
        "sweep": [list(x) for x in sweep], "tie": TIE,
        "ranking": "best = lowest per-request step time (latency); among meshes within 2% of it, the "
        "most requests in flight (dp); throughput_speedup = dp x speedup (requests/s against one GPU serving one "
        "request at a time, with >= dp requests waiting)", "guidance": "True: a CFG pipeline, 2 forwards per step "
        "(cond, uncond); cfg2 runs one on each half of the mesh", "modelled": "modelled, not measured"},
        "best": best, "meshes": every}


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


_DOUBLE_WHAT = {"after": "fused projections, 2 joint all-reduces per double block",
                "before": "the accounting before issue 23's fusion: 4 all-reduces per double block",
                "per-stream": "fused projections, 4 per-stream all-reduces per double block"}


def markdown(result: dict, gpu: str = "H100 SXM", algo: str = "ring") -> str:
    accounting = result["assumptions"].get("accounting", "after")
    compare = accounting != "before"
    lines = [f"Predicted TP speedup over 1 GPU (whole transformer, one step, bf16; {gpu}, {algo} all-reduce; "
             f"{_DOUBLE_WHAT[accounting]}; modelled, not measured):", "",
             "| model | image | TP 1 ms | TP 2 | TP 4 | TP 8 | exposed comm at TP 8 | TP stops scaling at |"
             + (" TP 8 step vs before |" if compare else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if compare else "")]
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
            vs = (f" {t8['step_ms'] / t8['step_ms_before'] - 1:+.1%} |" if t8 else " - |") if compare else ""
            lines.append(f"| {name} | {image} | {one['step_ms']:.0f} | {' | '.join(cells)} | {exposed} | "
                         f"{limits.get((name, image)) or 'beyond 8'} |{vs}")
    lines += double_block_table(result, gpu, algo)
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


def double_block_table(result: dict, gpu: str = "H100 SXM", algo: str = "ring", images=tuple(IMAGES),
                       models=None) -> list[str]:
    """Markdown lines: one two-stream block under the three accountings, per model, image and TP degree."""
    lines = ["", f"One two-stream (double) block, microseconds ({gpu}, {algo} all-reduce; modelled, not measured): "
             "before = plain GEMMs + QK-norm/RoPE and activation passes, 4 per-stream all-reduces; fused = the fused "
             "projections with the same 4; after = fused + the 2 joint all-reduces (Qwen-Image's last block runs "
             "fused):", "",
             "| model | image | TP | before (4 all-reduces) | fused | after (2 joint) | saved | all-reduce time, "
             "4 -> 2 | exposed, 4 -> 2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in result["double_blocks"]:
        if (x["gpu"], x["allreduce"]) != (gpu, algo) or x["image"] not in images or (models and x["model"]
                                                                                       not in models):
            continue
        before, fused, after = x["total_before"], x["total_per-stream"], x["total_after"]
        comm = (f"{x['comm_before']:.0f} -> {x['comm_after']:.0f}" if x["tp"] > 1 else "-")
        exposed = (f"{x['exposed_before']:.0f} -> {x['exposed_after']:.0f}" if x["tp"] > 1 else "-")
        lines.append(f"| {x['model']} | {x['image']} | {x['tp']} | {before:.0f} | {fused:.0f} | {after:.0f} | "
                     f"{1 - after / before:.1%} | {comm} | {exposed} |")
    text = {}
    for x in result["double_blocks"]:
        if (x["gpu"], x["allreduce"]) == (gpu, algo) and x["tp"] > 1 and (not models or x["model"] in models):
            text.setdefault(x["model"], {})[x["tp"]] = (x["text_allreduce_alone_us"], x["text_allreduce_in_joint_us"])
    if text:
        parts = [f"{name} " + " / ".join(f"{a:.0f}" for a, _ in by_tp.values()) + " us alone, "
                 + " / ".join(f"{j:.0f}" for _, j in by_tp.values()) + " us in the joint one"
                 for name, by_tp in text.items()]
        tps = "/".join(str(tp) for tp in next(iter(text.values())))
        lines += ["", f"The text stream's {TEXT_TOKENS}-token all-reduce at TP {tps}: " + "; ".join(parts) + "."]
    return lines


_PRETTY = {"klein-4b": "klein-4B", "klein-9b": "klein-9B", "dev": "dev", "qwen-image": "Qwen-Image"}


def mesh_markdown(sweep: dict, guidance: bool = False) -> str:
    """The best mesh per model, image, GPU count and node count (``sweep``: :func:`mesh_sweep`)."""
    a = sweep["assumptions"]
    what = ("a classifier-free-guidance pipeline: 2 forwards per step, cond and uncond" if guidance else
            "one forward per step (guidance-distilled, or no CFG)")
    lines = [f"Best mesh per model, image, GPUs and nodes ({a['gpu']}, {a['allreduce']} all-reduce inside a node, "
             f"{a['inter_node_gbps_per_gpu']:.0f} GB/s per GPU between nodes; {what}; modelled, not measured). "
             "Best = the lowest per-request step time (within 2% of it, the most requests in flight); speedup = one "
             "GPU's step for one request / the mesh's; throughput = dp x speedup (>= dp requests waiting):", "",
             "| model | image | GPUs | nodes | best mesh | step ms | speedup vs 1 GPU | throughput | pure TP | "
             "runner-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in sweep["best"]:
        if x["guidance"] != guidance:
            continue
        tp_only = (f"{x['one_gpu_step_ms'] / x['pure_tp_step_ms']:.2f}x" if x["pure_tp_step_ms"] else "-")
        runner = f"{x['runner_up']} ({x['runner_up_step_ms']:.1f} ms)" if x["runner_up"] else "-"
        lines.append(f"| {_PRETTY.get(x['model'], x['model'])} | {x['image'].replace('^2', '²')} | {x['gpus']} | "
                     f"{x['nodes']} | {x['mesh']} | {x['step_ms']:.1f} | {x['speedup']:.2f}x | "
                     f"{x['throughput_speedup']:.2f}x | {tp_only} | {runner} |")
    return "\n".join(lines) + "\n"
