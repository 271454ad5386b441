"""vit.py against transformers' CLIP vision model: every hidden state, at the trained size,
at resampled sizes, with the class token dropped, and the loader's failure modes."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from vit import VIT_PRESETS, ViT, ViTConfig, resize_pos_embed
from weights import CheckpointError

TOL = dict(atol=1e-5, rtol=1e-5)


def randomise(model, seed=0):
    """Random weights everywhere (LayerNorm gains and all biases too) so no layer is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def vision_config(image_size=42, hidden=128, heads=2, layers=3, eps=1e-5):
    # eager attention: the reference must not share our F.scaled_dot_product_attention path
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=14,
                            layer_norm_eps=eps, attn_implementation="eager")


def tiny_hf(seed=0, **kw):
    return randomise(CLIPVisionModel(vision_config(**kw)), seed)


def images(h, w, seed=1):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_matches_hf(vit, hf_vision, x):
    """Every hidden state and the pooled class token of HF's CLIPVisionTransformer."""
    with torch.no_grad():
        ref = hf_vision(pixel_values=x, output_hidden_states=True)
        hs = vit(x)
        pooled = vit.ln_post(hs[-1][:, 0])
    assert len(hs) == len(ref.hidden_states) == vit.config.layers + 1
    for ours, theirs in zip(hs, ref.hidden_states):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(pooled, ref.pooler_output, **TOL)


def test_presets_and_config_inference():
    cfg = ViTConfig.from_name("clip-vit-l-14-336")
    assert (cfg.grid, cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim) == (24, 1024, 24, 16, 4096)
    with pytest.raises(KeyError, match="clip-vit-h"):
        ViTConfig.from_name("clip-vit-h")
    for name in VIT_PRESETS:
        cfg = ViTConfig.from_name(name)
        with torch.device("meta"):  # real shapes, no memory
            state = ViT(cfg).state_dict()
        assert ViTConfig.from_shapes(state) == cfg, name
        hf = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size)
        assert ViTConfig.from_hf(hf.to_dict()) == cfg, name
        assert ViTConfig.from_hf(CLIPConfig(vision_config=hf.to_dict()).to_dict()) == cfg, name
    for width, mlp in ((1280, 5120), (1408, 6144), (1664, 8192)):  # LAION's H, g, bigG: 16 heads, not width / 64
        cfg = ViTConfig(image_size=224, patch_size=14, width=width, layers=2, heads=16, mlp_dim=mlp)
        with torch.device("meta"):
            assert ViTConfig.from_shapes(ViT(cfg).state_dict()) == cfg, width
    with pytest.raises(CheckpointError, match="gelu"):
        ViTConfig.from_hf({"hidden_act": "gelu"})


def test_parity_shape_inference(tmp_path):
    hf = tiny_hf()
    save_file(hf.state_dict(), tmp_path / "clip.safetensors")
    vit = ViT.from_pretrained(tmp_path / "clip.safetensors")
    assert vit.config == ViTConfig(image_size=42, patch_size=14, width=128, layers=3, heads=2, mlp_dim=256)
    assert_matches_hf(vit, hf.vision_model, images(42, 42))
    # an in-memory state dict goes the same way, and dtype is the caller's choice
    vit16 = ViT.from_pretrained(hf.state_dict(), dtype=torch.bfloat16)
    assert {p.dtype for p in vit16.parameters()} == {torch.bfloat16}


def test_parity_config_json(tmp_path):
    # head size 32 and eps 1e-6: shape inference would guess wrong, so this proves config.json is read
    hf = tiny_hf(heads=4, eps=1e-6)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    vit = ViT.from_pretrained(tmp_path)
    assert (vit.config.heads, vit.config.eps) == (4, 1e-6)
    assert_matches_hf(vit, hf.vision_model, images(42, 42))
    # the weights file itself, named: the config.json beside it is read (it was passed over, and 4 heads of
    # 32 loaded as 2 of 64: a different model, silently)
    vit = ViT.from_pretrained(tmp_path / "model.safetensors")
    assert (vit.config.heads, vit.config.eps) == (4, 1e-6)
    assert_matches_hf(vit, hf.vision_model, images(42, 42))
    # without one, a width whose head count no CLIP release fixes is refused, not guessed
    other = tmp_path / "other"
    other.mkdir()
    save_file(tiny_hf(hidden=96, heads=4).state_dict(), other / "clip.safetensors")
    with pytest.raises(CheckpointError, match="cannot tell the head count of a 96-wide ViT from its tensors"):
        ViT.from_pretrained(other / "clip.safetensors")


