"""Per-rank sharded loading of FLUX.2 safetensors checkpoints: no rank ever holds the full weights.

Each parameter of a (parallelized, possibly ``meta``) model knows its shard: a column-parallel weight needs
rows ``shard_ranges(blocks)``, a row-parallel weight the same columns, everything else is replicated. The loader
opens every ``.safetensors`` file with ``safe_open`` and reads exactly those slices with ``get_slice`` — for
dev's 32B parameters at TP 8 a rank reads ~1/8 of the block weights plus the small replicated embedders.

Key names: diffusers' (``transformer_blocks.0.attn.to_q.weight`` ...) or a family's original ones (Black Forest
Labs' FLUX.2 keys, ``double_blocks.0.img_attn.qkv.weight`` ...: :mod:`tpfuse.tp_layers.flux2.keymap`), recognised by
the family registry (:func:`tpfuse.tp_layers.families.original_format`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .comm import get_rank, get_world_size, resolve_group
from ._checks import json_kind
from .linear import ColumnParallelLinear, RowParallelLinear
from .sharding import shard_ranges

__all__ = ["load_sharded", "load_block_state", "LoadReport", "resolve_source", "CheckpointNotFoundError",
           "Source", "WEIGHT_SUFFIXES"]

logger = logging.getLogger("tpfuse.tp_layers")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")

@dataclasses.dataclass(frozen=True)
class Source:
    """Where a diffusers-named tensor lives: ``key`` in the checkpoint, rows ``[row0, row0 + rows)`` of it."""

    key: str
    row0: int
    rows: int | None  # None: all rows
    swap_halves: bool = False


@dataclasses.dataclass
class LoadReport:
    tensors: int
    bytes_read: int
    seconds: float
    files: list[str]
    key_format: str  # "diffusers" or "bfl"
    rank: int
    world_size: int
    # safetensors files in the folder not read: left out by the index, or another variant's
    ignored: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: {self.tensors} tensors, {self.bytes_read / 2**20:.1f} MiB read "
                f"from {len(self.files)} file(s) ({self.key_format} keys) in {self.seconds:.2f} s")


# --------------------------------------------------------------------------------------------------------------
# Where the files are
# --------------------------------------------------------------------------------------------------------------


def _is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint source that is neither a local path nor a Hub repo this process can read; the message says
    which cause (no such path, no such repo, gated or unauthorized, offline and not cached)."""


