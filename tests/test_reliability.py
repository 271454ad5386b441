"""Hostile inputs, kills and reruns: nothing a user made is lost, every user error is one line.

train.py: a rerun never replaces a run unasked; a run resumes at any step (even one saved before
some parameter had a gradient); log.jsonl holds each step once; a failed save keeps the last
checkpoint. generate.py: questions and answers files are checked (file and line) before the
model loads; a question asked twice is answered twice; a padded vocabulary never yields an id without text; chat survives
closed stdin and over-long turns. Loaders: config files, dtypes and pickles are checked.
"""
import builtins
import errno
import http.client
import json
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

import data
import failures
import generate
import mra
from at_call import at_call
from llama import Llama, LlamaConfig
from test_data import conv, records, train_spm, write_dataset
from test_generate import images, model_dir, run_cli  # noqa: F401 -- fixtures
from test_train import ROOT, TRAIN, args, assert_same, env, losses, one_thread, torchrun, train, weights  # noqa: F401
from tokenizer import Tokenizer
from weights import CheckpointError, convert_bin, read_safetensors

COMMON = ("--global-batch", 1, "--batch-size", 1, "--lr", 1e-3)


def one_line(r):
    """A subprocess's error: exit status non-zero, one line on stderr besides progress bars, no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def run_train(argv, **kw):
    env_ = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, TRAIN, *map(str, argv)], cwd=ROOT, env=env_, capture_output=True,
                          text=True, timeout=300, **kw)


# -----------------------------------------------------------------------------
# train.py: runs are never lost


def test_rerun_is_refused_and_overwrite_starts_over(env, tmp_path):
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 2))
    before = (out / "ckpt" / "model.safetensors").read_bytes(), (out / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run .*--resume continues it, --overwrite starts over"):
        train(args(env, out, 2, *COMMON, "--max-steps", 1))
    assert ((out / "ckpt" / "model.safetensors").read_bytes(), (out / "log.jsonl").read_text()) == before
    # an --overwrite run stopped before its first step (here by a record found bad as it loads) left only an
    # empty log: the old run goes once the new one has made a step
    with pytest.raises(SystemExit, match=r"^error: step 1: \S*chats.json record \d+ \(id \w+\): no answer tokens left "
                                         r"within 10 tokens; \S*run holds the run --overwrite was to replace, as it was "
                                         r"\(it goes after the first step\); once the cause is fixed \(fix or drop it, "
                                         r"or pass --skip-bad to skip such records\), run the same command again$"):
        train(args(env, out, 2, *COMMON, "--max-steps", 1, "--overwrite", "--max-len", 10))
    assert ((out / "ckpt" / "model.safetensors").read_bytes(), (out / "log.jsonl").read_text()) == before
    train(args(env, out, 2, *COMMON, "--max-steps", 1, "--overwrite"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1]
    # with no run to replace, an --overwrite run stopped so speaks of none
    with pytest.raises(SystemExit, match=r"; no checkpoint kept; once the cause is fixed \(fix or drop it, or pass "
                                         r"--skip-bad to skip such records\), --overwrite starts over$"):
        train(args(env, tmp_path / "fresh", 2, *COMMON, "--max-steps", 1, "--overwrite", "--max-len", 10))
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1


def test_overwrite_never_deletes_what_the_run_reads(env, tmp_path):
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 1))
    before = (out / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit, match=r"--init .*ckpt lies in the run that --overwrite would delete; copy it out"):
        train([*args(env, out, 2, *COMMON, "--max-steps", 1), "--init", str(out / "ckpt"), "--overwrite"])
    assert (out / "ckpt" / "model.safetensors").read_bytes() == before
    # a run's directory given where its checkpoint is meant
    with pytest.raises(CheckpointError, match=r"run: a train.py run directory; its checkpoint is .*run/ckpt"):
        train([*args(env, tmp_path / "other", 2, *COMMON), "--init", str(out)])
    with pytest.raises(SystemExit, match=r"--data .*nope\.json: no such file \(a LLaVA json or jsonl"):
        train([str(tmp_path / "nope.json") if a.endswith("chats.json") else a for a in args(env, tmp_path / "o")])


@pytest.mark.parametrize("flag, what", [("--vit", "an HF CLIP checkpoint"), ("--projector", "the released stage-1 "
                                        "mm_projector.bin"), ("--convnext", "a timm or open_clip ConvNeXt checkpoint")])
def test_a_missing_backbone_or_projector_file_is_named_before_anything_loads(env, tmp_path, flag, what):
    # they were found only once the parts before them had loaded, and a missing --projector was called
    # "not a readable PyTorch weights file ... damaged or cut short? download it again"
    with pytest.raises(SystemExit, match=rf"^error: {flag} .*nope: no such file or directory \({what} is expected\)$"):
        train([*args(env, tmp_path / "o", 2, *COMMON), flag, str(tmp_path / "nope")])


def test_resume_checks_the_data_by_content_and_says_what_else_changed(env, tmp_path, capsys):
    d, _ = env
    moved, out = tmp_path / "moved.json", tmp_path / "run"
    moved.write_bytes((d / "chats.json").read_bytes())
    with_data = lambda path, *extra: [str(path) if a.endswith("chats.json") else a  # noqa: E731
                                      for a in args(env, out, 2, *COMMON, *extra)]
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint in .*run \(nothing to continue\): drop --resume"):
        train(with_data(moved, "--resume"))
    train(with_data(moved, "--max-steps", 1))
    # the same records in another file: fine; a new lr: allowed, and said
    train(with_data(d / "chats.json", "--max-steps", 2, "--resume", "--lr", 5e-4))
    assert "--resume with settings other than the run's: --lr 0.001 -> 0.0005" in capsys.readouterr().out
    moved.write_text(json.dumps(json.loads(moved.read_text())[::-1]))  # the same path, other records
    with pytest.raises(SystemExit, match=r"--resume: --data .*moved\.json is not the file the run read .*give "
                                         r"that file, or start a new run from its weights: --init .*run/ckpt"):
        train(with_data(moved, "--max-steps", 3, "--resume"))
    with pytest.raises(SystemExit) as done:  # at step 2 already: nothing to do, and no error
        train(with_data(d / "chats.json", "--max-steps", 1, "--resume", "--lr", 5e-4))
    assert done.value.code is None
    assert ("nothing to train: the checkpoint is at step 2, and this run ends at step 1 (--max-steps 1); a larger "
            "--max-steps goes on") in capsys.readouterr().out
    train(with_data(d / "chats.json", "--resume", "--lr", 5e-4))  # to the end of its epoch
    with pytest.raises(SystemExit) as done:  # at the run's whole length, which --epochs sets
        train(with_data(d / "chats.json", "--max-steps", 20, "--resume", "--lr", 5e-4))
    assert done.value.code is None
    assert "run ends at step 10 (1 epoch(s)); a larger --epochs goes on" in capsys.readouterr().out  # 10 records
    # a train state cut short: named, with the way on
    state = tmp_path / "run" / "ckpt" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"^error: --resume: \S*train_state.pt is not a train state train.py wrote "
                                         r"\(.*\); the run cannot go on from it: a new run starts from its weights "
                                         r"with --init \S*run/ckpt and another --out$"):
        train(with_data(d / "chats.json", "--max-steps", 3, "--resume", "--lr", 5e-4))


def test_resume_refuses_another_tokenizer(env, tmp_path):
    d, tok = env
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 1))
    with_tok = lambda path, *extra: [str(path) if a == tok else a  # noqa: E731
                                     for a in map(str, args(env, out, 2, *COMMON, "--resume", *extra))]
    for name in ("moved", "bare", "other"):
        (tmp_path / name).mkdir()
    for name in ("moved", "bare"):  # bare: the same bytes, without the config that says legacy false
        shutil.copy(tok, tmp_path / name / "tok.model")
    train_spm(tmp_path / "other" / "tok", seed=1)  # another tokenizer, in the same mode
    for name in ("moved", "other"):
        shutil.copy(d / "tokenizer_config.json", tmp_path / name)
    for name, why in (("bare", r"legacy=True from the tokenizer_config.json beside it or its absence, the run's False"),
                      ("other", "other bytes")):
        with pytest.raises(SystemExit, match=rf"--resume: \S*{name}/tok.model is not the tokenizer the run trained "
                                             rf"with \({why}\): the token ids would change; drop --tokenizer to use "
                                             rf"the run's own copy, \S*run/ckpt/tokenizer.model, or start a new run"):
            train(with_tok(tmp_path / name / "tok.model", "--max-steps", 2))
    train(with_tok(tmp_path / "moved" / "tok.model", "--max-steps", 2))  # the same tokenizer elsewhere: fine
    assert len(losses(out)) == 2
    # a run saved before the mode was recorded tokenised in legacy mode, the only one there was then
    state_path = out / "ckpt" / "train_state.pt"
    state = torch.load(state_path, weights_only=True)
    run = {k: v for k, v in json.loads(state["run"]).items() if not k.startswith("tokenizer_")}
    torch.save(dict(state, run=json.dumps(run)), state_path)
    with pytest.raises(SystemExit, match=r"legacy=False from the tokenizer_config.json beside it or its absence, "
                                         r"the run's True"):
        train(with_tok(tmp_path / "moved" / "tok.model", "--max-steps", 3))
    train(with_tok(tmp_path / "bare" / "tok.model", "--max-steps", 3))  # its bytes, in legacy mode: goes on
    assert len(losses(out)) == 3


def test_resume_refuses_another_grouping_seed_or_a_checkpoint_as_the_run(env, tmp_path):
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 1))  # stage 2: grouped by default
    for extra, was, flag in ((("--no-group-by-length",), "group_by_length=True, now False", "--group-by-modality-length"),
                             (("--seed", 1), "seed=42, now 1", "--seed 42")):
        with pytest.raises(SystemExit, match=f"--resume: the run used {was}: the data position would not carry "
                                             f"over; give the run's {flag}, or start a new run from its weights: "
                                             f"--init .*run/ckpt and another --out"):
            train(args(env, out, 2, *COMMON, "--max-steps", 2, "--resume", *extra))
    # the checkpoint given as the run: dropping --resume would start a new run inside it
    with pytest.raises(SystemExit, match=r"--out .*run/ckpt is a checkpoint, not a run directory: pass the run that "
                                         r"holds it, --out \S*run$"):
        train(args(env, out / "ckpt", 2, *COMMON, "--max-steps", 2, "--resume"))
    # or as a new run's: the run's next save would delete it (--overwrite too)
    before = sorted(os.listdir(out / "ckpt"))
    for extra in ((), ("--overwrite",)):
        with pytest.raises(SystemExit, match=r"--out .*run/ckpt is a checkpoint, not a run directory: a run inside it "
                                             r"would be deleted when it is next replaced; pick another --out \(--init "
                                             r"\S*run/ckpt starts from its weights\)$"):
            train(args(env, out / "ckpt", 2, *COMMON, "--max-steps", 1, *extra))
    # or a directory inside it: deleted with it as well (a run there was accepted, then lost at that save)
    with pytest.raises(SystemExit, match=r"--out \S*run/ckpt/sub/run lies inside the checkpoint \S*run/ckpt: a run "
                                         r"there would be deleted when that checkpoint is next replaced; pick another "
                                         r"--out$"):
        train(args(env, out / "ckpt" / "sub" / "run", 2, *COMMON, "--max-steps", 1))
    # or the run's ckpt.old / ckpt.tmp (where a save puts the last checkpoint), a ckpt not yet saved, or any of
    # them through a link: each went at the holding run's next save
    (tmp_path / "link").symlink_to(out / "ckpt")
    with pytest.raises(SystemExit, match=r"^error: --out \S*link/sub lies inside the checkpoint \S*run/ckpt: "):
        train(args(env, tmp_path / "link" / "sub", 2, *COMMON, "--max-steps", 1))
    os.rename(out / "ckpt", out / "ckpt.kept")
    for name in ("ckpt.old", "ckpt.tmp", "ckpt"):
        with pytest.raises(SystemExit, match=rf"^error: --out \S*run/{name} is the checkpoint \S*run/{name}: a run "):
            train(args(env, out / name, 2, *COMMON, "--max-steps", 1))
        assert not (out / name).exists()
    os.rename(out / "ckpt.kept", out / "ckpt")
    assert sorted(os.listdir(out / "ckpt")) == before
    # a model directory that no run replaces (a merged or converted one) may hold runs
    shutil.copytree(out / "ckpt", tmp_path / "merged")
    (tmp_path / "merged" / "train_state.pt").unlink()
    train(args(env, tmp_path / "merged" / "runs" / "r", 2, *COMMON, "--max-steps", 1))
    train(args(env, out, 2, *COMMON, "--max-steps", 2, "--resume", "--group-by-length", "--seed", 42))


def test_resume_checks_the_data_as_it_was_read(env, tmp_path, monkeypatch):
    d, _ = env
    path, out = tmp_path / "data.json", tmp_path / "run"
    path.write_bytes((d / "chats.json").read_bytes())
    with_data = lambda *extra: [str(path) if a.endswith("chats.json") else a  # noqa: E731
                                for a in args(env, out, 2, *COMMON, *extra)]
    forward = mra.LlavaHR.forward

    def edit_then_forward(self, *a, **kw):  # the file is edited while the run trains on what it read
        path.write_text(json.dumps(json.loads((d / "chats.json").read_text())[::-1]))
        return forward(self, *a, **kw)

    monkeypatch.setattr(mra.LlavaHR, "forward", edit_then_forward)
    train(with_data("--max-steps", 1))
    monkeypatch.setattr(mra.LlavaHR, "forward", forward)
    with pytest.raises(SystemExit, match=r"--resume: --data .*data\.json is not the file the run read"):
        train(with_data("--max-steps", 2, "--resume"))
    path.write_bytes((d / "chats.json").read_bytes())  # as the run read it: it goes on
    train(with_data("--max-steps", 2, "--resume"))
    assert len(losses(out)) == 2


def test_skip_bad_resume_needs_the_same_usable_records(env, tmp_path):
    d, _ = env
    shutil.copytree(d / "images", tmp_path / "images")
    recs = json.loads((d / "chats.json").read_text())
    (tmp_path / "data.json").write_text(json.dumps([*recs, dict(id="late", image="late.png", conversations=conv(
        "<image>\nWhat is this?", "A car."))]))
    own = {str(d / "chats.json"): str(tmp_path / "data.json"), str(d / "images"): str(tmp_path / "images")}
    run = lambda *extra: train([own.get(a, a) for a in map(str, args(env, tmp_path / "run", 2, *COMMON,  # noqa: E731
                                                                        "--skip-bad", *extra))])
    run("--max-steps", 1)  # late.png is missing: 10 of the 11 records train
    shutil.copy(tmp_path / "images" / "0.png", tmp_path / "images" / "late.png")  # now it is there
    with pytest.raises(SystemExit, match=r"--resume: the run trained on 10 usable records of .*data\.json, now 11 "
                                         r"\(0 bad\): the data position would not carry over; restore the records and "
                                         r"images as the run had them, or start a new run from its weights: --init"):
        run("--max-steps", 2, "--resume")
    os.remove(tmp_path / "images" / "late.png")
    run("--max-steps", 2, "--resume")


def test_a_resumed_run_counts_the_samples_replaced_before_it(env, tmp_path, capsys):
    # an image that fails only as it loads: --skip-bad replaces that sample, and the log and the closing line
    # count it; a run cut after it and resumed counted from 0 again
    d, _ = env
    shutil.copytree(d / "images", tmp_path / "images")
    (tmp_path / "images" / "3.png").write_bytes(b"x")
    run = lambda out, *extra: train([str(tmp_path / "images") if a == str(d / "images") else a  # noqa: E731
                                     for a in map(str, args(env, out, 2, *COMMON, "--skip-bad", *extra))])
    run(tmp_path / "full", "--save-every", 0)
    full = capsys.readouterr().out
    run(tmp_path / "cut", "--max-steps", 5)
    run(tmp_path / "cut", "--resume")
    cut = capsys.readouterr().out
    skipped = lambda out: [json.loads(line)["skipped"] for line in open(out / "log.jsonl")]  # noqa: E731
    assert skipped(tmp_path / "cut") == skipped(tmp_path / "full") and skipped(tmp_path / "full")[-1] == 1
    assert "0 bad records skipped, 1 replaced at load time" in full.splitlines()[-1]
    assert cut.splitlines()[-1].endswith(full.splitlines()[-1].split("; ", 1)[1].replace("full", "cut"))


@pytest.mark.parametrize("flag", ["--max-steps", "--image-size", "--max-len", "--global-batch"])
def test_a_zero_flag_is_refused_not_read_as_left_out(env, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        train(args(env, tmp_path / "o", 2, flag, 0))
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"need {flag} >= " in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("seed", [-1, 10**14])
def test_a_seed_out_of_range_is_refused_by_name(env, tmp_path, capsys, seed):
    # 10**14 passed torch.manual_seed, then overflowed in epoch_order once the model had loaded, as
    # "error: Overflow when unpacking long long"
    with pytest.raises(SystemExit) as e:
        train(args(env, tmp_path / "o", 2, *COMMON, "--max-steps", 1, "--seed", seed))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "need 0 <= --seed < 2**32" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_a_checkpoint_without_its_tokenizer_names_the_flag(env, tmp_path):
    mra.save_checkpoint(mra.build(mra.MRAConfig.from_dict(tiny_dict())), tmp_path / "init")  # no tokenizer.model
    argv = [a for a in map(str, args(env, tmp_path / "o", 2, "--init", tmp_path / "init")) if a != env[1]]
    argv.remove("--tokenizer")
    with pytest.raises(SystemExit, match=r"init: no tokenizer.model beside the weights: pass --tokenizer"):
        train(argv)


def test_resume_after_a_save_where_some_parameters_had_no_gradient(env, tmp_path):
    d, _ = env
    # text-only data: the towers, adapters and projector never get a gradient, so Adam has no
    # state for them in the checkpoint
    (d / "text.json").write_text(json.dumps([dict(id=i, conversations=conv(f"Say {w}.", w))
                                             for i, w in enumerate(["yes", "no", "red", "blue"])]))
    text = [a if a != str(d / "chats.json") else str(d / "text.json") for a in map(str, args(env, "", 2))]
    run = lambda out, *extra: train([*text[:text.index("--out")], "--out", str(out), "--workers", "0", *map(str, extra)])  # noqa: E731
    run(tmp_path / "full", *COMMON, "--max-steps", 3)
    run(tmp_path / "cut", *COMMON, "--max-steps", 1)
    run(tmp_path / "cut", *COMMON, "--max-steps", 3, "--resume")
    assert_same(weights(tmp_path / "cut"), weights(tmp_path / "full"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_log_holds_each_step_once_after_a_crash_and_resume(env, tmp_path, monkeypatch):
    train(args(env, tmp_path / "full", 2, *COMMON, "--max-steps", 5))
    forward, calls = mra.LlavaHR.forward, []

    def crash_at_4(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return forward(self, *a, **kw)

    monkeypatch.setattr(mra.LlavaHR, "forward", crash_at_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(args(env, tmp_path / "cut", 2, *COMMON, "--max-steps", 5, "--save-every", 2))
    monkeypatch.setattr(mra.LlavaHR, "forward", forward)
    assert len(losses(tmp_path / "cut")) == 3  # steps 1-3 logged, the checkpoint holds step 2
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and a line the kill cut short
    train(args(env, tmp_path / "cut", 2, *COMMON, "--max-steps", 5, "--save-every", 2, "--resume"))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_resume_reads_a_damaged_log_and_says_what_it_lacks(env, tmp_path, monkeypatch, capsys):
    out, real_fsync, real_replace, synced = tmp_path / "run", os.fsync, os.replace, []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    train(args(env, out, 2, *COMMON, "--max-steps", 4, "--save-every", 2))
    # the log reaches the disk at each save, before the checkpoint: after a crash it holds every step saved
    assert synced.count((out / "log.jsonl").stat().st_ino) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    # a log edited by hand: bytes that are no text are dropped as a line cut short is; steps 2-4 are gone
    (out / "log.jsonl").write_bytes((out / "log.jsonl").read_bytes().splitlines(keepends=True)[0] + b"\xff\xfe\n")
    capsys.readouterr()
    train(args(env, out, 2, *COMMON, "--max-steps", 5, "--save-every", 2, "--resume"))
    assert "log.jsonl ends at step 1, the checkpoint is at step 4: steps 2-4 are not in it" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 5]
    # a full disk as --resume rewrites the log: one line, and the log as it was
    before = (out / "log.jsonl").read_bytes()

    def full(src, dst):
        if str(dst).endswith("log.jsonl"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit, match=r"^error: --resume: rewriting \S*run/log.jsonl failed \(No space left on "
                                         r"device\); the run is as it was: once there is room \(a full disk\?\), run "
                                         r"the same command again$"):
        train(args(env, out, 2, *COMMON, "--max-steps", 6, "--resume"))
    assert (out / "log.jsonl").read_bytes() == before and not (out / "log.jsonl.tmp").exists()


def test_an_early_ctrl_c_says_what_there_is_to_resume(env, tmp_path):
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 1))
    # Ctrl-C early in the start-up (as while torchrun's ranks wait for each other), before --out is looked at
    code = ("import runpy, sys, torch\n"
            "def interrupt(*a): raise KeyboardInterrupt\n"
            "torch.set_flush_denormal = interrupt\n"
            f"sys.argv = [{TRAIN!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({TRAIN!r}, run_name='__main__')")
    for extra, said in ((("--resume",), f"interrupted: the last checkpoint {out / 'ckpt'} is intact; --resume "
                                        f"continues from it"),
                        ((), "interrupted: nothing was saved; run it again to start")):
        r = subprocess.run([sys.executable, "-c", code, *map(str, args(env, out if extra else tmp_path / "new", 2,
                                                                       *COMMON, *extra))],
                           cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=300)
        assert one_line(r) == said


def test_a_run_is_refused_an_out_where_another_is_running(env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # another train.py, started at the same time, holds the lock on --out (a process of its own: the lock is per process)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a')\n"
                               "fcntl.lockf(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(300)",
                               str(out / "train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=r"--out \S*run: another train.py is running in it \(it holds "
                                             r"\S*run/train.lock\); wait for it to end, or pick another --out$"):
            train(args(env, out, 2, *COMMON, "--max-steps", 1))
    finally:
        holder.kill()
        holder.wait()
    train(args(env, out, 2, *COMMON, "--max-steps", 1))  # once it has ended
    assert len(losses(out)) == 1


def test_an_out_that_cannot_be_locked_is_said_and_trains(env, tmp_path, monkeypatch, capsys):
    # a file system without POSIX locks (some NFS, FUSE) is no other run: said, and the run goes on
    import fcntl

    def no_locks(*a):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    train(args(env, tmp_path / "run", 2, *COMMON, "--max-steps", 1))
    assert len(losses(tmp_path / "run")) == 1 and "cannot be locked (No locks available)" in capsys.readouterr().out


def test_an_out_that_cannot_be_written_fails_before_the_model_loads(env, tmp_path, monkeypatch):
    def build(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mra, "build", build)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out \S*file/run: cannot be created or written \(Not a directory: "
                                         r"\S*file/run\); pick a writable --out$"):
        train(args(env, tmp_path / "file" / "run", 2, *COMMON))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsync'd file by /proc/self/fd (Linux)")
def test_a_save_is_on_the_disk_before_its_renames(env, tmp_path, monkeypatch):
    out, events = tmp_path / "run", []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or replace(a, b))
    train(args(env, out, 2, *COMMON, "--max-steps", 2, "--save-every", 1))  # the second save replaces a checkpoint
    ckpt, tmp = os.path.realpath(out / "ckpt"), os.path.realpath(out / "ckpt.tmp")
    files = {os.path.join(r, n).replace(ckpt, tmp) for r, _, names in os.walk(ckpt) for n in names}
    files = {f + ".tmp" if f.endswith("/train_state.pt") else f for f in files}  # synced under its temporary name
    synced = lambda a, b: {e[1] for e in events[a:b] if e[0] == "fsync"}  # noqa: E731
    renamed = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(out / "ckpt")]  # ckpt.tmp -> ckpt
    # train_state.pt goes into place last, once the rest is on the disk: a ckpt.tmp that holds it is complete
    state = [i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("ckpt.tmp/train_state.pt")]
    assert len(renamed) == len(state) == 2 and synced(0, state[0]) >= files | {tmp}  # the files and their directory
    assert ("fsync", tmp) in events[state[0]:renamed[0]]
    aside = events.index(("replace", str(out / "ckpt"), str(out / "ckpt.old")))  # the second save's
    assert renamed[0] < state[1] < aside < renamed[1] and synced(renamed[0] + 1, state[1]) >= files | {tmp}
    assert ("fsync", os.path.realpath(out)) in events[renamed[1]:]  # the renames themselves


def test_resume_finishes_a_save_cut_between_its_renames(env, tmp_path, monkeypatch, capsys):
    out, replace, saves = tmp_path / "run", os.replace, []

    def killed_at_second_save(a, b):  # its ckpt -> ckpt.old done, its ckpt.tmp -> ckpt not
        saves.extend([1] if str(b) == str(out / "ckpt") else [])
        if len(saves) == 2:
            raise RuntimeError("killed")
        return replace(a, b)

    monkeypatch.setattr(os, "replace", killed_at_second_save)
    with pytest.raises(RuntimeError, match="killed"):
        train(args(env, out, 2, *COMMON, "--max-steps", 2, "--save-every", 1))
    monkeypatch.setattr(os, "replace", replace)
    assert {"ckpt.old", "ckpt.tmp"} <= set(os.listdir(out)) and not (out / "ckpt").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:  # from ckpt.tmp, step 2, not ckpt.old's step 1
        train(args(env, out, 2, *COMMON, "--max-steps", 2, "--resume"))
    assert done.value.code is None
    said = capsys.readouterr().out
    assert f"--resume: {out / 'ckpt'}.tmp held the complete checkpoint of a save cut short before its last rename: " \
           f"that save is finished, as {out / 'ckpt'}\n" in said
    assert "nothing to train: the checkpoint is at step 2, and this run ends at step 2 (--max-steps 2)" in said
    assert not (out / "ckpt.tmp").exists() and not (out / "ckpt.old").exists()
    train(args(env, out, 2, *COMMON, "--max-steps", 3, "--resume"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("limit", [64_000, 1_500_000])  # the weights' file fails, or (torch.save) train_state.pt
def test_a_failed_save_keeps_the_last_checkpoint(env, tmp_path, limit):
    out = tmp_path / "run"
    train(args(env, out, 2, *COMMON, "--max-steps", 1))

    def small_disk():  # writes past the limit fail (EFBIG) as they would on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_train(args(env, out, 2, *COMMON, "--max-steps", 2, "--resume", "--workers", 0), preexec_fn=small_disk)
    line = one_line(r)
    assert "step 2: saving to" in line and "is untouched" in line and "--resume" in line
    assert "File too large" in line if limit < 100_000 else "failed (a file could not be written in full)" in line
    assert not os.path.exists(out / "ckpt.tmp")
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1
    mra.load_checkpoint(str(out / "ckpt"))


def test_a_full_disk_under_the_log_is_one_line_and_the_run_resumes(env, tmp_path, monkeypatch):
    out, real_open = tmp_path / "run", open

    class Full:  # log.jsonl on a disk that fills up at its third line
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if str(path).endswith("log.jsonl") and mode == "a" else f

    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(SystemExit, match=r"^error: step 3: writing \S*run/log.jsonl failed \(No space left on device\); "
                                         r"the last checkpoint \S*run/ckpt is untouched; once the cause is fixed \(a "
                                         r"full disk\?\), --resume continues from it$"):
        train(args(env, out, 2, *COMMON, "--max-steps", 4, "--save-every", 2))
    monkeypatch.setattr(builtins, "open", real_open)
    train(args(env, out, 2, *COMMON, "--max-steps", 4, "--save-every", 2, "--resume"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3, 4]


def test_first_turn_from_gpt_is_dropped_as_released(env, tmp_path):
    recs = records()
    recs[1]["conversations"] = [{"from": "gpt", "value": "Hello."}] + recs[1]["conversations"]
    path = write_dataset(tmp_path, recs)
    ds = data.LlavaDataset(path, str(tmp_path / "images"), Tokenizer(env[1]), "vicuna_v1", 32)
    assert len(ds) == 4 and ds.dropped_first == 1
    assert ds.records[1]["turns"] == [(c["from"], c["value"]) for c in records()[1]["conversations"]]


def test_train_user_errors_are_one_line(env, tmp_path):
    d, tok = env
    good = json.loads((d / "chats.json").read_text())
    files = {"no_conv.json": [dict(id=1, image="0.png")], "no_image.json": [dict(good[0], image="gone.png")],
             "empty.json": None}
    for name, recs in files.items():
        (tmp_path / name).write_text("" if recs is None else json.dumps(recs))
    (tmp_path / "bad.json").write_text('{"arch": "llava-hr",\n "image_size": }')
    weights_only = tmp_path / "w" / "ckpt"
    mra.save_checkpoint(mra.build(mra.MRAConfig.from_dict(json.loads(json.dumps(tiny_dict())))), weights_only)
    base = args(env, tmp_path / "o", 2, "--max-steps", 1)
    from_init = [*base, "--init", weights_only]
    with_data = lambda f: [str(tmp_path / f) if a == str(d / "chats.json") else a for a in map(str, base)]  # noqa: E731
    cases = {
        "record without conversations": (with_data("no_conv.json"), "record 0 (id 1): no conversations"),
        "missing image": (with_data("no_image.json"), "gone.png"),
        "empty data file": (with_data("empty.json"), "empty.json: empty file"),
        "batch size 0": ([*base, "--batch-size", 0], "--batch-size >= 1"),
        "lr nan": ([*base, "--lr", "nan"], "--lr > 0"),
        "config not json": ([*base, "--config", tmp_path / "bad.json"], "bad.json line 2: not valid JSON"),
        "resume without train state": ([*args(env, tmp_path / "w", 2), "--resume"], "has no train_state.pt"),
        "out is a file": (args(env, tmp_path / "bad.json", 2), f"--out {tmp_path / 'bad.json'}: is a file"),
        # refused at the start, not at the first long sample (the tiny LLM's context is 512)
        "max len past the context": ([*base, "--max-len", 600], "--max-len 600: a sample with an image would take 599 "
                                     "text + 16 visual positions, over the LLM's context of 512; --max-len 497 at most"),
        # flags that would go unused, silently
        "parts and init": ([*from_init, "--projector", "p.bin"], "--init gives the whole model, so --projector would "
                           "go unused: drop one or the other"),
        "freeze with lora": ([*from_init, "--lora-r", 4, "--freeze-llm"], "--freeze-llm / --freeze-vision with --lora-r"),
        "no adapters on adapters": ([*from_init, "--no-adapters"], "--no-adapters: --init " + str(weights_only)
                                    + " has MR-Adapters; the fusion-only ablation starts from a model without them"),
        "another gate": ([*from_init, "--gate", "sigmoid"], "--gate sigmoid: --init " + str(weights_only)
                         + " has MR-Adapters with the tanh gate"),
    }
    if not torch.cuda.is_available():
        cases["no GPU"] = ([*base, "--device", "cuda"], "--device cuda: no CUDA GPU is visible")
    # two at a time (each mostly imports torch), each in an --out of its own
    own = [[str(tmp_path / f"o{i}") if a == str(tmp_path / "o") else a for a in map(str, argv)]
           for i, (argv, _) in enumerate(cases.values())]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_train, own))
    for (name, (_, expected)), r in zip(cases.items(), results):
        line = one_line(r)  # whichever way it comes (argparse, train.py, runs.py, the hook)
        assert expected in line and line.startswith(("error: ", "train.py: error: ")), (name, line)


def tiny_dict():
    from test_train import tiny
    return tiny().to_dict()


# -----------------------------------------------------------------------------
# generate.py: inputs checked before the model loads, repeats answered, a padded vocabulary


def batch_argv(model_dir, images, q, a):  # noqa: F811
    return ["--model", model_dir, "--questions", q, "--answers", a, "--image-folder", images[0].parent,
            "--max-new-tokens", 2]


@pytest.mark.parametrize("lines, expected", [
    (['{"question_id": 1, "text": null}'], "line 1: text must be a string"),
    (['{"question_id": [1], "text": "Hi"}'], "line 1: question_id must be a string or an integer"),
    (['{"question_id": 1, "text": "Hi"}', '{"question_id": 2, "text": '], "q.jsonl line 2: not JSON"),
    (['{"question_id": 1, "text": "Hi", "image": "nope.png"}'], "line 1: image file not found"),
    (['{"question_id": 1, "text": "Hi", "image": ""}'], "line 1: image must be a file name, not ''"),
    # JSON's true is no id, though Python's bool is an int; a number is no file name (it was a TypeError)
    (['{"question_id": true, "text": "Hi"}'], "line 1: question_id must be a string or an integer"),
    (['{"question_id": 1, "text": "Hi", "image": 5}'], "line 1: image must be a file name, not 5"),
])
def test_bad_questions_fail_before_the_model_loads(model_dir, images, tmp_path, capsys, lines, expected):  # noqa: F811
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 1 and expected in err and len(err.splitlines()) == 1 and "loading" not in err, err
    assert not a.exists()


def test_a_question_asked_twice_is_answered_twice(model_dir, images, tmp_path, capsys):  # noqa: F811
    # TextVQA's question_id is the image's id: two askers of one image may ask the same text, and the
    # release answers (and scores) each line; a resume counts how often a pair is already answered
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    lines = ['{"question_id": 1, "text": "Hi"}', '{"question_id": 2, "text": "Hi"}', '{"question_id": 1, "text": "Hi"}']
    q.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    answers = [json.loads(x) for x in a.read_text().splitlines()]
    assert code == 0 and "1 lines of" in err and [x["question_id"] for x in answers] == [1, 2, 1], err
    a.write_text("".join(json.dumps(x) + "\n" for x in answers[:2]))  # stopped before the third
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 0 and "resuming: 2 of 3" in err and len(a.read_text().splitlines()) == 3
    a.write_text("".join(json.dumps(x) + "\n" for x in answers + answers[:1]))  # 1 answered three times
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 1 and "line 4: answers question_id 1 with a prompt that" in err and "that often" in err, err


def test_generate_flag_slips_are_one_line_naming_the_flag(model_dir, images, tmp_path, capsys):  # noqa: F811
    img, ask = images[0], ("--prompt", "What is it?")
    refused = {  # by the parser: exit status 2
        "two images": (["--image", img, "--image", images[1], *ask], "one --image per conversation"),
        "empty prompt": (["--image", img, "--prompt", "  "], "--prompt is empty"),
        "empty image": (["--image", "", *ask], "--image is empty: name an image file, or drop --image"),
        "a batch flag with one prompt": ([*ask, "--image-folder", tmp_path], "go with --questions"),
        "one bad limit": ([*ask, "--max-new-tokens", 0], "need --max-new-tokens >= 1 (see --help)"),
    }
    for name, (argv, expected) in refused.items():
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, "--model", model_dir, *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, (name, err)
    (tmp_path / "a.jsonl").mkdir()
    failed = {  # by run(), before the model loads: exit status 1
        "image is a directory": (["--model", model_dir, "--image", tmp_path, *ask],
                                 f"--image {tmp_path}: a directory, not an image file"),
        "model is a file": (["--model", img, *ask], "a file; a checkpoint directory is expected"),
        "no questions file": (["--model", model_dir, "--questions", tmp_path / "q.jsonl", "--answers", tmp_path / "x"],
                              "q.jsonl: no such file (a LLaVA question .jsonl is expected)"),
        "answers is a directory": (["--model", model_dir, "--questions", img, "--answers", tmp_path / "a.jsonl"],
                                   "a.jsonl: not a file (a directory, a device?); name the .jsonl file to write"),
        # /dev/full was read to its end, which never comes, until the memory ran out
        "answers is a device": (["--model", model_dir, "--questions", img, "--answers", os.devnull],
                                f"--answers {os.devnull}: not a file (a directory, a device?)"),
        # it said "no such file" of a directory, and of a pipe (bash's <(...))
        "questions is a directory": (["--model", model_dir, "--questions", tmp_path, "--answers", tmp_path / "x"],
                                     f"--questions {tmp_path}: not a file (a directory, or a pipe such as <(...)?); "
                                     f"save the questions as a .jsonl file"),
        "trace is a directory": (["--model", model_dir, "--image", img, "--trace", tmp_path],  # "exists; delete it"
                                 f"--trace {tmp_path}: a directory; name the picture's file in it (--trace DIR/OUT.png)"),
    }
    for name, (argv, expected) in failed.items():
        code, _, err = run_cli(capsys, *argv)
        assert code == 1 and expected in err and len(err.splitlines()) == 1 and "loading" not in err, (name, err)
    # an image too thin to pad square, found once the model's R is known: it did not name --image
    Image.new("RGB", (1, 60000)).save(tmp_path / "thin.png")
    code, _, err = run_cli(capsys, "--model", model_dir, "--image", tmp_path / "thin.png", *ask)
    assert code == 1 and err.splitlines()[-1].startswith(f"error: --image {tmp_path / 'thin.png'}: an image of 1 x "
                                                         f"60000 pixels is too thin"), err
    shutil.copytree(model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("mra_config.json"))
    code, _, err = run_cli(capsys, "--model", tmp_path / "m", *ask)
    assert code == 1 and err.splitlines()[-1] == f"error: {tmp_path / 'm'}: neither mra_config.json (a train.py " \
        f"checkpoint) nor config.json (a released LLaVA checkpoint): not a checkpoint directory, or one missing its config"


def test_what_generate_cannot_write_or_compile_is_one_line_and_nothing_is_lost(model_dir, images, tmp_path,  # noqa: F811
                                                                               capsys, monkeypatch):
    import kernels
    import questions
    import trace_image
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(dict(question_id=i, text=f"Say {i}.")) + "\n" for i in range(3)))
    # --compile on a CPU without a C++ compiler: inductor's InvalidCxxCompiler traceback, after the load
    monkeypatch.setattr(kernels, "cpp_compiler", lambda: False)
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--compile")
    assert code == 1 and err == "error: --compile on a CPU needs a C++ compiler, and none was found (g++, or the one " \
        "CXX names): install one, or drop --compile\n", err
    monkeypatch.undo()
    # a full disk as the second answer is written: the first is kept, and a rerun goes on ("error: [Errno 28]
    # No space left on device" it said)
    writes, write_all = [], generate.write_all

    def full_disk(f, data):
        writes.append(data)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_all(f, data)
    monkeypatch.setattr(generate, "write_all", full_disk)
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 1 and err.splitlines()[-1] == f"error: --answers {a}: writing failed (No space left on device); " \
        f"the answers before it are kept: once there is room, the same command goes on", err
    assert len(a.read_text().splitlines()) == 1
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 0 and "resuming: 1 of 3" in err and len(a.read_text().splitlines()) == 3
    # an --answers that cannot be opened for writing (a read-only folder; root writes anywhere, so faked)
    def read_only(path, mode="r", *args, **kw):
        if "a" in mode:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return builtins.open(path, mode, *args, **kw)
    monkeypatch.setattr(questions, "open", read_only, raising=False)
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, tmp_path / "b.jsonl"))
    assert code == 1 and err == f"error: --answers {tmp_path / 'b.jsonl'}: cannot be written (Read-only file " \
        f"system); name a file where you can write\n", err
    monkeypatch.undo()
    # --trace: a picture that appeared while the model ran (another run's) is kept, not replaced; one that
    # cannot be written in full leaves nothing
    picture, paths_picture = tmp_path / "t.png", trace_image.paths_picture

    def meanwhile(*args):
        picture.write_bytes(b"another run's")
        return paths_picture(*args)
    monkeypatch.setattr(trace_image, "paths_picture", meanwhile)
    code, _, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--trace", picture)
    assert code == 1 and err.splitlines()[-1] == f"error: --trace {picture}: appeared while the model ran (another " \
        f"run's picture?), and is kept; name another picture", err
    assert picture.read_bytes() == b"another run's"
    monkeypatch.undo()
    picture.unlink()
    monkeypatch.setattr(trace_image, "open", lambda path, mode: FullFile(builtins.open(path, mode)), raising=False)
    code, _, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--trace", picture)
    assert code == 1 and err.splitlines()[-1] == f"error: --trace {picture}: cannot be written (No space left on " \
        f"device), and nothing is left there; free some space, or name another place", err
    assert not picture.exists()
    # nor by a Ctrl-C (or SIGTERM) as it is written: the picture cut short stayed, and a rerun refused it
    monkeypatch.setattr(trace_image, "open", lambda path, mode: FullFile(builtins.open(path, mode), KeyboardInterrupt),
                        raising=False)
    with pytest.raises(KeyboardInterrupt):
        trace_image.write_new(Image.new("RGB", (8, 8)), str(picture))
    assert not picture.exists()
    monkeypatch.undo()
    # an answers file made by a run stopped inside open() (the file made, the object not yet): it was left, empty
    def made_then_stopped(path, mode="r", *args, **kw):
        builtins.open(path, mode, *args, **kw).close()
        raise KeyboardInterrupt
    monkeypatch.setattr(questions, "open", made_then_stopped, raising=False)
    with pytest.raises(KeyboardInterrupt):
        with questions.answers_lock(str(tmp_path / "c.jsonl")):
            pass
    assert not (tmp_path / "c.jsonl").exists()


def test_a_second_ctrl_c_while_a_stop_is_said_never_says_nothing_was_written(capsys, monkeypatch):
    # once a command says what its stop keeps, a Ctrl-C landing as it says so reached the hook set before torch
    # loaded, which said "nothing was written" of a run that had written its upload
    import failures
    monkeypatch.setattr(failures, "_nothing_yet", "interrupted: nothing was written")
    failures.handling()
    failures._uncaught(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "interrupted\n"


class FullFile:
    """A file on a full disk: its first write fails part way (or is stopped there by `stop`)."""

    def __init__(self, f, stop=None):
        self.f, self.stop = f, stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:10])
        raise self.stop() if self.stop else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_answer_whose_reader_went_away_ends_quietly(model_dir, images):  # noqa: F811
    # `generate.py ... | head -1`: "error: [Errno 32] Broken pipe" it said, and Python's exit flush after it
    p = subprocess.Popen([sys.executable, "generate.py", "--model", str(model_dir), "--prompt", "Hi",
                          "--max-new-tokens", "8"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first word
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and "error" not in err and "Exception" not in err, err


def test_a_long_question_is_skipped_and_a_bad_image_named_by_line(model_dir, images, tmp_path, capsys):  # noqa: F811
    folder, q, a = images[0].parent, tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    long = " ".join(["stripes"] * 600)  # beyond the tiny model's 512 positions
    rows = [dict(question_id=1, image=images[0].name, text="Hi"), dict(question_id="long", text=long),
            dict(question_id=3, image=images[1].name, text="Hi")]
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a, "--image-folder", folder,
                           "--max-new-tokens", 2)
    assert code == 0 and f"skipped {q} line 2 (question_id 'long'): the question too long" in err, err
    assert "1 question(s) skipped, too long for the context (lines 2)" in err
    assert [json.loads(line)["question_id"] for line in open(a)] == [1, 3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    q.write_text(q.read_text() + json.dumps(dict(question_id=4, image=str(bad), text="Hi")) + "\n")
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a, "--image-folder", folder,
                           "--max-new-tokens", 2)
    assert code == 1 and f"error: {q} line 4 (question_id 4): {bad}: cannot read image" in err, err
    assert "the answers so far are kept" in err and len(open(a).readlines()) == 2


def test_one_id_two_questions_each_answered_once_across_a_resume(model_dir, images, tmp_path, capsys):  # noqa: F811
    # MME asks two questions per image under one question_id
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qs = [dict(question_id="img.png", image=images[0].name, text=t) for t in ("Is it red?", "Is it blue?")]
    q.write_text(json.dumps(qs[0]) + "\n")
    assert run_cli(capsys, *batch_argv(model_dir, images, q, a))[0] == 0  # interrupted after the first
    q.write_text("".join(json.dumps(x) + "\n" for x in qs))
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    answers = [json.loads(line) for line in open(a)]
    assert code == 0 and "resuming: 1 of 2" in err
    assert [(x["question_id"], x["prompt"]) for x in answers] == [("img.png", t["text"]) for t in qs]


def test_garbage_answers_line_is_named(model_dir, images, tmp_path, capsys):  # noqa: F811
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    a.write_text('{"question_id": 1, "prompt": "Hi", "text": "ok"}\ngarbage\n')
    code, _, err = run_cli(capsys, *batch_argv(model_dir, images, q, a))
    assert code == 1 and "a.jsonl line 2: not JSON" in err and "loading" not in err


def padded_checkpoint(model_dir, path, vocab):  # noqa: F811
    """model_dir's model (500 pieces) with `vocab` embedding rows. With more rows than pieces the
    head is zero: every logit ties, so sampling unguarded would pick ids without text 3 times in 4."""
    m = mra.load_checkpoint(str(model_dir))
    llm = LlamaConfig(**{**vars(m.cfg.llm), "vocab_size": vocab})
    big = mra.build(mra.MRAConfig(**{**vars(m.cfg), "llm": llm}))
    state = m.state_dict()
    for k, v in big.state_dict().items():
        n = min(v.shape[0], state[k].shape[0]) if v.dim() else None
        v.copy_(state[k]) if v.shape == state[k].shape else v[:n].copy_(state[k][:n])
    if vocab > 500:
        big.llm.output.weight.data.zero_()
    mra.save_checkpoint(big, path)
    os.link(model_dir / "tokenizer.model", path / "tokenizer.model")
    return path


def test_padded_vocabulary_never_samples_an_id_without_text(model_dir, images, tmp_path, capsys):  # noqa: F811
    path = padded_checkpoint(model_dir, tmp_path / "padded", 2000)
    code, out, err = run_cli(capsys, "--model", path, "--image", images[0], "--prompt", "Hi",
                             "--max-new-tokens", 8, "--temperature", 1.0, "--seed", 0)
    assert code == 0 and "error" not in err and out.strip(), err


def test_tokenizer_larger_than_the_llm_is_refused(model_dir, images, tmp_path, capsys):  # noqa: F811
    path = padded_checkpoint(model_dir, tmp_path / "small", 400)
    code, out, err = run_cli(capsys, "--model", path, "--prompt", "Hi")
    assert code == 1 and "500 pieces, the LLM only 400 embeddings" in err and out == ""


@pytest.mark.parametrize("flags, expected", [
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--temperature", "nan"], "a finite --temperature"),
    (["--device", "cuda"], "no CUDA GPU is visible"),
    # torch tracebacks after the load before: devices torch names but cannot compute on, a seed past its range
    (["--device", "meta"], "error: --device meta: torch cannot run the model on it here ("),
    (["--device", "xla"], "error: --device xla: torch cannot run the model on it here (Could not run "),  # (torch's words)
    (["--device", "xpu"], "error: --device xpu: torch cannot run the model on it here ("),
    (["--seed", "99999999999999999999999", "--temperature", "1"],
     "error: need --seed from -2**63 to 2**64 - 1 (torch's range) (see --help)"),
])
def test_bad_flags_are_one_line(model_dir, capsys, flags, expected):  # noqa: F811
    if "cuda" in flags and torch.cuda.is_available() or "xpu" in flags and torch.xpu.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", str(model_dir), "--prompt", "Hi", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_chat_with_stdin_closed_and_an_over_long_turn(model_dir, images, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run_cli(capsys, "--model", model_dir, "--max-new-tokens", 2)
    assert code == 0 and err.endswith("USER: \n"), err  # the end of the input ends the prompt's line too
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 600 + "\nWhat is this?\n"))
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--max-new-tokens", 2)
    assert code == 0 and "error: conversation too long" in err and err.count("ASSISTANT: ") == 1, err
    # a way out a chat has (it said "shorten it or lower --max-new-tokens", as a prompt's refusal does)
    assert "> the context of 512 (type a shorter turn, or exit and start a new conversation; a lower " \
        "--max-new-tokens next time)\n" in err, err
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "word " * 600, "--max-new-tokens", 2)
    assert code == 1 and err.endswith("> the context of 512 (shorten it or lower --max-new-tokens)\n"), err


# -----------------------------------------------------------------------------
# loaders and weights.py convert


def test_config_problems_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(vocab_size=32, num_hidden_layers=1)))
    with pytest.raises(CheckpointError, match=r"config.json: the field 'hidden_size' is missing"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "mra_config.json").write_text('{\n"arch": "llava-hr",\n}')
    with pytest.raises(CheckpointError, match=r"mra_config.json line 3: not valid JSON"):
        mra.load_checkpoint(str(tmp_path))
    # JSON, but not an object: said so, once, not as a Python error about lists
    for name, text, kind in (("mra_config.json", "[1, 2]", "list"), ("config.json", '"llava"', "str")):
        (tmp_path / "mra_config.json").unlink(missing_ok=True)
        (tmp_path / name).write_text(text)
        with pytest.raises(CheckpointError) as e:
            mra.load_checkpoint(str(tmp_path))
        assert str(e.value) == f"{tmp_path / name}: a JSON {kind}, not an object of config fields; is this the right file?"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["vit"].update(heads=3), "3 heads do not divide width 32"),
    (lambda d: d["vit"].update(patch_size=0), "patch_size is 0, expected a positive whole number"),
    (lambda d: d["vit"].update(patch_size=224), "vit.image_size 112 is below one patch of 224"),
    (lambda d: d["convnext"].update(dims=[8, 16]), "convnext: 4 depths for 2 dims, one of each per stage"),
    (lambda d: d["convnext"].update(eps=0), "eps is 0, expected a positive, finite number"),
    # Infinity is JSON to Python: an eps or a RoPE base of inf loaded and answered NaN or without RoPE
    (lambda d: d["llm"].update(norm_eps=float("inf")), r"norm_eps is inf, expected a positive, finite number"),
    (lambda d: d["vit"].update(eps=float("inf")), r"vit.eps is inf, expected a positive, finite number"),
    # a string "false" is true to Python: the head was untied (a key error) or adapters built
    (lambda d: d["llm"].update(tie_embeddings="false"), "tie_embeddings is 'false', expected true or false"),
    (lambda d: d.update(adapters="no"), "adapters is 'no', expected true or false"),
    # grids that do not divide failed after the model loaded, naming neither file nor field
    (lambda d: d.update(image_size=100), r"image_size 100 gives the ConvNeXt a 3x3 grid and the ViT a 8x8 one")])
def test_tower_config_problems_name_the_file(tmp_path, edit, message):
    """The towers' fields in mra_config.json are checked as the LLM's are: before, a ViT whose heads do
    not divide its width loaded and failed at the first image, deep in attention (and a patch of 0 or
    a stage list shorter than its depths were a ZeroDivisionError or an IndexError)."""
    from test_mra import tiny_cfg
    d = tiny_cfg().to_dict()
    edit(d)
    (tmp_path / "mra_config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"mra_config.json: not a valid config \\(.*{message}"):
        mra.load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("tower, field, value, expected", [
    ("vit", "width", 33, "vit: 2 heads do not divide width 33"),
    ("vit", "patch_size", 0, "vit.patch_size is 0, expected a positive whole number"),
    ("vit", "heads", "2", "vit.heads is '2', expected a positive whole number"),
    ("convnext", "depths", [1, 1, 1], "convnext: 3 depths for 4 dims, one of each per stage"),
    ("convnext", "dims", [8, 16, -24, 32], r"convnext.dims is \(8, 16, -24, 32\), expected a list of positive"),
])
def test_a_bad_tower_config_is_one_line_naming_the_field(env, tmp_path, tower, field, value, expected):
    # --config (or a checkpoint's mra_config.json): refused as it is read, not as a shape error in torch at
    # the first forward
    cfg = tiny_dict()
    cfg[tower][field] = value
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"cfg.json: not a valid config \({expected}"):
        train(args(env, tmp_path / "o", 2, *COMMON, "--max-steps", 1, "--config", tmp_path / "cfg.json"))


def test_integer_weights_are_refused_by_name():
    cfg = LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    state = {k: v for k, v in Llama(cfg).state_dict().items()}
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"].long()}
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight holds torch.int64 values"):
        Llama.from_pretrained((cfg, hf))


def test_convert_keeps_a_tied_head_and_writes_readable_files(tmp_path, monkeypatch):
    """A .bin whose lm_head is the embedding's storage (tied) converts (safetensors stores shared
    storage only once: each key gets its own copy); the files are readable by all as plain writes
    are (safetensors makes them 0o600); a failed write (a full disk) is a CheckpointError, nothing left."""
    src = tmp_path / "tied"
    src.mkdir()
    emb = torch.randn(8, 4)
    torch.save({"model.embed_tokens.weight": emb, "lm_head.weight": emb}, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    old = os.umask(0o022)
    try:
        convert_bin(str(src), str(tmp_path / "out"))
    finally:
        os.umask(old)
    got = read_safetensors(str(tmp_path / "out"))
    assert torch.equal(got["lm_head.weight"], emb) and torch.equal(got["model.embed_tokens.weight"], emb)
    assert {f: os.stat(tmp_path / "out" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "out")} == \
        {"model.safetensors": 0o644, "config.json": 0o644}
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError, match=r"out2: writing model.safetensors failed: No space left"):
        convert_bin(str(src), str(tmp_path / "out2"))
    assert sorted(os.listdir(tmp_path)) == ["out", "tied"]


def test_convert_errors_are_one_line_and_leave_nothing(tmp_path):
    conv_ = lambda src, dst: subprocess.run([sys.executable, "weights.py", "convert", str(src), str(dst)],  # noqa: E731
                                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "no such directory" in one_line(conv_(tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # a shard given for its directory: not 'no such directory'
    assert one_line(conv_(tmp_path / "pytorch_model.bin", tmp_path / "out")).endswith(
        "pytorch_model.bin: a file; SRC is the directory that holds the .bin shards")
    src = tmp_path / "release"
    src.mkdir()
    torch.save({"a": torch.ones(2)}, src / "pytorch_model-00001-of-00002.bin")
    with open(src / "pytorch_model-00002-of-00002.bin", "wb") as f:
        pickle.dump(Namespace(x=1), f)  # an object, not tensors: the unpickler must refuse it
    assert "refused, not a plain weights file" in one_line(conv_(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    # its flags through argparse, as every other command's: --help is help (it was a usage line, status 1)
    cmd = lambda *a: subprocess.run([sys.executable, "weights.py", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True)
    r = cmd("convert", str(src))
    assert r.returncode == 2 and one_line(r) == "weights.py convert: error: the following arguments are required: " \
                                                "DST_DIR (see --help)"
    r = cmd("--help")
    assert r.returncode == 0 and "convert" in r.stdout and not r.stderr
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    torch.save({"b": torch.zeros(3)}, src / "pytorch_model-00002-of-00002.bin")
    r = conv_(src, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "already exists" in one_line(conv_(src, tmp_path / "out"))
    # '': no directory (the working directory's name was taken beside it, then renamed onto '', a raw OSError)
    assert one_line(conv_(src, "")) == "error: '': no directory named; convert into a new directory"
    # 'new/.': the new directory itself (the rename onto 'new/.' failed)
    r = conv_(src, f"{tmp_path / 'new'}/.")
    assert r.returncode == 0 and sorted(os.listdir(tmp_path / "new")) == sorted(os.listdir(tmp_path / "out")), r.stderr


class Planned:
    """train.py --dry-run run in this process: its stdout, and R and the parameter count of its plan."""
    def __init__(self, capsys, argv):
        with pytest.raises(SystemExit) as e:
            train([*map(str, argv), "--dry-run"])
        assert not e.value.code
        self.out = capsys.readouterr().out
        self.r = int(re.search(r"R=(\d+)", self.out)[1])
        self.n_all = float(re.search(r"of ([\d.]+)M parameters", self.out)[1])


def test_init_keeps_its_own_r_and_says_what_the_run_changes(env, tmp_path, capsys):
    plan = lambda stage, init, *extra: Planned(capsys, args(env, tmp_path / "o", stage, "--init", init, *extra))  # noqa: E731
    # adapters are kept (and frozen: stage 1 trains the projector and fusion); before, without a word
    ckpt = tmp_path / "w" / "ckpt"
    mra.save_checkpoint(mra.build(mra.MRAConfig.from_dict(tiny_dict() | dict(image_size=96))), ckpt)
    r = plan(1, ckpt)
    assert f"note: --init {ckpt} has MR-Adapters: they stay in the model, frozen" in r.out
    # a model trained at another R than the stage's keeps its own (a fine-tune moved it to the stage's);
    # --image-size sets another
    assert r.r == 96 and plan(2, ckpt).r == 96 and plan(2, ckpt, "--image-size", 80).r == 80
    # stage 1 -> 2 changes R by design (the recipe's 384 -> 1024): a stage-1 model, adapters added or not
    stage1 = tmp_path / "s1" / "ckpt"
    mra.save_checkpoint(mra.build(mra.MRAConfig.from_dict(tiny_dict() | dict(image_size=96, adapters=False))), stage1)
    assert plan(2, stage1).r == 128 and plan(2, stage1, "--no-adapters").r == 128
    # stage 1 --adapters adds them too (it was ignored), at --init's R
    without, added = plan(1, stage1), plan(1, stage1, "--adapters")
    assert without.r == 96 and added.n_all > without.n_all and added.r == 96
    # LLaVA-1.5 (one ViT path) has no adapters to add: its own R (the stage's 1024 gave a 7B 5,329 visual
    # tokens, refused against its 4,096 context); --no-adapters was refused: "has MR-Adapters" (its config
    # said adapters=True, the default, for a model without). The longest sample: LLaVA-1.5's
    # model_max_length, 2048 tokens (image as one) in both stages, where LLaVA-HR's stage 2 takes 2496 (it
    # was given to a LLaVA-1.5 too)
    v15 = tmp_path / "v15" / "ckpt"
    d = tiny_dict()
    d |= dict(arch="llava-1.5", image_size=56, llm=d["llm"] | dict(max_seq_len=4096))
    mra.save_checkpoint(mra.build(mra.MRAConfig.from_dict(d)), v15)
    r = plan(2, v15, "--no-adapters")
    assert r.r == 56 and "x 2063 tokens" in r.out  # 16 visual + 2047 text


def test_resume_trims_log_lines_cut_short_or_edited_by_hand(tmp_path):
    import runs
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": "x"}\n{"step": 2}\n{"step": 3}\n{"ste')
    runs.trim_log(str(log), 2)  # was: TypeError comparing "x" with 2
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2}\n'


def test_resume_refusal_names_the_way_back_for_a_setting_the_run_had_not(tmp_path):
    # the run had no --quantize; it said "give the run's --quantize", which would change nothing
    import runs
    with pytest.raises(SystemExit, match=r"quantize=None, now 'int8': the model would not be the one trained; drop "
                                         r"--quantize, or start a new run with another --out$"):
        runs.check_resume({"quantize": None}, str(tmp_path), None, None, None, {"quantize": "int8"}, {"quantize"},
                          None, None, None)


def test_resume_takes_the_newest_checkpoint_and_rows_split_as_torch_chunk(tmp_path):
    # ckpt before ckpt.old (a save cut after its first rename leaves both); a complete ckpt.tmp before ckpt.old
    import runs
    ckpt = tmp_path / "ckpt"
    for d in ("ckpt.old", "ckpt.tmp", "ckpt"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "train_state.pt").write_bytes(b"")
    assert runs.previous_run(str(tmp_path), str(ckpt), str(tmp_path / "log.jsonl"), True, False) == str(ckpt)
    assert runs.last_checkpoint(str(ckpt)) == str(ckpt)
    os.remove(ckpt / "train_state.pt")
    assert runs.last_checkpoint(str(ckpt)) == str(ckpt) + ".tmp"
    for n, world in ((7, 3), (8, 4), (2, 4), (5, 1)):  # FSDP2 shards dim 0 as torch.chunk does
        want = [len(c) for c in torch.arange(n).chunk(world)] + [0] * world
        assert [b - a for a, b in (runs.rows_of(n, world, r) for r in range(world))] == want[:world], (n, world)
        assert runs.rows_of(n, world, world - 1)[1] == n


def test_resume_refuses_other_trained_parameters():
    import runs
    state = {"optimizer": {"param_groups": [{"params": ["a", "b"]}, {"params": ["c"]}]}}
    runs.check_trained(state, {"a", "b", "c"}, 0)
    for now in ({"a", "b"}, {"a", "b", "c", "d"}):
        with pytest.raises(SystemExit, match="the run trained other parameters"):
            runs.check_trained(state, now, 0)
    with pytest.raises(SystemExit, match="1 differ"):
        runs.check_trained({"params": '["a"]'}, {"a", "b"}, 4)

def test_resume_refuses_other_bad_records_of_the_same_count_or_an_old_runs_other_data(tmp_path):
    # --skip-bad: one bad record now another one (the count the same): the data position would not carry over
    import runs
    ds = type("DS", (), dict(sha256="d", bad=[3], __len__=lambda self: 10))()
    tok = dict(tokenizer_sha256="t", tokenizer_legacy=True)
    run = dict(data_sha256="d", records=10, bad_sha256="x", **tok)
    args_ = Namespace(data="data.json", lora_r=0, tokenizer=None)
    check = lambda bad: runs.check_resume(run, str(tmp_path), args_, ds, "tok", {}, set(), tok,  # noqa: E731
                                          dict(records=10, bad_sha256=bad), None)
    check("x")
    with pytest.raises(SystemExit, match=r"10 usable records of data\.json, now 10 \(1 bad, other ones\)"):
        check("y")
    del run["data_sha256"]  # a run saved before it recorded the data's sha256: the file's path is compared
    run["data"] = os.path.realpath("data.json")
    check("x")
    run["data"] = os.path.realpath("other.json")
    with pytest.raises(SystemExit, match=r"--data data\.json is not the file the run read"):
        check("x")


def test_a_refused_run_leaves_out_as_it_found_it(env, tmp_path):
    # refused after --out was made and locked (the data is read after): it held only train.lock
    bad = [str(tmp_path / "nope.json") if a.endswith("chats.json") else a for a in args(env, tmp_path / "o")]
    assert "nope.json: no such file" in one_line(run_train(bad))
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()  # an --out the user made: it stays, empty
    assert "nope.json: no such file" in one_line(run_train([*bad, "--out", tmp_path / "mine"]))
    assert os.listdir(tmp_path / "mine") == []
    # the parents made for it go too (they were left behind, empty), up to the directory that was there
    assert "nope.json: no such file" in one_line(run_train([*bad, "--out", tmp_path / "mine" / "new" / "o"]))
    assert os.listdir(tmp_path / "mine") == []


@pytest.mark.parametrize("gone", ["train.lock", "out"])
def test_a_lock_taken_on_a_file_a_refused_run_removed_is_taken_again(tmp_path, monkeypatch, gone):
    # a refused run, exiting (runs.tidy_out), removes its train.lock (and --out, if it made it) just after
    # this run opened that file: the lock it then takes is on no file a third run would see
    import fcntl
    import runs
    out, lockf, calls = tmp_path / "out", fcntl.lockf, []
    out.mkdir()

    def removed_first(f, *a):
        calls.append(f.name)
        if len(calls) == 1:
            os.remove(out / "train.lock")
            if gone == "out":
                os.rmdir(out)
        return lockf(f, *a)
    monkeypatch.setattr(fcntl, "lockf", removed_first)
    lock = runs.claim_out(str(out))
    assert len(calls) == 2 and runs.same_file(lock, str(out / "train.lock"))
    lock.close()


# -----------------------------------------------------------------------------
# bench.py: its flags are checked too

@pytest.mark.parametrize("argv, message", [
    ("--threads -3 --only table1", "argument --threads: expected a whole number >= 1, not '-3'"),  # was torch's
    ("--only table1 --text-tokens -5000", "argument --text-tokens: expected a whole number >= 0, not '-5000'"),
    ("--device foo", "--device foo: not a device torch knows (cpu, cuda, cuda:1, ...)"),
    pytest.param("--device cuda", "--device cuda: no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
    ("--device mps", "--device mps: bench.py runs on cpu or cuda"),
    ("--dim 100", "--dim 100: a multiple of 64 is expected (heads of 64)"),
    ("--batch-prompt-lens 9 3", "--batch-prompt-lens MIN MAX: MIN 9 is above MAX 3"),
    ("--arms az --only experiment", "--arms az: no arm 'z'; letters abcd or indexes 0-5 are expected"),
])
def test_bench_flags_are_one_line_errors(capsys, argv, message):
    import bench
    with pytest.raises(SystemExit) as e:
        bench.main(argv.split())
    assert e.value.code == 2 and capsys.readouterr().err == f"bench.py: error: {message} (see --help)\n"


def test_bench_names_a_missing_checkpoint_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--only", "scale", "--model", str(tmp_path / "nope"),
                        "--new-tokens", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'nope'}: no such file or directory\n", r.stderr


# -----------------------------------------------------------------------------
# train.py: Ctrl-C, SIGTERM and the machine's failures are one line, nothing lost

# Ctrl-C (SIGINT) or SIGTERM (scancel, docker stop, timeout): the exit status a shell shows is 128 + the signal
STOPS = [("SIGINT", -signal.SIGINT, "interrupted"), ("SIGTERM", 128 + signal.SIGTERM, "terminated")]


@pytest.mark.parametrize("sig, status, said", STOPS)
@pytest.mark.parametrize("rank", [None, "1"])  # 1: torchrun's second rank, which leaves it to rank 0
def test_ctrl_c_or_sigterm_while_torch_imports_is_one_line(tmp_path, sig, status, said, rank):
    # the first second or two, before one_line_errors is installed: a traceback it was (SIGTERM: not a word)
    code = ("import os, runpy, signal, sys\n"
            "class Interrupt:  # as torch is imported\n"
            "    def find_spec(self, name, *a):\n"
            f"        if name == 'torch': os.kill(os.getpid(), signal.{sig})\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            f"sys.argv = [{TRAIN!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({TRAIN!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--stage", "2", "--out", str(tmp_path / "run")], cwd=ROOT,
                       env=dict(os.environ, **{"RANK": rank} if rank else {}), capture_output=True, text=True,
                       timeout=300)
    if rank:
        assert r.stderr == ""
    else:
        assert one_line(r) == f"{said}: nothing was saved; run it again to start"
    # under torchrun SIGTERM keeps its default: torchrun sends it to the other ranks when one fails
    assert r.returncode == (status if sig == "SIGINT" or not rank else -signal.SIGTERM) and os.listdir(tmp_path) == []


def test_debug_keeps_the_traceback_of_a_ctrl_c_while_torch_imports(tmp_path):
    # --debug is for finding where a stop lands: the one line gives way to Python's own traceback
    code = ("import os, runpy, signal, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, *a):\n"
            "        if name == 'torch': os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            f"sys.argv = [{TRAIN!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({TRAIN!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, "--stage", "2", "--out", str(tmp_path / "run"), "--debug"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stderr.startswith("Traceback (most recent call last):") and r.stderr.endswith("KeyboardInterrupt\n")
    assert "nothing was saved" not in r.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig, status, said", STOPS)
@pytest.mark.parametrize("script, argv", [
    ("generate.py", ["--model", "m", "--prompt", "Hi"]),
    ("release.py", ["merge-lora", "lora", "dst", "--model-base", "b", "--vit", "v"]),
    ("weights.py", ["convert", "src", "dst"])])
@pytest.mark.parametrize("rank", [None, "1"])  # RANK set (a pod of a torchrun job) is train.py's business alone
def test_every_command_stopped_while_torch_imports_says_so_in_one_line(tmp_path, sig, status, said, script, argv,
                                                                        rank):
    # as train.py's above: a traceback through torch's __init__ it was (SIGTERM: not a word); with RANK=1 in the
    # environment, not a word either (the rule for train.py's torchrun ranks held for every command)
    code = ("import os, runpy, signal, sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, *a):\n"
            f"        if name == 'torch': os.kill(os.getpid(), signal.{sig})\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            f"sys.argv = [{script!r}, *sys.argv[1:]]\n"
            f"runpy.run_path({script!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **{"RANK": rank} if rank else {}))
    assert one_line(r) == f"{said}: nothing was written" and r.returncode == status


def test_generate_stopped_says_what_is_kept(model_dir, images, tmp_path):  # noqa: F811
    # Ctrl-C or SIGTERM while a batch file is answered: one line, below the bar, saying where the answers
    # are and that the same command goes on (it was a bare exit, 130; SIGTERM left an empty answers file)
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(dict(question_id=i, text=f"Say {i}.")) + "\n" for i in range(4)))
    argv = batch_argv(model_dir, images, q, a)
    for sig, status, said, at in [("SIGTERM", 143, "terminated", 1), ("SIGINT", 130, "interrupted", 3)]:
        # the signal arrives as question `at` is asked
        code = at_call("generate.py", "mra.LlavaHR.prefill", at, f"os.kill(os.getpid(), signal.{sig})")
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        answered = len(a.read_text().splitlines()) if a.exists() else 0
        kept = f": the answers so far are in {a}; the same command goes on from there" if answered else ""
        last = r.stderr.splitlines()[-1]  # below "loading ..." and the bar
        assert r.returncode == status and "Traceback" not in r.stderr and last == said + kept, r.stderr[-2000:]
        assert answered == at - 1 and (answered or not a.exists())  # no empty answers file left
    r = subprocess.run([sys.executable, "generate.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "resuming: 2 of 4 questions already answered" in r.stderr, r.stderr[-2000:]
    assert sorted(json.loads(line)["question_id"] for line in a.read_text().splitlines()) == [0, 1, 2, 3]


def test_generate_killed_keeps_every_answer_it_finished(model_dir, images, tmp_path, capsys):  # noqa: F811
    # SIGKILL (the OOM killer, kill -9) runs no handler and flushes nothing: the answers file is written
    # unbuffered, so each answer finished is on the disk, whole, and a rerun asks only the rest (written
    # through a buffer, the answers of a killed run were lost with it, or left cut short)
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(dict(question_id=i, text=f"Say {i}.")) + "\n" for i in range(4)))
    argv = [*batch_argv(model_dir, images, q, a), "--batch-size", 1]
    code = at_call("generate.py", "mra.LlavaHR.prefill", 3, "os.kill(os.getpid(), signal.SIGKILL)")  # as question 3
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    text = a.read_text()
    assert text.endswith("\n") and [json.loads(line)["question_id"] for line in text.splitlines()] == [0, 1], text
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "resuming: 2 of 4 questions already answered" in err and "dropped" not in err, err
    assert a.read_text().startswith(text) and len(a.read_text().splitlines()) == 4


def test_a_hidden_scratch_directory_is_never_the_name_said(tmp_path, monkeypatch):
    # a directory that cannot be written in (read-only here, as a root test run writes anywhere): said of the
    # directory the user named, not of the hidden one new_directory fills ("[Errno 30] Read-only file system:
    # '/x/.dst.k3j2l1'" it was)
    import tempfile

    from weights import new_directory

    def read_only(prefix, dir, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, prefix + "k3j2l1"))
    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'dst'))}: cannot be created in "
                                              rf"{re.escape(str(tmp_path))} \(Read-only file system\); convert into "
                                              rf"a directory you can write to$"):
        with new_directory(tmp_path / "dst", "convert"):
            pass


def test_ctrl_c_under_torchrun_is_said_once(env, tmp_path):
    # torchrun passes Ctrl-C on to every rank (each in a session of its own): rank 0 says it, once (it was
    # said by every rank, 8 times on 8 GPUs)
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env_ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), TRAIN, *map(str, args(
                              env, out, 2, "--global-batch", 2, "--batch-size", 1, "--epochs", 1000))],
                         cwd=ROOT, env=dict(env_, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline and not (os.path.isfile(out / "log.jsonl") and
                                                                   os.path.getsize(out / "log.jsonl")):
            time.sleep(0.05)  # until the run has made a step
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=120)[1]
    finally:
        if p.poll() is None:  # torchrun passes it on to the ranks (a kill would leave them running)
            p.terminate()
            p.wait()
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and re.fullmatch(r"(\[rank0\]: )?interrupted before any checkpoint was saved: nothing to "
                                           r"resume; --overwrite starts over", said[0]), err[-3000:]


def train_where(where, n, then, argv, ranks=None):
    """train.py in a process of its own (or `ranks` under torchrun), where the n-th call of `where`
    (module.attribute) first runs the statement `then` (os, signal and torch imported)."""
    code = at_call(TRAIN, where, n, then, imports=["torch"])
    if ranks:
        with open(f"{argv[argv.index('--out') + 1]}.py", "w") as f:  # torchrun runs a file, which imports from
            f.write(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code)  # its own directory
        return torchrun(list(map(str, argv)), n=ranks, ok=False, script=f.name)
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)


@pytest.mark.parametrize("sig, status, said", STOPS)
def test_sigterm_mid_save_is_ctrl_c_and_the_run_resumes(env, tmp_path, sig, status, said):
    # a signal while the second checkpoint is written: the first stays, and --resume goes on from it (SIGTERM
    # ended the run without a word)
    out = tmp_path / "run"
    r = train_where("runs.write_train_state", 2, f"os.kill(os.getpid(), signal.{sig})",
                    args(env, out, 2, *COMMON, "--max-steps", 3, "--save-every", 1))
    assert one_line(r) == f"{said}: the last checkpoint {out / 'ckpt'} is intact; --resume continues from it"
    assert r.returncode == status and not (out / "ckpt.tmp" / "train_state.pt").exists()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1
    train(args(env, out, 2, *COMMON, "--max-steps", 3, "--save-every", 1, "--resume"))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]


CPU_OOM = "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to " \
          "allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which " \
           "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the " \
           "allocated memory 76.50 GiB is allocated by PyTorch. See documentation for Memory Management"
ROOM = "a smaller --batch-size or --grad-checkpoint; --dry-run shows the plan"  # (--fsdp: under torchrun)


@pytest.mark.parametrize("where, n, then, said, extra", [
    ("mra.LlavaHR.forward", 2, f"raise RuntimeError({CPU_OOM!r})",
     rf"error: step 2: out of memory \(DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 "
     rf"bytes\); the last checkpoint \S+/run/ckpt is untouched; once the cause is fixed \({re.escape(ROOM)}\), "
     rf"--resume continues from it", ()),
    ("mra.LlavaHR.forward", 2, f"raise RuntimeError({CPU_OOM!r})",  # the flags not given are the ways on
     r"error: step 2: .*; once the cause is fixed \(a smaller --batch-size; --dry-run shows the plan\), --resume "
     r"continues from it", ("--grad-checkpoint",)),
    ("mra.LlavaHR.forward", 1, f"raise torch.OutOfMemoryError({CUDA_OOM!r})",
     rf"error: step 1: out of memory \(CUDA out of memory. Tried to allocate 2.00 GiB\); no checkpoint kept; once "
     rf"the cause is fixed \({re.escape(ROOM)}\), --overwrite starts over", ()),
    ("mra.build", 1, "raise MemoryError('Unable to allocate 3.00 MiB for an array with shape (512, 512, 3) and data "
                     "type float32')",  # numpy's, as the model loads
     rf"error: out of memory \(Unable to allocate 3.00 MiB\) before the first step; once the cause is fixed "
     rf"\({re.escape(ROOM)}\), run the same command again", ()),
    # a worker the system killed (its OOM killer, most often): collate runs in the worker
    ("data.collate", 1, "os.kill(os.getpid(), signal.SIGKILL)",
     r"error: step 1: DataLoader worker \(pid \d+\) is killed by signal: Killed; no checkpoint kept; once the cause "
     r"is fixed \(the memory ran out\? fewer --workers\), --overwrite starts over", ()),
    ("data.collate", 1, "os._exit(3)",  # a worker ended otherwise: not put down to memory
     r"error: step 1: DataLoader worker \(pid \d+\) exited unexpectedly with exit code 3; no checkpoint kept; once "
     r"the cause is fixed \(--workers 0 loads in this process, where an error shows\), --overwrite starts over", ()),
    ("data.collate", 1, "os.kill(os.getpid(), signal.SIGUSR1)",  # killed by another signal: not memory either
     r"error: step 1: DataLoader worker \(pid \d+\) is killed by signal: User defined signal 1; no checkpoint kept; "
     r"once the cause is fixed \(--workers 0 loads in this process, where an error shows\), --overwrite starts over",
     ()),
])
def test_the_machine_running_out_is_one_line(env, tmp_path, where, n, then, said, extra):
    # out of memory (the host's, a GPU's) or a DataLoader worker killed: a traceback, as a bug's, it was
    r = train_where(where, n, then, args(env, tmp_path / "run", 2, *COMMON, "--max-steps", 2, "--save-every", 1,
                                         "--workers", 1 if where == "data.collate" else 0, *extra))
    assert re.fullmatch(said, one_line(r)) and r.returncode == 1, r.stderr[-3000:]


@pytest.mark.parametrize("error, said", [("torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB"),
                                         ("RuntimeError", CPU_OOM)])  # the CPU's: a RuntimeError
def test_memory_running_out_mid_save_is_not_called_a_full_disk(env, tmp_path, error, said):
    out = tmp_path / "run"
    r = train_where("runs.write_train_state", 2, f"raise {error}({said!r})",
                    args(env, out, 2, *COMMON, "--max-steps", 3, "--save-every", 1))
    assert one_line(r) == (f"error: step 2: saving to {out / 'ckpt'}.tmp failed ({said}); the last checkpoint "
                           f"{out / 'ckpt'} is untouched; once the cause is fixed (more free memory), --resume continues "
                           f"from it")
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 1


def test_a_rank_out_of_memory_under_torchrun_is_said_by_it_and_rank_0_alone(env, tmp_path):
    # rank 0, left waiting in the gradients' all-reduce, printed gloo's "Connection closed by peer" traceback
    out = tmp_path / "run"
    r = train_where("mra.LlavaHR.forward", 2, "if os.environ['RANK'] == '1': raise torch.OutOfMemoryError('CUDA out of "
                    "memory. Tried to allocate 2.00 GiB')", args(env, out, 2, "--global-batch", 2, "--batch-size", 1,
                                                                 "--lr", 1e-3, "--save-every", 1), ranks=2)
    said = sorted(re.findall(r"\[rank\d\]: error: .*", r.stderr))  # (a line may follow the bar's, after a \r)
    ended = (f"the last checkpoint {out / 'ckpt'} is untouched; once the cause is fixed (%s), --resume continues "
             "from it")
    assert said[-1] == ("[rank1]: error: step 2: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
                        + ended % "a smaller --batch-size, --grad-checkpoint or --fsdp; --dry-run shows the plan")
    # rank 0 says what is kept, unless torchrun's SIGTERM (it ends the other ranks when one fails) came first
    assert said[:-1] in ([], ["[rank0]: error: step 2: another process of the run ended (its own line says why); "
                              + ended % "see that line"]), r.stderr[-3000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("err", [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"),
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for "
                 "recv operation to complete\nConnection reset by peer"),
    torch.distributed.DistNetworkError("failed to recv, got 0 bytes")])
def test_a_peer_gone_is_told_from_a_bug_only_under_torchrun(err):
    # the line the test above may not see: torchrun's SIGTERM can end rank 0 before it speaks
    assert failures.machine_failure(err, ["a smaller --batch-size"], distributed=True) == (
        "peer", "another process of the run ended (its own line says why)", "see that line")
    assert failures.machine_failure(err, ["a smaller --batch-size"], distributed=False) is None  # one process: a bug's


def worker_error(raise_it):
    """What an exception raised in a DataLoader worker arrives as in the main process (torch's ExceptionWrapper):
    of its class where that can be built from a message alone, else a RuntimeError; the worker's traceback as
    its message."""
    from torch._utils import ExceptionWrapper
    try:
        raise_it()
    except Exception:  # noqa: BLE001
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except Exception as e:  # noqa: BLE001
        return e


def test_numpy_running_out_of_memory_in_a_worker_is_the_machines():
    # numpy's MemoryError (an image decoded into an array, say) cannot be rebuilt from a message: it arrives as a
    # RuntimeError whose last line names it. 1 EiB: more than any machine has, or can address
    import numpy as np
    err = worker_error(lambda: np.empty(1 << 60, np.uint8))
    assert type(err) is RuntimeError and str(err).splitlines()[-1].endswith(
        "MemoryError: Unable to allocate 1.00 EiB for an array with shape (1152921504606846976,) and data type uint8")
    assert failures.machine_failure(err, ["a smaller --batch-size", "--grad-checkpoint"], distributed=False) == (
        "memory", "out of memory (Unable to allocate 1.00 EiB)",
        "a smaller --batch-size or --grad-checkpoint; --dry-run shows the plan")


@pytest.mark.parametrize("error", [data.DataError("record 3 (id 7): no conversations"),
                                   http.client.HTTPException("a class named ...Exception")])
def test_an_error_raised_in_a_worker_is_said_as_its_own_line(error):
    # its message is the worker's traceback, whose last line is the error's own after its class's name
    def raise_it():
        raise error
    err = worker_error(raise_it)
    assert str(err).startswith(f"Caught {type(error).__name__} in DataLoader worker process 0.")
    assert failures.said(err) == str(error)


def test_a_runtime_error_of_a_bug_keeps_its_traceback(env, tmp_path):
    r = train_where("mra.LlavaHR.forward", 1, "raise RuntimeError('mat1 and mat2 shapes cannot be multiplied')",
                    args(env, tmp_path / "run", 2, *COMMON, "--max-steps", 1))
    assert "Traceback" in r.stderr and r.stderr.endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied\n")
