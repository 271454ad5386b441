"""LLaVA-1.5's LoRA releases (release.load_lora_release; generate.py --model-base --vit) on a tiny random
release written as LLaVA ships one: a peft LoRA of a Vicuna-like base (adapter_config.json with
adapter_model.safetensors, or the .bin the release holds), non_lora_trainables.bin with the
projector, LLaVA's config.json; the CLIP tower in its own HF directory. References: peft's own
merge_and_unload (the LLM), and release.load_release on the equivalent full LLaVA-1.5 directory (the
merged LLM, the tower and the projector under the release's names): equal weights, equal logits."""
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file

import generate
import lora
import mra
import release
import weights
from llama import Llama
from test_data import train_spm
from test_release import (IDS, LLM, PAD_MASK, PROJECTOR, Payload, images, llava_config, make_clip, make_heads, near,
                          randomise, release_state, write_release)
from weights import CheckpointError

VOCAB = 400  # the tokenizer's (train_spm): generate.py refuses an LLM with fewer embeddings than pieces
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the release's
# a LlavaLlamaForCausalLM's, "pad"; its tower named as LLaVA names CLIP-L/336, at the tiny tower's size
CONFIG = llava_config() | dict(vocab_size=VOCAB, mm_vision_tower="tiny/clip-vit-patch14-112")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "base_model.model.model.layers.0.self_attn.q_proj."  # a LoRA'd layer, under peft's names


def peft_release(path, llama, heads, fmt, rslora=False, seed=20):
    """A LoRA release of `llama` in `path` -> the peft model's merge_and_unload (the reference LLM).
    lora_A and lora_B random (B = 0, peft's init, would make the merge a no-op), r 4, alpha 8."""
    peft = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="none",
                                                            lora_dropout=0.05, use_rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    peft.save_pretrained(path)  # adapter_config.json, adapter_model.safetensors
    if fmt == "bin":  # as the release ships it (older peft): the same tensors, torch.save'd
        torch.save(load_file(path / "adapter_model.safetensors"), path / "adapter_model.bin")
        os.remove(path / "adapter_model.safetensors")
    # LLaVA saves the projector under the peft model's names: base_model.model.model.mm_projector.*
    torch.save({"base_model.model." + k: v for k, v in heads.items()}, path / "non_lora_trainables.bin")
    (path / "config.json").write_text(json.dumps(CONFIG))
    return peft.eval().merge_and_unload()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The base (saved HF-style with a tokenizer), the CLIP dir, the projector."""
    d = tmp_path_factory.mktemp("lora-release")
    llama = randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLM | dict(vocab_size=VOCAB), attn_implementation="eager")), 21)
    llama.save_pretrained(d / "vicuna", safe_serialization=False)  # pytorch_model.bin, as Vicuna v1.5 ships
    shutil.copy(train_spm(d / "tok"), d / "vicuna" / "tokenizer.model")
    (d / "vicuna" / "tokenizer_config.json").write_text('{"legacy": false}')  # Vicuna v1.5's
    clip = make_clip(seed=22)
    clip.save_pretrained(d / "clip", safe_serialization=True)
    heads = {k: v for k, v in make_heads(seed=23, adapters=False).items() if k.startswith(PROJECTOR)}
    return dict(dir=d, llama=llama, clip=clip, heads=heads, base=d / "vicuna", vit=d / "clip")


def lora_release_dir(parts, path, fmt="bin", rslora=False):
    """(the LoRA release dir, the full LLaVA-1.5 dir of the same model, peft's merged LLM)."""
    merged = peft_release(path / "llava-v1.5-lora", parts["llama"], parts["heads"], fmt, rslora)
    full = write_release(path / "llava-v1.5", release_state(merged, parts["heads"], v15_clip=parts["clip"]), CONFIG)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(parts["base"] / f, full / f)
    return path / "llava-v1.5-lora", full, merged


@pytest.fixture(scope="module")
def shipped(parts, tmp_path_factory):
    return lora_release_dir(parts, tmp_path_factory.mktemp("shipped"))


@pytest.mark.parametrize("fmt, rslora", [("bin", False), ("safetensors", False), ("safetensors", True)])
@torch.no_grad()
def test_matches_peft_and_the_full_release(parts, tmp_path, fmt, rslora):
    path, full_dir, merged = lora_release_dir(parts, tmp_path, fmt, rslora)
    ours = release.load_lora_release(path, parts["base"], parts["vit"]).eval()
    full = mra.load_checkpoint(full_dir).eval()
    assert ours.cfg == full.cfg and ours.cfg.arch == "llava-1.5" and ours.cfg.image_aspect_ratio == "pad"
    want = full.state_dict()
    assert ours.state_dict().keys() == want.keys()
    for k, v in ours.state_dict().items():  # W + scale B A computed as peft computes it: the same floats
        assert torch.equal(v, want[k]), k
    # the merge mattered: the base's q_proj is not the merged one
    base_q = parts["llama"].model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(ours.llm.layers[0].attn.wq.weight, base_q, atol=1e-3)
    ids = IDS.clamp(min=0)[:, :6]
    near(ours.llm(ids), merged(input_ids=ids).logits)  # the LLM against peft's merge_and_unload
    x = images(112)
    assert torch.equal(ours(IDS, x, pad_mask=PAD_MASK)[0], full(IDS, x, pad_mask=PAD_MASK)[0])


def ours_key(peft_key):
    """A peft / HF key of a LoRA'd layer ("...layers.1.mlp.up_proj.lora_A.default.weight", "...up_proj.weight")
    -> ours (llama.py, lora.py: "llm.layers.1.mlp.up.lora_a", "llm.layers.1.mlp.up.weight"), written out here."""
    names = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
             "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
             "mlp.down_proj": "mlp.down"}
    m = re.fullmatch(r".*\.layers\.(\d+)\.(\w+\.\w+)\.(?:lora_([AB])\.default\.)?weight", peft_key)
    return f"llm.layers.{m[1]}.{names[m[2]]}." + (f"lora_{m[3].lower()}" if m[3] else "weight")


