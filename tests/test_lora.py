"""LoRA (lora.py, train.py --lora-r, generate.py --lora) on tiny random models (CPU): B = 0 is exactly
the base model; after training the merged model equals the unmerged one (logits, greedy text);
only LoRA, the projector and the flagged modules learn, the base weights stay bit-identical;
resume, DDP and FSDP2 equal one uninterrupted process; bad ranks and mismatched adapters (of
other shapes, or on another base of the same shapes) are one line. The same on an int8 base (train.py --quantize int8): the int8 weights and scales stay
bit-identical, the adapters alone are saved and serve on the full-precision base."""
import json
import os
import re
import runpy
import shutil
import sys
from dataclasses import replace

import pytest
import torch

import generate
import lora
import mra
from tokenizer import Tokenizer
from test_generate import greedy_full_forward, ids_for, pixels
from test_train import TRAIN, args, assert_same, env, losses, one_thread, plan, tiny, torchrun, weights  # noqa: F401
from weights import fingerprint, read_safetensors

LORA = ("--lora-r", 4, "--lora-alpha", 8)
FROZEN = ("llm.", "encoder.vit.", "encoder.convnext.")


def train_globals(argv):
    """train.py in this process, returning its globals (the model it trained, its optimizer)."""
    old = sys.argv
    sys.argv = [TRAIN, *map(str, argv)]
    try:
        return runpy.run_path(TRAIN, run_name="__main__")
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def base(env, tmp_path_factory):
    """A stage-1 checkpoint (no MR-Adapters) with its tokenizer: what LoRA stage 2 adapts."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = mra.build(replace(tiny(), adapters=False, image_size=128))
    mra.save_checkpoint(model, d / "ckpt")
    shutil.copy(env[1], d / "ckpt" / "tokenizer.model")
    return str(d / "ckpt")


def lora_run(env, base, out, flags):
    """A short LoRA stage 2 from `base` with `flags` (25 epochs, lr 2e-2): (out, train.py's globals)."""
    g = train_globals(args(env, out, 2, "--init", base, *flags, "--global-batch", 10, "--batch-size", 10,
                           "--epochs", 25, "--lr", 2e-2, "--warmup-ratio", 0, "--grad-checkpoint"))
    return out, g


@pytest.fixture(scope="module")
def run(env, base, tmp_path_factory):
    return lora_run(env, base, tmp_path_factory.mktemp("lora") / "run", LORA)


def test_zero_init_is_the_base_model(base):
    model = mra.load_checkpoint(base)
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        before = model.llm(ids)
        lora.add_lora(model, 4, 8, dropout=0.0)
        after = model.llm(ids)
    assert isinstance(model.llm.layers[1].mlp.down, lora.LoRALinear)
    assert torch.equal(before, after)


def test_a_is_initialised_as_peft_and_dropout_acts_in_training_only():
    # A as nn.Linear's weight (kaiming uniform, a = sqrt(5): peft's init; A = 0 would leave B no gradient);
    # dropout on the update's input in train() alone: eval's (and a merge's) output is W x + s B A x
    torch.manual_seed(3)
    want = torch.nn.Linear(24, 4, bias=False).weight
    base = torch.nn.Linear(24, 16, bias=False)
    torch.manual_seed(3)
    layer = lora.LoRALinear(base, 4, 8, dropout=0.5)
    assert torch.equal(layer.lora_a, want) and torch.equal(layer.lora_b, torch.zeros(16, 4))
    with torch.no_grad():
        layer.lora_b.normal_()
        x = torch.randn(5, 24)
        full = x @ layer.weight.T + 2 * (x @ layer.lora_a.T) @ layer.lora_b.T
        torch.testing.assert_close(layer.eval()(x), full)
        assert not torch.allclose(layer.train()(x), full)


def test_merge_computes_in_fp32_and_stores_ws_dtype():
    # bf16 adapters (read with --dtype bfloat16): B A and W + s B A in fp32, rounded once, to W's dtype or `dtype`
    g = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, generator=g).to(torch.bfloat16) for s in ((32, 48), (8, 48), (32, 8)))
    want = w.float() + 0.5 * (b.float() @ a.float())
    for dtype in (None, torch.float32):
        merged = lora.merge({"x.weight": w, "x.lora_a": a, "x.lora_b": b}, 0.5, dtype)
        assert merged.keys() == {"x.weight"} and torch.equal(merged["x.weight"], want.to(dtype or torch.bfloat16))


def test_the_adapter_file_holds_what_the_base_lacks():
    # the LoRA tensors, what trained, and every module outside the frozen LLM and towers, trained or not
    # (MR-Adapters new to a stage-1 base under --no-lora-train-mra: the base has none to give)
    state = dict.fromkeys(["llm.layers.0.attn.wq.weight", "llm.layers.0.attn.wq.lora_a", "llm.norm.weight",
                           "encoder.vit.blocks.0.w", "encoder.convnext.w", "encoder.mra.0.w", "projector.0.weight"])
    got = lora.adapter_state(state, {"projector.0.weight", "llm.norm.weight"})
    assert set(got) == {"llm.layers.0.attn.wq.lora_a", "llm.norm.weight", "encoder.mra.0.w", "projector.0.weight"}


def test_base_digest_reads_rows_spread_over_each_matrix():
    # another base that differs from the adapters' own in the last rows alone is another base
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(9, 4, generator=g) for k in ("llm.layers.0.attn.wq.weight", "llm.tok_emb.weight")}
    for k in state:
        other = dict(state)
        other[k] = state[k].clone()
        other[k][-1] += 1
        assert not lora.same_base(lora.base_digest(state), lora.base_digest(other)), k
    assert lora.same_base(lora.base_digest(state), lora.base_digest({k: v.half() for k, v in state.items()}))


