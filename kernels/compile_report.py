"""Ahead-of-time compile every Triton and CUDA C++ kernel for a GPU architecture, with no GPU, and check the result.

The launchers are run on ``meta`` tensors with each kernel swapped for a recorder, so the report compiles exactly
the arguments, constexprs, grid and launch options the launcher would use for FLUX.2 shapes (klein-4B, klein-9B,
dev; TP 1, 2, 4, 8; 1024+512 and 4096+512 tokens), including Triton's divisibility-by-16 specialization of integer
arguments. For every distinct compilation it reports registers, shared memory, stack frame, local memory and
spill bytes (``cuobjdump -res-usage`` on the cubin, ``ptxas -v`` on the PTX; both ship in the triton wheel), and
reads the SASS (``cuobjdump -sass``) for:

* **HGMMA** (wgmma, Hopper's warpgroup tensor-core MMA): the shapes (``64x128x16``), the narrowest N, and how
  many HGMMA run per K step (those inside the main loop: the innermost loop that contains HGMMA; Triton does not
  unroll the K loop). Loops are found from the back edges of the control-flow graph built from the branches, so
  an mbarrier retry block that ptxas moves after the EXIT and that jumps back into the K loop is part of it. On
  Hopper an n64 HGMMA re-reads its A tile from shared memory twice as often per FLOP as an n128 one.
* **Instructions**: the main loop's body (static count, one K iteration) and the epilogue after it, both as a
  static count and as the longest path a warp executes through the post-loop control flow (Q/K, V and MLP
  programs take different branches; only one runs). Predicated-off instructions count as executed; a ``CALL``
  counts as one instruction (its callee is the int64 div/mod slow path, taken only for operands >= 2^32); loops
  outside the main loop count once. With one CTA per SM and no persistent loop, nothing hides the epilogue: the
  tensor cores idle while it runs.
* **Global memory**: ``LDG``/``STG`` split into scalar (<= 32 bits, e.g. ``LDG.E.U16``, ``STG.E``) and vector
  (``.64``, ``.128``), 16-bit scalar stores counted apart, cp.async (``LDGSTS``) by width, TMA (``UTMALDG``,
  ``UTMASTG``, ``UBLKCP``...); plus ``CALL`` and ``BAR.SYNC`` counts.
* **CTAs per SM** from registers (per-warp allocations rounded to 256; 65,536 per SM), threads (2,048 per SM,
  32 CTAs at most) and shared memory (228 KB per SM, 1 KB of it reserved per CTA).
* **Launch**: the grid and the DRAM bytes (every tensor argument's extent, overlapping views and aliased dummy
  pointers counted once) at the first shape that uses the compilation; for memory-bound (non-GEMM) kernels the
  warp instructions per DRAM byte: longest path per warp x warps per program x programs / bytes. An H200 issues
  about 0.22 warp instructions per DRAM byte at 4.3 TB/s (132 SMs x 4 schedulers x ~1.75 GHz), so a kernel above
  that is issue-bound, not bandwidth-bound.

After the table, :func:`format_block_launches` lists per FLUX.2 block kind the kernels one forward launches (the
same launcher calls as the TP blocks), the programs and DRAM bytes of each step and the all-reduces.

Checks (``CompileReport.failures``): everything compiles; every GEMM kernel uses wgmma; shared memory within the
sm_90 per-block limit; no spills, no stack frame, no local memory; no GEMM HGMMA narrower than n128; no 16-bit
scalar global store in any kernel (one bf16 per instruction: 8x the stores of 128-bit vectors); no GEMM epilogue
longer than 900 instructions per warp at one CTA per SM; at most 32 scalar global loads + stores in a GEMM (its
epilogue should move whole vectors).

The CUDA C++ kernels (``csrc/``) go through the same reading: nvcc compiles each source to an sm_90 cubin and
every kernel instantiation is inspected: the ones the csrc launchers pick at the FLUX.2 shapes (per batch and per
token modulation) with those launches' grids and bytes, every other one (the scalar fallbacks, other widths and
dtypes) at its own width (skipped where nvcc is missing; 0.050-0.099 warp instructions per byte, no ``CALL``, no
16-bit global access). Memory-bound kernels have a target rather than a rule: at most 0.10 warp instructions per DRAM byte, no
``CALL``, no 16-bit scalar global loads; the report lists every miss under "targets missed".

``--dump DIR`` writes every compiled cubin and ``DIR/index.json`` (one entry per compilation: these facts and the
cubin's file name) for inspection with ``cuobjdump``/``nvdisasm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ._triton import HAS_TRITON, triton

__all__ = ["compile_report", "CompileReport", "KernelResult", "SassFacts", "analyze_sass", "parse_sass",
           "ctas_per_sm", "format_compile_report", "SHARED_LIMIT"]

# Maximum dynamic shared memory per block on sm_90 (H100/H200): 227 KB.
SHARED_LIMIT = {90: 227 * 1024}
DEFAULT_PRESETS = ("klein-4b", "klein-9b", "dev")
DEFAULT_TP = (1, 2, 4, 8)
DEFAULT_TOKENS = ((512, 1024), (512, 4096))  # (text, image)

# sm_90 per-SM resources (CUDA occupancy calculator): registers are allocated per warp in units of 256, 1 KB of
# shared memory is reserved per resident CTA.
REGISTERS_PER_SM = 65536
REGISTER_UNIT_PER_WARP = 256
THREADS_PER_SM = 2048
CTAS_PER_SM_MAX = 32
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_CTA = 1024

# The rules on the SASS (see the module doc for why).
MIN_HGMMA_N = 128
MAX_EPILOGUE_AT_ONE_CTA = 900
MAX_GEMM_SCALAR_GLOBAL = 32
# Warp instructions an H200 can issue per DRAM byte at full bandwidth (shown next to each memory-bound kernel).
H200_INSTR_PER_BYTE = 0.22
# The memory-bound kernels' target: well under the issue ceiling, since a warp also waits on its loads (~60-70% of
# the issue rate is the practical maximum). Missed targets are listed as "above target", not failures.
MAX_INSTR_PER_BYTE = 0.10


@dataclasses.dataclass
class SassFacts:
    """What :func:`analyze_sass` reads from one kernel's SASS. Instruction counts are per warp."""

    hgmma_shapes: dict[str, int]  # "64x128x16" -> static count
    hgmma_min_n: int  # narrowest N of any HGMMA; 0 without HGMMA
    hgmma_per_k_step: int  # HGMMA in one main-loop iteration (the largest, with several main loops)
    main_loops: int  # innermost loops containing HGMMA (one per K loop; a two-part GEMM has two)
    loops: int  # all natural loops reachable from the entry
    loop_instructions: int  # static count of the (largest) main loop's body; 0 without a main loop
    epilogue_instructions: int | None  # longest path after the last main loop; None without one
    epilogue_static: int | None  # every reachable instruction after the last main loop
    path_instructions: int  # longest path through the whole kernel, each loop once
    ldg_scalar: int
    ldg_vector: int
    stg_scalar: int
    stg_vector: int
    stg_16bit: int  # of stg_scalar
    ldg_16bit: int  # of ldg_scalar
    cp_async: dict[str, int]  # LDGSTS by width in bits: {"128": 32}
    tma_ops: dict[str, int]  # UTMALDG, UTMASTG, UBLKCP, ... by opcode
    tma: bool
    calls: int
    bar_syncs: int


