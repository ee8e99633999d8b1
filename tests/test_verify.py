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


def test_console_script_streams_each_block_and_labels_cpu_times():
    """The header comes first, each block's report as soon as it is checked (rank 0 prints it, before the next
    block runs), then the verdict; times are a median after a warm-up, labelled CPU; no Triton warning noise."""
    import time

    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    proc = subprocess.Popen([sys.executable, "-m", "tpfuse.tp_layers.cli", "verify", "--preset", "tiny",
                             "--world-size", "2", "--txt-tokens", "3", "--img-tokens", "5", "--timing-runs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append((time.monotonic(), line.rstrip()))
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    lines = [text for _, text in seen]
    order = [i for i, text in enumerate(lines) if text.startswith(("tpfuse verify:", "double-stream block",
                                                                    "single-stream block", "PASS"))]
    assert [lines[i].split()[0] for i in order] == ["tpfuse", "double-stream", "single-stream", "PASS"]
    assert sum("CPU time fwd+bwd (median of 2 after a warm-up)" in text for text in lines) == 2
    assert sum("they say nothing about GPU speed" in text for text in lines) == 2
    assert "TRITON_DEFAULT_FP_FUSION" not in err and "Warning" not in err, err


def test_every_option_has_help_and_shows_its_default_once():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"tpfuse {name} {action.option_strings[0]} has no help"
        assert "(default: None)" not in text and text.count("(default: this GPU, else 90)") <= 1, text
        flat = " ".join(text.split())
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                assert flat.count(f"(default: {action.default})") >= 1, (name, action.dest)
    verify_help = " ".join(subparsers["verify"].format_help().split())
    assert "seed of the random weights, inputs and output gradients (default: 0)" in verify_help
