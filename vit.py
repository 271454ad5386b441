"""The CLIP vision transformer: LLaVA-HR's low-resolution ("fast") pathway.

A pre-LayerNorm ViT (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; Dosovitskiy et al. 2021 for the ViT itself) that loads
the HF `CLIPVisionModel` weights unchanged. LLaVA-HR (Luo et al. 2024, "Feast Your
Eyes", Sec. 4.2, 4.4) keeps it as is, with three changes that live here:

- in stage 2 it runs ViT-L/14-336 at 448 px, so the 24x24 position table is resampled
  to 32x32 (`resize_pos_embed`, bicubic *with antialias*, as in the released code);
- mra.py inserts MR-Adapters between the blocks (`encode`'s `after`), so the blocks are a
  plain `nn.ModuleList`; `forward` returns every hidden state, as HF does;
- the class token is dropped before ln_pre and every block (`encode(keep_cls=False)`), and the
  last block's output is used, without ln_post.

References: github.com/openai/CLIP (model.py), transformers' modeling_clip.py,
github.com/luogen1996/LLaVA-HR (clip_encoder.py).
"""
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import CheckpointError, check_positive, load_state, read_checkpoint, read_config, remap


@dataclass
class ViTConfig:
    image_size: int = 336  # the size the position table was trained at
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    eps: float = 1e-5

    def __post_init__(self):
        # a config file's fields must fail here, named, not as a shape error in the first forward
        check_positive(self, ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim"), ("eps",), "vit.")
        if self.width % self.heads:
            raise ValueError(f"vit: {self.heads} heads do not divide width {self.width}")
        if self.image_size < self.patch_size:
            raise ValueError(f"vit.image_size {self.image_size} is below one patch of {self.patch_size}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @classmethod
    def from_name(cls, name):
        if name not in VIT_PRESETS:
            raise KeyError(f"unknown ViT preset {name!r}; known: {', '.join(VIT_PRESETS)}")
        return cls(**VIT_PRESETS[name])

    @classmethod
    def from_hf(cls, cfg):
        """From a parsed HF config.json: CLIPVisionConfig, or CLIPConfig with `vision_config`."""
        cfg = cfg.get("vision_config", cfg)
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise CheckpointError(f"hidden_act {cfg['hidden_act']!r}: this ViT implements quick_gelu only")
        # the defaults are CLIPVisionConfig's, which save_pretrained may leave out
        return cls(image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 32),
                   width=cfg.get("hidden_size", 768), layers=cfg.get("num_hidden_layers", 12),
                   heads=cfg.get("num_attention_heads", 12), mlp_dim=cfg.get("intermediate_size", 3072),
                   eps=cfg.get("layer_norm_eps", 1e-5))

    @classmethod
    def from_shapes(cls, state):
        """Infer the architecture from tensor shapes (our key names). Shapes do not give the
        head count: OpenAI's CLIP ViTs have heads of 64 (B: 768 / 12, L: 1024 / 16), LAION's H, g and
        bigG 16 heads (1280, 1408, 1664 wide); another width needs a config. A truncated checkpoint
        reads as a shallower model; a config (or config.json beside the weights) rules that out."""
        for key in ("patch.weight", "pos", "blocks.0.fc1.weight"):
            if key not in state:
                raise CheckpointError(f"cannot infer the ViT shape: no tensor for {key}")
        width, _, patch, _ = state["patch.weight"].shape  # (d, 3, p, p)
        side = math.isqrt(state["pos"].shape[0] - 1)  # the table is (1 + side*side, d)
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        heads = {1280: 16, 1408: 16, 1664: 16}.get(width, width // 64 if width % 64 == 0 else None)
        if not heads:
            raise CheckpointError(f"cannot tell the head count of a {width}-wide ViT from its tensors: load it "
                                  f"from its directory (with its config.json), or pass a config")
        return cls(image_size=side * patch, patch_size=patch, width=width, layers=layers,
                   heads=heads, mlp_dim=state["blocks.0.fc1.weight"].shape[0])


VIT_PRESETS = {
    "clip-vit-l-14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
    "clip-vit-l-14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
    "clip-vit-b-16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072),
}


def resize_pos_embed(pos, grid):
    """Resample a (1 + s*s, d) position table to a (gh, gw) patch grid: (1 + gh*gw, d).

    LLaVA-HR uses timm's recipe: bicubic with antialias, in fp32, class entry kept. The antialias
    flag matters even when upsampling: torch's antialiased bicubic uses PIL's kernel (a = -0.5)
    instead of a = -0.75, so this is *not* the table HF's `interpolate_pos_encoding` would give."""
    n, d = pos.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(f"position table of {n} entries is not 1 + a square grid")
    if tuple(grid) == (side, side):
        return pos
    table = pos[1:].float().reshape(1, side, side, d).permute(0, 3, 1, 2)  # (1, d, s, s)
    table = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True, align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)  # (gh*gw, d)
    return torch.cat([pos[:1], table.to(pos.dtype)])


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d, eps=cfg.eps)
        self.q, self.k, self.v, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)

    def attn(self, x):
        B, N, d = x.shape
        q, k, v = (f(x).view(B, N, self.heads, d // self.heads).transpose(1, 2)  # (B, h, N, d/h)
                   for f in (self.q, self.k, self.v))
        # softmax(q k^T / sqrt(d/h)) v over all tokens: no mask, every patch sees every patch
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d/h)
        return self.out(y.transpose(1, 2).reshape(B, N, d))  # (B, N, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        h = self.fc1(self.ln2(x))
        # quick_gelu, the sigmoid approximation of GELU that OpenAI trained CLIP with
        return x + self.fc2(h * torch.sigmoid(1.702 * h))