def resolve_source(source, subfolder: str | None = None, revision: str | None = None, token=None,
                   allow_patterns: Sequence[str] = ("*.safetensors", "*.json"),
                   local_files_only: bool = False) -> Path:
    """A local file or directory for ``source``: a path, or a Hub repo id fetched with ``snapshot_download``
    (only ``allow_patterns`` under ``subfolder``). ``local_files_only=True`` (or ``HF_HUB_OFFLINE=1``) serves it
    from the local cache without touching the network; without it, an unreachable Hub also falls back to the cache.

    Raises :class:`CheckpointNotFoundError` (a ``FileNotFoundError``; ``PermissionError`` for a gated or
    unauthorized repo) naming the source and the cause."""
    if not isinstance(source, (str, os.PathLike)):  # os.fspath's TypeError names neither the argument nor its use
        raise TypeError(f"checkpoint source must be a path or a Hub repo id (str or os.PathLike), not "
                        f"{type(source).__name__} {source!r}")
    if subfolder is not None and not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"subfolder must be a str (e.g. 'transformer') or None, not {type(subfolder).__name__} "
                        f"{subfolder!r}")
    source = os.fspath(source)
    subfolder = os.fspath(subfolder) if subfolder is not None else None
    if os.path.exists(source):
        return _in_subfolder(Path(source), subfolder, source)
    where = os.path.abspath(source)
    if not _is_hub_id(source):
        raise CheckpointNotFoundError(f"checkpoint source {source!r} is neither a local path nor a Hub repo id "
                                      f"(owner/name): no such file or directory {where}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    # The Hub's patterns are fnmatch's: "*" crosses "/", so "*.safetensors" at a repo's root would also fetch every
    # component of a pipeline repo (text encoders, VAE: tens of GB). The checkpoint is one folder: nothing deeper.
    deeper = [f"{subfolder}/*/*" if subfolder else "*/*"]
    not_local = f"not a local path (no {where})"
    try:
        root = snapshot_download(source, revision=revision, token=token, allow_patterns=patterns,
                                 ignore_patterns=deeper, local_files_only=local_files_only)
    except GatedRepoError as exc:  # before RepositoryNotFoundError: a subclass of it
        raise PermissionError(f"Hub repo {source!r} is gated: accept its terms at https://huggingface.co/{source} "
                              "and pass token= (or log in with `hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise CheckpointNotFoundError(f"Hub repo {source!r} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointNotFoundError(f"checkpoint source {source!r} is {not_local}, and the Hub has no repo "
                                      "by that id that this token can read (a typo, or private: pass token=)"
                                      ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        offline = local_files_only or constants.HF_HUB_OFFLINE
        cause = exc.__cause__ or exc.__context__
        why = ("offline (local_files_only=True or HF_HUB_OFFLINE=1)" if offline else
               f"the Hub is unreachable ({type(cause).__name__ + ': ' + str(cause) if cause else 'no network'})")
        raise CheckpointNotFoundError(f"checkpoint source {source!r} is {not_local}, and Hub repo {source!r} "
                                      f"is not in the local cache ({constants.HF_HUB_CACHE}); {why}") from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if status in (401, 403):
            raise PermissionError(f"Hub repo {source!r}: not authorized ({first}); pass token= or log in with "
                                  "`hf auth login`") from exc
        raise CheckpointNotFoundError(f"Hub repo {source!r} could not be fetched: {first}") from exc
    return _in_subfolder(Path(root), subfolder, source)


def _in_subfolder(path: Path, subfolder: str | None, source) -> Path:
    if not subfolder:
        return path
    if not path.is_dir():  # a file has no subfolders: ignoring it would read something the caller did not name
        raise ValueError(f"checkpoint source {source!r} is a file, so subfolder={subfolder!r} cannot apply (pass "
                         "the folder holding it, or no subfolder)")
    if not (path / subfolder).is_dir():
        have = sorted(p.name for p in path.iterdir() if p.is_dir())
        what = f"; {subfolder!r} there is a file, not a folder" if (path / subfolder).exists() else ""
        raise FileNotFoundError(f"checkpoint source {source!r} has no subfolder {subfolder!r} (folders there: "
                                f"{have or 'none'}{what})")
    return path / subfolder


_SHARD = r"-\d+-of-\d+"  # diffusers' and transformers' shard suffix: -00001-of-00003
_OTHER_SUFFIXES = tuple(s for s in WEIGHT_SUFFIXES if s != ".safetensors")


def check_variant(variant) -> None:
    """A ``variant`` argument is ``None`` or a name like ``"fp16"`` (letters, digits, ``_``, ``-``): it becomes part
    of file names (``diffusion_pytorch_model.fp16.safetensors``), so a dot or a path separator cannot be one."""
    if variant is None:
        return
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a str such as 'fp16' or None, not {type(variant).__name__} {variant!r}")
    if not re.fullmatch(r"[\w-]+", variant):
        raise ValueError(f"variant={variant!r} is not a variant name (letters, digits, '_' and '-', e.g. 'fp16')")


def variant_of(name: str) -> tuple[str, str] | None:
    """(stem, variant) of a weight file named as diffusers names a variant's files, else ``None``:
    ``<stem>.<variant>.safetensors``, sharded ``<stem>.<variant>-00001-of-00003.safetensors``, or the older
    ``<stem>-00001-of-00003.<variant>.safetensors`` (any weight suffix, e.g. ``.bin``)."""
    m = (re.fullmatch(rf"([^.]+?){_SHARD}\.([^.]+)\.\w+", name)
         or re.fullmatch(rf"([^.]+)\.([^.]+?)(?:{_SHARD})?\.\w+", name))
    return (m.group(1), m.group(2)) if m else None


# A variant's index: <stem>.safetensors.index.<variant>.json (diffusers' _add_variant), or the older
# <stem>.safetensors.<variant>.index.json that diffusers still reads.
_VARIANT_INDEX = re.compile(r"[^.]+\.safetensors\.(?:index\.([^.]+)|([^.]+)\.index)\.json")


def _variant_indexes(path: Path, variant: str) -> list[Path]:
    return sorted(i for i in path.glob("*.json") if (m := _VARIANT_INDEX.fullmatch(i.name)) and variant in m.groups())


class _DuplicateName(ValueError):
    def __init__(self, name: str, first, second):
        super().__init__(name)
        self.name, self.first, self.second = name, first, second


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for name, value in pairs:
        if name in out:
            raise _DuplicateName(name, out[name], value)
        out[name] = value
    return out


def read_json(path: Path, what: str):
    """The JSON value in ``path`` (UTF-8, as diffusers writes and reads it). Raises a ``ValueError`` naming the file
    for a directory, unreadable or non-UTF-8 bytes, invalid JSON, and a name given twice in one object: ``json``
    would keep the last one silently (an index listing a key twice would load it from a stale file)."""
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a JSON {what} file")
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateName as exc:
        show = lambda v: repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
        raise ValueError(f"{path}: {what} gives {exc.name!r} twice ({show(exc.first)} and {show(exc.second)}): "
                         "which one is meant is ambiguous") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a valid JSON {what} ({exc})") from None
    except OSError as exc:  # permissions, I/O: the file may be fine
        raise ValueError(f"{path}: cannot read the {what} ({type(exc).__name__}: {exc.strerror or exc})") from None


def _read_index(index: Path, folder: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a safetensors index; a ``ValueError`` naming the index and
    what is wrong: not an object, no ``weight_map``, one that is not an object of file names or is empty, a file
    name that is not a plain name in ``folder`` (a path separator or ``..``: diffusers refuses them too)."""
    data = read_json(index, "safetensors index")
    if not isinstance(data, dict):
        raise ValueError(f"{index}: not a valid safetensors index: {json_kind(data)}, not an object with a "
                         "'weight_map'")
    if "weight_map" not in data:
        raise ValueError(f"{index}: not a valid safetensors index: no 'weight_map' (it has {sorted(data)})")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is {json_kind(weight_map)}, not an object mapping tensor names to "
                         "file names")
    if not weight_map:
        raise ValueError(f"{index}: 'weight_map' is empty: the index names no tensor (delete it to read every "
                         f".safetensors file in {folder}, or rewrite it)")
    bad = []
    for key, name in weight_map.items():
        if not isinstance(name, str):
            bad.append(f"{key!r} -> {name!r}: {json_kind(name)}, not a file name")
        elif name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name or os.path.isabs(name):
            bad.append(f"{key!r} -> {name!r}: not a plain file name in the index's folder {folder}")
    if bad:
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{index}: invalid 'weight_map' entries ({len(bad)}):\n  " + "\n  ".join(bad[:10]) + more)
    return weight_map


def _weight_files(path: Path, variant: str | None = None) -> tuple[list[Path], list[Path]]:
    """(safetensors files, other weight files) at ``path`` (a file, or a directory searched non-recursively). A
    directory with a ``*.safetensors.index.json`` gives the files its ``weight_map`` names (see :func:`_select`)."""
    sel = _select(path, variant)
    return sel.files, sel.others


@dataclasses.dataclass
class _Selection:
    """The files of one checkpoint in a folder: what to read, each key's file (from an index), and what is left."""

    files: list[Path]  # safetensors files to read
    others: list[Path]  # non-safetensors weight files, when no safetensors file was found (an error)
    key_map: dict[str, str] | None = None  # the index's tensor name -> file name
    index: Path | None = None
    ignored: list[Path] = dataclasses.field(default_factory=list)  # safetensors files not read
    stale: list[Path] = dataclasses.field(default_factory=list)  # of those, ones the index leaves out (warned)


def _select(path: Path, variant: str | None = None) -> _Selection:
    """Which files of ``path`` (a file, or a folder searched non-recursively) make the checkpoint.

    Variants follow diffusers' names (``<stem>.<variant>.safetensors``, ``<stem>.<variant>-00001-of-00003
    .safetensors``, index ``<stem>.safetensors.index.<variant>.json``). With ``variant``, exactly that variant's
    files are read (its index if there is one); none is an error naming the folder and the variants present.
    Without one, the non-variant checkpoint is read and variant files of the same stem are left out (a folder
    holding only one variant's files, or files named with dots that are no variant, reads them as before).

    With an index (diffusers' and transformers' sharded layout), the index decides: only the files it names are
    read, each key only from the file it names; a file it names that is absent is an error naming both; other
    ``.safetensors`` files in the folder (a stale single-file copy, another variant) are left out, to be reported.
    Several indexes for one variant are ambiguous and refused. Files not ending in a weight suffix (``.bak``) are
    not weight files. Other formats (``.bin``, ``.pt``, ...) are left out (reported) when there is a safetensors
    checkpoint, as diffusers prefers safetensors; a folder with only those is an error (``others``).
    """
    check_variant(variant)
    if path.is_file():
        if variant is not None and (variant_of(path.name) or (None, None))[1] != variant:
            raise ValueError(f"variant={variant!r} selects a variant's files in a folder, but {path} is a single "
                             f"file that is not named as that variant's (pass the folder, or no variant)")
        # An explicit file is read as safetensors whatever its suffix (BFL's .sft), unless it names another format.
        if path.suffix in _OTHER_SUFFIXES:
            return _Selection([], [path])
        return _Selection([path], [])
    # iterdir, not glob.glob(f"{path}/*"): a folder name with [ ] or * is not a pattern.
    candidates = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    safetensors = [f for f in candidates if f.suffix == ".safetensors"]
    others = [f for f in candidates if f.suffix != ".safetensors"]
    if variant is None:
        indexes = sorted(path.glob("*.safetensors.index.json"))
        plain = [f for f in safetensors if variant_of(f.name) is None]
        stems = {re.sub(rf"{_SHARD}$", "", f.name[:-len(".safetensors")]) for f in plain}
        # Variant files beside their non-variant checkpoint (diffusion_pytorch_model.fp16.safetensors beside
        # diffusion_pytorch_model.safetensors) are another copy of it: read the non-variant one, as diffusers does.
        chosen = [f for f in safetensors if variant_of(f.name) is None or variant_of(f.name)[0] not in stems]
        if not indexes and not plain:
            found = {variant_of(f.name)[1] for f in chosen}
            if len(found) == 1:  # only one variant's files: its index, if any, decides which of them to read
                indexes = _variant_indexes(path, found.pop())
    else:
        indexes = _variant_indexes(path, variant)
        chosen = [f for f in safetensors if (variant_of(f.name) or (None, None))[1] == variant]
        others = [f for f in others if (variant_of(f.name) or (None, None))[1] == variant]
        if not chosen and not indexes:
            present = sorted({v[1] for f in safetensors if (v := variant_of(f.name))} |
                             {m[1] or m[2] for i in path.glob("*.json") if (m := _VARIANT_INDEX.fullmatch(i.name))})
            raise ValueError(f"{path} has no files of variant {variant!r} (*.{variant}.safetensors, "
                             f"*.{variant}-NNNNN-of-NNNNN.safetensors or *.safetensors.index.{variant}.json); "
                             f"variants there: {present or 'none'}; safetensors files there: "
                             f"{[f.name for f in safetensors] or 'none'}")
    if not indexes:
        if not chosen:
            return _Selection([], others, ignored=safetensors)
        return _Selection(chosen, [], ignored=[f for f in safetensors if f not in chosen] + others)
    if len(indexes) > 1:
        raise ValueError(f"{path}: several checkpoint indexes {[i.name for i in indexes]} for "
                         f"{'variant ' + repr(variant) if variant else 'the non-variant checkpoint'}; keep one")
    index = indexes[0]
    weight_map = _read_index(index, path)
    named = sorted(set(weight_map.values()))
    absent = [n for n in named if not (path / n).exists()]
    if absent:
        raise ValueError(f"{index} names shard file(s) {absent} that are not in {path}")
    not_files = [n for n in named if not (path / n).is_file()]
    if not_files:
        raise ValueError(f"{index} names shard file(s) {not_files} that are directories in {path}, not files")
    files = [path / n for n in named]
    ignored = [f for f in safetensors if f.name not in set(named)]
    return _Selection(files, [], dict(weight_map), index, ignored + others, [f for f in ignored if f in chosen])


# --------------------------------------------------------------------------------------------------------------
# Which slice each parameter needs
# --------------------------------------------------------------------------------------------------------------


def _param_plan(model: nn.Module) -> dict[str, tuple[nn.Module, str, tuple[int, ...], int | None, list]]:
    """name -> (owner module, attribute, global shape, split dim or None, [(start, stop), ...]). A tensor held
    under several names (tied weights) is planned once, under its first name; :func:`tied_aliases` lists the
    others."""
    plan, seen = {}, set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in list(module._parameters.items()) + [
                (b, t) for b, t in module._buffers.items() if b not in module._non_persistent_buffers_set]:
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{attr}" if mod_name else attr
            shape, dim, ranges = tuple(p.shape), None, [(0, None)]
            spec = getattr(module, "tp_shard_spec", None)
            if spec is not None:  # e.g. a vocabulary-split embedding: its own rows
                shape, dim, ranges = spec(attr)
            elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                dim = module.split_dim(attr)
                if dim is not None:
                    shape = list(p.shape)
                    shape[dim] = sum(module.blocks)
                    shape = tuple(shape)
                    ranges = shard_ranges(module.blocks, module.rank, module.world_size)
            plan[name] = (module, attr, shape, dim, ranges)
    return plan


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """For each tensor held under several names: its first name (the one :func:`_param_plan` uses) -> the
    others."""
    names: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                names.setdefault(id(p), []).append(f"{mod_name}.{attr}" if mod_name else attr)
    return {n[0]: n[1:] for n in names.values() if len(n) > 1}


def _read(handle, src: Source, dim: int | None, ranges) -> torch.Tensor:
    sl = handle.get_slice(src.key)
    full_rows = sl.get_shape()[0]
    r0 = src.row0
    r1 = r0 + (src.rows if src.rows is not None else full_rows)
    if dim is None:
        t = sl[r0:r1]
        if src.swap_halves:
            shift, scale = t.chunk(2, dim=0)
            t = torch.cat([scale, shift], dim=0)
        return t
    pieces = [sl[r0 + a:r0 + b] if dim == 0 else sl[r0:r1, a:b] for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def open_safetensors(path: Path):
    """``safe_open(path)``; a truncated, empty or non-safetensors file raises a ``ValueError`` naming it
    (safetensors' own error names no file)."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "cannot read this file"
        size = path.stat().st_size if path.exists() else None
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes): {type(exc).__name__}: "
                         f"{exc}") from None


# safetensors dtype codes tpfuse reads: plain floating-point weights. Integer tensors and float8/fp4 ones
# (quantized checkpoints: they need their scales) would be cast to the parameter's dtype into wrong values.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _open_checkpoint(files: Sequence[Path], stack: contextlib.ExitStack, key_map: dict[str, str] | None = None,
                     index_file: Path | None = None, family=None, key_format=None):
    """(file handles, diffusers name -> (file, Source, shape), untranslatable keys, the original key format or
    None, problems); the handles close with ``stack``. ``key_map`` (the key -> file name map of ``index_file``): a key is read only from
    the file it names, and a key it puts in a file that lacks it is a problem. Without one, a key in two files is
    an error naming both. ``problems``: tensors that cannot be weights (0-dim, not floating point, a fused QKV not
    in 3 parts), each named by file and key."""
    handles = {}
    index: dict[str, tuple[str, tuple[int, ...]]] = {}  # checkpoint key -> (file, shape)
    problems = []
    keys_in: dict[str, set[str]] = {}  # file name -> its keys
    for f in files:
        h = stack.enter_context(open_safetensors(Path(f)))
        handles[str(f)] = h
        keys_in[Path(f).name] = set(h.keys())
        for key in h.keys():
            if key_map is not None and key_map.get(key, Path(f).name) != Path(f).name:
                continue  # the index puts this key in another file
            if key in index:
                first, second = variant_of(Path(index[key][0]).name), variant_of(Path(f).name)
                hint = (" (two variants of one checkpoint? pass variant=...)" if first and second and first != second
                        else " (the index does not say which)" if key_map is not None
                        else " (an index.json would decide)")
                raise ValueError(f"key {key!r} is in two checkpoint files, {index[key][0]} and {f}: which one "
                                 f"holds the weight is ambiguous{hint}")
            sl = h.get_slice(key)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
            if dtype not in _FLOAT_DTYPES:
                problems.append(f"{f}: {key}: dtype {dtype}, not a floating-point weight (tpfuse reads "
                                f"{sorted(_FLOAT_DTYPES)}; quantized checkpoints are not supported)")
            elif len(shape) == 0:
                problems.append(f"{f}: {key}: a 0-dim tensor, not a weight (a quantization scale? quantized "
                                "checkpoints are not supported)")
            else:
                index[key] = (str(f), shape)
    if key_map is not None:  # the index promises a key its file does not hold: a stale index or a wrong file
        absent = [f"{key!r} -> {name}" for key, name in key_map.items() if key not in keys_in.get(name, ())]
        if absent:
            more = f" ... and {len(absent) - 10} more" if len(absent) > 10 else ""
            problems.append(f"{index_file}: {len(absent)} key(s) not in the file the index names: "
                            f"{', '.join(absent[:10])}{more}")
    from .families import original_format

    # a family's original key names (BFL's FLUX.2), the caller's (a text encoder's legacy layout), or None: as named
    fmt = key_format if key_format is not None else original_format(index, family)
    sources: dict[str, tuple[str, Source, tuple[int, ...]]] = {}
    unexpected = []
    for key, (f, shape) in index.items():
        try:
            targets = fmt.to_diffusers(key, shape) if fmt is not None else [(key, Source(key, 0, None))]
        except ValueError as exc:
            problems.append(f"{f}: {exc}")
            continue
        if targets is None:
            unexpected.append(key)
            continue
        for name, src in targets:
            rows = src.rows if src.rows is not None else shape[0]
            sources[name] = (f, src, (rows, *shape[1:]))
    return handles, sources, unexpected, fmt, problems


def checkpoint_shapes(path: Path, variant: str | None = None, family=None) -> dict[str, tuple[int, ...]]:
    """Diffusers name -> shape of every weight of the local checkpoint at ``path`` (BFL keys translated, fused QKV
    split; tensors that cannot be weights left out), from the files' headers only: no tensor is read."""
    sel = _select(path, variant)
    with contextlib.ExitStack() as stack:
        _, sources, _, _, _ = _open_checkpoint(sel.files, stack, sel.key_map, sel.index, family)
    return {name: shape for name, (_, _, shape) in sources.items()}


def block_count(names, prefix: str) -> int:
    """How many blocks ``names`` (diffusers names) hold under ``prefix`` (``"transformer_blocks."``, ...)."""
    return len({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})


def check_block_counts(config: dict, path: Path, variant: str | None = None, family=None) -> None:
    """Refuse a config (of the checkpoint folder ``path``) that asks for more blocks than the checkpoint holds,
    before the model is built: a typo like ``num_layers: 80000`` would otherwise spend minutes (~10 ms a block,
    even on ``meta``) building blocks that the load then reports missing. Fewer blocks are left to the load's
    unexpected-keys report. ``family``: whose ``block_counts`` (config field, key prefix, what a block is,
    default) are compared."""
    counts = family.block_counts if family is not None else ()
    if not counts:
        return
    names = checkpoint_shapes(path, variant, family)
    if not names:
        return  # no readable checkpoint: load_sharded says why
    over = []
    for field, prefix, kind, default in counts:
        want, have = config.get(field, default), block_count(names, prefix)
        if want > have:
            over.append(f"{field}={want} but the checkpoint holds {have} {kind} block(s)")
    if over:
        raise ValueError(f"{path / 'config.json'} does not match the checkpoint in {path}: {'; '.join(over)}")


def load_block_state(source, prefix: str, subfolder: str | None = None,
                     variant: str | None = None) -> dict[str, torch.Tensor]:
    """The full (dense) tensors under ``prefix`` (e.g. ``"transformer_blocks.0."``), diffusers names with the
    prefix removed: one block of a checkpoint (``variant``: see :func:`load_sharded`), for checking a sharded block
    against it."""
    check_variant(variant)
    path = resolve_source(source, subfolder, allow_patterns=_allow_patterns(variant))
    sel = _select(path, variant)
    if not sel.files:
        raise ValueError(f"no .safetensors files at {path}")
    with contextlib.ExitStack() as stack:
        handles, sources, _, _, problems = _open_checkpoint(sel.files, stack, sel.key_map, sel.index)
        if problems:
            raise ValueError(f"cannot read {path}:\n  " + "\n  ".join(problems))
        state = {name[len(prefix):]: _read(handles[f], src, None, None)
                 for name, (f, src, _) in sources.items() if name.startswith(prefix)}
    if not state:
        raise ValueError(f"no tensors under {prefix!r} in {path}")
    return state


def _allow_patterns(variant: str | None) -> tuple[str, ...]:
    """What a Hub download needs: with a variant, only its files (diffusers' names, old and new) and the JSONs."""
    if variant is None:
        return ("*.safetensors", "*.json")
    return ("*.json", f"*.{variant}.safetensors", f"*.{variant}-*-of-*.safetensors", f"*-of-*.{variant}.safetensors")


def load_sharded(model: nn.Module, source, group=None, device=None, subfolder: str | None = None,
                 revision: str | None = None, token=None, progress: bool = True,
                 local_files_only: bool = False, variant: str | None = None, key_format=None) -> LoadReport:
    """Fill ``model`` (parallelized by :func:`~tpfuse.tp_layers.parallelize`, real or ``meta``) with this rank's
    slices of a safetensors checkpoint.

    Args:
        source: a ``.safetensors`` file, a directory of them (diffusers' sharded layout or one file), or a Hub
            repo id (see :func:`resolve_source`; ``local_files_only=True`` never touches the network).
        device: where materialized ``meta`` parameters go (default: the current CUDA device under NCCL, else
            CPU); parameters that already have storage keep their device. Tensors are cast to each parameter's
            dtype.
        variant: as in diffusers, e.g. ``"fp16"``: read exactly ``diffusion_pytorch_model.fp16.safetensors`` (or
            its shards and ``*.safetensors.index.fp16.json``); an error naming the folder and the variants there if
            it has none. Without it the non-variant checkpoint is read and variant files beside it are left out
            (listed in the report's ``ignored``).
        key_format: how the checkpoint names the model's tensors when not by the model's own names (default: the
            model family's original format when detected, e.g. BFL's FLUX.2 keys): an object with ``name`` and
            ``to_diffusers(key, shape)`` -> ``[(model name, Source)]`` or ``None`` (not a weight of the model).

    Raises one ``ValueError`` listing every missing key, unexpected key, shape mismatch and non-safetensors weight
    file. Returns a :class:`LoadReport` (tensors, bytes this rank read, seconds).
    """
    start = time.perf_counter()
    check_variant(variant)
    group = resolve_group(group)
    rank, world_size = get_rank(group), get_world_size(group)
    path = resolve_source(source, subfolder, revision, token, allow_patterns=_allow_patterns(variant),
                          local_files_only=local_files_only)
    sel = _select(path, variant)
    files, others, key_map, ignored = sel.files, sel.others, sel.key_map, sel.ignored
    if sel.stale:
        logger.warning("load_sharded: %s is not in the checkpoint's index; ignored", [str(f) for f in sel.stale])
    if set(ignored) - set(sel.stale):
        logger.info("load_sharded: other checkpoints' files %s ignored",
                    [str(f) for f in ignored if f not in sel.stale])
    problems = []
    if others:
        problems.append(f"non-safetensors weight files (only safetensors are read): {[str(f) for f in others]}")
    if not files:
        problems.append(f"no .safetensors files at {path}")
        raise ValueError("cannot load checkpoint:\n  " + "\n  ".join(problems))

    with contextlib.ExitStack() as stack:
        report = _load_into(model, path, files, problems, stack, rank, world_size, group, device, progress, start,
                            key_map, sel.index, key_format)
    report.ignored = [str(f) for f in ignored]
    return report


def _load_into(model, path, files, problems, stack, rank, world_size, group, device, progress, start,
               key_map=None, index_file=None, key_format=None) -> LoadReport:
    from .families import family_of

    try:
        family = family_of(model)
    except TypeError:  # a model of no family: diffusers' names only
        family = None
    handles, sources, unexpected, fmt, bad = _open_checkpoint(files, stack, key_map, index_file, family, key_format)
    problems.extend(bad)
    plan = _param_plan(model)
    ties = tied_aliases(model)
    # A tied tensor may be stored under any of its names (transformers writes one of them)
    for name, aliases in ties.items():
        if name in plan and name not in sources:
            for alias in aliases:
                if alias in sources:
                    sources[name] = sources.pop(alias)
                    break
        for alias in aliases:  # the other copies of a tied tensor are not unexpected
            if alias in sources and name in sources and sources[alias][1].key != sources[name][1].key:
                sources.pop(alias)
    missing = sorted(set(plan) - set(sources))
    unexpected = sorted(unexpected + [name for name in sources if name not in plan])
    mismatched = [f"{name}: checkpoint {sources[name][2]} vs model {plan[name][2]}"
                  for name in sorted(set(plan) & set(sources)) if tuple(sources[name][2]) != tuple(plan[name][2])]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError(f"cannot load {path} into {type(model).__name__}:\n  " + "\n  ".join(problems))

    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.distributed.is_initialized() and torch.distributed.get_backend(group) == "nccl"
                  else torch.device("cpu"))
    bytes_read = 0
    items = list(plan.items())
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=f"tpfuse: loading shards (TP {world_size})", unit="tensor")
    with torch.no_grad():
        for name, (module, attr, _shape, dim, ranges) in items:
            f, src, _ = sources[name]
            t = _read(handles[f], src, dim, ranges)
            bytes_read += t.numel() * t.element_size()
            old = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
            target_device = device if old.device.type == "meta" else old.device
            t = t.to(device=target_device, dtype=old.dtype)
            if t.shape != old.shape:
                raise ValueError(f"{name}: read a slice of shape {tuple(t.shape)} for a parameter of shape "
                                 f"{tuple(old.shape)} (rank {rank} of {world_size})")
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                module._buffers[attr] = t
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for name, aliases in ties.items():  # the loaded tensor replaced the tied one under its first name only
        for alias in aliases:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, model.get_parameter(name))
    for module in model.modules():  # e.g. FLUX.3's blocks pack their column shards into one tensor again
        after = getattr(module, "tp_after_load", None)
        if callable(after):
            after()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"still on the meta device after loading (not in the checkpoint's plan): {left}")
    return LoadReport(len(items), bytes_read, time.perf_counter() - start, [str(f) for f in files],
                      fmt.name if fmt is not None else "diffusers", rank, world_size)
