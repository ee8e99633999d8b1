"""``tpfuse verify``: shard FLUX.2 blocks across N ranks and prove forward and backward equal the dense block.

Each rank builds the same seeded dense block, keeps only its shard, and runs the tensor-parallel forward and
backward; rank 0 also runs the dense block. The parent compares outputs, input gradients and weight gradients
(each rank's weight-gradient shard against the same shard of the dense gradient), checks that outputs and input
gradients are bitwise identical on every rank, and reports parameter bytes and measured all-reduce traffic.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .comm import comm_stats, get_rank, get_world_size
from .flux2.config import Flux2Config
from .flux2.blocks import DoubleStreamBlock, SingleStreamBlock, rope_cos_sin
from .launch import default_backend, run_ranks
from .numerics import max_abs_error, rel_error, tolerance
from .flux2.presets_table import check_world_size
from .sharding import shard_tensor
from .flux2.tp_blocks import TPDoubleStreamBlock, TPSingleStreamBlock

__all__ = ["verify", "VerifyResult", "BlockResult", "random_dense_block", "random_diffusers_model", "block_inputs",
           "position_ids", "format_report", "format_header", "format_block", "format_summary", "plural", "DTYPES"]

# Rank 0 reminds the user that a step is still running after this much silence (a klein-sized block takes tens of
# seconds per step on 2 CPU cores): never more than ~10 s without a line, with slack for a loaded machine.
PROGRESS_EVERY_S = 6.0

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCK_KINDS = ("double", "single")


def position_ids(txt_tokens: int, img_tokens: int) -> torch.Tensor:
    """FLUX.2-style 4-axis ids ``(t, h, w, l)`` for ``[text, image]``: text tokens count along ``l``, image tokens
    lie on a near-square ``h x w`` grid. ``[txt + img, 4]``."""
    txt = torch.zeros(txt_tokens, 4, dtype=torch.long)
    txt[:, 3] = torch.arange(txt_tokens)
    width = max(1, math.isqrt(img_tokens))
    idx = torch.arange(img_tokens)
    img = torch.zeros(img_tokens, 4, dtype=torch.long)
    img[:, 1], img[:, 2] = idx // width, idx % width
    return torch.cat([txt, img])


def _perturb_norms(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def random_dense_block(cfg: Flux2Config, kind: str, seed: int, dtype=torch.float32, device="cpu") -> nn.Module:
    """A dense block with seeded weights: ``nn.Linear``'s default init, QK-norm weights ``1 + 0.1 N(0, 1)`` (so
    that their gradients are not trivially symmetric)."""
    cls = {"single": SingleStreamBlock, "double": DoubleStreamBlock}[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = cls(cfg)
        _perturb_norms(block)
    return block.to(device=device, dtype=dtype)


def random_diffusers_model(cfg: Flux2Config, seed: int = 0, meta: bool = False) -> nn.Module:
    """diffusers' ``Flux2Transformer2DModel`` for ``cfg`` in eval mode, seeded as :func:`random_dense_block`
    (``meta``: shapes only). Seeds the global RNG, as building a model in a test normally does."""
    import diffusers

    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return diffusers.Flux2Transformer2DModel(**cfg.to_diffusers_kwargs())
    model = diffusers.Flux2Transformer2DModel(**cfg.to_diffusers_kwargs()).eval()
    _perturb_norms(model)
    return model


def block_inputs(cfg: Flux2Config, kind: str, batch: int, txt_tokens: int, img_tokens: int, seed: int,
                 dtype=torch.float32, device="cpu") -> tuple[dict[str, torch.Tensor], tuple]:
    """Seeded inputs of a block: ``(tensors requiring grad by name, image_rotary_emb)``."""
    g = torch.Generator().manual_seed(seed + 1)
    dim = cfg.hidden_size

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype).requires_grad_()

    tensors = {"hidden_states": rand(batch, img_tokens, dim), "encoder_hidden_states": rand(batch, txt_tokens, dim)}
    if kind == "double":
        tensors["temb_mod_img"] = rand(batch, 6 * dim, scale=0.5)
        tensors["temb_mod_txt"] = rand(batch, 6 * dim, scale=0.5)
    else:
        tensors["temb_mod"] = rand(batch, 3 * dim, scale=0.5)
    cos, sin = rope_cos_sin(position_ids(txt_tokens, img_tokens), cfg.axes_dims_rope, cfg.rope_theta)
    return tensors, (cos.to(device), sin.to(device))


def _outputs(out) -> dict[str, torch.Tensor]:
    if isinstance(out, tuple):  # double: (encoder_hidden_states, hidden_states)
        return {"out.encoder_hidden_states": out[0], "out.hidden_states": out[1]}
    return {"out.hidden_states": out}


def _run_block(block: nn.Module, tensors: dict[str, torch.Tensor], rope, seed: int):
    """Forward + backward with seeded output gradients; returns (outputs, input grads, weight grads, seconds)."""
    for t in tensors.values():
        t.grad = None
    start = time.perf_counter()
    outs = _outputs(block(**tensors, image_rotary_emb=rope))
    g = torch.Generator().manual_seed(seed + 2)
    grads = [torch.randn(o.shape, generator=g).to(o) for o in outs.values()]
    torch.autograd.backward(list(outs.values()), grads)
    if any(t.is_cuda for t in tensors.values()):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    in_grads = {f"grad.{k}": t.grad.detach().clone() for k, t in tensors.items()}
    w_grads = {n: p.grad.detach().clone() for n, p in block.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in outs.items()}, in_grads, w_grads, seconds


def _median_seconds(block: nn.Module, tensors, rope, seed: int, runs: int) -> float | None:
    """Median wall time of ``runs`` fwd+bwd calls (the caller's first call was the warm-up); ``None`` for 0 runs."""
    if runs <= 0:
        return None
    return statistics.median(_run_block(block, tensors, rope, seed)[3] for _ in range(runs))


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def checkpoint_block(cfg: Flux2Config, kind: str, source, index: int, dtype=torch.float32,
                     device="cpu") -> nn.Module:
    """A dense block holding block ``index`` of a checkpoint's weights (diffusers or BFL keys)."""
    from .checkpoint import load_block_state

    prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{index}."
    with torch.device("meta"):
        block = (DoubleStreamBlock if kind == "double" else SingleStreamBlock)(cfg)
    state = load_block_state(source, prefix)
    expected = set(block.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:  # an input error, named by file and key (load_state_dict's RuntimeError names neither)
        raise ValueError(f"{source}: block {prefix.rstrip('.')} does not match a FLUX.2 {kind} block of this config: "
                         f"missing {[prefix + k for k in missing]}, unexpected {[prefix + k for k in unexpected]}")
    block.load_state_dict(state, strict=True, assign=True)
    return block.to(device=device, dtype=dtype)


def _rank_main(cfg: Flux2Config, kinds: Sequence[str], batch: int, txt: int, img: int, dtype_name: str,
               seed: int, model_path: str | None = None, block_index: int = 0, timing_runs: int = 3,
               on_block: Callable[[BlockResult], None] | None = None,
               on_progress: Callable[[str], None] | None = None) -> list[BlockResult]:
    """One rank's part; rank 0 returns the :class:`BlockResult` of every block kind (the others an empty list),
    handing each to ``on_block`` as soon as it is done, and each step's description to ``on_progress`` as it
    starts (with a reminder after :data:`PROGRESS_EVERY_S` of silence)."""
    rank = get_rank()
    progress = _Progress(on_progress if rank == 0 else None, PROGRESS_EVERY_S)
    try:
        return _check_blocks(cfg, kinds, batch, txt, img, dtype_name, seed, model_path, block_index, timing_runs,
                             on_block, progress)
    finally:
        progress.close()


def _check_blocks(cfg: Flux2Config, kinds: Sequence[str], batch: int, txt: int, img: int, dtype_name: str,
                  seed: int, model_path: str | None, block_index: int, timing_runs: int,
                  on_block: Callable[[BlockResult], None] | None, progress: _Progress) -> list[BlockResult]:
    dtype = DTYPES[dtype_name]
    rank, world_size = get_rank(), get_world_size()
    device = f"cuda:{torch.cuda.current_device()}" if torch.distributed.get_backend() == "nccl" else "cpu"
    ranks = plural(world_size, "rank")
    timed = f"{plural(timing_runs, 'timed run')} after a warm-up"
    done = []
    for kind in kinds:
        label = f"{kind} block:"  # every progress line names its block
        progress.step(f"{label} loading block {block_index} of {model_path} on every rank" if model_path else
                      f"{label} building the dense block on every rank (random weights, seed {seed})")
        dense = (checkpoint_block(cfg, kind, model_path, block_index, dtype, device) if model_path else
                 random_dense_block(cfg, kind, seed, dtype, device))
        tensors, rope = block_inputs(cfg, kind, batch, txt, img, seed, dtype, device)
        ref = None
        if rank == 0:
            progress.step(f"{label} dense reference forward+backward on rank 0"
                          + (", the other ranks wait" if world_size > 1 else ""))
            d_out, d_in, d_w, _ = _run_block(dense, tensors, rope, seed)  # also the warm-up
            if timing_runs:
                progress.step(f"{label} timing the dense block ({timed})")
            ref = {"outputs": d_out, "in_grads": d_in,
                   "seconds": _median_seconds(dense, tensors, rope, seed, timing_runs)}
        progress.step(f"{label} sharding over {ranks} (weight checksums compared, then each rank keeps its slice)")
        tp_cls = TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock
        tp = tp_cls.from_dense(dense, None)
        dense_bytes = _param_bytes(dense)
        del dense
        torch.distributed.barrier()  # rank 0 ran the dense block first: time the TP step from a common start
        progress.step(f"{label} tensor-parallel forward+backward on {ranks}")
        with comm_stats() as stats:
            outs, in_grads, w_grads, _ = _run_block(tp, tensors, rope, seed)  # also the warm-up
        if timing_runs:
            progress.step(f"{label} timing the tensor-parallel block on {ranks} ({timed})")
        sec = _median_seconds(tp, tensors, rope, seed, timing_runs)
        progress.step(f"{label} comparing every rank's weight-gradient shard with the dense gradient")
        # Every rank's weight-gradient shard against the same shard of the dense gradient (rank 0 has the dense
        # gradients and scatters each rank its shard): a slicing bug on any rank shows.
        w_errors = {}
        for name, grad in w_grads.items():
            mod_name, attr = name.rsplit(".", 1)
            owner = tp.get_submodule(mod_name)
            mine = torch.empty_like(grad)
            shards = ([_shard_like(d_w[name], attr, r, world_size, owner).contiguous() for r in range(world_size)]
                      if rank == 0 else None)
            torch.distributed.scatter(mine, shards, src=0)
            w_errors[name] = (rel_error(grad, mine), max_abs_error(grad, mine))
        mine = {
            "outputs": {k: v.cpu() for k, v in outs.items()},
            "in_grads": {k: v.cpu() for k, v in in_grads.items()},
            "w_errors": w_errors,
            "ref": None if ref is None else {
                "outputs": {k: v.cpu() for k, v in ref["outputs"].items()},
                "in_grads": {k: v.cpu() for k, v in ref["in_grads"].items()},
                "seconds": ref["seconds"],
            },
            "seconds": sec,
            "param_bytes": _param_bytes(tp),
            "dense_param_bytes": dense_bytes,
            "comm_bytes": {f"{op}.{phase}": v for (op, phase), v in stats.bytes.items()},
            "comm_calls": {f"{op}.{phase}": v for (op, phase), v in stats.calls.items()},
        }
        gathered = [None] * world_size if rank == 0 else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        if rank == 0:
            result = _block_result(kind, gathered, tolerance(dtype), "cuda" if device != "cpu" else "cpu",
                                   timing_runs)
            done.append(result)
            if on_block is not None:
                progress.report(on_block, result)
    return done


class _Progress:
    """Rank 0's progress lines: each step as it starts (:meth:`step`) and, from a watcher thread, a reminder that
    the step is still running whenever nothing was printed for ``every`` seconds. One lock orders the step lines,
    the reminders and the block reports (:meth:`report`). ``emit=None`` (the other ranks): silent, no thread."""

    def __init__(self, emit: Callable[[str], None] | None, every: float):
        self._emit, self._every = emit, every
        self._lock = threading.Lock()
        self._step, self._step_start, self._last = None, 0.0, time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if emit is not None:
            self._thread = threading.Thread(target=self._watch, name="tpfuse-verify-progress", daemon=True)
            self._thread.start()

    def step(self, what: str) -> None:
        if self._emit is None:
            return
        with self._lock:
            self._step, self._step_start = what, time.monotonic()
            self._say(what)

    def report(self, fn: Callable, *args) -> None:
        """``fn(*args)`` (it prints), ordered with the progress lines; the step it ended needs no reminder."""
        with self._lock:
            fn(*args)
            self._step, self._last = None, time.monotonic()

    def _say(self, text: str) -> None:
        self._emit(text)
        self._last = time.monotonic()

    def _watch(self) -> None:
        while True:
            with self._lock:
                due = self._last + self._every
            if self._stop.wait(max(0.05, due - time.monotonic())):
                return
            with self._lock:
                now = time.monotonic()
                if self._step is not None and now - self._last >= self._every and not self._stop.is_set():
                    self._say(f"{self._step}: still running ({now - self._step_start:.0f} s)")
                elif self._step is None:
                    self._last = now  # between steps: nothing to remind of, look again a full period later

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a print blocked on a full pipe must not hold the rank's exit


def _block_result(kind: str, ranks: list[dict], tol: float, device: str, timing_runs: int) -> BlockResult:
    r0 = ranks[0]
    checks = [Check(k, max_abs_error(v, r0["ref"]["outputs"][k]), rel_error(v, r0["ref"]["outputs"][k]), tol)
              for k, v in r0["outputs"].items()]
    checks += [Check(k, max_abs_error(v, r0["ref"]["in_grads"][k]), rel_error(v, r0["ref"]["in_grads"][k]), tol)
               for k, v in r0["in_grads"].items()]
    # Weight gradients: every parameter of every rank's shard, reported as the worst one.
    worst = max(((rel, abs_err, k) for r in ranks for k, (rel, abs_err) in r["w_errors"].items()),
                default=(0.0, 0.0, "-"))
    checks.append(Check(f"grad.weights (worst: {worst[2]})", worst[1], worst[0], tol))
    identical = all(
        torch.equal(r[part][k], r0[part][k]) for r in ranks[1:] for part in ("outputs", "in_grads")
        for k in r0[part]
    )
    timed = timing_runs > 0
    return BlockResult(
        kind=kind, world_size=len(ranks), checks=checks, identical_across_ranks=identical,
        param_bytes_per_rank=max(r["param_bytes"] for r in ranks), dense_param_bytes=r0["dense_param_bytes"],
        all_reduce_bytes_fwd=r0["comm_bytes"].get("all_reduce.forward", 0),
        all_reduce_calls_fwd=r0["comm_calls"].get("all_reduce.forward", 0),
        all_reduce_bytes_bwd=r0["comm_bytes"].get("all_reduce.backward", 0),
        seconds_tp=max(r["seconds"] for r in ranks) if timed else None,
        seconds_dense=r0["ref"]["seconds"] if timed else None, timing_device=device, timing_runs=timing_runs,
    )


def _shard_like(dense_grad: torch.Tensor, name: str, rank: int, world_size: int, owner: nn.Module):
    """The shard of a dense gradient that corresponds to TP parameter ``owner.<name>`` (the layer's own rule)."""
    dim = owner.split_dim(name) if hasattr(owner, "split_dim") else None
    if dim is None:
        return dense_grad  # replicated parameter (norm weights, row-parallel bias)
    return shard_tensor(dense_grad, dim, rank, world_size, owner.blocks)


@dataclasses.dataclass
class Check:
    name: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.tol


@dataclasses.dataclass
class BlockResult:
    kind: str
    world_size: int
    checks: list[Check]
    identical_across_ranks: bool
    param_bytes_per_rank: int
    dense_param_bytes: int
    all_reduce_bytes_fwd: int
    all_reduce_calls_fwd: int
    all_reduce_bytes_bwd: int
    seconds_tp: float | None  # median fwd+bwd after a warm-up call, slowest rank; None: not timed
    seconds_dense: float | None
    timing_device: str = "cpu"
    timing_runs: int = 0

    @property
    def failures(self) -> list[str]:
        out = [f"{self.kind} block: {c.name} relative error {c.rel:.3g} exceeds tolerance {c.tol:g}"
               for c in self.checks if not c.ok]
        if not self.identical_across_ranks:
            out.append(f"{self.kind} block: outputs or input gradients differ between ranks")
        return out


@dataclasses.dataclass
class VerifyResult:
    preset: str
    world_size: int
    dtype: str
    backend: str
    tokens: tuple[int, int]
    blocks: list[BlockResult]

    @property
    def failures(self) -> list[str]:
        return [f for b in self.blocks for f in b.failures]

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(preset: str | Flux2Config = "klein-4b", world_size: int = 2, blocks: Sequence[str] = BLOCK_KINDS,
           img_tokens: int = 64, txt_tokens: int = 16, dtype: str = "float32", seed: int = 0, batch: int = 1,
           backend: str | None = None, model: str | None = None, subfolder: str | None = None,
           block_index: int = 0, timing_runs: int = 3,
           on_block: Callable[[BlockResult], None] | None = None,
           on_progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Shard dense blocks of ``preset`` over ``world_size`` ranks and compare against dense (see module doc).

    ``on_block`` (a module-level function: it runs in rank 0's process) gets each block's result as soon as it is
    done. ``on_progress`` (module-level too) gets a one-line description of each step as it starts — first in this
    process (starting the ranks), then in rank 0's — and a reminder whenever a step has been silent for
    :data:`PROGRESS_EVERY_S` seconds; lines from rank 0 and the block reports come in order.
    ``timing_runs``: fwd+bwd calls timed after the first (warm-up) call, reported as their median.

    With ``model`` (a checkpoint directory, file or Hub repo id), the blocks hold that checkpoint's weights
    (block ``block_index`` of each kind) and its config replaces ``preset``.
    """
    model_path = None
    if model is not None:
        from .model import load_config

        config, path = load_config(model, subfolder)
        cfg = dataclasses.replace(Flux2Config.from_dict(config), name=f"{model} (block {block_index})")
        model_path = str(path)
        counts = {"double": cfg.num_layers, "single": cfg.num_single_layers}
        bad = [k for k in blocks if k in counts and not 0 <= block_index < counts[k]]
        if bad:
            raise ValueError(f"--block-index {block_index} is out of range for {bad[0]} blocks (the model has "
                             f"{counts[bad[0]]})")
    else:
        cfg = preset if isinstance(preset, Flux2Config) else Flux2Config.preset(preset)
    blocks = list(blocks)
    bad = [b for b in blocks if b not in BLOCK_KINDS]
    if bad or not blocks:
        raise ValueError(f"--blocks must name some of {list(BLOCK_KINDS)}, got {blocks}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_world_size(cfg, world_size, f"model {model}" if model is not None else f"preset {cfg.name!r}",
                     "--world-size")  # verify() is the command's body: its errors name the command's options
    for name, value in (("img-tokens", img_tokens), ("txt-tokens", txt_tokens), ("batch", batch)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    backend = backend or default_backend(world_size)
    if timing_runs < 0:
        raise ValueError(f"--timing-runs must be >= 0, got {timing_runs}")
    if on_progress is not None:
        on_progress(f"starting {plural(world_size, 'rank process', 'rank processes')} ({backend})")
    per_rank = run_ranks(_rank_main, world_size, cfg, blocks, batch, txt_tokens, img_tokens, dtype, seed,
                         model_path, block_index, timing_runs, on_block, on_progress, backend=backend)
    results = per_rank[0]
    return VerifyResult(cfg.name, world_size, dtype, backend, (txt_tokens, img_tokens), results)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 call``, ``2 calls`` (``plural_form``: where adding an s is wrong)."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_header(preset: str, world_size: int, dtype: str, backend: str, tokens: tuple[int, int]) -> str:
    return (f"tpfuse verify: preset={preset} world_size={world_size} dtype={dtype} backend={backend} "
            f"tokens={tokens[0]} txt + {tokens[1]} img")


def format_block(b: BlockResult) -> str:
    lines = [f"{b.kind}-stream block, {plural(b.world_size, 'rank')}"]
    width = max(len(c.name) for c in b.checks)
    lines.append(f"  {'tensor':<{width}}  {'max |err|':>10}  {'rel err':>10}  {'tol':>8}  status")
    for c in b.checks:
        lines.append(f"  {c.name:<{width}}  {c.max_abs:>10.3e}  {c.rel:>10.3e}  {c.tol:>8.0e}  "
                     f"{'ok' if c.ok else 'FAIL'}")
    lines.append(f"  identical on all ranks: {'yes' if b.identical_across_ranks else 'NO'}")
    lines.append(f"  parameters per rank: {_mib(b.param_bytes_per_rank)} of {_mib(b.dense_param_bytes)} dense "
                 f"({b.param_bytes_per_rank / b.dense_param_bytes:.3f}x)")
    lines.append(f"  all-reduced per forward: {_mib(b.all_reduce_bytes_fwd)} in "
                 f"{plural(b.all_reduce_calls_fwd, 'call')}; "
                 f"per backward: {_mib(b.all_reduce_bytes_bwd)}")
    if b.seconds_tp is not None:
        where = b.timing_device.upper()
        runs = f"median of {b.timing_runs}" if b.timing_runs > 1 else plural(b.timing_runs, "run")
        lines.append(f"  {where} time fwd+bwd ({runs} after a warm-up): tensor-parallel "
                     f"{b.seconds_tp * 1e3:.1f} ms (slowest rank), dense {b.seconds_dense * 1e3:.1f} ms")
        if b.timing_device == "cpu":
            lines.append("  (CPU times with gloo ranks sharing this machine's cores: they say nothing about GPU "
                         "speed; see bench/ for that)")
    return "\n".join(lines)


def format_summary(res: VerifyResult) -> str:
    return "PASS" if res.ok else "FAIL:\n  " + "\n  ".join(res.failures)


def format_report(res: VerifyResult) -> str:
    parts = [format_header(res.preset, res.world_size, res.dtype, res.backend, res.tokens)]
    parts += ["", *("\n\n".join(format_block(b) for b in res.blocks),)]
    return "\n".join(parts + ["", format_summary(res)])
