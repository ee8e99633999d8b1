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
    assert commands[1] == "pip install . && tpfuse verify"
    test_command = commands[2]
    assert "pytest" in test_command
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
