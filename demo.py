"""The CPU demo: the whole pipeline in minutes on a synthetic task where resolution matters.

    python train.py --preset demo     (or python demo.py)

Each 256 x 256 scene has a fine background texture (1-3 px period: only full resolution sees
it), a big coloured circle (any resolution sees it) and a small digit. run() draws the scenes
(make_synthetic), trains a tokenizer on their text, pretrains the towers briefly (stage 0,
pretrain_towers: nothing pretrained exists here), then runs train.py's stage 1 and stage 2
exactly as for the release.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import mra
from weights import read_config

# -----------------------------------------------------------------------------
# the task: scenes, their answers, the question file

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 50, 180), "orange": (245, 140, 30)}
TEXTURES = ("horizontal lines", "vertical lines", "checkerboard", "dots")
QUESTIONS = {"colour": "What colour is the big circle?", "texture": "What pattern fills the background?",
             "digit": "What digit is written in the image?"}
KIND = {q: k for k, q in QUESTIONS.items()}
# 3x5 bitmaps of the digits, drawn as blocks so no font file is needed and every machine
# renders the same pixels
DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001010010", "111101111101111", "111101111001111"]


# The task's spec (README, "The task's spec"): what a scene may be. make_scene draws at random
# everything it leaves free; bench.py's second held-out set draws the same spec another way.
PHASES = {"horizontal lines": 2, "vertical lines": 2, "checkerboard": 2, "dots": 9}
DARKEN = {"horizontal lines": (30, 40), "vertical lines": (30, 40), "checkerboard": (30, 40), "dots": (50, 70)}
BACKGROUND = (160, 255)  # each channel of the light background colour
JITTER = 12  # the circle's colour: its named colour, each channel moved by up to this much
NOISE = (2, 6)  # pixel noise: uniform integers in [-a, a] or Gaussian with sigma a / 2, a in this range


def phase_name(kind, phase):
    """Which pixels a texture darkens, in words: phase 0-1 (lines, checkerboard) or 0-8 (dots)."""
    if kind == "dots":
        return f"x%3={phase % 3},y%3={phase // 3}"
    return {"horizontal lines": "y", "vertical lines": "x", "checkerboard": "(x+y)"}[kind] + f"%2={phase}"


def texture_mask(kind, size, phase=1):
    """Boolean (size, size) map of the darkened pixels, and how much they are darkened."""
    y, x = np.mgrid[:size, :size]
    if kind == "horizontal lines":
        return y % 2 == phase, DARKEN[kind]
    if kind == "vertical lines":
        return x % 2 == phase, DARKEN[kind]
    if kind == "checkerboard":
        return (x + y) % 2 == phase, DARKEN[kind]
    return (x % 3 == phase % 3) & (y % 3 == phase // 3), DARKEN[kind]  # dots


def distractor_colour(rng):
    """Any colour that names no answer: at least 60 from every circle colour in some channel
    (so jitter and noise never bring it near one), and not near the digit's black."""
    while True:
        c = [rng.randint(0, 255) for _ in range(3)]
        if max(c) >= 90 and all(max(abs(a - b) for a, b in zip(c, rgb)) >= 60 for rgb in COLOURS.values()):
            return c


