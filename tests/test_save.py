"""Saving a parallelized model back to a normal diffusers checkpoint (issues 14 and 21): round trips, the old
checkpoint kept until the new one is complete, faults on either rank, ranks that disagree, data-parallel replicas
saving to one folder, and diffusers' own save entry points (``model.save_pretrained``, ``pipe.save_pretrained``,
``save_lora_adapter``)."""

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import Flux2Config, RankError, from_pretrained, parallelize, run_ranks, save_pretrained
from tpfuse.tp_layers import save as save_mod
from tpfuse.tp_layers.consistency import WeightMismatchError
from tpfuse.tp_layers.verify import random_diffusers_model

pytest.importorskip("diffusers")
TINY = Flux2Config.preset("tiny")
STAGING = ".tpfuse-save@"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A dense tiny model saved by diffusers (one file) and its state dict."""
    root = tmp_path_factory.mktemp("src")
    model = random_diffusers_model(TINY, seed=0)
    model.save_pretrained(root)
    return root, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save_at(src, out, reload_from=None):
    """Load ``src`` at this TP degree, save it to ``out``; with ``reload_from``, also load that checkpoint (saved
    at another degree) here and compare it to ``src`` loaded here, tensor by tensor, bitwise."""
    model = from_pretrained(src, progress=False)
    paths = save_pretrained(model, out, max_shard_size="40KB")
    same = None
    if reload_from is not None:
        other = from_pretrained(reload_from, progress=False).state_dict()
        same = all(torch.equal(t, other[k]) for k, t in model.state_dict().items())
    return [p.name for p in paths], same


def _dense_state(path, **kwargs):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(path, **kwargs).state_dict()


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_round_trip_at_tp_1_2_4(source, tmp_path):
    """Saved at TP 1, 2 and 4 from tpfuse's loader: diffusers loads each bit-identical to the weights that were
    loaded; sharded by size with diffusers' index; what TP 2 wrote loads at TP 4 as the original does."""
    src, dense = source
    _save_at(src, tmp_path / "tp1")  # this process: world size 1
    (names2, _), _ = run_ranks(_save_at, 2, str(src), str(tmp_path / "tp2"), timeout=300)
    (names4, same4), *rest = run_ranks(_save_at, 4, str(src), str(tmp_path / "tp4"), str(tmp_path / "tp2"),
                                       timeout=300)
    assert same4 and all(r[1] for r in rest)
    assert names2 == names4 and len(names2) > 3  # the same files at any degree
    index = json.loads((tmp_path / "tp2" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dense) and index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in dense.values())
    for d in ("tp1", "tp2", "tp4"):
        assert _equal_states(_dense_state(tmp_path / d), dense), d
    assert (tmp_path / "tp1" / "config.json").read_text() == (tmp_path / "tp4" / "config.json").read_text()


# ---------------------------------------------------------------------------------------------------------------
# The folder: what is replaced, what stays
# ---------------------------------------------------------------------------------------------------------------


def _snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden ones and subfolders included)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _staging_left(folder) -> list[str]:
    folder = Path(folder)
    return sorted(p.name for where in (folder, folder.parent) if where.is_dir() for p in where.iterdir()
                  if STAGING in p.name)


def _old_checkpoint(path, seed=1) -> dict[str, str]:
    """A good checkpoint saved by diffusers in 40 KB shards, beside other files a save must not touch: the same
    weights as a .bin, the fp16 variant, a .bak copy, an _ema copy, a README and a subfolder. Returns its
    snapshot."""
    model = random_diffusers_model(TINY, seed=seed)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=False)  # the other format: a safetensors save keeps it
    model.save_pretrained(path, max_shard_size="40KB")
    model.half().save_pretrained(path, variant="fp16")
    (path / "diffusion_pytorch_model.safetensors.bak").write_bytes(b"an old copy")
    first_shard = sorted(path.glob("diffusion_pytorch_model-00001-of-*.safetensors"))[0]
    (path / "diffusion_pytorch_model_ema.safetensors").write_bytes(first_shard.read_bytes())
    (path / "README.md").write_text("model card")
    (path / "notes").mkdir()
    (path / "notes" / "run.txt").write_text("lr 1e-4")
    return _snapshot(path)


