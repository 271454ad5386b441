"""The shared loading rules: strict key tables, clear errors, no second copy."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weights import (CheckpointError, checkpoint_files, convert_bin, fingerprint, load_state, read_bin, read_checkpoint,
                     read_config, read_safetensors, remap, write_safetensors)

TABLE = [("enc.layers.{i}.fc.weight", "blocks.{i}.weight"),
         ("enc.layers.{i}.fc.bias", "blocks.{i}.bias")]


def meta_model():
    with torch.device("meta"):
        m = nn.Module()
        m.blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(2))
    return m


def foreign():
    return {f"enc.layers.{i}.fc.{n}": torch.randn(3, 3) if n == "weight" else torch.randn(3)
            for i in range(2) for n in ("weight", "bias")}


def load(tensors, ignore=()):
    state, unexpected = remap(tensors, TABLE, ignore)
    return load_state(meta_model(), state, "ckpt", unexpected, TABLE)


def test_roundtrip_adopts_tensors_without_copy():
    t = foreign()
    m = load(t)
    assert m.blocks[1].weight.data_ptr() == t["enc.layers.1.fc.weight"].data_ptr()
    assert torch.equal(m.blocks[0].bias, t["enc.layers.0.fc.bias"])


def test_missing_key_named():
    t = foreign()
    del t["enc.layers.1.fc.bias"]
    with pytest.raises(CheckpointError, match=r"ckpt: missing enc\.layers\.1\.fc\.bias$"):
        load(t)


def test_unexpected_key_named_and_ignore_patterns():
    t = foreign()
    t["head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected head\.weight"):
        load(t)
    load(t, ignore=[r"head\."])  # a known-unused key is skipped
    # a key the table maps, for a block the model lacks (a deeper checkpoint): named as the file names it
    t["enc.layers.2.fc.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected enc\.layers\.2\.fc\.bias"):
        load(t, ignore=[r"head\."])


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_git_lfs_pointer_is_named_as_one(tmp_path, fmt):
    # a clone made without git-lfs holds 130-byte pointers where the shards should be
    (tmp_path / f"model.{fmt}").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                           + "0" * 64 + "\nsize 9976576152\n")
    with pytest.raises(CheckpointError, match=rf"model\.{fmt}: a git-lfs pointer, not the weights themselves: "
                                              r"fetch them \(git lfs pull in the clone\) or download the file again$"):
        read_checkpoint(str(tmp_path / f"model.{fmt}"))


def test_shape_mismatch_names_key_and_both_shapes():
    t = foreign()
    t["enc.layers.0.fc.weight"] = torch.randn(4, 3)
    with pytest.raises(CheckpointError, match=r"enc\.layers\.0\.fc\.weight: model expects \(3, 3\), checkpoint has \(4, 3\)"):
        load(t)


def test_dtype_is_the_callers(tmp_path):
    save_file(foreign(), tmp_path / "m.safetensors")
    t = read_safetensors(str(tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert load(t).blocks[0].weight.dtype == torch.bfloat16


def test_sharded_directory_and_missing_shard(tmp_path):
    t = foreign()
    keys = sorted(t)
    save_file({k: t[k] for k in keys[:2]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in keys[2:]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = read_safetensors(str(tmp_path))
    assert sorted(got) == keys and all(torch.equal(got[k], t[k]) for k in keys)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard listed in .* is missing"):
        read_safetensors(str(tmp_path))


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(foreign(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: not a readable safetensors file"):
        read_safetensors(str(path))
    # a .bin cut short: torch's first sentence, not its paragraph cut off mid-sentence ("... your checkpoint file is)")
    torch.save(foreign(), tmp_path / "m.bin")
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(tmp_path / "m.bin"))
    assert str(e.value) == f"{tmp_path / 'm.bin'}: not a readable PyTorch weights file (PytorchStreamReader failed " \
                           f"reading zip archive: failed finding central directory); damaged or cut short? download " \
                           f"it again"
    with pytest.raises(CheckpointError, match=r"nowhere: no such file or directory"):
        read_safetensors(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"empty: no model\.safetensors"):
        read_safetensors(str(tmp_path / "empty"))


@pytest.mark.parametrize("kind", ["directory", "broken link"])
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "pytorch_model-00001-of-00002.bin",
                                  "config.json"])
def test_a_weight_file_that_is_no_file_is_named(tmp_path, name, kind):
    """A folder left where a file should be (a download unpacked wrong), or a link to nothing (the HF cache's
    files are links, an interrupted download leaves blobs out): named as one, not in the OS's words about the
    reading that fails ("No such device") or as a checkpoint that is not there."""
    os.makedirs(tmp_path / "m")
    if kind == "directory":
        os.makedirs(tmp_path / "m" / name)
    else:
        os.symlink(tmp_path / "blob", tmp_path / "m" / name)
    with pytest.raises(CheckpointError) as e:
        if name == "config.json":
            read_config(str(tmp_path / "m" / name))
        else:
            read_checkpoint(str(tmp_path / "m"))
    why = "Is a directory" if kind == "directory" else "No such file or directory"
    assert str(e.value) == (f"{tmp_path / 'm' / name}: cannot be read ({why})" if name == "config.json" else
                            f"{tmp_path / 'm' / name}: a {kind}, where a weight file belongs; download the checkpoint "
                            f"again")


def test_write_safetensors_streams_what_save_file_writes(tmp_path):
    # every dtype a checkpoint holds, a scalar, an empty tensor, a transposed (non-contiguous) view
    state = {"w": torch.randn(3, 5), "t": torch.randn(5, 3).t(), "half": torch.randn(4).half(),
             "bf16": torch.randn(2, 2).bfloat16(), "step": torch.tensor(7.0), "empty": torch.zeros(0, 4),
             "ids": torch.arange(6), "q": torch.randint(-128, 127, (3, 2), dtype=torch.int8),
             "mask": torch.tensor([True, False])}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ref.safetensors")
    header = {k: torch.empty_like(v, device="meta") for k, v in state.items()}  # shapes only
    write_safetensors(tmp_path / "ours.safetensors", header, iter(state.values()))
    ours, ref = read_safetensors(str(tmp_path / "ours.safetensors")), read_safetensors(str(tmp_path / "ref.safetensors"))
    assert ours.keys() == ref.keys() == state.keys()
    for k in state:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k


@pytest.mark.parametrize("index, message", [
    ({"weight_map": ["x"]}, r"not a valid shard index"),
    ({"a": 3}, r"not a valid shard index"),
    ([], r"not a valid shard index"),
    ({"weight_map": {}}, r"its weight_map lists no shard"),
    ({"weight_map": {"a": "/etc/passwd"}}, r"names the shard '/etc/passwd'; shards are files in the index's own"),
    ({"weight_map": {"a": "../model.safetensors"}}, r"names the shard '\.\./model\.safetensors'"),
    ({"weight_map": {"a": 3}}, r"names the shard 3"),
])
def test_a_bad_shard_index_is_refused_not_followed(tmp_path, index, message):
    save_file(foreign(), tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: " + message):
        read_checkpoint(str(tmp_path))


def test_indexed_bin_shards_win_over_a_stray_safetensors_file(tmp_path):
    t = foreign()
    torch.save(t, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(t, "pytorch_model-00001-of-00001.bin")}))
    save_file({"foo": torch.ones(1)}, tmp_path / "adapter.safetensors")  # not the model's
    assert checkpoint_files(str(tmp_path)) == [str(tmp_path / "pytorch_model-00001-of-00001.bin")]
    got = read_checkpoint(str(tmp_path))
    assert sorted(got) == sorted(t) and all(torch.equal(got[k], t[k]) for k in t)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_bin_files_that_are_empty_or_hold_more_than_named_dense_tensors(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"")  # torch.load raises an error with no message
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch weights file \(EOFError\)"):
        read_bin(str(path))
    with pytest.raises(CheckpointError, match=r"nowhere\.bin: no such file$"):  # was "damaged or cut short?"
        read_bin(str(tmp_path / "nowhere.bin"))
    torch.save({"w": torch.ones(2), 7: torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused, .* holds 7: Tensor"):
        read_bin(str(path))
    torch.save({"w": torch.eye(3).to_sparse()}, path)
    with pytest.raises(CheckpointError, match=r"holds 'w': Tensor \(torch\.sparse_coo\)"):
        read_bin(str(path))


def test_dtype_must_be_a_floating_torch_dtype(tmp_path):
    save_file(foreign(), tmp_path / "m.safetensors")
    for bad in ("bfloat16", torch.int8):
        with pytest.raises(ValueError, match=r"dtype is .*expected None \(as stored\) or a floating torch\.dtype"):
            read_checkpoint(str(tmp_path / "m.safetensors"), dtype=bad)


def write_shards(path, parts, fmt):
    """Each {key: tensor} of `parts` as shard N of len(parts), HF's names, no index."""
    names = []
    for i, part in enumerate(parts, 1):
        stem = "pytorch_model" if fmt == "bin" else "model"
        names.append(f"{stem}-{i:05d}-of-{len(parts):05d}.{fmt}")
        (torch.save if fmt == "bin" else save_file)(part, path / names[-1])
    return names


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_a_key_held_by_two_files_is_refused_naming_both(tmp_path, fmt):
    t = foreign()
    write_shards(tmp_path, [t, {"enc.layers.1.fc.bias": torch.zeros(3)}], fmt)  # a stale second copy
    with pytest.raises(CheckpointError, match=rf"^enc\.layers\.1\.fc\.bias: held by both \S*-00001-of-00002\.{fmt} "
                                              rf"and \S*-00002-of-00002\.{fmt}; .* download the checkpoint again$"):
        read_checkpoint(str(tmp_path))
    # a key the caller skips is a key all the same: which copy is the model's is still unknown
    with pytest.raises(CheckpointError, match=r"^enc\.layers\.1\.fc\.bias: held by both"):
        read_checkpoint(str(tmp_path), keep=lambda k: k != "enc.layers.1.fc.bias")
    if fmt == "bin":  # conversion refuses them too (it wrote a directory that would not load), with an index
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
            k: f"pytorch_model-0000{1 + (k == 'enc.layers.1.fc.bias')}-of-00002.bin" for k in t}}))
        out = tmp_path.parent / f"{tmp_path.name}-converted"
        with pytest.raises(CheckpointError, match=r"^enc\.layers\.1\.fc\.bias: held by both"):
            convert_bin(str(tmp_path), str(out))
        assert not out.exists()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_every_key_an_index_lists_comes_from_the_shard_it_names(tmp_path, fmt):
    t = foreign()
    keys = sorted(t)
    names = write_shards(tmp_path, [{k: t[k] for k in keys[:2]}, {k: t[k] for k in keys[2:]}], fmt)
    index = tmp_path / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")
    weight_map = {k: names[i >= 2] for i, k in enumerate(keys)}
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert sorted(read_checkpoint(str(tmp_path))) == keys
    # a key the index lists that no shard holds (a shard from another download, a shallower model)
    index.write_text(json.dumps({"weight_map": weight_map | {"enc.layers.2.fc.bias": names[1]}}))
    with pytest.raises(CheckpointError, match=rf"^\S*{index.name}: lists enc\.layers\.2\.fc\.bias in {names[1]}, "
                                              r"but no shard holds it; .*download them again$"):
        read_checkpoint(str(tmp_path))
    # a key held by another shard than the index names
    index.write_text(json.dumps({"weight_map": weight_map | {keys[0]: names[1]}}))
    with pytest.raises(CheckpointError, match=rf"lists {keys[0]} in {names[1]}, but \S*{names[0]} holds it"):
        read_checkpoint(str(tmp_path))
    if fmt == "bin":  # weights.py convert refuses them as loading does (it used to write a fresh index)
        with pytest.raises(CheckpointError, match=rf"lists {keys[0]} in {names[1]}, but \S*{names[0]} holds it"):
            convert_bin(str(tmp_path), str(tmp_path.parent / f"{tmp_path.name}-converted"))
        assert not os.path.exists(tmp_path.parent / f"{tmp_path.name}-converted")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_shards_found_without_an_index_must_all_be_there(tmp_path, fmt):
    t = foreign()
    keys = sorted(t)
    names = write_shards(tmp_path, [{k: t[k]} for k in keys], fmt)  # four shards, -of-00004
    assert sorted(read_checkpoint(str(tmp_path))) == keys
    for name in names[1:3]:
        os.remove(tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: missing the shard {names[1]}, {names[2]}, which "
                                              r"the other shards' names count; download the checkpoint again$"):
        read_checkpoint(str(tmp_path))


