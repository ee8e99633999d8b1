"""Saving a parallelized model back to a normal diffusers checkpoint, and the errors that point there (issue 14)."""

import json

import pytest
import torch
import torch.distributed as dist

from tpfuse.tp_layers import Flux2Config, from_pretrained, parallelize, run_ranks, save_pretrained
from tpfuse.tp_layers.verify import random_diffusers_model

pytest.importorskip("diffusers")
TINY = Flux2Config.preset("tiny")


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


def _dense_state(path):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(path).state_dict()


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
        state = _dense_state(tmp_path / d)
        assert state.keys() == dense.keys()
        for k, t in dense.items():
            assert torch.equal(state[k], t), (d, k)
    assert (tmp_path / "tp1" / "config.json").read_text() == (tmp_path / "tp4" / "config.json").read_text()


def test_save_keeps_the_dtype_and_replaces_an_earlier_save(source, tmp_path):
    src, dense = source
    model = from_pretrained(src, dtype=torch.bfloat16, progress=False)
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    save_pretrained(model, tmp_path)  # one file now: the earlier shards and index are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    from safetensors.torch import load_file

    state = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert state.keys() == dense.keys()
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], t.bfloat16()) for k, t in dense.items())


def _diffusers_save_is_refused(path, blocked):
    model = parallelize(random_diffusers_model(TINY, seed=0))
    messages = []
    for save in (lambda: model.save_pretrained(path), lambda: save_pretrained(model, blocked)):
        try:
            save()
        except RuntimeError as exc:
            messages.append(str(exc))
    return messages


def test_diffusers_save_pretrained_points_to_ours_and_a_failed_write_fails_every_rank(tmp_path):
    """diffusers' save_pretrained is refused with a pointer; when rank 0 cannot write (a file where the folder
    should be), every rank raises its error instead of waiting in a gather."""
    (tmp_path / "blocked").write_text("not a folder")
    out = tmp_path / "out"
    for refused, failed in run_ranks(_diffusers_save_is_refused, 2, str(out), str(tmp_path / "blocked"),
                                     timeout=120):
        assert "tensor-parallel over 2 rank(s)" in refused
        assert "tpfuse.tp_layers.save_pretrained(model, path)" in refused
        assert failed.startswith("save_pretrained: rank 0 could not write the checkpoint: ValueError: ")
        assert "blocked is a file, not a directory" in failed
    assert not out.exists()


def test_bad_save_arguments(source, tmp_path):
    model = from_pretrained(source[0], progress=False)
    with pytest.raises(ValueError, match="max_shard_size must be an int .* got '10 parsecs'"):
        save_pretrained(model, tmp_path, max_shard_size="10 parsecs")
    with pytest.raises(ValueError, match="on the meta device"):
        save_pretrained(random_diffusers_model(TINY, seed=0, meta=True), tmp_path)


def test_parallelize_without_a_process_group_under_torchrun_is_an_error(monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; init_process_group was forgotten
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 in the environment \(a torchrun launch\?\) but "
                                           r"torch.distributed is not initialized: call "
                                           r"torch.distributed.init_process_group"):
        parallelize(random_diffusers_model(TINY, seed=0))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parallelize(random_diffusers_model(TINY, seed=0)).tp_world_size == 1
