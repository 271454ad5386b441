"""The synthetic task and the CPU demo: deterministic scenes whose answers match their pixels,
and the demo preset end to end (data, tokenizer, both stages, an answer from generate.py)."""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generator_is_deterministic(tmp_path):
    a = demo.make_synthetic(str(tmp_path / "a"), 6, seed=3, n_questions=10)
    b = demo.make_synthetic(str(tmp_path / "b"), 6, seed=3, n_questions=10)
    assert a == b
    for name in ("pretrain.json", "instruct.json", "questions.jsonl", "images/3_00005.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert demo.make_synthetic(str(tmp_path / "c"), 6, seed=4) != a
    # the example shipped in the repo is scene 1002, so its answers are known
    img, ans = demo.make_scene(random.Random(1002))
    assert np.array_equal(np.asarray(Image.open(os.path.join(ROOT, "examples", "demo.png"))), img)
    assert ans == {"colour": "purple", "texture": "vertical lines", "digit": 2, "phase": "x%2=0"}
    # those answers (the README's) are what the shipped picture shows, read by the readers below
    assert read_texture(img) == (ans["texture"], ans["phase"]) and read_digit(img) == ans["digit"]
    assert read_colour(img, demo.JITTER + 6, 1) == ans["colour"]


# Reading the answers back from the pixels, with the spec's patterns defined here again (not through
# demo.texture_mask), so a generator that mislabels a phase, or draws only one, fails.
Y, X = np.mgrid[:256, :256]
PATTERNS = {**{("horizontal lines", f"y%2={p}"): Y % 2 == p for p in range(2)},
            **{("vertical lines", f"x%2={p}"): X % 2 == p for p in range(2)},
            **{("checkerboard", f"(x+y)%2={p}"): (X + Y) % 2 == p for p in range(2)},
            **{("dots", f"x%3={px},y%3={py}"): (X % 3 == px) & (Y % 3 == py) for px in range(3) for py in range(3)}}


def read_texture(img):
    """The (pattern, phase) whose pixels are darker than the rest: at least 10 grey levels on
    average, where every other candidate's differ by under 3 (they cut across the pattern)."""
    grey = img.astype(float).mean(-1)
    contrast = {k: grey[~m].mean() - grey[m].mean() for k, m in PATTERNS.items()}
    best = max(contrast, key=contrast.get)
    assert contrast[best] > 10 and all(c < 3 for k, c in contrast.items() if k != best), contrast
    return best


def read_colour(img, tol, others):
    """The named colour that at least 80% of a 22 px disc's pixels are within tol of (tol: the
    circle's jitter, noise and JPEG; the digit may cover some), fewer than `others` of another."""
    near = {c: (np.abs(img.astype(int) - rgb).max(-1) <= tol).sum() for c, rgb in demo.COLOURS.items()}
    best = max(near, key=near.get)
    assert near[best] >= np.pi * 22 ** 2 * 0.8 and all(n < others for c, n in near.items() if c != best), near
    return best


def read_digit(img):
    """Decode the 3x5 glyph of 3 px cells from its dark pixels (drawn at 20, noise a few grey
    levels; nothing else in a scene is that dark). Every glyph touches all four sides of its box."""
    ys, xs = np.nonzero(img.max(-1) < 45)
    y0, x0 = ys.min(), xs.min()
    assert (ys.max() - y0, xs.max() - x0) == (14, 8)
    bits = "".join("1" if img[y0 + 3 * r + 1, x0 + 3 * c + 1].max() < 45 else "0" for r in range(5) for c in range(3))
    return demo.DIGITS.index(bits)


def test_generator_draws_every_phase_and_answers_match_the_pixels():
    seen = set()
    for seed in range(200):
        img, ans = demo.make_scene(random.Random(seed))
        texture = read_texture(img)
        assert texture == (ans["texture"], ans["phase"])
        assert read_colour(img, demo.JITTER + 6, 1) == ans["colour"]
        assert read_digit(img) == ans["digit"]
        seen.add(texture)
    assert seen == set(PATTERNS)  # all 2 + 2 + 2 + 9 phases


def test_independent_renderer_draws_every_phase_and_answers_match_the_pixels(tmp_path):
    import bench
    seen = set()
    for seed in range(200):
        im, ans = bench.pil_scene(random.Random(seed))
        raw = np.asarray(im)
        assert read_texture(raw) == (ans["texture"], ans["phase"])
        assert read_colour(raw, demo.JITTER + 6, 1) == ans["colour"]
        assert read_digit(raw) == ans["digit"]
        im.save(tmp_path / "x.jpg", quality=90)  # as the held-out set stores it: JPEG keeps the answers
        jpeg = np.asarray(Image.open(tmp_path / "x.jpg"))
        assert read_texture(jpeg) == (ans["texture"], ans["phase"])
        # JPEG's chroma subsampling smears saturated edges: a few hundred pixels may stray
        assert read_colour(jpeg, demo.JITTER + 16, 300) == ans["colour"]
        seen.add((ans["texture"], ans["phase"]))
    assert seen == set(PATTERNS)


def measure_scene(img, ans):
    """What the spec leaves free, read back from a scene's pixels (before any JPEG): the background
    colour and the texture's darkening (per channel, the median of the 31 levels around the most
    crowded 13 among the pixels off / on the pattern: the background outnumbers any rectangle), the
    circle's box and its colour's offset from the named one, the digit's corner, the noise left on
    the plain background, and the pixels that none of those explain (the distractors')."""
    px = img.astype(int)
    on = PATTERNS[(ans["texture"], ans["phase"])]

    def level(sel):
        vals = px[sel]
        peak = [np.convolve(np.bincount(vals[:, c], minlength=256), np.ones(13), "same").argmax() for c in range(3)]
        near = vals[np.abs(vals - peak).max(1) <= 15]
        return np.median(near, 0), near
    bg, plain = level(~on)
    dark, _ = level(on)
    named = np.array(demo.COLOURS[ans["colour"]])
    fill = np.median(px[np.abs(px - named).max(-1) <= 20], 0)
    ys, xs = np.nonzero(np.abs(px - fill).max(-1) <= 12)
    dy, dx = np.nonzero(px.max(-1) < 45)
    noise = (plain - bg)[:, bg <= 240].ravel()  # channels clear of 255, where noise is clipped
    explained = [np.abs(px - c).max(-1) <= 20 for c in (bg, dark, fill)] + [px.max(-1) < 45]
    return {"bg": bg, "darken": (bg - dark).mean(), "radius": ((xs.max() - xs.min()) / 2, (ys.max() - ys.min()) / 2),
            "centre": ((xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2), "jitter": fill - named,
            "digit": (dx.min(), dy.min()), "noise": noise, "unexplained": (~np.logical_or.reduce(explained)).sum()}


@pytest.mark.parametrize("renderer", ["generator", "independent renderer"])
def test_both_renderers_draw_everything_the_spec_leaves_free_over_its_whole_range(renderer):
    # each renderer, held to the README's spec as written there (numbers typed here, not demo's
    # constants): a set narrowed to one shade, size or place, or without noise or distractors, is
    # easier than the spec, and a score on it says less than claimed
    import bench
    draw = demo.make_scene if renderer == "generator" else (
        lambda rng: (lambda im, ans: (np.asarray(im), ans))(*bench.pil_scene(rng)))
    ms, dots = [], []
    for seed in range(100):
        img, ans = draw(random.Random(seed))
        ms.append(measure_scene(img, ans))
        dots.append(ans["texture"] == "dots")
    bg = np.array([m["bg"] for m in ms])
    assert bg.min() >= 160 and bg.max() <= 255 and bg.min() <= 165 and bg.max() >= 250  # 300 draws of 96 levels
    lines = [m["darken"] for m, d in zip(ms, dots) if not d]
    dotted = [m["darken"] for m, d in zip(ms, dots) if d]
    assert 30 <= min(lines) <= 31 and 39 <= max(lines) <= 40  # 30-40 levels, ~75 scenes of 11 amounts
    assert 50 <= min(dotted) <= 53 and 67 <= max(dotted) <= 70  # 50-70 levels, ~25 scenes of 21 amounts
    radius, centre = np.array([m["radius"] for m in ms]), np.array([m["centre"] for m in ms])
    assert np.abs(radius[:, 0] - radius[:, 1]).max() <= 0.5  # a round box: the whole circle is in the image
    assert radius.min() == 22 and radius.max() >= 39 and radius.max() <= 40  # radius 22-40
    assert centre.min() <= 45 and centre.max() >= 210  # anywhere it fits: 22-233 at the extremes
    jitter = np.array([m["jitter"] for m in ms])
    assert np.abs(jitter).max() <= 12 and jitter.min() <= -10 and jitter.max() >= 10  # each channel +-12
    digit = np.array([m["digit"] for m in ms])
    assert digit.min(0).max() <= 15 and digit[:, 0].max() >= 230 and digit[:, 1].max() >= 225  # 0-247, 0-241
    # noise: uniform integers in [-a, a] (kurtosis about 1.8; the largest is a) or Gaussian (about 3), a in 2-6
    kurt = np.array([(n ** 4).mean() / n.var() ** 2 for n in (m["noise"] for m in ms)])
    # uniform: a is the largest level that each sign holds 1/(2a+1) of (here at least 4%; a rectangle's
    # colour within the window holds far less of any one level)
    uniform = [max(v for v in range(16) if min((n == v).mean(), (n == -v).mean()) >= 0.04)
               for n, k in zip((m["noise"] for m in ms), kurt) if k < 2.3]
    gauss = [m["noise"].std() for m, k in zip(ms, kurt) if k >= 2.3]
    assert 30 <= len(uniform) <= 70 and set(uniform) == {2, 3, 4, 5, 6}
    assert min(gauss) <= 1.2 and max(gauss) >= 2.8  # sigma a / 2: 1-3
    # 2-4 rectangles of 20-70 px a side: at least a few hundred pixels of theirs show in every scene
    assert min(m["unexplained"] for m in ms) >= 400


def test_questions_file_holds_true_answers(tmp_path):
    answers = demo.make_synthetic(str(tmp_path), 5, seed=2, n_questions=15)
    by_image = {a["image"]: a for a in answers}
    for q in map(json.loads, open(tmp_path / "questions.jsonl")):
        assert q["text"] == demo.QUESTIONS[q["category"]]
        assert q["answer"] == str(by_image[q["image"]][q["category"]])


def test_training_files_and_questions_carry_each_scenes_own_answers_read_from_its_pixels(tmp_path):
    # the answers taught (captions, conversations) and asked (questions.jsonl: every question of every
    # scene once, the texture's with its phase) checked against what each image shows, not against
    # make_synthetic's own answer list: a label taken from the wrong question or scene fails here
    demo.make_synthetic(str(tmp_path), 4, seed=5, n_questions=12)
    shown = {}
    for r in json.load(open(tmp_path / "pretrain.json")):
        img = np.asarray(Image.open(tmp_path / r["image"]))
        (texture, phase), colour, digit = read_texture(img), read_colour(img, demo.JITTER + 6, 1), read_digit(img)
        shown[r["image"]] = {"texture": texture, "phase": phase, "colour": colour, "digit": str(digit)}
        caption = f"A {colour} circle on a background of {texture} with the digit {digit}."
        assert r["conversations"][1]["value"] == caption
    for r in json.load(open(tmp_path / "instruct.json")):
        turns = r["conversations"]
        said = {q["value"].replace("<image>\n", ""): a["value"] for q, a in zip(turns[::2], turns[1::2])}
        assert said == {text: shown[r["image"]][kind] for kind, text in demo.QUESTIONS.items()}
    asked = [json.loads(line) for line in open(tmp_path / "questions.jsonl")]
    assert sorted((q["image"], q["category"]) for q in asked) == sorted((i, k) for i in shown for k in demo.QUESTIONS)
    for q in asked:
        assert q["text"] == demo.QUESTIONS[q["category"]] and q["answer"] == shown[q["image"]][q["category"]]
        assert q.get("phase") == (shown[q["image"]]["phase"] if q["category"] == "texture" else None)


def test_demo_preset_checks_the_flags_for_train_py_before_the_data_and_stage_0(tmp_path):
    # a mistyped flag surfaced only at stage 1, after the data and stage 0 (minutes); the rerun was
    # then refused (--out holds stage0/ckpt) until --overwrite
    out, d = tmp_path / "out", tmp_path / "data"
    run = subprocess.run([sys.executable, "train.py", "--preset", "demo", "--out", str(out), "--data-dir", str(d),
                          "--scenes", "4", "--test-scenes", "2", "--tower-steps", "2", "--max-stepz", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        "train.py: error: unrecognized arguments: --max-stepz 2 (see --help)"], run.stderr[-2000:]
    assert not d.exists() and not out.exists()  # not even the config.json it was checked with
    # a config.json of the user's in --out was overwritten before anything was checked
    out.mkdir()
    (out / "config.json").write_text('{"my": "config"}')
    run = subprocess.run([sys.executable, "train.py", "--preset", "demo", "--out", str(out), "--data-dir", str(d)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.strip().splitlines() == [
        f"error: --out {out} holds a config.json that is not the demo's: pick another --out (or pass that file as "
        f"--config)"], run.stderr[-2000:]
    assert (out / "config.json").read_text() == '{"my": "config"}' and not d.exists()


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


def test_data_drawn_earlier_is_reused_only_as_asked(tmp_path):
    d = str(tmp_path / "data")
    demo.prepare(d, n_train=3, n_test=1)
    assert demo.prepare(d, n_train=3, n_test=1) == d  # the same counts: reused as they are
    # other counts were silently trained on the scenes drawn earlier (a quick --scenes 40, then the real run)
    with pytest.raises(SystemExit, match=r"--data-dir \S*data holds 3 training and 1 held-out scenes, drawn earlier, "
                                         r"not the 2000 and 500 asked for: --scenes 3 --test-scenes 1 reuses them"):
        demo.prepare(d)


def test_held_out_scenes_are_not_the_training_scenes(tmp_path):
    # the held-out set must be drawn with another seed: with the training seed its scenes are the first
    # training scenes again, and the score measures memory
    d = tmp_path / "data"
    demo.prepare(str(d), n_train=3, n_test=2)
    train = [np.asarray(Image.open(p)) for p in sorted((d / "train" / "images").iterdir())]
    test = [np.asarray(Image.open(p)) for p in sorted((d / "test" / "images").iterdir())]
    assert len(train) == 3 and len(test) == 2
    assert not any(np.array_equal(a, b) for a in test for b in train)
    asked = [json.loads(line) for line in open(d / "test" / "questions.jsonl")]
    assert len(asked) == 6 and all((d / "test" / q["image"]).is_file() for q in asked)


def test_pil_heldout_drawn_earlier_is_reused_only_as_asked(tmp_path):
    import bench
    d = str(tmp_path / "pil")
    assert bench.make_pil_heldout(d, 2) == d and bench.make_pil_heldout(d, 2) == d
    # another count was silently scored on the scenes drawn earlier (--pil-scenes 20 got 2)
    with pytest.raises(SystemExit, match=rf"^error: {d} holds 2 scenes drawn earlier, not the 5 asked for: "
                                         rf"--pil-scenes 2 reuses them, or delete {d} to draw 5$"):
        bench.make_pil_heldout(d, 5)


def test_pil_heldout_is_drawn_without_the_generators_code_as_jpeg_with_every_question(tmp_path, monkeypatch):
    # the second held-out set is there to catch a model that learned the generator: it must not call
    # the generator's drawing code (here made to raise), it is stored as JPEG 90 as the README says,
    # and it asks all three questions of every scene, with answers its pixels show
    import bench

    def forbidden(*args, **kwargs):
        raise AssertionError("the independent renderer called the generator's code")
    for name in ("make_scene", "texture_mask", "phase_name", "distractor_colour", "make_synthetic"):
        monkeypatch.setattr(demo, name, forbidden)
    d = tmp_path / "pil"
    bench.make_pil_heldout(str(d), 3)
    asked = [json.loads(line) for line in open(d / "questions.jsonl")]
    images = sorted({q["image"] for q in asked})
    assert len(images) == 3 and sorted((q["image"], q["category"]) for q in asked) == sorted(
        (i, k) for i in images for k in demo.QUESTIONS)
    for q in asked:
        assert (d / q["image"]).read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG file, whatever its name
        img = np.asarray(Image.open(d / q["image"]))
        assert q["text"] == demo.QUESTIONS[q["category"]]
        if q["category"] == "texture":
            assert (q["answer"], q["phase"]) == read_texture(img)
        elif q["category"] == "colour":
            assert q["answer"] == read_colour(img, demo.JITTER + 16, 300)
        else:
            assert q["answer"] == str(read_digit(img))


def test_score_counts_exact_answers_only_case_and_final_period_aside(tmp_path):
    # bench.score, by hand: an answer is right when it is the answer once stripped of spaces, a final
    # period and case; containing it, being part of it, or sharing its first word is wrong
    import bench
    asked = [("texture", "vertical lines", "x%2=1", "Vertical lines."),        # right
             ("texture", "vertical lines", "x%2=1", "lines"),                  # part of it: wrong
             ("texture", "dots", "x%3=0,y%3=2", "dots and vertical lines"),    # contains it: wrong
             ("texture", "horizontal lines", "y%2=0", "horizontal"),           # its first word: wrong
             ("colour", "red", None, " red "),                                 # right
             ("colour", "red", None, ""),                                      # nothing: wrong
             ("colour", "green", None, "greenish"),                            # wrong
             ("digit", "1", None, "11"),                                       # wrong
             ("digit", "7", None, "7")]                                        # right
    with open(tmp_path / "q.jsonl", "w") as q, open(tmp_path / "a.jsonl", "w") as a:
        for i, (kind, answer, phase, said) in enumerate(asked):
            q.write(json.dumps({"question_id": i, "image": "x.png", "text": demo.QUESTIONS[kind], "category": kind,
                                "answer": answer} | ({"phase": phase} if phase else {})) + "\n")
            a.write(json.dumps({"question_id": i, "prompt": demo.QUESTIONS[kind], "text": said}) + "\n")
    acc, seen = bench.score(str(tmp_path / "q.jsonl"), str(tmp_path / "a.jsonl"))
    assert seen == {"texture": 4, "colour": 3, "digit": 2, "vertical lines x%2=1": 2, "dots x%3=0,y%3=2": 1,
                    "horizontal lines y%2=0": 1}
    assert acc == {"texture": 1 / 4, "colour": 1 / 3, "digit": 1 / 2, "vertical lines x%2=1": 1 / 2,
                   "dots x%3=0,y%3=2": 0, "horizontal lines y%2=0": 0}


@pytest.mark.parametrize("flag", ["--preset=demo", "--preset demo"])
def test_demo_flags_out_of_range_are_refused_before_anything_is_drawn(tmp_path, flag):
    # --scenes 0 was a traceback from sentencepiece's trainer once the (empty) scenes were drawn; --preset=demo
    # was read as train.py's own flags: "the following arguments are required: --stage"
    run = subprocess.run([sys.executable, "train.py", *flag.split(), "--out", str(tmp_path / "out"), "--data-dir",
                          str(tmp_path / "data"), "--scenes", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.splitlines() == [  # one line, as train.py's own flag errors
        "train.py --preset demo: error: need --scenes >= 1, --test-scenes >= 0 and --tower-steps >= 0 (see --help)"]
    assert not (tmp_path / "data").exists()


def test_demo_errors_and_interrupts_are_one_line(tmp_path, monkeypatch):
    # the demo ran before train.py's one-line hook: a bad --data-dir was a traceback, and Ctrl-C spoke of
    # one run ("nothing was saved; run it again") where the demo's stages are several
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    run = subprocess.run([sys.executable, "train.py", "--preset", "demo", "--out", str(tmp_path / "out"), "--scenes",
                          "4", "--test-scenes", "1", "--data-dir", str(not_a_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: ") and str(not_a_dir) in run.stderr
    # Ctrl-C while the data is drawn (train.py's --dry-run of each stage passed)
    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    monkeypatch.setattr(demo, "prepare", lambda *a, **k: signal.raise_signal(signal.SIGINT))
    try:
        with pytest.raises(SystemExit, match=r"^interrupted: the demo does not resume; run it again to start over "
                                             r"\(with --overwrite once a stage has finished\)$"):
            demo.run(["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data")])
    except KeyboardInterrupt:  # uncaught, it would end the whole test session
        pytest.fail("Ctrl-C came out of demo.run as a KeyboardInterrupt")
