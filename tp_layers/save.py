"""Save a parallelized model as a normal diffusers checkpoint: config + safetensors, sharded by size with an index.

Every rank of the model's tensor-parallel group calls :func:`save_pretrained`. A tensor-parallel weight is gathered
one tensor at a time and streamed into its file in the dense layout (a safetensors header only needs the shapes and
dtypes, which are known up front). The files are
what ``Flux2Transformer2DModel.save_pretrained`` writes for the dense model: diffusers' ``from_pretrained`` loads
them, and so does tpfuse's at any TP degree.

Nothing is lost, whatever fails:

* **Atomic replacement.** The writer builds the new checkpoint in a hidden staging folder beside the target
  (``.<name>.tpfuse-save@<host>@<pid>@<token>``), fsyncs every file and the folder, and only then swaps it in. On
  Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` of the two folders, after the target's other files (another
  variant, a ``.bak``, a README, subfolders) are hard-linked into the staging folder: a reader, or a crash at any
  instant, sees either the old folder or the complete new one; the folder keeps its mode and times. Where that
  call or hard links are not available, where the staging folder cannot live beside the target (a read-only
  parent, or a target that is itself a mount point such as a container volume: it then lives inside the target),
  or where this process's working directory is inside the target (the swap would leave it in the deleted old
  folder), the new files replace the old ones one ``os.replace`` at a time, weights first, then the index, then
  ``config.json``, and the old files of the same variant that the new save does not overwrite are deleted last:
  only a crash during those renames (milliseconds, no data written) can leave a mix. A failed save removes its
  staging folder (and the folders it created); a writer that is killed leaves it (hidden, never read), and the
  next save from the same host removes the folders of writers that are no longer running.
* **Only what is replaced is deleted**: ``config.json`` and the files of the saved variant and format
  (``diffusion_pytorch_model[.<variant>].safetensors``, its numbered shards and its index); other variants, the
  other format (``.bin`` beside ``.safetensors``), ``.bak`` copies, ``_ema`` files and anything else stay.
* **One error, on every rank.** Each rank's failure (a full disk at write, fsync or close; a file in the way; a
  model that cannot be saved) is shared with the group at the next step (before the first gather, after each file,
  at the end) and raised on every rank with the same message, instead of leaving the others blocked in a gather
  until the process-group timeout: a model that cannot be saved this way as ``ValueError``, anything later as
  :class:`SaveError`, which says whether the old checkpoint is unchanged or the new one already in place.
* **Ranks that disagree are refused before anything is written**: the local shard shapes and dtypes of every tensor
  are compared across the group, and replicated tensors (embedders, modulation, norms, final layer) by checksum
  (``check_replicated=True``, the default): a rank that cast a block to another dtype, or holds another copy of a
  replicated weight, gives :class:`~tpfuse.tp_layers.consistency.WeightMismatchError` on every rank naming the
  tensor and the ranks.
* **Who writes.** One rank per distinct folder: the first rank (in group order) whose ``is_main_process`` is true,
  for each distinct (host, resolved ``save_directory``). Ranks sharing a folder (the usual torchrun case) get one
  writer, rank 0; ranks saving to different folders (each its own temporary directory) each get the checkpoint; a
  group in which no rank is the main process writes nothing. Staging names are unique per process, so data-parallel
  replicas saving to one folder do not collide (still, let one replica save: ``is_main_process=dp_rank == 0``).

Memory: a safetensors file is streamed, so no rank holds more than one full tensor beyond its own shards; a
``.bin`` file (``safe_serialization=False``) is one pickle, built in the writer's memory (up to ``max_shard_size``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import _param_plan
from .comm import get_rank, get_world_size, resolve_group
from .consistency import _gather, check_weights_agree, describe_error
from .lora import is_lora_layer
from .sharding import local_blocks

__all__ = ["save_pretrained", "weight_file_names", "index_file_name", "atomic_write", "SaveError"]

WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file stem for model weights
CONFIG_NAME = "config.json"
# safetensors' dtype codes
_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}
# Rows per write when a row-parallel weight is interleaved back into the dense layout: bounds the staging copy.
_ROWS_PER_WRITE = 1024
_STAGING_TAG = ".tpfuse-save@"


class SaveError(RuntimeError):
    """A save failed on some rank; raised on every rank of the group with that rank's error and what the folder
    holds now (the previous checkpoint unchanged, or, for a failure after the swap, the new one)."""


# --------------------------------------------------------------------------------------------------------------
# File names (diffusers' conventions)
# --------------------------------------------------------------------------------------------------------------


def _variant_part(variant: str | None) -> str:
    return f".{variant}" if variant else ""


def weight_file_names(n_files: int, variant: str | None = None, safe_serialization: bool = True) -> list[str]:
    """The weight files diffusers writes for ``n_files`` files: ``diffusion_pytorch_model[.<variant>].safetensors``
    or ``diffusion_pytorch_model[.<variant>]-00001-of-00003.safetensors`` ... (``.bin`` without safetensors)."""
    ext = "safetensors" if safe_serialization else "bin"
    stem = f"{WEIGHTS_NAME}{_variant_part(variant)}"
    if n_files == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i + 1:05d}-of-{n_files:05d}.{ext}" for i in range(n_files)]


def index_file_name(variant: str | None = None, safe_serialization: bool = True) -> str:
    """``diffusion_pytorch_model.safetensors.index[.<variant>].json`` (diffusers' ``_add_variant`` of the index)."""
    ext = "safetensors" if safe_serialization else "bin"
    return f"{WEIGHTS_NAME}.{ext}.index{_variant_part(variant)}.json"


def _replaced_pattern(variant: str | None, safe_serialization: bool) -> re.Pattern:
    """Files a save of ``variant`` in one format replaces: exactly that variant's single file, numbered shards and
    index in that format. Not another variant, not the other format (a ``.bin`` checkpoint beside the new
    ``.safetensors`` stays; loaders prefer safetensors), not ``...safetensors.bak``, not ``..._ema.safetensors``."""
    v = re.escape(_variant_part(variant))
    stem = re.escape(WEIGHTS_NAME)
    ext = "safetensors" if safe_serialization else "bin"
    return re.compile(rf"{stem}{v}(-\d{{5}}-of-\d{{5}})?\.{ext}|{stem}\.{ext}\.index{v}\.json")


# --------------------------------------------------------------------------------------------------------------
# Sizes and the safetensors stream
# --------------------------------------------------------------------------------------------------------------


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


def _ordered_parts(pieces: list[torch.Tensor], dim: int, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The dense tensor's parts along ``dim`` in order: each block's slice from every rank."""
    world = len(pieces)
    split = [p.split(local_blocks(blocks, world), dim=dim) for p in pieces]
    return [split[r][i] for i in range(len(blocks)) for r in range(world)]


def _write_dense(f, pieces: list[torch.Tensor], dim: int, blocks: Sequence[int]) -> None:
    """Write the dense tensor that ``pieces`` (every rank's shard, rank order) are the shards of, without
    building it: along dim 0 the dense layout is the pieces' blocks in order; along dim 1 (a 2-D weight) each row
    interleaves the ranks' columns, written ``_ROWS_PER_WRITE`` rows at a time."""
    ordered = _ordered_parts(pieces, dim, blocks)
    if dim == 0:
        for part in ordered:
            _write(f, part)
        return
    rows = pieces[0].shape[0]
    for r0 in range(0, rows, _ROWS_PER_WRITE):
        _write(f, torch.cat([part[r0:r0 + _ROWS_PER_WRITE] for part in ordered], dim=1))


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Staging and the swap
# --------------------------------------------------------------------------------------------------------------


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(..., RENAME_EXCHANGE)``); False where the platform or
    the filesystem does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBUSY, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _link_tree(src: Path, dst: Path) -> None:
    """``cp -al``: ``dst`` gets hard links to ``src``'s files (no data copied), folders recreated (and fsynced),
    symlinks kept."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
        _fsync_dir(dst)
    else:
        os.link(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _cwd_inside(folder: Path) -> bool:
    """Whether this process's working directory is ``folder`` (resolved) or below it."""
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:  # the working directory was deleted
        return False
    return cwd == folder or folder in cwd.parents


def _keep_folder_stat(old: Path, new: Path) -> None:
    """The old folder's mode (setgid included), times, flags and extended attributes, and, where allowed, owner,
    onto the folder that replaces it."""
    shutil.copystat(old, new)
    st = old.stat()
    try:
        os.chown(new, st.st_uid, st.st_gid)
    except (PermissionError, AttributeError):  # not root / not POSIX: the writer owns the new folder
        pass


_UNCHANGED = "the previous checkpoint in the folder, if any, is unchanged"


class _Stage:
    """The writer's side of one save: a staging folder, the files written into it, and the swap."""

    def __init__(self, target: Path, variant: str | None, safe_serialization: bool, has_config: bool):
        self.target, self.has_config = target, has_config
        self.pattern = _replaced_pattern(variant, safe_serialization)
        self.folder: Path | None = None
        self.beside = True  # staging folder beside the target (else inside it: no swap, per-file replacement)
        self.created: list[Path] = []  # folders this save created: removed again (when empty) if it fails
        self.state = "untouched"  # -> "partial" while files are renamed one by one -> "committed"

    def replaces(self, name: str, config: bool = True) -> bool:
        return (config and self.has_config and name == CONFIG_NAME) or self.pattern.fullmatch(name) is not None

    def outcome(self) -> str:
        return {"untouched": _UNCHANGED,
                "partial": "the folder may now hold a mix of old and new weight files: save again",
                "committed": "the new checkpoint is already complete in the folder"}[self.state]

    def _makedirs(self, path: Path) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            try:
                d.mkdir()
                self.created.append(d)
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                pass

    def open(self) -> None:
        target = self.target
        if target.is_file():
            raise ValueError(f"{target} is a file, not a directory")
        self._makedirs(target.parent)
        self._remove_stale(target.parent, _staging_prefix(target.name))
        folder = target.parent / _staging_name(target.name)
        try:
            folder.mkdir()
        except OSError as exc:  # a read-only parent (a mounted volume's root): stage inside the target
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            folder = None
        if folder is not None and target.is_dir() and not _renames_into(folder, target):
            # Another mount (a container's volume, a bind mount): renames from beside would fail with EXDEV after
            # the whole checkpoint was written to the wrong disk.
            shutil.rmtree(folder, ignore_errors=True)
            folder = None
        if folder is not None:
            self.folder = folder
            return
        self._makedirs(target)
        self._remove_stale(target, _staging_prefix(""))
        self.folder = target / _staging_name("")
        self.folder.mkdir()
        self.beside = False

    def _remove_stale(self, where: Path, prefix: str) -> None:
        """Staging folders of earlier saves from this host whose writer is no longer running (killed mid-save)."""
        if not where.is_dir():
            return
        for p in where.iterdir():
            if not p.name.startswith(prefix):
                continue
            host, pid = (p.name[len(prefix):].split("@") + ["", ""])[:2]
            if host == _host() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def file(self, name: str):
        return open(self.folder / name, "wb")

    def commit(self, names: list[str]) -> None:
        """Swap the staged files in: atomically (folder rename or exchange) where possible, else file by file."""
        target = self.target
        if self.beside and not target.exists():
            _fsync_dir(self.folder)
            try:
                os.rename(self.folder, target)  # atomic; fails if another writer filled it meanwhile
            except OSError:
                pass
            else:
                self.folder, self.state = None, "committed"
                _fsync_dir(target.parent)
                return
        # The exchange moves the folder itself: a working directory inside it would be left in the deleted old one.
        if self.beside and not _cwd_inside(target) and self._carry_others():
            _keep_folder_stat(target, self.folder)
            _fsync_dir(self.folder)  # the carried links are part of the new folder
            if _exchange(self.folder, target):
                self.state = "committed"
                shutil.rmtree(self.folder, ignore_errors=True)  # the old folder; carried files live on as links
                self.folder = None
                _fsync_dir(target.parent)
                return
        self._replace_file_by_file(names)

    def _carry_others(self) -> bool:
        """Hard-link the target's files that this save does not replace into the staging folder; False when that is
        impossible, e.g. a filesystem without hard links (what was linked goes with the staging folder)."""
        try:
            for entry in self.target.iterdir():
                if not (self.replaces(entry.name) or _STAGING_TAG in entry.name):
                    _link_tree(entry, self.folder / entry.name)
        except OSError:
            return False
        return True

    def _replace_file_by_file(self, names: list[str]) -> None:
        target = self.target
        self._makedirs(target)
        self.state = "partial"
        # Weights, then the index (the commit point of a sharded checkpoint), then the config.
        for n in sorted(names, key=lambda n: (n == CONFIG_NAME, n.endswith(".json"))):
            os.replace(self.folder / n, target / n)
        self.state = "committed"
        for entry in target.iterdir():  # what the previous save of this variant wrote and this one did not
            if entry.is_file() and entry.name not in names and self.replaces(entry.name, config=False):
                entry.unlink()
        _fsync_dir(target)
        self.discard(failed=False)

    def discard(self, failed: bool = True) -> None:
        """Remove the staging folder; after a failure that left the folder untouched, also the (empty) folders this
        save created."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        if failed and self.state == "untouched":
            for d in reversed(self.created):
                try:
                    d.rmdir()
                except OSError:  # not empty (someone else's files) or gone: leave it
                    pass
            self.created = []


def _renames_into(folder: Path, target: Path) -> bool:
    """Whether a file in ``folder`` can be renamed into ``target`` (False: they are on different mounts)."""
    probe = folder / ".probe"
    probe.touch()
    moved = target / (folder.name + ".probe")
    try:
        os.rename(probe, moved)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return False
    # A replica saving into the same folder at once may have exchanged the folder meanwhile and removed the old
    # one with the probe in it: the rename worked, which is all this asks.
    moved.unlink(missing_ok=True)
    return True


# A staging name must stay within NAME_MAX (255 bytes) whatever the target's name: its parts are cut to length.
_NAME_PART = 96


def _host() -> str:
    return socket.gethostname().replace("@", "_")[:_NAME_PART]


def _staging_prefix(name: str) -> str:
    return f".{name[:_NAME_PART]}{_STAGING_TAG}"


def _staging_name(name: str) -> str:
    """A hidden name unique to this process (host, pid, random): concurrent writers never share one."""
    return f"{_staging_prefix(name)}{_host()}@{os.getpid()}@{secrets.token_hex(4)}"


def atomic_write(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path`` (a name unique to this process), fsync it, then rename
    it over ``path``: readers see the old file or the complete new one. The temporary file is removed on failure."""
    path = Path(path)
    tmp = path.parent / (_staging_name(path.name) + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------------------------
# Agreement across the group
# --------------------------------------------------------------------------------------------------------------


def _share(error: str | None, group, world: int, where: str, *, what: str = "save_pretrained",
           outcome: str | None = _UNCHANGED) -> None:
    """Every rank's error (or None) to every rank; raise the first one, with its rank and what the folder holds
    now (``outcome``; None: the error says it), everywhere."""
    errors = _gather(error, group) if world > 1 else [error]
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:
        r, e = bad[0]
        raise SaveError(f"{what}: rank {r} failed {where}: {e}" + (f" ({outcome})" if outcome else ""))


def _writers(group, world: int, rank: int, target, is_main_process: bool, local_error: str | None):
    """(ranks that write, in group order; every rank's local error; whether some writer writes this rank's folder):
    one writer per distinct (host, folder) among the ranks whose ``is_main_process`` is true."""
    mine = (bool(is_main_process), socket.gethostname(), os.path.realpath(target), local_error)
    everyone = _gather(mine, group) if world > 1 else [mine]
    seen, writers = set(), []
    for r, (main, host, where, _) in enumerate(everyone):
        if main and (host, where) not in seen:
            seen.add((host, where))
            writers.append(r)
    return writers, [e for *_, e in everyone], (mine[1], mine[2]) in seen


# --------------------------------------------------------------------------------------------------------------
# The save
# --------------------------------------------------------------------------------------------------------------


def _entries(model: nn.Module):
    """(plan, [(name, dense shape, dtype)] in state-dict order), or a ValueError saying why the model cannot be
    saved this way."""
    wrapped = sorted(n for n, m in model.named_modules() if is_lora_layer(m))
    if wrapped:
        more = " ..." if len(wrapped) > 3 else ""
        raise ValueError(f"the model has LoRA adapters on {wrapped[:3]}{more}: bake them in "
                         "(model.fuse_lora(); model.unload_lora()) or save the adapter with model.save_lora_adapter()")
    plan = _param_plan(model)
    state_names = list(model.state_dict().keys())
    if set(state_names) != set(plan):
        odd = sorted(set(state_names) ^ set(plan))
        raise ValueError(f"cannot map the model's state dict onto its parameters: {odd[:5]}")
    meta = [name for name, (module, attr, *_rest) in plan.items() if getattr(module, attr).device.type == "meta"]
    if meta:
        raise ValueError(f"{len(meta)} tensors are on the meta device (not loaded), e.g. {meta[:3]}")
    entries = [(name, plan[name][2], getattr(plan[name][0], plan[name][1]).dtype) for name in state_names]
    unsupported = sorted({str(d) for _, _, d in entries if d not in _DTYPE_CODES})
    if unsupported:
        raise ValueError(f"safetensors has no code for dtype(s) {unsupported}")
    return plan, entries


def _check_variant(variant) -> None:
    if variant is not None and (not isinstance(variant, str) or not variant or
                                re.fullmatch(r"[\w-]+", variant) is None):
        raise ValueError(f"variant must be None or a name of letters, digits, '_' and '-' (e.g. 'fp16'), got "
                         f"{variant!r}")


def save_pretrained(model: nn.Module, save_directory, max_shard_size: int | str = "10GB", group=None, *,
                    variant: str | None = None, safe_serialization: bool = True, is_main_process: bool = True,
                    check_replicated: bool = True) -> list[Path]:
    """Write ``model`` (parallelized by :func:`~tpfuse.tp_layers.parallelize`, or dense) to ``save_directory`` as
    the dense diffusers checkpoint: ``config.json`` and ``diffusion_pytorch_model[.<variant>].safetensors``, or
    numbered files of at most ``max_shard_size`` each plus diffusers' index (``safe_serialization=False``: the
    same as pickled ``.bin`` files).

    Every rank of the model's group must call it (the sharded weights are gathered). One rank per distinct folder
    writes (see the module docstring: rank 0 when every rank names the same folder; ``is_main_process=False``
    excludes a rank). The old checkpoint in the folder stays loadable until the new one is complete, and only the
    files of the same variant are replaced. Before anything is written the ranks' shard shapes and dtypes, and the
    replicated tensors' checksums (``check_replicated``), are compared: a mismatch raises
    :class:`~tpfuse.tp_layers.consistency.WeightMismatchError` on every rank. A model that cannot be saved this
    way (LoRA adapters: fuse and unload them first, or save them with ``save_lora_adapter``; tensors on the meta
    device; a dtype safetensors cannot store) raises ``ValueError`` on every rank before anything is written; any
    later failure on any rank raises :class:`SaveError` on every rank.

    Returns the paths of the checkpoint's files in this rank's ``save_directory``, or an empty list when no rank
    wrote that folder (no rank saving to it is the main process).
    """
    group = resolve_group(group if group is not None else getattr(model, "tp_group", None))
    rank, world = get_rank(group), get_world_size(group)
    _check_variant(variant)
    max_bytes = _parse_size(max_shard_size)
    target = Path(os.path.realpath(os.fspath(save_directory)))
    has_config = hasattr(model, "save_config")
    local_error = None
    try:
        plan, entries = _entries(model)
    except Exception as exc:  # noqa: BLE001 - shared below: every rank raises, before any gather
        plan, entries, local_error = None, None, str(exc) if isinstance(exc, ValueError) else describe_error(exc)
    writers, errors, mine_written = _writers(group, world, rank, target, is_main_process, local_error)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if bad:  # raised by every rank alike (the same message): nobody has started a gather
        r, e = bad[0]
        raise ValueError(f"save_pretrained: rank {r}: {e}" if world > 1 else f"save_pretrained: {e}")
    if not writers:
        return []
    if world > 1:
        named = [(name, getattr(plan[name][0], plan[name][1])) for name, *_ in entries]
        # Shards differ by design: only their shapes and dtypes are compared (and every tensor's without the check).
        shapes_only = {name for name, *_ in entries if plan[name][3] is not None or not check_replicated}
        check_weights_agree(named, group, "save_pretrained", shapes_only=shapes_only,
                            remedy="Save a model that every rank parallelized from the same weights (or call "
                                   "parallelize(..., broadcast_from=0)).")

    files = _file_plan(entries, max_bytes)
    names = weight_file_names(len(files), variant, safe_serialization)
    index = index_file_name(variant, safe_serialization) if len(files) > 1 else None
    written = names + ([index] if index else []) + ([CONFIG_NAME] if has_config else [])
    writing = rank in writers
    stage = _Stage(target, variant, safe_serialization, has_config) if writing else None
    dst = writers[0] if len(writers) == 1 else None
    global_dst = None if dst is None else (dst if group is None else dist.get_global_rank(group, dst))
    # Where the gathers run: NCCL moves CUDA tensors, gloo CPU ones (a CPU-offloaded model under NCCL still saves).
    comm_device = (torch.device("cuda", torch.cuda.current_device())
                   if world > 1 and dist.get_backend(group) == "nccl" else torch.device("cpu"))
    try:
        error = None
        if writing:
            try:
                stage.open()
                if has_config:
                    model.save_config(stage.folder)
                    with open(stage.folder / CONFIG_NAME, "rb+") as f:
                        os.fsync(f.fileno())
            except Exception as exc:  # noqa: BLE001 - shared with every rank, then raised
                error = describe_error(exc)
        _share(error, group, world, f"preparing {target}")
        for file_name, indices in zip(names, files):
            error = _save_file(stage, file_name, indices, entries, plan, group, world, writing, global_dst,
                               comm_device, safe_serialization)
            _share(error, group, world, f"writing {target / file_name}")
        error = None
        if writing:
            try:
                if index:
                    _write_index(stage, index, names, files, entries)
                stage.commit(written)
            except Exception as exc:  # noqa: BLE001
                error = f"{describe_error(exc)} ({stage.outcome()})"  # only the writer knows how far it got
        _share(error, group, world, f"committing {target}", outcome=None)
    finally:
        if stage is not None:
            stage.discard()  # a failed save leaves no staging folder (a committed one has none left)
    return [Path(save_directory) / n for n in written] if mine_written else []


def _save_file(stage, file_name, indices, entries, plan, group, world, writing, global_dst, comm_device,
               safe_serialization) -> str | None:
    """Gather and write one weight file; this rank's first error (or None). Every rank runs every gather, also
    after a failure, so that the group reaches the next shared step together."""
    error, handle, tensors = None, None, {}
    if writing:
        try:
            handle = stage.file(file_name)
            if safe_serialization:
                handle.write(_header(entries, indices))
        except Exception as exc:  # noqa: BLE001
            error = describe_error(exc)
    for i in indices:
        name, shape, dtype = entries[i]
        module, attr, _shape, dim, _ranges = plan[name]
        local = getattr(module, attr).detach()
        pieces = None
        if dim is not None and world > 1:
            pieces, gather_error = _gather_bytes(local, group, world, writing, global_dst, comm_device)
            error = error or gather_error
        if writing and error is None:
            try:
                if not safe_serialization:
                    tensors[name] = (local.to("cpu").clone() if pieces is None else
                                     torch.cat(_ordered_parts(pieces, dim, module.blocks), dim=dim))
                elif pieces is None:
                    _write(handle, local)
                else:
                    _write_dense(handle, pieces, dim, module.blocks)
            except Exception as exc:  # noqa: BLE001
                error = describe_error(exc)
        del pieces
    if handle is not None:
        try:
            if error is None and not safe_serialization:
                torch.save(tensors, handle)
            handle.flush()
            os.fsync(handle.fileno())
        except Exception as exc:  # noqa: BLE001
            error = error or describe_error(exc)
        finally:
            try:
                handle.close()  # a full disk can surface here, at the last flush
            except Exception as exc:  # noqa: BLE001
                error = error or describe_error(exc)
    return error


def _gather_bytes(local: torch.Tensor, group, world: int, writing: bool, global_dst, comm_device):
    """(every rank's shard of one tensor for the writer(s): ``[world]`` tensors shaped like ``local``, else None;
    this rank's error or None). The bytes travel (``uint8`` views), so any dtype gathers, and the shapes and dtypes
    were compared first. A rank that cannot put its shard on the wire still sends (zeros), so that no rank is left
    in the collective; the error is shared after the file. (A writer that cannot allocate the receive buffers
    raises here, unshared: the one gap.)"""
    error = None
    try:
        wire = local.to(comm_device).contiguous().reshape(-1).view(torch.uint8)
    except Exception as exc:  # noqa: BLE001 - e.g. out of device memory under NCCL
        error = describe_error(exc)
        wire = torch.zeros(local.numel() * local.element_size(), dtype=torch.uint8, device=comm_device)
    if global_dst is not None:
        pieces = [torch.empty_like(wire) for _ in range(world)] if writing else None
        dist.gather(wire, pieces, dst=global_dst, group=group)  # one tensor's shards, to the writer only
    else:
        pieces = [torch.empty_like(wire) for _ in range(world)]
        dist.all_gather(pieces, wire, group=group)  # several writers (several folders)
    if not writing or error is not None:
        return None, error
    try:
        return [p.to("cpu").view(local.dtype).view(local.shape) for p in pieces], None
    except Exception as exc:  # noqa: BLE001
        return None, describe_error(exc)


def _write_index(stage, index: str, names, files, entries) -> None:
    weight_map = {entries[i][0]: file_name for file_name, indices in zip(names, files) for i in indices}
    total = sum(_nbytes(shape, dtype) for _, shape, dtype in entries)
    with stage.file(index) as f:
        f.write((json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
                 + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
