"""Mixture-of-Resolution Adaptation: the MR-Adapter, the dual-pathway encoder, LLaVA-HR.

Paper: Luo et al., "Feast Your Eyes: Mixture-of-Resolution Adaptation for Multimodal Large Language
Models" (arXiv 2403.03003). Read it beside this file:
- Fig. 3 / Eq. 2 (DualEncoder): two visual pathways. A ConvNeXt ("slow", high resolution R x R,
  stride 32) and a CLIP ViT ("fast", low resolution S x S, stride 14) see the same image; MR-Adapters
  inside the ViT carry high-res detail into the low-res tokens: few LLM tokens that hold fine detail.
- Fig. 4 / Eq. 3-4 (MRAdapter.forward): f_l on the low-res tokens, f_h on the high-res map, a gate g
  from the pooled pair.
- Sec. 4.4: stage 1 trains the projector (release: and the final fusion) without adapters, stage 2 all
  (MRAConfig.adapters here; train.py's `trains` and `with_adapters` do the switching).
Where the release (which its checkpoints need) differs from the paper, we follow it and say so in a
comment (README: "Where the release differs from the paper"). In file order: token accounting, the
MR-Adapter, the encoders, the model, building, saving and loading ours; the release's checkpoints load
in release.py."""
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from convnext import ConvNeXt, ConvNeXtConfig
from int8 import check_quantize, int8_linears, int8_reader
from llama import Llama, LlamaConfig
from tokenizer import Tokenizer
from vit import ViT, ViTConfig
from weights import (CheckpointError, check_bool, check_memory, load_state, read_checkpoint, read_config,
                     tensor_sizes, write_safetensors)

IMAGE_TOKEN = -200  # LLaVA's placeholder id for <image>; replaced by the visual features
IGNORE = -100  # label of every position the loss skips


@dataclass
class MRAConfig:
    arch: str = "llava-hr"  # "llava-hr" (dual pathway) or "llava-1.5" (one ViT path)
    image_size: int = 1024  # R: the ConvNeXt input (LLaVA-1.5: the ViT input); vit.image_size is the size
    # the ViT's position table was trained at (336), resampled to S at run time
    vit_min_size: int = 336  # floor of the low-res size S (the release hard-codes 336)
    adapters: bool = True  # stage 2 inserts MR-Adapters; stage 1 has none
    gate: str = "tanh"  # "tanh" (released), "sigmoid", "none" (plain sum): sigmoid is Table 3's
    # gate ablation; "none", without g, is ours
    image_aspect_ratio: str = "pad"  # "pad" to a square (stage 2, inference) or "crop" (stage 1)
    vit: ViTConfig = field(default_factory=lambda: ViTConfig.from_name("clip-vit-l-14-336"))
    convnext: ConvNeXtConfig = field(default_factory=lambda: ConvNeXtConfig.from_name("convnext_large_mlp"))
    llm: LlamaConfig = field(default_factory=lambda: LlamaConfig.from_name("vicuna-7b-v1.5"))

    def __post_init__(self):
        if self.arch == "llava-1.5":  # one ViT path, nothing to adapt from: a stage-2 LLaVA-1.5 holds no MR-Adapters
            self.adapters = False
        for name, allowed in (("arch", ("llava-hr", "llava-1.5")), ("gate", ("tanh", "sigmoid", "none")),
                              ("image_aspect_ratio", ("pad", "crop"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} is {getattr(self, name)!r}, expected one of {allowed}")
        for name in ("image_size", "vit_min_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} is {value!r}, expected a positive whole number of pixels")
        check_bool(self, ("adapters",))
        if self.arch == "llava-hr":  # the ConvNeXt's grid is aligned to the ViT's (align): one must divide the other
            h, side = self.image_size // 2 ** (len(self.convnext.dims) + 1), math.isqrt(self.visual_tokens)
            if not h or max(h, side) % min(h, side):
                raise ValueError(f"image_size {self.image_size} gives the ConvNeXt a {h}x{h} grid and the ViT a "
                                 f"{side}x{side} one: one must divide the other (LLaVA-HR's sizes: 384, 768, 1024, 1536)")

    @classmethod
    def from_name(cls, name):
        if name not in MRA_PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(MRA_PRESETS)}")
        return MRA_PRESETS[name]()

    @property
    def visual_tokens(self):
        """N: the LLM positions one image takes (see visual_tokens below)."""
        return visual_tokens(self.arch, self.image_size, self.vit_min_size, self.vit.patch_size)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """From to_dict's form, every field present: one left out would silently take its default (a
        model saved at R = 384 read back at 1024), so it is a KeyError naming it (read_config: one line)."""
        def complete(c, d, where=""):
            missing = next((f.name for f in fields(c) if f.name not in d), None)
            if missing is not None:
                raise KeyError(where + missing)
        d = dict(d)
        complete(cls, d)
        for k, c in {"vit": ViTConfig, "convnext": ConvNeXtConfig, "llm": LlamaConfig}.items():
            if isinstance(d.get(k), dict):
                complete(c, d[k], k + ".")
                d[k] = c(**{n: tuple(v) if isinstance(v, list) else v for n, v in d[k].items()})
            elif k in d:
                raise ValueError(f"{k} is {d[k]!r}, expected an object of {c.__name__} fields")
        return cls(**d)


MRA_PRESETS = {
    "llava-hr-7b": MRAConfig,
    "llava-hr-x-13b": lambda: MRAConfig(convnext=ConvNeXtConfig.from_name("convnext_xxlarge"),
                                        llm=LlamaConfig.from_name("vicuna-13b-v1.5")),
    # the CPU demo (train.py --preset demo): random towers and LLM small enough to train in
    # minutes; R = 256 gives S = max(256 / 32 * 14, 112) = 112, an 8x8 grid, 64 visual tokens
    "demo": lambda: MRAConfig(
        image_size=256, vit_min_size=112,
        vit=ViTConfig(image_size=112, patch_size=14, width=128, layers=4, heads=2, mlp_dim=256),
        convnext=ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(32, 64, 96, 128)),
        llm=LlamaConfig(vocab_size=600, dim=192, n_layers=4, n_heads=4, hidden_dim=512, max_seq_len=512)),
}


