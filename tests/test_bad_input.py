"""Bad input gets a clear exception naming the offending value, never a silent wrong answer."""

import pytest
import torch
from torch import nn

from tpfuse.kernels import fused_qkv_mlp_proj, layernorm_modulate, qk_norm_rope, qk_norm_rope_reference
from tpfuse.tp_layers import (
    Flux2Config,
    RankError,
    TPDoubleStreamBlock,
    TPSingleStreamBlock,
    run_ranks,
)
from tpfuse.tp_layers.verify import block_inputs, random_dense_block

TINY = Flux2Config.preset("tiny")


def _shard_all():
    """Both block kinds with heads, then the MLP width, that 3 ranks do not divide: each error, by rank."""
    mlp_cfg = Flux2Config(num_attention_heads=6, attention_head_dim=16, axes_dims_rope=(4, 4, 4, 4),
                          mlp_ratio=194 / 96, num_layers=1, num_single_layers=1)
    assert mlp_cfg.mlp_hidden == 194
    out = []
    for cfg in (TINY, mlp_cfg):
        for kind in ("single", "double"):
            block = random_dense_block(cfg, kind, seed=0)
            try:
                (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(block)
                out.append("no error")
            except ValueError as exc:
                out.append(str(exc))
    return out


def test_heads_and_mlp_width_not_divisible_by_world_size():
    for messages in run_ranks(_shard_all, 3):
        assert all("cannot shard across 3 ranks: heads=4 not divisible by the world size" in m
                   for m in messages[:2]), messages
        assert all("mlp_hidden=194 not divisible by the world size" in m for m in messages[2:]), messages


def test_wrong_block_type():
    single = random_dense_block(TINY, "single", seed=0)
    double = random_dense_block(TINY, "double", seed=0)
    with pytest.raises(TypeError, match="got torch.nn.modules.linear.Linear"):
        TPSingleStreamBlock.from_dense(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="TPSingleStreamBlock.from_dense expects one of .*got .*DoubleStreamBlock"):
        TPSingleStreamBlock.from_dense(double)
    with pytest.raises(TypeError, match="TPDoubleStreamBlock.from_dense expects one of .*SingleStreamBlock"):
        TPDoubleStreamBlock.from_dense(single)
    with pytest.raises(TypeError, match="got tpfuse.tp_layers.flux2.tp_blocks.TPSingleStreamBlock"):
        TPSingleStreamBlock.from_dense(TPSingleStreamBlock.from_dense(single))


def test_missing_weights():
    single = random_dense_block(TINY, "single", seed=0)
    single.attn.norm_q = nn.RMSNorm(TINY.head_dim, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"missing weights \['attn.norm_q.weight'\]"):
        TPSingleStreamBlock.from_dense(single)
    double = random_dense_block(TINY, "double", seed=0)
    del double.ff_context.linear_out.weight
    double.ff_context.linear_out.register_parameter("weight", None)
    double.attn.norm_added_k = nn.RMSNorm(TINY.head_dim, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"missing weights \['attn.norm_added_k.weight', "
                                         r"'ff_context.linear_out.weight'\]"):
        TPDoubleStreamBlock.from_dense(double)


@pytest.mark.parametrize("tp", [False, True], ids=["dense", "tp"])
@pytest.mark.parametrize("kind", ["single", "double"])
def test_input_dtype_device_shape(kind, tp):
    block = random_dense_block(TINY, kind, seed=0)
    if tp:
        block = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(block)
    tensors, rope = block_inputs(TINY, kind, 1, 3, 5, seed=0)
    tensors = {k: v.detach() for k, v in tensors.items()}

    def call(**override):
        return block(**{**tensors, **override}, image_rotary_emb=rope)

    with pytest.raises(TypeError, match="hidden_states has dtype torch.float64 but the block's weights are "
                                        "torch.float32"):
        call(hidden_states=tensors["hidden_states"].double())
    with pytest.raises(ValueError, match="encoder_hidden_states is on meta but the block's weights are on cpu"):
        call(encoder_hidden_states=tensors["encoder_hidden_states"].to("meta"))
    with pytest.raises(ValueError, match=r"hidden_states must be \[B, S, 64\], got shape \(1, 5, 32\)"):
        call(hidden_states=tensors["hidden_states"][..., :32])
    mod_name = "temb_mod" if kind == "single" else "temb_mod_img"
    with pytest.raises(ValueError, match=rf"{mod_name} must be \[B, \d+\], \[B, 1, \d+\] or per token \[B, \d+, \d+\], "
                                         r"got shape \(1, 10\)"):
        call(**{mod_name: torch.zeros(1, 10)})
    with pytest.raises(TypeError, match=f"{mod_name} has dtype torch.float16"):
        call(**{mod_name: tensors[mod_name].half()})
    with pytest.raises(ValueError, match=r"unsupported joint_attention_kwargs \['scale'\]"):
        call(joint_attention_kwargs={"scale": 1.0})
    call(joint_attention_kwargs={"kv_cache": None, "kv_cache_mode": None})  # what the model passes by default


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown preset 'klein-7b'; choose one of \['dev', 'klein-4b'"):
        Flux2Config.preset("klein-7b")
    with pytest.raises(ValueError, match=r"axes_dims_rope \(4, 4, 4\) sum to 12, not attention_head_dim=16"):
        Flux2Config(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 4, 4))
    with pytest.raises(ValueError, match="attention_head_dim=15 must be even"):
        Flux2Config(num_attention_heads=2, attention_head_dim=15, axes_dims_rope=(15,))
    with pytest.raises(ValueError, match="every RoPE axis must be even"):
        Flux2Config(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(5, 5, 6))
    with pytest.raises(ValueError, match="must be positive"):
        Flux2Config(num_attention_heads=0)


# --------------------------------------------------------------------------------------------------------------
# Zero-size and edge inputs: empty in, empty out (forward and backward), or a clear error naming the dimension
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(2, 0, 2, 32), (2, 5, 0, 32), (0, 5, 2, 32)], ids=["S=0", "H=0", "B=0"])
def test_qk_norm_rope_empty_in_empty_out(backend, shape):
    B, S, H, D = shape
    q = torch.randn(B, S, H, D, requires_grad=True)
    w = torch.ones(D)
    cos, sin = torch.ones(S, D), torch.zeros(S, D)
    qo, ko = qk_norm_rope(q, torch.randn(B, S, H, D), w, w, cos, sin, backend=backend)
    assert qo.shape == ko.shape == (B, S, H, D)
    assert torch.autograd.grad(qo.sum(), q)[0].shape == q.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,S", [(2, 0), (0, 5)])
