"""The chunk schedule of the row-parallel layer's overlapped all-reduce, aligned to the GEMM's waves.

``RowParallelLinear(overlap="auto")`` computes its output in token chunks and all-reduces each chunk while the next
one computes. Equal chunks cost twice: each chunk's GEMM ends in a partly empty wave (klein-4B's single-stream
``to_out``, 4,608 tokens x 3,072 features in 128 x 128 tiles on 132 SMs: 864 tiles = 7 waves unchunked, 4 x 216
tiles = 8 waves in 4 equal chunks, +14% GEMM time), and the last chunk's all-reduce, which nothing overlaps, is a
quarter of the traffic. :func:`wave_schedule` instead

* puts every boundary on the GEMM's row tile (128 rows),
* gives the first chunks whole waves, as many as the unchunked GEMM has full ones, front-loaded (larger first),
* leaves the last chunk the remainder: the unchunked GEMM's partial last wave (klein-4B above: row tiles
  [11, 11, 11, 3], waves [2, 2, 2, 1] = 7, the exposed last chunk 8% of the traffic instead of 25%).

The chunk count comes from the message size (below 4 MiB the all-reduce is latency-bound: one chunk; then about
8 MiB per chunk, at most 4) and from the GEMM's length (each chunk at least ~15 us of tensor-core work, so a chunk's
launch and NCCL call costs stay small next to it). Pure arithmetic: :mod:`bench.scaling_model` uses the same
function.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["ChunkSchedule", "wave_schedule", "gemm_waves", "ROW_TILE", "COL_TILE", "DEFAULT_SM_COUNT",
           "CTAS_PER_SM"]

# The row-parallel GEMM's output tile (kernels.row_parallel_matmul.rpm_config: 128 x 128 for M > 64).
ROW_TILE = 128
COL_TILE = 128
# H100 SXM / H200: 132 SMs; used when there is no GPU to ask (the CPU path, tests, the scaling model).
DEFAULT_SM_COUNT = 132
# CTAs per SM of the row-parallel GEMM on sm_90: 1 (`tpfuse compile-report`: 96-168 registers x 256 threads and
# 128 KB of shared memory per CTA).
CTAS_PER_SM = 1
# Message-size rules (NCCL's bandwidth curve): below MIN_BYTES one chunk; about CHUNK_BYTES per chunk; MAX_CHUNKS.
MIN_BYTES = 4 * 2**20
CHUNK_BYTES = 8 * 2**20
MAX_CHUNKS = 4
# Each chunk's GEMM at least this long: a chunk costs a kernel launch (~4 us) and an NCCL call (~5-10 us of
# latency on NVLink), which should stay small next to its compute.
MIN_CHUNK_GEMM_US = 15.0
# Tensor-core rate per SM the chunk-length rule assumes: H100 SXM dense bf16 989 TFLOPS / 132 SMs at ~70% of peak.
# fp32 inputs (tf32 or FMA) are taken as 1/2 and 1/4 of it by element size.
GEMM_FLOPS_PER_SM_BF16 = 0.7 * 989e12 / 132


@dataclasses.dataclass(frozen=True)
class ChunkSchedule:
    rows: tuple[int, ...]  # rows (tokens) per chunk, in order
    waves: tuple[int, ...]  # GEMM waves per chunk
    unchunked_waves: int
    row_tile: int = ROW_TILE

    @property
    def edges(self) -> list[int]:
        """Chunk boundaries ``[0, r0, r0 + r1, ..., rows]`` (what the row-parallel op takes)."""
        out = [0]
        for r in self.rows:
            out.append(out[-1] + r)
        return out

    @property
    def extra_waves(self) -> int:
        """Waves beyond the unchunked GEMM's: 0 for a wave-exact split, else 1."""
        return sum(self.waves) - self.unchunked_waves

    @property
    def last_share(self) -> float:
        """The last chunk's share of the rows: the fraction of the all-reduce that nothing overlaps."""
        return self.rows[-1] / sum(self.rows)


def gemm_waves(rows: int, out_features: int, slots: int) -> int:
    """Waves of a ``rows x out_features`` GEMM in ROW_TILE x COL_TILE tiles on ``slots`` concurrent CTAs."""
    tiles = math.ceil(rows / ROW_TILE) * math.ceil(out_features / COL_TILE)
    return math.ceil(tiles / slots)


