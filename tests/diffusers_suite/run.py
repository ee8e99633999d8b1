"""Run diffusers' model and pipeline tests of one model family (FLUX.2 by default) dense, and with every model of the
family's class parallelized by tpfuse at world size 1 and 2, then write a summary (counts per run, and every test
that fails parallelized but not dense).

    python tests/diffusers_suite/run.py                          # FLUX.2: all runs, models then pipelines
    python tests/diffusers_suite/run.py --family qwenimage       # Qwen-Image's tests instead
    python tests/diffusers_suite/run.py --runs ws2 --part models -k "save or load"
    python tests/diffusers_suite/run.py --diffusers-src ~/diffusers   # a checkout's tests/ instead of the mirror

Runs: ``dense`` (world size 1, nothing patched: the baseline), ``ws1`` (parallelized, plain pytest), ``ws2``
(parallelized, ``torchrun --nproc-per-node 2 -m pytest``: both ranks run the same tests in the same order), ``ws3``
(the same on 3 ranks, not run by default: Qwen-Image's pipeline tests build a 3-head transformer, which 2 ranks
cannot divide), and, not
run by default, ``dense2``: nothing patched under the same torchrun launch (a process group of 2 exists), the control
that tells a failure of tpfuse's from one of diffusers' own under torch.distributed. Results go
to ``OUT/results/RUN-PART[.rankN].jsonl`` (one line per test, see plugin.py), logs to ``OUT/logs/``, the summary to
``OUT/summary.md`` and ``OUT/summary.json`` (built from every results file present, so runs can be split), where
``OUT`` is ``WORK`` for FLUX.2 (the layout before families existed) and ``WORK/FAMILY`` for the others; the extracted
tests (``WORK/src``) and the tokenizer stand-ins (``WORK/hub``) are shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIRROR = Path("/work/.mirror/huggingface+diffusers/repo")
PART_NAMES = ("models", "pipelines")
# family -> (title, the diffusers class the plugin parallelizes, {part: test files}); parts None: the diffusers tests
# have none for the family yet (see check_family).
FAMILIES: dict[str, tuple[str, str, dict[str, list[str]] | None]] = {
    "flux2": ("FLUX.2", "Flux2Transformer2DModel", {
        "models": ["tests/models/transformers/test_models_transformer_flux2.py"],
        "pipelines": ["tests/pipelines/flux2/test_pipeline_flux2.py",
                      "tests/pipelines/flux2/test_pipeline_flux2_klein.py",
                      "tests/pipelines/flux2/test_pipeline_flux2_klein_inpaint.py",
                      "tests/pipelines/flux2/test_pipeline_flux2_klein_kv.py"],
    }),
    "qwenimage": ("Qwen-Image", "QwenImageTransformer2DModel", {
        "models": ["tests/models/transformers/test_models_transformer_qwenimage.py"],
        "pipelines": ["tests/pipelines/qwenimage/test_qwenimage.py"],
    }),
    # diffusers has the model class, but the mirror's HEAD (58eb52c) has no test of it: nothing to run
    "flux3": ("FLUX.3", "Flux3Transformer2DModel", None),
}
RUNS = ("dense", "ws1", "ws2", "ws3", "dense2")
DENSE = ("dense", "dense2")
TORCHRUN = ("ws2", "ws3", "dense2")
NPROC = {"ws3": 3}  # torchrun's ranks per run (2 otherwise): ws3 for test models whose heads 2 does not divide
BAD = ("failed", "error")

# Markers diffusers registers in its own pyproject/setup.cfg (tests/conftest.py registers the rest); no addopts, so
# that nothing of tpfuse's pytest configuration (xdist, import mode) applies.
PYTEST_INI = """[pytest]
markers =
    cache: cache tests
    autoround: AutoRound quantization tests
"""


def out_dir(work: Path, family: str) -> Path:
    """Where a family's results, logs and summary go: ``WORK`` itself for FLUX.2 (unchanged from before families),
    ``WORK/FAMILY`` for the others, so that families never overwrite each other's results."""
    return work if family == "flux2" else work / family


def _test_files(src: Path | None) -> list[str]:
    """The paths under ``tests/`` of a diffusers checkout, or of the mirror's HEAD."""
    if src is not None:
        return [str(p.relative_to(src)) for p in (src / "tests").rglob("*") if p.is_file()]
    return subprocess.run(["git", "-C", str(MIRROR), "ls-tree", "-r", "HEAD", "--name-only", "tests"], check=True,
                          capture_output=True, text=True).stdout.splitlines()


