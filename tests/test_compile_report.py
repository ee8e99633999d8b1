"""Every Triton kernel compiles ahead of time for sm_90 at the configurations its launcher uses for klein-4B,
klein-9B and dev at TP 1/2/4/8: GEMMs use wgmma, shared memory fits, nothing spills, and the SASS rules hold
(n128 HGMMA, no 16-bit scalar stores, bounded epilogues and scalar traffic in GEMMs). No GPU needed.

The SASS reader (loops, longest paths, memory classification), the occupancy and byte arithmetic and each rule
are tested on synthetic inputs; ``--dump`` on one preset."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tpfuse.kernels.compile_report import (MAX_INSTR_PER_BYTE, SHARED_LIMIT, CompileReport, KernelResult, _compile_spec, _grid_shape,
                                           _Launch, _launch_bytes, _Recorder, _tool, analyze_sass, ctas_per_sm,
                                           instr_per_byte, parse_sass)

pytest.importorskip("triton")

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cr")
    out = root / "report.json"
    # One compile of every kernel serves the report tests and the --dump test (~25 s less than two runs).
    proc = subprocess.run([sys.executable, "-m", "tpfuse.kernels.compile_report", "--arch", "90", "--json",
                           str(out), "--dump", str(root / "dump")], capture_output=True, text=True, env=ENV,
                          timeout=900)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text()), root / "dump"


@pytest.fixture(scope="module")
def report(report_run):
    return report_run[:2]


@pytest.fixture(scope="module")
def dump_dir(report_run):
    return report_run[2]


def test_compile_report_passes(report):
    proc, data = report
    assert proc.returncode == 0 and data["ok"], proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


def test_every_kernel_and_shape_is_covered(report):
    _, data = report
    names = {k["kernel"] for k in data["kernels"]}
    assert {"fused_qkv_mlp_proj", "qk_norm_rope.fwd", "qk_norm_rope.bwd", "layernorm_modulate",
            "row_parallel_matmul", "joint_qkv_proj.txt", "joint_qkv_proj.img", "fused_linear_act.swiglu",
            "fused_linear_act.gelu"} <= names
    assert any("GATE=token" in k["config"] for k in data["kernels"])  # the per-token gated epilogue
    assert sum(k["gemm"] for k in data["kernels"]) >= 3  # the fused projection and both row-matmul variants
    uses = {u for k in data["kernels"] for u in k["uses"]}
    for preset in ("klein-4b", "klein-9b", "dev"):
        for tp in (1, 2, 4, 8):
            assert f"{preset} tp{tp} 512+4096" in uses


def test_block_table_lists_each_block_kinds_launches_and_reductions(report_run):
    proc = report_run[0]
    assert "Per block forward, klein-4b TP 2" in proc.stdout
    from tpfuse.kernels.compile_report import block_launches
    from tpfuse.tp_layers.flux2.config import Flux2Config

    table = block_launches(Flux2Config.preset("klein-4b"), 2, 512, 1024)
    names = {kind: [n for n, _, _ in rows] for kind, rows in table.items()}
    assert names["single"].count("all_reduce") == 1 and names["double"].count("all_reduce") == 2
    steps = " ".join(names["double"])
    assert "joint_qkv_proj" in steps and "fused_linear_act" in steps and "qk_norm_rope" not in steps
    assert all(b > 0 for rows in table.values() for _, _, b in rows)


def test_memory_bound_kernels_meet_the_issue_rate_target(report):
    """Triton and csrc memory-bound kernels at every FLUX.2 shape: <= 0.10 warp instructions per DRAM byte, no
    CALL, no 16-bit scalar global loads or stores; forward, training forward (saving 1/rms), backward, joint. The
    csrc kernels are covered wherever nvcc is (CI has it)."""
    _, data = report
    names = {k["kernel"] for k in data["kernels"]}
    assert {"qk_norm_rope.fwd", "qk_norm_rope.fwd+rstd", "qk_norm_rope.bwd", "qk_norm_rope.joint",
            "layernorm_modulate"} <= names
    if shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"):
        assert {"csrc qk_norm_rope", "csrc layernorm_modulate"} <= names
    for k in data["kernels"]:
        if k["gemm"]:
            continue
        label = f"{k['kernel']} [{k['config']}]"
        assert k["calls"] == 0 and k["ldg_16bit"] == 0 and k["stg_16bit"] == 0, label
        assert k["instr_per_byte"] <= MAX_INSTR_PER_BYTE, label
    assert data["above_target"] == []


def test_gemms_use_wgmma_fit_shared_memory_and_never_spill(report):
    _, data = report
    for k in data["kernels"]:
        label = f"{k['kernel']} [{k['config']}]"
        assert k["ok_compiled"], label
        assert not k["gemm"] or (k["wgmma"] and k["hgmma_count"] > 0), label
        assert 0 <= k["shared_bytes"] <= SHARED_LIMIT[90], label
        assert k["spill_store_bytes"] == 0 and k["spill_load_bytes"] == 0, label
        assert k["stack_bytes"] == 0 and k["local_bytes"] == 0, label
        assert 0 < k["registers"] <= 255, label


def test_report_has_the_sass_facts_of_every_kernel(report):
    proc, data = report
    for k in data["kernels"]:
        label = f"{k['kernel']} [{k['config']}]"
        assert k["num_warps"] in (1, 2, 4, 8, 16, 32) and k["grid"] and k["bytes"] > 0, label
        assert 1 <= k["ctas_per_sm"] == min(k["cta_limits"].values()), label
        assert k["path_instructions"] > 0, label
        if k["gemm"]:
            assert k["main_loops"] >= 1 and k["hgmma_per_k_step"] >= 1 and k["loop_instructions"] > 0, label
            assert 0 < k["epilogue_instructions"] <= k["epilogue_static"], label
            assert k["instr_per_byte"] is None, label
        else:
            assert k["instr_per_byte"] > 0, label
    # Three lines per kernel: the table row, the shapes, the SASS facts.
    assert proc.stdout.count(" CTA/SM (") == len(data["kernels"])
    assert proc.stdout.count(" instr/B") == sum(not k["gemm"] for k in data["kernels"])
    assert proc.stdout.count("/K | loop ") == sum(k["gemm"] for k in data["kernels"])


def test_dump_writes_cubins_and_an_index(report, dump_dir):
    proc, data = report
    out = dump_dir
    assert (out / "index.json").exists(), proc.stdout + proc.stderr
    uses = {(k["kernel"], k["config"]): k["uses"] for k in data["kernels"]}
    index = json.loads((out / "index.json").read_text())
    assert {k["kernel"] for k in index} >= {"fused_qkv_mlp_proj", "layernorm_modulate", "row_parallel_matmul"}
    # One cubin per Triton compilation; the csrc kernels of one source share its cubin.
    assert {p.name for p in out.glob("*.cubin")} == {k["cubin"] for k in index}
    for k in index:
        for key in ("kernel", "gemm", "config", "uses", "cubin", "num_warps", "shared_bytes", "grid", "bytes",
                    "instr_per_byte", "hgmma_shapes", "loop_instructions", "epilogue_instructions", "ctas_per_sm",
                    "stg_16bit", "tma"):
            assert key in k, key
        assert k["uses"] and k["uses"] == uses[(k["kernel"], k["config"])]  # the report's kernel, same shapes
        assert (k["instr_per_byte"] is None) == k["gemm"]
        assert (out / k["cubin"]).read_bytes()[:4] == b"\x7fELF"
    # The dumped cubin is the one the facts came from.
    gemm = next(k for k in index if k["gemm"])
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(out / gemm["cubin"])], capture_output=True, text=True,
                          check=True).stdout
    assert analyze_sass(sass).hgmma_shapes == gemm["hgmma_shapes"]


def test_failures_are_detected():
    spilling = KernelResult("gemm", True, "BLOCK_M=128", ["x"], ok_compiled=True, registers=255, shared_bytes=250000,
                            stack_bytes=224, local_bytes=0, spill_store_bytes=176, spill_load_bytes=176, wgmma=False)
    failed = KernelResult("other", False, "", ["x"], error="CompilationError: boom")
    report = CompileReport(90, "x", [spilling, failed])
    assert not report.ok
    text = "\n".join(report.failures)
    for needle in ("does not use wgmma", "shared memory 250000 B exceeds", "spills 176 B", "stack frame 224 B",
                   "failed to compile: CompilationError: boom"):
        assert needle in text


# --------------------------------------------------------------------------------------------------------------
# The SASS reader on synthetic SASS
# --------------------------------------------------------------------------------------------------------------


def _sass(*program: str) -> str:
    """``cuobjdump -sass``-style text: one instruction per entry, 16 bytes apart, each followed by its encoding
    line; an entry ``name:`` labels the next instruction and ``{name}`` in an instruction is its address."""
    labels, addr = {}, 0
    for entry in program:
        if entry.endswith(":"):
            labels[entry[:-1]] = f"{addr:#x}"
        else:
            addr += 16
    lines, addr = ["", "\tcode for sm_90a", "\t\tFunction : synthetic_kernel"], 0
    for entry in program:
        if entry.endswith(":"):
            continue
        text = entry.format(**labels)
        lines.append(f"        /*{addr:04x}*/                   {text if text.endswith(';') else text + ' ;'}"
                     "                   /* 0x000fe20000000a00 */")
        lines.append(" " * 103 + "/* 0x000fc80000000000 */")
        addr += 16
    return "\n".join(lines + ["\t\t.........."])


GEMM_SASS = _sass(
    "S2R R0, SR_TID.X",
    "ISETP.GE.AND P0, PT, R0, 0x1, PT",
    "@!P0 BRA {epilogue}",  # K == 0: skip the loop
    "loop:",
    "LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64]",
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24",
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24, gsb0",
    "IADD3 R0, R0, -0x1, RZ",
    "ISETP.NE.AND P0, PT, R0, RZ, PT",
    "@P0 BRA {loop}",
    "epilogue:",
    "ISETP.NE.AND P1, PT, R5, RZ, PT",
    "@P1 BRA {mlp}",
    "FMUL R4, R24, R25", "FMUL R5, R26, R27", "FMUL R6, R28, R29", "FMUL R7, R30, R31",  # the long branch
    "STG.E.128 desc[UR4][R2.64], R4",
    "EXIT",
    "mlp:",
    "FMUL R4, R24, R25",
    "STG.E.U16 desc[UR4][R2.64], R4",
    "EXIT",
    "end:",
    "BRA {end};",  # padding after the final EXIT: not code
    "NOP;", "NOP;",
)


def test_parse_sass_reads_guards_opcodes_and_addresses():
    instrs = parse_sass(GEMM_SASS)
    assert len(instrs) == 23  # the encoding lines are not instructions
    assert (instrs[2].addr, instrs[2].guard, instrs[2].opcode, instrs[2].operands) == (0x20, "@!P0", "BRA", "0x90")
    assert instrs[4].op == "HGMMA" and instrs[4].modifiers == ["64x128x16", "F32", "BF16"]
    assert instrs[-1].opcode == "NOP"


def test_loop_epilogue_longest_path_and_classification():
    s = analyze_sass(GEMM_SASS)
    assert (s.loops, s.main_loops, s.loop_instructions, s.hgmma_per_k_step) == (1, 1, 6, 2)
    assert s.hgmma_shapes == {"64x128x16": 2} and s.hgmma_min_n == 128
    # After the loop: Q/K-like branch 2 + 4 FMUL + STG + EXIT = 8; MLP-like branch 2 + 3 = 5; 11 in all.
    assert (s.epilogue_instructions, s.epilogue_static) == (8, 11)
    assert s.path_instructions == 3 + 6 + 8  # the loop once; the padding never counts
    assert (s.stg_scalar, s.stg_16bit, s.stg_vector, s.ldg_scalar, s.ldg_vector) == (1, 1, 1, 0, 0)
    assert s.cp_async == {"128": 1} and not s.tma and s.calls == 0 and s.bar_syncs == 0


def test_persistent_kernel_main_loop_is_the_innermost_hgmma_loop_and_calls_are_not_followed():
    s = analyze_sass(_sass(
        "CALL.REL.NOINC {divmod}",  # one instruction; the callee is not on the path
        "MOV R1, R12",
        "tile:",
        "LDG.E R2, desc[UR4][R4.64]",
        "LDG.E.U16 R3, desc[UR4][R4.64]",
        "LDG.E.LTC128B R3, desc[UR4][R4.64]",  # an L2 hint, not a width
        "LDG.E.64 R6, desc[UR4][R4.64]",
        "LDG.E.LTC128B.128 R8, desc[UR4][R4.64]",
        "kloop:",
        "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24",
        "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24",
        "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",
        "@P0 BRA {kloop}",
        "STG.E desc[UR4][R4.64], R2",
        "STG.E.64 desc[UR4][R4.64], R6",
        "UTMALDG.2D [UR8], [UR4]",
        "UTMASTG.2D [UR4], [UR8]",
        "UBLKCP.S.G [UR4], [UR6], UR8",
        "LDGDEPBAR",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "BAR.ARV 0x1, 0x100",
        "@P1 BRA {tile}",  # the persistent tile loop
        "EXIT",
        "divmod:",
        "LDG.E.128 R8, desc[UR4][R4.64]",
        "RET.REL.NODEC R20 0x0",
        "end:",
        "BRA {end};",
    ))
    assert (s.loops, s.main_loops, s.loop_instructions, s.hgmma_per_k_step) == (2, 1, 4, 3)
    assert s.hgmma_min_n == 256 and s.hgmma_shapes == {"64x256x16": 3}
    assert (s.epilogue_instructions, s.epilogue_static) == (10, 10)  # STG .. EXIT, the tile loop once
    assert s.path_instructions == 2 + 5 + 4 + 10
    assert (s.ldg_scalar, s.ldg_vector, s.stg_scalar, s.stg_vector, s.stg_16bit) == (3, 2, 1, 1, 0)
    assert s.tma and s.tma_ops == {"UBLKCP": 1, "UTMALDG": 1, "UTMASTG": 1}
    assert (s.calls, s.bar_syncs, s.cp_async) == (1, 1, {})


def test_a_retry_block_after_the_exit_belongs_to_the_loop_it_returns_to():
    # What Triton's TMA pipelines compile to: the mbarrier wait's retry loop sits after the EXIT and branches back
    # into the middle of the K loop (a backward branch that is not the K loop's).
    s = analyze_sass(_sass(
        "UTMALDG.2D [UR8], [UR16]",
        "kloop:",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11+0x20000], R6",
        "@!P0 BRA {retry}",
        "resume:",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR24], R24",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR24], R24, gsb0",
        "@UP2 UTMALDG.2D [UR12], [UR16]",
        "@P0 BRA {kloop}",
        "F2FP.BF16.F32.PACK_AB R4, R25, R24",
        "STS.128 [R3], R4",
        "UTMASTG.2D [UR12], [UR10]",
        "EXIT",
        "retry:",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR11+0x20000], R6",
        "@!P0 BRA {retry}",
        "BRA {resume}",
        "end:",
        "BRA {end};",
    ))
    assert (s.loops, s.main_loops, s.hgmma_per_k_step) == (2, 1, 2)
    assert s.loop_instructions == 6 + 3  # the K loop and its retry block
    assert (s.epilogue_instructions, s.epilogue_static) == (4, 4)
    assert s.path_instructions == 1 + 2 + 3 + 4 + 4  # through the retry block, each loop once
    assert s.tma_ops == {"UTMALDG": 2, "UTMASTG": 1}


def test_two_k_loops_epilogue_follows_the_last():
    s = analyze_sass(_sass(
        "k0:", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "@P0 BRA {k0}",
        "MOV R1, RZ",
        "k1:", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
        "IADD3 R1, R1, 0x1, RZ", "@P0 BRA {k1}",
        "STG.E.128 desc[UR4][R4.64], R8", "EXIT",
    ))
    assert (s.main_loops, s.hgmma_per_k_step, s.loop_instructions, s.hgmma_min_n) == (2, 2, 4, 64)
    assert (s.epilogue_instructions, s.epilogue_static) == (2, 2)


def test_longest_path_follows_unconditional_branches_and_predicated_exits():
    s = analyze_sass(_sass(
        "@P0 EXIT",  # predicated: may fall through
        "BRA {b}",
        "FADD R1, R1, R1", "FADD R1, R1, R1", "FADD R1, R1, R1",  # jumped over: never executed
        "b:",
        "BSSY B0, {c}",  # a reconvergence point, not a jump
        "@P1 BRA {c}",
        "FMUL R1, R1, R1", "FMUL R1, R1, R1",
        "c:",
        "BSYNC B0",
        "WARPSYNC 0xffffffff",
        "EXIT",
    ))
    assert s.path_instructions == 9
    assert (s.loops, s.main_loops, s.epilogue_instructions, s.epilogue_static) == (0, 0, None, None)


@pytest.mark.parametrize("program, message", [
    (("BRX R2 -0x10", "EXIT"), "indirect branch"),
    (("@P0 BRA 0x999", "EXIT"), "no instruction at its target"),
    (("HGMMA.BAD R24, gdesc[UR8], R24", "EXIT"), "cannot read the shape"),
])
def test_unreadable_sass_raises(program, message):
    with pytest.raises(ValueError, match=message):
        analyze_sass(_sass(*program))


def test_parse_sass_rejects_empty_and_multi_kernel_text():
    with pytest.raises(ValueError, match="no SASS instructions"):
        parse_sass("\tcode for sm_90a\n")
    with pytest.raises(ValueError, match="found 2 functions"):
        parse_sass(_sass("EXIT") + _sass("EXIT"))


# --------------------------------------------------------------------------------------------------------------
# Occupancy, grid and bytes
# --------------------------------------------------------------------------------------------------------------


def test_ctas_per_sm():
    # 222 registers -> 224 x 32 = 7168 per warp; 65536 // 7168 = 9 warps = one 8-warp CTA; 128 KB + 1 KB: one.
    assert ctas_per_sm(222, 8, 128 * 1024) == {"registers": 1, "threads": 8, "shared": 1, "blocks": 32}
    # 33 registers -> 1056 per warp, rounded up to 1280: 51 warps = 6 CTAs of 8 warps.
    assert ctas_per_sm(33, 8, 0)["registers"] == 6
    assert ctas_per_sm(32, 8, 0)["registers"] == 8
    # Shared memory: 228 KB per SM, 1 KB reserved per CTA.
    assert ctas_per_sm(32, 4, 113 * 1024)["shared"] == 2
    assert ctas_per_sm(32, 4, 113 * 1024 + 1)["shared"] == 1
    assert ctas_per_sm(16, 1, 0) == {"registers": 128, "threads": 64, "shared": 228, "blocks": 32}
    with pytest.raises(ValueError, match="registers > 0"):
        ctas_per_sm(-1, 8, 0)


def test_recorder_keeps_the_grid_and_callable_grids_get_the_meta_dict():
    from tpfuse.kernels.layernorm_modulate import _ln_mod_fwd_kernel  # x_ptr, shift_ptr, scale_ptr, y_ptr, S, ...

    sink = []
    _Recorder(_ln_mod_fwd_kernel, sink)[(7, 2)](1, 2, 3, 4, 640, BLOCK_D=64)
    assert sink[0].grid == (7, 2) and _grid_shape(sink[0]) == [7, 2]
    launch = _Launch(_ln_mod_fwd_kernel, lambda meta: (meta["S"] // meta["BLOCK_D"] + 1, 3), (0, 0, 0, 0, 640),
                     {"BLOCK_D": 64})
    assert _grid_shape(launch) == [11, 3]


def test_compile_spec_fills_in_parameter_defaults():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr = 64):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros((BLOCK,), tl.float32), mask=tl.arange(0, BLOCK) < n)

    x = torch.empty(8, device="meta")
    _, signature, constexprs, _, _ = _compile_spec(_Launch(kernel, (1,), (x, 32), {"num_warps": 1}))
    assert signature == {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"} and constexprs == {"BLOCK": 64}
    with pytest.raises(TypeError, match="passes no value for n"):
        _compile_spec(_Launch(kernel, (1,), (x,), {}))


def test_launch_bytes_counts_each_storage_extent_once():
    bf16 = {"device": "meta", "dtype": torch.bfloat16}
    a, b = torch.empty(10, 64, **bf16), torch.empty(64, **bf16)

    def nbytes(*args, **kwargs):
        return _launch_bytes(_Launch(None, (1,), args, kwargs))

    assert nbytes(a, b, 5, 1.0) == (640 + 64) * 2
    assert nbytes(a, b, a) == (640 + 64) * 2  # a dummy pointer aliasing a real argument
    assert nbytes(a[2:5]) == 3 * 64 * 2  # a row range covers its rows only
    assert nbytes(a[2:5], a[4:8]) == 6 * 64 * 2  # overlapping views: the union
    assert nbytes(a[:, 0]) == (9 * 64 + 1) * 2  # a strided view: the extent it spans
    assert nbytes(a[:0], BLOCK=b) == 64 * 2  # empty tensors move nothing; keyword tensors count
    assert instr_per_byte(100, 4, [3, 2], 1200) == 2.0
    with pytest.raises(ValueError, match="no DRAM bytes"):
        instr_per_byte(100, 4, [3, 2], 0)


# --------------------------------------------------------------------------------------------------------------
# The SASS rules
# --------------------------------------------------------------------------------------------------------------


def _sass_facts(**overrides):
    facts = analyze_sass(GEMM_SASS)  # n128, one 16-bit store
    facts.stg_16bit = facts.stg_scalar = 0
    for k, v in overrides.items():
        setattr(facts, k, v)
    return facts


def _result(gemm=True, ctas=1, **sass):
    return KernelResult("k", gemm, "cfg", ["x"], ok_compiled=True, registers=128, shared_bytes=1024, stack_bytes=0,
                        local_bytes=0, spill_store_bytes=0, spill_load_bytes=0, wgmma=True, hgmma_count=2,
                        ctas_per_sm=ctas, sass=_sass_facts(**sass))


def test_a_clean_kernel_passes_the_sass_rules():
    assert _result().failures(SHARED_LIMIT[90]) == []
    assert _result(gemm=False).failures(SHARED_LIMIT[90]) == []


@pytest.mark.parametrize("gemm, ctas, sass, message", [
    (True, 1, {"hgmma_min_n": 64, "hgmma_shapes": {"64x64x16": 8}}, "HGMMA n64 (64x64x16) is narrower than n128"),
    (True, 1, {"stg_16bit": 1, "stg_scalar": 1}, "1 16-bit scalar global stores"),
    (False, 4, {"stg_16bit": 64, "stg_scalar": 64}, "64 16-bit scalar global stores"),
    (True, 1, {"epilogue_instructions": 901}, "epilogue of 901 instructions per warp (longest path) at 1 CTA/SM"),
    (True, 1, {"ldg_scalar": 20, "stg_scalar": 13}, "20 scalar global loads + 13 scalar global stores exceed 32"),
])
def test_each_sass_rule_fails(gemm, ctas, sass, message):
    failures = _result(gemm, ctas, **sass).failures(SHARED_LIMIT[90])
    assert len(failures) == 1 and message in failures[0], failures


@pytest.mark.parametrize("gemm, ctas, sass", [
    (False, 1, {"hgmma_min_n": 64, "hgmma_shapes": {"64x64x16": 8}}),  # only GEMMs need n128
    (True, 1, {"epilogue_instructions": 900}),  # at the limit
    (True, 2, {"epilogue_instructions": 5000}),  # another CTA overlaps the epilogue
    (False, 1, {"epilogue_instructions": 5000}),
    (True, 1, {"ldg_scalar": 20, "stg_scalar": 12}),  # 32 scalar accesses: at the limit
    (False, 1, {"ldg_scalar": 200}),  # memory-bound kernels may load scalars
])
def test_sass_rules_do_not_fire_below_their_limits(gemm, ctas, sass):
    assert _result(gemm, ctas, **sass).failures(SHARED_LIMIT[90]) == []


def test_memory_bound_targets_are_listed_not_failed():
    k = _result(gemm=False, ldg_16bit=3, calls=2)
    k.instr_per_byte = 0.13
    assert k.failures(SHARED_LIMIT[90]) == []
    assert k.above_target() == ["k [cfg]: 0.130 warp instructions per DRAM byte > 0.1", "k [cfg]: 2 CALL (int64 "
                                "division slow paths)", "k [cfg]: 3 16-bit scalar global loads"]
    k.instr_per_byte, k.sass.calls, k.sass.ldg_16bit = MAX_INSTR_PER_BYTE, 0, 0
    assert k.above_target() == []
    gemm = _result()
    gemm.instr_per_byte = None
    assert gemm.above_target() == []  # GEMMs are judged by the GEMM rules


def test_an_inspection_error_is_a_failure():
    k = _result()
    k.error = "CalledProcessError: cuobjdump"
    assert k.failures(SHARED_LIMIT[90]) == ["k [cfg]: compiled, but inspecting it failed: CalledProcessError: "
                                            "cuobjdump"]
