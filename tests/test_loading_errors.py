"""Loading bad checkpoints: every malformed index, config.json and variant layout gets one clear error naming the
file, the key or field and the value; never a raw TypeError, a Hub message for a local folder, or a stale file
silently winning. All at world size 1, in-process."""

import json
import math
import shutil

import pytest
import safetensors.torch
import torch

from tpfuse.tp_layers import Flux2Config

pytest.importorskip("diffusers")

from tpfuse.tp_layers import from_pretrained  # noqa: E402
from tpfuse.tp_layers.checkpoint import resolve_source  # noqa: E402
from tpfuse.tp_layers.model import load_config  # noqa: E402
from tpfuse.tp_layers.verify import random_diffusers_model  # noqa: E402

TINY = Flux2Config.preset("tiny")
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A single-file and a sharded (max_shard_size 40KB) diffusers checkpoint of the tiny model, and the model."""
    root = tmp_path_factory.mktemp("saved")
    dense = random_diffusers_model(TINY, seed=0)
    dense.save_pretrained(root / "single")
    dense.save_pretrained(root / "sharded", max_shard_size="40KB")
    return root, dense


def _copy(saved, kind, tmp_path):
    root, _ = saved
    return shutil.copytree(root / kind, tmp_path / kind)


def _assert_weights(model, dense):
    state = dense.state_dict()
    for name, p in model.state_dict().items():  # world size 1: the whole weights
        assert torch.equal(p, state[name]), name


# --------------------------------------------------------------------------------------------------------------
# The index (issue 21, items 11 and 12)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(weight_map=[]), r"'weight_map' is a list, not an object mapping tensor names to file names"),
    (lambda d: d.update(weight_map=None), r"'weight_map' is null, not an object"),
    (lambda d: d["weight_map"].update({"x_embedder.weight": 3}),
     r"'x_embedder.weight' -> 3: an int, not a file name"),
    (lambda d: d.update(weight_map={}), r"'weight_map' is empty: the index names no tensor"),
    (lambda d: d.pop("weight_map"), r"not a valid safetensors index: no 'weight_map' \(it has \['metadata'\]\)"),
    (lambda d: d["weight_map"].update({"x_embedder.weight": "../single/diffusion_pytorch_model.safetensors"}),
     r"'x_embedder.weight' -> '../single/diffusion_pytorch_model.safetensors': not a plain file name in the "
     r"index's folder"),
    (lambda d: d["weight_map"].update({"x_embedder.weight": ".."}), r"'x_embedder.weight' -> '..': not a plain"),
], ids=["list", "null", "non-string", "empty", "no-weight_map", "parent-path", "dot-dot"])
def test_a_malformed_index_is_named_with_what_is_wrong(saved, tmp_path, edit, message):
    """Before: AttributeError/TypeError from deep inside, "no .safetensors files at DIR" for an empty map (the
    folder holds 15), a bare "missing keys" for a file name outside the folder."""
    folder = _copy(saved, "sharded", tmp_path)
    _copy(saved, "single", tmp_path)  # "../single/..." names a real file: refused as outside the folder
    data = json.loads((folder / INDEX).read_text())
    edit(data)
    (folder / INDEX).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{folder / INDEX}: (invalid 'weight_map' entries \(1\):\n  )?{message}"):
        from_pretrained(folder, progress=False)


def test_an_index_that_is_not_an_object_is_named(saved, tmp_path):
    folder = _copy(saved, "sharded", tmp_path)
    (folder / INDEX).write_text(json.dumps([json.loads((folder / INDEX).read_text())]))
    with pytest.raises(ValueError, match=rf"{folder / INDEX}: not a valid safetensors index: a list, not an object"):
        from_pretrained(folder, progress=False)


def test_a_key_listed_twice_in_the_index_is_refused_naming_the_key_and_both_files(saved, tmp_path):
    """Before: JSON keeps the last entry, here a stale file: the load succeeded with wrong weights."""
    folder = _copy(saved, "sharded", tmp_path)
    _, dense = saved
    stale = {k: (v + 1.0).contiguous() for k, v in dense.state_dict().items() if k.startswith("x_embedder")}
    safetensors.torch.save_file(stale, folder / "stale.safetensors")
    data = json.loads((folder / INDEX).read_text())
    good = data["weight_map"]["x_embedder.weight"]
    text = json.dumps(data)
    text = text.replace('"weight_map": {', '"weight_map": {"x_embedder.weight": "stale.safetensors", ', 1)
    text = text.replace(f'"x_embedder.weight": "{good}"', '"x_embedder.weight": "stale.safetensors"')
    text = text.replace('"x_embedder.weight": "stale.safetensors", ', f'"x_embedder.weight": "{good}", ', 1)
    assert text.count('"x_embedder.weight"') == 2
    (folder / INDEX).write_text(text)
    with pytest.raises(ValueError, match=rf"{folder / INDEX}: safetensors index gives 'x_embedder.weight' twice "
                                         rf"\('{good}' and 'stale.safetensors'\)"):
        from_pretrained(folder, progress=False)


def test_an_index_naming_a_directory_or_a_key_its_file_lacks(saved, tmp_path):
    folder = _copy(saved, "sharded", tmp_path)
    data = json.loads((folder / INDEX).read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    moved = folder / first
    moved.rename(tmp_path / first)
    moved.mkdir()
    with pytest.raises(ValueError, match=rf"names shard file\(s\) \['{first}'\] that are directories in .*, not files"):
        from_pretrained(folder, progress=False)
    moved.rmdir()
    (tmp_path / first).rename(moved)
    # The index puts a key in a file that does not hold it (a stale index): named, not just "missing".
    data["weight_map"]["x_embedder.weight"] = next(n for n in sorted(set(data["weight_map"].values()))
                                                   if n != data["weight_map"]["x_embedder.weight"])
    (folder / INDEX).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{folder / INDEX}: 1 key\(s\) not in the file the index names: "
                                         rf"'x_embedder.weight' -> {data['weight_map']['x_embedder.weight']}"):
        from_pretrained(folder, progress=False)


# --------------------------------------------------------------------------------------------------------------
# config.json (item 13, and item 12's duplicate names)
# --------------------------------------------------------------------------------------------------------------


def _write_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    config = edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, message", [
    ("num_attention_heads", "4", "num_attention_heads='4' must be an int, not a string"),
    ("num_attention_heads", None, "num_attention_heads=None must be an int, not null"),
    ("num_attention_heads", -4, "num_attention_heads=-4 must be positive"),
    ("num_layers", 1.0, "num_layers=1.0 must be an int, not a float"),
    ("num_single_layers", -1, "num_single_layers=-1 must be >= 0"),
    ("guidance_embeds", "no", "guidance_embeds='no' must be true or false, not a string"),
    ("num_layers", True, "num_layers=True must be an int, not a bool"),
    ("mlp_ratio", math.nan, "mlp_ratio=nan must be positive and finite"),
    ("axes_dims_rope", [4, 4, 4], r"axes_dims_rope \(4, 4, 4\) sum to 12, not attention_head_dim=16"),
    ("axes_dims_rope", "4444", "axes_dims_rope='4444' must be a list of ints, not a string"),
    ("out_channels", 0, r"out_channels=0 must be positive or null"),
    ("in_channels", 8.5, "in_channels=8.5 must be an int, not a float"),
], ids=lambda v: None)
def test_a_bad_config_field_is_named_with_the_file_and_the_value(saved, tmp_path, field, value, message):
    """Before: raw torch TypeError/RuntimeError (or a model silently built otherwise: True layers, out_channels 0)."""
    folder = _copy(saved, "single", tmp_path)
    _write_config(folder, lambda c: {**c, field: value})
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: invalid FLUX.2 transformer config:\n.*"
                                         rf"{message}"):
        from_pretrained(folder, progress=False)


def test_every_bad_config_field_is_listed_in_one_error(saved, tmp_path):
    folder = _copy(saved, "single", tmp_path)
    _write_config(folder, lambda c: {**c, "num_attention_heads": "4", "num_layers": 1.5, "eps": -1.0})
    with pytest.raises(ValueError) as info:
        load_config(folder)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{folder / 'config.json'}: invalid FLUX.2 transformer config:"
    assert lines[1:] == ["  num_attention_heads='4' must be an int, not a string",
                         "  num_layers=1.5 must be an int, not a float", "  eps=-1.0 must be finite and >= 0"]


def test_a_config_that_is_a_list_gives_no_hub_message_for_a_local_folder(saved, tmp_path):
    """Before: diffusers' from_config takes a non-dict for a repo id: "We couldn't connect to
    'https://huggingface.co'"."""
    folder = _copy(saved, "single", tmp_path)
    _write_config(folder, lambda c: [c])
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: a FLUX.2 transformer config must be a JSON "
                                         r"object, not a list"):
        from_pretrained(folder, progress=False)


