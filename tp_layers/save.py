"""Save a parallelized model as a normal diffusers checkpoint: config + safetensors, sharded by size with an index.

Every rank calls :func:`save_pretrained`; rank 0 writes. A tensor-parallel weight is gathered to rank 0 one tensor
at a time and streamed into its file in the dense layout (a safetensors header only needs the shapes and dtypes,
which are known up front), so no rank holds more than one full tensor beyond its own shards. The files are what
``Flux2Transformer2DModel.save_pretrained`` writes for the dense model: diffusers' ``from_pretrained`` loads them,
and so does tpfuse's at any TP degree.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import _param_plan
from .comm import get_rank, get_world_size, resolve_group
from .lora import is_lora_layer
from .sharding import local_blocks

__all__ = ["save_pretrained"]

WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file stem for model weights
# safetensors' dtype codes
_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
# Rows per write when a row-parallel weight is interleaved back into the dense layout: bounds the staging copy.
_ROWS_PER_WRITE = 1024


def _parse_size(size: int | str) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
        if not m:
            raise ValueError(f"max_shard_size must be an int (bytes) or a size such as '10GB' or '500MiB', got "
                             f"{size!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _file_plan(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Entry indices per file, in order: a new file starts when the next tensor would push it past
    ``max_bytes`` (a tensor larger than that gets a file of its own), as diffusers splits a state dict."""
    files, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(entries):
        nbytes = _nbytes(shape, dtype)
        if current and size + nbytes > max_bytes:
            files.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        files.append(current)
    return files


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _header(entries, indices) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for i in indices:
        name, shape, dtype = entries[i]
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def _write(f, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _write_dense(f, pieces: list[torch.Tensor], dim: int, blocks: Sequence[int]) -> None:
    """Write the dense tensor that ``pieces`` (every rank's shard, rank order) are the shards of, without
    building it: along dim 0 the dense layout is the pieces' blocks in order; along dim 1 (a 2-D weight) each row
    interleaves the ranks' columns, written ``_ROWS_PER_WRITE`` rows at a time."""
    world = len(pieces)
    split = [p.split(local_blocks(blocks, world), dim=dim) for p in pieces]
    ordered = [split[r][i] for i in range(len(blocks)) for r in range(world)]
    if dim == 0:
        for part in ordered:
            _write(f, part)
        return
    rows = pieces[0].shape[0]
    for r0 in range(0, rows, _ROWS_PER_WRITE):
        _write(f, torch.cat([part[r0:r0 + _ROWS_PER_WRITE] for part in ordered], dim=1))


def _raise_shared(error: str | None, world: int, src: int, group) -> None:
    """Rank 0's error (or None) on every rank, raised everywhere: a collective every rank reaches."""
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=src, group=group)
        error = box[0]
    if error is not None:
        raise RuntimeError(f"save_pretrained: rank 0 could not write the checkpoint: {error}")