def test_fused_projection_empty_in_empty_out(backend, B, S):
    x = torch.randn(B, S, 24, requires_grad=True)
    w = torch.ones(32)
    q, k, v, mlp = fused_qkv_mlp_proj(x, torch.randn(3 * 2 * 32 + 2 * 20, 24), w, w, torch.ones(S, 32),
                                      torch.zeros(S, 32), 2, 32, 20, backend=backend)
    assert q.shape == (B, 2, S, 32) and mlp.shape == (B, S, 20)
    assert torch.autograd.grad(mlp.sum() + q.sum(), x)[0].shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_feature_dims_are_refused_by_name(backend):
    with pytest.raises(ValueError, match="head_dim D=0"):
        qk_norm_rope(*(torch.randn(1, 3, 2, 0) for _ in range(2)), torch.ones(0), torch.ones(0), None, None,
                     backend=backend)
    with pytest.raises(ValueError, match="D=0 features"):
        layernorm_modulate(torch.randn(1, 3, 0), torch.randn(1, 0), torch.randn(1, 0), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_angles_propagate_and_unpaired_angles_are_located(backend):
    """A NaN angle pair is a pair (the NaN reaches the output, as in the reference); an unpaired value is reported
    with its row and pair."""
    q, w = torch.randn(1, 5, 2, 32), torch.ones(32)
    cos = torch.randn(5, 16).repeat_interleave(2, dim=1)
    cos[1, 0:2] = float("nan")
    out = qk_norm_rope(q, q, w, w, cos, torch.zeros(5, 32), backend=backend)[0]
    ref = qk_norm_rope_reference(q, q, w, w, cos, torch.zeros(5, 32))[0]
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    cos = torch.ones(5, 32)
    cos[2, 3] = 0.5
    with pytest.raises(ValueError, match=r"cos\[:, 2i\] != cos\[:, 2i\+1\] \(first at row 2, pair 1\)"):
        qk_norm_rope(q, q, w, w, cos, torch.zeros(5, 32), backend="triton")


@pytest.mark.parametrize("kind", ["single", "double"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tp_block_takes_what_the_dense_block_takes_and_names_a_batch_mismatch(kind, backend, monkeypatch):
    """A hidden state whose last dim is not contiguous is copied (the dense block accepts it); a modulation with
    another batch than the hidden states is refused by name, not as an internal kernel's argument."""
    monkeypatch.setenv("TPFUSE_BACKEND", backend)
    dense = random_dense_block(TINY, kind, seed=0)
    tp = (TPDoubleStreamBlock if kind == "double" else TPSingleStreamBlock).from_dense(dense)
    tensors, rope = block_inputs(TINY, kind, 2, 3, 5, seed=1)
    tensors = {k: v.detach() for k, v in tensors.items()}
    h = tensors["hidden_states"]
    tensors["hidden_states"] = h.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, strides (.., 1, S)
    with torch.no_grad():
        out, ref = tp(**tensors, image_rotary_emb=rope), dense(**tensors, image_rotary_emb=rope)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.allclose(o, r, rtol=1e-5, atol=1e-6)
    key = "temb_mod_img" if kind == "double" else "temb_mod"
    tensors[key] = tensors[key][:1].repeat(3, 1)
    with pytest.raises(ValueError, match=f"{key} has batch 3 but the hidden states have batch 2"):
        tp(**tensors, image_rotary_emb=rope)


def test_checkpoint_source_errors_name_the_folder_and_the_file(tmp_path):
    from tpfuse.tp_layers.model import load_config

    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no subfolder 'nope' \(folders there: \['transformer'\]\)"):
        load_config(tmp_path, subfolder="nope")
    (tmp_path / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"transformer/config.json: not a valid JSON config"):
        load_config(tmp_path)


def _layer_on_foreign_group():
    import torch.distributed as dist

    from tpfuse.tp_layers import ColumnParallelLinear

    group = dist.new_group([0])  # rank 1 gets GroupMember.NON_GROUP_MEMBER
    if dist.get_rank() == 1:
        ColumnParallelLinear(8, 8, group=group)


def test_a_group_handle_on_a_rank_outside_it_is_named():
    with pytest.raises(RankError, match="rank 1 is not a member of the group it was given"):
        run_ranks(_layer_on_foreign_group, 2, timeout=120)


def test_cli_input_errors_exit_2_with_one_line_naming_the_file(tmp_path, capsys):
    """Exit 2 and one line for usage/input errors (1 is kept for a numerical FAIL): a backend this machine lacks,
    a truncated or empty safetensors file, a checkpoint missing a block's key."""
    pytest.importorskip("diffusers")
    import safetensors.torch

    from tpfuse.tp_layers.cli import _INPUT_ERRORS, main
    from tpfuse.tp_layers.verify import checkpoint_block, random_diffusers_model

    def run(*args):
        code = main(["verify", "--preset", "tiny", *args])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err[-1] if err else ""

    if not torch.cuda.is_available():
        code, err = run("--backend", "nccl")
        assert code == 2 and "--backend nccl needs one CUDA device per rank" in err
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("cut", "empty"):
        code, err = run("--model", str(tmp_path / f"{name}.safetensors"))
        assert code == 2 and f"{name}.safetensors: not a readable safetensors file" in err, err
    # A block missing a key: what each rank raises (checkpoint_block), which verify reports as an input error.
    state = {k: v.contiguous() for k, v in random_diffusers_model(TINY, 0).state_dict().items()}
    del state["transformer_blocks.0.attn.to_k.weight"]
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: block transformer_blocks.0 does not match a FLUX.2 "
                                         r"double block .* missing \['transformer_blocks.0.attn.to_k.weight'\]"):
        checkpoint_block(TINY, "double", tmp_path / "model.safetensors", 0)
    assert "ValueError" in _INPUT_ERRORS


def test_load_sharded_follows_the_index_and_refuses_ambiguous_keys(tmp_path):
    """The index decides which file holds each key: a stale single-file copy beside indexed shards is ignored and
    reported; a shard the index names but the folder lacks is named; without an index, a key in two files is an
    error naming both."""
    pytest.importorskip("diffusers")
    import json

    import safetensors.torch

    from tpfuse.tp_layers import from_pretrained
    from tpfuse.tp_layers.verify import random_diffusers_model

    dense = random_diffusers_model(TINY, seed=0)
    sharded = tmp_path / "sharded"
    dense.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    stale = {k: (v + 1.0).contiguous() for k, v in dense.state_dict().items()}
    safetensors.torch.save_file(stale, sharded / "diffusion_pytorch_model.safetensors")
    model = from_pretrained(sharded, progress=False)
    assert model.tp_load_report.ignored == [str(sharded / "diffusion_pytorch_model.safetensors")]
    dense_state = dense.state_dict()
    for name, p in model.state_dict().items():  # world size 1: the whole weights, from the indexed shards
        assert torch.equal(p, dense_state[name]), name

    first = sorted(set(index["weight_map"].values()))[0]
    (sharded / first).rename(tmp_path / first)
    with pytest.raises(ValueError, match=f"names shard file\\(s\\) \\['{first}'\\] that are not in"):
        from_pretrained(sharded, progress=False)

    loose = tmp_path / "loose"
    loose.mkdir()
    (sharded / "config.json").rename(loose / "config.json")
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    safetensors.torch.save_file(state, loose / "a.safetensors")
    safetensors.torch.save_file({"x_embedder.weight": state["x_embedder.weight"]}, loose / "b.safetensors")
    with pytest.raises(ValueError, match=r"key 'x_embedder.weight' is in two checkpoint files, .*a.safetensors and "
                                         r".*b.safetensors"):
        from_pretrained(loose, progress=False)


def test_checkpoint_tensors_that_cannot_be_weights_are_refused_by_file_and_key(tmp_path):
    """A 0-dim tensor under a BFL block key (NVFP4 files' ``*.input_scale``), a fused QKV with 3·D + 1 rows and an
    integer tensor: each named with its file in the one load error, nothing cast or dropped silently."""
    pytest.importorskip("diffusers")
    import safetensors.torch

    from tpfuse.tp_layers import load_sharded, parallelize
    from tpfuse.tp_layers.verify import random_diffusers_model

    D = TINY.hidden_size
    path = tmp_path / "flux-2-bad.safetensors"
    safetensors.torch.save_file({
        "double_blocks.0.img_attn.qkv.weight": torch.zeros(3 * D + 1, D),
        "double_blocks.0.img_attn.qkv.input_scale": torch.tensor(1.0),
        "double_blocks.0.img_mlp.0.input_scale": torch.tensor(1.0),
        "img_in.weight": torch.zeros(D, TINY.in_channels, dtype=torch.int32),
    }, path)
    model = parallelize(random_diffusers_model(TINY, 0, meta=True))
    with pytest.raises(ValueError) as info:
        load_sharded(model, path, progress=False)
    msg = str(info.value)
    assert (f"{path}: double_blocks.0.img_attn.qkv.weight: a fused Q/K/V tensor of shape ({3 * D + 1}, {D}), not 3 "
            "equal row blocks") in msg
    for key in ("double_blocks.0.img_attn.qkv.input_scale", "double_blocks.0.img_mlp.0.input_scale"):
        assert f"{path}: {key}: a 0-dim tensor, not a weight" in msg
    assert f"{path}: img_in.weight: dtype I32, not a floating-point weight" in msg
    assert "missing keys" in msg  # the rest of the one report is still there


def test_hub_errors_name_the_source_and_the_cause(tmp_path, monkeypatch):
    """Gated, unknown, a missing revision, unauthorized, offline and not cached, unreachable and not cached, a
    typo'd relative path: each message names the source and the cause (huggingface_hub's own errors, built from
    the Hub's HTTP answers, stand in for the network)."""
    import sys

    import huggingface_hub
    import huggingface_hub.constants as hf_constants
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status

    from tpfuse.tp_layers import from_pretrained
    from tpfuse.tp_layers.checkpoint import CheckpointNotFoundError, resolve_source

    http = sys.modules[HfHubHTTPError.__mro__[1].__module__]  # the HTTP client huggingface_hub raises with
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def answer(status, code):
        def fake(repo_id, **kwargs):
            url = f"https://huggingface.co/api/models/{repo_id}/revision/main"
            hf_raise_for_status(http.Response(status, request=http.Request("GET", url), headers={
                "X-Error-Code": code, "X-Error-Message": "Access is restricted."}))
        return fake

    cases = [((401, "GatedRepo"), PermissionError, r"Hub repo 'org/gated' is gated: accept its terms at "
              r"https://huggingface.co/org/gated and pass token="),
             ((404, "RepoNotFound"), CheckpointNotFoundError, r"'org/gated' is not a local path \(no .*org/gated\), "
              r"and the Hub has no repo by that id that this token can read"),
             ((404, "RevisionNotFound"), CheckpointNotFoundError, r"Hub repo 'org/gated' has no revision 'v9'"),
             ((403, ""), PermissionError, r"Hub repo 'org/gated': not authorized \(403")]
    for (status, code), exc_type, message in cases:
        monkeypatch.setattr(huggingface_hub, "snapshot_download", answer(status, code))
        with pytest.raises(exc_type, match=message):
            resolve_source("org/gated", revision="v9")

    def unreachable(repo_id, **kwargs):
        try:
            raise http.ConnectError("[Errno -2] Name or service not known")
        except http.ConnectError as exc:
            raise LocalEntryNotFoundError("cannot find the appropriate snapshot folder") from exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointNotFoundError, match=r"'org/klein' is not a local path .*, and Hub repo 'org/klein' "
                                                      r"is not in the local cache .*hub\); the Hub is unreachable "
                                                      r"\(ConnectError: \[Errno -2\] Name or service not known\)"):
        resolve_source("org/klein")
    monkeypatch.undo()  # the real snapshot_download, offline: never touches the network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFoundError, match=r"'org/klein' is not a local path .*not in the local cache "
                                                      r".*; offline \(local_files_only=True or HF_HUB_OFFLINE=1\)"):
        from_pretrained("org/klein", subfolder="transformer", local_files_only=True, progress=False)
    with pytest.raises(CheckpointNotFoundError, match=r"'./checkpoints/klein' is neither a local path nor a Hub "
                                                      r"repo id \(owner/name\): no such file or directory "
                                                      r".*checkpoints/klein"):
        resolve_source("./checkpoints/klein")