def make_scene(rng, size=256, digit=True):
    """One scene (H, W, 3 uint8) and its answers {colour, texture, digit or None, phase}."""
    bg = np.array([rng.randint(*BACKGROUND) for _ in range(3)], dtype=np.int16)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    texture = rng.choice(TEXTURES)
    phase = rng.randrange(PHASES[texture])  # every phase: a model must not learn one pixel grid
    mask, (lo, hi) = texture_mask(texture, size, phase)
    img[mask] -= rng.randint(lo, hi)
    for _ in range(rng.randint(2, 4)):  # distractor rectangles
        w, h = rng.randint(20, 70), rng.randint(20, 70)
        x0, y0 = rng.randint(0, size - w), rng.randint(0, size - h)
        img[y0:y0 + h, x0:x0 + w] = distractor_colour(rng)
    colour = rng.choice(sorted(COLOURS))
    r = rng.randint(22, 40)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    yy, xx = np.mgrid[:size, :size]
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = [c + rng.randint(-JITTER, JITTER) for c in COLOURS[colour]]
    answer = None
    if digit:
        answer = rng.randint(0, 9)
        cell = 3  # 3x5 cells of 3 px: a 9 x 15 px glyph, about 16 px tall with its margin
        gx, gy = rng.randint(0, size - 3 * cell), rng.randint(0, size - 5 * cell)
        for i, bit in enumerate(DIGITS[answer]):
            if bit == "1":
                r0, c0 = gy + (i // 3) * cell, gx + (i % 3) * cell
                img[r0:r0 + cell, c0:c0 + cell] = 20
    a, gaussian = rng.randint(*NOISE), rng.random() < 0.5
    nrng = np.random.default_rng(rng.randint(0, 2 ** 31))
    noise = nrng.normal(0, a / 2, img.shape).round() if gaussian else nrng.integers(-a, a + 1, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return img, {"colour": colour, "texture": texture, "digit": answer, "phase": phase_name(texture, phase)}


def make_synthetic(out, n, seed=0, size=256, digit=True, n_questions=0, question_seed=None):
    """Write n scenes under out/images plus stage-1 captions (pretrain.json), stage-2
    conversations (instruct.json), and optionally a question file (questions.jsonl) for
    generate.py's batch mode. Deterministic for a seed; returns the answers."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng = random.Random(seed)
    pretrain, instruct, answers = [], [], []
    for i in range(n):
        img, ans = make_scene(rng, size, digit)
        name = f"images/{seed}_{i:05d}.png"
        Image.fromarray(img).save(os.path.join(out, name))
        caption = f"A {ans['colour']} circle on a background of {ans['texture']}"
        caption += f" with the digit {ans['digit']}." if ans["digit"] is not None else "."
        pretrain.append({"id": f"{seed}_{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]})
        qs = [k for k in QUESTIONS if ans[k] is not None]
        rng.shuffle(qs)
        turns = []
        for j, k in enumerate(qs):
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + QUESTIONS[k]},
                      {"from": "gpt", "value": str(ans[k])}]
        instruct.append({"id": f"{seed}_{i}", "image": name, "conversations": turns})
        answers.append(dict(ans, image=name))
    for fname, records in (("pretrain.json", pretrain), ("instruct.json", instruct)):
        with open(os.path.join(out, fname), "w") as f:
            json.dump(records, f)
    if n_questions:
        write_questions(out, answers, n_questions, seed if question_seed is None else question_seed)
    return answers


def write_questions(out, answers, n_questions, seed):
    """out/questions.jsonl for generate.py's batch mode: question q asks about scene q % n, the
    (q // n)-th of its questions in an order drawn per scene (n_questions = 3n asks all of them).
    Texture questions carry the pattern's phase, so a score can be split by it."""
    rng = random.Random(seed)
    orders = [rng.sample(ks, len(ks)) for a in answers for ks in [[k for k in QUESTIONS if a[k] is not None]]]
    with open(os.path.join(out, "questions.jsonl"), "w") as f:
        for q in range(n_questions):
            a, kinds = answers[q % len(answers)], orders[q % len(answers)]
            kind = kinds[(q // len(answers)) % len(kinds)]
            extra = {"phase": a["phase"]} if kind == "texture" else {}
            f.write(json.dumps({"question_id": q, "image": a["image"], "text": QUESTIONS[kind],
                                "category": kind, "answer": str(a[kind])} | extra) + "\n")


def prepare(out, n_train=2000, n_test=500, vocab_size=600):
    """The demo's files under out/: training scenes (seed 0), held-out scenes and all three
    questions about each (seed 1), and a sentencepiece tokenizer trained on the text (nothing
    pretrained exists here). Kept if already there, so the demo and the experiment reuse them."""
    import sentencepiece as spm
    if os.path.isfile(os.path.join(out, "tokenizer.model")):  # kept: but as many scenes as asked for, or said
        held = [len(data.read_records(os.path.join(out, s, "pretrain.json"))) for s in ("train", "test")]
        if held != [n_train, n_test]:
            raise SystemExit(f"error: --data-dir {out} holds {held[0]} training and {held[1]} held-out scenes, drawn "
                             f"earlier, not the {n_train} and {n_test} asked for: --scenes {held[0]} --test-scenes "
                             f"{held[1]} reuses them, or pick another --data-dir")
    else:
        print(f"data: drawing {n_train} training and {n_test} held-out scenes into {out}, then training a "
              f"tokenizer on their text (once; a rerun reuses them)", flush=True)
        make_synthetic(os.path.join(out, "train"), n_train, seed=0)
        make_synthetic(os.path.join(out, "test"), n_test, seed=1, n_questions=3 * n_test)
        # every stage-2 prompt starts with the system text: weight it as often as it will be seen
        texts = [data.SYSTEM + " USER: ASSISTANT:"] * n_train + [
            t["value"].replace("<image>", "") for name in ("pretrain.json", "instruct.json")
            for r in data.read_records(os.path.join(out, "train", name)) for t in r["conversations"]]
        # LLaMA's sentencepiece settings: BPE, byte fallback, split digits, ids unk 0 / bos 1 / eos 2
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=os.path.join(out, "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return out


# -----------------------------------------------------------------------------
# the run: through the same two commands as real use (mra.MRA_PRESETS["demo"]). A short "stage 0"
# stands in for the release's pretrained towers (CLIP ViT, CLIP ConvNeXt); the LLM starts random
# and is learned in stage 2.


def pretrain_towers(config, data_dir, out, image_size, steps, seed=0, crop=64):
    """Stage 0 (demo only): each tower alone, supervised on the scenes' answers, standing in for
    the release's pretrained towers. Features: mean over positions; a linear head per question,
    a class per answer. Each tower learns what it is there for, on what it sees in the model:
    - the ViT (LLaVA-HR's: the S x S bilinear resize of the R x R image; LLaVA-1.5's: the image
      preprocessed at R): colour and texture, `steps` steps. At low resolution it cannot see the
      texture, and nothing here gives it that (README, experiment).
    - the ConvNeXt: the texture, twice the steps, on random crop x crop windows of the R x R
      image, as ImageNet training uses random crops. The texture fills the scene, so any window
      shows it, and a 64 px window costs 1/16 of the image. On whole images the detector sat on
      a plateau for 200-300 steps and ended at 70-73% (README); on windows, at 98-99%. Heads after each of its four stages (deep supervision, as GoogLeNet's
      auxiliary classifiers): the texture is resolved at stride 4, where a phase-free detector
      is one GELU away."""
    cfg = replace(read_config(config, mra.MRAConfig.from_dict), adapters=False, image_size=image_size)
    torch.manual_seed(seed)
    model = mra.build(cfg)
    records = data.read_records(os.path.join(data_dir, "instruct.json"))
    qa = [dict((c["value"].replace("<image>", "").strip(), a["value"]) for c, a in
               zip(r["conversations"][::2], r["conversations"][1::2])) for r in records]
    # a head per question, a class per answer; not the digit: from pooled features neither tower
    # learns it in a few hundred steps, and its loss, stuck at chance, sends only noise (README)
    classes = {q: sorted({x[q] for x in qa}) for q in qa[0] if q != QUESTIONS["digit"]}
    labels = torch.tensor([[classes[q].index(x[q]) for q in classes] for x in qa])
    images = torch.stack([data.preprocess(data.load_image(os.path.join(data_dir, r["image"])), image_size)
                          for r in tqdm(records, desc="stage 0: images", leave=False)])
    enc = model.encoder
    low_res = enc.low_res if cfg.arch == "llava-hr" else (lambda x: x)  # LLaVA-1.5: R is the ViT's input
    # the ViT pretrains as CLIP does, class token included; features: the last layer's patches
    towers = [("vit", enc.vit, lambda x: [enc.vit(low_res(x))[-1][:, 1:].mean(1)], [cfg.vit.width],
               list(classes), steps, None)]
    if cfg.arch == "llava-hr":
        towers.append(("convnext", enc.convnext, lambda x: [m.mean((2, 3)) for m in enc.convnext(x)],
                       cfg.convnext.dims, [QUESTIONS["texture"]], 2 * steps, crop))
        # ConvNeXt's layer scale starts each block's branch at 1e-6 of its output, an init made for
        # 300 epochs; at 1 the blocks' GELUs, where a phase-free detector lives, count from step 1
        for stage in enc.convnext.stages:
            for block in stage.blocks:
                torch.nn.init.ones_(block.gamma)
    g = torch.Generator().manual_seed(seed)
    for name, tower, features, widths, questions, steps, crop in towers:
        ks = [list(classes).index(q) for q in questions]  # the label columns this tower learns
        heads = torch.nn.ModuleList(torch.nn.Linear(w, len(classes[q])) for w in widths for q in questions)
        opt = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.0)
        bar = tqdm(range(steps), desc=f"stage 0: {name}")
        right = torch.zeros(len(ks))  # the last level's heads, over the last 50 steps
        for step in bar:
            i = torch.randint(0, len(records), (16,), generator=g)
            x = images[i]
            if crop and crop < image_size:  # a window per image, anywhere
                y0, x0 = torch.randint(0, image_size - crop + 1, (2, 16), generator=g).tolist()
                x = torch.stack([im[:, a:a + crop, b:b + crop] for im, a, b in zip(x, y0, x0)])
            fs = [f for f in features(x) for _ in ks]  # each level once per question
            logits = [h(f) for h, f in zip(heads, fs)]
            loss = sum(F.cross_entropy(z, labels[i, ks[j % len(ks)]]) for j, z in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item() / len(widths):.3f}")  # per level, as one head set sums it
            if step >= steps - 50:
                right += torch.stack([(z.argmax(1) == labels[i, k]).sum() for k, z in
                                      zip(ks, logits[-len(ks):])]).float()
        seen = 16 * min(50, steps)
        tqdm.write(f"stage 0: {name}, accuracy over its last {seen} training " + ("windows: " if crop else "scenes: ")
                   + ", ".join(f"{KIND[q]} {n / seen:.0%}" for q, n in zip(questions, right.tolist())))
    mra.save_checkpoint(model, os.path.join(out, "ckpt"), cfg=cfg)


def run(argv):
    """python train.py --preset demo [--out out/demo] [--data-dir data/demo] [--scenes N] [--tower-steps N]
    [flags for both stages]: data, stage 0 (pretrain_towers), stage 1, stage 2."""
    pre = argparse.ArgumentParser(prog="train.py --preset demo", description="The CPU demo: synthetic data, stage 0, "
                                  "then train.py's stages 1 and 2. Flags not listed here go to both stages (python "
                                  "train.py --stage 2 --help).")
    pre.error = lambda message: pre.exit(2, f"{pre.prog}: error: {message} (see --help)\n")  # one line, as train.py's
    pre.add_argument("--preset", choices=["demo"])
    pre.add_argument("--out", default="out/demo")
    pre.add_argument("--data-dir", default="data/demo")
    pre.add_argument("--scenes", type=int, default=2000, help="training scenes to generate")
    pre.add_argument("--test-scenes", type=int, default=500, help="held-out scenes (three questions each)")
    pre.add_argument("--config", help="an MRAConfig json instead of the demo's (the experiment's arms)")
    pre.add_argument("--stage1-size", type=int, default=128, help="R in stage 1 (stage 2 uses --image-size)")
    pre.add_argument("--image-size", type=int, default=256)
    pre.add_argument("--tower-steps", type=int, default=300, help="stage 0: the ViT's steps, the ConvNeXt's twice that (0: random towers)")
    demo, rest = pre.parse_known_args(argv)
    if demo.scenes < 1 or demo.test_scenes < 0 or demo.tower_steps < 0:
        pre.error("need --scenes >= 1, --test-scenes >= 0 and --tower-steps >= 0")
    done = [f"{demo.out}/{s}/ckpt" for s in ("stage0", "stage1", "stage2") if os.path.isdir(f"{demo.out}/{s}/ckpt")]
    if done and "--overwrite" not in rest:
        raise SystemExit(f"error: --out {demo.out} already holds a demo run ({', '.join(done)}): --overwrite "
                         f"starts over (deleting it), or pick another --out")
    d = demo.data_dir
    config = demo.config or os.path.join(demo.out, "config.json")
    new_out, wrote = not os.path.isdir(demo.out), False
    if not demo.config:  # the demo's config, written into --out: never over a file of the user's
        ours, existed = json.loads(json.dumps(mra.MRAConfig.from_name("demo").to_dict())), os.path.exists(config)
        if existed and not done:  # (beside a demo run's stages it is an earlier demo's)
            try:
                with open(config) as f:
                    theirs = json.load(f)
            except (OSError, ValueError):
                theirs = None
            if theirs != ours:
                raise SystemExit(f"error: --out {demo.out} holds a config.json that is not the demo's: pick another "
                                 f"--out (or pass that file as --config)")
        os.makedirs(demo.out, exist_ok=True)
        with open(config, "w") as f:
            json.dump(ours, f, indent=1)
        wrote = not existed
    common = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--config", config, "--tokenizer", f"{d}/tokenizer.model",
              "--image-folder", f"{d}/train", "--global-batch", "16", "--batch-size", "16", "--lr", "1e-3",
              "--workers", "1", "--save-every", "0",
              "--grad-clip", "1"]  # the demo's results were measured with clipping at 1 (the release has none)
    init = ["--init", f"{demo.out}/stage0/ckpt"] if demo.tower_steps else []
    stages = [["--stage", "1", "--data", f"{d}/train/pretrain.json", "--out", f"{demo.out}/stage1",
               "--image-size", str(demo.stage1_size)] + init,
              ["--stage", "2", "--data", f"{d}/train/instruct.json", "--out", f"{demo.out}/stage2",
               "--init", f"{demo.out}/stage1/ckpt", "--image-size", str(demo.image_size), "--epochs", "4",
               "--adapter-lr-scale", "0.1", "--tower-lr-scale", "0.1"]]
    # train.py checks the flags now, not after the data and stage 0 (minutes): each stage's --dry-run
    # (the plan alone; without --init, whose checkpoint does not exist yet)
    for stage in stages:
        i = stage.index("--init") if "--init" in stage else len(stage)
        if subprocess.run(common + stage[:i] + stage[i + 2:] + rest + ["--dry-run"], stdout=subprocess.DEVNULL).returncode:
            if wrote:  # nothing left behind
                os.remove(config)
                if new_out:
                    os.rmdir(demo.out)
            sys.exit(1)  # train.py printed its own error
    os.makedirs(demo.out, exist_ok=True)  # (with --config)
    try:
        prepare(d, n_train=demo.scenes, n_test=demo.test_scenes)
        if demo.tower_steps:
            pretrain_towers(config, f"{d}/train", f"{demo.out}/stage0", demo.image_size, demo.tower_steps)
        for stage in stages:  # flags given on the command line come last, so they win
            if subprocess.run(common + stage + rest).returncode:
                sys.exit(1)  # the stage printed its own error
    except KeyboardInterrupt:  # train.py's hook would speak of one run; the demo is several
        raise SystemExit("interrupted: the demo does not resume; run it again to start over (with --overwrite once "
                         "a stage has finished)") from None
    print(f"\ntry: python generate.py --model {demo.out}/stage2/ckpt --image examples/demo.png "
          f"--prompt \"What pattern fills the background?\"")




if __name__ == "__main__":
    run(sys.argv[1:])