def test_full_clip_model_ignores_text_tower(tmp_path):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    cfg = CLIPConfig(text_config=text, vision_config=vision_config(heads=4).to_dict(), projection_dim=16)
    cfg._attn_implementation = "eager"
    clip = randomise(CLIPModel(cfg))
    clip.save_pretrained(tmp_path, safe_serialization=True)
    vit = ViT.from_pretrained(tmp_path)  # config.json holds a vision_config section
    assert vit.config.heads == 4
    assert_matches_hf(vit, clip.vision_model, images(42, 42))
    # the position_ids buffer older checkpoints carry is ignored too
    state = clip.state_dict() | {"vision_model.embeddings.position_ids": torch.arange(10)[None]}
    assert any(k.startswith("text_model.") for k in state)
    assert_matches_hf(ViT.from_pretrained(state, config=vit.config), clip.vision_model, images(42, 42))


def resample_reference(pos, gh, gw):
    """LLaVA-HR's (timm's) recipe, written out independently: fp32 bicubic + antialias, class entry kept."""
    side = math.isqrt(pos.shape[0] - 1)
    grid = pos[1:].float().T.reshape(1, -1, side, side)  # (1, d, s, s)
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], grid.reshape(-1, gh * gw).T.to(pos.dtype)])


def test_resize_pos_embed():
    pos = torch.randn(10, 8)  # 3x3 grid + class
    assert resize_pos_embed(pos, (3, 3)) is pos
    out = resize_pos_embed(pos, (4, 5))
    assert out.shape == (21, 8)
    torch.testing.assert_close(out, resample_reference(pos, 4, 5), atol=0, rtol=0)
    # and timm's own function (the release resamples as it does): the written-out recipe is checked too
    from timm.layers import resample_abs_pos_embed
    for size in ((4, 5), (32, 32), (2, 2)):
        timm_out = resample_abs_pos_embed(pos[None], list(size), [3, 3], num_prefix_tokens=1)[0]
        torch.testing.assert_close(resize_pos_embed(pos, size), timm_out, atol=0, rtol=0)
    # antialias changes the result even when upsampling (PIL's cubic kernel); drop it and this fails
    plain = F.interpolate(pos[1:].T.reshape(1, 8, 3, 3), size=(4, 5), mode="bicubic", align_corners=False)
    assert (out[1:] - plain.reshape(8, 20).T).abs().max() > 1e-2
    # low precision tables are resampled in fp32 and handed back in their own dtype
    half = pos.bfloat16()
    assert resize_pos_embed(half, (4, 5)).dtype == torch.bfloat16
    torch.testing.assert_close(resize_pos_embed(half, (4, 5)), resample_reference(half, 4, 5), atol=0, rtol=0)


def test_resampled_square_input_matches_hf_at_that_size():
    # trained at 42 px (3x3), run at 70 px (5x5): HF model built for 70 px holding the resampled table
    small = tiny_hf()
    state = small.state_dict()
    key = "vision_model.embeddings.position_embedding.weight"
    state[key] = resample_reference(state[key], 5, 5)
    big = CLIPVisionModel(vision_config(image_size=70)).eval()
    big.load_state_dict(state)
    vit = ViT.from_pretrained(small.state_dict())
    assert vit.config.image_size == 42
    assert_matches_hf(vit, big.vision_model, images(70, 70))


def hf_piecewise(vm, x, pos, keep_cls):
    """HF's modules run one at a time: patch conv, class token, `pos`, then (without the class
    token when keep_cls=False, as LLaVA-HR does) pre_layrnorm and each encoder layer."""
    emb = vm.embeddings
    patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)
    h = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1), patches], dim=1) + pos
    if not keep_cls:
        h = h[:, 1:]
    out = [vm.pre_layrnorm(h)]
    for layer in vm.encoder.layers:
        out.append(layer(out[-1], None, None)[0])
    return out


