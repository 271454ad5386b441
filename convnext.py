"""ConvNeXt: the high-resolution pathway of LLaVA-HR.

LLaVA-HR (paper Sec. 4.2, "Dual Visual Pathways") encodes the 1024 x 1024 image with
a CLIP-trained ConvNeXt whose stride of 32 yields the same 32 x 32 grid that the ViT
gives at 448 px; only the stage-4 map is used, with no final norm and no head.
LLaVA-HR-7B uses `convnext_large_mlp`, LLaVA-HR-X `convnext_xxlarge`.

References: Liu et al. 2022, "A ConvNet for the 2020s" (arXiv 2201.03545); timm's
`timm/models/convnext.py`, whose keys the released weights use; open_clip's
`TimmModel`, which holds the same trunk under `visual.trunk.`.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import CheckpointError, check_positive, load_state, read_checkpoint, remap


@dataclass
class ConvNeXtConfig:
    depths: tuple = (3, 3, 27, 3)        # blocks per stage
    dims: tuple = (192, 384, 768, 1536)  # channels per stage
    eps: float = 1e-6                    # of every LayerNorm; not stored in the weights

    def __post_init__(self):
        # a config file's fields must fail here, named, not as a shape error in the first forward
        for name in ("depths", "dims"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and value and
                    all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
                raise ValueError(f"convnext.{name} is {value!r}, expected a list of positive whole numbers")
        if len(self.depths) != len(self.dims):
            raise ValueError(f"convnext: {len(self.depths)} depths for {len(self.dims)} dims, one of each per stage")
        check_positive(self, real=("eps",), prefix="convnext.")

    @classmethod
    def from_name(cls, name):
        return cls(**CONVNEXT_PRESETS[name])

    @classmethod
    def from_shapes(cls, state, name=None):
        """Depths and widths read off a state dict in our key names; eps from a preset."""
        found = (re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", k) for k in state)
        blocks = [(int(m[1]), int(m[2])) for m in found if m]
        if not blocks:
            raise CheckpointError("no ConvNeXt blocks (stages.{i}.blocks.{j}.*) in the checkpoint")
        n = 1 + max(i for i, _ in blocks)
        depths = tuple(1 + max((j for s, j in blocks if s == i), default=-1) for i in range(n))
        try:  # the depthwise conv of a stage's first block is (C_i, 1, 7, 7)
            dims = tuple(state[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(n))
        except KeyError as e:
            raise CheckpointError(f"cannot read the stage widths: missing {e.args[0]}") from None
        # eps is not in the weights: timm builds convnext_xxlarge with 1e-5 and the rest with 1e-6
        if name is not None:
            return cls(depths, dims, cls.from_name(name).eps)
        return cls(depths, dims, next((p["eps"] for p in CONVNEXT_PRESETS.values() if p["dims"] == dims), 1e-6))


CONVNEXT_PRESETS = {
    "convnext_large_mlp": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), eps=1e-6),
    "convnext_xxlarge": dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), eps=1e-5),
}
# The weights the release starts from. Its scripts name a tag (--vision_tower_slow
# convnext_large_mlp.clip_laion2b_ft_320), but its code hands that string to timm as the truthy
# `pretrained` flag, so timm loads the architecture's *default* tag instead; the released
# stage-1 projector was trained on (and only fits) these weights.
RELEASE_WEIGHTS = {"convnext_large_mlp": "convnext_large_mlp.clip_laion2b_soup_ft_in12k_in1k_320",
                   "convnext_xxlarge": "convnext_xxlarge.clip_laion2b_soup_ft_in1k"}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (stem and downsamplers)."""

    def forward(self, x):
        # (B, C, H, W) -> (B, H, W, C) -> normalise C -> back to (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """dwconv 7x7 -> LN -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> layer scale, + x."""

    def __init__(self, dim, eps):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)  # spatial mixing
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, 4 * dim)  # the inverted bottleneck mixes channels per pixel
        self.fc2 = nn.Linear(4 * dim, dim)
        # layer scale starts near zero so each block starts close to the identity (ConvNeXt, after CaiT)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C): channels last for LN and Linear
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))  # exact (erf) GELU, as timm
        return x + (self.gamma * y).permute(0, 3, 1, 2)  # (B, C, H, W)