def test_an_empty_config_or_another_model_class_is_refused(saved, tmp_path):
    """Before: ``{}`` built diffusers' default (dev, 32B on meta) and failed with 302 missing keys; FLUX.1's class
    name was accepted."""
    folder = _copy(saved, "single", tmp_path)
    _write_config(folder, lambda c: {})
    with pytest.raises(ValueError, match=r"config.json: invalid FLUX.2 transformer config:\n  none of "
                                         r"Flux2Transformer2DModel's fields .* is set"):
        from_pretrained(folder, progress=False)
    (folder / "config.json").write_text(json.dumps({**json.loads((saved[0] / "single" / "config.json").read_text()),
                                                    "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ValueError, match=r"_class_name='FluxTransformer2DModel': the config of another model "
                                         r"\(tpfuse loads Flux2Transformer2DModel \(flux2\), .*QwenImage"):
        from_pretrained(folder, progress=False)


def test_a_config_field_given_twice_is_refused(saved, tmp_path):
    folder = _copy(saved, "single", tmp_path)
    text = (folder / "config.json").read_text().replace('"num_layers": 1', '"num_layers": 1, "num_layers": 2')
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: config gives 'num_layers' twice \(1 and 2\)"):
        load_config(folder)


def test_config_json_that_is_a_directory_is_named(saved, tmp_path):
    folder = _copy(saved, "single", tmp_path)
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: a directory, not a JSON config file"):
        load_config(folder)


def test_flux2config_from_dict_validates_and_names_the_source():
    with pytest.raises(ValueError, match=r"my.json: invalid FLUX.2 transformer config:\n  num_layers='2' must be an "
                                         r"int, not a string"):
        Flux2Config.from_dict({**TINY.to_diffusers_kwargs(), "num_layers": "2"}, source="my.json")
    with pytest.raises(ValueError, match="invalid Flux2Config: num_layers=1.5 must be an int, not a float"):
        Flux2Config(num_layers=1.5)
    assert Flux2Config.from_dict(TINY.to_diffusers_kwargs()) == TINY


# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """A folder with diffusers' non-variant file (seed 0) and an ``fp16`` variant (seed 1, fp16 weights)."""
    root = tmp_path_factory.mktemp("variants")
    plain, other = random_diffusers_model(TINY, seed=0), random_diffusers_model(TINY, seed=1)
    plain.save_pretrained(root / "both")
    other.to(torch.float16).save_pretrained(root / "both", variant="fp16")
    return root, plain, other.to(torch.float16)


def test_a_variant_beside_the_plain_checkpoint_is_left_out_or_selected(variants):
    """Before: "key ... is in two checkpoint files" for diffusers' own layout, and no ``variant`` argument."""
    root, plain, fp16 = variants
    folder = root / "both"
    model = from_pretrained(folder, progress=False)
    _assert_weights(model, plain)
    assert model.tp_load_report.ignored == [str(folder / "diffusion_pytorch_model.fp16.safetensors")]
    model = from_pretrained(folder, progress=False, variant="fp16")
    _assert_weights(model, fp16.float())
    assert model.tp_load_report.files == [str(folder / "diffusion_pytorch_model.fp16.safetensors")]
    assert model.tp_load_report.ignored == [str(folder / "diffusion_pytorch_model.safetensors")]


def test_bin_files_beside_a_safetensors_checkpoint_are_left_out_alike(variants, tmp_path):
    """``.bin`` files (diffusers' other format) beside the safetensors checkpoint are left out and reported, with or
    without a variant, with or without an index, as diffusers prefers safetensors. Before: an error without an
    index ("non-safetensors weight files") and silence with one. A folder of ``.bin`` files only is an error."""
    import shutil

    root, plain, fp16 = variants
    folder = tmp_path / "mixed"
    shutil.copytree(root / "both", folder)
    plain.save_pretrained(folder, safe_serialization=False)
    fp16.save_pretrained(folder, safe_serialization=False, variant="fp16")
    bins = [str(folder / "diffusion_pytorch_model.bin"), str(folder / "diffusion_pytorch_model.fp16.bin")]
    model = from_pretrained(folder, progress=False)
    _assert_weights(model, plain)
    assert sorted(model.tp_load_report.ignored) == sorted(bins + [str(folder / "diffusion_pytorch_model.fp16"
                                                                      ".safetensors")])
    model = from_pretrained(folder, progress=False, variant="fp16")
    _assert_weights(model, fp16.float())
    assert str(folder / "diffusion_pytorch_model.fp16.bin") in model.tp_load_report.ignored
    sharded = tmp_path / "sharded"
    plain.save_pretrained(sharded, safe_serialization=False)  # first: diffusers' .bin save deletes other shards
    plain.save_pretrained(sharded, max_shard_size="40KB")
    model = from_pretrained(sharded, progress=False)
    _assert_weights(model, plain)
    assert str(sharded / "diffusion_pytorch_model.bin") in model.tp_load_report.ignored
    only = tmp_path / "only_bin"
    plain.save_pretrained(only, safe_serialization=False)
    with pytest.raises(ValueError, match=r"non-safetensors weight files \(only safetensors are read\): \[.*"
                                         r"diffusion_pytorch_model\.bin'\]\n  no \.safetensors files at"):
        from_pretrained(only, progress=False)


def test_a_sharded_variant_is_read_through_its_index(variants, tmp_path):
    """diffusers' sharded variant: ``*.fp16-0000N-of-0000M.safetensors`` and ``*.safetensors.index.fp16.json``; the
    index decides (a stale fp16 shard it leaves out is ignored), also in the older ``*-0000N-of-0000M.fp16`` /
    ``*.safetensors.fp16.index.json`` layout that diffusers still reads."""
    root, plain, fp16 = variants
    folder = tmp_path / "sharded"
    plain.save_pretrained(folder)
    fp16.save_pretrained(folder, variant="fp16", max_shard_size="40KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert index.exists()
    stale = {k: (v + 1).contiguous() for k, v in fp16.state_dict().items()}
    safetensors.torch.save_file(stale, folder / "diffusion_pytorch_model.fp16-00099-of-00099.safetensors")
    model = from_pretrained(folder, progress=False, variant="fp16")
    _assert_weights(model, fp16.float())
    assert str(folder / "diffusion_pytorch_model.fp16-00099-of-00099.safetensors") in model.tp_load_report.ignored
    _assert_weights(from_pretrained(folder, progress=False), plain)

    data = json.loads(index.read_text())
    legacy = {}
    for name in sorted(set(data["weight_map"].values())):  # diffusion_pytorch_model.fp16-00001-of-00015.safetensors
        new = name.replace(".fp16-", "-").replace(".safetensors", ".fp16.safetensors")
        (folder / name).rename(folder / new)
        legacy[name] = new
    data["weight_map"] = {k: legacy[v] for k, v in data["weight_map"].items()}
    index.unlink()
    (folder / "diffusion_pytorch_model.safetensors.fp16.index.json").write_text(json.dumps(data))
    _assert_weights(from_pretrained(folder, progress=False, variant="fp16"), fp16.float())


def test_an_absent_variant_names_the_folder_and_the_variants_there(variants):
    root, _, _ = variants
    with pytest.raises(ValueError, match=rf"{root / 'both'} has no files of variant 'bf16' .*; variants there: "
                                         r"\['fp16'\]; safetensors files there: \['diffusion_pytorch_model.fp16"
                                         r".safetensors', 'diffusion_pytorch_model.safetensors'\]"):
        from_pretrained(root / "both", progress=False, variant="bf16")
    with pytest.raises(ValueError, match=r"variant='fp16' selects a variant's files in a folder, but .*"
                                         r"diffusion_pytorch_model.safetensors is a single file"):
        from_pretrained(root / "both" / "diffusion_pytorch_model.safetensors", progress=False, variant="fp16")
    with pytest.raises(TypeError, match=r"variant must be a str such as 'fp16' or None, not int 16"):
        from_pretrained(root / "both", progress=False, variant=16)
    with pytest.raises(ValueError, match=r"variant='../fp16' is not a variant name"):
        from_pretrained(root / "both", progress=False, variant="../fp16")


def test_two_variants_without_the_plain_checkpoint_suggest_a_variant(variants, tmp_path):
    root, plain, fp16 = variants
    folder = tmp_path / "two"
    fp16.save_pretrained(folder, variant="fp16")
    plain.save_pretrained(folder, variant="ema")
    with pytest.raises(ValueError, match=r"is in two checkpoint files, .*diffusion_pytorch_model.ema.safetensors and "
                                         r".*diffusion_pytorch_model.fp16.safetensors: .* pass variant=\.\.\."):
        from_pretrained(folder, progress=False)
    _assert_weights(from_pretrained(folder, progress=False, variant="ema"), plain)


def test_a_hub_download_with_a_variant_fetches_only_that_variant(variants, tmp_path, monkeypatch):
    import huggingface_hub

    root, _, _ = variants
    asked = []

    def fake(repo_id, **kwargs):
        asked.append(kwargs)
        return str(root / "both" if "transformer/*/*" not in kwargs["ignore_patterns"] else tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.chdir(tmp_path)
    config, path = load_config("org/klein", variant="fp16")
    assert path == root / "both" and config["num_attention_heads"] == TINY.heads
    assert "*.safetensors" not in asked[0]["allow_patterns"] and "*.fp16.safetensors" in asked[0]["allow_patterns"]
    # Only the checkpoint's own folder: a pipeline repo's other components are never fetched (the Hub's own filter).
    from huggingface_hub.utils import filter_repo_objects

    repo = ["config.json", "diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "transformer/old/x.json"]
    (tmp_path / "transformer").mkdir()
    for subfolder, wanted in ((None, ["config.json", "diffusion_pytorch_model.safetensors"]),
                              ("transformer", ["transformer/config.json",
                                               "transformer/diffusion_pytorch_model.safetensors"])):
        asked.clear()
        resolve_source("org/klein", subfolder=subfolder)
        kw = asked[0]
        assert list(filter_repo_objects(repo, allow_patterns=kw["allow_patterns"],
                                        ignore_patterns=kw["ignore_patterns"])) == wanted, subfolder


# --------------------------------------------------------------------------------------------------------------
# Sources, subfolders, dtype, single files
# --------------------------------------------------------------------------------------------------------------


def test_a_subfolder_that_is_a_file_or_on_a_file_source_is_named(saved, tmp_path):
    folder = _copy(saved, "single", tmp_path)
    (tmp_path / "transformer").write_text("not a folder")
    with pytest.raises(FileNotFoundError, match=r"has no subfolder 'transformer' \(folders there: \['single'\]; "
                                                r"'transformer' there is a file, not a folder\)"):
        load_config(tmp_path, subfolder="transformer")
    # Before: the subfolder was silently dropped and the file read.
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors' is a file, so "
                                         r"subfolder='transformer' cannot apply"):
        from_pretrained(folder / "diffusion_pytorch_model.safetensors", subfolder="transformer", progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.int32, torch.bfloat16.itemsize], ids=str)
def test_from_pretrained_names_a_dtype_that_is_not_a_float_dtype(saved, dtype):
    """Before: "Invalid device string: 'bfloat16'" (a str went to Module.to as a device)."""
    root, _ = saved
    with pytest.raises(TypeError, match=rf"dtype must be a floating-point torch.dtype \(e.g. torch.bfloat16\) or "
                                        rf"None, not {dtype!r}"):
        from_pretrained(root / "single", dtype=dtype, progress=False)


def test_a_single_safetensors_file_of_another_suffix_loads(saved, tmp_path):
    """BFL's ``.sft`` files are safetensors: named explicitly, a file is read as one. Before: "no
    x_embedder.weight" (the file was taken for a non-safetensors weight file and not read)."""
    root, dense = saved
    shutil.copy(root / "single" / "diffusion_pytorch_model.safetensors", tmp_path / "flux.sft")
    _assert_weights(from_pretrained(tmp_path / "flux.sft", progress=False), dense)


def test_config_inference_names_the_file_for_shapes_it_cannot_use(tmp_path):
    """A single file whose shapes give no valid config (head dim 12: RoPE axes of 3; a 1-D x_embedder): the file
    and the reason, not a bare "sum to" / "not enough values to unpack"."""
    state = {k: v.contiguous() for k, v in random_diffusers_model(TINY, seed=0).state_dict().items()}
    hidden = TINY.hidden_size
    odd = dict(state)
    odd["transformer_blocks.0.attn.norm_q.weight"] = torch.ones(12)
    odd["x_embedder.weight"] = torch.zeros(60, TINY.in_channels)  # 5 heads of 12
    safetensors.torch.save_file(odd, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"cannot infer a FLUX.2 config from .*odd.safetensors \(RoPE axes split "
                                         r"evenly in 4\): invalid Flux2Config: .*every RoPE axis must be even"):
        from_pretrained(tmp_path / "odd.safetensors", progress=False)
    flat = dict(state, **{"x_embedder.weight": torch.zeros(hidden)})
    safetensors.torch.save_file(flat, tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match=rf"cannot infer a FLUX.2 config from .*flat.safetensors: x_embedder.weight "
                                         rf"has shape \({hidden},\), not 2-D"):
        from_pretrained(tmp_path / "flat.safetensors", progress=False)
    uneven = dict(state, **{"x_embedder.weight": torch.zeros(hidden + 4, TINY.in_channels)})
    safetensors.torch.save_file(uneven, tmp_path / "uneven.safetensors")
    with pytest.raises(ValueError, match=rf"uneven.safetensors: x_embedder.weight's {hidden + 4} rows .* are not a "
                                         rf"whole number of heads of transformer_blocks.0.attn.norm_q's 16"):
        from_pretrained(tmp_path / "uneven.safetensors", progress=False)


def test_a_config_asking_for_more_blocks_than_the_checkpoint_holds_is_refused_before_building(saved, tmp_path):
    """Before: the model was built first (~10 ms a block even on meta: ``num_single_layers: 1000000000`` hung),
    then the load listed every block's keys as missing."""
    folder = _copy(saved, "sharded", tmp_path)
    _write_config(folder, lambda c: {**c, "num_layers": 2})
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'} does not match the checkpoint in {folder}: "
                                         r"num_layers=2 but the checkpoint holds 1 double-stream block\(s\)$"):
        from_pretrained(folder, progress=False)
    _write_config(folder, lambda c: {**c, "num_layers": 1, "num_single_layers": 10**9})
    with pytest.raises(ValueError, match=r"num_single_layers=1000000000 but the checkpoint holds 1 single-stream"):
        from_pretrained(folder, progress=False)


def test_config_inference_keeps_an_mlp_width_that_float_division_rounds_down(tmp_path):
    """hidden 56, MLP 61: 61 / 56 * 56 is 60.99...; the inferred ``mlp_ratio`` must give diffusers' ``int(hidden *
    mlp_ratio)`` = 61 again. Before: a model one column narrower, and a shape-mismatch error for a valid file."""
    cfg = Flux2Config(num_attention_heads=7, attention_head_dim=8, axes_dims_rope=(2, 2, 2, 2), num_layers=1,
                      num_single_layers=1, mlp_ratio=math.nextafter(61 / 56, math.inf), in_channels=8,
                      joint_attention_dim=16, timestep_guidance_channels=16, guidance_embeds=False)
    assert cfg.mlp_hidden == 61 and int(56 * (61 / 56)) == 60
    dense = random_diffusers_model(cfg, seed=0)
    safetensors.torch.save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "m.safetensors")
    _assert_weights(from_pretrained(tmp_path / "m.safetensors", progress=False), dense)


def test_a_source_or_subfolder_of_the_wrong_type_is_named(saved):
    """Before: os.fspath's "expected str, bytes or os.PathLike object, not NoneType" and Path's "unsupported operand
    type(s) for /", naming neither argument."""
    root, _ = saved
    with pytest.raises(TypeError, match=r"checkpoint source must be a path or a Hub repo id .*, not NoneType None"):
        from_pretrained(None, progress=False)
    with pytest.raises(TypeError, match=r"subfolder must be a str \(e.g. 'transformer'\) or None, not int 0"):
        load_config(root, subfolder=0)


def test_a_folder_whose_name_looks_like_a_glob_pattern_loads(saved, tmp_path):
    """Before: the folder was listed with glob.glob(f"{folder}/*"), so "ckpt[1]" matched nothing: "no .safetensors
    files at .../ckpt[1]"."""
    root, dense = saved
    for kind in ("single", "sharded"):
        folder = shutil.copytree(root / kind, tmp_path / f"{kind}[1]")
        _assert_weights(from_pretrained(folder, progress=False), dense)