@torch.no_grad()
def test_training_lora_layers_and_merge_match_peft(parts):
    """train.py --lora-r's own LoRA (lora.add_lora's LoRALinear, unmerged; lora.merge, what OUT/ckpt holds)
    against peft on the same random adapters: peft's forward with them unmerged, its merge_and_unload."""
    llama = parts["llama"]
    peft = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="none",
                                                            lora_dropout=0.0)).eval()
    g = torch.Generator().manual_seed(25)
    adapters = {}
    for name, p in peft.named_parameters():
        if ".lora_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            adapters[ours_key(name)] = p.clone()
    ours = torch.nn.Module()
    ours.llm = Llama.from_pretrained((llama.config.to_dict(), llama.state_dict())).eval()
    lora.add_lora(ours, 4, 8)
    state = ours.state_dict()
    assert set(adapters) == {k for k in state if ".lora_" in k} and len(adapters) == 2 * 7 * 2  # A, B; 7 layers; 2 blocks
    ours.load_state_dict(state | adapters)
    ids = IDS.clamp(min=0)[:, :6]
    near(ours.llm(ids), peft(input_ids=ids).logits)  # unmerged, as train.py runs it
    merged = lora.merge(ours.state_dict(), 8 / 4)
    want = {ours_key(k): v for k, v in peft.merge_and_unload().state_dict().items() if k.endswith("_proj.weight")}
    assert len(want) == 7 * 2
    for k, v in want.items():  # W + scale B A in fp32, as peft computes it: the same floats
        assert torch.equal(merged[k], v), k


@torch.no_grad()
def test_merged_in_fp32_then_cast_or_quantized_as_a_merged_release_loads(parts, shipped):
    path, full_dir, _ = shipped
    for kw in (dict(dtype=torch.bfloat16), dict(quantize="int8"), dict(dtype=torch.bfloat16, quantize="int8")):
        ours = release.load_lora_release(path, parts["base"], parts["vit"], **kw).state_dict()
        want = mra.load_checkpoint(full_dir, **kw).state_dict()  # the fp32 merged weights, cast as read
        assert ours.keys() == want.keys()
        assert all(torch.equal(v, want[k]) and v.dtype == want[k].dtype for k, v in ours.items()), kw


@torch.no_grad()
def test_llm_weights_in_non_lora_trainables_replace_the_bases_before_the_merge(parts, shipped, tmp_path):
    """As LLaVA loads them (strict=False) into the base, before peft merges: a merged q = W' + 2 B A."""
    path = shutil.copytree(shipped[0], tmp_path / "llava-v1.5-lora")
    g = torch.Generator().manual_seed(24)
    norm, q = torch.randn(64, generator=g), torch.randn(64, 64, generator=g)
    trainables = torch.load(path / "non_lora_trainables.bin", weights_only=True)
    torch.save(trainables | {"base_model.model.model.norm.weight": norm, Q + "weight": q},
               path / "non_lora_trainables.bin")
    ours = release.load_lora_release(path, parts["base"], parts["vit"])
    lora_sd = torch.load(path / "adapter_model.bin", weights_only=True)
    assert torch.equal(ours.llm.norm.weight, norm)
    near(ours.llm.layers[0].attn.wq.weight, q + 8 / 4 * lora_sd[Q + "lora_B.weight"] @ lora_sd[Q + "lora_A.weight"])