@dataclasses.dataclass
class KernelResult:
    kernel: str
    gemm: bool
    config: str
    uses: list[str]  # "klein-4b tp2 512+1024" ...
    ok_compiled: bool = False
    error: str = ""
    registers: int = -1
    shared_bytes: int = -1
    stack_bytes: int = -1
    local_bytes: int = -1
    spill_store_bytes: int = -1
    spill_load_bytes: int = -1
    wgmma: bool = False
    hgmma_count: int = 0
    num_warps: int = 0
    grid: list[int] = dataclasses.field(default_factory=list)  # at the first use's shape
    bytes: int = 0  # DRAM bytes the first use's launch reads and writes
    ctas_per_sm: int = 0
    cta_limits: dict[str, int] = dataclasses.field(default_factory=dict)  # CTAs/SM allowed by each resource
    instr_per_byte: float | None = None  # memory-bound kernels only
    sass: SassFacts | None = None
    cubin: str = ""  # file name under --dump DIR

    def failures(self, shared_limit: int) -> list[str]:
        name = f"{self.kernel} [{self.config}]"
        if not self.ok_compiled:
            return [f"{name}: failed to compile: {self.error}"]
        out = []
        if self.error:
            out.append(f"{name}: compiled, but inspecting it failed: {self.error}")
        if self.gemm and not self.wgmma:
            out.append(f"{name}: GEMM does not use wgmma (no HGMMA in the SASS)")
        if self.shared_bytes > shared_limit:
            out.append(f"{name}: shared memory {self.shared_bytes} B exceeds {shared_limit} B")
        if self.spill_store_bytes or self.spill_load_bytes:
            out.append(f"{name}: spills {self.spill_store_bytes} B stores / {self.spill_load_bytes} B loads")
        if self.stack_bytes or self.local_bytes:
            out.append(f"{name}: stack frame {self.stack_bytes} B, local memory {self.local_bytes} B")
        s = self.sass
        if s is None:
            return out
        if self.gemm and 0 < s.hgmma_min_n < MIN_HGMMA_N:
            out.append(f"{name}: HGMMA n{s.hgmma_min_n} ({', '.join(s.hgmma_shapes)}) is narrower than "
                       f"n{MIN_HGMMA_N}: A is re-read from shared memory for every {s.hgmma_min_n} columns")
        if s.stg_16bit:
            out.append(f"{name}: {s.stg_16bit} 16-bit scalar global stores (STG.E.U16); store vectors")
        if (self.gemm and self.ctas_per_sm <= 1 and s.epilogue_instructions is not None
                and s.epilogue_instructions > MAX_EPILOGUE_AT_ONE_CTA):
            out.append(f"{name}: epilogue of {s.epilogue_instructions} instructions per warp (longest path) at "
                       f"{self.ctas_per_sm} CTA/SM exceeds {MAX_EPILOGUE_AT_ONE_CTA}: nothing overlaps it")
        if self.gemm and s.ldg_scalar + s.stg_scalar > MAX_GEMM_SCALAR_GLOBAL:
            out.append(f"{name}: {s.ldg_scalar} scalar global loads + {s.stg_scalar} scalar global stores exceed "
                       f"{MAX_GEMM_SCALAR_GLOBAL} in a GEMM")
        return out

    def above_target(self) -> list[str]:
        """Memory-bound kernels: more than MAX_INSTR_PER_BYTE warp instructions per DRAM byte, any CALL (an int64
        division slow path), any 16-bit scalar global load."""
        s = self.sass
        if self.gemm or s is None or self.instr_per_byte is None:
            return []
        name, out = f"{self.kernel} [{self.config}]", []
        if self.instr_per_byte > MAX_INSTR_PER_BYTE:
            out.append(f"{name}: {self.instr_per_byte:.3f} warp instructions per DRAM byte > {MAX_INSTR_PER_BYTE}")
        if s.calls:
            out.append(f"{name}: {s.calls} CALL (int64 division slow paths)")
        if s.ldg_16bit:
            out.append(f"{name}: {s.ldg_16bit} 16-bit scalar global loads")
        return out

    def to_json(self) -> dict:
        """One flat record: the launch facts and, once inspected, the SASS facts."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sass"}
        return {**record, **(dataclasses.asdict(self.sass) if self.sass is not None else {})}


@dataclasses.dataclass
class CompileReport:
    arch: int
    triton_version: str
    kernels: list[KernelResult]

    @property
    def failures(self) -> list[str]:
        limit = SHARED_LIMIT.get(self.arch, 227 * 1024)
        return [f for k in self.kernels for f in k.failures(limit)]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def above_target(self) -> list[str]:
        return [f for k in self.kernels for f in k.above_target()]

    def to_json(self) -> dict:
        return {"arch": self.arch, "triton_version": self.triton_version, "ok": self.ok, "failures": self.failures,
                "above_target": self.above_target,
                "kernels": [k.to_json() for k in self.kernels]}


# --------------------------------------------------------------------------------------------------------------
# Reading SASS
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SassInstr:
    addr: int
    guard: str  # "", "@P0", "@!P5", "@PT", ...
    opcode: str  # "HGMMA.64x128x16.F32.BF16"
    operands: str

    @property
    def op(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def modifiers(self) -> list[str]:
        return self.opcode.split(".")[1:]


# "        /*1fa0*/               @P5 BRA 0x1720 ;   /* 0x... */" (the encoding's second line has "/* 0x" and
# no opcode, so it does not match).
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P(?:T|\d))?\s*([A-Z][A-Za-z0-9_.]*)([^;]*);")


def parse_sass(text: str) -> list[SassInstr]:
    """The instructions of the one kernel in ``cuobjdump -sass`` output, in address order."""
    functions = text.count("Function :")
    if functions > 1:
        raise ValueError(f"expected the SASS of one kernel, found {functions} functions")
    instrs = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            instrs.append(SassInstr(int(m[1], 16), m[2] or "", m[3], m[4].strip()))
    if not instrs:
        raise ValueError("no SASS instructions found (expected cuobjdump -sass output)")
    return instrs


_JUMPS = {"BRA", "JMP"}
_INDIRECT_JUMPS = {"BRX", "BRXU", "JMX", "JMXU"}
_ENDS = {"EXIT", "RET", "KILL"}


def _successors(instrs: list[SassInstr]) -> list[list[int]]:
    """Indices each instruction can pass control to. CALL falls through (its callee is not followed); BSSY/BSYNC,
    WARPSYNC and the like only synchronize, so they fall through too."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    out = []
    for i, ins in enumerate(instrs):
        nxt = [i + 1] if i + 1 < len(instrs) else []
        # "@PT" always runs; BRA.DIV / BRA.CONV branch only when the warp is (not) converged.
        always = ins.guard in ("", "@PT") and not {"DIV", "CONV"} & set(ins.modifiers)
        if ins.op in _INDIRECT_JUMPS:
            raise ValueError(f"indirect branch {ins.opcode} at {ins.addr:#x}: its targets are not in the SASS")
        if ins.op in _JUMPS:
            targets = re.findall(r"0x([0-9a-f]+)", ins.operands)
            if not targets or int(targets[-1], 16) not in index:
                raise ValueError(f"{ins.opcode} {ins.operands} at {ins.addr:#x}: no instruction at its target")
            target = index[int(targets[-1], 16)]
            out.append([target] if always else [target, *nxt])
        elif ins.op in _ENDS:
            out.append([] if always else nxt)
        else:
            out.append(nxt)
    return out


