"""`tpfuse verify`: the function, the report, and the command's exit status."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tpfuse.tp_layers import cli, run_ranks
from tpfuse.tp_layers.flux2.config import PRESETS
from tpfuse.tp_layers.flux2.presets_table import format_preset_table, param_bytes_per_rank, preset_table
from tpfuse.tp_layers.verify import BlockResult, Check, VerifyResult, format_block, format_report, verify


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
    (["--world-size", "3"], "--world-size 3 is not valid for preset 'tiny': the world size must divide its 4 attention "
                            "heads and its MLP width 192; valid: 1, 2, 4"),
    (["--world-size", "0"], "--world-size 0 is not valid for preset 'tiny'"),
    (["--world-size", "-2"], "--world-size -2 is not valid for preset 'tiny'"),
    (["--preset", "klein-4b", "--world-size", "5"], "--world-size 5 is not valid for preset 'klein-4b': the world "
     "size must divide its 24 attention heads and its MLP width 9216; valid: 1, 2, 3, 4, 6, 8, 12, 24"),
    (["--blocks", "single,triple"], "--blocks must name some of"),
    (["--img-tokens", "0"], "--img-tokens must be >= 1, got 0"),
])
def test_cli_bad_arguments(args, message, capsys):
    assert cli.main(["verify", "--preset", "tiny", *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.splitlines()) == 1, err
    if "--world-size" in args:  # a preset's sizes are known up front: refused before the header
        assert out == ""


def test_cli_world_size_of_a_checkpoint_is_checked_once_its_config_is_read(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_diffusers_kwargs()))
    assert cli.main(["verify", "--model", str(tmp_path), "--world-size", "3"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"tpfuse verify: error: --world-size 3 is not valid for model {tmp_path}: the world "
                                "size must divide its 4 attention heads and its MLP width 192; valid: 1, 2, 4"]


def test_block_report_says_1_call_1_rank_1_run():
    block = BlockResult("single", 1, [Check("out.hidden_states", 0.0, 0.0, 1e-5)], True, 4, 4, 256, 1, 256, 0.01,
                        0.01, "cpu", 1)
    text = format_block(block)
    assert "single-stream block, 1 rank\n" in text and "in 1 call;" in text and "(1 run after a warm-up)" in text
    assert "calls" not in text and "ranks\n" not in text
    block.all_reduce_calls_fwd, block.world_size, block.timing_runs = 2, 2, 3
    text = format_block(block)
    assert "block, 2 ranks" in text and "in 2 calls;" in text and "(median of 3 after a warm-up)" in text


@pytest.fixture(scope="module")
def console_run():
    """``tpfuse verify --preset tiny`` as a user runs it: (stdout lines, stderr); run once for the tests below."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    proc = subprocess.Popen([sys.executable, "-m", "tpfuse.tp_layers.cli", "verify", "--preset", "tiny",
                             "--world-size", "2", "--txt-tokens", "3", "--img-tokens", "5", "--timing-runs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [line.rstrip("\n") for line in proc.stdout]
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    return lines, err


def test_console_script_streams_each_block_and_labels_cpu_times(console_run):
    """The header comes first, each block's report as soon as it is checked (rank 0 prints it, before the next
    block runs), then the verdict; times are a median after a warm-up, labelled CPU; no Triton warning noise."""
    lines, err = console_run
    order = [i for i, text in enumerate(lines) if text.startswith(("tpfuse verify:", "double-stream block",
                                                                    "single-stream block", "PASS"))]
    assert [lines[i].split()[0] for i in order] == ["tpfuse", "double-stream", "single-stream", "PASS"]
    assert sum("CPU time fwd+bwd (median of 2 after a warm-up)" in text for text in lines) == 2
    assert sum("they say nothing about GPU speed" in text for text in lines) == 2
    assert "TRITON_DEFAULT_FP_FUSION" not in err and "Warning" not in err, err


def test_console_script_prints_each_step_in_order(console_run):
    """Between the header and each block's report, one line per step as it starts (starting the ranks, then rank
    0's steps of that block), in the order they run."""
    lines, _ = console_run
    steps = [f"{kind} block: {step}" for kind in ("double", "single") for step in (
        "building the dense block on every rank (random weights, seed 0)",
        "dense reference forward+backward on rank 0, the other ranks wait",
        "timing the dense block (2 timed runs after a warm-up)",
        "sharding over 2 ranks (weight checksums compared, then each rank keeps its slice)",
        "tensor-parallel forward+backward on 2 ranks",
        "timing the tensor-parallel block on 2 ranks (2 timed runs after a warm-up)",
        "comparing every rank's weight-gradient shard with the dense gradient",
    )]
    expected = ["... starting 2 rank processes (gloo)", *(f"... {s}" for s in steps[:7]),
                "double-stream block, 2 ranks", *(f"... {s}" for s in steps[7:]), "single-stream block, 2 ranks",
                "PASS"]
    # The machine may be slow enough for "still running" reminders: they repeat the step they belong to.
    shown = [line for line in lines if line.startswith(("... ", "double-stream", "single-stream", "PASS"))
             and "still running" not in line]
    assert lines[0].startswith("tpfuse verify: preset=tiny") and shown == expected, lines


# What rank 0 printed, with the time it printed it (one list per rank process).
_PRINTED: list[tuple[float, str]] = []


def _print_step(step: str) -> None:
    _PRINTED.append((time.monotonic(), f"... {step}"))


def _print_block(block) -> None:
    _PRINTED.append((time.monotonic(), f"{block.kind}-stream block, {block.world_size} ranks"))