def check_family(family: str, src: Path | None) -> str | None:
    """Why ``family`` cannot run (a message), or None. A family without parts has no diffusers tests to run: the
    message says whether the test tree (the mirror's HEAD or ``--diffusers-src``) has any file naming it."""
    title, _cls, parts = FAMILIES[family]
    if parts is not None:
        return None
    where = f"{src}" if src is not None else f"the diffusers mirror {MIRROR} (HEAD)"
    try:
        found = [f for f in _test_files(src) if family in f.lower()]
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"--family {family}: no {title} tests are configured, and {where} could not be listed ({exc})"
    if not found:
        return (f"--family {family}: {where} has no {title} tests (no path under tests/ contains {family!r}), so "
                "there is nothing to run")
    return (f"--family {family}: {where} has {title} test files ({', '.join(found[:5])}"
            f"{' ...' if len(found) > 5 else ''}) but run.py does not list them yet: add them to FAMILIES")


def extract(src: Path | None, work: Path) -> Path:
    """diffusers' ``tests/`` into ``WORK/src`` (from a checkout, or ``git archive`` of the mirror's HEAD)."""
    dest = work / "src"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if src is not None:
        shutil.copytree(src / "tests", dest / "tests")
        origin = str(src)
    else:
        blob = subprocess.run(["git", "-C", str(MIRROR), "archive", "HEAD", "tests"], check=True,
                              capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(dest, filter="data")
        head = subprocess.run(["git", "-C", str(MIRROR), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
        origin = f"{MIRROR} @ {head}"
    (dest / "pytest.ini").write_text(PYTEST_INI)
    (work / "origin.txt").write_text(origin + "\n")
    return dest


def env_for(work: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_CACHE=str(work / "hub"), HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join(filter(None, [str(HERE),
                                                                                     env.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def pytest_args(run: str, part: str, out_root: Path, args) -> list[str]:
    _title, model_class, parts = FAMILIES[args.family]
    out = ["-p", "plugin", f"--tpfuse-mode={'dense' if run in DENSE else 'parallel'}",
           f"--tpfuse-class={model_class}",
           f"--tpfuse-results={out_root / 'results' / f'{run}-{part}.jsonl'}",
           f"--tpfuse-pg-timeout={args.pg_timeout}",
           "-p", "no:randomly", "-p", "no:xdist", "-p", "no:cacheprovider", "-c", "pytest.ini", "--rootdir", ".",
           "-q", "-rfE", "--tb=short"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        out.append(f"--timeout={args.timeout}")
    if args.k:
        out += ["-k", args.k]
    return out + parts[part] + list(args.pytest_args)


def run_one(run: str, part: str, work: Path, args) -> dict:
    src = work / "src"
    out_root = out_dir(work, args.family)
    for old in (out_root / "results").glob(f"{run}-{part}*.jsonl"):
        old.unlink()
    log = out_root / "logs" / f"{run}-{part}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest"]
    if run in TORCHRUN:
        # --standalone: a free rendezvous port; each rank's output to its own file under WORK/logs/RUN-PART/
        rank_logs = out_root / "logs" / f"{run}-{part}"
        shutil.rmtree(rank_logs, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(NPROC.get(run, 2)),
               "--log-dir", str(rank_logs), "--redirects", "3", "-m", "pytest"]
    cmd += pytest_args(run, part, out_root, args)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.time()
    print(f"[{started}] {run} {part}: {' '.join(cmd)}", flush=True)
    with log.open("w") as fh:
        fh.write(f"# {started}  cwd={src}\n# {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, cwd=src, env=env_for(work, args.threads), stdout=fh, stderr=subprocess.STDOUT,
                            timeout=args.run_timeout).returncode
    info = {"run": run, "part": part, "family": args.family, "started": started, "seconds": round(time.time() - t0),
            "rc": rc, "log": str(log)}
    (out_root / "results" / f"{run}-{part}.meta.json").write_text(json.dumps(info))
    print(f"    rc={rc} in {info['seconds']} s; log {log}", flush=True)
    return info


def load_results(out_root: Path) -> tuple[dict, dict]:
    """{run: {nodeid: line}} (at world size 2: the worse outcome of the ranks, with every rank's kept) and the
    runs' meta information, from a family's ``OUT/results``."""
    results: dict[str, dict[str, dict]] = {}
    meta: dict[str, list] = {}
    for f in sorted((out_root / "results").glob("*.jsonl")):
        run = f.name.split("-", 1)[0]
        table = results.setdefault(run, {})
        for raw in f.read_text().splitlines():
            line = json.loads(raw)
            prev = table.get(line["nodeid"])
            ranks = (prev or {}).get("ranks", {})
            ranks[line["rank"]] = line["outcome"]
            if prev is None or (line["outcome"] in BAD and prev["outcome"] not in BAD):
                prev = line
            prev["ranks"] = ranks
            table[line["nodeid"]] = prev
    for f in sorted((out_root / "results").glob("*.meta.json")):
        info = json.loads(f.read_text())
        meta.setdefault(info["run"], []).append(info)
    return results, meta


def summarise(work: Path, family: str = "flux2") -> str:
    out_root = out_dir(work, family)
    results, meta = load_results(out_root)
    dense = results.get("dense", {})
    rows = ["| run | passed | failed | errors | skipped | xfailed | xpassed | tests that parallelized a model | "
            "runs (part: start, seconds) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    new_failures: dict[str, list[dict]] = {}
    divergent: dict[str, list[str]] = {}
    for run in RUNS:
        table = results.get(run)
        if not table:
            continue
        count = {k: sum(v["outcome"] == k for v in table.values()) for k in
                 ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
        touched = sum(v["parallelized"] > 0 for v in table.values()) if run not in DENSE else "-"
        when = "; ".join(f"{m['part']}: {m['started']}, {m['seconds']}" for m in meta.get(run, []))
        rows.append(f"| {run} | {count['passed']} | {count['failed']} | {count['error']} | {count['skipped']} | "
                    f"{count['xfailed']} | {count['xpassed']} | {touched} | {when} |")
        if run != "dense":
            new_failures[run] = [v for k, v in table.items() if v["outcome"] in BAD
                                 and dense.get(k, {}).get("outcome") not in BAD]
            divergent[run] = [k for k, v in table.items() if len(set(v["ranks"].values())) > 1]
    origin = work / "origin.txt"
    text = [f"# diffusers' {FAMILIES[family][0]} tests with tpfuse", "",
            f"tests from: {origin.read_text().strip() if origin.exists() else '?'}", "", *rows, ""]
    dense_bad = sorted(k for k, v in dense.items() if v["outcome"] in BAD)
    text += [f"## Failing dense ({len(dense_bad)}): not caused by tpfuse", "",
             *(f"- `{k}`: {_last(dense[k])}" for k in dense_bad), ""]
    for run, lines in new_failures.items():
        what = "dense under torchrun" if run == "dense2" else "parallelized"
        text += [f"## {run}: failing {what}, not dense ({len(lines)})", ""]
        for v in sorted(lines, key=lambda v: v["nodeid"]):
            ranks = ", ".join(f"rank {r}: {o}" for r, o in sorted(v["ranks"].items()))
            control = results.get("dense2", {}).get(v["nodeid"], {}).get("outcome")
            also = f"; dense2: {control}" if run == "ws2" and control else ""
            text += [f"- `{v['nodeid']}` ({v['outcome']} in {v['phase']}; {ranks}{also}): {_last(v)}"]
        if divergent[run]:
            text += ["", f"Outcomes that differ between ranks: {', '.join(f'`{k}`' for k in divergent[run])}"]
        text += [""]
    body = "\n".join(text)
    (out_root / "summary.md").write_text(body)
    (out_root / "summary.json").write_text(json.dumps({"results": results, "meta": meta}, indent=1))
    return body


def _last(line: dict) -> str:
    """The error's last non-empty line (pytest puts the exception there)."""
    lines = [x.strip() for x in line.get("detail", "").splitlines() if x.strip()]
    return (lines[-1] if lines else line["outcome"])[:300].replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(FAMILIES), default="flux2",
                        help="whose tests to run, and which class to parallelize: " + ", ".join(
                            f"{k} ({v[1]})" for k, v in FAMILIES.items()) + "; default flux2. Results of families "
                        "other than flux2 go to WORK/FAMILY/")
    parser.add_argument("--diffusers-src", type=Path, help="a diffusers checkout (default: the mirror's HEAD)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tpfuse-diffusers-suite"))
    parser.add_argument("--runs", default="dense,ws1,ws2", help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--part", default="models,pipelines", help="models, pipelines or both (in that order)")
    parser.add_argument("-k", help="pytest -k expression")
    parser.add_argument("--timeout", type=int, default=600, help="per test, seconds (pytest-timeout, if installed)")
    parser.add_argument("--pg-timeout", type=int, default=300, help="gloo collective timeout at world size 2")
    parser.add_argument("--run-timeout", type=int, default=4 * 3600, help="per pytest invocation, seconds")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    parser.add_argument("--no-extract", action="store_true", help="reuse WORK/src from an earlier call")
    parser.add_argument("--summary-only", action="store_true", help="rewrite the summary from the results present")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (e.g. node ids)")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    parts = [p for p in args.part.split(",") if p]
    for value, allowed, what in ((runs, RUNS, "--runs"), (parts, PART_NAMES, "--part")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    why = check_family(args.family, args.diffusers_src)
    if why:
        parser.error(why)
    parts = [p for p in parts if p in FAMILIES[args.family][2]]
    work = args.work.resolve()
    (out_dir(work, args.family) / "results").mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        if not (args.no_extract and (work / "src" / "tests").is_dir()):
            extract(args.diffusers_src, work)
        if not (work / "hub").is_dir():
            sys.path.insert(0, str(HERE))
            from standins import build_hub_cache

            build_hub_cache(work / "hub")
        for part in parts:  # models first: they are quicker and say most about the model itself
            for run in runs:
                run_one(run, part, work, args)
    print(summarise(work, args.family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
