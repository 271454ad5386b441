"""Loading the released checkpoints: a LLaVA-HR or LLaVA-1.5 directory as published (config.json, the
fp16 pytorch_model-*.bin shards or safetensors, tokenizer.model) and a stage-1 projector file
(mm_projector.bin), and LLaVA-1.5's LoRA releases (load_lora_release: merged into their base LLM, then
loaded as a whole directory is; written once as a whole model of ours by the one command line here,
python release.py merge-lora LORA_DIR DST_DIR --model-base VICUNA_DIR --vit CLIP_DIR). Every name of the
release's key layouts is in this file; mra.load_checkpoint comes here for any directory without our
mra_config.json.

The release's keys, and where each goes in mra.LlavaHR:
    model.embed_tokens.* model.layers.* model.norm.* lm_head.*       -> llm.* (HF LLaMA names, llama.py)
    model.vision_tower.fast_vision_tower.vision_tower.vision_model.* -> encoder.vit.* (HF CLIP, vit.py)
    model.vision_tower.slow_vision_tower.vision_tower.*              -> encoder.convnext.* (timm, convnext.py)
    model.vision_tower.vision_tower.vision_model.*  (LLaVA-1.5)      -> encoder.vit.*
    model.vision_tower.align_stages_latent.{i}.*  (the MR-Adapters)  -> encoder.adapters.{i}.*
    model.vision_tower.align_stages.0.*  (the final fusion)          -> encoder.fusion.*
    model.mm_projector.{0,2}.*                                       -> projector.{0,2}.*
config.json is HF's LlamaConfig plus the release's fields: mm_projector_type, mm_vision_select_layer /
_feature, image_aspect_ratio ('pad' pads to a square; 'anyres' is refused; any other value, absent included,
resizes and centre-crops), mm_use_im_start_end (refused when true), and LLaVA-HR's input_image_size
(R, 1024) and vit_min_size (336)."""
import math
import os
import re
import shutil
import sys
import time

import failures

if __name__ == "__main__":  # before torch loads: Ctrl-C and SIGTERM are one line from here
    failures.catch_signals(debug=False)

import torch

import mra
from convnext import ConvNeXt
from int8 import check_quantize, int8_linears, int8_reader
from llama import INT8_KEYS, Llama, LlamaConfig
from lora import check_scale
from vit import HF_IGNORE, ViT, clip_config
from weights import (CheckpointError, check_memory, interrupted, load_state, new_directory, read_bin,
                     read_checkpoint, read_config, read_safetensors, remap, tensor_sizes, their_name)

# -----------------------------------------------------------------------------
# A whole released model (LLaVA-HR, LLaVA-1.5), and a stage-1 projector file

HR_VIT = "model.vision_tower.fast_vision_tower.vision_tower."  # + HF CLIP keys (vision_model.*)
HR_CONVNEXT = "model.vision_tower.slow_vision_tower.vision_tower."  # + timm keys, gamma -> .weight
V15_VIT = "model.vision_tower.vision_tower."  # LLaVA-1.5's single CLIP tower
LLM_KEYS = re.compile(r"^(model\.(embed_tokens|layers|norm)\.|lm_head\.)")
_ADAPTER = [f"{m}.{p}" for m in ("fast_conv", "fast_proj", "slow_conv", "slow_proj", "gate.0", "gate.2")
            for p in ("weight", "bias")]
RELEASE_KEYS = (
    [(f"model.vision_tower.align_stages_latent.{{i}}.{k}", f"encoder.adapters.{{i}}.{k}") for k in _ADAPTER]
    + [(f"model.vision_tower.align_stages.0.{m}.{p}", f"encoder.fusion.{m}.{p}")
       for m in ("fast_proj", "slow_proj") for p in ("weight", "bias")]
    + [("model.mm_projector.{i}.weight", "projector.{i}.weight"), ("model.mm_projector.{i}.bias", "projector.{i}.bias")]
)