def test_without_model_base_says_what_to_pass(parts, shipped, tmp_path):
    path = shipped[0]
    safetensors_release = lora_release_dir(parts, tmp_path, "safetensors")[0]
    for p in (path, safetensors_release):  # before: "not a checkpoint directory", "no vision tower"
        with pytest.raises(CheckpointError, match=rf"^{p}: a LoRA release .* --model-base VICUNA_DIR --vit CLIP_DIR$"):
            mra.load_checkpoint(p)


def edit_config(**kw):
    def edit(path):
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps(cfg | kw))
    return edit


def edit_adapters(change):
    def edit(path):
        sd = torch.load(path / "adapter_model.bin", weights_only=True)
        torch.save(change(sd), path / "adapter_model.bin")
    return edit


BAD = {  # name: (what is done to a copy of the release, the one line expected)
    "bias": (edit_config(bias="all"), r"adapter_config\.json: bias 'all' is not implemented; a plain LoRA is, merged as W \+ "),
    "fan_in_fan_out": (edit_config(fan_in_fan_out=True), r"adapter_config\.json: fan_in_fan_out True is not "),
    "dora": (edit_config(use_dora=True), r"adapter_config\.json: use_dora True is not implemented"),
    "target_modules": (edit_config(target_modules=TARGETS + ["lm_head"]),
                       r"adapter_config\.json: target_modules \['lm_head'\]: LoRA outside the LLM's linear layers"),
    "head_key": (edit_adapters(lambda sd: sd | {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
                 r"adapter_model\.bin: base_model\.model\.lm_head\.lora_A\.weight is not the lora_A or lora_B"),
    "no_base_weight": (edit_adapters(lambda sd: sd | {k.replace("layers.0.", "layers.7."): v for k, v in sd.items()
                                                      if k.startswith(Q)}),
                       r"adapter_model\.bin: a LoRA of model\.layers\.7\.self_attn\.q_proj\.weight, which "
                       r".*vicuna does not hold"),
    "shape": (edit_adapters(lambda sd: sd | {Q + "lora_B.weight": torch.zeros(32, 4)}),
              r"adapter_model\.bin: shape mismatch for model\.layers\.0\.self_attn\.q_proj\.weight: lora_B @ "
              r"lora_A is \(32, 64\), .*vicuna holds \(64, 64\)"),
    "rank": (edit_adapters(lambda sd: sd | {Q + "lora_A.weight": torch.zeros(3, 64)}), r"is not of rank 4, "),
    "no_non_lora": (lambda path: os.remove(path / "non_lora_trainables.bin"),
                    r"llava-v1\.5-lora: no non_lora_trainables\.bin \(the projector's weights"),
    "no_adapter": (lambda path: os.remove(path / "adapter_model.bin"),
                   r"llava-v1\.5-lora: no adapter_model\.safetensors or adapter_model\.bin \(the LoRA weights"),
}


@pytest.mark.parametrize("edit, message", list(BAD.values()), ids=list(BAD))
def test_bad_inputs_are_one_line(parts, shipped, tmp_path, edit, message):
    path = shutil.copytree(shipped[0], tmp_path / "llava-v1.5-lora")
    edit(path)
    with pytest.raises(CheckpointError, match=message) as e:
        release.load_lora_release(path, parts["base"], parts["vit"])
    assert "\n" not in str(e.value)


def test_a_bad_config_is_refused_before_the_base_is_read(parts, shipped, tmp_path):
    path = shutil.copytree(shipped[0], tmp_path / "llava-v1.5-lora")
    (path / "config.json").write_text(json.dumps(CONFIG | dict(mm_projector_type="linear")))
    empty = tmp_path / "no-base"  # a base with no weights: read first, it would be what the error names
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: mm_projector_type 'linear', mm_vision_select_layer -2"):
        release.load_lora_release(path, empty, parts["vit"])


def test_a_tower_other_than_the_one_config_json_names_is_refused(parts, shipped, tmp_path):
    # the 224 px CLIP-L for the 336 px one would give the projector 256 visual tokens instead of 576
    make_clip(seed=22, image_size=56).save_pretrained(tmp_path / "clip56", safe_serialization=True)
    with pytest.raises(CheckpointError, match=rf"^--vit {tmp_path / 'clip56'}: a 56 px tower of 14 px patches, but "
                                              rf".*config\.json names tiny/clip-vit-patch14-112 \(patch 14, 112 px\)"):
        release.load_lora_release(shipped[0], parts["base"], tmp_path / "clip56")


def test_a_tower_name_without_a_size_is_clips_224_px():
    # openai/clip-vit-large-patch14 is the 224 px CLIP-L: that tower passes, the 336 px one is refused
    def tower(size):
        return types.SimpleNamespace(config=types.SimpleNamespace(patch_size=14, image_size=size))
    release.check_tower(tower(224), "clip224", "openai/clip-vit-large-patch14", "lora")
    with pytest.raises(CheckpointError, match=r"^--vit clip336: a 336 px tower of 14 px patches, but lora/config\.json "
                                              r"names openai/clip-vit-large-patch14 \(patch 14, 224 px\)"):
        release.check_tower(tower(336), "clip336", "openai/clip-vit-large-patch14", "lora")
    release.check_tower(tower(336), "clip336", None, "lora")  # no name in config.json: nothing to check against


def test_a_tower_directory_that_is_no_clip_is_named_by_its_flag(parts, shipped, tmp_path, monkeypatch):
    # the base given for --vit too (the flags mixed up), or an empty directory: was "…/config.json: model_type
    # 'llama' is not a CLIP model" and "…: not a checkpoint directory", the flag unnamed
    (tmp_path / "empty").mkdir()
    for vit, why in ((parts["base"], r"config\.json: model_type 'llama' is not a CLIP model"),
                     (tmp_path / "empty", r"no model\.safetensors, .*not a checkpoint directory")):
        with pytest.raises(CheckpointError, match=rf"^--vit {vit}: .*{why} \(an HF CLIP directory, the release's "
                                                  rf"mm_vision_tower, is expected\)$"):
            release.load_lora_release(shipped[0], parts["base"], vit)
    # the base is refused as the tower before it is sized or read: at 7B it was sized as a second LLM (27 GB:
    # on a 24 GB machine a memory refusal that named the base, not --vit), else read whole (13 GB) to be refused
    monkeypatch.setattr(weights, "available_memory", lambda device: 1)  # no room for any weights at all
    with pytest.raises(CheckpointError, match=rf"^--vit {parts['base']}: .*config\.json: model_type 'llama' is not "
                                              rf"a CLIP model \(an HF CLIP directory"):
        release.load_lora_release(shipped[0], parts["base"], parts["base"])


@torch.no_grad()
def test_without_a_dtype_every_part_is_the_bases_own(parts, shipped, tmp_path):
    # as LLaVA loads them all in one dtype: an fp16 base and the fp32 CLIP weights make an fp16 model, not
    # an fp32 one (twice the memory check_memory counted)
    copy.deepcopy(parts["llama"]).half().save_pretrained(tmp_path / "vicuna16", safe_serialization=False)
    ours = release.load_lora_release(shipped[0], tmp_path / "vicuna16", parts["vit"])
    assert {t.dtype for t in ours.state_dict().values() if t.is_floating_point()} == {torch.float16}
    want = release.load_lora_release(shipped[0], parts["base"], parts["vit"], dtype=torch.float16)  # merged from fp16 W
    assert ours.encoder.vit.state_dict().keys() == want.encoder.vit.state_dict().keys()
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in ours.state_dict().items() if "llm." not in k)


def test_the_memory_check_counts_the_adapters_held_until_merged(parts, shipped, monkeypatch):
    counted, check = {}, release.check_memory
    monkeypatch.setattr(release, "check_memory", lambda source, sizes, *a: counted.update(sizes) or check(source, sizes, *a))
    release.load_lora_release(shipped[0], parts["base"], parts["vit"])
    held = torch.load(shipped[0] / "adapter_model.bin", weights_only=True)
    assert sum(n * size for k, (n, size, _) in counted.items() if k.startswith("lora:")) == \
        sum(t.nbytes for t in held.values())


def test_pickled_objects_are_refused_unrun(parts, shipped, tmp_path):
    path, marker = shutil.copytree(shipped[0], tmp_path / "llava-v1.5-lora"), tmp_path / "ran"
    heads = torch.load(path / "non_lora_trainables.bin", weights_only=True)
    torch.save(heads | {"extra": Payload(str(marker))}, path / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError, match=r"non_lora_trainables\.bin: refused, it holds a \S+ object"):
        release.load_lora_release(path, parts["base"], parts["vit"])
    assert not marker.exists()


def run_cli(capsys, *argv):
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_with_model_base_answers_as_the_full_release(parts, shipped, capsys):
    path, full_dir, _ = shipped
    image = parts["dir"] / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    ask = ("--image", image, "--prompt", "What is this?", "--max-new-tokens", 6)
    code, out, err = run_cli(capsys, "--model", path, "--model-base", parts["base"], "--vit", parts["vit"], *ask)
    assert code == 0 and f"loading {path} merged into {parts['base']}, the tower {parts['vit']} (" in err, err
    assert out.strip() and (0, out) == run_cli(capsys, "--model", full_dir, *ask)[:2]
    code, out, err = run_cli(capsys, "--model", path, *ask)  # the LoRA release alone: what to pass
    assert code == 1 and out == "" and err.startswith(f"error: {path}: a LoRA release") and "--model-base" in err
    for i, flag in enumerate(("--model-base", "--vit")):  # a wrong path: the flag named, before any loading
        given = [parts["base"], parts["vit"]]
        given[i] = parts["dir"] / "nowhere"
        code, out, err = run_cli(capsys, "--model", path, "--model-base", given[0], "--vit", given[1], *ask)
        assert code == 1 and err.startswith(f"error: {flag} {given[i]}: no such "), err
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "--model", path, "--model-base", parts["base"], *ask)
    assert e.value.code == 2 and "--model-base and --vit go together" in capsys.readouterr().err
    # a questions file: each answer records the three directories' weights (a LoRA release's .bin files,
    # no checkpoint of its own, failed that record before the model loaded)
    q, a = parts["dir"] / "q.jsonl", parts["dir"] / "lora_answers.jsonl"
    q.write_text('{"question_id": 1, "text": "What is this?"}\n')
    code, _, err = run_cli(capsys, "--model", path, "--model-base", parts["base"], "--vit", parts["vit"],
                           "--questions", q, "--answers", a, "--max-new-tokens", 6)
    answer = json.loads(a.read_text())
    assert code == 0 and len(answer["metadata"]["weights"].split()) == 3, err
    assert answer["text"] == run_cli(capsys, "--model", path, "--model-base", parts["base"], "--vit", parts["vit"],
                                     "--prompt", "What is this?", "--max-new-tokens", 6)[1].strip()