def test_load_refuses_a_quantize_other_than_int8_before_reading(tmp_path):
    # merged, the base loaded unquantized and `if quantize:` quantized the merge to int8 for any other value
    with pytest.raises(ValueError, match=r"^quantize must be None or 'int8', not 'int4'$"):
        lora.load(str(tmp_path / "base"), str(tmp_path / "lora"), quantize="int4")


def test_only_lora_projector_and_mra_learn_base_bit_identical(run, base):
    out, g = run
    loss = losses(out)  # an epoch: a global batch of images, one of the 2 text-only records filled up (slower)
    assert sum(loss[-2:]) < 0.6 * sum(loss[:2]), loss
    model, init = g["unwrapped"], mra.load_checkpoint(base).state_dict()
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    for n in trained:
        assert ".lora_" in n or n.startswith(("projector.", "encoder.adapters.", "encoder.fusion.")), n
    assert any(".lora_a" in n for n in trained) and "projector.0.weight" in trained
    # one backward: gradients reach exactly the trained set
    batch = next(b for b in g["loader"] if b["images"] is not None)  # micro-batches are one modality
    model.zero_grad(set_to_none=True)
    model(batch["input_ids"], batch["images"], batch["labels"], batch["pad_mask"])[1].backward()
    assert {n for n, q in model.named_parameters() if q.grad is not None} == trained
    state = model.state_dict()
    for k, v in init.items():  # everything the base had and LoRA froze is bit for bit as it was
        if k not in trained:
            assert torch.equal(state[k], v), k
    for k in ("llm.layers.0.attn.wq.lora_b", "llm.layers.1.mlp.down.lora_b", "projector.2.weight"):
        assert state[k].abs().sum() > 0 and (k not in init or not torch.equal(state[k], init[k])), k
    # the adapter file is small: no frozen LLM or tower weight in it
    adapters = read_safetensors(out / "ckpt" / "lora")
    assert not any(k.startswith(FROZEN) and ".lora_" not in k for k in adapters)


def test_merged_equals_unmerged(run, base, env, capsys):
    out, _ = run
    unmerged = lora.load(base, out / "ckpt" / "lora", merged=False).eval()
    merged = mra.load_checkpoint(str(out / "ckpt")).eval()  # what train.py wrote
    assert_same(lora.load(base, out / "ckpt" / "lora").state_dict(), merged.state_dict())
    assert not any(".lora_" in k for k in merged.state_dict())
    d, tok = env
    image = pixels(merged, d / "images" / "0.png")[None]
    ids = ids_for(Tokenizer(tok), [generate.human_turn("What is this?", True)])
    with torch.no_grad():
        a, b = unmerged(torch.tensor([ids]), image)[0], merged(torch.tensor([ids]), image)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # greedy text: the readable path on the unmerged model, generate.py on the merged checkpoint
    # and on base + --lora
    ref = greedy_full_forward(unmerged, ids, image, Tokenizer(tok).eos_id, n=6)
    texts = []
    for model_args in (["--model", out / "ckpt"], ["--model", base, "--lora", out / "ckpt" / "lora"]):
        code = generate.main([str(a) for a in [*model_args, "--image", d / "images" / "0.png", "--prompt",
                                               "What is this?", "--max-new-tokens", 6]])
        o, e = capsys.readouterr()
        assert code == 0, e
        texts.append(o)
    assert len(ref) > 0 and texts[0] == texts[1] == Tokenizer(tok).decode(ref) + "\n", texts


def test_an_fp16_base_loads_with_fp32_adapters_in_one_dtype(run, base, env, tmp_path):
    # a converted release is fp16, train.py saves adapters in fp32: with dtype=None (each tensor as stored)
    # everything is cast to the wider, as mra.load_checkpoint does, not a model that fails at its first matmul
    out, _ = run
    mra.save_checkpoint(mra.load_checkpoint(base).half(), tmp_path / "base16")
    d, tok = env
    ids = torch.tensor([ids_for(Tokenizer(tok), [generate.human_turn("What is this?", True)])])
    for merged in (True, False):
        model = lora.load(str(tmp_path / "base16"), out / "ckpt" / "lora", merged=merged).eval()
        assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float32}
        with torch.no_grad():
            assert model(ids, pixels(model, d / "images" / "0.png")[None])[0].isfinite().all()


def test_merged_model_is_the_full_precision_base_plus_the_update(env, base, tmp_path):
    """On GPUs train.py holds the frozen base in bf16 (lora.bf16_bases): the merged OUT/ckpt is still
    --init's fp32 W + s B A, what generate.py --model INIT --lora computes, not the rounded W's."""
    out = tmp_path / "run"
    g = train_globals(args(env, out, 2, "--init", base, *LORA, "--global-batch", 10, "--batch-size", 10,
                           "--epochs", 1, "--lr", 2e-2))
    lora.bf16_bases(g["unwrapped"])  # as a GPU run holds it
    g["save"](g["done"])
    merged = read_safetensors(out / "ckpt")
    assert_same(lora.load(base, out / "ckpt" / "lora").state_dict(), merged)
    assert g["unwrapped"].llm.layers[0].attn.wq.weight.dtype == torch.bfloat16