def _rank_main_with_a_slow_step(cfg, delay: float, every: float):
    """verify's rank function, with every rank's dense block taking ``delay`` s longer to build and reminders after
    ``every`` s of silence (patched in this rank process only)."""
    import tpfuse.tp_layers.verify as verify_mod

    build = verify_mod.random_dense_block

    def slow_build(*args, **kwargs):
        time.sleep(delay)
        return build(*args, **kwargs)

    verify_mod.random_dense_block, verify_mod.PROGRESS_EVERY_S = slow_build, every
    verify_mod._rank_main(cfg, ["single"], 1, 3, 5, "float32", 0, None, 0, 1, _print_block, _print_step)
    return _PRINTED


def test_a_slow_step_is_never_silent_for_longer_than_the_reminder_interval():
    """A step that takes longer than the reminder interval (here 2.5 s against 0.5 s; a klein block's steps take
    10-40 s on 2 CPU cores against 6 s) gets "still running" lines, so no gap between lines exceeds the interval
    by more than a loaded machine's scheduling delay; the reminders stop once the block's report is out."""
    printed = run_ranks(_rank_main_with_a_slow_step, 2, PRESETS["tiny"], 2.5, 0.5, timeout=300)
    assert printed[1] == []  # only rank 0 prints
    times, lines = zip(*printed[0])
    building = "... single block: building the dense block on every rank (random weights, seed 0)"
    assert lines[0] == building and lines[-1] == "single-stream block, 2 ranks", lines
    reminders = [line for line in lines if line.startswith(building + ": still running (")]
    assert len(reminders) >= 4, lines  # over 2.5 s of building, a reminder every 0.5 s
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < 2.0, (max(gaps), lines)


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


def _model_param_bytes(name: str, group=None) -> int:
    """Parameter bytes of this rank after ``parallelize(model, group)``: a real tiny model in fp32, the published
    presets as meta models (shapes only) counted in bf16, as the table does."""
    from tpfuse.tp_layers import parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    model = parallelize(random_diffusers_model(PRESETS[name], seed=0, meta=name != "tiny"), group)
    itemsize = 4 if name == "tiny" else 2
    if name == "tiny":
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    return sum(p.numel() for p in model.parameters()) * itemsize


def _param_bytes_at_2_and_4():
    """tiny (real) and klein-4b (meta) parallelized over the world (4 ranks) and over ranks 0 and 1."""
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    out = {(name, 4): _model_param_bytes(name) for name in ("tiny", "klein-4b")}
    if dist.get_rank() < 2:
        out.update({(name, 2): _model_param_bytes(name, pair) for name in ("tiny", "klein-4b")})
    return out


def test_preset_table_bytes_match_parallelized_models_at_world_size_1():
    """Every preset: the table's arithmetic against diffusers' model (all presets but tiny on the meta device)."""
    for name, cfg in PRESETS.items():
        assert param_bytes_per_rank(cfg, 1, "float32" if name == "tiny" else "bfloat16") == \
            _model_param_bytes(name), name


def test_preset_table_bytes_match_parallelized_models_at_world_sizes_2_and_4():
    per_rank = run_ranks(_param_bytes_at_2_and_4, 4, timeout=300)
    for rank, measured in enumerate(per_rank):
        expected = {(name, n): param_bytes_per_rank(PRESETS[name], n, "float32" if name == "tiny" else "bfloat16")
                    for name in ("tiny", "klein-4b") for n in ((4, 2) if rank < 2 else (4,))}
        assert measured == expected, rank


def test_preset_table_lists_valid_world_sizes_and_the_cli_prints_it(capsys):
    rows = {r["name"]: r for r in preset_table()}
    assert list(rows) == ["tiny", "klein-4b", "klein-9b", "dev"]  # smallest first
    assert rows["tiny"]["world_sizes"] == [1, 2, 4] and rows["tiny"]["dtype"] == "float32"
    assert rows["klein-4b"]["world_sizes"] == [1, 2, 3, 4, 6, 8]
    assert rows["klein-4b"]["all_world_sizes"] == [1, 2, 3, 4, 6, 8, 12, 24]
    assert rows["klein-9b"]["world_sizes"] == [1, 2, 4, 8, 16] and rows["dev"]["world_sizes"] == [1, 2, 3, 4, 6, 8, 16]
    assert rows["dev"]["dtype"] == "bfloat16" and set(rows["dev"]["bytes_per_rank"]) == {1, 2, 3, 4, 6, 8, 16}
    # exact: the replicated part plus 1/N of the block matrices
    assert rows["klein-4b"]["bytes_per_rank"][1] == 2 * 3_875_544_576
    assert rows["klein-4b"]["bytes_per_rank"][4] == 2 * (195_042_816 + 3_680_501_760 // 4)
    with pytest.raises(ValueError, match=r"^world_size=5 is not valid for klein-4b: .* valid: 1, 2, 3, 4, 6, 8, "):
        param_bytes_per_rank(PRESETS["klein-4b"], 5)
    with pytest.raises(ValueError, match="dtype must be one of"):
        param_bytes_per_rank(PRESETS["tiny"], 1, "int4")

    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out == format_preset_table() + "\n"
    lines = out.splitlines()
    assert lines[0] == ("| preset | heads | MLP width | valid world sizes | dtype | N=1 | N=2 | N=3 | N=4 | N=6 | N=8 "
                        "| N=16 |")
    assert lines[3] == ("| klein-4b | 24 | 9216 | 1, 2, 3, 4, 6, 8, 12, 24 | bfloat16 | 7.22 GiB | 3.79 GiB | 2.65 GiB "
                        "| 2.08 GiB | 1.51 GiB | 1.22 GiB | — |")


def test_cli_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"tpfuse {version('tpfuse')}\n"