def release_config(path, arch=None):
    """A released dir's config.json, read and checked before any weight is (a 7B's take minutes) -> (its
    dict, the LLM's LlamaConfig). arch ("llava-hr" / "llava-1.5", once known): its vision settings too."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: neither mra_config.json (a train.py checkpoint) nor config.json (a released "
                              f"LLaVA checkpoint): not a checkpoint directory, or one missing its config")
    # the LLM's config is checked as the file is read: a missing or bad field fails here, named
    hf, llm_cfg = read_config(cfg_path, lambda d: (d, LlamaConfig.from_hf(d)))
    # what the release does with images and prompts that we do not (llava_hr/mm_utils.py process_images)
    if hf.get("image_aspect_ratio") == "anyres":
        raise CheckpointError(f"{cfg_path}: image_aspect_ratio 'anyres' (tiled any-resolution images) is not "
                              f"implemented; implemented are 'pad' and the resize and centre crop of any other value")
    if hf.get("mm_use_im_start_end"):
        raise CheckpointError(f"{cfg_path}: mm_use_im_start_end {hf['mm_use_im_start_end']!r}: the <im_start> and "
                              f"<im_end> tokens around each image are not implemented (false or absent is)")
    if arch:
        check_vision(hf, cfg_path, arch)
    return hf, llm_cfg


def check_vision(hf, cfg_path, arch):
    """What LLaVA's config.json may set that would change the model, beyond what we implement."""
    projector = hf.get("mm_projector_type", "mlp2x_gelu")
    select = hf.get("mm_vision_select_layer", -2), hf.get("mm_vision_select_feature", "patch")
    if projector != "mlp2x_gelu" or (arch == "llava-1.5" and select != (-2, "patch")):
        raise CheckpointError(f"{cfg_path}: mm_projector_type {projector!r}, mm_vision_select_layer {select[0]!r}, "
                              f"mm_vision_select_feature {select[1]!r}: implemented are 'mlp2x_gelu', -2, 'patch' "
                              f"(LLaVA-1.5's; LLaVA-HR's ViT path uses its last layer whatever the config says)")