def test_save_replaces_only_its_own_files_and_keeps_the_dtype(source, tmp_path):
    """A save over an existing checkpoint replaces config.json and that variant's weights (old shards of another
    count included) and leaves every other file, byte for byte: the .bin checkpoint, another variant, .bak and _ema
    copies, a README, a subfolder; the folder keeps its mode. Sharded -> one file -> sharded again, bf16 kept."""
    src, dense = source
    before = _old_checkpoint(tmp_path)
    assert "diffusion_pytorch_model.bin" in before
    os.chmod(tmp_path, 0o2750)  # setgid, group-readable: what a shared project folder may be
    assert sum(k.startswith("diffusion_pytorch_model-") for k in before) > 3
    model = from_pretrained(src, dtype=torch.bfloat16, progress=False)
    save_pretrained(model, tmp_path)  # one file
    after = _snapshot(tmp_path)
    kept = {k: v for k, v in before.items() if not k.startswith(("diffusion_pytorch_model-", "config.json",
                                                                  "diffusion_pytorch_model.safetensors.index"))}
    assert {k: after[k] for k in kept} == kept  # fp16 variant, .bak, _ema, README, notes/run.txt: untouched
    assert sorted(set(after) - set(kept)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    from safetensors.torch import load_file

    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert state.keys() == dense.keys()
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], t.bfloat16()) for k, t in dense.items())
    save_pretrained(model, tmp_path, max_shard_size="100KB")  # sharded again: the single file goes
    after = _snapshot(tmp_path)
    assert "diffusion_pytorch_model.safetensors" not in after
    assert {k: after[k] for k in kept} == kept
    assert _staging_left(tmp_path) == []
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o2750
    assert _equal_states(_dense_state(tmp_path), {k: t.bfloat16() for k, t in dense.items()})
    assert _equal_states(_dense_state(tmp_path, variant="fp16"),
                         {k: t.half() for k, t in random_diffusers_model(TINY, seed=1).state_dict().items()})


def _fake_mount(monkeypatch, mount: Path):
    """Renames across ``mount``'s boundary fail with EXDEV, as between a container's volume and its parent."""
    inside = lambda p: Path(p) == mount or mount in Path(p).parents  # noqa: E731

    def guard(real):
        def move(a, b, *args, **kwargs):
            if inside(a) != inside(b):
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(a), None, str(b))
            return real(a, b, *args, **kwargs)
        return move
    monkeypatch.setattr(os, "rename", guard(os.rename))
    monkeypatch.setattr(os, "replace", guard(os.replace))
    monkeypatch.setattr(save_mod, "_exchange", guard(save_mod._exchange))


def test_save_into_a_mount_point_or_the_working_directory(source, tmp_path, monkeypatch):
    """A folder that is a mount point (a renamed file cannot cross into it): the staging folder goes inside, the
    save succeeds. A save into the process's own working directory leaves that directory usable (a swap of the
    folder would leave the process in the deleted old one)."""
    src, dense = source
    model = from_pretrained(src, progress=False)
    mount = tmp_path / "mnt"
    before = _old_checkpoint(mount)
    with monkeypatch.context() as m:
        _fake_mount(m, mount)
        save_pretrained(model, mount)
    after = _snapshot(mount)
    assert after["README.md"] == before["README.md"] and after["diffusion_pytorch_model.fp16.safetensors"] == before[
        "diffusion_pytorch_model.fp16.safetensors"]
    assert _staging_left(mount) == [] and [p for p in mount.iterdir() if p.name.startswith(".")] == []
    assert _equal_states(_dense_state(mount), dense)

    here = tmp_path / "here"
    _old_checkpoint(here)
    monkeypatch.chdir(here)
    save_pretrained(model, ".")
    assert "config.json" in os.listdir(".") and "README.md" in os.listdir(".")
    Path("log.txt").write_text("still here")  # the working directory is the live folder
    assert (here / "log.txt").read_text() == "still here"
    assert _equal_states(_dense_state(here), dense)


