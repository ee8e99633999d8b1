"""``tpfuse verify --pipeline dev|klein``: a whole tiny FLUX.2 pipeline (text prompt -> tokenizer -> text encoder ->
transformer -> VAE -> image) across ranks against the dense pipeline.

Every rank builds the same tiny random pipeline offline (:mod:`.flux2.tiny_pipeline`: ``dev`` is a
``Flux2Pipeline`` with a Mistral3 encoder, ``klein`` a ``Flux2KleinPipeline`` with Qwen3), runs it densely, then
:func:`~tpfuse.tp_layers.pipeline.parallelize_pipeline` on the world (or ``--mesh``) and runs it again. Checked: the
prompt embeddings and the image against the dense ones (relative error within the dtype's tolerance,
:mod:`.numerics`), both bitwise identical on every rank, and each rank's weights per component equal to what
``tpfuse plan``'s formulas predict for that mesh (the widest rank's count on rank 0, at most that elsewhere).
"""

from __future__ import annotations

import dataclasses

import torch

from .launch import run_ranks
from .numerics import rel_error, tolerance

__all__ = ["PipelineResult", "check_pipeline", "format_pipeline_result"]

PROMPT = "a red fox in the snow"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclasses.dataclass
class PipelineResult:
    kind: str
    world_size: int
    mesh: str | None
    dtype: str
    text_encoder: str
    embeds_error: float
    image_error: float
    tol: float
    identical_on_ranks: bool
    encoder_share: list[float]  # per rank: its encoder linear weights / the dense encoder's
    plan_matches: bool  # every rank's weights per component are what tpfuse plan predicts
    sharding: str
    report: str  # rank 0's memory report

    @property
    def ok(self) -> bool:
        return (self.embeds_error <= self.tol and self.image_error <= self.tol and self.identical_on_ranks
                and self.plan_matches)


def _run(pipe, kwargs, seed: int):
    pipe.set_progress_bar_config(disable=True)  # the report is the output
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPT, **kwargs)[0]
        image = pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                     generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images
    return embeds, image


def _rank_check(kind: str, spec: dict | None, dtype_name: str, seed: int, text_encoder: str):
    import torch.distributed as dist

    from .encoders import linear_weight_bytes
    from .flux2.tiny_pipeline import tiny_pipeline
    from .pipeline import memory_report, parallelize_pipeline

    dtype = _DTYPES[dtype_name]
    dense, kwargs = tiny_pipeline(kind, seed=seed, dtype=dtype)
    ref_embeds, ref_image = _run(dense, kwargs, seed)
    dense_bytes = linear_weight_bytes(dense.text_encoder)
    del dense
    pipe, _ = tiny_pipeline(kind, seed=seed, dtype=dtype)
    mesh = None
    if spec is not None:
        from .verify_family import build_mesh

        mesh = build_mesh(spec)
    parallelize_pipeline(pipe, mesh, text_encoder=text_encoder)
    embeds, image = _run(pipe, kwargs, seed)
    report = memory_report(pipe, height=32, width=32)
    rank = dist.get_rank() if dist.is_initialized() else 0
    plan_ok = all(w == p if rank == 0 else w <= p for c, (w, p) in
                  ((c, (report.weights[c], report.predicted[c])) for c in report.weights) if p is not None)
    plan_ok = plan_ok and all(p is not None for p in report.predicted.values())
    return {"embeds": embeds, "image": image, "embeds_error": rel_error(embeds, ref_embeds),
            "image_error": rel_error(image, ref_image), "share": linear_weight_bytes(pipe.text_encoder) / dense_bytes,
            "plan_ok": plan_ok, "sharding": str(pipe.tp_pipeline), "report": report.format()}


def check_pipeline(kind: str = "klein", world_size: int | None = 2, mesh: str | None = None,
                   dtype: str = "float32", seed: int = 0, text_encoder: str = "shard",
                   backend: str | None = None) -> PipelineResult:
    """Run the check on ``world_size`` ranks (gloo by default), or on ``mesh`` (e.g. ``"sp2xtp2"``; ``world_size``
    its size or ``None``), and gather the results (see the module doc)."""
    from .flux2.tiny_pipeline import KINDS
    from .pipeline import TEXT_ENCODER_MODES
    from .verify_family import mesh_and_world

    if kind not in KINDS:
        raise ValueError(f"--pipeline must be one of {list(KINDS)}, got {kind!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(_DTYPES)} for a pipeline check, got {dtype!r}")
    if text_encoder not in TEXT_ENCODER_MODES:
        raise ValueError(f"--text-encoder must be one of {list(TEXT_ENCODER_MODES)}, got {text_encoder!r}")
    spec, world_size = mesh_and_world(mesh, world_size)
    per_rank = run_ranks(_rank_check, world_size, kind, spec, dtype, seed, text_encoder, backend=backend)
    first = per_rank[0]
    identical = all(torch.equal(r["image"], first["image"]) and torch.equal(r["embeds"], first["embeds"])
                    for r in per_rank)
    return PipelineResult(kind, world_size, mesh, dtype, text_encoder,
                          max(r["embeds_error"] for r in per_rank), max(r["image_error"] for r in per_rank),
                          tolerance(_DTYPES[dtype]), identical, [r["share"] for r in per_rank],
                          all(r["plan_ok"] for r in per_rank), first["sharding"], first["report"])


def format_pipeline_result(res: PipelineResult) -> str:
    where = f"mesh {res.mesh} ({res.world_size} ranks)" if res.mesh else f"{res.world_size} rank(s)"
    names = {"dev": "Flux2Pipeline (Mistral3 text encoder)", "klein": "Flux2KleinPipeline (Qwen3 text encoder)"}
    mark = {True: "PASS", False: "FAIL"}
    lines = [f"tpfuse verify --pipeline {res.kind}: tiny {names[res.kind]}, {where}, {res.dtype}",
             f"  {res.sharding}",
             f"  {mark[res.embeds_error <= res.tol]}  prompt embeddings: relative error {res.embeds_error:.2e} "
             f"(tolerance {res.tol:.0e})",
             f"  {mark[res.image_error <= res.tol]}  image: relative error {res.image_error:.2e} "
             f"(tolerance {res.tol:.0e})",
             f"  {mark[res.identical_on_ranks]}  embeddings and image identical on every rank",
             f"  {mark[res.plan_matches]}  each rank's weights per component = tpfuse plan's prediction",
             "  text encoder linear weights per rank / dense: " + ", ".join(f"{s:.3f}" for s in res.encoder_share),
             "  " + res.report.replace("\n", "\n  "),
             "OK" if res.ok else "FAILED"]
    return "\n".join(lines)