@dataclasses.dataclass
class _Block:
    first: int  # instruction indices [first, stop)
    stop: int
    succ: list[int]  # block indices

    @property
    def size(self) -> int:
        return self.stop - self.first


def _blocks(instrs: list[SassInstr]) -> list[_Block]:
    """Basic blocks: a block starts at the entry, at every jump target and after every jump or unconditional
    end (a predicated EXIT falls through and does not end its block)."""
    succ = _successors(instrs)
    n = len(instrs)
    leaders = {0} | {j for i in range(n) for j in succ[i] if j != i + 1}
    leaders |= {i + 1 for i in range(n - 1) if succ[i] != [i + 1]}
    starts = sorted(leaders)
    block_of = {s: b for b, s in enumerate(starts)}
    stops = starts[1:] + [n]
    return [_Block(s, e, [block_of[j] for j in succ[e - 1]]) for s, e in zip(starts, stops)]


def _dfs(blocks: list[_Block]) -> tuple[list[int], set[tuple[int, int]]]:
    """Blocks reachable from the entry in DFS postorder, and the retreating edges (to a block still on the DFS
    stack). Removing the retreating edges leaves a DAG whose edges all go to blocks earlier in the postorder; in
    the reducible control flow ptxas emits for Triton they are exactly the loops' back edges."""
    post: list[int] = []
    retreating: set[tuple[int, int]] = set()
    on_stack = {0}
    done: set[int] = set()
    stack = [(0, iter(blocks[0].succ))]
    while stack:
        b, succ = stack[-1]
        for s in succ:
            if s in on_stack:
                retreating.add((b, s))
            elif s not in done:
                on_stack.add(s)
                stack.append((s, iter(blocks[s].succ)))
                break
        else:
            stack.pop()
            on_stack.discard(b)
            done.add(b)
            post.append(b)
    return post, retreating


def _loops(blocks: list[_Block], post: list[int], retreating: set[tuple[int, int]]) -> dict[int, set[int]]:
    """Natural loops: header -> body blocks (the header and every block that reaches a back edge to it without
    passing the header). A retry block placed after the EXIT that jumps back into a loop belongs to that loop."""
    preds: dict[int, list[int]] = {b: [] for b in post}
    for b in post:
        for s in blocks[b].succ:
            preds[s].append(b)
    loops: dict[int, set[int]] = {}
    for tail, header in retreating:
        body = loops.setdefault(header, {header})
        todo = [tail]
        while todo:
            b = todo.pop()
            if b not in body:
                body.add(b)
                todo.extend(preds[b])
    return loops


def _width_bits(ins: SassInstr) -> int:
    mods = ins.modifiers
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return bits
    return 32


def analyze_sass(text: str) -> SassFacts:
    """Loops, HGMMA, instruction counts and global memory traffic of one kernel's ``cuobjdump -sass`` text (see
    the module doc). Only code reachable from the entry counts: not the BRA-to-self and NOP padding after the
    final EXIT, nor CALL targets."""
    instrs = parse_sass(text)
    blocks = _blocks(instrs)
    post, retreating = _dfs(blocks)
    loops = _loops(blocks, post, retreating)

    # Longest path (in instructions) from each block's start to an end, each loop once: postorder visits every
    # DAG successor first.
    longest: dict[int, int] = {}
    for b in post:
        longest[b] = blocks[b].size + max((longest[s] for s in blocks[b].succ if (b, s) not in retreating),
                                          default=0)

    reach = [i for b in sorted(post) for i in range(blocks[b].first, blocks[b].stop)]

    def hgmma_in(body: set[int]) -> int:
        return sum(instrs[i].op == "HGMMA" for b in body for i in range(blocks[b].first, blocks[b].stop))

    def size(body: set[int]) -> int:
        return sum(blocks[b].size for b in body)

    # The main loops: innermost loops with HGMMA (an outer persistent tile loop contains the K loop); the
    # epilogue is what runs after the last of them (in topological order) is left.
    with_mma = [body for body in loops.values() if hgmma_in(body)]
    main = [body for body in with_mma if not any(other < body for other in with_mma)]
    if main:
        order = {b: i for i, b in enumerate(reversed(post))}
        last = max(main, key=lambda body: max(order[b] for b in body))
        exits = {s for b in last for s in blocks[b].succ if s not in last}
        epilogue = max((longest[s] for s in exits), default=0)
        after, todo = set(), list(exits)
        while todo:
            b = todo.pop()
            if b not in after:
                after.add(b)
                todo.extend(s for s in blocks[b].succ if (b, s) not in retreating)
        epilogue_static = size(after)
    else:
        epilogue = epilogue_static = None

    shapes = Counter()
    for i in reach:
        if instrs[i].op == "HGMMA":
            m = re.match(r"(\d+x\d+x\d+)", ".".join(instrs[i].modifiers))
            if m is None:
                raise ValueError(f"cannot read the shape of {instrs[i].opcode} at {instrs[i].addr:#x}")
            shapes[m[1]] += 1
    loads = [instrs[i] for i in reach if instrs[i].op == "LDG"]
    stores = [instrs[i] for i in reach if instrs[i].op == "STG"]
    cp_async = Counter(str(_width_bits(instrs[i])) for i in reach if instrs[i].op == "LDGSTS")
    tma = Counter(instrs[i].op for i in reach if instrs[i].op.startswith(("UTMA", "UBLK")))
    return SassFacts(
        hgmma_shapes=dict(sorted(shapes.items())),
        hgmma_min_n=min((int(s.split("x")[1]) for s in shapes), default=0),
        hgmma_per_k_step=max((hgmma_in(body) for body in main), default=0),
        main_loops=len(main),
        loops=len(loops),
        loop_instructions=max((size(body) for body in main), default=0),
        epilogue_instructions=epilogue,
        epilogue_static=epilogue_static,
        path_instructions=longest[0],
        ldg_scalar=sum(_width_bits(x) <= 32 for x in loads),
        ldg_vector=sum(_width_bits(x) > 32 for x in loads),
        stg_scalar=sum(_width_bits(x) <= 32 for x in stores),
        stg_vector=sum(_width_bits(x) > 32 for x in stores),
        stg_16bit=sum(_width_bits(x) == 16 for x in stores),
        ldg_16bit=sum(_width_bits(x) == 16 for x in loads),
        cp_async=dict(sorted(cp_async.items())),
        tma_ops=dict(sorted(tma.items())),
        tma=bool(tma),
        calls=sum(instrs[i].op == "CALL" for i in reach),
        bar_syncs=sum(instrs[i].opcode.startswith("BAR.SYNC") for i in reach),
    )


def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int) -> dict[str, int]:
    """CTAs per SM each sm_90 resource allows (the occupancy is the minimum)."""
    if registers <= 0 or num_warps <= 0 or shared_bytes < 0:
        raise ValueError(f"ctas_per_sm: need registers > 0, num_warps > 0, shared_bytes >= 0; got {registers}, "
                         f"{num_warps}, {shared_bytes}")
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    return {"registers": REGISTERS_PER_SM // per_warp // num_warps,
            "threads": THREADS_PER_SM // (num_warps * 32),
            "shared": SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_CTA),
            "blocks": CTAS_PER_SM_MAX}


