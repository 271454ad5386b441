"""The MR-Adapter and its parts, the encoders' token counts, splicing, our checkpoint format."""
import pytest
import torch
import torch.nn.functional as F

import mra
from convnext import ConvNeXtConfig
from llama import LlamaConfig
from mra import IGNORE, IMAGE_TOKEN, MRAConfig, MRAdapter, align
from vit import ViTConfig


def tiny_cfg(**kw):
    base = dict(image_size=256, vit_min_size=112,
                vit=ViTConfig(image_size=112, patch_size=14, width=32, layers=4, heads=1, mlp_dim=64),
                convnext=ConvNeXtConfig(depths=(1, 1, 1, 1), dims=(8, 16, 24, 40)),
                llm=LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=256))
    return MRAConfig(**base | kw)


def randomise(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def test_adapter_starts_as_identity():
    torch.manual_seed(0)
    ad = MRAdapter(32, 40)
    x, slow = torch.randn(2, 64, 32), torch.randn(2, 40, 16, 16)
    assert torch.equal(ad(x, slow), x)
    # the identity comes from zero output projections, not from a dead path: gradients flow
    ad(x, slow).square().sum().backward()
    assert ad.fast_proj.weight.grad.abs().sum() > 0 and ad.slow_proj.weight.grad.abs().sum() > 0


def test_adapter_matches_equations_3_and_4():
    ad = randomise(MRAdapter(32, 40))
    x, slow = torch.randn(2, 16, 32), torch.randn(2, 40, 8, 8)
    grid = x.transpose(1, 2).reshape(2, 32, 4, 4)
    f = x + F.conv2d(F.gelu(F.conv2d(grid, ad.fast_conv.weight, ad.fast_conv.bias, padding=3, groups=32)),
                     ad.fast_proj.weight, ad.fast_proj.bias).flatten(2).transpose(1, 2)
    h = F.conv2d(F.gelu(F.conv2d(slow, ad.slow_conv.weight, ad.slow_conv.bias)), ad.slow_proj.weight, ad.slow_proj.bias)
    h = F.avg_pool2d(h, 2).flatten(2).transpose(1, 2)  # 8x8 high-res map -> 4x4 low-res grid
    pooled = torch.cat([f, h], -1).mean(1)
    g = ad.gate[2](F.gelu(ad.gate[0](pooled)))  # (B, 1): one scalar per image, as released
    assert g.shape == (2, 1)
    torch.testing.assert_close(ad(x, slow), f + torch.tanh(g)[:, :, None] * h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", ["sigmoid", "none"])
def test_gate_variants(gate):
    ad = randomise(MRAdapter(32, 40, gate=gate))
    x, slow = torch.randn(2, 16, 32), torch.randn(2, 40, 4, 4)
    ref = randomise(MRAdapter(32, 40, gate="tanh"))
    if gate == "none":
        assert ad.gate is None
        ref.gate = None  # same f_l and f_h, no gate at all: out = f + f_h
        torch.testing.assert_close(ad(x, slow), ref(x, slow))
    else:  # same weights, only the activation differs
        ref.load_state_dict(ad.state_dict())
        f_h = ad(x, slow)
        ref.act = "sigmoid"
        torch.testing.assert_close(f_h, ref(x, slow))
        ref.act = "tanh"
        assert not torch.allclose(f_h, ref(x, slow))
    with pytest.raises(ValueError, match="gate must be"):
        MRAdapter(32, 40, gate="relu")


def test_align_up_down_equal_and_refused():
    x = torch.randn(2, 5, 4, 4)
    up = align(x, 64)  # 4x4 -> 8x8, bilinear with align_corners: corners are kept exactly
    assert up.shape == (2, 64, 5)
    up_map = up.transpose(1, 2).reshape(2, 5, 8, 8)
    torch.testing.assert_close(up_map[..., 0, 0], x[..., 0, 0])
    torch.testing.assert_close(up_map[..., -1, -1], x[..., -1, -1])
    torch.testing.assert_close(up, F.interpolate(x, (8, 8), mode="bilinear", align_corners=True).flatten(2).transpose(1, 2))
    down = align(x, 4)  # 4x4 -> 2x2: mean of each 2x2 block
    torch.testing.assert_close(down[:, 0], x[..., :2, :2].mean((-1, -2)))
    assert torch.equal(align(x, 16), x.flatten(2).transpose(1, 2))
    # R=512 in the release: ConvNeXt 16x16 = 256 tokens vs ViT 24x24 = 576: neither divides
    with pytest.raises(ValueError, match="cannot align a 16x16 map to 576 tokens"):
        align(torch.randn(1, 3, 16, 16), 576)
    with pytest.raises(ValueError, match="cannot align"):
        align(torch.randn(1, 3, 6, 6), 16)  # 36 vs 16


def test_align_upsamples_in_fp32():
    x = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)
    ref = F.interpolate(x.float(), (8, 8), mode="bilinear", align_corners=True).to(torch.bfloat16)
    assert torch.equal(align(x, 64), ref.flatten(2).transpose(1, 2))


def test_compiled_adapter_equals_eager():
    # DualEncoder compiles its adapters only on CUDA; compiling one here on the CPU proves the
    # traced graph computes the same function, forward and backward
    ad = randomise(MRAdapter(32, 40))
    x, slow = torch.randn(2, 16, 32), torch.randn(2, 40, 8, 8)
    eager, compiled = [(x.clone().requires_grad_(), slow.clone().requires_grad_()) for _ in range(2)]
    out = ad(*eager)
    out_c = torch.compile(ad, dynamic=False)(*compiled)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    out_c.sum().backward()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("R,tokens", [(384, 576), (768, 576), (1024, 1024), (1536, 2304)])
def test_visual_tokens_llava_hr(R, tokens):
    assert mra.visual_tokens("llava-hr", R) == tokens
    # and the ConvNeXt grid aligns to it (R / 32 squared divides or is divided by the count)
    align(torch.zeros(1, 1, R // 32, R // 32), tokens)


@pytest.mark.parametrize("R,tokens", [(336, 576), (448, 1024), (672, 2304), (1022, 5329)])
def test_visual_tokens_llava_15(R, tokens):
    assert mra.visual_tokens("llava-1.5", R) == tokens


def test_encoders_produce_the_counted_tokens():
    torch.manual_seed(0)
    for cfg, R in [(tiny_cfg(), 256), (tiny_cfg(adapters=False, image_size=128), 128),
                   (tiny_cfg(arch="llava-1.5", image_size=112), 112)]:
        model = mra.build(cfg)
        feats = model.encode_images(torch.randn(2, 3, R, R))
        assert feats.shape == (2, mra.visual_tokens(cfg.arch, R, cfg.vit_min_size), cfg.llm.dim)
    assert len(mra.build(tiny_cfg(adapters=False)).encoder.adapters) == 0
    assert len(mra.build(tiny_cfg()).encoder.adapters) == 3


def test_adapters_go_after_each_quarter_of_the_vit():
    model = mra.build(tiny_cfg(vit=ViTConfig(image_size=112, patch_size=14, width=32, layers=8, heads=1, mlp_dim=64)))
    calls = []
    for i, block in enumerate(model.encoder.vit.blocks, 1):
        block.register_forward_hook(lambda *_, i=i: calls.append(f"layer{i}"))
    for k, ad in enumerate(model.encoder.adapters):
        ad.register_forward_hook(lambda *_, k=k: calls.append(f"adapter{k}"))
    model.encoder(torch.randn(1, 3, 256, 256))
    assert calls == ["layer1", "layer2", "adapter0", "layer3", "layer4", "adapter1",
                     "layer5", "layer6", "adapter2", "layer7", "layer8"]


def test_splice_places_features_and_masks_labels():
    torch.manual_seed(0)
    model = mra.build(tiny_cfg())
    ids = torch.tensor([[1, 5, IMAGE_TOKEN, 7, 8], [1, 9, 10, 11, 0]])
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    images = torch.randn(1, 3, 256, 256)
    embeds, mask, labels = model.splice(ids, images, labels=ids, pad_mask=pad)
    N = mra.visual_tokens("llava-hr", 256, 112)
    assert embeds.shape[1] == 4 + N and mask[0].all() and mask[1].sum() == 4
    torch.testing.assert_close(embeds[0, 2:2 + N], model.encode_images(images)[0])
    torch.testing.assert_close(embeds[0, 2 + N:], model.llm.embed(torch.tensor([7, 8])))
    assert (labels[0, 2:2 + N] == IGNORE).all() and labels[0, 2 + N:].tolist() == [7, 8]
    assert labels[1, :4].tolist() == [1, 9, 10, 11] and (labels[1, 4:] == IGNORE).all()
    # generation pads on the left, so the last prompt token of every row shares a slot
    _, left_mask, _ = model.splice(ids, images, pad_mask=pad, left_pad=True)
    assert left_mask[:, -1].all() and not left_mask[1, 0]
    with pytest.raises(ValueError, match="1 <image> placeholders but 2 images"):
        model.splice(ids, torch.randn(2, 3, 256, 256))


@pytest.mark.parametrize("left_pad", [False, True])
def test_splice_equals_a_row_by_row_reference(left_pad):
    """Two images in one row, one in another, a text-only row, padding inside and after rows."""
    torch.manual_seed(0)
    model = mra.build(tiny_cfg(image_size=128))
    I = IMAGE_TOKEN
    ids = torch.tensor([[1, I, 5, 6, I, 7], [1, 8, 0, I, 9, 0], [1, 10, 11, 12, 0, 0]])
    pad = ids != 0
    images = torch.randn(3, 3, 128, 128)
    feats, embeds = model.encode_images(images), model.llm.embed(ids.clamp(min=0))
    rows, k = [], 0  # the readable way: walk each row, copying tokens and inserting features
    for b in range(3):
        row = []
        for t in range(6):
            if pad[b, t] and ids[b, t] == I:
                row += [(f, IGNORE) for f in feats[k]]
                k += 1
            elif pad[b, t]:
                row.append((embeds[b, t], ids[b, t].item()))
        rows.append(row)
    L = max(map(len, rows))
    got, mask, labels = model.splice(ids, images, labels=ids, pad_mask=pad, left_pad=left_pad)
    assert got.shape == (3, L, embeds.shape[-1]) and mask.sum(1).tolist() == list(map(len, rows))
    for b, row in enumerate(rows):
        at = range(L - len(row), L) if left_pad else range(len(row))
        torch.testing.assert_close(got[b, at], torch.stack([e for e, _ in row]), rtol=0, atol=0)
        assert labels[b, at].tolist() == [lab for _, lab in row] and mask[b, at].all()
        assert (labels[b][~mask[b]] == IGNORE).all() and (got[b][~mask[b]] == 0).all()


def test_cached_generation_equals_full_forward():
    torch.manual_seed(0)
    model = randomise(mra.build(tiny_cfg())).eval()
    ids = torch.tensor([[1, 5, IMAGE_TOKEN, 7, 8], [1, 9, 10, 11, 12]])
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        # every cached step's logits equal the no-cache pass over the whole sequence so far
        seq, (logits, cache) = ids, model.prefill(ids, images, max_new_tokens=4)
        for _ in range(4):
            tok = logits.argmax(-1)
            seq = torch.cat([seq, tok[:, None]], 1)
            logits = model.llm.decode(tok, cache)
            # each row alone, unpadded: row 0 holds the image, row 1 is text-only
            for b, img in ((0, images), (1, None)):
                full, _ = model(seq[b:b + 1], img)
                torch.testing.assert_close(logits[b], full[0, -1], rtol=1e-5, atol=1e-6)


def test_our_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomise(mra.build(tiny_cfg(gate="sigmoid")))
    mra.save_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "mra_config.json"]
    back = mra.load_checkpoint(str(tmp_path))
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([[1, IMAGE_TOKEN, 3]])
    img = torch.randn(1, 3, 256, 256)
    # same weights; freshly read tensors may take other SIMD paths, so not bit-for-bit
    torch.testing.assert_close(back(ids, img)[0], model(ids, img)[0], rtol=1e-6, atol=1e-6)


def test_adapters_need_four_vit_layers():
    for layers in (3, 6):  # the release asserts a multiple of 4; 6 would have put them after blocks 1, 2, 3
        with pytest.raises(ValueError, match="need a multiple of 4 ViT layers, >= 4"):
            mra.build(tiny_cfg(vit=ViTConfig(image_size=112, patch_size=14, width=32, layers=layers, heads=1,
                                             mlp_dim=64)))


def test_low_res_rounds_once_from_fp32_as_the_release():
    # the release: F.interpolate(x.float(), ...).to(x.dtype); fp16 interpolation on a CPU rounds inside
    enc = mra.build(tiny_cfg()).encoder
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)).half()
    ref = F.interpolate(x.float(), size=(112, 112), mode="bilinear", align_corners=True).half()
    assert enc.low_res(x).dtype == torch.float16 and torch.equal(enc.low_res(x), ref)
