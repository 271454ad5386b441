"""Loading the released checkpoints: a LLaVA-HR or LLaVA-1.5 directory as published (config.json, the
fp16 pytorch_model-*.bin shards or safetensors, tokenizer.model) and a stage-1 projector file
(mm_projector.bin). Every name of a whole released model's key layout is in this file (a LoRA release:
lora.load_release, which comes here once merged); mra.load_checkpoint comes here for any directory
without our mra_config.json.

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
import os
import re

import torch

import mra
from convnext import ConvNeXt
from int8 import check_quantize, int8_linears, int8_reader
from llama import INT8_KEYS, Llama, LlamaConfig
from vit import ViT
from weights import (CheckpointError, check_memory, load_state, read_bin, read_checkpoint, read_config,
                     read_safetensors, remap, tensor_sizes, their_name)

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
    release, which holds neither its LLM nor its tower: lora.load_release)."""
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