# --------------------------------------------------------------------------------------------------------------
# Recording launches
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Launch:
    kernel: object  # the JIT function
    grid: object  # a tuple, or a callable taking the meta dict (the bound arguments and constexprs)
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, sink: list[_Launch]):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(_Launch(self.kernel, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(module, names: Sequence[str]) -> Iterator[list[_Launch]]:
    sink: list[_Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, sink))
        yield sink
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def _grid_shape(launch: _Launch) -> list[int]:
    grid = launch.grid
    if callable(grid):
        grid = grid({**dict(zip(_jit_fn(launch.kernel).arg_names, launch.args)), **launch.kwargs})
    return [int(g) for g in grid]


def _launch_bytes(launch: _Launch) -> int:
    """DRAM bytes a launch touches: the extent of every tensor argument, counted once per storage where views
    overlap (a dummy pointer passed for an unused argument aliases a real one)."""
    extents: dict[int, list[tuple[int, int]]] = {}
    for t in (*launch.args, *launch.kwargs.values()):
        if isinstance(t, torch.Tensor) and t.numel():
            size = t.element_size()
            first = t.storage_offset()
            last = first + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
            # The StorageImpl's address identifies the allocation (meta tensors have no data pointer); every
            # argument is alive in the recorded launch, so no address is reused.
            extents.setdefault(t.untyped_storage()._cdata, []).append((first * size, (last + 1) * size))
    total = 0
    for spans in extents.values():
        end = -1
        for lo, hi in sorted(spans):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def instr_per_byte(path_instructions: int, num_warps: int, grid: Sequence[int], nbytes: int) -> float:
    """Warp instructions a launch issues per DRAM byte it moves."""
    if nbytes <= 0:
        raise ValueError("instr_per_byte: the launch moves no DRAM bytes (no tensor arguments?)")
    return path_instructions * num_warps * math.prod(grid) / nbytes


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64"}
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _jit_fn(kernel):
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter wraps .fn


def _compile_spec(launch: _Launch):
    """(fn, signature, constexprs, attrs, options) as the JIT would specialize this launch."""
    fn = _jit_fn(launch.kernel)
    names = fn.arg_names
    bound = dict(zip(names, launch.args))
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTION_KEYS}
    bound.update({k: v for k, v in launch.kwargs.items() if k not in _OPTION_KEYS})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        param = fn.params[i]
        if name in bound:
            value = bound[name]
        elif param.has_default:  # the JIT fills in parameter defaults the launch leaves out
            value = param.default
        else:
            raise TypeError(f"the launch of {fn.__name__} passes no value for {name}")
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name] = "constexpr"  # the JIT specializes ints equal to 1
                constexprs[name] = 1
                continue
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={value!r} of {fn.__name__}")
    return fn, signature, constexprs, attrs, options


def _config_label(fn, signature: dict, constexprs: dict, attrs: dict, options: dict) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items() if k.isupper()]
    parts += [f"{k}={v}" for k, v in options.items()]
    # Integer arguments the JIT specialized as divisible by 16 (they change the code: vector widths, masks).
    div16 = [fn.arg_names[i] for (i,) in attrs if not signature[fn.arg_names[i]].startswith("*")]
    return " ".join(parts) + (f" div16=[{','.join(div16)}]" if div16 else "")


# --------------------------------------------------------------------------------------------------------------
# The shapes: what each launcher sees for a model, a TP degree and a token count
# --------------------------------------------------------------------------------------------------------------


