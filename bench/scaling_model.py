"""A tensor-parallel scaling model for FLUX.2 and Qwen-Image on paper: predicted step time and speedup at TP 1/2/4/8.

The model (its assumptions, sources and every function) is :mod:`tpfuse.tp_layers.scaling_model`: it moved into the
package so that ``tpfuse plan`` predicts step times from an installed wheel, which has no ``bench/``. This script
re-exports all of it (``import scaling_model as sm`` from ``bench/`` works as before), points the model's
:data:`MEASURED_DIRS` at ``bench/results`` (and ``--results``), and keeps the command line and the plot:

``python bench/scaling_model.py`` writes ``bench/results/scaling-model.{json,md,png}`` in seconds on a CPU;
``--meshes`` writes ``bench/results/scaling-model-meshes.{json,md}`` (``--gpu``, ``--algo``: H100 SXM, ring).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpfuse.tp_layers import scaling_model as _model  # needs `pip install .`, as every script in bench/
from tpfuse.tp_layers.scaling_model import (
    ACCOUNTINGS,
    GPUS,
    IMAGES,
    MEASURED_DIRS,
    TP_DEGREES,
    markdown,
    mesh_markdown,
    mesh_sweep,
    model,
)

# The model's whole API under this module's name, as before the move (bench_mesh.py's `sm.double_block`, the tests'
# `sm.meshes`, ...): the same objects, so MEASURED_DIRS below is the list the model reads.
globals().update({name: getattr(_model, name) for name in _model.__all__})
__all__ = [*_model.__all__, "RESULTS", "plot", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
# The model reads measurements (kernels-*.json, overlap-*.json) from MEASURED_DIRS (the package's list: this script
# and the model share it); bench/results first, as before the move. Once: the tests load this file more than once.
if RESULTS not in MEASURED_DIRS:
    MEASURED_DIRS.insert(0, RESULTS)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(dict.fromkeys((x["gpu"], x["allreduce"]) for x in result["rows"]))
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.8), sharey=True)
    for ax, (gpu, algo) in zip(axes, combos):
        for name in dict.fromkeys(x["model"] for x in result["rows"]):
            for image, style in zip(IMAGES, ("-", "--")):
                pts = [(x["tp"], x["speedup"]) for x in result["rows"]
                       if (x["gpu"], x["allreduce"], x["model"], x["image"]) == (gpu, algo, name, image)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{name} {image}")
        ax.plot(TP_DEGREES, TP_DEGREES, ":", color="grey", label="linear")
        ax.set_title(f"{gpu} ({algo})")
        ax.set_xlabel("TP degree")
        ax.set_xscale("log", base=2)
        ax.set_xticks(TP_DEGREES, [str(t) for t in TP_DEGREES])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted speedup over TP 1")
    axes[-1].legend(fontsize=7)
    fig.suptitle("tpfuse FLUX.2 / Qwen-Image TP scaling model (modelled, not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "scaling-model"),
                        help="path stem: writes STEM.json, STEM.md and STEM.png")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    parser.add_argument("--results", default=None,
                        help="also read GPU measurements (kernels-*.json, overlap-*.json) from this folder")
    parser.add_argument("--accounting", default="after", choices=list(ACCOUNTINGS),
                        help="the double block's accounting for the step tables: after (fused, 2 joint all-reduces), "
                             "before (this model before issue 23: 4 per-stream all-reduces), per-stream (fused, 4); "
                             "the double-block table always shows all three (default: %(default)s)")
    parser.add_argument("--meshes", action="store_true",
                        help="instead of the TP tables: the best dp x cfg x sp x tp mesh of 2/4/8 GPUs on one node "
                             "and 2/4/8/16 on two, per model and image, into STEM-meshes.json and STEM-meshes.md")
    parser.add_argument("--gpu", default="H100 SXM", choices=[g.name for g in GPUS],
                        help="the GPU of --meshes (default: %(default)s)")
    parser.add_argument("--algo", default="ring", choices=["ring", "nvls"],
                        help="the all-reduce inside a node for --meshes (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.results:
        MEASURED_DIRS.append(Path(args.results))
    if args.meshes:
        sweep = mesh_sweep(args.gpu, args.algo)
        stem = Path(args.out)
        stem = stem.with_name(stem.name + "-meshes")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(sweep, indent=2) + "\n")
        table = mesh_markdown(sweep) + "\n" + mesh_markdown(sweep, guidance=True)
        stem.with_suffix(".md").write_text("# Meshes: dp x cfg x sp x tp\n\n" + table)
        print(table)
        print(f"wrote {stem}.json, {stem}.md")
        return 0
    result = model(accounting=args.accounting)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text("# TP scaling model\n\n" + table)
    plotted = False
    if not args.no_plot:
        try:
            plot(result, stem.with_suffix(".png"))
            plotted = True
        except ImportError:  # the GPU image has no matplotlib: the JSON and the table still come out
            print("matplotlib missing: no plot (pip install matplotlib, or tpfuse's [bench] extra)")
    print(table)
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