def test_cli_names_a_base_without_its_tokenizer_and_takes_the_tower_as_a_file(parts, shipped, capsys):
    """--model-base and --vit swapped: was "tokenizer model not found: CLIP/tokenizer.model", the flag unnamed;
    --vit CLIP/model.safetensors, which release.py merge-lora takes, and a file for --model-base: were "no such
    directory" (they exist)."""
    path, full_dir, _ = shipped
    image = parts["dir"] / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    ask = ("--image", image, "--prompt", "What is this?", "--max-new-tokens", 6)
    code, out, err = run_cli(capsys, "--model", path, "--model-base", parts["vit"], "--vit", parts["base"], *ask)
    assert (code, out) == (1, "") and err == f"error: --model-base {parts['vit']}: no tokenizer.model (the base " \
                                             f"LLM's, which the release is prompted with): give the HF Vicuna " \
                                             f"directory itself\n", err
    code, out, err = run_cli(capsys, "--model", path, "--model-base", parts["base"] / "config.json", "--vit",
                             parts["vit"], *ask)  # a file of the base: said so, not "no such directory"
    assert code == 1 and err.startswith(f"error: --model-base {parts['base'] / 'config.json'}: a file (the HF "), err
    code, out, err = run_cli(capsys, "--model", path, "--model-base", parts["base"], "--vit",
                             parts["vit"] / "model.safetensors", *ask)
    assert code == 0 and out.strip() and out == run_cli(capsys, "--model", full_dir, *ask)[1], err


