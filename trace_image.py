"""One image from pixels to the LLM's input, step by step: `python generate.py --trace`.

Forward hooks on the real model print what each part receives and returns (both towers'
inputs, every ConvNeXt stage, the ViT's tokens, each MR-Adapter's gate value, the fusion,
the projector, the prompt and the spliced LLM input), so the numbers are the model's own.
`paths_picture` draws what each path sees of the image (README: examples/paths.png), and
`write_new` writes it as a new file.
"""
import errno
import io
import math
import os

import numpy as np
import torch

import data
import mra


def shape(t):
    return "x".join(map(str, t.shape))


def trace(model, tok, image, ids):
    """Run `ids` (one <image> placeholder) with `image` (PIL) through `model`, printing each step.
    Returns the LLM's input embeddings (1, T', H)."""
    c, enc, R = model.cfg, model.encoder, model.cfg.image_size
    x = data.preprocess(image, R, c.image_aspect_ratio)[None]  # (1, 3, R, R)
    print(f"image: {image.size[0]}x{image.size[1]} -> {c.image_aspect_ratio} to a square, resized to R = {R}, "
          f"CLIP-normalised: {shape(x)}")
    seen, hooks = [], []  # hooks only record: formatting waits until the forward is done

    def record(module, label):
        hooks.append(module.register_forward_hook(lambda m, i, o: seen.append((label, i[0], o))))
    if c.arch == "llava-hr":
        for k, stage in enumerate(enc.convnext.stages, 1):
            record(stage, f"ConvNeXt stage {k}")
        for k, (after, adapter) in enumerate(zip(enc.adapter_after, enc.adapters), 1):
            record(adapter, f"MR-Adapter {k}, after ViT block {after}")
            if adapter.gate is not None:
                record(adapter.gate, f"gate {k}")
    record(enc.vit.patch, "ViT patches")
    record(enc.vit.ln_pre, "ViT tokens")
    record(enc, "vision encoder" + (" (after the final fusion)" if c.arch == "llava-hr" else ""))
    record(model.projector, "projector")
    try:
        with torch.no_grad():
            weight = model.projector[0].weight
            embeds, _, _ = model.splice(torch.tensor([ids], device=weight.device), x.to(weight))
    finally:
        for h in hooks:
            h.remove()
    last_stage, L, gate = f"ConvNeXt stage {len(c.convnext.dims)}", c.vit.layers, None
    for label, i, o in seen:
        if label.startswith("ConvNeXt"):
            print(f"  high-res path, {label}: {shape(o)} (stride {R // o.shape[-1]})"
                  + (": F_vh, read by every MR-Adapter and the fusion" if label == last_stage else ""))
        elif label == "ViT patches":
            S = i.shape[-1]
            why = (f"S = max(R / 32 * {c.vit.patch_size}, {c.vit_min_size}) = {S}, a bilinear resize of the "
                   f"normalised R x R tensor" if c.arch == "llava-hr" else "S = R: the ViT alone (LLaVA-1.5)")
            print(f"  low-res path, ViT input: {shape(i)} ({why}) -> {o.shape[-2]}x{o.shape[-1]} patches of "
                  f"{c.vit.patch_size} px")
        elif label == "ViT tokens":
            print(f"  ViT tokens into block 1: {shape(o)} " + ("(class token dropped); the output of block "
                  f"{L} is used, no post-norm" if c.arch == "llava-hr" else f"(class token kept); the output of "
                  f"block {L - 1} of {L} is used, class token then dropped"))
        elif label.startswith("gate"):  # runs inside its adapter: shown after the adapter's line
            gate = (torch.tanh(o) if c.gate == "tanh" else torch.sigmoid(o)).flatten()[0].item()
        elif label.startswith("MR-Adapter"):
            print(f"  {label}: {shape(i)} + f_l + g * f_h(F_vh aligned to {i.shape[1]} tokens) -> {shape(o)}")
            if gate is not None:
                print(f"    g = {c.gate}(W2 GELU(W1 f_v)) = {gate:+.4f}")
        else:
            print(f"  {label} output: {shape(o)}")
    n = c.visual_tokens
    print(f"visual tokens: {n} (the ViT's {math.isqrt(n)}x{math.isqrt(n)} grid)")
    where = ids.index(mra.IMAGE_TOKEN)
    print(f"prompt: {len(ids)} ids, <image> placeholder (id {mra.IMAGE_TOKEN}) at position {where}: {ids}")
    print(f"  text before it: {tok.decode(ids[:where])!r}")
    print(f"  text after it: {tok.decode(ids[where + 1:])!r}")
    print(f"LLM input: {len(ids)} ids - 1 placeholder + {n} visual tokens = {embeds.shape[1]} positions: "
          f"{shape(embeds)}")
    return embeds


def paths_picture(image, model):
    """What each path sees of `image` through the real preprocessing, all shown at R x R (top:
    the whole image; bottom: its top-left corner, 4x). LLaVA-HR: the ConvNeXt's R x R input,
    the S x S ViT input resized from it (bilinear, no antialias), and the S x S image LLaVA-1.5
    would be given for the same token count (bicubic with antialias). LLaVA-1.5: its R x R input."""
    from PIL import Image
    c, R = model.cfg, model.cfg.image_size
    mean, std = torch.tensor(data.CLIP_MEAN)[:, None, None], torch.tensor(data.CLIP_STD)[:, None, None]
    full = data.preprocess(image, R, c.image_aspect_ratio)
    panels = [full]
    if c.arch == "llava-hr":
        low = model.encoder.low_res(full[None])[0]
        panels += [low, data.preprocess(image, low.shape[-1], c.image_aspect_ratio)]
    panels = [Image.fromarray((p * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
              .resize((R, R), Image.NEAREST) for p in panels]
    crops = [p.crop((0, 0, R // 4, R // 4)).resize((R, R), Image.NEAREST) for p in panels]
    grid = np.concatenate([np.concatenate([np.asarray(p) for p in row], 1) for row in (panels, crops)], 0)
    return Image.fromarray(grid)


def write_new(picture, path):
    """--trace's picture, written whole or not at all, and only as a new file: never over one that
    appeared while the model ran (another run's trace)."""
    from PIL import Image
    encoded = io.BytesIO()
    picture.save(encoded, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])
    made = False
    try:
        with open(path, "xb") as f:
            made = True
            f.write(encoded.getvalue())
    except FileExistsError:
        raise data.DataError(f"--trace {path}: appeared while the model ran (another run's picture?), and is kept; "
                             f"name another picture") from None
    except BaseException as e:  # a full disk, a folder gone read-only, Ctrl-C: no picture cut short is left
        if made:
            os.remove(path)
        if not isinstance(e, OSError):
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        way = "free some space, or name another place" if full else "name another place"
        raise data.DataError(f"--trace {path}: cannot be written ({e.strerror or e}), and nothing is left there; "
                             f"{way}") from None