def _launches_for(cfg, tp: int, tokens: int, txt: int = 512,
                 dtype=torch.bfloat16) -> list[tuple[str, bool, _Launch]]:
    # By module path: the package re-exports functions under the same names as their modules.
    proj_mod = importlib.import_module(f"{__package__}.fused_qkv_mlp_proj")
    ln_mod = importlib.import_module(f"{__package__}.layernorm_modulate")
    qk_mod = importlib.import_module(f"{__package__}.qk_norm_rope")
    rpm_mod = importlib.import_module(f"{__package__}.row_parallel_matmul")

    # Separate tensors wherever the model passes separate tensors (q and k, cos and sin, shift and scale): the
    # launch's DRAM bytes count each storage once.
    meta = {"device": "meta", "dtype": dtype}
    heads, d, hidden, mlp = cfg.heads // tp, cfg.head_dim, cfg.hidden_size, cfg.mlp_hidden // tp
    out: list[tuple[str, bool, _Launch]] = []
    x = torch.empty(1, tokens, hidden, **meta)
    cos, sin = (torch.empty(tokens, d, device="meta", dtype=torch.float32) for _ in range(2))
    q_norm, k_norm = torch.empty(d, **meta), torch.empty(d, **meta)

    with _recording(proj_mod, ["_fused_qkv_mlp_kernel"]) as rec:
        w = torch.empty(3 * heads * d + 2 * mlp, hidden, **meta)
        proj_mod._fused_triton(x, w, q_norm, k_norm, cos, sin, heads, d, mlp, cfg.eps)
    out += [("fused_qkv_mlp_proj", True, launch) for launch in rec]

    # The two-stream block: each stream's Q/K/V (its own three weights) into its rows of the joint buffer, and the
    # feed-forward's linear_in with the SwiGLU (FLUX.2) or biased GELU(tanh) (Qwen-Image) epilogue.
    with _recording(proj_mod, ["_fused_qkv_mlp_kernel"]) as rec:
        qkv = torch.empty(3, 1, heads, tokens, d, **meta)
        angles = torch.empty(2, tokens, d // 2, device="meta", dtype=torch.float32)
        row = 0
        for n in (txt, tokens - txt):
            ws = tuple(torch.empty(heads * d, hidden, **meta) for _ in range(3))
            proj_mod.fused_proj_triton(torch.empty(1, n, hidden, **meta), (*ws, None), (None,) * 4, q_norm, k_norm,
                                       angles[:, row:row + n], qkv[:, :, :, row:row + n], None, heads, d, 0, cfg.eps)
            row += n
        act_out = torch.empty(1, tokens, mlp, **meta)
        proj_mod.fused_proj_triton(x, (None, None, None, torch.empty(2 * mlp, hidden, **meta)), (None,) * 4, q_norm,
                                   k_norm, None, None, act_out, 0, 128, mlp, 0.0, "swiglu")
        proj_mod.fused_proj_triton(x, (None, None, None, torch.empty(mlp, hidden, **meta)),
                                   (None, None, None, torch.empty(mlp, **meta)), q_norm, k_norm, None, None, act_out,
                                   0, 128, mlp, 0.0, "gelu_tanh")
    out += [(name, True, launch) for name, launch in
            zip(("joint_qkv_proj.txt", "joint_qkv_proj.img", "fused_linear_act.swiglu", "fused_linear_act.gelu"), rec)]

    with _recording(qk_mod, ["_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"]) as rec:
        q, k, gq, gk = (torch.empty(1, tokens, heads, d, **meta) for _ in range(4))
        qk_mod._fwd_triton(q, k, q_norm, k_norm, cos, sin, cfg.eps)  # inference
        rstd = qk_mod._fwd_triton(q, k, q_norm, k_norm, cos, sin, cfg.eps, save_rstd=True)[2]  # training
        qk_mod._bwd_triton(q, k, q_norm, k_norm, cos, sin, gq, gk, cfg.eps, rstd)
        # The double-stream block: text and image Q/K/V of projection layout [B, S, H, D] into joint buffers.
        segs = [tuple(torch.empty(1, n, heads, d, **meta) for _ in range(3)) + (q_norm, k_norm)
                for n in (txt, tokens - txt)]
        joint = tuple(torch.empty(1, tokens, heads, d, **meta) for _ in range(3))
        qk_mod._fwd_launch(segs, qk_mod._angles("compile_report", cos, sin), joint, (cfg.eps, cfg.eps))
    out += [("qk_norm_rope." + name, False, launch)
            for name, launch in zip(("fwd", "fwd+rstd", "bwd", "joint"), rec)]

    with _recording(ln_mod, ["_ln_mod_fwd_kernel"]) as rec:
        shift, scale = torch.empty(1, hidden, **meta), torch.empty(1, hidden, **meta)
        ln_mod._layernorm_modulate_triton(x, shift, scale, cfg.eps)
        # per-token modulation (FLUX.3, FLUX.2's KV-extract mode): [1, S, D] shift and scale
        shift, scale = torch.empty(1, tokens, hidden, **meta), torch.empty(1, tokens, hidden, **meta)
        ln_mod._layernorm_modulate_triton(x, shift, scale, cfg.eps)
    out += [("layernorm_modulate", False, launch) for launch in rec]

    # Row-parallel out-projections: single-stream to_out over [attn | mlp] with gate + residual (rank 0), and a
    # one-part layer (double-stream linear_out) with gate only (ranks > 0), in 1 chunk and in the 4-chunk
    # overlap (each chunk is its own launch on a row range).
    with _recording(rpm_mod, ["_row_parallel_mm_kernel"]) as rec:
        attn, act = torch.empty(1, tokens, heads * d, **meta), torch.empty(1, tokens, mlp, **meta)
        gate = torch.empty(1, hidden, **meta)
        w_out = torch.empty(hidden, heads * d + mlp, **meta)
        rpm_mod.row_parallel_matmul_triton([attn, act], w_out, gate, x, True)
        w_ff = torch.empty(hidden, mlp, **meta)
        rpm_mod.row_parallel_matmul_triton([act], w_ff, gate, None, False, row_range=(0, tokens // 4))
        # Per-token gate (FLUX.3, FLUX.2's KV-extract mode) over [attn | mlp] with each part's own weight (FLUX.3's
        # to_out + ff.linear_out), residual added (rank 0).
        gate_tok = torch.empty(1, tokens, hidden, **meta)
        rpm_mod.row_parallel_matmul_triton([attn, act], [torch.empty(hidden, heads * d, **meta), w_ff], gate_tok,
                                           x, True)
        # A joint reduce's chunk across the text/image boundary: both streams' rows in one launch (SEGMENTS=2).
        img = tokens - txt
        rpm_mod.row_parallel_matmul_segments_triton([
            ([torch.empty(1, n, mlp, **meta)], torch.empty(hidden, mlp, **meta), gate, torch.empty(1, n, hidden, **meta),
             True, torch.empty(n, hidden, **meta), rng) for n, rng in ((txt, (128, txt)), (img, (0, img // 2)))])
    out += [("row_parallel_matmul", True, launch) for launch in rec]
    return out


def block_launches(cfg, tp: int, txt: int, img: int, dtype=torch.bfloat16) -> dict[str, list[tuple[str, int, int]]]:
    """The kernels one block's forward launches on rank 0, in order, per FLUX.2 block kind: ``(kernel, grid size,
    DRAM bytes)`` each, plus ``("all_reduce", chunks, payload bytes)`` entries for its row-parallel reductions
    (the attention itself, SDPA / flash attention, is not tpfuse's and not listed). The launchers run on ``meta``
    tensors with the kernels recorded, not compiled or run: the same calls the TP blocks make."""
    from tpfuse.tp_layers.schedule import wave_schedule  # pure arithmetic, no torch.distributed

    proj_mod = importlib.import_module(f"{__package__}.fused_qkv_mlp_proj")
    ln_mod = importlib.import_module(f"{__package__}.layernorm_modulate")
    rpm_mod = importlib.import_module(f"{__package__}.row_parallel_matmul")
    meta = {"device": "meta", "dtype": dtype}
    heads, d, hidden, mlp = cfg.heads // tp, cfg.head_dim, cfg.hidden_size, cfg.mlp_hidden // tp
    inner = heads * d
    element = torch.empty((), dtype=dtype).element_size()
    norms = (torch.empty(d, **meta), torch.empty(d, **meta))

    def t(*shape, dt=None):
        return torch.empty(*shape, device="meta", dtype=dt or dtype)

    def ln(x):
        ln_mod._layernorm_modulate_triton(x, t(1, hidden), t(1, hidden), cfg.eps)

    def reduce(streams, k):  # [(parts, weight)] per stream, as joint_row_parallel launches them
        rows = [p[0].shape[1] for p, _ in streams]
        edges = wave_schedule(sum(rows), hidden, k, tp, element).edges
        bases = [sum(rows[:i]) for i in range(len(rows))]
        for r0, r1 in zip(edges, edges[1:]):
            segments = []
            for (parts, w), base, n in zip(streams, bases, rows):
                lo, hi = max(r0, base), min(r1, base + n)
                if lo < hi:
                    segments.append((parts, w, t(1, hidden), t(1, n, hidden), True, t(n, hidden),
                                     (lo - base, hi - base)))
            rpm_mod.row_parallel_matmul_segments_triton(segments)
        return ("all_reduce", len(edges) - 1, sum(rows) * hidden * element)

    out: dict[str, list[tuple[str, int, int]]] = {}
    names = ["_fused_qkv_mlp_kernel", "_ln_mod_fwd_kernel", "_row_parallel_mm_kernel"]
    for kind in ("single", "double"):
        sink: list = []
        events: list = []
        saved = {m: {n: getattr(m, n) for n in names if hasattr(m, n)} for m in (proj_mod, ln_mod, rpm_mod)}
        try:
            for m, fns in saved.items():
                for n, k in fns.items():
                    setattr(m, n, _Recorder(k, sink))
            mark = lambda label: events.append((label, len(sink)))  # noqa: E731
            if kind == "single":
                x = t(1, txt + img, hidden)
                ln(x), mark("layernorm_modulate")
                proj_mod._fused_triton(x, t(3 * inner + 2 * mlp, hidden), *norms, t(txt + img, d, dt=torch.float32),
                                       t(txt + img, d, dt=torch.float32), heads, d, mlp, cfg.eps)
                mark("fused_qkv_mlp_proj")
                ar = reduce([([t(1, txt + img, inner), t(1, txt + img, mlp)], t(hidden, inner + mlp))], inner + mlp)
                mark("row_parallel_matmul [attn | mlp]")
                reduces = [ar]
            else:
                xs = [t(1, txt, hidden), t(1, img, hidden)]
                for x in xs:
                    ln(x)
                mark("layernorm_modulate x2")
                qkv, ang, row = t(3, 1, heads, txt + img, d), t(2, txt + img, d // 2, dt=torch.float32), 0
                for x in xs:
                    n = x.shape[1]
                    proj_mod.fused_proj_triton(x, (t(inner, hidden), t(inner, hidden), t(inner, hidden), None),
                                               (None,) * 4, *norms, ang[:, row:row + n], qkv[:, :, :, row:row + n],
                                               None, heads, d, 0, cfg.eps)
                    row += n
                mark("joint_qkv_proj (text, image)")
                ar1 = reduce([([t(1, x.shape[1], inner)], t(hidden, inner)) for x in xs], inner)
                mark("joint row reduce: to_add_out + to_out")
                for x in xs:
                    ln(x)
                mark("layernorm_modulate x2")
                for x in xs:
                    proj_mod.fused_proj_triton(x, (None, None, None, t(2 * mlp, hidden)), (None,) * 4, *norms, None,
                                               None, t(1, x.shape[1], mlp), 0, 128, mlp, 0.0, "swiglu")
                mark("fused_linear_act (SwiGLU) x2")
                ar2 = reduce([([t(1, x.shape[1], mlp)], t(hidden, mlp)) for x in xs], mlp)
                mark("joint row reduce: ff_context + ff linear_out")
                reduces = [ar1, ar2]
        finally:
            for m, fns in saved.items():
                for n, k in fns.items():
                    setattr(m, n, k)
        rows, start, r = [], 0, iter(reduces)
        for label, end in events:
            launches = sink[start:end]
            rows.append((f"{label} ({len(launches)} launch{'es' if len(launches) != 1 else ''})",
                         sum(math.prod(_grid_shape(x)) for x in launches), sum(_launch_bytes(x) for x in launches)))
            if "row" in label:
                rows.append(next(r))
            start = end
        out[kind] = rows
    return out


def format_block_launches(preset: str, tp: int, txt: int, img: int) -> str:
    """:func:`block_launches` as a table: per block kind, each step's launches, programs and DRAM bytes."""
    from tpfuse.tp_layers.flux2.config import Flux2Config

    table = block_launches(Flux2Config.preset(preset), tp, txt, img)
    lines = [f"Per block forward, {preset} TP {tp}, {txt}+{img} tokens, bf16, rank 0 (attention not listed):"]
    for kind, rows in table.items():
        kernel_bytes = sum(b for name, _, b in rows if name != "all_reduce")
        n_reduce = sum(1 for name, _, _ in rows if name == "all_reduce")
        lines.append(f"  {kind}-stream: {kernel_bytes / 2**20:.1f} MiB through DRAM, {n_reduce} all-reduce(s)")
        for name, count, nbytes in rows:
            what = f"{count} chunk(s)" if name == "all_reduce" else f"{count} programs"
            lines.append(f"    {name:<58} {what:>14} {nbytes / 2**20:>9.1f} MiB")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Compile and inspect
# --------------------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _ptxas(arch: int) -> str:
    """The ptxas triton itself uses for ``arch`` (triton 3.9 takes ``ptxas-blackwell``, CUDA 13.x, for sm_90+:
    its PTX is newer than the legacy ``ptxas`` accepts)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):
        return _tool("ptxas")


def _inspect(compiled, result: KernelResult, arch: int) -> None:
    result.shared_bytes = int(compiled.metadata.shared)
    result.num_warps = int(compiled.metadata.num_warps)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/SHARED/LOCAL line: {usage!r}")
        result.registers, result.stack_bytes, _, result.local_bytes = map(int, m.groups())
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        result.sass = analyze_sass(sass)
        result.hgmma_count = sum(result.sass.hgmma_shapes.values())
        result.wgmma = result.hgmma_count > 0 and "wgmma.mma_async" in ptx
        result.cta_limits = ctas_per_sm(result.registers, result.num_warps, result.shared_bytes)
        result.ctas_per_sm = min(result.cta_limits.values())
        if not result.gemm:
            result.instr_per_byte = instr_per_byte(result.sass.path_instructions, result.num_warps, result.grid,
                                                   result.bytes)
        ptx_file = Path(tmp, "k.ptx")
        ptx_file.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        verbose = subprocess.run([_ptxas(arch), f"-arch=sm_{arch}{suffix}", "-v", str(ptx_file), "-o",
                                  str(Path(tmp, "k2.cubin"))], capture_output=True, text=True)
        text = verbose.stdout + verbose.stderr
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if m:
            result.spill_store_bytes, result.spill_load_bytes = map(int, m.groups())


def _shapes(presets: Sequence[str], tp: Sequence[int], tokens: Sequence[tuple[int, int]]):
    from tpfuse.tp_layers.flux2.config import preset_shapes

    return preset_shapes(presets, tp, tokens)


# --------------------------------------------------------------------------------------------------------------
# The CUDA C++ (csrc) kernels: nvcc -> cubin -> the same facts, at the configurations cuda_backend launches
# --------------------------------------------------------------------------------------------------------------

_CSRC_TYPES = {torch.bfloat16: "13__nv_bfloat16", torch.float16: "6__half", torch.float32: "f"}  # Itanium mangling
_CSRC_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# The (token, head) rows per token of the catalogue's qk_norm_rope launches: FLUX.2 klein-4B's and Qwen-Image's 24
# heads at TP 1, the most rows sharing one token's angles (the fewest DRAM bytes per row, so the highest rate).
_CSRC_CATALOGUE_HEADS = 24


def _csrc_symbol(kernel: str, dtype, *args) -> str:
    """The Itanium-mangled name prefix of ``tpfuse::kernel<dtype, args...>`` (ints and bools)."""
    targs = "".join(f"Lb{int(a)}E" if isinstance(a, bool) else f"Li{a}E" for a in args)
    return f"_ZN6tpfuse{len(kernel)}{kernel}I{_CSRC_TYPES[dtype]}{targs}EE"


def _csrc_ln(dtype, tokens: int, d: int, launch: dict, per_token: bool) -> tuple[str, str, str, dict, int]:
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * tokens * d * size + 2 * (tokens if per_token else 1) * d * size  # x in, y out; shift, scale
    mode = "per-token" if per_token else "per-batch"
    if launch["kind"] == 0:
        symbol = _csrc_symbol("ln_mod_vec_kernel", dtype, launch["vec"], launch["nv"], launch["wpr"], launch["tiles"],
                              per_token)
        label = f"{_CSRC_NAMES[dtype]} vector {mode} nv={launch['nv']}"
    else:
        symbol = _csrc_symbol("ln_mod_word_kernel", dtype, launch["nv"], launch["wpr"], launch["tiles"], per_token)
        label = f"{_CSRC_NAMES[dtype]} word {mode} nw={launch['nv']}"
    label += f" wpr={launch['wpr']} tiles={launch['tiles']} rows/block={launch['rows']} smem={launch['smem']}"
    return "csrc layernorm_modulate", symbol, label, launch, nbytes


def _csrc_qk(dtype, rows: int, tokens: int, d: int, launch: dict, rope: bool) -> tuple[str, str, str, dict, int]:
    size = torch.empty((), dtype=dtype).element_size()
    nbytes = 4 * rows * d * size + 2 * d * size + (2 * tokens * (d // 2) * 4 if rope else 0)  # q, k in+out; angles
    rope_label = "rope" if rope else "no-rope"
    if launch["vector"]:
        symbol = _csrc_symbol("qk_norm_rope_vec_kernel", dtype, launch["vec"], launch["tpr"], launch["vpl"],
                              launch["rows"], rope)
        label = f"{_CSRC_NAMES[dtype]} vector {rope_label} vec={launch['vec']} tpr={launch['tpr']} vpl={launch['vpl']}"
    else:
        symbol = _csrc_symbol("qk_norm_rope_pair_kernel", dtype, launch["tpr"], launch["rows"], rope)
        label = f"{_CSRC_NAMES[dtype]} pair {rope_label} tpr={launch['tpr']} pairs/lane={launch['vpl']}"
    label += f" rows/lane={launch['rows']} block={launch['block']}"
    return "csrc qk_norm_rope", symbol, label, launch, nbytes


def _csrc_launches(cfg, tp: int, tokens: int, dtype=torch.bfloat16) -> list[tuple[str, str, str, dict, int]]:
    """(kernel, mangled-name prefix, config label, launch config, DRAM bytes) the csrc launchers pick for a shape
    (one sequence, 16-byte aligned rows): qk_norm_rope with RoPE, layernorm_modulate per batch and per token
    (FLUX.2's KV-extract mode, FLUX.3)."""
    from . import cuda_backend as cb

    heads, d, hidden = cfg.heads // tp, cfg.head_dim, cfg.hidden_size
    qk = cb.qk_launch_config(tokens * heads, d, cb.vector_width(dtype, aligned=True))
    out = [_csrc_qk(dtype, tokens * heads, tokens, d, qk, True)]
    for per_token in (False, True):
        ln = cb.ln_launch_config(1, tokens, hidden, dtype, vector=True, per_token=per_token)
        if ln is not None:
            out.append(_csrc_ln(dtype, tokens, hidden, ln, per_token))
    return out


def _csrc_catalogue(tokens: int) -> list[tuple[str, str, str, str, dict, int]]:
    """(use, kernel, symbol, label, launch, bytes) for every kernel instantiation in csrc/, each at the width it is
    instantiated for (its capacity), ``tokens`` tokens, batch 1, every dtype: the fallbacks (word and pair kernels:
    rows not 16-byte aligned, or widths off the vector shapes) and the shapes no preset uses, so every kernel's
    rate, CALL and 16-bit counts are in the report."""
    from . import cuda_backend as cb

    out = []
    for dtype in _CSRC_TYPES:
        size = torch.empty((), dtype=dtype).element_size()
        vec, epw = 16 // size, 4 // size
        widths = [(nv * wpr * 32 * vec, True) for nv, wpr, _ in cb.LN_VEC_SHAPES]
        widths += [(nw * wpr * 32 * epw, False) for nw, wpr, _ in cb.ln_word_shapes(dtype)]
        for d, vector in widths:
            for per_token in (False, True):
                launch = cb.ln_launch_config(1, tokens, d, dtype, vector=vector, per_token=per_token)
                out.append((f"D={d} {tokens} tokens", *_csrc_ln(dtype, tokens, d, launch, per_token)))
        widths = [(tpr * vpl * vec, vec) for tpr, vpl in cb.QK_VECTOR_SHAPES]
        widths += [(2 * cb.QK_PAIRS_PER_LANE * tpr, cb.vector_width(dtype, aligned=False)) for tpr in cb.QK_PAIR_LANES]
        rows = tokens * _CSRC_CATALOGUE_HEADS
        for d, per_access in widths:
            launch = cb.qk_launch_config(rows, d, per_access)
            for rope in (True, False):
                out.append((f"D={d} {tokens} tokens x {_CSRC_CATALOGUE_HEADS} heads",
                            *_csrc_qk(dtype, rows, tokens, d, launch, rope)))
    return out


def _split_functions(text: str) -> dict[str, str]:
    """``cuobjdump -sass`` of a multi-kernel cubin -> {mangled name: that function's SASS}."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _csrc_report(arch: int, presets: Sequence[str], tp: Sequence[int], tokens: Sequence[tuple[int, int]],
                 dump_dir: Path | None = None) -> list[KernelResult]:
    """Compile ``csrc/*.cu`` for ``arch`` and inspect the kernel instantiations the launchers use at these shapes,
    then every other instantiation at its own width (:func:`_csrc_catalogue`); an instantiation that nothing
    inspects is a failure. With ``dump_dir``, each source's cubin goes there as ``csrc_<name>.cubin``. Empty when
    nvcc is missing (the Triton report stands alone)."""
    from . import cuda_backend as cb

    try:
        nvcc = cb.nvcc_path()
    except cb.CsrcError:
        return []
    results: dict[str, KernelResult] = {}
    smem: dict[str, int] = {}  # dynamic shared memory per launch (cuobjdump counts static only)

    def add(use, kernel, symbol, label, launch, nbytes):
        if symbol not in results:
            grid = launch["grid"] if isinstance(launch["grid"], tuple) else (launch["grid"],)
            results[symbol] = KernelResult(kernel, False, label, [], grid=list(grid), bytes=nbytes,
                                           num_warps=launch["block"] // 32)
            smem[symbol] = launch.get("smem", 0)
        results[symbol].uses.append(use)

    for use, cfg, n, txt, img in _shapes(presets, tp, tokens):
        for entry in _csrc_launches(cfg, n, txt + img):
            add(use, *entry)
    for entry in _csrc_catalogue(sum(tokens[0])):
        if entry[2] not in results:
            add(*entry)
    with tempfile.TemporaryDirectory() as tmp:
        sass, usage, verbose, cubin_of = {}, "", "", {}
        # Both sources at once: each is a few seconds of nvcc per hundred instantiations.
        cubins = [Path(tmp, source.stem + ".cubin") for source in cb.sources()]
        procs = [subprocess.Popen([nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                   "-cubin", "-Xptxas", "-v", str(source), "-o", str(cubin)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for source, cubin in zip(cb.sources(), cubins)]
        logs = [proc.communicate() for proc in procs]
        for source, cubin, proc, (stdout, stderr) in zip(cb.sources(), cubins, procs, logs):
            if proc.returncode != 0:
                for r in results.values():
                    r.error = f"nvcc failed on {source.name}: {stderr.strip().splitlines()[-1:]}"
                return list(results.values())
            verbose += stdout + stderr
            if dump_dir is not None:
                (dump_dir / f"csrc_{cubin.name}").write_bytes(cubin.read_bytes())
            functions = _split_functions(subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                                                        capture_output=True, text=True, check=True).stdout)
            sass.update(functions)
            cubin_of.update(dict.fromkeys(functions, f"csrc_{cubin.name}" if dump_dir is not None else ""))
            usage += subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                                    check=True).stdout
    spills = dict(re.findall(r"Compiling entry function '(\w+)'.*?(\d+ bytes stack frame, \d+ bytes spill "
                             r"stores, \d+ bytes spill loads)", verbose, flags=re.S))
    for symbol, result in results.items():
        name = next((f for f in sass if f.startswith(symbol)), None)
        if name is None:
            result.error = f"no kernel {symbol}... in the csrc cubins"
            continue
        result.ok_compiled = True
        result.cubin = cubin_of[name]
        try:
            m = re.search(re.escape(name) + r":\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
            result.registers, result.stack_bytes, static_shared, result.local_bytes = map(int, m.groups())
            result.shared_bytes = static_shared + smem[symbol]
            result.spill_store_bytes, result.spill_load_bytes = map(
                int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", spills[name]).groups())
            result.sass = analyze_sass(sass[name])
            result.cta_limits = ctas_per_sm(result.registers, result.num_warps, result.shared_bytes)
            result.ctas_per_sm = min(result.cta_limits.values())
            result.instr_per_byte = instr_per_byte(result.sass.path_instructions, result.num_warps, result.grid,
                                                   result.bytes)
        except Exception as exc:  # noqa: BLE001 - reported as a failure of this kernel
            result.error = _one_line(exc)
    # Every instantiation is inspected: a kernel compiled but not in any launch table is reported, not skipped.
    for name in sass:
        if not any(name.startswith(symbol) for symbol in results):
            results[name] = KernelResult("csrc (uninspected)", False, name, ["-"], ok_compiled=True,
                                         error="instantiated in csrc/ but no launch configuration inspects it")
    return sorted(results.values(), key=lambda r: (r.kernel, r.config))


def compile_report(arch: int = 90, presets: Sequence[str] = DEFAULT_PRESETS, tp: Sequence[int] = DEFAULT_TP,
                   tokens: Sequence[tuple[int, int]] = DEFAULT_TOKENS, dump: str | Path | None = None
                   ) -> CompileReport:
    """Compile every kernel at the configurations its launcher uses for the given shapes (see module doc); with
    ``dump``, write each cubin and an ``index.json`` describing them into that directory."""
    if not HAS_TRITON:
        raise RuntimeError("compile_report needs triton installed")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results: dict[str, KernelResult] = {}
    specs = {}
    for use, cfg, n, txt, img in _shapes(presets, tp, tokens):
        for name, gemm, launch in _launches_for(cfg, n, txt + img, txt):
            fn, sig, constexprs, attrs, options = _compile_spec(launch)
            key = json.dumps([name, sig, {k: str(v) for k, v in constexprs.items()},
                              sorted(str(a) for a in attrs), options], sort_keys=True)
            if key not in results:
                results[key] = KernelResult(name, gemm, _config_label(fn, sig, constexprs, attrs, options), [],
                                            grid=_grid_shape(launch), bytes=_launch_bytes(launch))
                specs[key] = (fn, sig, constexprs, attrs, options)
            results[key].uses.append(use)
    order = sorted(results, key=lambda key: (results[key].kernel, results[key].config))
    dump_dir = Path(dump) if dump is not None else None
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(order):
        result = results[key]
        fn, sig, constexprs, attrs, options = specs[key]
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)
        except Exception as exc:  # noqa: BLE001 - a failed compile is a reported failure
            result.error = _one_line(exc)
            continue
        result.ok_compiled = True
        if dump_dir is not None:
            result.cubin = f"{i:02d}_{result.kernel}.cubin"
            (dump_dir / result.cubin).write_bytes(compiled.asm["cubin"])
        try:
            _inspect(compiled, result, arch)
        except Exception as exc:  # noqa: BLE001 - reported as a failure of this kernel, the others still run
            result.error = _one_line(exc)
    report = CompileReport(arch, triton.__version__, [results[key] for key in order]
                           + _csrc_report(arch, presets, tp, tokens, dump_dir))
    if dump_dir is not None:
        (dump_dir / "index.json").write_text(json.dumps([k.to_json() for k in report.kernels], indent=2))
    return report


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _sass_summary(k: KernelResult) -> str:
    """The SASS facts in one line (legend in :func:`format_compile_report`)."""
    s = k.sass
    parts = []
    if s.hgmma_shapes:
        parts.append(f"HGMMA {','.join(s.hgmma_shapes)} x{s.hgmma_per_k_step}/K")
    if s.epilogue_instructions is not None:
        parts.append(f"loop {s.loop_instructions} epi {s.epilogue_instructions}/{s.epilogue_static}")
    else:
        parts.append(f"path {s.path_instructions}" + (f" ({s.loops} loops once)" if s.loops else ""))
    st16 = f"({s.stg_16bit}x16b)" if s.stg_16bit else ""
    parts.append(f"LD {s.ldg_scalar}s/{s.ldg_vector}v ST {s.stg_scalar}s{st16}/{s.stg_vector}v")
    if s.cp_async:
        parts.append("cp.async " + ",".join(f"{n}x{bits}b" for bits, n in s.cp_async.items()))
    parts.append("TMA " + ("+".join(f"{n}x{op}" for op, n in s.tma_ops.items()) if s.tma else "no"))
    parts.append(f"CALL {s.calls} BAR {s.bar_syncs}")
    limit = "/".join(r for r, n in k.cta_limits.items() if n == k.ctas_per_sm)
    parts.append(f"{k.ctas_per_sm} CTA/SM ({limit})")
    parts.append(f"grid {'x'.join(map(str, k.grid))} {k.bytes / 2**20:.1f} MiB ({k.uses[0]})")
    if k.instr_per_byte is not None:
        parts.append(f"{k.instr_per_byte:.3f} instr/B")
    return " | ".join(parts)


def format_compile_report(report: CompileReport) -> str:
    lines = [f"tpfuse compile-report: sm_{report.arch}, triton {report.triton_version}, "
             f"{len(report.kernels)} distinct compilations",
             "SASS line: HGMMA shapes x per K step | main-loop instructions, epilogue longest path/static (per warp) "
             "or the kernel's longest path | global LD/ST scalar(16-bit)/vector | cp.async count x width | TMA | "
             "CALL, BAR.SYNC | CTAs/SM (limited by) | grid, DRAM bytes (at the first shape) | memory-bound: warp "
             f"instructions per DRAM byte (H200 issues ~{H200_INSTR_PER_BYTE})"]
    header = f"{'kernel':<22} {'regs':>4} {'smem KB':>8} {'stack':>5} {'spill B':>8} {'wgmma':>6}  config / used for"
    lines.append(header)
    lines.append("-" * len(header))
    pad = " " * (len(header) - len("config / used for"))
    for k in report.kernels:
        if not k.ok_compiled:
            lines.append(f"{k.kernel:<22} COMPILE FAILED: {k.error}")
            continue
        spills = k.spill_store_bytes + k.spill_load_bytes
        wg = ("yes" if k.wgmma else "NO") if k.gemm else "-"
        lines.append(f"{k.kernel:<22} {k.registers:>4} {k.shared_bytes / 1024:>8.1f} {k.stack_bytes:>5} "
                     f"{spills:>8} {wg:>6}  {k.config}")
        uses = sorted(set(k.uses))
        lines.append(f"{pad}{len(uses)} shapes: {', '.join(uses[:4])}" + (" ..." if len(uses) > 4 else ""))
        lines.append(f"{pad}{_sass_summary(k)}" if k.sass is not None else f"{pad}INSPECTION FAILED: {k.error}")
    lines.append("")
    if report.above_target:
        lines.append(f"Memory-bound targets missed (<= {MAX_INSTR_PER_BYTE} warp instructions per byte, no CALL, no "
                     "16-bit scalar loads):\n  "
                     + "\n  ".join(report.above_target))
    lines.append("PASS" if report.ok else "FAIL:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as `tpfuse`: explicit, no Triton 3.9 warning
    parser = argparse.ArgumentParser(prog="tpfuse compile-report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                        help="comma-separated FLUX.2 presets whose shapes the kernels are compiled for")
    parser.add_argument("--tp", default=",".join(map(str, DEFAULT_TP)), help="tensor-parallel degrees")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--dump", default=None, metavar="DIR",
                        help="write every compiled cubin and an index.json describing them into DIR")


def run(args) -> int:
    report = compile_report(args.arch, [p for p in args.presets.split(",") if p],
                            [int(t) for t in args.tp.split(",") if t], dump=args.dump)
    print(format_compile_report(report))
    presets = [p for p in args.presets.split(",") if p]
    tps = [int(t) for t in args.tp.split(",") if t]
    if presets:
        print()
        print(format_block_launches(presets[0], next((t for t in tps if t > 1), tps[0]), *DEFAULT_TOKENS[0]))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