# HF CLIPVisionModel module -> ours; each module has a .weight and a .bias
_HF_MODULES = [
    ("pre_layrnorm", "ln_pre"),
    ("encoder.layers.{i}.layer_norm1", "blocks.{i}.ln1"),
    ("encoder.layers.{i}.self_attn.q_proj", "blocks.{i}.q"),
    ("encoder.layers.{i}.self_attn.k_proj", "blocks.{i}.k"),
    ("encoder.layers.{i}.self_attn.v_proj", "blocks.{i}.v"),
    ("encoder.layers.{i}.self_attn.out_proj", "blocks.{i}.out"),
    ("encoder.layers.{i}.layer_norm2", "blocks.{i}.ln2"),
    ("encoder.layers.{i}.mlp.fc1", "blocks.{i}.fc1"),
    ("encoder.layers.{i}.mlp.fc2", "blocks.{i}.fc2"),
    ("post_layernorm", "ln_post"),
]
HF_KEYS = [
    ("vision_model.embeddings.class_embedding", "cls"),
    ("vision_model.embeddings.patch_embedding.weight", "patch.weight"),
    ("vision_model.embeddings.position_embedding.weight", "pos"),
] + [(f"vision_model.{theirs}.{p}", f"{ours}.{p}") for theirs, ours in _HF_MODULES for p in ("weight", "bias")]
# a whole CLIPModel also holds the text tower and both projections; position_ids is a
# buffer older transformers versions saved
HF_IGNORE = [r"text_model\.", r"(text|visual)_projection\.", r"logit_scale$",
             r"vision_model\.embeddings\.position_ids$"]


def clip_config(src):
    """The ViTConfig of a CLIP checkpoint's config.json (a directory's; a file's: the one beside it, if it
    is a CLIP one), else None. A directory whose config.json is another model's is refused."""
    beside = not os.path.isdir(src)
    config_json = os.path.join(os.path.dirname(src) if beside else src, "config.json")
    if not os.path.isfile(config_json):
        return None
    kind = read_config(config_json).get("model_type")
    if kind in ("clip", "clip_vision_model"):
        return read_config(config_json, ViTConfig.from_hf)
    if not beside:
        raise CheckpointError(f"{config_json}: model_type {kind!r} is not a CLIP model")
    return None


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        d = cfg.width
        self.patch = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(d))
        self.pos = nn.Parameter(torch.zeros(1 + cfg.grid ** 2, d))
        self.ln_pre = nn.LayerNorm(d, eps=cfg.eps)  # HF: pre_layrnorm (sic)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(d, eps=cfg.eps)  # only for CLIP's pooled class token; LLaVA never uses it

    def embed(self, x):
        """Images (B, 3, H, W) -> class token + patch tokens with positions (B, 1+N, d)."""
        x = self.patch(x.to(self.patch.weight.dtype))  # (B, d, gh, gw)
        B, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, d)
        x = torch.cat([self.cls.expand(B, 1, d), x], dim=1)  # (B, 1+N, d)
        return x + resize_pos_embed(self.pos, (gh, gw))

    def encode(self, x, keep_cls=True, depth=None, after=None):
        """Images (B, 3, H, W) -> the output after `blocks[:depth]` (default: all; depth=-1 stops one
        short, HF's hidden_states[-2]), (B, [1+]N, d).
        keep_cls=False drops the class token before ln_pre, so attention never sees it (LLaVA-HR).
        after: {i: f}: f(x) replaces block i's output (i = 0: ln_pre's; HF's hidden_states index)
        before the next block runs: mra.py puts its MR-Adapters here."""
        x = self.embed(x)
        if not keep_cls:
            x = x[:, 1:]  # (B, N, d)
        for i, layer in enumerate([self.ln_pre, *self.blocks[:depth]]):
            x = layer(x)
            if after and i in after:
                x = after[i](x)
        return x

    def forward(self, x, keep_cls=True):
        """Hidden states as HF lists them: [ln_pre output, block 1 output, ..., block L output].
        LLaVA-1.5 uses hs[-2][:, 1:], LLaVA-HR (keep_cls=False) hs[-1], no ln_post, despite the
        `mm_vision_select_layer: -2` its config.json carries; mra.py calls `encode` for them."""
        hidden = []  # each slot's hook keeps h and hands it on unchanged (append returns None: "or h")
        self.encode(x, keep_cls, after=dict.fromkeys(range(len(self.blocks) + 1), lambda h: hidden.append(h) or h))
        return hidden

    @classmethod
    def from_pretrained(cls, src, config=None, dtype=None, device="cpu"):
        """Load HF CLIPVisionModel or CLIPModel weights (a safetensors or .bin file; a directory, its
        safetensors or else its pytorch_model*.bin as for the LLM, since HF's CLIP repos may ship only
        the .bin; or a {key: tensor} dict with `vision_model.*` keys). The config comes from `config`,
        else the directory's config.json (a file's: a CLIP config.json beside it), else the tensor
        shapes; dtype defaults to the checkpoint's."""
        if isinstance(src, dict):
            tensors, source = src, "CLIP ViT tensors"
        else:
            source = os.fspath(src)
            skip = [re.compile(p) for p in HF_IGNORE]
            config = config or clip_config(source)  # before the weights: another model's dir is not read
            tensors = read_checkpoint(source, dtype, device, keep=lambda k: not any(p.match(k) for p in skip))
        state, unexpected = remap(tensors, HF_KEYS, HF_IGNORE)
        state = {k: t.to(device, dtype if t.is_floating_point() else None) for k, t in state.items()}
        config = config or ViTConfig.from_shapes(state)
        with torch.device("meta"):
            model = cls(config)
        return load_state(model, state, source, unexpected, HF_KEYS, one_dtype=dtype is None)