def test_a_bin_file_of_meta_tensors_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "v": torch.empty(3, 3, device="meta")}, path)
    with pytest.raises(CheckpointError, match=r"^\S*pytorch_model\.bin: 'v' is a meta tensor, it holds no data; "
                                              r"save the file again"):
        read_bin(str(path))


def test_floating_weights_in_two_dtypes_load_in_the_widest_when_asked(tmp_path):
    t = foreign()
    t["enc.layers.1.fc.weight"] = t["enc.layers.1.fc.weight"].double()
    state, unexpected = remap(t, TABLE)
    model = load_state(meta_model(), dict(state), "ckpt", unexpected, TABLE, one_dtype=True)
    assert {p.dtype for p in model.parameters()} == {torch.float64}  # lossless: float32 fits in float64
    assert torch.equal(model.blocks[1].weight, t["enc.layers.1.fc.weight"])
    assert torch.equal(model.blocks[0].weight.float(), t["enc.layers.0.fc.weight"])
    load_state(meta_model(), state, "ckpt", unexpected, TABLE)  # a caller that mixes them on purpose (LoRA)


def test_fingerprint_follows_contents_not_place(tmp_path):
    # 48 MB in three 16 MB tensors: a fine-tune of any one of them shows, a moved copy does not
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(2048, 2048, generator=g) for k in ("a", "b", "c")}
    for d in ("one", "two", "tuned", "config"):
        os.makedirs(tmp_path / d)
        save_file(state | ({"b": state["b"] + 1e-3} if d == "tuned" else {}), tmp_path / d / "model.safetensors")
    (tmp_path / "config" / "config.json").write_text('{"rope_theta": 1e6}')
    one, two, tuned, config = (fingerprint(tmp_path / d) for d in ("one", "two", "tuned", "config"))
    assert one == two and tuned != one and config != one