def save_pretrained(model: nn.Module, save_directory, max_shard_size: int | str = "10GB", group=None) -> list[Path]:
    """Write ``model`` (parallelized by :func:`~tpfuse.tp_layers.parallelize`, or dense) to ``save_directory`` as
    the dense diffusers checkpoint: ``config.json`` and ``diffusion_pytorch_model.safetensors``, or numbered
    files of at most ``max_shard_size`` each plus ``diffusion_pytorch_model.safetensors.index.json``.

    Every rank of the model's group must call it (the sharded weights are gathered to rank 0, which writes);
    returns the paths written (on every rank). Weight files left by an earlier save in that folder are removed,
    as diffusers does. LoRA adapters are refused: fuse and unload them first, or save them with
    ``save_lora_adapter``.
    """
    group = resolve_group(group if group is not None else getattr(model, "tp_group", None))
    rank, world = get_rank(group), get_world_size(group)
    wrapped = sorted(n for n, m in model.named_modules() if is_lora_layer(m))
    if wrapped:
        more = " ..." if len(wrapped) > 3 else ""
        raise ValueError(f"save_pretrained: the model has LoRA adapters on {wrapped[:3]}{more}: bake them in "
                         "(model.fuse_lora(); model.unload_lora()) or save the adapter with model.save_lora_adapter()")
    plan = _param_plan(model)
    state_names = list(model.state_dict().keys())
    if set(state_names) != set(plan):
        odd = sorted(set(state_names) ^ set(plan))
        raise ValueError(f"save_pretrained: cannot map the model's state dict onto its parameters: {odd[:5]}")
    meta = [name for name, (module, attr, *_rest) in plan.items() if getattr(module, attr).device.type == "meta"]
    if meta:
        raise ValueError(f"save_pretrained: {len(meta)} tensors are on the meta device (not loaded), e.g. {meta[:3]}")
    entries = [(name, plan[name][2], getattr(plan[name][0], plan[name][1]).dtype) for name in state_names]
    unsupported = sorted({str(d) for _, _, d in entries if d not in _DTYPE_CODES})
    if unsupported:
        raise ValueError(f"save_pretrained: safetensors has no code for dtype(s) {unsupported}")
    files = _file_plan(entries, _parse_size(max_shard_size))
    names = ([f"{WEIGHTS_NAME}.safetensors"] if len(files) == 1 else
             [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    out = Path(save_directory)
    dst = 0 if group is None or world == 1 else dist.get_global_rank(group, 0)
    # Where the gathers run: NCCL moves CUDA tensors, gloo CPU ones (a CPU-offloaded model under NCCL still saves).
    comm_device = (torch.device("cuda", torch.cuda.current_device())
                   if world > 1 and dist.get_backend(group) == "nccl" else torch.device("cpu"))
    # Only rank 0 touches the disk. Its failure (a file in the way, a full disk) is shared before the first gather
    # and at the end, so every rank raises it instead of the others waiting in a gather that never comes.
    error = None
    if rank == 0:
        try:
            if out.is_file():
                raise ValueError(f"{out} is a file, not a directory")
            out.mkdir(parents=True, exist_ok=True)
            for old in out.glob(f"{WEIGHTS_NAME}*.safetensors*"):  # an earlier save's shards and index
                old.unlink()
            if hasattr(model, "save_config"):
                model.save_config(out)
        except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
            error = f"{type(exc).__name__}: {exc}"
    _raise_shared(error, world, dst, group)
    for file_name, indices in zip(names, files):
        handle = None
        if rank == 0 and error is None:
            try:
                handle = open(out / f"{file_name}.tmp", "wb")
                handle.write(_header(entries, indices))
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        for i in indices:
            module, attr, _shape, dim, _ranges = plan[entries[i][0]]
            local = getattr(module, attr).detach()
            pieces = None
            if dim is not None and world > 1:
                local = local.to(comm_device).contiguous()
                pieces = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
                dist.gather(local, pieces, dst=dst, group=group)  # one tensor's shards, to rank 0 only
            if handle is not None and error is None:
                try:
                    if pieces is None:
                        _write(handle, local)
                    else:
                        _write_dense(handle, pieces, dim, module.blocks)
                except OSError as exc:
                    error = f"{type(exc).__name__}: {exc}"
            del pieces
        if handle is not None:
            handle.close()
            if error is None:
                os.replace(out / f"{file_name}.tmp", out / file_name)
    if rank == 0 and error is None and len(files) > 1:
        weight_map = {entries[i][0]: file_name for file_name, indices in zip(names, files) for i in indices}
        total = sum(_nbytes(shape, dtype) for _, shape, dtype in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        try:
            (out / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    _raise_shared(error, world, dst, group)  # also: every rank returns once the files exist
    written = [out / n for n in names] + ([out / f"{WEIGHTS_NAME}.safetensors.index.json"] if len(files) > 1 else [])
    return written + ([out / "config.json"] if hasattr(model, "save_config") else [])
