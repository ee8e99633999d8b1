"""The README's commands stay true: CI runs exactly the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = _commands()
    # The CPU torch wheel comes first (before any command that would pull torch), then the main job, then tests.
    assert commands[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    # The first check: the 15-second tiny preset, or the klein-4b default.
    assert commands[1] in ("pip install . && tpfuse verify --preset tiny", "pip install . && tpfuse verify")
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_api_example_runs_under_torchrun(tmp_path):
    import subprocess
    import sys

    code = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_process_group_in_the_docs_and_examples_has_a_timeout():
    """A rank that fails mid-step must not leave its peers blocked in a collective for torch's default."""
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "examples").glob("*.py")})
    calls = [(name, call) for name, text in texts.items()
             for call in re.findall(r"init_process_group\((.*?)\)\n", text)]
    assert calls
    assert all("timeout=" in call for _, call in calls), [c for c in calls if "timeout=" not in c[1]]


def test_diffusers_extra_brings_the_real_model_path_and_the_test_extra_includes_it():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", r)[0] for r in extras["diffusers"]}
    assert {"diffusers", "transformers"} <= names
    assert "tpfuse[diffusers,bench]" in extras["test"]
    assert 'pip install ".[diffusers]"' in (ROOT / "README.md").read_text()


def test_readme_preset_table_is_what_tpfuse_presets_prints():
    """The README's preset table (heads, valid world sizes, parameter bytes per rank) is `tpfuse presets`' output,
    computed from the model structure: a change of the presets or of the sharding shows up here."""
    from tpfuse.tp_layers.flux2.presets_table import format_preset_table

    assert format_preset_table() in (ROOT / "README.md").read_text()


def _lora_example(snippet, folder):
    import os

    import torch
    from peft import LoraConfig

    from tpfuse.tp_layers import Flux2Config, parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    tiny = Flux2Config.preset("tiny")
    dense = random_diffusers_model(tiny, seed=0)
    dense.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_out.0"], init_lora_weights=False),
                      adapter_name="style")
    os.chdir(folder)
    if torch.distributed.get_rank() == 0:
        dense.save_lora_adapter("my_lora", adapter_name="style")
    torch.distributed.barrier()
    x = dict(hidden_states=torch.randn(1, 6, tiny.in_channels), encoder_hidden_states=torch.randn(1, 3, 32),
             timestep=torch.tensor([0.5]), img_ids=torch.zeros(6, 4), txt_ids=torch.zeros(3, 4))
    with torch.no_grad():
        expected = dense(**x).sample
    model = parallelize(random_diffusers_model(tiny, seed=0))
    exec(snippet, {"model": model})
    with torch.no_grad():
        return (model(**x).sample - expected).abs().max().item(), sorted(os.listdir("my_lora_copy"))


def test_readme_lora_example_runs_on_2_ranks(tmp_path):
    """The README's 6-line LoRA example loads a dense adapter into a parallelized model (checked), saves it, fuses
    it: the output equals the dense model with the adapter."""
    from tpfuse.tp_layers import run_ranks

    snippet = next(c for c in re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
                   if "load_lora_adapter" in c)
    assert len(snippet.splitlines()) == 6
    for err, files in run_ranks(_lora_example, 2, snippet, str(tmp_path), timeout=300):
        assert err < 1e-5 and files == ["pytorch_lora_weights.safetensors"]


def test_readme_plan_tables_are_what_tpfuse_plan_prints():
    """The whole-pipeline recipe's per-rank memory tables, recommendations and launch lines are `tpfuse plan`'s
    output for those GPUs: a change of the configs, the estimates or the scaling model shows up here."""
    from tpfuse.tp_layers.plan import format_plan, plan_pipeline

    readme = (ROOT / "README.md").read_text()
    for model, gpus, memory in (("dev", 2, 80), ("dev", 4, 80), ("dev", 8, 80), ("klein-4b", 1, 24),
                                ("klein-9b", 2, 24)):
        assert f"`tpfuse plan --model {model} --gpus {gpus} --gpu-memory {memory}`:" in readme
        text = format_plan(plan_pipeline(model, gpus, memory))
        table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        assert table in readme, (model, gpus, table)
        for line in text.splitlines():
            if line.startswith("Recommended") or line.strip().startswith("torchrun"):
                assert line.strip() in readme, line