def test_a_base_changed_or_gone_mid_run_leaves_the_adapters_saved(env, base, tmp_path, capsys):
    """The merged model is built from --init at each save: if it is no longer the base the run read,
    the checkpoint holds the adapters alone (said in one line), never a model merged onto another base."""
    shutil.copytree(base, tmp_path / "base")
    out = tmp_path / "run"
    g = train_globals(args(env, out, 2, "--init", tmp_path / "base", *LORA, "--global-batch", 10, "--batch-size", 10,
                           "--epochs", 1))
    assert (out / "ckpt" / "model.safetensors").is_file()
    state = read_safetensors(tmp_path / "base")
    state["llm.layers.0.mlp.up.weight"][0, 0] += 1e-3  # overwritten in place
    mra.save_checkpoint(None, tmp_path / "base", state=state, cfg=mra.load_checkpoint(base).cfg)
    for why in ("has changed since the run read it", "no model.safetensors"):
        capsys.readouterr()
        g["save"](g["done"])
        err = capsys.readouterr().err
        assert "holds the LoRA adapters alone, not the merged model (" in err and why in err, err
        assert not (out / "ckpt" / "model.safetensors").exists() and (out / "ckpt" / "lora" / "lora.json").is_file()
        assert_same(read_safetensors(out / "ckpt" / "lora"), lora.adapter_state(g["unwrapped"].state_dict(),
                                                                                     g["trainable"]))
        shutil.rmtree(tmp_path / "base")
        (tmp_path / "base").mkdir()  # gone: an empty directory in its place


def test_adapters_on_their_own_merged_model_are_refused(run, env, capsys, tmp_path):
    """OUT/ckpt is already W + s B A: --lora OUT/ckpt/lora on it would add the update twice."""
    out, _ = run
    with pytest.raises(mra.CheckpointError, match="already merged in"):
        lora.load(str(out / "ckpt"), str(out / "ckpt" / "lora"))
    d, _ = env
    code = generate.main([str(a) for a in ["--model", out / "ckpt", "--lora", out / "ckpt" / "lora", "--image",
                                           d / "images" / "0.png", "--prompt", "Hi", "--max-new-tokens", 2]])
    err = capsys.readouterr().err
    assert code != 0 and err.strip().splitlines()[-1].startswith("error: ") and "add the update twice" in err, err
    assert "Traceback" not in err
    # the same adapters copied elsewhere are still the ones merged in (they were added twice, silently)
    shutil.copytree(out / "ckpt" / "lora", tmp_path / "copied")
    with pytest.raises(mra.CheckpointError, match="already merged in"):
        lora.load(str(out / "ckpt"), str(tmp_path / "copied"))