@pytest.mark.parametrize("keep_cls", [True, False])
def test_non_square_grid_and_dropped_class_token(keep_cls):
    hf = tiny_hf()
    vit = ViT.from_pretrained(hf.state_dict())
    x = images(56, 84)  # a 4x6 grid from the 3x3 table
    pos = resample_reference(hf.vision_model.embeddings.position_embedding.weight, 4, 6)
    with torch.no_grad():
        ref, hs = hf_piecewise(hf.vision_model, x, pos, keep_cls), vit(x, keep_cls=keep_cls)
    assert hs[-1].shape == (2, 24 + keep_cls, 128)
    for ours, theirs in zip(hs, ref, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_drop_class_token_at_trained_size_uses_hf_embeddings():
    hf = tiny_hf()
    vit = ViT.from_pretrained(hf.state_dict())
    vm, x = hf.vision_model, images(42, 42)
    with torch.no_grad():
        h = vm.pre_layrnorm(vm.embeddings(x)[:, 1:])  # HF's own embeddings, class token dropped
        ref = [h]
        for layer in vm.encoder.layers:
            ref.append(layer(ref[-1], None, None)[0])
        hs = vit(x, keep_cls=False)
        # the blocks are usable one at a time, as mra.py runs them around its adapters
        manual = vit.ln_pre(vit.embed(x)[:, 1:])
        for block in vit.blocks:
            manual = block(manual)
    for ours, theirs in zip(hs, ref, strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(manual, hs[-1], atol=0, rtol=0)


def test_trainable():
    vit = ViT.from_pretrained(tiny_hf().state_dict())
    vit(images(56, 56), keep_cls=False)[-1].square().mean().backward()
    grads = {n: p.grad for n, p in vit.named_parameters()}
    assert grads["ln_post.weight"] is None and grads["ln_post.bias"] is None  # not on this path
    assert grads["cls"].count_nonzero() == 0  # dropped before ln_pre, it never reaches the output
    # a key bias shifts all of a query's logits equally, which softmax ignores: gradient 0 up to rounding
    assert all(grads[f"blocks.{i}.k.bias"].abs().max() < 1e-6 for i in range(3))
    rest = [n for n in grads if not n.startswith(("ln_post", "cls")) and not n.endswith("k.bias")]
    assert all(grads[n] is not None and grads[n].abs().max() > 1e-4 for n in rest)


@pytest.mark.parametrize("with_config", [False, True])
def test_loader_errors_name_the_key(tmp_path, with_config):
    hf = tiny_hf()
    good = hf.state_dict()
    if with_config:
        hf.config.to_json_file(tmp_path / "config.json")

    def load(state):
        save_file(state, tmp_path / "model.safetensors")
        return ViT.from_pretrained(tmp_path)

    load(good)  # the untouched checkpoint loads in both layouts
    missing = {k: v for k, v in good.items() if k != "vision_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load(missing)
    extra = good | {"vision_model.encoder.layers.0.self_attn.qkv.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError, match=r"unexpected vision_model\.encoder\.layers\.0\.self_attn\.qkv\.weight"):
        load(extra)
    wrong = good | {"vision_model.encoder.layers.2.mlp.fc2.bias": torch.zeros(127)}
    with pytest.raises(CheckpointError, match=r"vision_model\.encoder\.layers\.2\.mlp\.fc2\.bias: model expects \(128,\), checkpoint has \(127,\)"):
        load(wrong)


def test_config_json_that_disagrees_with_the_weights(tmp_path):
    hf = tiny_hf()
    save_file(hf.state_dict(), tmp_path / "model.safetensors")
    vision_config(image_size=70).to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"vision_model\.embeddings\.position_embedding\.weight: model expects \(26, 128\), checkpoint has \(10, 128\)"):
        ViT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="llava"):
        ViT.from_pretrained(tmp_path)
