"""The compact RoPE angle table the kernels read, built on the device without a host sync.

diffusers' ``Flux2PosEmbed`` (and :func:`tpfuse.tp_layers.rope_cos_sin`) return ``cos``/``sin`` as ``[S, D]`` with
every angle repeated for the two elements of a pair (``cos[:, 2i] == cos[:, 2i+1]``). A kernel needs each pair's
angle once: :func:`angle_table` packs them as ``[2, S, D/2]`` fp32 (cos plane, sin plane), so a program reads
contiguous 16-byte vectors instead of every other element of a wider row.

The pairing contract is checked on the device (``torch._assert_async``): no ``.item()``/``torch.equal`` host sync,
which would stall the CPU once per step (diffusers rebuilds the rotary embedding every forward) and cannot be
captured in a CUDA graph. On CPU tensors the same check raises at once with the offending tensor named. On CUDA a
violated contract surfaces as a device-side assert at the next synchronization. ``TPFUSE_CHECK_ROPE=0`` skips
the check.

Tables are cached per ``(cos, sin)`` tensor pair and version, so the 20+ blocks of one forward, which all get the
same rotary-embedding tensors, build it once. The cache is bypassed while a CUDA graph is being captured or
``torch.compile`` traces, where the table must be part of the recorded work (a cached table would not follow new
angles copied into the graph's static input on replay), and for inference-mode tensors, which carry no version
counter.
"""

from __future__ import annotations

import os
import weakref

import torch

__all__ = ["angle_table"]

_MAX_CACHED = 8
# (id(cos), id(sin)) -> (weakref(cos), weakref(sin), (versions), table)
_cache: dict[tuple[int, int], tuple] = {}


def _check_pairs(op: str, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if os.environ.get("TPFUSE_CHECK_ROPE", "1") == "0" or cos.device.type == "meta":
        return
    if cos.device.type == "cpu":  # a synchronous check costs nothing on the host: name the offending tensor
        for name, t in (("cos", cos), ("sin", sin)):
            paired = _paired(t)
            if not paired.all():
                bad = (~paired).nonzero()[0].tolist()
                raise ValueError(f"{op}: {name}[:, 2i] != {name}[:, 2i+1] (first at row {bad[0]}, pair {bad[1]}); "
                                 "RoPE rotates each pair by one angle, so cos/sin must repeat each value twice (as "
                                 "Flux2PosEmbed returns them)")
        return
    torch._assert_async(_paired(cos).all() & _paired(sin).all(),
                        f"{op}: cos/sin must repeat each angle for both elements of a RoPE pair")


def _paired(t: torch.Tensor) -> torch.Tensor:
    """``[S, D/2]``: each pair holds one value; a NaN pair counts as paired (NaN angles propagate to the output,
    as in the reference, rather than being reported as unpaired)."""
    a, b = t[:, 0::2], t[:, 1::2]
    return (a == b) | (a.isnan() & b.isnan())


def _capturing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def angle_table(op: str, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``[2, S, D/2]`` fp32 contiguous: ``[0]`` each pair's cosine, ``[1]`` its sine (from ``[S, D]`` inputs)."""
    key = (id(cos), id(sin))
    # Inference-mode tensors have no version counter (and change in place unseen): never cached.
    cacheable = not _capturing(cos.device) and not (cos.is_inference() or sin.is_inference())
    versions = (cos._version, sin._version) if cacheable else None
    if cacheable:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is cos and hit[1]() is sin and hit[2] == versions:
            return hit[3]
    _check_pairs(op, cos, sin)
    table = torch.empty((2, cos.shape[0], cos.shape[1] // 2), device=cos.device, dtype=torch.float32)
    table[0].copy_(cos[:, 0::2])
    table[1].copy_(sin[:, 0::2])
    if cacheable:
        if len(_cache) >= _MAX_CACHED:
            _cache.clear()
        _cache[key] = (weakref.ref(cos), weakref.ref(sin), versions, table)
    return table