def _chunk_count(rows: int, out_features: int, local_in_features: int, world_size: int, element_size: int,
                 sm_count: int) -> int:
    nbytes = rows * out_features * element_size
    if world_size <= 1 or nbytes < MIN_BYTES:
        return 1
    by_bytes = min(MAX_CHUNKS, math.ceil(nbytes / CHUNK_BYTES))
    rate = GEMM_FLOPS_PER_SM_BF16 * sm_count * min(1.0, 2 / element_size)
    gemm_us = 2.0 * rows * out_features * local_in_features / rate * 1e6
    by_work = max(1, int(gemm_us // MIN_CHUNK_GEMM_US))
    return max(1, min(by_bytes, by_work))


def wave_schedule(rows: int, out_features: int, local_in_features: int, world_size: int, element_size: int,
                  sm_count: int = DEFAULT_SM_COUNT, ctas_per_sm: int = CTAS_PER_SM,
                  max_chunks: int | None = None) -> ChunkSchedule:
    """The chunks ``RowParallelLinear(overlap="auto")`` uses for a ``rows x out_features`` output whose GEMM reads
    ``local_in_features`` per rank (see the module doc). ``max_chunks`` caps the count (default: the size rules).

    The result always covers ``rows`` exactly and every boundary but the end is a multiple of ROW_TILE. The chunks'
    waves add up to the unchunked GEMM's when a wave-exact split exists, else to at most one more; one chunk when
    neither exists (e.g. a sequence too short for two chunks of a wave each).
    """
    for name, value in (("rows", rows), ("out_features", out_features), ("local_in_features", local_in_features),
                        ("world_size", world_size), ("element_size", element_size), ("sm_count", sm_count),
                        ("ctas_per_sm", ctas_per_sm)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "rows" else 1):
            raise ValueError(f"wave_schedule: {name} must be a positive int, got {value!r}")
    slots = sm_count * ctas_per_sm
    if rows == 0:
        return ChunkSchedule((0,), (0,), 0)
    waves = gemm_waves(rows, out_features, slots)
    one = ChunkSchedule((rows,), (waves,), waves)
    count = _chunk_count(rows, out_features, local_in_features, world_size, element_size, sm_count)
    if max_chunks is not None:
        count = min(count, max_chunks)
    count = min(count, waves)  # every chunk at least one wave
    n_tiles = math.ceil(out_features / COL_TILE)
    row_tiles = math.ceil(rows / ROW_TILE)
    # Two ways to cut, each tried for every chunk count up to ``count``; the best cut has the fewest extra waves,
    # then the most chunks (each all-reduce but the last hides behind the next chunk's GEMM), then the smallest
    # last chunk (its all-reduce is the exposed one).
    # (1) Granules: the fewest row tiles whose tiles fill whole waves exactly (klein-4B's N = 3,072: 24 column
    # tiles, 132 slots -> 11 row tiles = 2 waves). Chunks of whole granules waste no wave; the last chunk takes
    # the rest, i.e. the unchunked GEMM's partial last wave, so the waves add up to the unchunked count.
    # (2) Whole waves rounded down to row tiles, the rest last: for GPUs whose granule is longer than the rows
    # (an L40S's 142 SMs and 24 column tiles: 71 row tiles); it may cost one wave more than unchunked, the price
    # of any overlap there, accepted since chunking is only chosen for messages of 4+ MiB.
    granule = slots // math.gcd(slots, n_tiles)
    candidates = []
    for c in range(2, count + 1):
        last = row_tiles % granule or granule
        granules = (row_tiles - last) // granule
        if granules >= c - 1:
            per = [granules // (c - 1) + (1 if i < granules % (c - 1) else 0) for i in range(c - 1)]
            candidates.append([g * granule for g in per] + [last])
        full = waves - 1
        if full >= c - 1:
            per = [full // (c - 1) + (1 if i < full % (c - 1) else 0) for i in range(c - 1)]  # front-loaded
            tiles = [w * slots // n_tiles for w in per]
            candidates.append(tiles + [row_tiles - sum(tiles)])
    best = None
    for tiles in candidates:
        if min(tiles) < 1 or tiles[-1] > min(tiles[:-1]):
            continue  # empty, or not front-loaded (the exposed last chunk must be the smallest)
        chunk_rows = [t * ROW_TILE for t in tiles[:-1]]
        chunk_rows.append(rows - sum(chunk_rows))
        if chunk_rows[-1] < 1:
            continue
        sched = ChunkSchedule(tuple(chunk_rows), tuple(math.ceil(t * n_tiles / slots) for t in tiles), waves)
        if sched.extra_waves > 1:
            continue
        key = (sched.extra_waves, -len(sched.rows), sched.last_share)
        if best is None or key < best[0]:
            best = (key, sched)
    return best[1] if best is not None else one
