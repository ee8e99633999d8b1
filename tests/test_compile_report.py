"""Every Triton kernel compiles ahead of time for sm_90 at the configurations its launcher uses for klein-4B,
klein-9B and dev at TP 1/2/4/8: GEMMs use wgmma, shared memory fits, nothing spills. No GPU needed."""

import json
import os
import subprocess
import sys

import pytest

from tpfuse.kernels.compile_report import SHARED_LIMIT, CompileReport, KernelResult

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("cr") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real kernels
    proc = subprocess.run([sys.executable, "-m", "tpfuse.kernels.compile_report", "--arch", "90", "--json",
                           str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert out.exists(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def test_compile_report_passes(report):
    proc, data = report
    assert proc.returncode == 0 and data["ok"], proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


def test_every_kernel_and_shape_is_covered(report):
    _, data = report
    names = {k["kernel"] for k in data["kernels"]}
    assert {"fused_qkv_mlp_proj", "qk_norm_rope.fwd", "qk_norm_rope.bwd", "layernorm_modulate",
            "row_parallel_matmul"} <= names
    assert sum(k["gemm"] for k in data["kernels"]) >= 3  # the fused projection and both row-matmul variants
    uses = {u for k in data["kernels"] for u in k["uses"]}
    for preset in ("klein-4b", "klein-9b", "dev"):
        for tp in (1, 2, 4, 8):
            assert f"{preset} tp{tp} 512+4096" in uses


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