def test_meta_reading_knows_every_dtype_safetensors_writes(tmp_path):
    # the header alone (device="meta"): each of safetensors' dtypes that torch has (complex64, the fnuz float8s
    # were called "a dtype torch does not have")
    dtypes = [torch.float64, torch.bfloat16, torch.int16, torch.uint16, torch.uint64, torch.bool, torch.complex64,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
    tensors = {str(dtype): torch.zeros(2, 3, dtype=dtype) for dtype in dtypes}
    save_file(tensors, tmp_path / "all.safetensors")
    meta = read_checkpoint(str(tmp_path / "all.safetensors"), device="meta")
    assert {k: (t.dtype, t.shape, t.is_meta) for k, t in meta.items()} == {
        k: (t.dtype, t.shape, True) for k, t in tensors.items()}


def test_a_cast_leaves_integer_tensors_as_stored(tmp_path):
    # position ids, masks: a dtype is for the weights; ids in bfloat16 would round (257 -> 256)
    save_file(foreign() | {"ids": torch.arange(300)}, tmp_path / "m.safetensors")
    t = read_checkpoint(str(tmp_path / "m.safetensors"), dtype=torch.bfloat16)
    assert t["ids"].dtype == torch.int64 and torch.equal(t["ids"], torch.arange(300))
    assert t["enc.layers.0.fc.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_the_last_shard_missing_is_named(tmp_path, fmt):
    names = write_shards(tmp_path, [{k: v} for k, v in foreign().items()], fmt)
    os.remove(tmp_path / names[-1])  # N of N: what is left still counts from 1
    with pytest.raises(CheckpointError, match=rf"missing the shard {names[-1]}, which"):
        read_checkpoint(str(tmp_path))


def test_model_safetensors_wins_over_bin_shards_beside_it(tmp_path):
    # HF's order: a repository that ships both loads its safetensors
    torch.save(foreign(), tmp_path / "pytorch_model.bin")
    save_file(foreign(), tmp_path / "model.safetensors")
    assert checkpoint_files(str(tmp_path)) == [str(tmp_path / "model.safetensors")]


def test_layer_indices_of_more_than_one_digit(tmp_path):
    # a 7B has 32 layers: blocks.10 and on must map as blocks.0 does
    state, unexpected = remap({"enc.layers.31.fc.weight": torch.ones(1)}, TABLE)
    assert list(state) == ["blocks.31.weight"] and unexpected == []


def test_a_dtype_torch_lacks_is_named_when_reading_shapes(tmp_path):
    # safetensors knows float4 (F4); torch has no dtype for it
    head = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    head += b" " * (-len(head) % 8)
    (tmp_path / "m.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"\0")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: x is stored as F4, a dtype torch does not have$"):
        read_checkpoint(str(tmp_path / "m.safetensors"), device="meta")


def test_memory_check_refuses_a_byte_over_and_names_the_ways_that_help(monkeypatch):
    import weights
    sizes = {"w": (1000, 2, True), "ids": (10, 8, False)}  # bfloat16 weights: 2080 bytes as stored
    need = weights.weight_bytes(sizes, torch.bfloat16)
    assert need == 2080 and weights.weight_bytes(sizes, torch.float32) == 4080
    assert weights.weight_bytes(sizes, torch.bfloat16, lambda k: k == "w") == 1080
    monkeypatch.setattr(weights, "available_memory", lambda device: need)
    assert weights.check_memory("ckpt", sizes, torch.bfloat16, "cpu", lambda k: k == "w", None) == need
    monkeypatch.setattr(weights, "available_memory", lambda device: need - 1)
    # bfloat16 already: only int8 would help, --dtype bfloat16 is not offered
    with pytest.raises(CheckpointError, match=r"^ckpt: the weights need 0\.0 GB in bfloat16 but only 0\.0 GB of "
                                              r"memory is available on cpu; load them with --quantize int8 "
                                              r"\(0\.0 GB with bfloat16\)$"):
        weights.check_memory("ckpt", sizes, torch.bfloat16, "cpu", lambda k: k == "w", None)
    with pytest.raises(CheckpointError, match=r"float16 .* load them with --quantize int8 \(0\.0 GB with bfloat16\)$"):
        weights.check_memory("ckpt", sizes, torch.float16, "cpu", lambda k: k == "w", None)