# ---------------------------------------------------------------------------------------
# Token accounting: why MRA is cheap. The ViT's grid sets the LLM's visual-token count;
# the ConvNeXt's stride of 32 lets R grow while S (and so the count) grows far slower.

def vit_input_size(R, floor=336, patch=14):
    """S for a high-res input R (release rule): from R = 768 up the ViT grid is the ConvNeXt's R/32 grid
    (1024 -> 448, 32x32); below, the floor makes it a multiple (384 -> 336: 24x24 against 12x12; align
    upsamples the ConvNeXt's map)."""
    return max(int(R / 32 * patch), floor)  # 32: the ConvNeXt's stride (stem 4, then three 2x downsamples)


def visual_tokens(arch, R, floor=336, patch=14):
    """LLaVA-HR: 384->576, 768->576, 1024->1024, 1536->2304. LLaVA-1.5: 336->576 ... 1022->5329."""
    S = vit_input_size(R, floor, patch) if arch == "llava-hr" else R
    return (S // patch) ** 2


def llm_positions(n_ids, n_images, cfg):
    """Positions a prompt takes in the LLM: each <image> placeholder (one id) becomes N visual tokens."""
    return n_ids + n_images * (cfg.visual_tokens - 1)


def align(x, n):
    """Resample a map (B, C, h, w) to n tokens (B, n, C) on a sqrt(n) grid, one count dividing the other.
    Up: bilinear with align_corners, in fp32 (release). Down: average pooling, kernel = stride = ratio."""
    B, C, h, w = x.shape
    side = math.isqrt(n)
    if side * side != n or h != w or (h > side and h % side) or (h < side and side % h):
        raise ValueError(f"cannot align a {h}x{w} map to {n} tokens: one grid must divide the other "
                         f"(choose the image size so the ConvNeXt and ViT grids are multiples)")
    if h < side:
        x = F.interpolate(x.float(), size=(side, side), mode="bilinear", align_corners=True).to(x.dtype)
    elif h > side:
        x = F.avg_pool2d(x, h // side)
    return x.flatten(2).transpose(1, 2)  # (B, n, C)


# ---------------------------------------------------------------------------------------
# The MR-Adapter (Fig. 4, Eq. 3-4)

class MRAdapter(nn.Module):
    """F'_vl = F_vl + f_l(F_vl) + g * f_h(F_vh)   (Eq. 3), g = tanh(W2 GELU(W1 f_v))   (Eq. 4).

    F_vl (`x`, (B, N, d)): the ViT's low-res tokens; F_vh (`slow`, (B, C_s, H, W)): the ConvNeXt's high-res
    map. Module names are the release's: fast_* is f_l (the ViT side), slow_* is f_h (the ConvNeXt side)."""

    def __init__(self, d, c_slow, gate="tanh"):
        super().__init__()
        if gate not in ("tanh", "sigmoid", "none"):
            raise ValueError(f"gate must be tanh, sigmoid or none, not {gate!r}")
        self.act = gate
        # f_l: "a convolutional block": depthwise 7x7 (local mixing on the low-res grid), 1x1
        self.fast_conv, self.fast_proj = nn.Conv2d(d, d, 7, padding=3, groups=d), nn.Conv2d(d, d, 1)
        # f_h: "an MLP layer", i.e. two 1x1 convs on the high-res map, C_s -> C_s -> d
        self.slow_conv, self.slow_proj = nn.Conv2d(c_slow, c_slow, 1), nn.Conv2d(c_slow, d, 1)
        # W1, W2 of Eq. 4: the paper's W2 is d/2 -> d (a gate per channel), the release's d/2 -> 1 (one per image)
        self.gate = None if gate == "none" else nn.Sequential(nn.Linear(2 * d, d // 2), nn.GELU(), nn.Linear(d // 2, 1))
        self.reset_parameters()

    def reset_parameters(self):
        # zero output projections: f_l = f_h = 0, so a new adapter is the identity (stage 2 starts at stage 1)
        for conv, init in ((self.fast_conv, nn.init.xavier_uniform_), (self.fast_proj, nn.init.zeros_),
                           (self.slow_conv, nn.init.xavier_uniform_), (self.slow_proj, nn.init.zeros_)):
            init(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x, slow):
        B, N, d = x.shape
        side = math.isqrt(N)
        grid = x.transpose(1, 2).reshape(B, d, side, side)  # (B, d, side, side): tokens back on their grid
        f_l = self.fast_proj(F.gelu(self.fast_conv(grid))).flatten(2).transpose(1, 2)  # (B, N, d)
        f_h = align(self.slow_proj(F.gelu(self.slow_conv(slow))), N)  # (B, N, d): on the low-res grid
        # release: the residual is added first, x = F_vl + f_l(F_vl), and the gate pools this updated x
        x = x + f_l
        if self.gate is None:  # the ablation without a gate (ours; Table 3 tries sigmoid)
            return x + f_h
        # Eq. 4: f_v pools the concatenated pair over tokens, so g looks at the whole image
        g = self.gate(torch.cat([x, f_h], dim=-1).mean(dim=1))  # (B, 2d) -> (B, 1)
        g = torch.tanh(g) if self.act == "tanh" else torch.sigmoid(g)
        return x + g[:, :, None] * f_h  # Eq. 3; (B, 1, 1) broadcast over tokens and channels


# ---------------------------------------------------------------------------------------
# Vision encoders

class DualEncoder(nn.Module):
    """LLaVA-HR's vision encoder (Eq. 2): ConvNeXt on R x R, ViT on S x S, adapters between."""

    def __init__(self, cfg: MRAConfig, vit=None, convnext=None):
        super().__init__()
        self.cfg = cfg
        self.vit = vit or ViT(cfg.vit)
        self.convnext = convnext or ConvNeXt(cfg.convnext)
        d, c_slow = cfg.vit.width, cfg.convnext.dims[-1]
        if cfg.adapters and (cfg.vit.layers < 4 or cfg.vit.layers % 4):  # the release asserts it too
            raise ValueError("MR-Adapters go after layers n, 2n, 3n with n = layers / 4: need a multiple of 4 "
                             "ViT layers, >= 4")
        # the paper: "applied into the last three stages of ViT", i.e. after the 1st, 2nd, 3rd quarter
        self.adapters = nn.ModuleList(MRAdapter(d, c_slow, cfg.gate) for _ in range(3 if cfg.adapters else 0))
        quarter = cfg.vit.layers // 4
        self.adapter_after = [quarter, 2 * quarter, 3 * quarter][:len(self.adapters)]  # ViT block numbers, from 1
        # final fusion, release: F_v = fast_proj(y) + slow_proj(align(slow)) (Eq. 2 adds F_vh unprojected)
        self.fusion = nn.ModuleDict(dict(fast_proj=nn.Linear(d, d), slow_proj=nn.Linear(c_slow, d)))

    def low_res(self, images):
        """The ViT's S x S input: the same normalised tensor, resized bilinearly without antialias, in
        fp32 and rounded once to the images' dtype, as the release does (fp16 on a CPU rounds inside)."""
        S = vit_input_size(images.shape[-1], self.cfg.vit_min_size, self.cfg.vit.patch_size)
        return F.interpolate(images.float(), size=(S, S), mode="bilinear", align_corners=True).to(images.dtype)

    def forward(self, images):
        """Normalised images (B, 3, R, R) -> visual features (B, N, d)."""
        slow = self.convnext(images)[-1]  # (B, C_s, R/32, R/32); release: stage 4 alone feeds all adapters + fusion
        # on CUDA the adapters run compiled, gates fused (cached on MRAdapter.forward: re-wrapping is free)
        adapters = [torch.compile(a, dynamic=False) if images.is_cuda else a for a in self.adapters]
        after = {i: partial(adapter, slow=slow) for i, adapter in zip(self.adapter_after, adapters)}
        # release: the class token is dropped before pre-LN and every layer (LLaVA-1.5 keeps it), and the
        # last layer's output is used, no post-norm (config.json's mm_vision_select_layer -2 is unused)
        x = self.vit.encode(self.low_res(images), keep_cls=False, after=after)  # (B, N, d)
        return self.fusion["fast_proj"](x) + self.fusion["slow_proj"](align(slow, x.shape[1]))


class ClipEncoder(nn.Module):
    """LLaVA-1.5's vision encoder: the ViT alone at R x R, penultimate layer, patch tokens."""

    def __init__(self, cfg: MRAConfig, vit=None, convnext=None):
        super().__init__()
        self.vit = vit or ViT(cfg.vit)

    def forward(self, images):
        return self.vit.encode(images, depth=-1)[:, 1:]  # (B, N, d): the last layer is never needed


# ---------------------------------------------------------------------------------------
# The multimodal model

class LlavaHR(nn.Module):
    """Vision encoder -> projector -> LLaMA: LLaVA-HR, or LLaVA-1.5 when cfg.arch is "llava-1.5"
    (the same model with ClipEncoder). Backbones already loaded may be passed in."""

    def __init__(self, cfg: MRAConfig, llm=None, vit=None, convnext=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = (DualEncoder if cfg.arch == "llava-hr" else ClipEncoder)(cfg, vit, convnext)
        d, H = cfg.vit.width, cfg.llm.dim
        self.projector = nn.Sequential(nn.Linear(d, H), nn.GELU(), nn.Linear(H, H))  # mlp2x_gelu: F_P of Eq. 1
        self.llm = llm or Llama(cfg.llm)

    def encode_images(self, images):
        """(B, 3, R, R) -> visual tokens in the LLM's embedding space (B, N, H)."""
        return self.projector(self.encoder(images.to(self.projector[0].weight.dtype)))

    def splice(self, input_ids, images=None, labels=None, pad_mask=None, left_pad=False):
        """Replace each IMAGE_TOKEN in input_ids (B, T) by the next image's N features.

        Prompts carry one placeholder id per image, as the release's do (ids, lengths and truncation match
        its prompts whatever N), so rows grow here, each by its own count, and are re-padded on the right
        (training) or the left (generation). images: (M, 3, R, R), one per placeholder in row order.
        Returns embeds (B, T', H), pad_mask (B, T') and labels (B, T') (-100 on visual tokens and padding)."""
        pad_mask = torch.ones_like(input_ids, dtype=torch.bool) if pad_mask is None else pad_mask.bool()
        is_image = (input_ids == IMAGE_TOKEN) & pad_mask
        n_given = 0 if images is None else images.shape[0]
        if int(is_image.sum()) != n_given:
            raise ValueError(f"{int(is_image.sum())} <image> placeholders but {n_given} images")
        feats = self.encode_images(images) if n_given else None  # (M, N, H)
        tok_embeds = self.llm.embed(input_ids.clamp(min=0))  # (B, T, H); placeholders' rows unused
        # every input position becomes `width` output slots (N for a placeholder, 0 for padding),
        # starting at `start`: the widths of the positions before it, plus the left padding
        width = torch.where(is_image, 0 if feats is None else feats.shape[1], 1) * pad_mask  # (B, T)
        start = width.cumsum(1) - width  # (B, T)
        B, L = input_ids.shape[0], int(width.sum(1).max())
        if left_pad:
            start += L - width.sum(1, keepdim=True)
        embeds = tok_embeds.new_zeros(B, L, tok_embeds.shape[-1])
        out_labels = input_ids.new_full((B, L), IGNORE)
        out_mask = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
        b, t = (pad_mask & ~is_image).nonzero(as_tuple=True)  # text tokens: one slot each
        embeds[b, start[b, t]], out_mask[b, start[b, t]] = tok_embeds[b, t], True
        if labels is not None:
            out_labels[b, start[b, t]] = labels[b, t]
        if feats is not None:  # placeholders in row-major order, the order the images come in
            b, t = is_image.nonzero(as_tuple=True)
            slots = start[b, t, None] + torch.arange(feats.shape[1], device=start.device)  # (M, N)
            embeds[b[:, None], slots], out_mask[b[:, None], slots] = feats.to(embeds.dtype), True
        return embeds, out_mask, out_labels

    def forward(self, input_ids, images=None, labels=None, pad_mask=None):
        """Training / reference pass. Returns (logits (B, T', V), loss or None)."""
        embeds, pad_mask, labels = self.splice(input_ids, images, labels, pad_mask)
        logits = self.llm(embeds=embeds, pad_mask=pad_mask)
        loss = None
        if labels is not None:  # next-token prediction: position t predicts label t+1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return logits, loss

    def prefill(self, input_ids, images=None, pad_mask=None, max_new_tokens=128, reuse_cache=False):
        """Encode the prompt into a fresh KV cache (or the last one, emptied: Llama.new_cache's reuse) ->
        (last logits (B, V), cache). Rows are left-padded so every row's last prompt token sits in the same
        slot; rows of different lengths are prefilled one at a time into their own row of the cache, after
        its padding: no padding is computed, and each row takes SDPA's causal fast path."""
        embeds, mask, _ = self.splice(input_ids, images, pad_mask=pad_mask, left_pad=True)
        B, L, _ = embeds.shape
        cache = self.llm.new_cache(B, L + max_new_tokens, reuse=reuse_cache)
        if mask.all():  # no padding: one batched pass
            return self.llm(embeds=embeds, cache=cache, last_only=True)[:, -1], cache
        logits = [self.llm(embeds=embeds[b:b + 1, L - n:], cache=cache.row(b, L - n), last_only=True)
                  for b, n in enumerate(mask.sum(-1).tolist())]  # (1, 1, V) each
        cache.pos.fill_(L)
        return torch.cat(logits)[:, -1], cache


# ---------------------------------------------------------------------------------------
# Building, saving and loading ours. Our checkpoints use our module names (model.state_dict()
# as it is, plus mra_config.json): no table, and FSDP/DDP state dicts match it.

def build(cfg, llm=None, vit=None, convnext=None, dtype=None, device="cpu"):
    """A fresh model for training: pretrained backbones from their own checkpoints (an HF
    LLaMA/Vicuna dir, an HF CLIP checkpoint, a timm/open_clip ConvNeXt), new adapters,
    fusion and projector. A backbone left as None is randomly initialised (tests, demo)."""
    if llm is not None:
        llm = Llama.from_pretrained(llm, dtype, device)
        cfg = replace(cfg, llm=llm.config)
    if vit is not None:
        vit = ViT.from_pretrained(vit, dtype=dtype, device=device)
        cfg = replace(cfg, vit=vit.config)
    if convnext is not None and cfg.arch == "llava-hr":
        convnext = ConvNeXt.from_pretrained(convnext, dtype=dtype, device=device)
        cfg = replace(cfg, convnext=convnext.config)
    with torch.device(device):  # only the parts not loaded are created (and initialised) here
        model = LlavaHR(cfg, llm, vit, convnext)
    return model.to(dtype) if dtype is not None else model


def save_checkpoint(model, path, state=None, cfg=None, tensors=None):
    """Our format: model.safetensors (our module names) + mra_config.json, each written atomically, tensor
    by tensor (no second copy of the model in memory). state / cfg: a state dict and config from elsewhere
    (FSDP) instead of the model's; tensors: state's data in order, made as written (gathered under FSDP)."""
    state = model.state_dict() if state is None else state
    cfg = model.cfg if cfg is None else cfg
    os.makedirs(path, exist_ok=True)
    def write_config(p):
        with open(p, "w") as f:  # closed (flushed) before the rename
            f.write(json.dumps(cfg.to_dict(), indent=1))
    for name, write in (("model.safetensors", lambda p: write_safetensors(p, state, tensors)),
                        ("mra_config.json", write_config)):
        tmp = os.path.join(path, name + ".tmp")
        write(tmp)
        os.replace(tmp, os.path.join(path, name))


def load_checkpoint(path, dtype=None, device="cpu", quantize=None):
    """Ours (mra_config.json) or a released LLaVA-HR / LLaVA-1.5 directory (release.load_release)."""
    path = os.fspath(path)
    run_directory(path)
    lora_adapters(path)
    ours = os.path.join(path, "mra_config.json")
    if not os.path.isfile(ours):
        import release  # here, not at the top: release.py builds its model from this file
        return release.load_release(path, dtype, device, quantize)
    cfg, quantized = read_config(ours, MRAConfig.from_dict), check_quantize(quantize)
    with torch.device("meta"):
        model = LlavaHR(cfg)
        if quantized:
            int8_linears(model.llm)
    int8 = {k for k, v in model.state_dict().items() if v.dtype == torch.int8}.__contains__
    check_memory(path, tensor_sizes(path), dtype, device, int8, quantized)
    convert = int8_reader(int8, dtype, device) if quantized else None
    return load_state(model, read_checkpoint(path, dtype, device, convert=convert), path, one_dtype=dtype is None)


def run_directory(path):
    """Refuse a train.py run directory given where its checkpoint (OUT/ckpt) is meant, naming that."""
    ckpt = os.path.join(path, "ckpt")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("mra_config.json", "config.json")) \
            and os.path.isfile(os.path.join(ckpt, "mra_config.json")):
        raise CheckpointError(f"{path}: a train.py run directory; its checkpoint is {ckpt}")


def lora_release(path):
    """Refuse a LoRA release (LLaVA-1.5's llava-v1.5-7b-lora) where a whole model is meant, naming the way."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise CheckpointError(f"{path}: a LoRA release (adapter_config.json), without its base LLM, tokenizer or CLIP "
                              f"tower; it loads whole with release.load_lora_release, as in generate.py --model {path} "
                              f"--model-base VICUNA_DIR --vit CLIP_DIR, or merge it once into a model of its own "
                              f"(for train.py --init): python release.py merge-lora {path} DST_DIR --model-base "
                              f"VICUNA_DIR --vit CLIP_DIR")


def lora_base(adapters):
    """The base model train.py's LoRA adapters (OUT/ckpt/lora) trained on, as their lora.json names it."""
    return read_config(os.path.join(adapters, "lora.json"), lambda d: d.get("base")) or "BASE"


def adapters_only(path):
    """A --lora-adapters-only run's checkpoint (no model; its adapters in lora/): that lora/ dir, else None."""
    adapters = os.path.join(path, "lora")
    whole = os.path.isfile(os.path.join(path, "mra_config.json"))
    return adapters if not whole and os.path.isfile(os.path.join(adapters, "lora.json")) else None


def lora_adapters(path):
    """Refuse train.py's LoRA adapters (OUT/ckpt/lora: lora.json) where a whole model is meant, naming their base."""
    if os.path.isfile(os.path.join(path, "lora.json")):  # its files would load as a model missing the LLM
        base = lora_base(path)
        raise CheckpointError(f"{path}: LoRA adapters (lora.json), not a whole model: apply them to their base, "
                              f"generate.py --model {base} --lora {path}, or train from it, train.py --init {base}")


def load_tokenizer(path):
    run_directory(path)
    lora_release(path)
    lora_adapters(path)
    return Tokenizer(os.path.join(path, "tokenizer.model"))
