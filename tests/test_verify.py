"""`tpfuse verify`: the function, the report, and the command's exit status."""

import subprocess
import sys

import pytest

from tpfuse.tp_layers import cli
from tpfuse.tp_layers.verify import BlockResult, Check, VerifyResult, format_report, verify


def test_verify_tiny_four_ranks_passes():
    res = verify("tiny", world_size=4, img_tokens=29, txt_tokens=7, batch=2)
    assert res.ok, res.failures
    assert [b.kind for b in res.blocks] == ["double", "single"]
    for b in res.blocks:
        assert b.identical_across_ranks
        assert 0.25 < b.param_bytes_per_rank / b.dense_param_bytes < 0.26  # matrices /4, norms replicated
        # Row-parallel all-reduces carry the full activation: batch * (txt + img) * hidden * 4 bytes per pass,
        # once for the single block, twice (attention outs + MLP outs) for the double block.
        per_pass = 2 * (7 + 29) * 64 * 4
        assert b.all_reduce_bytes_fwd == per_pass * (2 if b.kind == "double" else 1)
    report = format_report(res)
    assert "PASS" in report and "identical on all ranks: yes" in report


def _failing_result():
    block = BlockResult("single", 2, [Check("out.hidden_states", 1.0, 0.5, 1e-5)], False, 1, 2, 0, 0, 0, 0.0, 0.0)
    return VerifyResult("tiny", 2, "float32", "gloo", (7, 29), [block])


def test_failures_are_reported_with_reasons():
    res = _failing_result()
    assert not res.ok
    assert res.failures == ["single block: out.hidden_states relative error 0.5 exceeds tolerance 1e-05",
                            "single block: outputs or input gradients differ between ranks"]
    assert "FAIL" in format_report(res)


def test_cli_exit_status(monkeypatch, capsys):
    import tpfuse.tp_layers.verify as verify_mod

    monkeypatch.setattr(verify_mod, "verify", lambda **kw: _failing_result())
    assert cli.main(["verify", "--preset", "tiny"]) == 1
    assert "exceeds tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--world-size", "3"], "num_attention_heads=4 is not divisible by --world-size 3"),
    (["--blocks", "single,triple"], "--blocks must name some of"),
    (["--img-tokens", "0"], "--img-tokens must be >= 1, got 0"),
])
def test_cli_bad_arguments(args, message, capsys):
    assert cli.main(["verify", "--preset", "tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "tpfuse.tp_layers.cli", "verify", "--preset", "tiny",
                           "--world-size", "2", "--blocks", "single", "--txt-tokens", "3", "--img-tokens", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "single-stream block, 2 ranks" in proc.stdout and "PASS" in proc.stdout