class Stage(nn.Module):
    """An optional 2x downsample (LN, then 2x2 stride-2 conv), then `depth` blocks."""

    def __init__(self, c_in, c_out, depth, eps, downsample):
        super().__init__()
        self.downsample = downsample
        if downsample:
            # normalise before the strided conv: the ConvNeXt paper found training unstable without it
            self.down_norm = LayerNorm2d(c_in, eps=eps)
            self.down_conv = nn.Conv2d(c_in, c_out, kernel_size=2, stride=2)
        self.blocks = nn.Sequential(*(Block(c_out, eps) for _ in range(depth)))

    def forward(self, x):
        if self.downsample:
            x = self.down_conv(self.down_norm(x))  # (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        return self.blocks(x)


class ConvNeXt(nn.Module):
    """Patchify stem, then four stages at strides 4, 8, 16, 32; no final norm, no head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c = config.dims
        # "patchify" stem: non-overlapping 4x4 patches, like a ViT patch embedding
        self.stem_conv = nn.Conv2d(3, c[0], kernel_size=4, stride=4)
        self.stem_norm = LayerNorm2d(c[0], eps=config.eps)
        self.stages = nn.ModuleList(Stage(c[i - 1] if i else c[0], c[i], d, config.eps, downsample=i > 0)
                                    for i, d in enumerate(config.depths))

    def forward(self, x):
        """(B, 3, H, W) -> one map per stage, (B, C_i, H / (4 * 2^i), W / (4 * 2^i))."""
        x = self.stem_norm(self.stem_conv(x))  # (B, C_0, H/4, W/4)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats  # LLaVA-HR uses feats[-1]: stride 32, no final norm

    @classmethod
    def from_pretrained(cls, src, name=None, dtype=None, device="cpu"):
        """Load timm, open_clip or LLaVA-HR ConvNeXt weights (a safetensors or .bin path or dir, or a dict).

        Depths and widths come from the tensor shapes; `name` (a preset) only supplies the LayerNorm
        eps, which otherwise comes from the preset whose widths match. A dict's tensors are adopted as
        the parameters (no copy) unless dtype/device differ."""
        if isinstance(src, dict):
            table, ignore = _layout(src.keys())
            tensors, source = src, "ConvNeXt tensors"
        else:
            names = []  # first pass reads the headers only: append() returns None, so keep() drops all
            read_checkpoint(src, keep=names.append)
            table, ignore = _layout(names)
            # skip what the layout ignores (an open_clip text tower) instead of reading it into memory
            tensors = read_checkpoint(src, dtype, device, keep=lambda k: not any(re.match(p, k) for p in ignore))
            source = str(src)
        state, unexpected = remap(tensors, table, ignore)
        state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
        with torch.device("meta"):  # no random init, no second copy: load_state adopts the tensors
            model = cls(ConvNeXtConfig.from_shapes(state, name))
        return load_state(model, state, source, unexpected, table, one_dtype=dtype is None)


# timm module -> ours; each has a .weight and a .bias. The layer-scale vector is added in _layout.
TIMM_KEYS = [
    ("stem.0", "stem_conv"),
    ("stem.1", "stem_norm"),
    ("stages.{i}.downsample.0", "stages.{i}.down_norm"),
    ("stages.{i}.downsample.1", "stages.{i}.down_conv"),
    ("stages.{i}.blocks.{j}.conv_dw", "stages.{i}.blocks.{j}.conv_dw"),
    ("stages.{i}.blocks.{j}.norm", "stages.{i}.blocks.{j}.norm"),
    ("stages.{i}.blocks.{j}.mlp.fc1", "stages.{i}.blocks.{j}.fc1"),
    ("stages.{i}.blocks.{j}.mlp.fc2", "stages.{i}.blocks.{j}.fc2"),
]


def _layout(keys):
    """The key table and ignore patterns for the layout `keys` come in: timm, open_clip or LLaVA-HR."""
    keys = list(keys)
    # open_clip keeps the timm trunk under visual.trunk., beside its text tower, head and logit_scale
    prefix = "visual.trunk." if any(k.startswith("visual.trunk.") for k in keys) else ""
    # the LLaVA-HR release stores timm's layer-scale `gamma` as `stages.{i}.blocks.{j}.weight`
    gamma = "weight" if any(re.search(r"blocks\.\d+\.weight$", k) for k in keys) else "gamma"
    table = [(f"{prefix}{theirs}.{p}", f"{ours}.{p}") for theirs, ours in TIMM_KEYS for p in ("weight", "bias")]
    table.append((prefix + "stages.{i}.blocks.{j}." + gamma, "stages.{i}.blocks.{j}.gamma"))
    ignore = ["^" + re.escape(prefix) + r"head\."]  # the classifier head: LLaVA-HR uses the raw stage-4 map
    if prefix:
        ignore.append(r"^(?!visual\.trunk\.)")  # everything outside the image trunk
    return table, ignore