def load_release(path, dtype=None, device="cpu", quantize=None, tensors=None, vit=None):
    """A released LLaVA-HR or LLaVA-1.5 directory (config.json + the fp16 pytorch_model-*.bin shards as
    released, or safetensors) -> LlavaHR; tower shapes come from the tensors. Each tensor is cast to `dtype`
    (or, quantize="int8", the LLM's linear weights quantized) as it is read, a shard let go before the
    next: the weights are held once. Weights that would not fit in memory are refused before any is read.
    tensors, vit: the weights read elsewhere, under the release's names, and a loaded CLIP ViT (a LoRA
    release, which holds neither its LLM nor its tower: load_lora_release)."""
    cfg_path, (hf, llm_cfg) = os.path.join(path, "config.json"), release_config(path)
    if tensors is None:
        mra.lora_release(path)  # before its files are read as a whole model's
        check_memory(path, tensor_sizes(path), dtype, device, INT8_KEYS.match, check_quantize(quantize))
        convert = int8_reader(INT8_KEYS.match, dtype, device) if quantize else None
        tensors = read_checkpoint(path, dtype, device, convert=convert)
    parts = {p: {k[len(p):]: tensors.pop(k) for k in list(tensors) if k.startswith(p)}
             for p in (HR_VIT, HR_CONVNEXT, V15_VIT)}
    if parts[HR_VIT] or parts[HR_CONVNEXT]:
        arch = "llava-hr"
        for p, what in ((HR_VIT, "CLIP ViT"), (HR_CONVNEXT, "ConvNeXt")):
            if not parts[p]:
                raise CheckpointError(f"{path}: LLaVA-HR checkpoint without its {what} tower (no {p}* keys)")
    elif parts[V15_VIT] or vit is not None:
        arch = "llava-1.5"
    else:
        raise CheckpointError(f"{path}: no vision tower in this checkpoint (expected {HR_VIT}* and {HR_CONVNEXT}* "
                              f"for LLaVA-HR, or {V15_VIT}* for LLaVA-1.5); is it a plain LLaMA checkpoint?")
    # the other architecture's tower is in no model built here: reported as unexpected, not dropped
    stray = [p + k for p in ((V15_VIT,) if arch == "llava-hr" else (HR_VIT, HR_CONVNEXT)) for k in parts[p]]
    check_vision(hf, cfg_path, arch)
    try:  # the towers' loaders name their keys without the release's prefix: say where they sit
        where = "model.* and lm_head.*, shaped as config.json says"
        llm = Llama.from_pretrained((llm_cfg, {k: tensors.pop(k) for k in list(tensors) if LLM_KEYS.match(k)}),
                                    device=device, quantize=quantize)
        where = (HR_VIT if parts[HR_VIT] else V15_VIT) + "*"
        vit = vit if vit is not None else ViT.from_pretrained(parts[HR_VIT] or parts[V15_VIT], device=device)
        where = HR_CONVNEXT + "*"
        convnext = ConvNeXt.from_pretrained(parts[HR_CONVNEXT], device=device) if arch == "llava-hr" else None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e} (keys {where})") from None
    towers = {"llm.": llm, "encoder.vit.": vit, "encoder.convnext.": convnext}  # where each sits in LlavaHR
    state = {p + k: v for p, m in towers.items() if m is not None for k, v in m.state_dict().items()}
    rest, unexpected = remap(tensors, RELEASE_KEYS)
    # the release pads only for "pad"; any other value, absent included, is the processor's resize + crop
    kw = dict(arch=arch, vit=vit.config, llm=llm.config, image_size=vit.config.image_size,  # LLaVA-1.5's R
              image_aspect_ratio="pad" if hf.get("image_aspect_ratio") == "pad" else "crop")
    if arch == "llava-hr":
        # the release hard-codes S's 336 px floor; a config.json may override it (tiny models)
        kw.update(convnext=convnext.config, image_size=hf.get("input_image_size", 1024),
                  vit_min_size=hf.get("vit_min_size", 336),
                  adapters=any(k.startswith("encoder.adapters.") for k in rest))
    try:
        cfg = mra.MRAConfig(**kw)
    except ValueError as e:  # input_image_size or vit_min_size
        raise CheckpointError(f"{cfg_path}: {e}") from None
    with torch.device("meta"):
        try:
            model = mra.LlavaHR(cfg)
        except ValueError as e:  # a tiny release's ViT too shallow for the adapters it holds
            raise CheckpointError(f"{path}: {e} (this one has {cfg.vit.layers})") from None
        if quantize:
            int8_linears(model.llm)
    return load_state(model, state | rest, path, unexpected + stray, RELEASE_KEYS, one_dtype=dtype is None)


def load_projector(model, path):
    """Load a released stage-1 file (projector + final fusion) into `model`, in place."""
    path = os.fspath(path)
    tensors = read_safetensors(path) if path.endswith(".safetensors") else read_bin(path)
    state, unexpected = remap(tensors, RELEASE_KEYS)
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(("projector.", "encoder.fusion."))}
    missing = sorted(their_name(k, RELEASE_KEYS) for k in set(ours) - set(state))
    unexpected += [their_name(k, RELEASE_KEYS) for k in state if k not in ours]  # MR-Adapters: a stage-2 file
    bad = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if bad:
        raise CheckpointError(f"{path}: not a stage-1 projector file: {', '.join(bad[:6])}"
                              + (f" ... ({len(bad)} in all)" if len(bad) > 6 else ""))
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise CheckpointError(f"{path}: shape mismatch for {k}: model expects {tuple(ours[k].shape)}, "
                                  f"file has {tuple(v.shape)}")
        ours[k].data.copy_(v)
    return model


# -----------------------------------------------------------------------------
# LLaVA-1.5's LoRA releases (llava-v1.5-7b-lora, -13b-lora), loaded as LLaVA's builder.py loads them
# (load_pretrained_model with a model_base): config.json, LLaVA's; adapter_config.json and
# adapter_model.bin (or .safetensors, newer peft), peft's LoRA of the LLM's linear layers (r 128,
# alpha 256); non_lora_trainables.bin, the projector. The LLM is the base they were trained on
# (--model-base, Vicuna v1.5: its tokenizer too), the CLIP tower its own directory (--vit: LLaVA
# fetches config.json's mm_vision_tower from the hub).

