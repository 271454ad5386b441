"""train.py end to end on tiny random models and generated data (CPU): both stages learn, stage 1
touches only projector + fusion, DDP and FSDP2 (torchrun, gloo) equal one process, a resumed run
equals an uninterrupted one, a NaN stops the run and keeps the last checkpoint."""
import json
import math
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook

import data
import mra
from tokenizer import Tokenizer
from test_data import random_image, train_spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
LLM_KEY = "llm.layers.0.attn.wq.weight"
CAPTIONS = ["a red car", "two dogs", "a man sitting", "the blue table", "three people standing",
            "a cat on the street", "a woman in red", "the sign says yes"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models gain nothing from threads, and OpenMP threads spinning on a busy machine
    # make each step ~30x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tok = train_spm(d / "tok")
    (d / "tokenizer_config.json").write_text('{"legacy": false}')  # as Vicuna v1.5's: checkpoints keep it
    (d / "images").mkdir()
    captions, chats = [], []
    for i, c in enumerate(CAPTIONS):
        random_image(40 + 6 * i, 48, seed=i).save(d / "images" / f"{i}.png")
        captions.append(dict(id=i, image=f"{i}.png", conversations=[
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": c}]))
        chats.append(dict(id=i, image=f"{i}.png", conversations=[
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": c.capitalize() + "."},
            {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes" if "red" in c else "no"}]))
    chats += [dict(id="t1", conversations=[{"from": "human", "value": "What is two and three?"},
                                           {"from": "gpt", "value": "5"}]),
              dict(id="t2", conversations=[{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}])]
    for name, recs in (("captions.json", captions), ("chats.json", chats)):
        (d / name).write_text(json.dumps(recs))
    return d, tok


def args(env, out, stage=2, *extra):
    d, tok = env
    return ["--stage", str(stage), "--config", "tiny", "--data", str(d / ("captions.json" if stage == 1 else "chats.json")),
            "--image-folder", str(d / "images"), "--tokenizer", tok, "--out", str(out), "--workers", "0",
            "--device", "cpu", *map(str, extra)]  # fp32: the exact comparisons hold on a machine with a GPU too


def train(argv):
    """Run train.py in this process (no interpreter start-up: the tests stay fast); its globals."""
    old = sys.argv
    sys.argv = [TRAIN, *map(str, argv)]
    try:
        return runpy.run_path(TRAIN, run_name="__main__")
    finally:
        sys.argv = old


def torchrun(argv, n=2, ok=True, script=TRAIN):
    """train.py (or `script`) under torchrun (gloo): its stdout, or (ok=False) the finished process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                        "--master_addr", "127.0.0.1", "--master_port", str(port), script, *argv],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if not ok:
        return r
    assert r.returncode == 0, r.stderr[-3000:]
    # no warning, which every rank would print every run; but DDP's own note, at a step that used every
    # parameter, that it was told to look for unused ones: text-only micro-batches leave the vision side unused
    warned = [line for line in r.stderr.splitlines() if "Warning" in line
              and "find_unused_parameters=True was specified in DDP constructor" not in line]
    assert not warned, r.stderr[-3000:]
    return r.stdout


def weights(out):
    return mra.load_checkpoint(os.path.join(out, "ckpt")).state_dict()


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_stage1_trains_only_projector_and_fusion(env, tmp_path):
    d, tok = env
    torch.manual_seed(0)
    # (--init's model pads: the stage's way, not the model's, is what the run must take)
    init = mra.build(replace(tiny(), adapters=False, image_size=64, image_aspect_ratio="pad"))
    mra.save_checkpoint(init, tmp_path / "init")
    g = train(args(env, tmp_path / "s1", 1, "--init", tmp_path / "init", "--global-batch", 8, "--batch-size", 8,
                   "--epochs", 25, "--lr", 2e-2, "--warmup-ratio", 0))
    # LLaVA-HR's released stage-1 script sets no --image_aspect_ratio, so it pre-trains on images resized and
    # centre-cropped (the CLIP processor's way; its stage-2 script pads them to a square): the data is read so,
    # and the checkpoint says so
    assert g["ds"].image_aspect_ratio == "crop" == mra.load_checkpoint(tmp_path / "s1" / "ckpt").cfg.image_aspect_ratio
    loss = losses(tmp_path / "s1")
    # the LLM is random and frozen: only the visual tokens can steer it, so the loss falls
    # clearly but cannot reach zero as in stage 2
    assert len(loss) == 25 and sum(loss[-5:]) / 5 < 0.9 * loss[0], loss
    before, after = init.state_dict(), weights(tmp_path / "s1")
    for k in before:
        if k.startswith(("projector.", "encoder.fusion.")):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed in stage 1"
    assert os.path.isfile(tmp_path / "s1" / "ckpt" / "tokenizer.model")
    assert Tokenizer(tok).legacy is False and mra.load_tokenizer(tmp_path / "s1" / "ckpt").legacy is False


def tiny():
    """train.py's --config tiny, read from the script without running it."""
    src = open(TRAIN).read()
    start = src.index("TINY = ")
    ns = {}
    exec("import mra\nfrom convnext import ConvNeXtConfig\nfrom llama import LlamaConfig\nfrom vit import ViTConfig\n"
         + src[start:src.index("TINY_SIZE")], ns)
    return ns["TINY"]


def test_stage2_from_stage1_adds_adapters_and_learns(env, tmp_path):
    train(args(env, tmp_path / "s1", 1, "--global-batch", 4, "--batch-size", 4, "--max-steps", 1))
    s1 = weights(tmp_path / "s1")
    train(args(env, tmp_path / "s2", 2, "--init", tmp_path / "s1" / "ckpt", "--global-batch", 10, "--batch-size", 10,
               "--epochs", 30, "--lr", 3e-3, "--warmup-ratio", 0, "--grad-checkpoint"))
    loss = losses(tmp_path / "s2")
    assert sum(loss[-4:]) / 4 < 0.5 * loss[0], loss
    s2 = weights(tmp_path / "s2")
    assert any(k.startswith("encoder.adapters.2.") for k in s2) and not any(k.startswith("encoder.adapters") for k in s1)
    for k in (LLM_KEY, "encoder.vit.blocks.0.fc1.weight", "encoder.convnext.stem_conv.weight", "projector.0.weight"):
        assert not torch.equal(s1[k], s2[k]), f"{k} did not learn in stage 2"
    assert s2["encoder.adapters.0.fast_proj.weight"].abs().sum() > 0  # left the identity


def test_llava15_trains_at_its_vits_own_size_by_default(env, tmp_path):
    # the recipe's R (384 / 1024) is LLaVA-HR's; at 1024 LLaVA-1.5 would take 5,329 visual tokens, over its context
    v15 = tmp_path / "v15.json"
    v15.write_text(json.dumps(dict(tiny().to_dict(), arch="llava-1.5")))
    g = train(args(env, tmp_path / "o", 2, "--config", v15, "--max-steps", 1, "--global-batch", 4, "--batch-size", 4))
    assert g["cfg"].arch == "llava-1.5" and g["cfg"].image_size == tiny().vit.image_size == 28
    # fine-tuned from it (--init, as a merged LoRA release is), with LoRA: its own R again, not the stage's
    g = train(args(env, tmp_path / "lora", 2, "--init", tmp_path / "o" / "ckpt", "--lora-r", 4, "--max-steps", 1,
                   "--global-batch", 4, "--batch-size", 4))
    assert g["cfg"].arch == "llava-1.5" and g["cfg"].image_size == 28 != g["TINY_SIZE"][2]
    assert os.path.isfile(tmp_path / "lora" / "ckpt" / "lora" / "lora.json")


@pytest.mark.parametrize("zeroed", ["adapter", "tower"])
def test_lr_scales(env, tmp_path, zeroed):
    torch.manual_seed(0)
    init = mra.build(replace(tiny(), adapters=True, image_size=128))
    mra.save_checkpoint(init, tmp_path / "init")
    train(args(env, tmp_path / "s2", 2, "--init", tmp_path / "init", "--global-batch", 4, "--batch-size", 4,
               "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0, f"--{zeroed}-lr-scale", 0))
    before, after = init.state_dict(), weights(tmp_path / "s2")
    frozen = ("encoder.adapters.",) if zeroed == "adapter" else ("encoder.vit.", "encoder.convnext.")
    for k in before:  # lr 0 for that group alone: it stays as it was, all else learns
        if k.startswith(frozen):
            assert torch.equal(before[k], after[k]), k
    learns = [LLM_KEY, "projector.0.weight", "encoder.adapters.0.fast_conv.weight",
              "encoder.vit.blocks.0.fc1.weight", "encoder.convnext.stem_conv.weight"]
    for k in learns:
        if not k.startswith(frozen):
            assert not torch.equal(before[k], after[k]), k


@pytest.fixture(scope="module")
def stage2(env, tmp_path_factory):
    """One short stage-2 run with the recipe's defaults but for: a model from --init at R 64 (not the R of the
    stage, 128 under --config tiny) that crops (the stage pads), a 10-step epoch with --warmup-ratio 0.25 (ceil:
    3 warm-up steps, int() 2) and --grad-clip 0.01 (the norm is well above, see
    test_gradients_are_not_clipped_by_default). Its globals, its log, the images each forward saw and the
    gradients' norm each AdamW step saw."""
    d = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    init = mra.build(replace(tiny(), adapters=True, image_size=64, image_aspect_ratio="crop"))
    mra.save_checkpoint(init, d / "init")
    forward, images, norms = mra.LlavaHR.forward, [], []

    def recording(self, input_ids, images_=None, *a, **kw):
        images.append(None if images_ is None else tuple(images_.shape))
        return forward(self, input_ids, images_, *a, **kw)

    def stepping(opt, a, kw):  # every AdamW step, memplan's on fake tensors too: told apart by `opt` below
        grads = [q.grad for group in opt.param_groups for q in group["params"] if q.grad is not None]
        norms.append((opt, torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in grads]))))

    hook = register_optimizer_step_pre_hook(stepping)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(mra.LlavaHR, "forward", recording)
            g = train(args(env, d / "run", 2, "--init", d / "init", "--global-batch", 1, "--batch-size", 1,
                           "--warmup-ratio", 0.25, "--grad-clip", 0.01, "--no-save"))
    finally:
        hook.remove()
    with open(d / "run" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    return g, log, images, [float(n) for opt, n in norms if opt is g["opt"]]


def test_stage2_recipe_defaults(stage2):
    g, log, _, _ = stage2
    # LLaVA-HR's released stage-2 script: --image_aspect_ratio pad, --learning_rate 2e-5; it sets no Adam
    # betas, so HF Trainer's AdamW takes TrainingArguments' defaults: betas (0.9, 0.999), eps 1e-8
    assert g["args"].lr == 2e-5 == max(entry["lr"] for entry in log)
    assert g["ds"].image_aspect_ratio == "pad" == g["cfg"].image_aspect_ratio  # (--init's model crops)
    assert {(group["betas"], group["eps"]) for group in g["opt"].param_groups} == {((0.9, 0.999), 1e-8)}


def test_lr_schedule_is_hfs_cosine_with_warmup(stage2):
    # HF Trainer's lr_scheduler_type "cosine" (LLaVA's): get_cosine_schedule_with_warmup, with
    # ceil(warmup_ratio x steps) warm-up steps (TrainingArguments.get_warmup_steps); step 0 has lr 0
    from transformers import get_cosine_schedule_with_warmup
    g, log, _, _ = stage2
    assert [entry["step"] for entry in log] == list(range(1, 11))
    hf = get_cosine_schedule_with_warmup(torch.optim.SGD([torch.zeros(1)], lr=2e-5), math.ceil(0.25 * 10), 10)
    assert [entry["lr"] for entry in log] == pytest.approx([2e-5 * hf.lr_lambdas[0](s) for s in range(10)],
                                                           rel=1e-12, abs=0)


def test_grad_clip_scales_the_gradients_to_its_norm(stage2):
    # AdamW steps with the gradients clip_grad_norm_ scaled to a norm of 0.01 (x N / (N + 1e-6))
    _, _, _, norms = stage2
    assert norms == pytest.approx([0.01] * 10, rel=1e-5)


def test_init_at_another_r_reads_images_at_the_models_r_and_caps_max_len(stage2):
    # --init's model is at R 64: the data is preprocessed at its R, not at the stage's (128 under --config
    # tiny), which the model would otherwise take (its towers resize) and train at the wrong resolution
    g, _, images, _ = stage2
    assert g["cfg"].image_size == 64 != g["TINY_SIZE"][2]
    assert g["ds"].image_size == 64 and images.count((1, 3, 64, 64)) == 8 and images.count(None) == 2, images
    # the default max length (2496, the 7B's) lowered to what fits the tiny LLM's 512 positions with an image
    cfg = g["cfg"]
    assert g["ds"].max_len == cfg.llm.max_seq_len - cfg.visual_tokens + 1 < data.MAX_LEN["vicuna_v1"]


@pytest.mark.parametrize("flag", ["--freeze-vision", "--freeze-llm"])
def test_freeze_keeps_its_part_fixed(env, tmp_path, flag):
    # --freeze-vision: both towers (the ConvNeXt as well as the ViT); --freeze-llm: the LLM. The rest learns
    torch.manual_seed(0)
    init = mra.build(replace(tiny(), adapters=True, image_size=128))
    mra.save_checkpoint(init, tmp_path / "init")
    g = train(args(env, tmp_path / "s2", 2, "--init", tmp_path / "init", "--global-batch", 4, "--batch-size", 4,
                   "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0, "--no-save", flag))
    before, after = init.state_dict(), g["unwrapped"].state_dict()
    frozen = ("encoder.vit.", "encoder.convnext.") if flag == "--freeze-vision" else ("llm.",)
    assert not any(n.startswith(frozen) for n in g["trainable"])
    for k in before:
        if k.startswith(frozen):
            assert torch.equal(before[k], after[k]), k
    for k in (LLM_KEY, "projector.0.weight", "encoder.adapters.0.fast_conv.weight", "encoder.vit.blocks.0.fc1.weight",
              "encoder.convnext.stem_conv.weight"):
        if not k.startswith(frozen):
            assert not torch.equal(before[k], after[k]), k


def test_lora_projector_learns_at_a_tenth_of_the_lr(env, tmp_path):
    # LLaVA-1.5's released finetune_lora script: --learning_rate 2e-4 and --mm_projector_lr 2e-5, a tenth
    torch.manual_seed(0)
    mra.save_checkpoint(mra.build(replace(tiny(), adapters=True, image_size=128)), tmp_path / "init")
    g = train(args(env, tmp_path / "lora", 2, "--init", tmp_path / "init", "--lora-r", 4, "--global-batch", 2,
                   "--batch-size", 2, "--max-steps", 1, "--warmup-ratio", 0, "--no-save"))
    named = dict(g["unwrapped"].named_parameters())
    lr = {q: group["lr"] for group in g["opt"].param_groups for q in group["params"]}
    assert lr[named["llm.layers.0.attn.wq.lora_b"]] == 2e-4
    assert lr[named["projector.0.weight"]] == lr[named["projector.2.bias"]] == pytest.approx(2e-5, rel=1e-12)


def test_weight_decay_spares_biases_and_norms(env, tmp_path):
    # HF Trainer's rule, which LLaVA trains with: decay on weights, none on biases and norm weights
    torch.manual_seed(0)
    mra.save_checkpoint(mra.build(replace(tiny(), adapters=True, image_size=128)), tmp_path / "init")
    old = sys.argv
    sys.argv = [TRAIN, *map(str, args(env, tmp_path / "s2", 2, "--init", tmp_path / "init", "--global-batch", 2,
                                      "--batch-size", 2, "--max-steps", 1, "--weight-decay", 0.1))]
    try:
        g = runpy.run_path(TRAIN, run_name="__main__")
    finally:
        sys.argv = old
    decay = {q: group["weight_decay"] for group in g["opt"].param_groups for q in group["params"]}
    named = dict(g["unwrapped"].named_parameters())
    assert set(decay) == {q for q in named.values() if q.requires_grad}
    for name, q in filter(lambda nq: nq[1].requires_grad, named.items()):  # norms: ln_pre, ln1, stem_norm, norm, ...
        spared = name.endswith(".bias") or re.fullmatch(r"ln\w*|(\w+_)?norm", name.split(".")[-2])
        assert decay[q] == (0.0 if spared else 0.1), name
    assert decay[named["llm.norm.weight"]] == decay[named["encoder.vit.blocks.0.ln1.weight"]] == 0.0
    assert decay[named[LLM_KEY]] == decay[named["encoder.convnext.stages.0.blocks.0.gamma"]] == 0.1


def test_resume_takes_this_runs_lr_scales_and_weight_decay(env, tmp_path, capsys):
    # only AdamW's moments come from the checkpoint: new lr scales and a weight decay (which puts biases
    # and norms in groups of their own) apply from the resumed step on, as the run says
    common = ("--global-batch", 2, "--batch-size", 2, "--lr", 1e-3, "--warmup-ratio", 0)
    train(args(env, tmp_path / "run", 2, *common, "--max-steps", 1, "--projector-lr-scale", 0.5))
    g = train(args(env, tmp_path / "run", 2, *common, "--max-steps", 2, "--resume", "--adapter-lr-scale", 0.2,
                   "--weight-decay", 0.1))
    assert ("--resume with settings other than the run's: --adapter-lr-scale 1.0 -> 0.2, --weight-decay 0.0 -> 0.1, "
            "--projector-lr-scale 0.5 -> 1.0;") in capsys.readouterr().out  # 1.0: the default, in effect
    named, opt = dict(g["unwrapped"].named_parameters()), g["opt"]
    group = {q: grp for grp in opt.param_groups for q in grp["params"]}
    for name, scale, decay in ((LLM_KEY, 1, 0.1), ("llm.norm.weight", 1, 0), ("projector.0.weight", 1, 0.1),
                               ("projector.0.bias", 1, 0), ("encoder.adapters.0.fast_conv.weight", 0.2, 0.1)):
        assert (group[named[name]]["scale"], group[named[name]]["weight_decay"]) == (scale, decay), name
    assert group[named["encoder.adapters.0.fast_conv.weight"]]["lr"] == pytest.approx(0.2 * group[named[LLM_KEY]]["lr"])
    assert opt.state[named[LLM_KEY]]["step"] == 2  # the moments carried over


def test_resume_equals_uninterrupted_run(env, tmp_path):
    common = ("--global-batch", 2, "--batch-size", 1, "--epochs", 1, "--lr", 1e-3)
    train(args(env, tmp_path / "full", 2, *common, "--save-every", 0))
    train(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--max-steps", 3))
    state = torch.load(tmp_path / "cut" / "ckpt" / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    # a kill during the next save: a half-written tmp dir, and the good one renamed away
    os.makedirs(tmp_path / "cut" / "ckpt.tmp")
    (tmp_path / "cut" / "ckpt.tmp" / "model.safetensors").write_bytes(b"partial")
    os.replace(tmp_path / "cut" / "ckpt", tmp_path / "cut" / "ckpt.old")
    # the tokenizer from the checkpoint (ckpt.old, which the first save deletes), not --tokenizer: saves go on
    argv = args(env, tmp_path / "cut", 2, *common, "--save-every", 1, "--resume")
    train([a for i, a in enumerate(argv) if "--tokenizer" not in argv[i - 1:i + 1]])
    assert_same(weights(tmp_path / "cut"), weights(tmp_path / "full"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert not os.path.exists(tmp_path / "cut" / "ckpt.tmp") and not os.path.exists(tmp_path / "cut" / "ckpt.old")


def test_resume_may_extend_the_epochs(env, tmp_path, monkeypatch, capsys):
    # an epoch's order depends on the seed and its number alone: a finished 1-epoch run extended to 2
    # trains the second epoch a 2-epoch run trains (only the cosine schedule is longer, as the run says)
    forward, seen = mra.LlavaHR.forward, []

    def recording(self, input_ids, *a, **kw):
        seen.append(input_ids.tolist())
        return forward(self, input_ids, *a, **kw)

    monkeypatch.setattr(mra.LlavaHR, "forward", recording)
    common = ("--global-batch", 2, "--batch-size", 2, "--lr", 1e-3)
    train(args(env, tmp_path / "two", 2, *common, "--epochs", 2, "--no-save"))
    two = seen[:]
    assert len(two) == 10  # 5 steps an epoch
    del seen[:]
    train(args(env, tmp_path / "one", 2, *common))
    assert seen == two[:5]
    del seen[:]
    capsys.readouterr()
    train(args(env, tmp_path / "one", 2, *common, "--epochs", 2, "--resume"))
    assert seen == two[5:]
    assert "--resume with settings other than the run's: --epochs 1 -> 2;" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "one" / "log.jsonl")] == list(range(1, 11))


def test_fsdp_resume_equals_uninterrupted_run(env, tmp_path):
    # --fsdp saves without gathering: rank 0 streams the weights one tensor at a time into
    # model.safetensors, each rank writes its own rows of AdamW's state
    common = ("--global-batch", 2, "--batch-size", 1, "--epochs", 1, "--lr", 1e-3, "--group-by-length", "--fsdp")
    torchrun(args(env, tmp_path / "full", 2, *common, "--save-every", 0))
    out = torchrun(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--max-steps", 3))
    assert "done: step 3 of 5; checkpoint in" in out  # flushed before the process ends (train.leave)
    ckpt = tmp_path / "cut" / "ckpt"
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optimizer")) == [
        "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors"]
    assert "optimizer" not in torch.load(ckpt / "train_state.pt", weights_only=True)  # nothing gathered
    shutil.copytree(tmp_path / "cut", tmp_path / "cut1")
    # a kill during the next save: a half-written tmp dir, and the good one renamed away
    os.makedirs(tmp_path / "cut" / "ckpt.tmp")
    (tmp_path / "cut" / "ckpt.tmp" / "optimizer-00001-of-00002.safetensors").write_bytes(b"partial")
    os.replace(ckpt, tmp_path / "cut" / "ckpt.old")
    torchrun(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--resume"))
    assert_same(weights(tmp_path / "cut"), weights(tmp_path / "full"))  # bit for bit
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert not os.path.exists(tmp_path / "cut" / "ckpt.tmp") and not os.path.exists(tmp_path / "cut" / "ckpt.old")
    bad = tmp_path / "cut1" / "ckpt" / "optimizer-00002-of-00002.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(good[:-8])  # cut short
    with pytest.raises(SystemExit, match="optimizer-00002-of-00002.safetensors: the optimizer state the run's "
                                         "rank 1 saved is missing or unreadable"):
        train(args(env, tmp_path / "cut1", 2, *common[:-1], "--save-every", 2, "--resume"))
    bad.write_bytes(good)
    # the rows of both ranks' files come back whole in one process: the run goes on as on two
    # ranks, up to the order in which the ranks' gradients were summed
    train(args(env, tmp_path / "cut1", 2, *common[:-1], "--save-every", 2, "--resume"))
    assert_same(weights(tmp_path / "cut1"), weights(tmp_path / "full"), atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "cut1"), losses(tmp_path / "full"), rtol=1e-6, atol=0)
    # and the other way: a run saved by one rank goes on on two, each reading its own rows of the one file
    out = torchrun(args(env, tmp_path / "one", 2, *common, "--save-every", 2, "--max-steps", 3), n=1)
    assert os.listdir(tmp_path / "one" / "ckpt").count("optimizer-00001-of-00001.safetensors") == 1, out
    torchrun(args(env, tmp_path / "one", 2, *common, "--save-every", 2, "--resume"))
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "full"), atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "one"), losses(tmp_path / "full"), rtol=1e-6, atol=0)


def test_grouped_epoch_is_every_global_batch_of_each_modality(env, tmp_path, capsys):
    # 8 image and 2 text-only records in global batches of 4, one modality each: 2 of images (one
    # filled up), 1 of text; none dropped (10 // 4 = 2 steps left a whole one out)
    train(args(env, tmp_path / "o", 2, "--global-batch", 4, "--batch-size", 4, "--no-save"))
    out = capsys.readouterr().out
    assert "10 samples, 3 steps of 4" in out
    assert len(losses(tmp_path / "o")) == 3
    # the repeats said (a dataset small for the default global batch of 128 was silently run ~20 times over)
    assert "note: an epoch is 12 samples for 10 records: each modality's last global batch of 4 is filled up " \
           "with repeats of its own records; a smaller --global-batch repeats fewer" in out
    train(args(env, tmp_path / "two", 2, "--global-batch", 2, "--batch-size", 2, "--no-save", "--max-steps", 1))
    assert "note: an epoch is" not in capsys.readouterr().out  # 8 + 2 records fill batches of 2 exactly


def test_nan_loss_stops_and_keeps_last_checkpoint(env, tmp_path, monkeypatch):
    forward, calls = mra.LlavaHR.forward, []

    def poisoned(self, *a, **kw):
        logits, loss = forward(self, *a, **kw)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(mra.LlavaHR, "forward", poisoned)
    with pytest.raises(SystemExit, match="step 3: loss is nan; stopping without saving"):
        train(args(env, tmp_path / "o", 2, "--global-batch", 1, "--batch-size", 1, "--save-every", 1))
    ckpt = tmp_path / "o" / "ckpt"
    assert torch.load(ckpt / "train_state.pt", weights_only=True)["step"] == 2
    assert all(torch.isfinite(t).all() for t in mra.load_checkpoint(str(ckpt)).state_dict().values())
    assert len(losses(tmp_path / "o")) == 2


def test_fsdp_non_finite_loss_stops_every_rank_in_one_line(env, tmp_path):
    # lr 0 at step 1 (warm-up), 1e30 at step 2: the weights overflow, and step 3's loss is not finite. The loss
    # and the gradient norm are all-reduced, so every rank stops at that step; rank 0 says why, once
    r = torchrun(args(env, tmp_path / "o", 2, "--global-batch", 2, "--batch-size", 1, "--lr", 1e30, "--fsdp",
                      "--save-every", 1), ok=False)
    said = [line for line in r.stderr.splitlines() if "stopping without saving this state" in line]
    assert r.returncode == 1 and len(said) == 1, r.stderr[-3000:]
    assert re.match(r"error: step 3: (loss|gradient norm) is (nan|inf); stopping without saving this state: the last "
                    r"checkpoint .*ckpt is untouched", said[0])
    assert torch.load(tmp_path / "o" / "ckpt" / "train_state.pt", weights_only=True)["step"] == 2
    assert len(losses(tmp_path / "o")) == 2


class Overflow(torch.autograd.Function):
    """The identity, whose backward overflows: a finite loss with non-finite gradients."""
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, grad: grad * float("inf"))


@pytest.mark.parametrize("clip", [1, 0])  # 0: the norm is measured all the same
def test_non_finite_gradients_stop_and_keep_last_checkpoint(env, tmp_path, monkeypatch, clip):
    forward, calls = mra.LlavaHR.forward, []

    def overflowing(self, *a, **kw):
        logits, loss = forward(self, *a, **kw)
        calls.append(1)
        return logits, Overflow.apply(loss) if len(calls) == 3 else loss

    monkeypatch.setattr(mra.LlavaHR, "forward", overflowing)
    with pytest.raises(SystemExit, match=r"step 3: gradient norm is (nan|inf); stopping without saving this state: "
                                         r"the last checkpoint .*ckpt is untouched; .*--resume continues from it$"):
        train(args(env, tmp_path / "o", 2, "--global-batch", 1, "--batch-size", 1, "--save-every", 1,
                   "--grad-clip", clip))
    ckpt = tmp_path / "o" / "ckpt"
    assert torch.load(ckpt / "train_state.pt", weights_only=True)["step"] == 2
    assert all(torch.isfinite(t).all() for t in mra.load_checkpoint(str(ckpt)).state_dict().values())
    assert len(losses(tmp_path / "o")) == 2


def test_gradients_are_not_clipped_by_default(env, tmp_path, monkeypatch):
    # the release leaves HF's max_grad_norm 1.0 unused: its ZeRO configs have no "gradient_clipping", so
    # DeepSpeed clips nothing (and HF defers to it). The norm is still measured, here well above 1
    clip, seen = torch.nn.utils.clip_grad_norm_, []

    def measured(params, max_norm, *a, **kw):
        seen.append((max_norm, float(clip(params, max_norm, *a, **kw))))
        return torch.tensor(seen[-1][1])

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", measured)
    train(args(env, tmp_path / "o", 2, "--global-batch", 2, "--batch-size", 2, "--max-steps", 2, "--no-save"))
    assert len(seen) == 2 and all(max_norm == math.inf for max_norm, _ in seen), seen
    assert max(norm for _, norm in seen) > 1, seen


def test_adamw_steps_every_trainable_parameter_every_step(env, tmp_path):
    # 8 image and 2 text-only records, global batches of 2 grouped by modality: 5 steps, one text-only. As
    # the release's DeepSpeed AdamW, the vision side is stepped there too (a zero gradient: momentum moves it)
    g = train(args(env, tmp_path / "o", 2, "--global-batch", 2, "--batch-size", 2, "--no-save"))
    named = dict(g["unwrapped"].named_parameters())
    steps = {n: int(g["opt"].state[q]["step"]) for n, q in named.items() if q.requires_grad}
    assert set(steps.values()) == {5}, {n: s for n, s in steps.items() if s != 5}


def test_ddp_and_fsdp_equal_one_process(env, tmp_path):
    # DDP without grouping: a text-only micro-batch on one rank while the other holds an image
    common = ("--global-batch", 2, "--batch-size", 1, "--max-steps", 3, "--lr", 1e-3, "--warmup-ratio", 0)
    train(args(env, tmp_path / "one", 2, *common, "--no-group-by-modality-length"))  # LLaVA's name; the same flag
    torchrun(args(env, tmp_path / "ddp", 2, *common, "--no-group-by-length"))
    assert_same(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-6)
    # FSDP2: sharded per block, gathered to one file on rank 0; loads in this single process
    train(args(env, tmp_path / "one_g", 2, *common, "--group-by-length", "--grad-checkpoint"))
    out = torchrun(args(env, tmp_path / "fsdp", 2, *common, "--group-by-length", "--fsdp", "--grad-checkpoint"))
    assert_same(weights(tmp_path / "fsdp"), weights(tmp_path / "one_g"), atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one_g"), rtol=1e-6, atol=0)
    for r in (1, 2):  # AdamW's state, named by parameter: each rank's rows in a file of its own
        with safe_open(tmp_path / "fsdp" / "ckpt" / f"optimizer-0000{r}-of-00002.safetensors", "pt") as f:
            assert {f"{LLM_KEY}/exp_avg", f"{LLM_KEY}/exp_avg_sq", f"{LLM_KEY}/step"} <= set(f.keys())
    assert_lean(out)


def assert_lean(out, world=2):
    """Each rank allocated only its shards (lean start): about 1/world of the model's parameters."""
    # the ranks print at once: their lines can run together, so they are found, not split
    held = [float(h) for h in re.findall(r"of parameters held, ([\d.]+) of the model", out)]
    assert len(held) == world and sum(held) == pytest.approx(1, abs=0.011), out
    assert all(abs(h - 1 / world) < 0.05 for h in held), held


def test_fsdp_lean_start_from_a_checkpoint_equals_one_process(env, tmp_path):
    # stage 1 -> 2: the towers and LLM come from the file (each rank reads its rows of it), the new
    # MR-Adapters are random (drawn on every rank from the seed, as one process draws them)
    torch.manual_seed(0)
    init = mra.build(replace(tiny(), adapters=False, image_size=64, image_aspect_ratio="crop"))
    mra.save_checkpoint(init, tmp_path / "init")
    # lr 1e-3 as above: the ViT's k biases get only rounding noise as gradient (softmax ignores a
    # shift of every key), which AdamW turns into steps of up to ~lr that differ with summation order
    common = ("--init", tmp_path / "init", "--global-batch", 2, "--batch-size", 1, "--max-steps", 2, "--lr", 1e-3,
              "--warmup-ratio", 0, "--group-by-length")
    train(args(env, tmp_path / "one", 2, *common))
    assert_lean(torchrun(args(env, tmp_path / "fsdp", 2, *common, "--fsdp")))
    assert_same(weights(tmp_path / "fsdp"), weights(tmp_path / "one"), atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), rtol=1e-6, atol=0)


def test_grad_checkpoint_changes_no_number(env, tmp_path):
    # every LLM, ViT and ConvNeXt block recomputed in backward: the same losses and weights
    common = ("--global-batch", 2, "--batch-size", 2, "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0)
    train(args(env, tmp_path / "plain", 2, *common))
    train(args(env, tmp_path / "ckpt", 2, *common, "--grad-checkpoint"))
    torch.testing.assert_close(losses(tmp_path / "ckpt"), losses(tmp_path / "plain"), rtol=1e-6, atol=0)
    assert_same(weights(tmp_path / "ckpt"), weights(tmp_path / "plain"), atol=1e-6)


def test_lean_malloc_changes_no_number(env, tmp_path):
    # --lean-malloc only changes where glibc puts freed memory; in a process of its own, since the
    # setting would outlive the run and slow every later test
    common = ("--global-batch", 2, "--batch-size", 2, "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0)
    train(args(env, tmp_path / "plain", 2, *common))
    r = subprocess.run([sys.executable, TRAIN, *args(env, tmp_path / "lean", 2, *common, "--lean-malloc")],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),  # as this process runs (one_thread)
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "lean") == losses(tmp_path / "plain")
    assert_same(weights(tmp_path / "lean"), weights(tmp_path / "plain"))


def test_a_plan_near_the_memory_available_suggests_lean_malloc(env, tmp_path, monkeypatch, capsys):
    import weights
    monkeypatch.setattr(weights, "available_memory", lambda device: 2**20)  # 1 MiB free
    train(args(env, tmp_path / "run", 2, "--global-batch", 2, "--batch-size", 2, "--max-steps", 1, "--no-save"))
    out = capsys.readouterr().out
    assert "the plan needs over half of the 0.0 GiB available" in out and "--lean-malloc keeps the peak" in out


def plan(env, capsys, *extra):
    """train.py --dry-run's figures (GiB) by row, from its printout."""
    d, tok = env
    with pytest.raises(SystemExit) as e:
        train(["--stage", "2", "--config", "tiny", "--batch-size", "2", "--max-len", "40", *map(str, extra)])
    assert not e.value.code
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    return {r[0]: float(r[1]) * {"GiB": 2**30, "MiB": 2**20}[r[2]] for r in rows}


def test_dry_run_memory_plan(env, capsys):
    n = sum(q.numel() for q in mra.build(replace(tiny(), adapters=True, image_size=128)).parameters())
    one = plan(env, capsys, "--dry-run")
    # weights, gradients and AdamW's two moments: 4, 4 and 8 bytes per trained fp32 parameter
    # (printed to 0.01 MiB: within 1% at this size)
    assert one["weights"] == pytest.approx(4 * n, rel=1e-2) and one["adam"] == pytest.approx(8 * n, rel=1e-2)
    fsdp = plan(env, capsys, "--dry-run", 4, "--fsdp")
    assert fsdp["weights"] == pytest.approx(one["weights"] / 4, rel=1e-2)  # sharded over 4 ranks
    # and what FSDP2 holds gathered is in the peak, beside the activations (never with the update)
    assert fsdp["gathered"] > 0 and "gathered" not in one
    assert fsdp["peak"] == pytest.approx(fsdp["weights"] + fsdp["gradients"] + fsdp["adam"]
                                         + max(fsdp["activations"] + fsdp["gathered"], fsdp["update"]), rel=1e-2)
    lean = plan(env, capsys, "--dry-run", "--grad-checkpoint")
    assert 0 < lean["activations"] < one["activations"]
    assert 0 < one["update"] <= 4 * n * 1.01  # AdamW's temporaries: at most one fp32 copy of what it updates
    # a plan for this CPU adds the process's own resident memory; one for GPUs (a world size) does not
    assert one["runtime"] > 0 and "runtime" not in fsdp
    peak = one["weights"] + one["gradients"] + one["adam"] + max(one["activations"], one["update"]) + one["runtime"]
    assert one["peak"] == pytest.approx(peak, rel=1e-2)


@pytest.fixture(scope="module")
def plans():
    """memplan's plans of --config tiny's stage 2 (R 128, everything trains), a micro-batch of 1 x --max-len 40:
    for this CPU (fp32), for 4 GPUs unsharded (bf16 autocast) and under FSDP2 over the 4."""
    import memplan
    cfg = replace(tiny(), adapters=True, image_size=128)
    every = lambda name: True  # noqa: E731
    return cfg, {name: memplan.memory_plan(mra.LlavaHR, cfg, every, world, sharded, 1, 40, False, bf16)
                 for name, world, sharded, bf16 in (("one", 1, False, False), ("gpus", 4, False, True),
                                                     ("fsdp", 4, True, True))}


def test_memory_plan_counts_fp32_gradients_and_adam_and_shards_them_under_fsdp(plans):
    # per trained parameter: its fp32 weight 4 bytes, gradient 4, AdamW's exp_avg and exp_avg_sq 4 + 4. FSDP2
    # over 4 ranks holds a quarter of each, and AdamW steps a quarter: a quarter of its temporaries. Its bf16
    # gathered weights need no autocast copies: fewer activations than the unsharded bf16 (GPU) plan's
    cfg, p = plans
    n = sum(q.numel() for q in mra.LlavaHR(cfg).parameters())
    one, fsdp = p["one"], p["fsdp"]
    assert (one["weights"], one["gradients"], one["adam"], one["n_train"], one["n_all"]) == (4 * n, 4 * n, 8 * n, n, n)
    assert (fsdp["weights"], fsdp["gradients"], fsdp["adam"]) == (n, n, 2 * n)
    assert p["gpus"]["gradients"] == 8 * n  # DDP: each .grad, and the same again in its all-reduce buckets
    assert fsdp["update"] == one["update"] / 4 and one["update"] > 0
    assert 0 < fsdp["activations"] < p["gpus"]["activations"]


def test_memory_plan_takes_max_len_less_the_placeholder_and_the_image_within_the_context(plans):
    # --config tiny at R 128: (128 / 32)^2 = 16 visual tokens in the place of the <image> placeholder, so
    # --max-len 40 plans 39 text + 16 = 55 positions; a --max-len past the LLM's 512 is cut to the context
    import memplan
    cfg, p = plans
    every = lambda name: True  # noqa: E731
    assert cfg.visual_tokens == 16 and cfg.llm.max_seq_len == 512
    assert p["one"]["tokens"] == p["fsdp"]["tokens"] == 39 + 16
    assert memplan.memory_plan(mra.LlavaHR, cfg, every, 1, False, 1, 4000, False, False)["tokens"] == 512
    # an image that fills the whole context leaves no room for any text: refused
    full = replace(cfg, llm=replace(cfg.llm, max_seq_len=16))
    with pytest.raises(ValueError, match="one image takes 16 LLM positions at --image-size 128, but the LLM holds 16"):
        memplan.memory_plan(mra.LlavaHR, full, every, 1, False, 1, 40, False, False)


def test_memory_plan_counts_what_fsdp_holds_gathered(plans):
    # FSDP2 keeps the root unit gathered for the whole step and gathers one unit while the next is prefetched;
    # in backward a unit's gradients are whole, in bf16 and again in fp32 for the reduce-scatter. The units,
    # named here by hand: the LLM's and the ViT's blocks, the ConvNeXt's stages, the embedding and the head
    cfg, p = plans
    units = {}
    for name, q in mra.LlavaHR(cfg).named_parameters():
        parts, unit = name.split("."), None
        if parts[:2] == ["llm", "layers"]:
            unit = ".".join(parts[:3])
        elif parts[:3] in (["encoder", "vit", "blocks"], ["encoder", "convnext", "stages"]):
            unit = ".".join(parts[:4])
        elif parts[:2] in (["llm", "tok_embeddings"], ["llm", "output"]):
            unit = ".".join(parts[:2])
        units[unit] = units.get(unit, 0) + q.numel()
    root = units.pop(None)
    largest = sorted(units.values(), reverse=True)
    assert len(units) == cfg.llm.n_layers + cfg.vit.layers + 4 + 2 and root > 0
    assert p["fsdp"]["gathered"] == 2 * (root + largest[0] + largest[1]) + (2 + 4) * largest[0]  # bf16 gathers
    assert p["one"]["gathered"] == p["gpus"]["gathered"] == 0  # nothing sharded, nothing gathered


def test_plan_peak_holds_the_activations_or_the_update_never_both():
    # backward's activations and FSDP's gathered units are gone by the optimizer step: the peak is the larger of
    # the two, on top of the rest (1 + 2 + 4 + 32 = 39, plus 16 + 2 or 64)
    import memplan
    rows = dict(weights=1, gradients=2, adam=4, activations=16, gathered=2, update=8, runtime=32)
    assert memplan.plan_peak(rows) == 39 + 16 + 2
    assert memplan.plan_peak(dict(rows, update=64)) == 39 + 64


def test_dry_run_under_torchrun_prints_one_plan(env):
    # every rank printed the plan (and left without destroying its process group)
    out = torchrun(["--stage", "2", "--config", "tiny", "--dry-run", "--device", "cpu"])
    assert out.count("memory plan per device") == 1 and "2 process(es)" in out


def test_dry_run_plans_the_model_init_holds(env, capsys, tmp_path):
    # --init's shapes (here a 4-layer LLM, stage 1: no MR-Adapters yet), not --config's; read from the header
    held = replace(tiny(), adapters=False, llm=replace(tiny().llm, n_layers=4))
    mra.save_checkpoint(mra.build(held), tmp_path / "ckpt")
    ours = plan(env, capsys, "--dry-run", "--init", tmp_path / "ckpt")
    as_trained = mra.build(replace(held, adapters=True, image_size=128))  # stage 2 adds the MR-Adapters
    n = sum(q.numel() for q in as_trained.parameters())
    assert ours["weights"] == pytest.approx(4 * n, rel=1e-2)
    assert ours["weights"] > plan(env, capsys, "--dry-run")["weights"]  # --config tiny's 2 layers
    # --resume: the run's model as saved (planned as --config's, whatever the run had been)
    train(args(env, tmp_path / "run", 2, "--init", tmp_path / "ckpt", "--global-batch", 1, "--batch-size", 1,
               "--max-steps", 1))
    assert plan(env, capsys, "--dry-run", "--resume", "--out", tmp_path / "run")["weights"] == ours["weights"]
    with pytest.raises(SystemExit, match=r"^error: --resume --dry-run: no checkpoint in \S*new to plan for$"):
        train(["--stage", "2", "--config", "tiny", "--dry-run", "--resume", "--out", str(tmp_path / "new")])
    with pytest.raises(SystemExit, match=r"^error: --resume --dry-run: --out names the run to plan for$"):
        train(["--stage", "2", "--config", "tiny", "--dry-run", "--resume"])


@pytest.mark.parametrize("world", ["-2", "0"])  # 0 was read as no WORLD given (this run's world)
def test_dry_run_refuses_a_world_below_one(env, capsys, world):
    with pytest.raises(SystemExit) as e:
        train(["--stage", "2", "--config", "tiny", "--dry-run", world, "--fsdp"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--dry-run: WORLD must be a whole number >= 1, not '{world}'" in err, err


def test_dry_run_refuses_an_image_longer_than_the_llm(env, capsys):
    d, tok = env  # tiny's LLM holds 512 positions; R = 2048 gives S = 2048 / 32 * 14 = 896, a 64 x 64 grid
    with pytest.raises(ValueError, match="one image takes 4096 LLM positions at --image-size 2048, but the LLM holds 512"):
        train(["--stage", "2", "--config", "tiny", "--image-size", "2048", "--dry-run"])


def test_dry_run_plans_the_recipes_r_per_stage(capsys, tmp_path):
    # LLaVA-HR's released scripts: stage 1 at 384, stage 2 at 1024 (a config other than --config tiny, whose
    # R is its own; its LLM given 2048 positions, which 1024 visual tokens fit)
    held = tiny()
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(replace(held, llm=replace(held.llm, max_seq_len=2048)).to_dict()))
    for stage, R in ((1, 384), (2, 1024)):
        with pytest.raises(SystemExit) as e:
            train(["--stage", stage, "--config", path, "--batch-size", 1, "--max-len", 40, "--dry-run"])
        assert not e.value.code
        assert f"one image at R={R})" in capsys.readouterr().out
