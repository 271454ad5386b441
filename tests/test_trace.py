"""generate.py --trace: the printed steps from pixels to the LLM's input agree with the config,
on our checkpoint format and on the release layouts (LLaVA-HR and LLaVA-1.5)."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import data
import generate
import mra
import trace_image
from test_generate import ids_for, images, model_dir, run_cli  # noqa: F401 (fixtures)
from test_release import IDS, PAD_MASK, hr_parts, llava_config, make_clip, make_heads, make_llama  # noqa: F401
from test_release import PROJECTOR, release_state, write_release


def expected(cfg):
    """The steps as the config says they must be, written out without the model's helpers."""
    R, p = cfg.image_size, cfg.vit.patch_size
    S = max(int(R / 32 * p), cfg.vit_min_size) if cfg.arch == "llava-hr" else R
    return R, S, (S // p) ** 2


def check(out, cfg, ids):
    R, S, n = expected(cfg)
    assert f"resized to R = {R}, CLIP-normalised: 1x3x{R}x{R}" in out
    assert f"ViT input: 1x3x{S}x{S}" in out and f"-> {S // cfg.vit.patch_size}x{S // cfg.vit.patch_size} patches" in out
    if cfg.arch == "llava-hr":
        for k, c in enumerate(cfg.convnext.dims):
            side = R // (4 * 2 ** k)
            assert f"ConvNeXt stage {k + 1}: 1x{c}x{side}x{side} (stride {R // side})" in out
        assert f"ViT tokens into block 1: 1x{n}x{cfg.vit.width} (class token dropped)" in out
        quarter = cfg.vit.layers // 4
        adapters = re.findall(r"MR-Adapter (\d), after ViT block (\d+): 1x(\d+)x(\d+) .* -> 1x(\d+)x(\d+)", out)
        assert adapters == [(str(k), str(k * quarter), str(n), str(cfg.vit.width), str(n), str(cfg.vit.width))
                            for k in (1, 2, 3)]
        gates = [float(g) for g in re.findall(r"g = tanh\(W2 GELU\(W1 f_v\)\) = ([-+.\d]+)", out)]
        assert len(gates) == 3 and all(-1 <= g <= 1 for g in gates)
    else:
        assert f"ViT tokens into block 1: 1x{n + 1}x{cfg.vit.width} (class token kept)" in out
        assert "ConvNeXt" not in out and "MR-Adapter" not in out
    fusion = " (after the final fusion)" if cfg.arch == "llava-hr" else ""
    assert f"vision encoder{fusion} output: 1x{n}x{cfg.vit.width}" in out
    assert f"projector output: 1x{n}x{cfg.llm.dim}" in out
    assert f"visual tokens: {n} (" in out
    where = ids.index(mra.IMAGE_TOKEN)
    assert f"prompt: {len(ids)} ids, <image> placeholder (id {mra.IMAGE_TOKEN}) at position {where}" in out
    T = len(ids) - 1 + n
    assert f"LLM input: {len(ids)} ids - 1 placeholder + {n} visual tokens = {T} positions: 1x{T}x{cfg.llm.dim}" in out


def check_picture(picture, cfg):  # a file's path, or the picture itself
    R = cfg.image_size
    panels = 3 if cfg.arch == "llava-hr" else 1
    assert np.asarray(picture if isinstance(picture, Image.Image) else Image.open(picture)).shape == \
        (2 * R, panels * R, 3)


def test_trace_cli_on_our_checkpoint(model_dir, images, tmp_path, capsys):  # noqa: F811
    model, tok = mra.load_checkpoint(str(model_dir)), mra.load_tokenizer(str(model_dir))
    picture = tmp_path / "x.png"
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--prompt", "What is it?",
                             "--trace", picture)
    assert code == 0, err
    check(out, model.cfg, ids_for(tok, [generate.human_turn("What is it?", True)]))
    check_picture(picture, model.cfg)
    # a picture already there is never overwritten
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--trace", picture)
    assert code == 1 and err.count("\n") == 1 and f"--trace {picture}: exists" in err
    # a name that can't be written is said before the model loads
    for bad, why in ((tmp_path / "nodir" / "x.png", "its folder does not exist"), (tmp_path / "x.txt", "end it in .png"),
                     (tmp_path / "x.xbm", "cannot write the picture as XBM")):  # PIL knows XBM, writes no RGB in it
        code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--trace", bad)
        assert code == 1 and err.count("\n") == 1 and f"--trace {bad}: " in err and why in err and out == "", err


def test_a_picture_that_cannot_be_opened_is_one_line_and_nothing_is_removed(tmp_path):
    # open() itself failing (its folder gone while the model ran, or made read-only) made no file: nothing is
    # removed (a removal of the file never made raised its own FileNotFoundError in place of the one line)
    picture = tmp_path / "gone" / "x.png"
    with pytest.raises(data.DataError) as e:
        trace_image.write_new(Image.new("RGB", (8, 8)), str(picture))
    assert str(e.value) == f"--trace {picture}: cannot be written (No such file or directory), and nothing is left " \
        f"there; name another place"
    assert not (tmp_path / "gone").exists()


def release_trace(path, tmp_path, capsys):
    model = mra.load_checkpoint(path).eval()
    ids = IDS[0][PAD_MASK[0]].tolist()  # ids within the tiny release's 96-entry vocabulary
    tok = SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    embeds = trace_image.trace(model, tok, image, ids)
    assert embeds.shape == (1, mra.llm_positions(len(ids), 1, model.cfg), model.cfg.llm.dim)
    check(capsys.readouterr().out, model.cfg, ids)
    check_picture(trace_image.paths_picture(image, model), model.cfg)


def test_trace_on_the_llava_hr_release_layout(hr_parts, tmp_path, capsys):  # noqa: F811
    # R = 384, the release's stage-1 size: S = 336 (the floor), a 24x24 grid; the 12x12 map is upsampled
    path = write_release(tmp_path / "hr", release_state(**hr_parts), llava_config(384))
    release_trace(path, tmp_path, capsys)


@pytest.mark.parametrize("fmt", ["bin"])
def test_trace_on_the_llava_15_release_layout(tmp_path, capsys, fmt):
    parts = dict(v15_clip=make_clip(seed=5), llama=make_llama(seed=6),
                 heads={k: v for k, v in make_heads(seed=7, adapters=False).items() if k.startswith(PROJECTOR)})
    release_trace(write_release(tmp_path / "v15", release_state(**parts), llava_config(), fmt), tmp_path, capsys)