PEFT_KEY = re.compile(r"base_model\.model\.(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj))"
                      r"\.lora_([AB])\.weight")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# adapter_config.json fields that would change what the merge must compute (their defaults do not)
NOT_MERGED = dict(peft_type="LORA", bias="none", fan_in_fan_out=False) | dict.fromkeys(
    ("use_dora", "lora_bias", "use_qalora", "use_bdlora", "rank_pattern", "alpha_pattern", "modules_to_save",
     "layer_replication", "target_parameters", "trainable_token_indices"))


def peft_config(file):
    """adapter_config.json -> (r, scale): W' = W + scale B A, scale alpha / r (rsLoRA: alpha / sqrt(r))."""
    c = read_config(file, lambda d: {**d, "r": d["r"], "lora_alpha": d["lora_alpha"]})  # these two must be there
    bad = next((k for k, ok in NOT_MERGED.items() if (c.get(k) if ok is None else c.get(k, ok) != ok)), None)
    if bad is not None:
        raise CheckpointError(f"{file}: {bad} {c[bad]!r} is not implemented; a plain LoRA is, merged as "
                              f"W + (lora_alpha / r) B A")
    r, alpha, targets = c["r"], c["lora_alpha"], c.get("target_modules")
    check_scale(file, r, alpha, "lora_alpha")
    # peft matches a listed name against the end of a module's; a regex (a string) is judged by the keys
    others = [t for t in (targets if isinstance(targets, list) else []) if str(t).rsplit(".", 1)[-1] not in PROJECTIONS]
    if others:
        raise CheckpointError(f"{file}: target_modules {others}: LoRA outside the LLM's linear layers "
                              f"({', '.join(PROJECTIONS)}) is not implemented")
    return r, alpha / (math.sqrt(r) if c.get("use_rslora") else r)


def peft_pairs(file, r):
    """{base key: (A (r, in), B (out, r))} of a peft adapter file, each checked to be of rank r."""
    pairs = {}
    for k, t in read_checkpoint(file).items():
        m = PEFT_KEY.fullmatch(k)
        if m is None:
            raise CheckpointError(f"{file}: {k} is not the lora_A or lora_B of one of the LLM's linear layers "
                                  f"({', '.join(PROJECTIONS)}); nothing else is implemented")
        pairs.setdefault(m[1] + ".weight", {})[m[4]] = t
    for k, ab in pairs.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise CheckpointError(f"{file}: {k.removesuffix('weight')}lora_{'A' if a is None else 'B'} is missing, "
                                  f"its lora_{'B' if a is None else 'A'} is there: download the file again")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{file}: the LoRA of {k} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) is "
                                  f"not of rank {r}, adapter_config.json's r")
    if not pairs:
        raise CheckpointError(f"{file}: holds no LoRA tensors")
    return {k: (ab["A"], ab["B"]) for k, ab in pairs.items()}


def llava_trainables(file):
    """non_lora_trainables.bin renamed as LLaVA renames it: 'base_model.' off, then 'model.' too where the
    keys start 'model.model.'. The projector; LLM weights too (they replace the base's, before the merge)."""
    sd = read_checkpoint(file)
    sd = {k.removeprefix("base_model."): v for k, v in sd.items()}
    if any(k.startswith("model.model.") for k in sd):
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    bad = next((k for k in sd if not (k.startswith("model.mm_projector.") or LLM_KEYS.match(k))), None)
    if bad is not None:
        raise CheckpointError(f"{file}: holds {bad}; implemented are the projector (model.mm_projector.*) and the "
                              f"LLM's weights (a tuned vision tower is not)")
    return sd


def check_tower(tower, vit, name, path):
    """--vit must be the tower config.json names (mm_vision_tower, as openai/clip-vit-large-patch14-336: patch 14,
    336 px; no size: CLIP's 224): the 224 px CLIP-L would give 256 visual tokens to a projector trained on 576."""
    m = re.search(r"patch(\d+)(?:-(\d+))?$", str(name or ""))
    if m and (tower.config.patch_size, tower.config.image_size) != (int(m[1]), int(m[2] or 224)):
        raise CheckpointError(f"--vit {vit}: a {tower.config.image_size} px tower of {tower.config.patch_size} px "
                              f"patches, but {path}/config.json names {name} (patch {m[1]}, {m[2] or 224} px): give "
                              f"that tower's directory")