def test_a_failed_save_says_what_the_folder_holds(source, tmp_path, monkeypatch):
    """The error says what is on disk: the new folders it made are gone after an early failure; a failure in the
    file-by-file renames may leave a mix (and says so); a failure after the swap says the new checkpoint is in
    place. A target name of 220 characters still fits the staging names (NAME_MAX 255)."""
    src, dense = source
    model = from_pretrained(src, progress=False)

    def full(f, t):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(save_mod, "_write", full)
        with pytest.raises(save_mod.SaveError, match="No space left on device.*if any, is unchanged"):
            save_pretrained(model, tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []  # a/b/c were made by the failed save: removed again

    folder = tmp_path / "ckpt"
    _old_checkpoint(folder)
    moved = []

    def second_fails(a, b):
        moved.append(b)
        if len(moved) == 2:
            raise OSError(errno.EIO, "Input/output error", str(a))
        return os.rename(a, b)
    with monkeypatch.context() as m:
        m.setattr(save_mod, "_exchange", lambda a, b: False)  # no exchange: file by file
        m.setattr(save_mod.os, "replace", second_fails)
        with pytest.raises(save_mod.SaveError, match=r"Input/output error.*\(the folder may now hold a mix of old "
                                                     r"and new weight files: save again\)$"):
            save_pretrained(model, folder, max_shard_size="30KB")
    assert _staging_left(folder) == []

    real_fsync = save_mod._fsync_dir

    def parent_fsync_fails(path):
        if Path(path) == tmp_path:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_fsync(path)
    with monkeypatch.context() as m:
        m.setattr(save_mod, "_fsync_dir", parent_fsync_fails)
        with pytest.raises(save_mod.SaveError, match=r"\(the new checkpoint is already complete in the folder\)$"):
            save_pretrained(model, folder)
    assert _equal_states(_dense_state(folder), dense)

    long = tmp_path / ("x" * 220)
    save_pretrained(model, long)
    _old_checkpoint(long / "again")
    save_pretrained(model, long / "again")
    assert _equal_states(_dense_state(long / "again"), dense) and _staging_left(long / "again") == []


def test_killed_writer_leaves_a_hidden_folder_that_the_next_save_removes(source, tmp_path, monkeypatch):
    """What a crash (or SIGKILL) mid-write leaves: the old checkpoint, untouched, and a hidden staging folder
    beside it that no loader reads; the next save from this host removes it once its writer is gone."""
    src, _ = source
    before = _old_checkpoint(tmp_path / "ckpt")
    stale = tmp_path / f".ckpt{STAGING}{save_mod.socket.gethostname()}@{2**22 + 12345}@deadbeef"
    stale.mkdir()
    (stale / "diffusion_pytorch_model-00001-of-00003.safetensors").write_bytes(b"half a shard")
    alive = tmp_path / f".ckpt{STAGING}{save_mod.socket.gethostname()}@{os.getpid()}@cafe"  # a running writer
    alive.mkdir()
    monkeypatch.setattr(save_mod, "_pid_alive", lambda pid: pid == os.getpid())
    save_pretrained(from_pretrained(src, progress=False), tmp_path / "ckpt")
    assert not stale.exists() and alive.exists()
    assert _snapshot(tmp_path / "ckpt")["README.md"] == before["README.md"]


# ---------------------------------------------------------------------------------------------------------------
# Faults on a rank, and ranks that disagree: one error on every rank, the old checkpoint unchanged
# ---------------------------------------------------------------------------------------------------------------


class _FullDisk:
    """A file whose ``write`` (after ``after`` bytes) or ``close`` fails with ENOSPC, as on a full disk."""

    def __init__(self, f, when, after=0):
        self.f, self.when, self.left = f, when, after

    def write(self, data):
        if self.when == "write" and len(data) > self.left:
            self.f.write(data[:self.left])  # a partial write, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        if self.when == "close":
            raise OSError(errno.ENOSPC, "No space left on device")


def _attempt(fn):
    """(exception class name, message, seconds) of ``fn()``; ("ok", None, seconds) when it returns."""
    start = time.monotonic()
    try:
        fn()
        return "ok", None, time.monotonic() - start
    except Exception as exc:  # noqa: BLE001 - the test compares what every rank raised
        return type(exc).__name__, str(exc), time.monotonic() - start


def _fault_cases(src, root):
    """On 2 ranks, each case: rank 0 builds an old checkpoint, a fault is injected on one rank, every rank saves
    over it. Returns, per case, what this rank raised and (rank 0) whether the folder is unchanged."""
    rank = dist.get_rank()
    out = {}

    def case(name, prepare=None, undo=None, **kwargs):
        folder = Path(root) / name
        before = _old_checkpoint(folder) if rank == 0 else None
        dist.barrier()
        model = from_pretrained(src, progress=False)
        if prepare is not None:
            prepare(model)
        result = _attempt(lambda: save_pretrained(model, folder, max_shard_size="30KB", **kwargs))
        if undo is not None:
            undo()
        dist.barrier()
        unchanged = _snapshot(folder) == before if rank == 0 else None
        out[name] = (*result, unchanged, _staging_left(folder) if rank == 0 else None)

    real_file = save_mod._Stage.file

    def full_disk(when, nth):
        calls = []

        def file(self, name):
            calls.append(name)
            f = real_file(self, name)
            return _FullDisk(f, when, after=100) if len(calls) == nth else f
        if rank == 0:
            save_mod._Stage.file = file

    def restore():
        save_mod._Stage.file = real_file

    case("write", lambda m: full_disk("write", 2), restore)
    case("close", lambda m: full_disk("close", 3), restore)  # outside the writes' error handling before
    real_exchange = save_mod._exchange

    def failing_exchange(a, b):
        raise OSError(errno.EIO, "Input/output error", str(a))

    def break_commit(m):
        save_mod._exchange = failing_exchange if rank == 0 else real_exchange

    case("commit", break_commit, lambda: setattr(save_mod, "_exchange", real_exchange))

    def cast_a_block(m):  # rank 1's copy of one block in another dtype: its shards have other byte sizes
        if rank == 1:
            m.single_transformer_blocks[0].to(torch.bfloat16)

    case("dtype", cast_a_block)

    def nudge_embedder(m):  # a replicated weight that differs: rank 0's copy would be saved silently
        if rank == 1:
            with torch.no_grad():
                m.x_embedder.weight[0, 0] += 1e-3

    case("replicated", nudge_embedder)
    case("replicated_unchecked", nudge_embedder, check_replicated=False)

    def failing_state_dict(m):  # not a ValueError, before the first collective: used to leave rank 0 waiting
        if rank == 1:
            def hook(module, state, prefix, local_metadata):
                raise RuntimeError("state dict hook failed")
            m.register_state_dict_post_hook(hook)

    case("hook", failing_state_dict)
    return out


def test_failures_reach_every_rank_and_keep_the_old_checkpoint(source, tmp_path):
    """A full disk at a write or at close, a failed swap on rank 0, a rank holding another dtype or another copy of
    a replicated weight: every rank raises the same error, fast (no wait for the 300 s collective timeout); the
    old checkpoint and its neighbours are byte-identical and no staging folder is left behind."""
    r0, r1 = run_ranks(_fault_cases, 2, str(source[0]), str(tmp_path), timeout=300)
    for name in ("write", "close", "commit"):
        (kind, msg, seconds, unchanged, left), (kind1, msg1, seconds1, *_) = r0[name], r1[name]
        assert kind == kind1 == "SaveError" and msg == msg1, (name, msg, msg1)
        assert msg.startswith("save_pretrained: rank 0 failed "), msg
        assert "No space left on device" in msg if name != "commit" else "Input/output error" in msg
        assert "previous checkpoint in the folder, if any, is unchanged" in msg
        assert unchanged and left == [], (name, left)
        assert max(seconds, seconds1) < 60, (name, seconds, seconds1)
    for name, tensor in (("dtype", "single_transformer_blocks.0.attn.norm_q.weight"),
                         ("replicated", "x_embedder.weight")):
        (kind, msg, _, unchanged, left), (kind1, msg1, *_) = r0[name], r1[name]
        assert kind == kind1 == "WeightMismatchError" and msg == msg1, (msg, msg1)
        assert f"'{tensor}'" in msg and "save_pretrained" in msg, msg
        assert ("rank 0 [16] float32, rank 1 [16] bfloat16" in msg and "4 of 29" in msg if name == "dtype" else
                "values differ (ranks grouped by equal values: [[0], [1]])" in msg), msg
        assert unchanged and left == []
    (kind, msg, _, unchanged, left), (kind1, msg1, *_) = r0["hook"], r1["hook"]
    assert kind == kind1 == "ValueError" and msg == msg1 == ("save_pretrained: rank 1: RuntimeError: state dict hook "
                                                             "failed") and unchanged and left == []
    kind, _, _, unchanged, _ = r0["replicated_unchecked"]
    assert kind == "ok" and not unchanged  # check_replicated=False: rank 0's copy is written, as documented


def _killed(src, root, who):
    """Rank ``who`` dies mid-save (exit code 7): rank 1 in its third gather, rank 0 after a partial write."""
    rank = dist.get_rank()
    model = from_pretrained(src, progress=False)
    if rank == who == 1:
        real, calls = save_mod._gather_bytes, []

        def gather(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os._exit(7)
            return real(*a, **k)
        save_mod._gather_bytes = gather
    if rank == who == 0:
        real_write = save_mod._write

        def write(f, t):
            real_write(f, t)
            f.flush()
            os._exit(7)
        save_mod._write = write
    dist.barrier()
    save_pretrained(model, root, max_shard_size="30KB")


@pytest.mark.parametrize("who", [1, 0])
def test_a_rank_killed_mid_save_leaves_the_old_checkpoint(source, tmp_path, who):
    """Either rank killed mid-save: the old checkpoint is byte-identical. When rank 1 dies, rank 0 fails cleanly
    (no staging folder left); when the writer dies, its hidden staging folder is left for the next save."""
    folder = tmp_path / "ckpt"
    before = _old_checkpoint(folder)
    with pytest.raises(RankError, match=f"rank {who} died with exit code 7"):
        run_ranks(_killed, 2, str(source[0]), str(folder), who, timeout=120)
    time.sleep(0.5)  # rank 0's cleanup after its peer's death
    assert _snapshot(folder) == before
    left = _staging_left(folder)
    assert left == [] if who == 1 else len(left) == 1, left
    assert _equal_states(_dense_state(folder), random_diffusers_model(TINY, seed=1).state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Data-parallel replicas saving to one folder
# ---------------------------------------------------------------------------------------------------------------


def _replicas(src, root, saves):
    """4 ranks as DP x TP, TP = 1 (4 replicas) then TP = 2 (2 replicas): every replica saves ``saves`` times into
    the same folder at once. Returns the failures per TP degree."""
    rank = dist.get_rank()
    failures = {}
    for tp in (1, 2):
        groups = [dist.new_group(list(range(g, g + tp))) for g in range(0, 4, tp)]  # every rank creates every group
        model = from_pretrained(src, group=groups[rank // tp], progress=False)
        dist.barrier()
        failures[tp] = []
        for _ in range(saves):
            kind, msg, _ = _attempt(lambda: save_pretrained(model, Path(root) / f"tp{tp}", max_shard_size="40KB"))
            if kind != "ok":
                failures[tp].append(f"{kind}: {msg}")
        dist.barrier()
    return failures


def test_data_parallel_replicas_saving_to_one_folder_do_not_collide(source, tmp_path):
    """TP=1 x DP=4 and TP=2 x DP=2 replicas all saving to one folder at once, 4 times each: no failure (staging
    names are unique per process; before, shared temporary names failed about half of such saves), and the folder
    holds one complete checkpoint."""
    src, dense = source
    for failures in run_ranks(_replicas, 4, str(src), str(tmp_path), 4, timeout=300):
        assert failures == {1: [], 2: []}
    for tp in (1, 2):
        assert _equal_states(_dense_state(tmp_path / f"tp{tp}"), dense)
        assert _staging_left(tmp_path / f"tp{tp}") == []


# ---------------------------------------------------------------------------------------------------------------
# diffusers' entry points: model.save_pretrained, pipe.save_pretrained, save_lora_adapter
# ---------------------------------------------------------------------------------------------------------------


def _diffusers_saves(src, root):
    """model.save_pretrained on 2 ranks with diffusers' arguments, each checked by diffusers' loader on rank 0."""
    from diffusers import Flux2Transformer2DModel

    rank = dist.get_rank()
    root = Path(root)
    model = from_pretrained(src, progress=False)
    dense = random_diffusers_model(TINY, seed=0).state_dict()
    res = {}
    calls = []
    real = save_mod._Stage.commit

    def counting_commit(self, names):
        calls.append(str(self.target))
        return real(self, names)
    save_mod._Stage.commit = counting_commit

    def loaded(folder, **kwargs):
        dist.barrier()
        ok = _equal_states(Flux2Transformer2DModel.from_pretrained(folder, **kwargs).state_dict(), dense)
        dist.barrier()
        return ok

    model.save_pretrained(root / "plain")
    res["plain"] = loaded(root / "plain")
    model.save_pretrained(root / "variant", variant="fp16", max_shard_size="40KB")
    res["variant"] = loaded(root / "variant", variant="fp16")
    res["variant_files"] = sorted(p.name for p in (root / "variant").iterdir())
    model.save_pretrained(root / "bin", safe_serialization=False, max_shard_size="40KB")
    res["bin"] = loaded(root / "bin", use_safetensors=False)
    res["bin_files"] = sorted(p.name for p in (root / "bin").iterdir())
    calls.clear()
    model.save_pretrained(root / "nobody", is_main_process=False)
    res["nobody"] = (root / "nobody").exists()
    model.save_pretrained(root / "rank1", is_main_process=rank == 1)
    res["rank1_writes"] = list(calls)
    calls.clear()
    model.save_pretrained(root / f"own{rank}")  # each rank its own folder (per-process temporary directories)
    res["own"] = loaded(root / f"own{rank}")
    res["own_writes"] = list(calls)
    save_mod._Stage.commit = real
    res["push"] = _attempt(lambda: model.save_pretrained(root / "hub", push_to_hub=True))[:2]

    # The pipeline saves its transformer through the model's save_pretrained
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32), layers_per_block=1, latent_channels=TINY.in_channels // 4,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             sample_size=32)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                              tokenizer=None, transformer=model, is_distilled=True)
    pipe.save_pretrained(root / f"pipe{rank}", max_shard_size="40KB")
    dist.barrier()
    # model_index.json names diffusers' class (not tpfuse's module), so the pipeline loads back
    res["pipe_index"] = json.loads((root / f"pipe{rank}" / "model_index.json").read_text())["transformer"]
    loaded_pipe = Flux2KleinPipeline.from_pretrained(root / f"pipe{rank}", text_encoder=None, tokenizer=None)
    res["pipe"] = _equal_states(loaded_pipe.transformer.state_dict(), dense)
    return res


def test_model_and_pipeline_save_pretrained_write_the_dense_checkpoint(source, tmp_path):
    """On 2 ranks, diffusers' ``model.save_pretrained`` (and a pipeline's, through it) writes the dense checkpoint
    that diffusers loads bit-identical, honouring variant, max_shard_size, safe_serialization and
    is_main_process; one writer per folder; push_to_hub is refused."""
    r0, r1 = run_ranks(_diffusers_saves, 2, str(source[0]), str(tmp_path), timeout=300)
    for r in (r0, r1):
        assert r["plain"] and r["variant"] and r["bin"] and r["own"] and r["pipe"]
        assert not r["nobody"]
        assert r["pipe_index"] == ["diffusers", "Flux2Transformer2DModel"]
        assert r["push"][0] == "NotImplementedError" and "push_to_hub=True" in r["push"][1]
    files = r0["variant_files"]
    shards = [f for f in files if f.startswith("diffusion_pytorch_model.fp16-")]
    n = len(shards)
    assert n > 3 and files == ["config.json"] + [f"diffusion_pytorch_model.fp16-{i:05d}-of-{n:05d}.safetensors"
                                                 for i in range(1, n + 1)] + [
        "diffusion_pytorch_model.safetensors.index.fp16.json"]
    assert "diffusion_pytorch_model.bin.index.json" in r0["bin_files"]
    assert r0["rank1_writes"] == [] and len(r1["rank1_writes"]) == 1  # the main process writes, nobody else
    assert r0["own_writes"] == [str(tmp_path / "own0")] and r1["own_writes"] == [str(tmp_path / "own1")]


def test_model_save_pretrained_at_world_size_1_is_diffusers_own(source, tmp_path):
    src, dense = source
    model = from_pretrained(src, progress=False)
    model.save_pretrained(tmp_path, variant="fp16", max_shard_size="40KB", safe_serialization=False)
    assert _equal_states(_dense_state(tmp_path, variant="fp16", use_safetensors=False), dense)


def _lora_writers(root):
    from peft import LoraConfig

    torch.manual_seed(0)
    model = parallelize(random_diffusers_model(TINY, seed=0))
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_out.0", "proj_out"], init_lora_weights=False))
    calls = []
    real = save_mod.atomic_write

    def counting(path, write):
        calls.append(str(path))
        return real(path, write)
    save_mod.atomic_write = counting
    model.save_lora_adapter(root)
    dist.barrier()
    from tpfuse.tp_layers import lora_state_dict

    return calls, lora_state_dict(model)


def test_save_lora_adapter_is_written_by_rank_0(tmp_path):
    (calls0, state), (calls1, _) = run_ranks(_lora_writers, 2, str(tmp_path), timeout=300)
    assert len(calls0) == 1 and calls1 == []
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert saved.keys() == {f"transformer.{k}" for k in state} or saved.keys() == state.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["pytorch_lora_weights.safetensors"]


def test_bad_save_arguments(source, tmp_path):
    model = from_pretrained(source[0], progress=False)
    with pytest.raises(ValueError, match="max_shard_size must be an int .* got '10 parsecs'"):
        save_pretrained(model, tmp_path, max_shard_size="10 parsecs")
    with pytest.raises(ValueError, match="on the meta device"):
        save_pretrained(random_diffusers_model(TINY, seed=0, meta=True), tmp_path)
    with pytest.raises(ValueError, match=r"variant must be .* got '\.\./x'"):
        save_pretrained(model, tmp_path, variant="../x")
    (tmp_path / "blocked").write_text("not a folder")
    with pytest.raises(save_mod.SaveError, match="blocked is a file, not a directory"):
        save_pretrained(model, tmp_path / "blocked")
    assert _staging_left(tmp_path / "blocked") == []


def test_parallelize_without_a_process_group_under_torchrun_is_an_error(monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; init_process_group was forgotten
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 in the environment \(a torchrun launch\?\) but "
                                           r"torch.distributed is not initialized: call "
                                           r"torch.distributed.init_process_group"):
        parallelize(random_diffusers_model(TINY, seed=0))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallelize(random_diffusers_model(TINY, seed=0)).tp_world_size == 1