def merge_cli(*argv):
    return subprocess.run([sys.executable, "release.py", "merge-lora", *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@torch.no_grad()
def test_merged_once_it_loads_alone_as_the_full_release_and_train_py_takes_it(parts, shipped, tmp_path):
    """python release.py merge-lora: the merged model, written as ours, loads with no --model-base / --vit
    as the full LLaVA-1.5 directory does (bit for bit in fp32), with the base's tokenizer; its default
    dtype is float16; train.py --init takes it, and names the command when given the LoRA release."""
    path, full_dir, _ = shipped
    given = ("--model-base", parts["base"], "--vit", parts["vit"])
    r = merge_cli(path, tmp_path / "fp32", *given, "--dtype", "float32")
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "fp32"), r.stderr
    assert r.stderr.splitlines()[0] == f"merging {path} into {parts['base']} (torch.float32; the tower from " \
                                       f"{parts['vit']})" and "; writing " in r.stderr, r.stderr
    ours, full = mra.load_checkpoint(tmp_path / "fp32").eval(), mra.load_checkpoint(full_dir).eval()
    assert ours.cfg == full.cfg and ours.state_dict().keys() == full.state_dict().keys()
    for k, v in full.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    for f in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "fp32" / f).read_bytes() == (parts["base"] / f).read_bytes()
    half = release.merge_lora_release(path, parts["base"], parts["vit"], tmp_path / "fp16")
    want = release.load_lora_release(path, parts["base"], parts["vit"], torch.float16).state_dict()
    for k, v in mra.load_checkpoint(half).state_dict().items():
        assert v.dtype == torch.float16 and torch.equal(v, want[k]), k
    # train.py: the LoRA release as --init names the merge; the merged model plans a run
    r = subprocess.run([sys.executable, "train.py", "--stage", "2", "--init", str(path), "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "release.py merge-lora" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "train.py", "--stage", "2", "--init", str(tmp_path / "fp32"), "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    # refused in one line, nothing left behind: an existing DST, a full release for LORA_DIR, a base
    # without its tokenizer, a missing base or tower (named by their flags, before anything loads), DST ''
    # (made the working directory's name beside it)
    no_tok = shutil.copytree(parts["base"], tmp_path / "no-tok")
    os.remove(no_tok / "tokenizer.model")
    before = sorted(os.listdir(tmp_path))
    for argv, message in (((path, tmp_path / "fp32", *given), "fp32: already exists; merge into a new directory"),
                          ((full_dir, tmp_path / "new", *given), "no adapter_config.json"),
                          ((path, tmp_path / "new", "--model-base", no_tok, "--vit", parts["vit"]),
                           "--model-base " + str(no_tok) + ": no tokenizer.model"),
                          ((path, tmp_path / "new", "--model-base", tmp_path / "nope", "--vit", parts["vit"]),
                           "nope: no such directory (the HF Vicuna directory"),
                          ((path, tmp_path / "new", "--model-base", parts["base"], "--vit", tmp_path / "nope"),
                           "--vit " + str(tmp_path / "nope") + ": no such file or directory (an HF CLIP directory"),
                          ((path, "", *given), "'': no directory named; merge into a new directory")):
        r = merge_cli(*argv)
        lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("merging ")]  # progress
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            r.stderr
    assert sorted(os.listdir(tmp_path)) == before
    r = merge_cli(path, tmp_path / "new", "--model-base", parts["base"])  # a flag left out: one line, not the usage
    assert r.returncode == 2 and r.stderr == "release.py merge-lora: error: the following arguments are required: " \
                                             "--vit (see --help)\n", r.stderr


@pytest.mark.parametrize("signame, code, said", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_merge_killed_or_interrupted_leaves_nothing(parts, shipped, tmp_path, signame, code, said):
    """SIGTERM (a job's time limit, kill) or Ctrl-C (SIGINT: was a KeyboardInterrupt traceback) while the
    merged weights are written: one line, no hidden scratch directory, no DST; as weights.py convert."""
    killed_while_writing = """if True:
        import os, runpy, signal, sys
        import mra
        write, sig = mra.write_safetensors, getattr(signal, sys.argv[1])
        def write_and_die(*a, **kw):
            os.kill(os.getpid(), sig)
            write(*a, **kw)
        mra.write_safetensors = write_and_die
        sys.argv = ["release.py", "merge-lora", *sys.argv[2:]]
        runpy.run_path("release.py", run_name="__main__")"""
    dst = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-c", killed_while_writing, signame, str(shipped[0]), str(dst),
                        "--model-base", str(parts["base"]), "--vit", str(parts["vit"])], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    *progress, last = r.stderr.strip().splitlines()
    assert r.returncode == code and last == f"{said}: {dst} was not written", r.stderr
    assert [line.split()[0] for line in progress] == ["merging", "merged"], r.stderr  # the steps said as they start
    assert os.listdir(tmp_path) == []