def load_lora_release(path, base, vit, dtype=None, device="cpu", quantize=None):
    """A LLaVA-1.5 LoRA release `path` + its base LLM `base` (an HF LLaMA / Vicuna dir) + the CLIP tower
    `vit` (an HF CLIP dir) -> the merged LLaVA-1.5 LlavaHR, as load_release builds one from a full dir.

    Each base weight is merged as it is read, W + scale B A in fp32, then cast to dtype (None: W's own)
    or quantized (quantize="int8"): the model is held once, as when loading a merged checkpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such directory (a LoRA release, such as llava-v1.5-7b-lora)")

    def beside(*names, why):
        found = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise CheckpointError(f"{path}: no {' or '.join(names)} ({why})")
        return found[0]  # peft reads safetensors first
    conf = beside("adapter_config.json", why="not a LoRA release, which --model-base goes with; a full "
                                             "checkpoint loads from --model alone")
    adapter = beside("adapter_model.safetensors", "adapter_model.bin", why="the LoRA weights: download them")
    trainables = beside("non_lora_trainables.bin", why="the projector's weights: download them")
    hf, _ = release_config(path, "llava-1.5")  # before any weight is read
    r, scale = peft_config(conf)
    deltas, extra = peft_pairs(adapter, r), llava_trainables(trainables)
    sizes = {k: v for k, v in tensor_sizes(base).items() if LLM_KEYS.match(k)}
    lost = next((k for k in deltas if k not in sizes and k not in extra), None)
    if lost is not None:
        raise CheckpointError(f"{adapter}: a LoRA of {lost}, which {base} does not hold: not the base LLM these "
                              f"adapters were trained on")
    skip = [re.compile(p) for p in HF_IGNORE]  # a CLIPModel's text tower: not read

    def not_clip(e):  # another directory given as the tower (the base, an empty one): named by its flag
        return CheckpointError(f"--vit {vit}: {str(e).removeprefix(f'{vit}: ')} (an HF CLIP directory, the "
                               f"release's mm_vision_tower, is expected)")
    try:  # the base given for it: refused before it is sized (a second LLM: a memory refusal) or read (13 GB)
        clip_config(vit)
        sizes |= {"vit:" + k: v for k, v in tensor_sizes(vit).items() if not any(p.match(k) for p in skip)}
    except CheckpointError as e:
        raise not_clip(e) from None
    # held too until each is merged (7B, r 128: 0.6 GB), as stored: not cast
    sizes |= {f"lora:{k}": (a.numel() + b.numel(), a.element_size(), False) for k, (a, b) in deltas.items()}
    check_memory(base, sizes, dtype, device, INT8_KEYS.match, check_quantize(quantize))
    try:
        tower = ViT.from_pretrained(vit, dtype=dtype, device=device)
    except CheckpointError as e:
        raise not_clip(e) from None
    check_tower(tower, vit, hf.get("mm_vision_tower"), path)
    cast = lambda dt: int8_reader(INT8_KEYS.match if quantize else lambda k: False, dt, device)  # noqa: E731

    def merged(k, t):
        t = extra.pop(k, t)  # LLaVA loads non_lora_trainables over the base, then merges the LoRA
        if k not in deltas:
            return cast(dtype)(k, t)
        a, b = (x.to(device, torch.float32) for x in deltas.pop(k))
        if (b.shape[0], a.shape[1]) != tuple(t.shape):
            raise CheckpointError(f"{adapter}: shape mismatch for {k}: lora_B @ lora_A is "
                                  f"{(b.shape[0], a.shape[1])}, {base} holds {tuple(t.shape)}")
        # cast (or quantized) from fp32 once merged; dtype None: W's own
        return cast(dtype or t.dtype)(k, t.to(device, torch.float32) + scale * (b @ a))
    tensors = read_checkpoint(base, dtype, device, keep=LLM_KEYS.match, convert=merged)
    # dtype None: the base's own for every part, as LLaVA loads them all in one (merged reads it from here on)
    dtype = dtype or tensors["model.embed_tokens.weight"].dtype
    for k in list(extra):  # the projector, and any weight the base does not hold
        tensors |= merged(k, extra.pop(k))
    try:
        return load_release(path, dtype, device, quantize, tensors=tensors, vit=tower.to(dtype))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (a LoRA release: the LLM from {base}, the tower from {vit})") from None


def check_lora_flags(base, vit):
    """A LoRA release's --model-base and --vit (generate.py, merge-lora), named by flag before anything loads."""
    if not os.path.isdir(base):
        raise CheckpointError(f"--model-base {base}: " + ("a file" if os.path.exists(base) else "no such directory")
                              + " (the HF Vicuna directory the LoRA release was trained on is expected)")
    if not os.path.isfile(os.path.join(base, "tokenizer.model")):  # --model-base and --vit swapped, say
        raise CheckpointError(f"--model-base {base}: no tokenizer.model (the base LLM's, which the release is prompted "
                              f"with): give the HF Vicuna directory itself")
    if not os.path.exists(vit):  # a file too: the weights, a CLIP config.json beside them
        raise CheckpointError(f"--vit {vit}: no such file or directory (an HF CLIP directory, the release's "
                              f"mm_vision_tower, is expected)")


