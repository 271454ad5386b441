"""ConvNeXt parity with timm on tiny random models, in every key layout users have."""
import pytest
import timm  # the reference; a test dependency only (requirements-dev.txt)
import torch
from safetensors.torch import save_file

from convnext import CONVNEXT_PRESETS, RELEASE_WEIGHTS, ConvNeXt, ConvNeXtConfig
from weights import CheckpointError

DEPTHS, DIMS = (1, 2, 1, 1), (16, 24, 32, 40)


def randomise(model, seed=0):
    """Random values everywhere: timm's init (zero biases, unit LN, layer scale 1e-6) would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 4
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def large():
    # convnext_large_mlp keeps its MLP head (head.norm, head.pre_logits.fc, head.fc), which we must ignore
    return randomise(timm.create_model("convnext_large_mlp", pretrained=False, depths=DEPTHS, dims=DIMS,
                                       num_classes=8, head_hidden_size=48), seed=0)


@pytest.fixture(scope="module")
def xxlarge():
    m = timm.create_model("convnext_xxlarge", pretrained=False, depths=(1, 1, 2, 1), dims=(16, 24, 32, 48),
                          num_classes=8)
    assert m.stem[1].eps == m.stages[1].downsample[0].eps == m.stages[2].blocks[1].norm.eps == 1e-5
    return randomise(m, seed=1)


@pytest.fixture(scope="module")
def image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def assert_matches(ours, ref, x):
    # eps 1e-5 vs 1e-6 moves outputs by ~1e-5 only, so compare every LayerNorm's eps (stem, downsamplers,
    # blocks, in order) directly; timm's LayerNorm2d subclasses nn.LayerNorm
    eps = lambda model: [(type(m).__name__, m.eps) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.LayerNorm) and not n.startswith("head")]
    assert eps(ours) == eps(ref)
    assert_outputs_match(ours, ref, x)


def assert_outputs_match(ours, ref, x):
    with torch.no_grad():
        got, want = ours(x), ref.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(want) == 4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape == (x.shape[0], ref.feature_info[i]["num_chs"], 16 >> i, 16 >> i)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_timm_layout(large, image, tmp_path):
    save_file(large.state_dict(), tmp_path / "timm.safetensors")
    model = ConvNeXt.from_pretrained(tmp_path / "timm.safetensors")
    assert model.config == ConvNeXtConfig(depths=DEPTHS, dims=DIMS, eps=1e-6)
    assert_matches(model, large, image)


def test_open_clip_layout(large, image, tmp_path):
    # a whole open_clip CLIP checkpoint: trunk (with its head) under visual.trunk., plus things to ignore
    sd = {"visual.trunk." + k: v for k, v in large.state_dict().items()}
    sd.update({k: torch.randn(4, 4) for k in [
        "visual.head.proj.weight", "visual.head.mlp.fc1.weight", "token_embedding.weight", "positional_embedding",
        "transformer.resblocks.0.attn.in_proj_weight", "ln_final.weight", "text_projection"]})
    sd["logit_scale"] = torch.tensor(4.6)
    save_file(sd, tmp_path / "open_clip_model.safetensors")
    assert_matches(ConvNeXt.from_pretrained(str(tmp_path)), large, image)  # a directory works too


def test_llava_hr_layout(large, image, tmp_path):
    # the release renames timm's layer-scale `gamma` to `weight` and keeps head.*
    sd = {k.removesuffix("gamma") + "weight" if k.endswith(".gamma") else k: v
          for k, v in large.state_dict().items()}
    assert "stages.1.blocks.1.weight" in sd and not any(k.endswith("gamma") for k in sd)
    save_file(sd, tmp_path / "model.safetensors")
    assert_matches(ConvNeXt.from_pretrained(tmp_path / "model.safetensors"), large, image)
    assert_matches(ConvNeXt.from_pretrained(sd), large, image)  # release.py passes an already-read dict


def test_eps_from_preset(xxlarge, image, tmp_path):
    save_file(xxlarge.state_dict(), tmp_path / "xxl.safetensors")
    model = ConvNeXt.from_pretrained(tmp_path / "xxl.safetensors", name="convnext_xxlarge")
    assert model.config == ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48), eps=1e-5)
    assert_matches(model, xxlarge, image)
    # a faint image puts the stem LayerNorm's variance near eps, where 1e-6 vs 1e-5 shows
    faint = image * 1e-3
    stem_bias = xxlarge.stem[0].bias.detach().clone()
    with torch.no_grad():
        xxlarge.stem[0].bias.zero_(), model.stem_conv.bias.zero_()
    try:
        assert_matches(model, xxlarge, faint)
        wrong = ConvNeXt(ConvNeXtConfig(model.config.depths, model.config.dims, eps=1e-6))
        wrong.load_state_dict(model.state_dict())
        # the outputs themselves differ (assert_matches would stop at its eps comparison first)
        with pytest.raises(AssertionError, match="Tensor-likes are not close"):
            assert_outputs_match(wrong.eval(), xxlarge, faint)
    finally:
        with torch.no_grad():
            xxlarge.stem[0].bias.copy_(stem_bias)


@pytest.mark.parametrize("name", list(CONVNEXT_PRESETS))
def test_presets_inferred_from_shapes(name):
    # full-size presets on the meta device: shapes only, no memory; the eps follows the matching widths
    with torch.device("meta"):
        state = ConvNeXt(ConvNeXtConfig.from_name(name)).state_dict()
    assert ConvNeXtConfig.from_shapes(state) == ConvNeXtConfig.from_name(name)
    with torch.device("meta"):  # timm's own model of that name, its classifier head left out
        ref = timm.create_model(name, pretrained=False, num_classes=0)
    n = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("head."))
    assert sum(t.numel() for t in state.values()) == n == {"convnext_large_mlp": 196_227_264,
                                                           "convnext_xxlarge": 843_391_872}[name]


def test_unknown_widths_default_eps(large):
    assert ConvNeXtConfig.from_shapes(ConvNeXt(ConvNeXtConfig(DEPTHS, DIMS)).state_dict()).eps == 1e-6


def test_dtype_and_trainable(large, image):
    model = ConvNeXt.from_pretrained(large.state_dict(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad for p in model.parameters())
    model(image.bfloat16())[-1].float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("theirs", ["stages.1.blocks.0.mlp.fc1.bias", "stages.1.downsample.0.weight",
                                    "stages.2.blocks.0.conv_dw.weight", "stages.0.blocks.0.gamma"])
def test_missing_key(large, theirs):
    # the message names the key as the checkpoint calls it, so the user can find it in the file
    sd = dict(large.state_dict())
    del sd[theirs]
    with pytest.raises(CheckpointError, match="missing " + theirs.replace(".", r"\.") + "$"):
        ConvNeXt.from_pretrained(sd)


@pytest.mark.parametrize("key", ["stages.1.blocks.0.mlp.fc3.weight", "stages.0.blocks.0.gamma2", "foo"])
def test_unexpected_key(large, key):
    sd = dict(large.state_dict(), **{key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected .*" + key.replace(".", r"\.")):
        ConvNeXt.from_pretrained(sd)


def test_unexpected_key_inside_open_clip_trunk(large):
    sd = {"visual.trunk." + k: v for k, v in large.state_dict().items()}
    sd["visual.trunk.stages.2.blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected visual\.trunk\.stages\.2\.blocks\.0\.extra\.weight"):
        ConvNeXt.from_pretrained(sd)


def test_wrong_shape(large):
    sd = dict(large.state_dict())
    sd["stages.2.blocks.0.mlp.fc1.weight"] = torch.zeros(128, 31)
    with pytest.raises(CheckpointError, match=r"stages\.2\.blocks\.0\.mlp\.fc1\.weight: model expects \(128, 32\), "
                                              r"checkpoint has \(128, 31\)"):
        ConvNeXt.from_pretrained(sd)


def test_unreadable_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        ConvNeXt.from_pretrained(tmp_path / "bad.safetensors")


def test_release_weights_are_timms_default_tags():
    # The release calls timm's convnext_large_mlp(pretrained="convnext_large_mlp.clip_laion2b_ft_320"):
    # a truthy flag, not a tag. timm then resolves the architecture's default pretrained config,
    # which is what RELEASE_WEIGHTS names (timm's own lookup; nothing is downloaded).
    from timm.models._builder import resolve_pretrained_cfg
    for arch, weights in RELEASE_WEIGHTS.items():
        cfg = resolve_pretrained_cfg(arch)
        assert f"{cfg.architecture}.{cfg.tag}" == weights
        assert cfg.hf_hub_id == f"timm/{weights}"