def test_the_adapter_directory_as_a_model_is_one_line(run, base, env, capsys, tmp_path):
    """OUT/ckpt/lora holds an mra_config.json and a model.safetensors too: given as --model or --init it was
    "tokenizer model not found", or (with --tokenizer) 144 missing keys, not the way to its base."""
    out, _ = run
    adapters = out / "ckpt" / "lora"
    way = f"{adapters}: LoRA adapters (lora.json), not a whole model: apply them to their base, " \
          f"generate.py --model {base} --lora {adapters}, or train from it, train.py --init {base}"
    assert generate.main(["--model", str(adapters), "--prompt", "Hi"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {way}"
    for plan_only in ((), ("--dry-run",)):
        with pytest.raises(mra.CheckpointError) as e:
            train_globals(args(env, tmp_path / "new", 2, "--init", adapters, *LORA, *plan_only))
        assert str(e.value) == way
    assert not (tmp_path / "new").exists()


def test_a_bad_lora_json_is_one_line(run, tmp_path):
    # alpha NaN made every merged weight NaN; 0 dropped the adapters; r 4.7 read as 4; an r the tensors
    # do not have was blamed on the base
    out, g = run
    for bad, why in (({"alpha": float("nan")}, "alpha a finite number > 0"), ({"alpha": 0}, "alpha a finite"),
                     ({"r": 4.7}, "r must be a whole number"), ({"r": 8}, "r 8, but the adapters in .* are of rank 4"),
                     ({"base_digest": "abc"}, r"not a valid config \(base_digest is 'abc', expected \{part: \[hash")):
        shutil.copytree(out / "ckpt" / "lora", tmp_path / "a", dirs_exist_ok=True)
        info = json.loads((tmp_path / "a" / "lora.json").read_text())
        (tmp_path / "a" / "lora.json").write_text(json.dumps(info | bad))
        with pytest.raises(mra.CheckpointError, match=r"lora\.json: .*" + why):
            lora.load(g["args"].init, str(tmp_path / "a"))
    # its config gone: named, not Python's "[Errno 2] No such file or directory: '.../mra_config.json'"
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(out / "ckpt" / "lora", tmp_path / "a")
    os.remove(tmp_path / "a" / "mra_config.json")
    with pytest.raises(mra.CheckpointError, match=r"--lora .*a: no mra_config.json beside lora.json \(train.py"):
        lora.load(g["args"].init, str(tmp_path / "a"))


def test_resume_equals_uninterrupted(env, base, tmp_path, capsys):
    common = ("--init", base, *LORA, "--global-batch", 2, "--batch-size", 1, "--max-steps", 4, "--lr", 1e-2)
    train_globals(args(env, tmp_path / "full", 2, *common, "--save-every", 0))
    train_globals(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--max-steps", 2,
                       "--lora-adapters-only"))
    assert not os.path.exists(tmp_path / "cut" / "ckpt" / "model.safetensors")  # the adapters alone
    capsys.readouterr()
    assert generate.main(["--model", str(tmp_path / "cut" / "ckpt"), "--prompt", "Hi"]) == 1
    assert f"holds LoRA adapters only; use --model {base} --lora {tmp_path / 'cut' / 'ckpt' / 'lora'}\n" in \
        capsys.readouterr().err  # the base lora.json names
    # the same with --lora given too (as if the checkpoint were the base): was "neither mra_config.json nor ..."
    assert generate.main(["--model", str(tmp_path / "cut" / "ckpt"), "--lora", str(tmp_path / "cut" / "ckpt" / "lora"),
                          "--prompt", "Hi"]) == 1
    assert f"holds LoRA adapters only; use --model {base} --lora" in capsys.readouterr().err
    # and with a questions file (whose answers record a digest of the weights, taken before the model loads)
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "Hi"}\n')
    assert generate.main(["--model", str(tmp_path / "cut" / "ckpt"), "--questions", str(tmp_path / "q.jsonl"),
                          "--answers", str(tmp_path / "a.jsonl")]) == 1
    assert f"holds LoRA adapters only; use --model {base} --lora" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
    train_globals(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--resume"))
    assert_same(weights(tmp_path / "cut"), weights(tmp_path / "full"))
    assert_same(read_safetensors(tmp_path / "cut" / "ckpt" / "lora"),
                read_safetensors(tmp_path / "full" / "ckpt" / "lora"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def assert_resume_equals_uninterrupted(run, env, tmp_path, common):
    """run (train_globals, or torchrun): 4 steps straight, and cut at step 2 then resumed, end alike."""
    run(args(env, tmp_path / "full", 2, *common, "--save-every", 0))
    run(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--max-steps", 2))
    run(args(env, tmp_path / "cut", 2, *common, "--save-every", 2, "--resume"))
    assert_same(read_safetensors(tmp_path / "cut" / "ckpt" / "lora"),
                read_safetensors(tmp_path / "full" / "ckpt" / "lora"))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


def test_ddp_resume_equals_uninterrupted_with_dropout(env, base, tmp_path):
    # each rank draws its own dropout masks (its own samples' shapes): a resume restores each
    # rank's random state, not rank 0's on every rank
    assert_resume_equals_uninterrupted(torchrun, env, tmp_path, (
        "--init", base, *LORA, "--global-batch", 2, "--batch-size", 1, "--max-steps", 4, "--lr", 1e-2,
        "--lora-adapters-only", "--no-group-by-length"))


def test_ddp_and_fsdp_equal_one_process(env, base, tmp_path):
    # dropout 0: each rank would draw its own dropout masks
    common = ("--init", base, *LORA, "--lora-dropout", 0, "--global-batch", 2, "--batch-size", 1,
              "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0, "--group-by-length", "--grad-checkpoint")
    train_globals(args(env, tmp_path / "one", 2, *common))
    torchrun(args(env, tmp_path / "ddp", 2, *common))
    assert_same(weights(tmp_path / "ddp"), weights(tmp_path / "one"), atol=1e-6)
    torchrun(args(env, tmp_path / "fsdp", 2, *common, "--fsdp"))
    assert_same(weights(tmp_path / "fsdp"), weights(tmp_path / "one"), atol=1e-6)


def test_resume_refuses_another_alpha_rank_or_base(env, base, tmp_path):
    # the adapters were trained at the run's scale alpha / r on its base: another one would train (and
    # save, merged and in lora.json) a model other than the one trained
    shutil.copytree(base, tmp_path / "base")
    common = ("--init", tmp_path / "base", *LORA, "--global-batch", 1, "--batch-size", 1, "--lr", 1e-2,
              "--lora-adapters-only")
    out = tmp_path / "run"
    train_globals(args(env, out, 2, *common, "--max-steps", 1))
    info = (out / "ckpt" / "lora" / "lora.json").read_text()
    for extra, was in ((("--lora-alpha", 16), "lora_alpha=8.0, now 16.0"), (("--lora-r", 8), "lora_r=4, now 8")):
        with pytest.raises(SystemExit, match=f"--resume: the run used {was}: the model would not be the one trained; "
                                             f"give the run's {extra[0]} {was.split('=')[1].split(',')[0]}, or start "
                                             f"a new run with another --out$"):
            train_globals(args(env, out, 2, *common, "--max-steps", 2, "--resume", *extra))
    # the base overwritten in place (another fine-tune of the same shapes): the same path, other weights
    state = read_safetensors(tmp_path / "base")
    state["llm.layers.0.mlp.up.weight"][0, 0] += 1e-3
    mra.save_checkpoint(None, tmp_path / "base", state=state, cfg=mra.load_checkpoint(base).cfg)
    with pytest.raises(SystemExit, match=r"--resume: --init .*base is not the base the run trained on \(.*base, as "
                                         r"it was then\): the model would not be the one trained; give that base, "
                                         r"or start a new run with another --out$"):
        train_globals(args(env, out, 2, *common, "--max-steps", 2, "--resume"))
    assert (out / "ckpt" / "lora" / "lora.json").read_text() == info
    # the same weights elsewhere are the run's base: it goes on
    train_globals(args(env, out, 2, *common, "--max-steps", 2, "--resume", "--init", base))
    assert len(losses(out)) == 2
    with pytest.raises(SystemExit, match=r"the run trained other parameters .* same --stage and --freeze-\* flags "
                                         r"as the run, and its --\[no-\]lora-train-mra, please"):
        train_globals(args(env, out, 2, *common, "--max-steps", 3, "--resume", "--init", base, "--no-lora-train-mra"))
    # adapters alone are no model to start from, nor to plan for: their base is
    for plan_only in ((), ("--dry-run",)):
        with pytest.raises(SystemExit, match=r"--init .*run/ckpt: holds LoRA adapters only, no model: start from "
                                             r"their base \(--init .*base\S*/ckpt\), or apply them with generate.py "
                                             r"--model .*ckpt --lora .*run/ckpt/lora"):
            train_globals(args(env, tmp_path / "new", 2, "--init", out / "ckpt", "--global-batch", 1, "--batch-size", 1,
                               *plan_only))


@pytest.mark.parametrize("r", [0, -2])
def test_bad_rank_is_one_line(env, base, tmp_path, capsys, r):
    with pytest.raises(SystemExit) as e:
        train_globals(args(env, tmp_path / "o", 2, "--init", base, "--lora-r", r))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "need --lora-r >= 1" in err and len(err.splitlines()) == 1, err


def test_adapters_that_do_not_fit_the_base_are_one_line(run, env, tmp_path, capsys):
    out, _ = run
    torch.manual_seed(1)
    other = mra.build(replace(tiny(), adapters=False, image_size=128, llm=replace(tiny().llm, hidden_dim=96)))
    mra.save_checkpoint(other, tmp_path / "other")
    shutil.copy(env[1], tmp_path / "other" / "tokenizer.model")
    code = generate.main(["--model", str(tmp_path / "other"), "--lora", str(out / "ckpt" / "lora"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("loading ")]
    assert code == 1 and len(errors) == 1 and "do not fit this base model" in errors[0], err
    assert err.startswith(f"loading {tmp_path / 'other'} with the LoRA adapters {out / 'ckpt' / 'lora'} merged in ("), err
    assert "llm.layers.0.mlp.gate.weight" in err and "(128, 64)" in err and "(96, 64)" in err, err
    code = generate.main(["--model", str(tmp_path / "other"), "--lora", str(tmp_path), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 1 and "no lora.json" in err and "its adapters are in" not in err, err
    code = generate.main(["--model", str(tmp_path / "other"), "--lora", str(tmp_path / "nope"), "--prompt", "Hi"])
    err = capsys.readouterr().err  # a path that does not exist: it said "no lora.json" of it
    assert code == 1 and f"--lora {tmp_path / 'nope'}: no such directory (expected a LoRA adapter" in err, err
    # the run's OUT/ckpt for its OUT/ckpt/lora: the way to the adapters named
    code = generate.main(["--model", str(tmp_path / "other"), "--lora", str(out / "ckpt"), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert code == 1 and err.rstrip().endswith(f"; its adapters are in --lora {out / 'ckpt' / 'lora'}"), err


def fine_tuned(base, env, path, moved=lambda k: k.startswith("llm.")):
    """`base` fine-tuned on (as the stage 2 after the stage 1 the adapters trained on): the tensors `moved`
    picks (every LLM weight) moved a little, the shapes the same, saved as a checkpoint with its tokenizer."""
    g = torch.Generator().manual_seed(2)
    state = read_safetensors(base)
    for k in filter(moved, state):
        state[k] = state[k] + 1e-3 * torch.randn(state[k].shape, generator=g)
    mra.save_checkpoint(None, path, state=state, cfg=mra.load_checkpoint(base).cfg)
    shutil.copy(env[1], path / "tokenizer.model")
    return str(path)


@pytest.mark.parametrize("moved", [lambda k: k.startswith("llm."),
                                   lambda k: re.fullmatch(r"llm\.layers\.\d+\.(attn|mlp)\.\w+\.weight", k)],
                         ids=["every LLM weight (a stage 2)", "the linear weights (another LoRA merged)"])
def test_adapters_on_another_base_of_the_same_shapes_are_refused(run, base, env, tmp_path, capsys, moved):
    """The shapes fit, so they loaded: merged onto another base, a silently other model (its answers wrong).
    lora.json records a digest of the weights the run trained on, and --model must hold them."""
    out, _ = run
    adapters = out / "ckpt" / "lora"
    other = fine_tuned(base, env, tmp_path / "other", moved)
    way = (f"--lora {adapters} was trained on {base} (lora.json), and --model {other} holds other weights: the "
           f"adapters only fit their own base; --model {base}")
    for merged in (True, False):
        with pytest.raises(mra.CheckpointError) as e:
            lora.load(other, str(adapters), merged=merged)
        assert str(e.value) == way
    # the base changed at its own path since (a later save there): the way out is not that path again
    copied = tmp_path / "lora"
    shutil.copytree(adapters, copied)
    (copied / "lora.json").write_text(json.dumps(json.loads((adapters / "lora.json").read_text()) | {"base": str(other)}))
    with pytest.raises(mra.CheckpointError) as e:
        lora.load(other, str(copied))
    assert str(e.value) == f"--lora {copied} was trained on {other} (lora.json), whose weights have changed since: " \
        f"the adapters only fit their base as it was; --model a copy of it"
    d, _ = env
    capsys.readouterr()
    code = generate.main([str(a) for a in ["--model", other, "--lora", adapters, "--image", d / "images" / "0.png",
                                           "--prompt", "What is this?", "--max-new-tokens", 2]])
    o, err = capsys.readouterr()
    assert code == 1 and o == "" and err.splitlines()[-1] == f"error: {way}" and "Traceback" not in err, err
    lora.load(base, str(adapters))  # their own base: fits
    assert capsys.readouterr().err == ""
    recorded = json.loads((adapters / "lora.json").read_text())["base_digest"]
    assert recorded == lora.base_digest(mra.load_checkpoint(base).state_dict()) and set(recorded) == {"linears", "rest"}


def test_qlora_adapters_on_another_base_are_refused(qrun, base, env, tmp_path):
    """An int8 run's base is int8 in its linear weights: its digest is of the rest (embeddings, norms,
    towers) alone, which a stage 2 moves too."""
    out, _ = qrun
    adapters = str(out / "ckpt" / "lora")
    with pytest.raises(mra.CheckpointError, match=r"and --model .*other holds other weights: the adapters only fit "
                                                 r"their own base; --model "):
        lora.load(fine_tuned(base, env, tmp_path / "other"), adapters)
    lora.load(base, adapters)
    assert set(json.loads((out / "ckpt" / "lora" / "lora.json").read_text())["base_digest"]) == {"rest"}


def test_the_same_base_in_another_dtype_or_format_fits(run, base, env, tmp_path, capsys):
    """The digest is of the weights' values, not the files: fp16 or bf16 copies of the base (released checkpoints
    are fp16, train.py saves fp32), the .bin form, and the base loaded with --dtype, all files weights.fingerprint
    tells apart, are the base the adapters trained on; even an fp16 copy loaded in bf16 (rounded twice)."""
    out, _ = run
    adapters = str(out / "ckpt" / "lora")
    model = mra.load_checkpoint(base)
    mra.save_checkpoint(model.half(), tmp_path / "fp16")
    mra.save_checkpoint(mra.load_checkpoint(base).bfloat16(), tmp_path / "bf16")
    (tmp_path / "bin").mkdir()  # the released form: pytorch_model.bin, fp16
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tmp_path / "fp16" / "mra_config.json", tmp_path / "bin")
    for name in ("fp16", "bf16", "bin"):
        assert fingerprint(tmp_path / name) != fingerprint(base)
        shutil.copy(env[1], tmp_path / name / "tokenizer.model")
    capsys.readouterr()
    for copy, dtype in ((base, torch.float16), (base, torch.bfloat16), (tmp_path / "fp16", None),
                        (tmp_path / "bf16", None), (tmp_path / "bin", None), (tmp_path / "fp16", torch.bfloat16),
                        (tmp_path / "bf16", torch.float16), (tmp_path / "bin", torch.float32)):
        lora.load(str(copy), adapters, dtype)
    d, _ = env
    code = generate.main([str(a) for a in ["--model", tmp_path / "bin", "--lora", adapters, "--dtype", "bfloat16",
                                           "--image", d / "images" / "0.png", "--prompt", "What is this?",
                                           "--max-new-tokens", 2]])
    o, err = capsys.readouterr()
    assert code == 0 and o.strip() and "error" not in err and "note" not in err, err


def test_adapters_saved_before_the_base_digest_load_with_a_note(run, base, env, tmp_path, capsys):
    """A lora.json without base_digest (train.py before it) still loads; on a base at another path than the
    one it names (a copy, or another model) one line says the weights were not checked."""
    out, _ = run
    old = tmp_path / "old"
    shutil.copytree(out / "ckpt" / "lora", old)
    info = json.loads((old / "lora.json").read_text())
    info.pop("base_digest", None)
    (old / "lora.json").write_text(json.dumps(info))
    capsys.readouterr()
    lora.load(base, str(old))
    assert capsys.readouterr().err == ""  # the path it names
    other = fine_tuned(base, env, tmp_path / "other")
    note = (f"note: --lora {old} was trained on {base} (lora.json, saved before it recorded a digest of the base's "
            f"weights: not checked), and --model {other} is another path: unless it holds the same weights, the "
            f"answers are wrong; --model {base}")
    lora.load(other, str(old))
    assert capsys.readouterr().err == note + "\n"
    d, _ = env
    code = generate.main([str(a) for a in ["--model", other, "--lora", old, "--image", d / "images" / "0.png",
                                           "--prompt", "What is this?", "--max-new-tokens", 2]])
    o, err = capsys.readouterr()
    assert code == 0 and o.strip() and note in err.splitlines(), err


def test_7b_counts_and_memory_on_meta():
    # LoRA at 7B, counted by hand: per layer r x (in + out) for q, k, v, o (4096 -> 4096) and
    # gate, up (4096 -> 11008), down (11008 -> 4096); 32 layers
    r = 128
    per_layer = r * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    model = lora.setup_7b(r)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert n_lora == 32 * per_layer == 319_815_680
    small = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(FROZEN))
    gb = lora.memory(model, 1, 2048, grad_checkpoint=True)
    assert gb["grads"] == pytest.approx(4 * (n_lora + small) / 2 ** 30) and gb["adam"] == 2 * gb["grads"]
    # frozen LLM linear weights in bf16 (2 bytes), the rest fp32
    n_wrapped = sum(p.numel() for n, p in model.named_parameters() if p.dtype == torch.bfloat16)
    assert n_wrapped == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    n_all = sum(p.numel() for p in model.parameters())
    assert gb["weights"] == pytest.approx((2 * n_wrapped + 4 * (n_all - n_wrapped)) / 2 ** 30)
    assert gb["total"] < 0.9 * 48 < lora.memory(lora.setup_7b(None), 1, 2048, True)["total"]


# ----- LoRA on an int8 base (train.py --quantize int8, QLoRA-style) ------------------------------

QLORA = (*LORA, "--quantize", "int8")


def test_int8_gradient_is_the_dequantised_layers():
    """Int8Matmul's backward (dL/dx = (dL/dy * s) q, dequantised again) against autograd through
    the plain formula y = x (q * s)^T, in fp32."""
    from int8 import Int8Linear
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear(64, 96)
    layer.weight, layer.scales = Int8Linear.quantize(torch.randn(96, 64, generator=g))
    x, dy = torch.randn(3, 5, 64, generator=g, requires_grad=True), torch.randn(3, 5, 96, generator=g)
    y = layer(x)
    (y * dy).sum().backward()
    x2 = x.detach().requires_grad_()
    want = torch.nn.functional.linear(x2, layer.weight.float() * layer.scales[:, None])
    (want * dy).sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_bf16_bases_leaves_an_int8_base_int8():
    # train.py's GPU bf16 copy of the frozen weights: the float ones; an int8 base's weights stay 1 byte
    from int8 import Int8Linear
    q = Int8Linear(16, 8)
    q.weight, q.scales = Int8Linear.quantize(torch.randn(8, 16))
    layers = torch.nn.ModuleList([lora.LoRALinear(torch.nn.Linear(16, 8, bias=False), 2, 4),
                                  lora.LoRALinear(q, 2, 4)])
    lora.bf16_bases(layers)
    assert [m.weight.dtype for m in layers] == [torch.bfloat16, torch.int8]
    assert [m.lora_a.dtype for m in layers] == [torch.float32, torch.float32]


def test_zero_init_lora_on_int8_is_the_int8_model(base):
    from int8 import Int8Linear
    model = mra.load_checkpoint(base, quantize="int8")
    keys = set(model.state_dict())
    ids = torch.randint(0, 500, (2, 12))
    with torch.no_grad():
        before = model.llm(ids)
        lora.add_lora(model, 4, 8, dropout=0.0)
        after = model.llm(ids)
    wq = model.llm.layers[0].attn.wq
    assert isinstance(wq, lora.LoRALinear) and wq.weight.dtype == torch.int8 and wq.lora_a.dtype == torch.float32
    assert isinstance(model.llm.output, Int8Linear)  # the head is int8 too, and not adapted
    assert set(model.state_dict()) - keys == {k for k in model.state_dict() if ".lora_" in k}
    assert not any(p.dtype == torch.int8 for p in model.parameters())  # int8 weights are buffers: never trained
    assert torch.equal(before, after)


@pytest.fixture(scope="module")
def qrun(env, base, tmp_path_factory):
    return lora_run(env, base, tmp_path_factory.mktemp("qlora") / "run", QLORA)


def test_qlora_trains_lora_only_int8_base_bit_identical(qrun, base):
    out, g = qrun
    loss = losses(out)  # an epoch: a global batch of images, one of the 2 text-only records filled up (slower)
    assert sum(loss[-2:]) < 0.6 * sum(loss[:2]), loss
    model, init = g["unwrapped"], mra.load_checkpoint(base, quantize="int8").state_dict()
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    for n in trained:
        assert ".lora_" in n or n.startswith(("projector.", "encoder.adapters.", "encoder.fusion.")), n
    assert any(".lora_a" in n for n in trained)
    batch = next(b for b in g["loader"] if b["images"] is not None)
    model.zero_grad(set_to_none=True)
    model(batch["input_ids"], batch["images"], batch["labels"], batch["pad_mask"])[1].backward()
    assert {n for n, q in model.named_parameters() if q.grad is not None} == trained
    state = model.state_dict()
    int8 = [k for k, v in init.items() if v.dtype == torch.int8]
    assert len(int8) == 7 * 2 + 1  # q k v o gate up down per layer, and the head
    for k, v in init.items():  # the int8 weights and their scales as quantized from the base
        if k not in trained:
            assert torch.equal(state[k], v), k
    assert state["llm.layers.1.mlp.down.lora_b"].abs().sum() > 0
    # adapters only (no merge into rounded weights); resume rebuilds exactly this model
    assert not os.path.exists(out / "ckpt" / "model.safetensors")
    again = lora.load(base, out / "ckpt" / "lora", merged=False, quantize="int8").eval()
    assert_same(again.state_dict(), {k: v for k, v in state.items()})


def test_qlora_adapters_serve_on_the_full_precision_base_and_int8(qrun, base, env, capsys):
    out, _ = qrun
    d, _ = env
    for extra in ([], ["--quantize", "int8"]):
        code = generate.main([str(a) for a in ["--model", base, "--lora", out / "ckpt" / "lora", "--image",
                                               d / "images" / "0.png", "--prompt", "What is this?",
                                               "--max-new-tokens", 4, *extra]])
        o, e = capsys.readouterr()
        assert code == 0 and o.strip(), e
    # int8 + merged adapters: the merged weights quantized, so the same as quantizing the merged model
    merged = lora.load(base, out / "ckpt" / "lora")
    q8 = lora.load(base, out / "ckpt" / "lora", quantize="int8")
    from int8 import Int8Linear
    w = merged.state_dict()["llm.layers.0.mlp.up.weight"]
    q, s = Int8Linear.quantize(w)
    assert torch.equal(q8.llm.layers[0].mlp.up.weight, q) and torch.equal(q8.llm.layers[0].mlp.up.scales, s)


def test_qlora_bad_combinations_are_one_line(qrun, env, base, tmp_path, capsys):
    for extra, msg in ((("--quantize", "int8"), "--quantize int8 freezes the LLM's weights in int8, where only "
                                                "LoRA can learn: it needs --lora-r"),
                       ((*QLORA, "--fsdp"), "--quantize int8 with --fsdp")):
        with pytest.raises(SystemExit) as e:
            train_globals(args(env, tmp_path / "o", 2, "--init", base, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1, err
    out, _ = qrun  # resuming a --quantize run without it would train on other base weights
    with pytest.raises(SystemExit, match=r"the run used quantize='int8', now None"):
        train_globals(args(env, out, 2, "--init", base, *LORA, "--global-batch", 10, "--batch-size", 10,
                           "--epochs", 25, "--resume"))
    with pytest.raises(ValueError, match=r"llm\.layers\.0\.attn\.wq\.weight is int8: LoRA on an int8 base is not merged"):
        lora.merge(lora.add_lora(mra.load_checkpoint(base, quantize="int8"), 4, 8).state_dict(), 2.0)


def test_dry_run_counts_an_int8_base_at_one_byte(env, capsys):
    """--dry-run --quantize int8: each int8 weight is 1 byte, not 4, plus a 4-byte scale per row."""
    from int8 import Int8Linear, int8_linears
    with torch.device("meta"):
        llm = int8_linears(mra.build(replace(tiny(), adapters=True, image_size=128)).llm)
    int8 = [m.weight for m in llm.modules() if isinstance(m, Int8Linear)]
    saved = sum(3 * w.numel() - 4 * w.shape[0] for w in int8)
    full, q8 = (plan(env, capsys, "--dry-run", *LORA, *extra) for extra in ((), ("--quantize", "int8")))
    assert full["weights"] - q8["weights"] == pytest.approx(saved, abs=0.01 * 2**20)  # printed to 0.01 MiB
    assert q8["adam"] == full["adam"]  # the same LoRA parameters train


def test_lora_flags_without_a_rank_are_refused(env, base, tmp_path, capsys):
    """--lora-alpha and the like without --lora-r used to run a full fine-tune, the flags unused."""
    for extra, named in ((("--lora-alpha", 16), "--lora-alpha"), (("--lora-dropout", 0.1, "--no-lora-train-mra"),
                                                                  "--lora-dropout, --[no-]lora-train-mra")):
        with pytest.raises(SystemExit) as e:
            train_globals(args(env, tmp_path / "o", 2, "--init", base, *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{named} set LoRA up: it needs --lora-r" in err, err
    assert not (tmp_path / "o").exists()


def test_dry_run_counts_lora_dropout(env, capsys):
    """The plan's model drops out on LoRA's input as the run's does (default 0.05): the mask and the
    dropped copy of each input are held for backward."""
    default = plan(env, capsys, "--dry-run", *LORA)
    none = plan(env, capsys, "--dry-run", *LORA, "--lora-dropout", 0)
    assert default["activations"] > none["activations"] > 0


def test_dry_run_counts_a_gpu_lora_base_in_bf16(env, capsys):
    """On GPUs train.py stores the frozen weights LoRA wraps in bf16 (2 bytes), the rest in fp32;
    FSDP across processes keeps fp32 masters of everything."""
    llm = mra.build(replace(tiny(), adapters=True, image_size=128)).llm
    wrapped = sum(m.weight.numel() for layer in llm.layers for m in (*vars(layer.attn)["_modules"].values(),
                                                                     *vars(layer.mlp)["_modules"].values()))
    cpu, gpu = (plan(env, capsys, "--dry-run", *world, *LORA) for world in ((), (1,)))
    assert cpu["weights"] - gpu["weights"] == pytest.approx(2 * wrapped, abs=0.01 * 2**20)
    fsdp = plan(env, capsys, "--dry-run", 2, "--fsdp", *LORA)
    assert fsdp["weights"] == pytest.approx(cpu["weights"] / 2, abs=0.01 * 2**20)


def test_memory_plan_counts_an_int8_base_as_parameters_and_steps_only_what_trains():
    """The plan's parameter count holds an int8 base's weights (buffers, 1 byte each) as the model's parameters,
    not their per-row scales: the count of the full-precision base. AdamW's temporaries are of what it steps
    (the LoRA tensors and the projector): at most one fp32 copy of those, not of the whole model."""
    import memplan
    from int8 import int8_linears

    def build(quantize):
        def built(c):  # as train.py builds the model it plans
            model = mra.LlavaHR(c)
            if quantize:
                int8_linears(model.llm)
            return lora.add_lora(model, 4, 8)
        return built
    cfg = replace(tiny(), adapters=True, image_size=128)
    trains = lambda name: ".lora_" in name or name.startswith("projector.")  # noqa: E731
    full, q8 = (memplan.memory_plan(build(q), cfg, trains, 1, False, 1, 40, False, False) for q in (False, True))
    model = build(False)(cfg)
    n = sum(q.numel() for q in model.parameters())
    n_train = sum(q.numel() for name, q in model.named_parameters() if trains(name))
    assert full["n_all"] == q8["n_all"] == n and full["n_train"] == q8["n_train"] == n_train < n / 4
    assert 0 < full["update"] <= 4 * n_train and 0 < q8["update"] <= 4 * n_train


def test_7b_int8_base_counted_at_one_byte():
    # LoRA r 128 on an int8 base: the wrapped weights 1 byte (not bf16's 2), the head 1 (not 4),
    # plus a 4-byte fp32 scale per output row of each
    n_wrapped, head = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008), 32000 * 4096
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096) + 32000
    bf16, int8 = (lora.memory(lora.setup_7b(128, int8=q), 1, 2048, True) for q in (False, True))
    assert (bf16["weights"] - int8["weights"]) * 2 ** 30 == pytest.approx(n_wrapped + 3 * head - 4 * rows)
    assert int8["grads"] == bf16["grads"] and int8["total"] < 0.9 * 24 < bf16["total"]


def test_qlora_ddp_equals_one_process(env, base, tmp_path):
    common = ("--init", base, *QLORA, "--lora-dropout", 0, "--global-batch", 2, "--batch-size", 1,
              "--max-steps", 2, "--lr", 1e-2, "--warmup-ratio", 0, "--group-by-length")
    train_globals(args(env, tmp_path / "one", 2, *common))
    torchrun(args(env, tmp_path / "ddp", 2, *common))
    one, ddp = (read_safetensors(tmp_path / d / "ckpt" / "lora") for d in ("one", "ddp"))
    assert any(".lora_b" in k and v.abs().sum() > 0 for k, v in one.items())
    assert_same(ddp, one, atol=1e-6)


def test_qlora_resume_equals_uninterrupted(env, base, tmp_path):
    assert_resume_equals_uninterrupted(train_globals, env, tmp_path, (
        "--init", base, *QLORA, "--global-batch", 2, "--batch-size", 1, "--max-steps", 4, "--lr", 1e-2))