def merge_lora_release(path, base, vit, dst, dtype=torch.float16, log=lambda line: None):
    """load_lora_release once, written as a whole checkpoint of ours in the new directory dst (weights,
    mra_config.json, the base's tokenizer), as LLaVA's merge_lora_weights.py writes one of theirs: a model
    that train.py --init and generate.py --model take alone. dtype float16: the release's (and LLaVA's).
    log: where the two steps (a minute or two each at 7B) are said as they start."""
    check_lora_flags(base, vit)  # before minutes of loading
    with new_directory(dst, "merge") as tmp:  # dst refused before anything is read if it exists
        log(f"merging {path} into {base} ({dtype}; the tower from {vit})")
        t0 = time.perf_counter()
        model = load_lora_release(path, base, vit, dtype)
        log(f"merged in {time.perf_counter() - t0:.1f} s; writing {dst}")
        mra.save_checkpoint(model, tmp)
        for f in ("tokenizer.model", "tokenizer_config.json"):  # the latter: the tokenizer's mode (legacy)
            if os.path.isfile(os.path.join(base, f)):
                shutil.copy(os.path.join(base, f), os.path.join(tmp, f))
    return dst


if __name__ == "__main__":
    p = failures.Parser(description="Merge a LLaVA-1.5 LoRA release into its base once: a whole model in a new "
                           "directory, for train.py --init and generate.py --model.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge-lora", help="LORA_DIR + --model-base + --vit -> DST_DIR")
    m.add_argument("lora", metavar="LORA_DIR", help="the LoRA release (adapter_config.json, non_lora_trainables.bin)")
    m.add_argument("dst", metavar="DST_DIR", help="a new directory (it appears whole or not at all)")
    m.add_argument("--model-base", required=True, help="the HF Vicuna dir the LoRA trained on (vicuna-7b-v1.5)")
    m.add_argument("--vit", required=True, help="the HF CLIP dir that LORA_DIR's config.json names as "
                   "mm_vision_tower (clip-vit-large-patch14-336)")
    m.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="of the written weights (default float16, as the release and LLaVA's merge write them)")
    args = p.parse_args()
    failures.handling()
    try:
        print(merge_lora_release(args.lora, args.model_base, args.vit, args.dst, getattr(torch, args.dtype),
                                 log=lambda line: print(line, file=sys.stderr, flush=True)))
    except KeyboardInterrupt as e:
        sys.exit(interrupted(args.dst, type(e)))
    except (CheckpointError, OSError) as e:  # nothing is left behind: the output appears whole or not at all
        sys.exit(f"error: {e}")
