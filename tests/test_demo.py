"""The synthetic task and the CPU demo: deterministic scenes whose answers match their pixels,
and the demo preset end to end (data, tokenizer, both stages, an answer from generate.py)."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_is_deterministic(tmp_path):
    a = data.make_synthetic(str(tmp_path / "a"), 6, seed=3, n_questions=10)
    b = data.make_synthetic(str(tmp_path / "b"), 6, seed=3, n_questions=10)
    assert a == b
    for name in ("pretrain.json", "instruct.json", "questions.jsonl", "images/3_00005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert data.make_synthetic(str(tmp_path / "c"), 6, seed=4) != a
    # the example shipped in the repo is scene 1001, so its answers are known
    img, ans = data.make_scene(random.Random(1001))
    assert np.array_equal(np.asarray(Image.open(os.path.join(ROOT, "examples", "demo.png"))), img)
    assert ans == {"colour": "blue", "texture": "vertical lines", "digit": 6}


def read_digit(img):
    """Decode the 3x5 glyph of 3 px cells from its dark pixels (drawn at 20, noise at most 4;
    nothing else in a scene is that dark). Every glyph touches all four sides of its box."""
    ys, xs = np.nonzero(img.max(-1) < 30)
    y0, x0 = ys.min(), xs.min()
    assert (ys.max() - y0, xs.max() - x0) == (14, 8)
    bits = "".join("1" if img[y0 + 3 * r + 1, x0 + 3 * c + 1].max() < 30 else "0" for r in range(5) for c in range(3))
    return data.DIGITS.index(bits)


@pytest.mark.parametrize("seed", range(12))
def test_answers_match_the_pixels(seed):
    img, ans = data.make_scene(random.Random(seed))
    pix = img.astype(int)
    # the circle: at least pi * 22^2 pixels within jitter + noise of the named colour, none of another
    near = {c: (np.abs(pix - rgb).max(-1) <= 16).sum() for c, rgb in data.COLOURS.items()}
    assert near[ans["colour"]] >= np.pi * 22 ** 2 * 0.9
    assert all(n < 50 for c, n in near.items() if c != ans["colour"])
    # the texture: the darkened pixels of the drawn kind are clearly darker than the rest
    contrast = {k: pix[~m].mean() - pix[m].mean() for k in data.TEXTURES for m in [data.texture_mask(k, 256)[0]]}
    assert max(contrast, key=contrast.get) == ans["texture"] and contrast[ans["texture"]] > 10
    assert read_digit(img) == ans["digit"]


def test_questions_file_holds_true_answers(tmp_path):
    answers = data.make_synthetic(str(tmp_path), 5, seed=2, n_questions=15)
    by_image = {a["image"]: a for a in answers}
    for q in map(json.loads, open(tmp_path / "questions.jsonl")):
        assert q["text"] == data.QUESTIONS[q["category"]]
        assert q["answer"] == str(by_image[q["image"]][q["category"]])


def test_demo_preset_end_to_end(tmp_path):
    out, d = tmp_path / "out", tmp_path / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "train.py", "--preset", "demo", "--out", str(out), "--data-dir", str(d),
                          "--scenes", "40", "--test-scenes", "4", "--tower-steps", "2", "--max-steps", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "try: python generate.py" in run.stdout
    # stage 0 pretrains the towers; stage 1 starts from them and keeps them frozen
    s0, s1 = (load_file(str(out / s / "ckpt" / "model.safetensors")) for s in ("stage0", "stage1"))
    towers = [k for k in s0 if k.startswith(("encoder.vit.", "encoder.convnext."))]
    assert towers and all(torch.equal(s0[k], s1[k]) for k in towers)
    for stage in ("stage1", "stage2"):
        assert (out / stage / "ckpt" / "model.safetensors").is_file()
        assert len((out / stage / "log.jsonl").read_text().splitlines()) == 2
    cfg = json.loads((out / "stage2" / "ckpt" / "mra_config.json").read_text())
    assert cfg["adapters"] and cfg["image_size"] == 256 and cfg["vit_min_size"] == 112
    gen = subprocess.run([sys.executable, "generate.py", "--model", str(out / "stage2" / "ckpt"),
                          "--image", "examples/demo.png", "--prompt", "What pattern fills the background?",
                          "--max-new-tokens", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.endswith("\n") and "Traceback" not in gen.stderr
