"""generate.py on a tiny saved model: cached greedy = full-forward greedy, batching, sampling,
chat with a kept KV cache, LLaVA answer files with resume, and clean error exits."""
import contextlib
import copy
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image

import data
import generate
import kernels
import llama
import mra
import weights
from llama import LlamaConfig
from test_mra import randomise, tiny_cfg
from test_tokenizer import training_lines
from tokenizer import Tokenizer

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Our checkpoint format: a tiny LLaVA-HR (64 visual tokens) + a trained tokenizer.model."""
    path = tmp_path_factory.mktemp("tiny-llava-hr")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_prefix=str(path / "tok"), vocab_size=500,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        minloglevel=2)
    os.replace(path / "tok.model", path / "tokenizer.model")
    os.remove(path / "tok.vocab")
    llm = LlamaConfig(vocab_size=500, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=512)
    mra.save_checkpoint(randomise(mra.build(tiny_cfg(llm=llm))), path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return mra.load_checkpoint(str(model_dir)).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    return mra.load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(64, 48), (40, 72)]):  # non-square: exercises the padding
        files.append(path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    return files


@pytest.fixture(params=["plain", "packed"])
def pack(request, monkeypatch):
    """Runs a CLI test twice: as is (a model this small is not packed), and with generate.py's
    kernels.pack_linears forced to pack (as it does a model of 64 MB of Linear weights and more):
    a list that holds how many weights were packed."""
    if request.param == "plain":
        return None
    if not kernels.ONEDNN:
        pytest.skip("oneDNN's packed layout: x86 CPUs")
    monkeypatch.setattr(kernels, "MKL_GEMV", False)  # an Intel CPU packs for batches only
    packed, real = [], kernels.pack_linears
    monkeypatch.setattr(kernels, "pack_linears", lambda m: packed.append(real(m, min_bytes=0)) or packed[-1])
    return packed


def pixels(model, path):
    return data.preprocess(data.load_image(path), model.cfg.image_size, model.cfg.image_aspect_ratio)


def ids_for(tok, turns):
    return generate.prompt_ids(tok, turns, "vicuna_v1")


def run_cli(capsys, *argv):
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@torch.no_grad()
def greedy_full_forward(model, ids, image, eos_id, n=MAX_NEW):
    """The readable path: no cache, the whole sequence through forward every step."""
    seq = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]), image)
        t = int(logits[0, -1].argmax())
        if t == eos_id:
            break
        seq.append(t)
    return seq[len(ids):]


def test_cli_greedy_equals_full_forward(model_dir, model, tok, images, capsys, pack):
    q = "What is this?"
    ids = ids_for(tok, [generate.human_turn(q, True)])
    assert ids[0] == tok.bos_id and ids.count(mra.IMAGE_TOKEN) == 1
    ref = greedy_full_forward(model, ids, pixels(model, images[0])[None], tok.eos_id)
    assert len(ref) > 0
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--prompt", q,
                             "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert out == tok.decode(ref) + "\n"  # the answer and nothing else on stdout
    assert pack is None or pack[0] == 7 * 2 + 1  # the LLM's q k v o, gate up down (2 layers) and head
    got = generate.generate(model, [ids], pixels(model, images[0])[None], max_new_tokens=MAX_NEW,
                            eos_id=tok.eos_id)
    assert got == [ref]


def test_text_only_prompt(model_dir, model, tok, capsys):
    ids = ids_for(tok, [generate.human_turn("Hello there", False)])
    assert mra.IMAGE_TOKEN not in ids
    ref = greedy_full_forward(model, ids, None, tok.eos_id)
    code, out, _ = run_cli(capsys, "--model", model_dir, "--prompt", "Hello there", "--max-new-tokens", MAX_NEW)
    assert code == 0 and out == tok.decode(ref) + "\n"


def test_batched_equals_one_by_one(model, tok, images):
    rows = [("What is this?", images[0]), ("Describe the picture in detail, the table and the street", None),
            ("Red or blue?", images[1]), ("Yes", None)]
    prompts = [ids_for(tok, [generate.human_turn(q, img is not None)]) for q, img in rows]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row a different length
    pix = [pixels(model, img) for _, img in rows if img is not None]
    singles = [generate.generate(model, [p], pixels(model, img)[None] if img else None, max_new_tokens=MAX_NEW,
                                 eos_id=tok.eos_id)[0] for p, (_, img) in zip(prompts, rows)]
    batched = generate.generate(model, prompts, torch.stack(pix), max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
    assert batched == singles
    # rows stop on their own: make row 0's third token the stop token
    stop = singles[0][2]
    singles = [generate.generate(model, [p], pixels(model, img)[None] if img else None, max_new_tokens=MAX_NEW,
                                 eos_id=stop)[0] for p, (_, img) in zip(prompts, rows)]
    batched = generate.generate(model, prompts, torch.stack(pix), max_new_tokens=MAX_NEW, eos_id=stop)
    assert batched == singles and len(batched[0]) <= 2 and stop not in batched[0]
    assert max(map(len, batched)) == MAX_NEW  # the others went on


def test_sampling_warpers_match_hf():
    """generate.warp is HF generate's do_sample warpers (4.31, the release's pin, and today's: the same
    order and arithmetic): the same kept tokens and the same probabilities, bit for bit."""
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    assert GenerationConfig().top_k == 50 == generate.parse_args(["--model", "m", "--prompt", "x"]).top_k  # the release samples so
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(6, 32000, generator=g) * s for s in (0.5, 3, 12)])
    logits[0, :40] = logits[0, 40]  # ties at the k-th and at the nucleus' edge
    for t, k, p in [(1.0, 50, 1.0), (0.2, 50, 1.0), (0.7, 50, 0.8), (1.0, 0, 0.9), (1.5, 0, 0.999), (1.0, 0, 0.95),
                    (0.5, 3, 0.5), (1.0, 1, 1.0)]:
        hf = LogitsProcessorList([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
                                 + ([TopPLogitsWarper(p)] if p < 1 else []))
        ref = hf(None, logits / 1.0)
        ours = generate.warp(logits, t, k, p)
        assert torch.equal(ours.isinf(), ref.isinf()), (t, k, p)
        assert torch.equal(ours.softmax(-1), ref.softmax(-1)), (t, k, p)
        assert (~ours.isinf()).sum(-1).min() >= 1
    # sampling draws only from what the warpers keep; temperature 0 is argmax
    p = torch.tensor([[0.125, 0.5, 0.125, 0.25], [0.25, 0.25, 0.25, 0.25]])
    logits = p.log()
    draws = torch.stack([generate.sample(logits, 1.0, 0.75, g) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}
    assert set(torch.stack([generate.sample(logits, 1.0, 1.0, g, top_k=1) for _ in range(50)])[:, 0].tolist()) == {1}
    assert generate.sample(logits, 0.0)[0] == 1
    # a temperature so small that logits / t overflow: the draw is the argmax, not an error
    assert generate.sample(logits, 1e-40, 1.0, g)[0] == 1  # (row 1: four ties, any of them)
    assert generate.sample(logits, 1e-46, 1.0, g)[0] == 1  # float32 holds it as 0: it was 0 / 0, NaN probabilities
    assert generate.sample(logits * 1e30, 1e-30, 0.9, g)[0] == 1


def test_sampling_is_reproducible(model_dir, model, tok, images, capsys):
    ids = ids_for(tok, [generate.human_turn("What is this?", True)])
    img = pixels(model, images[0])[None]

    def draw(seed):
        pick = partial(generate.sample, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(seed))
        return generate.generate(model, [ids], img, max_new_tokens=MAX_NEW, pick=pick, eos_id=tok.eos_id)

    assert draw(1) == draw(1) and draw(1) != draw(2)
    argv = ("--model", model_dir, "--image", images[0], "--prompt", "What?", "--temperature", 1, "--seed", 5)
    assert run_cli(capsys, *argv)[1] == run_cli(capsys, *argv)[1]


@pytest.mark.parametrize("legacy", [True, False])
def test_chat_continuation_tokenises_like_a_fresh_prompt(model_dir, legacy):
    # what the chat feeds after an answer ("</s>USER: ... ASSISTANT:") is exactly the tail of
    # the whole conversation tokenised afresh, and the answer's tokens are what was generated;
    # in either of the tokenizer's modes (the release's: not legacy, "USER" after "</s>" loses its "▁")
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.model"), legacy=legacy)
    first = [generate.human_turn("What is this?", True)]
    answer = "A red car on the street."
    ids1 = ids_for(tok, first)
    full = ids_for(tok, first + [("gpt", answer), ("human", "And the sign?")])
    generated = tok.encode(answer, bos=False)  # what a model emitting this text would produce
    assert full[:len(ids1) + len(generated)] == ids1 + generated
    assert full[len(ids1) + len(generated):] == tok.encode("</s>USER: And the sign? ASSISTANT:", bos=False)


def test_chat_reuses_cache_and_matches_fresh_run(model_dir, model, tok, images, capsys, monkeypatch, pack):
    questions = ["What is this?", "And the colour?", "Why?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\nexit\n"))
    calls = []
    real = mra.LlavaHR.prefill
    monkeypatch.setattr(mra.LlavaHR, "prefill", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    code, out, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--max-new-tokens", MAX_NEW)
    assert code == 0, err
    assert len(calls) == 1  # one prefill: later turns only extend the cache
    # a fresh run over the whole conversation so far gives each answer again
    img, turns, expected = pixels(model, images[0])[None], [], ""
    for q in questions:
        turns.append(generate.human_turn(q, not turns))
        fresh = generate.generate(model, [ids_for(tok, turns)], img, max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
        expected += tok.decode(fresh[0]) + "\n"  # (answers of a random model may hold newlines)
        turns.append(("gpt", tok.decode(fresh[0]).strip()))
    assert out == expected and err.count("ASSISTANT: ") == 3
    assert pack is None or pack[0] > 0


def test_chat_appends_after_a_canonical_answer(model, tok, images, capsys, monkeypatch):
    # the first answer is forced to canonical tokens (a trained model's usual output), so the
    # cache already holds the fresh prompt's prefix and turn 2 only appends "</s>USER: ..."
    answer = tok.encode("A red car on the street.", bos=False)
    forced = answer + [tok.eos_id]
    pick = lambda logits: torch.tensor([forced.pop(0)]) if forced else logits.argmax(-1)  # noqa: E731
    seen = []
    monkeypatch.setattr(generate, "common_prefix", lambda a, b: seen.append((len(a), len(b))) or
                        next(i for i in range(len(a) + 1) if i == len(a) or i == len(b) or a[i] != b[i]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\nAnd the sign?\n"))
    img = pixels(model, images[0])
    args = SimpleNamespace(conv_mode="vicuna_v1", max_new_tokens=MAX_NEW)
    generate.chat(model, tok, img, args, pick, model.llm.decode)
    out = capsys.readouterr().out
    ids1 = ids_for(tok, [generate.human_turn("What is this?", True)])
    assert seen[1][0] == len(ids1) + len(answer)  # turn 2: the cache holds prompt + answer...
    turns = [generate.human_turn("What is this?", True), ("gpt", tok.decode(answer)), ("human", "And the sign?")]
    full = ids_for(tok, turns)
    assert full[:seen[1][0]] == ids1 + answer  # ...all of which the fresh prompt starts with
    fresh = generate.generate(model, [full], img[None], max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
    assert out == tok.decode(answer) + "\n" + tok.decode(fresh[0]) + "\n"


def test_question_text_is_kept_as_the_release_prompts_it(tok):
    # model_vqa / cli: "<image>\n" + the question as given, into conversation.py's vicuna_v1 prompt
    from test_data import llava_tokenizer_image_token, llava_v1_prompt
    for q in ["What is it?", "What is it? ", " What is it?", "What is it?\n", "", "Two\n\nlines "]:
        for image in (True, False):
            release = llava_v1_prompt([{"from": "human", "value": ("<image>\n" if image else "") + q},
                                       {"from": "gpt", "value": None}])
            ids = generate.prompt_ids(tok, [generate.human_turn(q, image)], "vicuna_v1")
            assert ids == llava_tokenizer_image_token(release, _HF(tok)).tolist(), (q, image)


class _HF:  # the call test_data's transcription of tokenizer_image_token makes: tokenizer(chunk).input_ids
    def __init__(self, tok):
        self.tok, self.bos_token_id = tok, tok.bos_id

    def __call__(self, text):
        return SimpleNamespace(input_ids=self.tok.encode(text))


def test_the_streamed_answer_is_printed_stripped(tok):
    # as the answers file holds it and the release's run_llava prints it (outputs.strip()), while
    # each piece is printed as soon as it is known not to be trailing whitespace
    for text in ["\n Yes it is\n\n", "Yes", "  a  b  ", "你好 ", "\n\n", ""]:
        out = io.StringIO()
        on_token, finish = generate.streamer(tok, out)
        ids = tok.encode(text, bos=False)
        shown = ""
        for k, i in enumerate(ids, 1):
            on_token(0, i)
            now = tok.decode(ids[:k]).strip()  # printed as soon as decoded, but the end's spaces (and a
            shown = shown if now.endswith("\ufffd") else now  # character still missing bytes)
            assert out.getvalue() == shown, (text, k)
        finish()
        assert out.getvalue() == tok.decode(ids).strip() + "\n", text


def test_no_text_becomes_an_image_placeholder(model_dir, model, tok, capsys, monkeypatch):
    # "<image>" was removed in one pass: "<imag<image>e>" left one, a placeholder without an image
    assert generate.human_turn("<imag<image>e> hi", False) == ("human", " hi")
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "<imag<image>e> hi", "--max-new-tokens", 2)
    assert code == 0 and "error" not in err, err
    # chat: the model's own "<image>" in an answer is part of the next prompt, and no placeholder either
    forced = tok.encode("<image> yes", bos=False) + [tok.eos_id]
    pick = lambda logits: torch.tensor([forced.pop(0)]) if forced else logits.argmax(-1)  # noqa: E731
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd?\n"))
    generate.chat(model, tok, None, SimpleNamespace(conv_mode="vicuna_v1", max_new_tokens=MAX_NEW), pick,
                  model.llm.decode)
    out, err = capsys.readouterr()
    turns = [("human", "Hi"), ("gpt", "yes"), ("human", "And?")]
    fresh = generate.generate(model, [ids_for(tok, turns)], max_new_tokens=MAX_NEW, eos_id=tok.eos_id)
    assert out == "<image> yes\n" + tok.decode(fresh[0]) + "\n" and err.count("ASSISTANT: ") == 2


def test_plain_template_is_refused_where_it_cannot_run(model_dir, images, tmp_path, capsys, monkeypatch):
    # --conv-mode plain (a stage-1 model) is one human turn holding <image>, then the caption: a prompt
    # without an image, a text-only question or a second chat turn failed mid-run, naming nothing
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "--model", model_dir, "--conv-mode", "plain", "--prompt", "Hi")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.endswith(
        ": error: --conv-mode plain (stage 1) captions an image: give --image, or use --conv-mode vicuna_v1 "
        "(see --help)\n"), err
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text(json.dumps(dict(question_id=1, image=images[0].name, text="Hi")) + "\n" +
                 json.dumps(dict(question_id=2, text="Hi")) + "\n")
    argv = ["--model", model_dir, "--questions", q, "--answers", a, "--image-folder", images[0].parent,
            "--max-new-tokens", 2, "--conv-mode", "plain"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and err == f"error: {q} line 2: a text-only question, but --conv-mode plain (stage 1) " \
        f"captions an image; give it one, or use --conv-mode vicuna_v1\n" and not a.exists()
    q.write_text(json.dumps(dict(question_id=1, image=images[0].name, text="Hi")) + "\n")
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and err.count("note: --conv-mode plain prompts with the image alone (stage 1 learned to "
                                   "caption it): the question's text is not used\n") == 1, err
    assert [json.loads(line)["question_id"] for line in open(a)] == [1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\nAnd the colour?\n"))
    code, _, err = run_cli(capsys, "--model", model_dir, "--image", images[0], "--max-new-tokens", 2,
                           "--conv-mode", "plain")
    assert code == 0 and err.count("ASSISTANT: ") == 1 and "USER: error: --conv-mode plain takes one image and " \
        "its caption, no second turn; type exit (a conversation needs --conv-mode vicuna_v1)\nUSER: " in err, err


def test_a_batch_run_that_can_answer_nothing_fails(model_dir, model, tok, images, tmp_path, capsys):
    # an empty questions file, or a --max-new-tokens that leaves no question room, loaded the model,
    # answered nothing (each question said skipped: thousands on a benchmark) and exited 0
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    for text in ("", "\n  \n"):
        q.write_text(text)
        code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a)
        assert code == 1 and err == f"error: --questions {q}: no questions in it (a .jsonl of {{question_id, image, " \
            f"text}} objects, one per line, is expected)\n" and not a.exists(), err
    least, limit = generate.slots(model, ids_for(tok, [generate.human_turn("", False)])), model.cfg.llm.max_seq_len
    q.write_text("".join(json.dumps(dict(question_id=i, image=im.name, text="Hi")) + "\n" for i, im in enumerate(images)))
    argv = ["--model", model_dir, "--questions", q, "--answers", a, "--image-folder", images[0].parent]
    code, _, err = run_cli(capsys, *argv, "--max-new-tokens", limit - least + 1)
    assert code == 1 and err.splitlines()[-1] == f"error: --max-new-tokens {limit - least + 1} leaves no room for a " \
        f"prompt: the shortest takes {least} of the context's {limit} positions; use at most {limit - least}"
    assert "skipped" not in err and not a.exists()
    code, _, err = run_cli(capsys, *argv, "--max-new-tokens", limit - least)  # room for a text-only question only
    assert code == 1 and err.count("skipped") == 2 and err.splitlines()[-1] == "error: none of the 2 question(s) " \
        f"could be answered: each is too long for the context with --max-new-tokens {limit - least}; lower it (or " \
        "shorten them)", err


def test_a_context_shorter_than_any_prompt_is_named_not_given_a_negative_limit(model_dir, model, tok, images,
                                                                                tmp_path, capsys):
    # it said "use at most -2" of --max-new-tokens, which no value satisfies
    least = generate.slots(model, ids_for(tok, [generate.human_turn("", True)]))
    short = tmp_path / "short"
    short.mkdir()
    for name in os.listdir(model_dir):
        os.link(model_dir / name, short / name)
    cfg = json.loads((model_dir / "mra_config.json").read_text())
    cfg["llm"]["max_seq_len"] = least - 2
    (short / "mra_config.json").unlink()
    (short / "mra_config.json").write_text(json.dumps(cfg))
    code, out, err = run_cli(capsys, "--model", short, "--image", images[0], "--prompt", "Hi", "--max-new-tokens", 1)
    assert code == 1 and out == "" and err.splitlines()[-1] == f"error: --model {short}: the shortest prompt takes " \
        f"{least} positions, but the LLM's context holds {least - 2}: nothing can be answered; is its context " \
        "length right (max_position_embeddings in config.json, llm.max_seq_len in ours)?", err


@pytest.mark.parametrize("text", [json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi"}]}]),
                                  json.dumps([{"id": "1"}], indent=2), " \n[]"])
def test_a_json_array_of_questions_names_the_layout_expected(model_dir, tmp_path, capsys, text):
    # ScienceQA's llava_test_CQM-A.json given as it is got "line 1: not a JSON object" or "line 1: not JSON"
    q = tmp_path / "llava_test_CQM-A.json"
    q.write_text(text + "\n")
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", tmp_path / "a.jsonl")
    assert code == 1 and err == f"error: --questions {q}: a JSON array, not a .jsonl of {{question_id, image, text}} " \
        f"objects one per line; ScienceQA's .json converts with `python eval.py scienceqa-questions SRC DST`\n", err


def test_a_questions_file_with_a_byte_order_mark_is_read(model_dir, tmp_path, capsys):
    # a UTF-8 BOM (as some Windows editors save) is no part of line 1: it was "not JSON (Unexpected UTF-8 BOM ...)"
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_bytes(b"\xef\xbb\xbf" + json.dumps(dict(question_id=1, text="Hi")).encode() + b"\n")
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a, "--max-new-tokens", 2)
    assert code == 0 and [(r["question_id"], r["prompt"]) for r in read_jsonl(a)] == [(1, "Hi")], err


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_batch_answers_in_llava_format_and_resume(model_dir, model, tok, images, tmp_path, capsys, pack):
    folder = images[0].parent
    qs = [dict(question_id=7, image=images[0].name, text="What is this?"),
          dict(question_id="b", text="Say something."),
          dict(question_id=9, image=images[1].name, text="Red or blue? Answer the question using a single word.")]
    qfile, afile = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs[:2]))
    argv = ["--model", model_dir, "--questions", qfile, "--answers", afile, "--image-folder", folder,
            "--batch-size", 2, "--max-new-tokens", MAX_NEW]
    assert run_cli(capsys, *argv)[0] == 0
    first = read_jsonl(afile)
    assert [a["question_id"] for a in first] == [7, "b"]
    for a, q in zip(first, qs):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"] == q["text"] and a["model_id"] == model_dir.name
        assert a["metadata"] == dict(model=os.path.realpath(model_dir), lora=None, model_base=None, vit=None,
                                     weights=weights.fingerprint(str(model_dir))[:16], conv_mode="vicuna_v1", dtype="float32", quantize=None, max_new_tokens=MAX_NEW,
                                     temperature=0.0)
        assert isinstance(a["answer_id"], str) and len(a["answer_id"]) >= 20
        img = pixels(model, folder / q["image"])[None] if "image" in q else None
        ref = generate.generate(model, [ids_for(tok, [generate.human_turn(q["text"], img is not None)])], img,
                                max_new_tokens=MAX_NEW, eos_id=tok.eos_id)[0]
        assert a["text"] == tok.decode(ref).strip()
    # resume: answered ids are skipped, a line cut short by a crash is dropped and redone
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    with open(afile, "a") as f:
        f.write('{"question_id": 9, "prompt": "Red')
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out == "" and "resuming: 2 of 3" in err
    assert f"note: --answers {afile}: dropped its last line, cut short" in err  # a notice, as the others
    second = read_jsonl(afile)
    assert second[:2] == first and [a["question_id"] for a in second] == [7, "b", 9]
    assert pack is None or pack == [9, 9]  # both runs packed, fused: qkv, o, gate|up, down in 2 layers, and the head


def test_compile_packs_the_products_of_batches(model_dir, tmp_path, capsys, monkeypatch):
    # --compile: one prompt at a time, inductor's own one-row products (nothing packed); batches of
    # several, oneDNN's products on packed weights inside the compiled step
    qfile, afile = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qfile.write_text("".join(json.dumps(dict(question_id=i, text=f"Say {i}.")) + "\n" for i in range(3)))
    compiled, packed = [], []
    monkeypatch.setattr(kernels, "compile_step", lambda step, *a: compiled.append(step) or step)
    monkeypatch.setattr(kernels, "pack_linears", lambda m: packed.append(m) or 0)
    argv = ["--model", model_dir, "--questions", qfile, "--answers", afile, "--max-new-tokens", MAX_NEW, "--compile"]
    assert run_cli(capsys, *argv, "--batch-size", 2)[0] == 0 and len(read_jsonl(afile)) == 3
    assert len(compiled) == 1 and len(packed) == 1
    afile.unlink()
    assert run_cli(capsys, *argv)[0] == 0 and len(compiled) == 2 and len(packed) == 1  # batch 1: not packed


@pytest.mark.parametrize("intel", [False, True])
def test_eager_packs_but_one_row_on_intel(model_dir, tmp_path, capsys, monkeypatch, intel):
    # eagerly one prompt at a time: packed weights on an AMD CPU, plain ones on an Intel CPU (MKL's
    # one-row product is faster there: kernels.MKL_GEMV), q, k, v and gate, up apart; batches packed
    # and fused on both
    qfile, afile = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qfile.write_text("".join(json.dumps(dict(question_id=i, text=f"Say {i}.")) + "\n" for i in range(3)))
    packed, fused = [], []
    monkeypatch.setattr(kernels, "MKL_GEMV", intel)
    monkeypatch.setattr(kernels, "pack_linears", lambda m: packed.append(m) or 0)
    monkeypatch.setattr(kernels, "fuse_linears", lambda m: fused.append(m) or 0)
    assert run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", MAX_NEW)[0] == 0
    assert len(packed) == (0 if intel else 1) and not fused
    argv = ["--model", model_dir, "--questions", qfile, "--answers", afile, "--max-new-tokens", MAX_NEW]
    assert run_cli(capsys, *argv, "--batch-size", 2)[0] == 0 and len(read_jsonl(afile)) == 3
    assert len(packed) == (1 if intel else 2) and len(fused) == 1


def test_int8_in_float32_on_the_cpu_points_to_bfloat16(model_dir, capsys):
    # torch's CPU int8 kernel is far slower in float32 (bench.py --only int8): said, the run goes on
    argv = ["--model", model_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--quantize", "int8"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and "note: --quantize int8 in float32 on the CPU" in err and "--dtype bfloat16" in err
    code, _, err = run_cli(capsys, *argv, "--dtype", "float16")
    assert code == 0 and "note: --quantize int8 in float16 on the CPU" in err
    code, _, err = run_cli(capsys, *argv, "--dtype", "bfloat16")
    assert code == 0 and "note: --quantize int8" not in err


def test_one_answer_rate_leaves_out_the_compiling_step(model_dir, capsys, monkeypatch):
    # --prompt logs time to first token and the decode rate; with --compile the first decode
    # step also compiles the step, so the rate starts after it
    monkeypatch.setattr(kernels, "compile_step", lambda step, *a: step)

    def five_tokens(*_, on_token, **__):
        for t in range(5):
            on_token(0, 10 + t)
        return [list(range(10, 15))]
    monkeypatch.setattr(generate, "generate", five_tokens)
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--compile")
    assert code == 0 and "tokens/s (5 tokens, the compiling step not counted)" in err
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi")
    assert code == 0 and "tokens/s (5 tokens)" in err


@pytest.mark.skipif(not kernels.ONEDNN, reason="oneDNN's packed layout: x86 CPUs")
def test_compiled_step_runs_packed_products(model, tok, images):
    # generate.py --compile with batches on the CPU: q, k, v and gate, up fused, packed weights, each
    # product one opaque op (kernels.packed_linear) in the compiled step; the same tokens as the plain eager model
    rows = [("What is this?", images[0]), ("Describe the picture in detail, the table and the street", None)]
    prompts = [ids_for(tok, [generate.human_turn(q, img is not None)]) for q, img in rows]
    img = pixels(model, images[0])[None]
    eager = generate.generate(model, prompts, img, max_new_tokens=16, eos_id=-1)
    packed = copy.deepcopy(model)
    assert kernels.fuse_linears(packed.llm) > 0 and kernels.pack_linears(packed.llm, min_bytes=0) > 0
    step = kernels.compile_step(packed.llm.decode, torch.device("cpu"), max_batch=40)
    assert generate.generate(packed, prompts, img, max_new_tokens=16, eos_id=-1, step=step) == eager
    # a --batch-size 40 run may meet 40 batch sizes x 5 cache lengths (context 512, CACHE_ROUND 128): a
    # fullgraph step stops the run past dynamo's limits, so they cover every one
    shapes = 40 * (packed.llm.config.max_seq_len // kernels.CACHE_ROUND + 1)
    assert shapes == 200 and torch._dynamo.config.recompile_limit >= shapes
    assert torch._dynamo.config.accumulated_recompile_limit >= shapes


def test_errors_are_one_clean_line(model_dir, images, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "missing image": ["--model", model_dir, "--image", tmp_path / "nope.jpg", "--prompt", "Hi"],
        "unreadable image": ["--model", model_dir, "--image", not_image, "--prompt", "Hi"],
        "not a model": ["--model", empty, "--prompt", "Hi"],
        "too long": ["--model", model_dir, "--image", images[0], "--prompt", "Hi", "--max-new-tokens", 500],
    }
    for name, argv in cases.items():
        code, out, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if not line.startswith(("loading ", "loaded in "))]
        assert code != 0 and out == "", name
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (name, err)
    assert "nope.jpg" in run_cli(capsys, *cases["missing image"])[2]
    assert "context" in run_cli(capsys, *cases["too long"])[2]
    # the same through the real entry point
    r = subprocess.run([sys.executable, "generate.py", *map(str, cases["missing image"])], capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.abspath(generate.__file__)))
    assert r.returncode != 0 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_sampling_flags_reach_the_sampler(model_dir, images, capsys, monkeypatch):
    # --temperature, --top-p, --top-k and --seed as given, at every step; with no --seed, a fresh seed per run
    # (torch's fixed default seed would give every unseeded run the same "random" answer)
    calls = []

    def recording(logits, temperature=0.0, top_p=1.0, generator=None, top_k=0):
        calls.append((temperature, top_p, top_k, generator.initial_seed()))
        return sample(logits, temperature, top_p, generator, top_k)

    sample = generate.sample
    monkeypatch.setattr(generate, "sample", recording)
    argv = ("--model", model_dir, "--image", images[0], "--prompt", "What?", "--max-new-tokens", 3)
    assert run_cli(capsys, *argv, "--temperature", 0.7, "--top-p", 0.9, "--top-k", 5, "--seed", 11)[0] == 0
    assert calls and set(calls) == {(0.7, 0.9, 5, 11)}
    seeds = []
    for _ in range(2):
        calls.clear()
        assert run_cli(capsys, *argv, "--temperature", 1)[0] == 0
        assert len({seed for *_, seed in calls}) == 1
        seeds.append(calls[0][3])
    assert seeds[0] != seeds[1] and torch.initial_seed() not in seeds


@pytest.mark.parametrize("temperature", [0, 1])
def test_a_padded_vocabulary_never_picks_a_row_without_text(model_dir, images, tmp_path, capsys, monkeypatch,
                                                            temperature):
    # an LLM with more rows than the tokenizer has pieces (a vocabulary padded to a multiple of 64, say): the rows
    # past the pieces hold no text, so the sampler, greedy or not, is shown the pieces' scores alone
    model = mra.load_checkpoint(str(model_dir))
    big = mra.build(replace(model.cfg, llm=replace(model.cfg.llm, vocab_size=512)))
    state = model.state_dict()
    for key in ("llm.tok_embeddings.weight", "llm.output.weight"):
        state[key] = torch.cat([state[key], torch.full((12, state[key].shape[1]), 5.0)])
    big.load_state_dict(state)
    shutil.copytree(model_dir, tmp_path / "padded")
    mra.save_checkpoint(big, tmp_path / "padded")
    seen, sample = [], generate.sample

    def seeing(logits, *a, **kw):
        seen.append(logits.shape[-1])
        return sample(logits, *a, **kw)

    monkeypatch.setattr(generate, "sample", seeing)
    code, _, err = run_cli(capsys, "--model", tmp_path / "padded", "--image", images[0], "--prompt", "What?",
                           "--max-new-tokens", 4, "--temperature", temperature, "--seed", 0)
    assert code == 0 and seen and set(seen) == {500}, err


def test_a_sampled_row_with_a_non_finite_score_gets_argmaxs_pick():
    # softmax makes such a row all NaN; a draw from it (made uniform) would pick some finite token and hide
    # the fault: argmax's pick is the non-finite score itself, which decode_n_tokens reports
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    logits[0, 7], logits[1, 4] = float("nan"), float("inf")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        picked = generate.sample(logits, 1.0, 0.9, g, top_k=5)
        assert picked[:2].tolist() == [7, 4] and picked[2] in logits[2].topk(5).indices  # row 2: a draw as ever


def test_non_finite_scores_stop_in_one_line_and_keep_the_answers(model, model_dir, tok, tmp_path, capsys):
    # NaN next-token scores (float16 overflowing, weights holding NaN) made argmax pick the NaN's id: an
    # empty answer, exit 0, and in batch mode "" written as every answer; sampling failed in multinomial.
    # Here one token's embedding is NaN, so the scores after it (and only those) are NaN.
    from safetensors.torch import load_file, save_file
    ids = lambda text: ids_for(tok, [generate.human_turn(text, False)])  # noqa: E731
    ok, bad = "What is this?", "Describe the table and the street"
    first = generate.generate(model, [ids(ok)], max_new_tokens=1, eos_id=-1)[0][0]  # ok's first answer token

    def nan_model(name, token):
        path = tmp_path / name
        path.mkdir()
        for f in os.listdir(model_dir):
            (path / f).write_bytes((model_dir / f).read_bytes())
        state = load_file(path / "model.safetensors")
        state["llm.tok_embeddings.weight"][token] = float("nan")
        save_file(state, path / "model.safetensors")
        return path
    in_bad = nan_model("in_bad", next(t for t in ids(bad) if t not in ids(ok) + [first]))
    line = lambda n, why="do the weights hold NaN or inf?": \
        f"the model's scores for new token {n} are NaN or infinite: {why}"  # noqa: E731
    for flags in ([], ["--temperature", "0.7", "--seed", "0"]):  # greedy, and sampling (which failed in multinomial;
        # seeded: a draw of the NaN token itself would meet NaN in the answer to ok too)
        code, out, err = run_cli(capsys, "--model", in_bad, "--prompt", bad, "--max-new-tokens", 4, *flags)
        assert code == 1 and out.strip() == "" and err.splitlines()[-1] == f"error: {line(1)}", (flags, err)
        assert "Traceback" not in err
        code, out, _ = run_cli(capsys, "--model", in_bad, "--prompt", ok, "--max-new-tokens", 4, *flags)
        assert code == 0 and out.strip()  # the same weights answer what avoids that token
    # in float16 the advice is another dtype
    code, _, err = run_cli(capsys, "--model", in_bad, "--prompt", bad, "--max-new-tokens", 4, "--dtype", "float16")
    assert code == 1 and err.splitlines()[-1] == "error: " + line(1, "an activation overflowed float16's range; "
                                                                  "try --dtype bfloat16 (or float32)")
    # met mid-answer: ok's first token fed back
    assert first not in ids(ok)
    code, _, err = run_cli(capsys, "--model", nan_model("in_answer", first), "--prompt", ok, "--max-new-tokens", 4)
    assert code == 1 and err.splitlines()[-1] == f"error: {line(2)}", err
    # a batch file: the line named is the question's, second of its batch here
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text("".join(json.dumps(dict(question_id=i, text=t)) + "\n" for i, t in enumerate([ok, ok, ok, bad])))
    code, _, err = run_cli(capsys, "--model", in_bad, "--questions", q, "--answers", a, "--batch-size", 2,
                           "--max-new-tokens", 4)
    assert code == 1 and err.splitlines()[-1] == f"error: {q} line 4: {line(1)}; the answers so far are kept", err
    assert [json.loads(x)["question_id"] for x in a.read_text().splitlines()] == [0, 1]  # none of that batch


def test_text_that_is_no_unicode_is_refused_in_one_line(model_dir, tmp_path, capsys, monkeypatch):
    # a lone surrogate (a JSON "\\ud800", or a byte that is not UTF-8 read from argv or stdin) made
    # sentencepiece raise a RuntimeError traceback
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "--model", model_dir, "--prompt", "hi \udcff")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.endswith(": error: --prompt holds '\\udcff', no "
                                                                       "character (a byte that is not UTF-8?); give "
                                                                       "the question as UTF-8 text (see --help)\n"), err
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n{"question_id": 2, "text": "\\ud800 hi"}\n')
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", tmp_path / "a.jsonl")
    assert code == 1 and err == f"error: {q} line 2: text holds '\\ud800', a lone surrogate, no character; fix or " \
        f"delete that line\n"
    # chat: that turn is refused and the conversation goes on, whether the line arrives with the byte as a
    # surrogate (a stream that reads so, or is reconfigured to) or the read itself fails
    refused = "USER: error: that line holds '\\udcff', no character (a byte that is not UTF-8?); type it again\n"

    class Strict(io.StringIO):  # a stream that cannot be reconfigured, whose read fails
        def readline(self, *a):
            line = super().readline(*a)
            if "\udcff" in line:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return line
    unread = "USER: error: that line is not UTF-8 text; type it again\n"
    for stdin, message in [(io.StringIO("hi \udcff\nWhat is this?\n"), refused),
                           (io.TextIOWrapper(io.BytesIO(b"hi \xff\nWhat is this?\n"), "utf-8", "strict"), refused),
                           (Strict("hi \udcff\nWhat is this?\n"), unread)]:
        monkeypatch.setattr(sys, "stdin", stdin)
        code, _, err = run_cli(capsys, "--model", model_dir, "--max-new-tokens", 2)
        assert code == 0 and message in err and err.count("error") == 1 and err.count("ASSISTANT: ") == 1, err


def test_compiled_decode_compiles_once_and_equals_eager(model, tok, images, monkeypatch):
    # a 64-token batched generation (rows of different lengths, left-padded) through the compiled
    # step: the same tokens as eager, from one graph compiled once (its shapes never change)
    from torch._dynamo.utils import counters
    rows = [("What is this?", images[0]), ("Describe the picture in detail, the table and the street", None)]
    prompts = [ids_for(tok, [generate.human_turn(q, img is not None)]) for q, img in rows]
    img = pixels(model, images[0])[None]
    eager = generate.generate(model, prompts, img, max_new_tokens=64, eos_id=-1)
    step = kernels.compile_step(model.llm.decode, torch.device("cpu"))
    assert generate.generate(model, prompts, img, max_new_tokens=64, eos_id=-1, step=step) == eager
    # decode_n_tokens skips the guards after the first step; with every guard checked at every
    # step, not one fails: one graph, compiled once, which is what makes skipping them safe
    monkeypatch.setattr(torch.compiler, "set_stance", lambda **_: contextlib.nullcontext())
    torch._dynamo.reset()
    counters.clear()
    assert generate.generate(model, prompts, img, max_new_tokens=64, eos_id=-1, step=step) == eager
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_bench_gemv_pass_reads_every_linear_weight():
    # bench.py --device cuda --compile's GEMV ceiling, on the CPU without the CUDA graph
    import bench
    llm = llama.Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_seq_len=64))
    n, seconds = bench.gemv_pass(llm, torch.device("cpu"), passes=2)
    assert n == 4 * (2 * (4 * 32 * 32 + 3 * 32 * 48) + 64 * 32) and seconds > 0  # 7 per layer + head
    kernels.fuse_linears(llm)
    assert bench.gemv_pass(llm, torch.device("cpu"), passes=2)[0] == n  # the same bytes in 4 per layer + head


def test_bench_7b_section_runs_at_a_tiny_shape(capsys, monkeypatch):
    # bench.py --device cuda's 7B section runs on a GPU only: its code, run here on a tiny shape (the
    # first GPU run found code no CPU test had reached simply crashing)
    import bench
    c = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_seq_len=64)
    out = bench.bench_decode_7b(torch.device("cpu"), 1e10, prompt_len=8, new_tokens=4, c=c)
    attention = {"decode_7b_bf16_attention_written_out_speedup", "decode_7b_bf16_written_out_attention_step_speedup"}
    assert set(out) == attention | {
        "decode_7b_bf16_roofline_fraction", "decode_7b_bf16_ahead_speedup", "decode_7b_bf16_fused_speedup",
        "decode_7b_bf16_gemv_roofline_fraction", "decode_7b_bf16_gemv_roofline_fraction_unfused",
        "decode_7b_int8_speedup_vs_bf16", "decode_7b_int8_roofline_fraction"}
    printed = capsys.readouterr().out
    assert "compiled, 7 products per layer" in printed and "compiled, sdpa attention" in printed
    # each summary line printed once its part has run: a GPU run cut short by its timeout keeps them
    assert printed.index("decode_7b_bf16_roofline_fraction: ") < printed.index("compiled, sdpa attention")
    # the step generate.py runs first, the unfused one it is compared with last
    assert printed.index("compiled, int8 weights") < printed.index("compiled, 7 products per layer")
    # each part's seconds, compiles included: what a GPU run's timeout must allow for
    assert all(re.search(rf"^{part}: \d+ s$", printed, re.M) for part in ("fused", "attention", "quantized", "unfused"))
    assert kernels.COMPILED_ATTENTION == {"cpu": "written-out", "cuda": "sdpa"}  # as it was
    # a part that fails (most of this has never run on a GPU) leaves out its lines, and the rest runs
    monkeypatch.setattr(bench, "attention_pass", lambda *a: 1 / 0)
    assert set(bench.bench_decode_7b(torch.device("cpu"), 1e10, prompt_len=8, new_tokens=4, c=c)) == set(out) - attention
    assert "attention: failed" in capsys.readouterr().out


def test_ci_cuda_collects_the_cuda_tests_alone_and_gives_them_what_is_left(tmp_path):
    # .ci/cuda on a GPU machine, its commands stubbed (each prints its arguments): `pytest -m cuda`
    # collected every test file, importing peft and the rest against the carried transformers (one
    # failed import stops the whole run), and had 150 s however early the 7B section ended
    for name, body in (("python3", 'echo "python3 $*"'), ("nvidia-smi", "echo gpu"),
                       ("timeout", 'echo "timeout $1"; shift; "$@"')):
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    env.pop("PYTEST_S", None), env.pop("CALL_S", None)
    lines = subprocess.run(["bash", os.path.join(root, ".ci", "cuda"), "tests"], env=env, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    pytest_line = next(line for line in lines if "-m pytest" in line)
    assert "-m cuda tests/test_cuda.py" in pytest_line
    assert int(lines[lines.index(pytest_line) - 1].split()[1]) > 500  # the call's ~590 s, less the setup
    assert "tests rc=0" in lines


def test_bench_worker_that_dies_stops_the_section():
    # bench.in_process waited for ever on a worker that died before putting its result (CUDA out of
    # memory in scale_worker, say); truediv(1, queue) raises in the worker
    import operator
    import bench
    with pytest.raises(SystemExit, match="truediv.*the worker died"):
        bench.in_process(operator.truediv, 1)


def test_bench_counts_table1_on_meta():
    # bench.py itself runs for minutes; its full-scale FLOP count on the meta device is quick
    import bench
    n, flops = bench.prefill_flops("llava-1.5", 336, 60)
    # about 2 FLOPs per LLM weight per token (6.7B weights, 636 tokens) plus the ViT and attention
    assert n == 576 and 2 * 6.7e9 * 636 < flops < 1.2 * 2 * 6.7e9 * 636 + 0.5e12


def test_bench_names_its_host_first(capsys):
    # every run's figures belong to a machine: bench.py's first line names it, as the README quotes hosts
    import bench
    bench.main(["--quick", "--only", "table1", "--text-tokens", "1"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("host: ") and f"torch {torch.__version__}" in first
    if kernels.cpu_info().get("vendor_id"):
        assert f"({kernels.cpu_info()['vendor_id']}, family " in first


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"), reason="torch's CPU int8 kernel")
def test_bench_int8_section_times_both_ways_per_row_count(capsys):
    # the figures behind int8.int8_linear's row limits: a table per dtype and row count, and the limits
    import bench
    bench.main(["--quick", "--only", "int8"])
    out = capsys.readouterr().out
    assert "5b. int8 products on the CPU" in out
    assert all(out.count(f"{dtype} ") >= 8 for dtype in ("bfloat16", " float32", " float16"))  # a row per count
    lines = dict(line.split(": ") for line in out.splitlines() if line.startswith("int8_kernel_rows_"))
    assert set(lines) == {"int8_kernel_rows_bfloat16", "int8_kernel_rows_float32", "int8_kernel_rows_float16"}
    assert all(v in {"0", "1", "2", "4", "8", "16", "32", "64", "128"} for v in lines.values())


def test_bench_counts_each_weight_once_and_the_cache_each_step_attends(monkeypatch):
    # the roofline's bytes per decode token, by hand at the README's shape (106M, fp32, 1,100 + 128 tokens):
    # the head 32000 x 768, one embedding row, 8 layers of 4 x 768^2 + 3 x 768 x 2048 and two norms, the
    # final norm; keys and values of 8 layers x 12 heads x 64 at 4 bytes, 49,152 B a slot, over the mean
    # slots a step attends: steps 1..127 attend 1,101..1,227, 1,164 on average (the README's 382 MB)
    import bench
    with torch.device("meta"):
        llm = llama.Llama(LlamaConfig(vocab_size=32000, dim=768, n_layers=8, n_heads=12, hidden_dim=2048))
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert bench.bytes_per_token(llm, 1100, 128) == (
        4 * (32000 * 768 + 768 + 8 * per_layer + 768), 4 * 2 * 8 * 12 * 64 * 1164)
    assert bench.bytes_per_token(llm, 1100, 128) == (324_851_712, 57_212_928)
    # bf16 and grouped-query: 2 bytes, the kv heads' width (2 x 16 of 4 x 16); the slots the eager step
    # reads, counted as generate.decode_n_tokens runs it: 5 steps after 10 tokens attend 11..15, 13 on average
    c = LlamaConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)
    torch.manual_seed(0)
    llm = llama.Llama(c).to(torch.bfloat16).eval()
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64
    weight_bytes, kv_bytes = bench.bytes_per_token(llm, 10, 6)
    assert (weight_bytes, kv_bytes) == (2 * (100 * 64 + 64 + 2 * per_layer + 64), 2 * 2 * 2 * 2 * 16 * 13)
    attended, write = [], llama.KVCache.write

    def spy(self, layer, k, v, start=None):
        keys, values = write(self, layer, k, v, start)
        if layer == 0 and k.shape[2] == 1:  # a decode step's
            attended.append(keys.shape[2])
        return keys, values
    monkeypatch.setattr(llama.KVCache, "write", spy)
    with torch.no_grad():
        cache = llm.new_cache(1, 32)
        logits = llm(torch.arange(3, 13)[None], cache=cache, last_only=True)[:, -1]
        generate.decode_n_tokens(llm.decode, logits, cache, 6, lambda x: x.argmax(-1), eos_id=-1)
    assert attended == [11, 12, 13, 14, 15]
    assert kv_bytes == 2 * 2 * c.n_layers * c.n_kv_heads * c.head_dim * sum(attended) / len(attended)


def test_bench_counts_a_tied_head_as_a_read_of_the_whole_table():
    import bench
    c = LlamaConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=96, tie_embeddings=True)
    with torch.device("meta"):
        llm = llama.Llama(c)
    per_layer = 4 * 64 * 64 + 3 * 64 * 96 + 2 * 64
    # the head reads the whole table, and the lookup one row of it
    assert bench.bytes_per_token(llm, 10, 6)[0] == 4 * (100 * 64 + 2 * per_layer + 64) + 4 * 64


def test_bench_reads_bandwidth_over_8x_the_largest_cache(tmp_path, monkeypatch):
    # the roofline's denominator: a buffer 8x the largest cache sysfs lists for cpu0, at least 8 x 64 MB, so
    # that every byte comes from memory (480 MiB of L3 here: 3.75 GiB), in whole rows of 4,096 floats
    import bench
    sizes, real_ones = [], torch.ones

    def ones(n, device=None):
        sizes.append(4 * n)
        return real_ones(4096, device=device)
    monkeypatch.setattr(torch, "ones", ones)
    for listed, least in ((["48K", "2048K", "491520K"], 8 * 480 << 20), (["32K", "1024K", "65536K"], 8 * 64 << 20),
                          (["32K", "512K", "16384K"], 512 << 20), (["32K", "4M"], 512 << 20),
                          (["32K", "70001K"], 8 * 70001 << 10 & -(16 << 10))):
        files = []
        for i, text in enumerate(listed):
            (tmp_path / f"index{i}").write_text(text + "\n")
            files.append(str(tmp_path / f"index{i}"))
        monkeypatch.setattr(bench.glob, "glob", lambda pattern, files=files: files)
        bench.read_bandwidth(torch.device("cpu"), repeats=0)
        assert sizes[-2:] == [least, 4 * 4096], listed


def test_bench_bandwidth_is_the_faster_read(monkeypatch):
    # a sum and a one-row product share each sample's time, and the faster counts: on one Xeon sums read
    # 23-24 GB/s and products 30-31, and a decode step 24-27, above a roofline of sums alone. A fake clock:
    # a pass of each takes 1-3 ms, a sample 0.2 s (0.1 s each read); the faster one either way
    import bench
    clock, real_sum, real_mv = [0.0], torch.Tensor.sum, torch.mv

    def took(f, s):
        def timed(*a, **k):
            clock[0] += s
            return f(*a, **k)
        return timed
    monkeypatch.setattr(bench, "now", lambda device: clock[0])
    monkeypatch.setattr(bench.glob, "glob", lambda pattern: [])  # no caches listed: the 512 MB floor
    monkeypatch.setattr(torch, "ones", lambda n, device=None: torch.zeros(4096) + 1)
    n, cpu = 512 << 20, torch.device("cpu")
    for product, sum_ in ((1e-3, 2e-3), (3e-3, 1e-3)):
        monkeypatch.setattr(torch.Tensor, "sum", took(real_sum, sum_))
        monkeypatch.setattr(torch, "mv", took(real_mv, product))
        each = bench.read_rates(cpu, repeats=2, seconds=0.2)
        best = bench.read_bandwidth(cpu, repeats=2, seconds=0.2)
        assert each["sum"] == pytest.approx(n / sum_, rel=0.04)
        assert each["one-row product"] == pytest.approx(n / product, rel=0.04)
        assert best == pytest.approx(max(each.values()), rel=1e-9)


# ---------------------------------------------------------------------------------------
# --answers: appended to only when it is an answers file of these questions; nothing else touched

def answers_run(capsys, model_dir, q, a, *extra):
    return run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a, "--max-new-tokens", 2, *extra)


@pytest.mark.parametrize("content, message", [
    (b'[{"question_id": 1, "answer": "yes"}]', "line 1: not a JSON object"),  # an upload
    (b'{"question_id": 1, "text": "Hi"}\n', "line 1: needs a prompt and a text (strings): not an answers file"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8 text"),
    (b"my notes", "line 1: not JSON"),
    (b"my notes\nsecond line", "line 1: not JSON"),
    (b'{"question_id": 5, "prompt": "Other?", "text": "x"}\n', "line 1: answers question_id 5 with a prompt that"),
    (b'{"question_id": null, "prompt": "Hi", "text": "x"}\n', "line 1: no question_id: not an answers file"),
    # a last line cut short that does not start as generate.py's do: another file's, named (not dropped as ours)
    (b'{"id": 1, "answer": "ye', "line 1: not JSON"),
])
def test_answers_that_are_not_these_answers_are_left_untouched(model_dir, tmp_path, capsys, content, message):
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    a.write_bytes(content)
    code, _, err = answers_run(capsys, model_dir, q, a)
    assert code == 1 and message in err and err.count("\n") == 1 and "loading" not in err, err
    assert a.read_bytes() == content


def test_answers_of_a_run_with_other_settings_are_not_added_to(model_dir, tmp_path, capsys):
    # a rerun with another model or other flags on the same --answers: resumed silently, so one file
    # held two runs' answers and scored as one. So did a file of LLaVA's scripts (metadata {}), or one without
    # settings: whatever model and settings wrote it, it was resumed
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n{"question_id": 2, "text": "Bye"}\n')
    for metadata in ('"metadata": {}', '"metadata": null', '"model_id": "llava-v1.5-7b"'):
        a.write_text(f'{{"question_id": 1, "prompt": "Hi", "text": "x", {metadata}}}\n')
        code, _, err = answers_run(capsys, model_dir, q, a)
        theirs = "{}" if "{}" in metadata else "null"
        assert code == 1 and err == f"error: {a} line 1: an answer without generate.py's settings (its metadata: " \
            f"{theirs}; LLaVA's scripts write {{}}), so whether it came from this model and these settings is " \
            f"unknown, and two runs would mix in one file; name a new file for --answers\n", err
    a.unlink()
    assert answers_run(capsys, model_dir, q, a)[0] == 0
    q.write_text(q.read_text() + '{"question_id": 3, "text": "Why?"}\n')
    before = a.read_bytes()
    code, _, err = run_cli(capsys, "--model", model_dir, "--questions", q, "--answers", a, "--max-new-tokens", 3)
    assert code == 1 and err == f"error: {a} line 1: answered by a run with other settings (max_new_tokens 2, now " \
        f"3): the two would mix in one file; name a new file for --answers, or run as before\n", err
    assert a.read_bytes() == before
    code, _, err = answers_run(capsys, model_dir, q, a)  # as before: resumed
    assert code == 0 and "resuming: 2 of 3" in err and len(read_jsonl(a)) == 3
    # the same weights moved (the same fingerprint at another path): resumed, said; a path was the only
    # thing that differed, and it refused the file
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    q.write_text(q.read_text() + '{"question_id": 5, "text": "Who?"}\n')
    code, _, err = answers_run(capsys, moved, q, a)
    assert code == 0 and "resuming: 3 of 4" in err and f"note: --answers {a}: begun with the same weights at other " \
        f"paths (moved?); going on\n" in err, err
    q.write_text("".join(q.read_text().splitlines(keepends=True)[:3]))
    a.write_text("".join(a.read_text().splitlines(keepends=True)[:3]))
    # the same run named another way resumes: the model through a symlink, the default dtype named
    # (it was recorded as None, so "--dtype float32" on the CPU was refused), another --batch-size
    q.write_text(q.read_text() + '{"question_id": 4, "text": "How?"}\n')
    (tmp_path / "link").symlink_to(model_dir)
    code, _, err = run_cli(capsys, "--model", tmp_path / "link", "--questions", q, "--answers", a,
                           "--max-new-tokens", 2, "--dtype", "float32", "--batch-size", 2)
    assert code == 0 and "resuming: 3 of 4" in err and len(read_jsonl(a)) == 4, err
    assert read_jsonl(a)[-1]["metadata"] == read_jsonl(a)[1]["metadata"]


def test_answers_sampled_with_another_top_k_are_not_added_to(model_dir, tmp_path, capsys):
    # sampling's top-k is one of the settings an answers file is generated with, as the temperature and top-p are
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    sampled = ("--temperature", 0.7, "--top-p", 0.9, "--seed", 0)
    assert answers_run(capsys, model_dir, q, a, *sampled, "--top-k", 5)[0] == 0
    assert {k: read_jsonl(a)[0]["metadata"][k] for k in ("temperature", "top_p", "top_k")} == dict(
        temperature=0.7, top_p=0.9, top_k=5)
    q.write_text(q.read_text() + '{"question_id": 2, "text": "Bye"}\n')
    before = a.read_bytes()
    code, _, err = answers_run(capsys, model_dir, q, a, *sampled, "--top-k", 6)
    assert code == 1 and "answered by a run with other settings (top_k 5, now 6)" in err and a.read_bytes() == before


def test_a_line_separator_inside_a_question_is_no_line_break(model_dir, tmp_path, capsys):
    # JSON may hold U+2028 unescaped inside a string (ensure_ascii=False): a .jsonl breaks lines at "\n" alone
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text(json.dumps(dict(question_id=1, text="Hi\u2028there"), ensure_ascii=False) + "\n", encoding="utf-8")
    code, _, err = answers_run(capsys, model_dir, q, a)
    assert code == 0 and [r["prompt"] for r in read_jsonl(a)] == ["Hi\u2028there"], err


def test_answers_of_other_weights_at_the_same_path_are_not_added_to(model_dir, tmp_path, capsys):
    # a run's OUT/ckpt is one path whatever its weights: a file begun on one save resumed on the next
    from safetensors.torch import load_file, save_file

    m, q, a = tmp_path / "m", tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    m.mkdir()
    for f in os.listdir(model_dir):
        (m / f).write_bytes((model_dir / f).read_bytes())
    q.write_text('{"question_id": 1, "text": "Hi"}\n{"question_id": 2, "text": "Bye"}\n')
    assert answers_run(capsys, m, q, a)[0] == 0
    before = read_jsonl(a)[0]["metadata"]["weights"]
    save_file({k: -v for k, v in load_file(m / "model.safetensors").items()}, m / "model.safetensors")
    q.write_text(q.read_text() + '{"question_id": 3, "text": "Why?"}\n')
    kept = a.read_bytes()
    code, _, err = answers_run(capsys, m, q, a)
    now = weights.fingerprint(str(m))[:16]
    assert before != now and code == 1 and err == f"error: {a} line 1: answered by a run with other settings " \
        f"(weights {before!r}, now {now!r}): the two would mix in one file; name a new file for --answers, or run " \
        f"as before\n", err
    assert a.read_bytes() == kept
    # a file begun before the weights were recorded resumes as it did
    lines = read_jsonl(a)
    for line in lines:
        del line["metadata"]["weights"]
    a.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = answers_run(capsys, m, q, a)
    assert code == 0 and "resuming: 2 of 3" in err and read_jsonl(a)[-1]["metadata"]["weights"] == now


def test_answers_begun_before_the_weights_were_recorded_are_not_added_to_from_another_path(model_dir, tmp_path,
                                                                                           capsys):
    # such a file names its model by path alone: at another path, whether the weights are the same is unknown,
    # so it is another model's file, refused; not "the same weights moved", resumed (only a recorded
    # fingerprint can say that)
    q, a, other = tmp_path / "q.jsonl", tmp_path / "a.jsonl", tmp_path / "other"
    shutil.copytree(model_dir, other)
    q.write_text('{"question_id": 1, "text": "Hi"}\n{"question_id": 2, "text": "Bye"}\n')
    assert answers_run(capsys, model_dir, q, a)[0] == 0
    lines = read_jsonl(a)
    for line in lines:
        del line["metadata"]["weights"]
    a.write_text("".join(json.dumps(line) + "\n" for line in lines))
    q.write_text(q.read_text() + '{"question_id": 3, "text": "Why?"}\n')
    kept = a.read_bytes()
    code, _, err = answers_run(capsys, other, q, a)
    was, now = os.path.realpath(model_dir), os.path.realpath(other)
    assert code == 1 and err == f"error: {a} line 1: answered by a run with other settings (model {was!r}, now " \
        f"{now!r}): the two would mix in one file; name a new file for --answers, or run as before\n", err
    assert a.read_bytes() == kept


def test_a_second_run_on_one_answers_file_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    # two runs on one --answers both answered every question: each line twice, then a rerun refused the file
    fcntl = pytest.importorskip("fcntl")
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    with open(a, "a") as other:  # as another generate.py holds it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = answers_run(capsys, model_dir, q, a)
    assert code == 1 and err == f"error: --answers {a}: another generate.py is writing it; wait for it to end, or " \
        f"name another file\n", err
    assert a.read_bytes() == b""
    assert answers_run(capsys, model_dir, q, a)[0] == 0 and len(read_jsonl(a)) == 1  # released: runs
    # a run that answered nothing leaves no empty answers file of its own making behind
    q.write_text('{"question_id": 1, "text": "Hi"}\n{"question_id": 2}\n')
    code, _, err = answers_run(capsys, model_dir, q, tmp_path / "new.jsonl")
    assert code == 1 and "line 2" in err and not (tmp_path / "new.jsonl").exists()
    # ...but an empty file the user made (touch a.jsonl) is theirs, and kept
    (tmp_path / "mine.jsonl").write_bytes(b"")
    code, _, err = answers_run(capsys, model_dir, q, tmp_path / "mine.jsonl")
    assert code == 1 and "line 2" in err and (tmp_path / "mine.jsonl").read_bytes() == b"", err
    # two runs started at once on a new file: both saw none, the other locked it first; the refused one
    # deleted it as an empty file of its own making, and the other's answers went to a file no longer there
    import builtins

    import questions
    b, other = tmp_path / "b.jsonl", []

    def the_other_first(path, mode="r", *args, **kw):
        if not other and str(path) == str(b):
            other.append(builtins.open(b, "a"))
            fcntl.flock(other[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return builtins.open(path, mode, *args, **kw)
    monkeypatch.setattr(questions, "open", the_other_first, raising=False)
    code, _, err = answers_run(capsys, model_dir, q, b)
    assert code == 1 and "another generate.py is writing it" in err and b.exists(), err
    other[0].close()


def test_answers_file_is_not_the_questions_file(model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    code, _, err = answers_run(capsys, model_dir, q, q)
    assert code == 1 and "is the --questions file" in err and q.read_text() == '{"question_id": 1, "text": "Hi"}\n'


def test_a_complete_last_answer_without_its_newline_is_kept(model_dir, tmp_path, capsys):
    q, a = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    q.write_text('{"question_id": 1, "text": "Hi"}\n')
    assert answers_run(capsys, model_dir, q, a)[0] == 0
    first = a.read_text()
    a.write_text(first.rstrip("\n"))  # its newline lost (a hand edit)
    q.write_text(q.read_text() + '{"question_id": 2, "text": "Bye"}\n')
    code, _, err = answers_run(capsys, model_dir, q, a)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert code == 0 and "resuming: 1 of 2" in err and "dropped" not in err
    assert [r["question_id"] for r in rows] == [1, 2] and a.read_text().startswith(first)


def test_binary_questions_file_is_one_line(model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    code, _, err = answers_run(capsys, model_dir, q, tmp_path / "a.jsonl")
    assert code == 1 and f"{q}: not UTF-8 text" in err and err.count("\n") == 1


def test_sampling_flags_without_a_temperature_are_said_to_do_nothing(model_dir, capsys):
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--seed", 3)
    assert code == 0 and "note: --top-p, --top-k and --seed shape sampling" in err
    code, _, err = run_cli(capsys, "--model", model_dir, "--prompt", "Hi", "--max-new-tokens", 2)
    assert code == 0 and "note:" not in err


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_keep_freed_memory_reuses_a_prefills_freed_activations():
    # A prefill allocates MB-sized activations and frees them. With glibc's defaults freed memory
    # often goes back to the kernel, and every pass maps in fresh pages, a fault per 4 KB (this
    # pattern: ~22,000 per pass in most processes; in some the heap's layout happens to keep it).
    # A fresh process, as a long pytest run's heap and threads would blur the count; two of them, since
    # a layout that keeps the memory anyway would let a keep_freed_memory that does nothing pass
    script = """if True:
        import resource, torch, kernels
        torch.set_num_threads(1)
        def prefill_like():
            acts = [torch.ones(1100, 2048) for _ in range(10)]  # ~9 MB each
            del acts
        kernels.keep_freed_memory()
        for _ in range(3):  # the heap settles into its layout
            prefill_like()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            prefill_like()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"""
    faults = [int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                 cwd=os.path.dirname(os.path.abspath(generate.__file__))).stdout) for _ in range(2)]
    assert max(faults) < 100, faults


def test_compile_step_for_cuda_builds_without_a_gpu(monkeypatch):
    # the CUDA branch only wraps the step (compiling waits for the first call): reachable on any
    # machine. It once named `torch` after the function also imported torch.utils.cpp_extension,
    # which made torch a local there, unbound on the CUDA branch (found on the first GPU run)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    step = kernels.compile_step(len, torch.device("cuda"))
    assert step is len and calls == [dict(fullgraph=True, dynamic=False, options={"triton.cudagraphs": True})]
    assert torch._inductor.list_mode_options("reduce-overhead") == {"triton.cudagraphs": True}
    # an int8 model's step: its one-row products as triton reductions that read the int8 weights
    from int8 import int8_linears
    m = int8_linears(llama.Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=48)))
    kernels.compile_step(m.decode, torch.device("cuda"))
    assert calls[-1]["options"] == {"triton.cudagraphs": True, "coordinate_descent_tuning": True}


def test_compiled_step_serves_more_cache_shapes_than_dynamos_default(monkeypatch):
    # a --questions run meets one (batch size, cache length) pair per batch shape: dynamo's default
    # limit of 8 graphs per function made the 9th shape fail (fullgraph=True forbids falling back)
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, fullgraph=True, dynamic=False, backend="eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = llama.Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=48, max_seq_len=256)).eval()
    with torch._dynamo.config.patch(recompile_limit=8), torch.no_grad():  # dynamo's default, restored after
        step = kernels.compile_step(m.decode, torch.device("cuda"))  # the CUDA branch's arguments
        for n in range(16, 16 * 12, 16):  # 11 cache lengths
            cache = m.new_cache(1, n)
            logits = m(torch.tensor([[1, 5, 9]]), cache=cache)[:, -1]
            eager = copy.deepcopy(cache)
            want = generate.decode_n_tokens(m.decode, logits, eager, 3, lambda x: x.argmax(-1), eos_id=-1)
            assert generate.decode_n_tokens(step, logits, cache, 3, lambda x: x.argmax(-1), eos_id=-1) == want


def test_generate_reuses_one_cache_per_shape(model, tok, images):
    # a CUDA graph is recorded for its inputs' addresses: a compiled step on CUDA gets the last batch's
    # cache back (reuse_cache, forced here on the CPU), emptied, when the shape is the same, a new one
    # when it is not; every step sees what it would see in a fresh cache (slots, position, logits)
    seen = []

    def step(tokens, cache):
        logits = model.llm.decode(tokens, cache)
        seen.append((id(cache), int(cache.pos), cache.valid.clone(), logits))
        return logits
    q = [ids_for(tok, [generate.human_turn(t, False)]) for t in ("Hello there", "Describe the street", "Hi")]
    batches = [q[:2], q[1:], q[::2]]  # rows of different lengths: left padding, slots no prompt writes
    for b in batches:
        generate.generate(model, b, max_new_tokens=8, eos_id=-1, step=step, reuse_cache=False)
    fresh, seen = seen, []
    model.llm.reusable_cache = model.llm.new_cache(2, kernels.CACHE_ROUND)  # a cache of that shape...
    for t in model.llm.reusable_cache.k + model.llm.reusable_cache.v:
        t.fill_(float("nan"))  # ...whose old keys and values are poison (NaN passes a -inf mask)
    kept = id(model.llm.reusable_cache)
    for b in batches:
        generate.generate(model, b, max_new_tokens=8, eos_id=-1, step=step, reuse_cache=True)
    assert {c for c, *_ in seen} == {kept}  # one shape, one cache, reused
    for (_, pos, valid, logits), (_, pos0, valid0, logits0) in zip(seen, fresh, strict=True):
        assert pos == pos0 and torch.equal(valid, valid0) and torch.equal(logits, logits0)
    long = ids_for(tok, [generate.human_turn("word " * (kernels.CACHE_ROUND - 8), False)])
    generate.generate(model, [long, q[0]], max_new_tokens=8, eos_id=-1, step=step, reuse_cache=True)
    shape = seen[-1][2].shape  # a new shape: a new cache, kept in place of the old (which may leave its id free)
    assert shape[1] > kernels.CACHE_ROUND and model.llm.reusable_cache.valid.shape == shape
    del model.llm.reusable_cache


def test_step_queued_ahead_answers_the_same():
    # ahead reorders the loop: scripted rows (a fake step; token 0 is EOS) of every length and EOS
    # position give the same tokens, on_token calls and fed steps; one step more runs only when every
    # row ended between the first and the last step, where the first steps run as without
    import random
    g = random.Random(0)
    for _ in range(2000):
        B, n = g.randint(1, 3), g.randint(1, 6)
        script = torch.tensor([[g.randint(0, 4) for _ in range(n + 1)] for _ in range(B)])  # row b's token at step i

        def run(ahead):
            fed, calls = [], []

            def step(tokens, cache):
                fed.append(tokens.tolist())
                return torch.nn.functional.one_hot(script[:, len(fed)], 5).float()
            out = generate.decode_n_tokens(step, torch.nn.functional.one_hot(script[:, 0], 5).float(), None, n,
                                           lambda x: x.argmax(-1), 0, lambda b, t: calls.append((b, t)), ahead=ahead)
            return out, calls, fed
        (out, calls, fed), (out1, calls1, fed1) = run(False), run(True)
        assert out1 == out and calls1 == calls and fed1[:len(fed)] == fed
        assert len(fed1) - len(fed) == (0 < len(fed) < n - 1)


def test_answer_ids_are_22_characters():
    # base 57 of a uuid4: about 2% of them have a leading zero digit, once dropped (21 characters)
    ids = [generate.short_id() for _ in range(2000)]
    assert {len(i) for i in ids} == {22} and len(set(ids)) == len(ids)
