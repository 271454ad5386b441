"""Tokenizer parity with HF's slow LlamaTokenizer: the installed transformers in legacy mode, and
transformers 4.31.0 (the release's pin, fetched from PyPI once into .ref/) in both modes.

A tiny sentencepiece model is trained here with LLaMA's trainer settings (BPE, byte fallback,
split digits, identity normalisation, whitespace kept), so the test needs no download.
"""
import json
import os
import random
import subprocess
import sys
import zipfile

import pytest
import sentencepiece as spm
from transformers import LlamaTokenizer

from tokenizer import Tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
VICUNA = SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: And? ASSISTANT:"
WORDS = ("the a cat dog image picture what is this color of on in and man woman red blue two three "
         "there are people sitting standing table street car sign says number answer question "
         "using single word phrase yes no left right photo describe detail").split()

CASES = [
    "", " ", "  ", "\n", "\n\n", "hello", "hello world", " hello", "  hello", "hello ", "hello  ",
    "a  b   c", "\nhello", "hello\n", "line one\nline two", "para one\n\npara two", "\n \n",
    "1234567890", "in 2023, 42 cats", "3.14 and -7", "def f(x):\n    return x + 1",
    "你好，世界", "café naïve Ærø", "emoji 🙂🐈 ok", "Ωmega ß ñ", "▁already▁marked",
    VICUNA, SYSTEM + " USER: What? ASSISTANT: Yes.</s>USER: No? ASSISTANT: No.</s>",
    "<image>\nDescribe the image.\n", "Hello</s>", "</s>Hello", "Hello</s>world", "Hello </s> world",
    "Hello  </s>  world", "<s>Hello", "<s> Hello", "Hello<s>", "a <s> b </s> c", "</s>", "<s>",
    "<unk>", "<s></s>", "</s></s>", " </s>", "</s> ", "\n</s>\n", "x<unk>y", "<unk> cat",
    "<</s>>", "</</s>", "<s<s>>", "<un<unk>", "< s>", "</ s>", "<S>", "你</s>好",
]
FRAGMENTS = ["<s>", "</s>", "<unk>", " ", "  ", "\n", "hello", "USER:", "ASSISTANT:", "cat.", "42",
             "你好", "é", "🙂", "<", "s>", "/", "▁", "What is", " this?", "\t", "<image>"]


def random_cases(n=300, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8))) for _ in range(n)]


ALL = CASES + random_cases()


def training_lines(n=400, seed=0):
    rng = random.Random(seed)
    lines = [SYSTEM, "USER:", "ASSISTANT:", "    indented code", "        more indented"]
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        a = " ".join(rng.choice(WORDS + [str(rng.randint(0, 9999))]) for _ in range(rng.randint(1, 8)))
        lines.append(f"USER: {q.capitalize()}? ASSISTANT: {a.capitalize()}.")
        lines.append(" " * rng.choice([2, 4, 8]) + q)  # whitespace-only pieces ("▁▁▁▁")
    return lines


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_prefix=str(prefix), vocab_size=500,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        minloglevel=2)
    return f"{prefix}.model"


def test_special_ids(tok, hf):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 0)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert len(tok) == tok.vocab_size == len(hf) == hf.vocab_size == 500
    assert any(tok.sp.id_to_piece(i) == "▁▁▁▁" for i in range(len(tok)))  # trained like LLaMA's


def test_encode_matches_hf(tok, hf):
    for text in ALL:
        assert tok.encode(text) == hf(text).input_ids, repr(text)
        assert tok.encode(text, bos=False) == hf(text, add_special_tokens=False).input_ids, repr(text)


def test_encode_eos_matches_hf(tok, model_path):
    hf_eos = LlamaTokenizer(vocab_file=model_path, legacy=True, add_eos_token=True)
    for text in CASES:
        assert tok.encode(text, eos=True) == hf_eos(text).input_ids, repr(text)


def test_encode_eos_without_bos_matches_hf(tok, model_path):
    # EOS alone (no BOS): "" is [EOS], as HF's add_eos_token appends it to whatever the text gave
    hf_eos = LlamaTokenizer(vocab_file=model_path, legacy=True, add_bos_token=False, add_eos_token=True)
    for text in CASES:
        assert tok.encode(text, bos=False, eos=True) == hf_eos(text).input_ids, repr(text)


def test_vicuna_template(tok):
    ids = tok.encode(VICUNA)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 1 and tok.unk_id not in ids
    # legacy mode: the turn after "</s>" starts with a dummy-prefix space, "▁USER"
    rest = [tok.sp.id_to_piece(i) for i in ids[ids.index(tok.eos_id) + 1:]]
    assert rest[0].startswith("▁") and tok.sp.decode_pieces(rest) == "USER: And? ASSISTANT:"
    # characters outside the vocabulary become their UTF-8 bytes, never <unk>
    assert [tok.sp.id_to_piece(i) for i in tok.encode("你", bos=False)] == ["▁", "<0xE4>", "<0xBD>", "<0xA0>"]
    assert tok.unk_id not in tok.encode("你好🙂")


def test_decode_matches_hf(tok, hf):
    for text in ALL:
        ids = hf(text).input_ids
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (repr(text), skip)


def test_decode_random_ids_matches_hf(tok, hf):
    # arbitrary id sequences: specials anywhere, lone byte pieces (invalid UTF-8), "▁"-only pieces
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.choice([0, 1, 2, rng.randrange(3, 259), rng.randrange(259, len(tok))])
               for _ in range(rng.randint(0, 10))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_decode_reads_a_tensor_of_ids_as_hf_does(tok, hf):
    # ids in a tensor, as HF's decode takes them too: its elements are 0-d tensors, whose specials (and
    # pieces) must still be found by their ids
    import torch
    for text in ALL:
        ids = hf(text).input_ids
        for skip in (True, False):
            assert tok.decode(torch.tensor(ids), skip) == hf.decode(torch.tensor(ids), skip_special_tokens=skip), \
                (repr(text), skip)


def test_round_trip(tok, hf):
    for text in ALL:
        for skip in (True, False):
            hf_text = hf.decode(hf(text, add_special_tokens=False).input_ids, skip_special_tokens=skip)
            assert tok.decode(tok.encode(text, bos=False), skip) == hf_text, (repr(text), skip)
        ours = tok.decode(tok.encode(text, bos=False))
        # lossless except for leading whitespace (the dummy-prefix space is stripped twice) and
        # "▁", which sentencepiece reads as its own space symbol and gives back as " "
        if not any(s in text for s in ("<s>", "</s>", "<unk>", "▁")) and not text[:1].isspace():
            assert ours == text, repr(text)


def test_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "corrupt.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="corrupt.model"):
        Tokenizer(str(bad))


# -----------------------------------------------------------------------------
# transformers 4.31.0: the release pins it, and its non-legacy mode differs from later versions'

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ref")
REF_431 = """
import json, sys, tempfile
import transformers
from transformers import LlamaTokenizer
assert transformers.__version__ == "4.31.0", transformers.__version__
model, texts = sys.argv[1], json.load(sys.stdin)
out = {}
for legacy in (True, False):
    d = tempfile.mkdtemp()
    LlamaTokenizer(vocab_file=model, legacy=legacy).save_pretrained(d)  # as from_pretrained reads a model dir
    t = LlamaTokenizer.from_pretrained(d)
    out[legacy] = [[t(x).input_ids, t(x, add_special_tokens=False).input_ids] for x in texts]
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def transformers_431():
    """transformers 4.31.0 unpacked under .ref/ (pip cannot hold two versions), imported in a subprocess
    ahead of the installed one. Its import-time check of dependency versions is switched off: the
    tokenizer needs only sentencepiece, and the installed tokenizers is newer than 4.31 allows."""
    root = os.path.join(REF, "transformers-4.31.0")
    if not os.path.isdir(root):
        os.makedirs(REF, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "transformers==4.31.0", "-d", REF], capture_output=True, text=True)
        assert r.returncode == 0, f"cannot fetch transformers 4.31.0 from PyPI into {REF}: {r.stderr[-500:]}"
        with zipfile.ZipFile(os.path.join(REF, "transformers-4.31.0-py3-none-any.whl")) as z:
            z.extractall(root + ".tmp")
        check = os.path.join(root + ".tmp", "transformers", "dependency_versions_check.py")
        src = open(check).read()
        assert "        require_version_core(deps[pkg])" in src
        open(check, "w").write(src.replace("        require_version_core(deps[pkg])", "        pass"))
        os.replace(root + ".tmp", root)
    return root


def test_both_modes_match_transformers_431(model_path, transformers_431):
    texts = ALL + [VICUNA + " A dog.</s>USER: What?</s>ASSISTANT: Red.</s>", "Hi</s> USER", "Hi</s>▁USER"]
    env = dict(os.environ, PYTHONPATH=transformers_431)
    r = subprocess.run([sys.executable, "-c", REF_431, model_path], input=json.dumps(texts), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    unk = 0
    for legacy in (True, False):
        tok = Tokenizer(model_path, legacy=legacy)
        for text, (ids, no_bos) in zip(texts, ref[str(legacy).lower()]):
            assert tok.encode(text) == ids, (legacy, text)
            assert tok.encode(text, bos=False) == no_bos, (legacy, text)
            unk += not legacy and tok.unk_id in ids and "<unk>" not in text
    assert unk  # a first piece that is no piece without its "▁" (HF 4.31 looks it up by name: <unk>)
    # the two modes differ exactly after a special token: "</s>USER" loses the dummy-prefix space
    legacy, modern = ref["true"][-3][0], ref["false"][-3][0]
    assert legacy != modern and len(legacy) == len(modern)


def test_mode_from_tokenizer_config(model_path, tmp_path):
    import shutil
    shutil.copy(model_path, tmp_path / "tokenizer.model")
    path, config = str(tmp_path / "tokenizer.model"), tmp_path / "tokenizer_config.json"
    assert Tokenizer(path).legacy  # no config: HF's default
    for text, legacy in (('{"legacy": false}', False), ('{"legacy": null}', False), ('{"legacy": true}', True),
                         ('{"add_bos_token": true}', True)):
        config.write_text(text)
        tok = Tokenizer(path)
        assert tok.legacy is legacy, text
        ids = tok.encode("Hi</s>USER", bos=False)
        assert ids == Tokenizer(model_path, legacy=legacy).encode("Hi</s>USER", bos=False)
        after = ids[ids.index(tok.eos_id) + 1:]
        assert tok.sp.id_to_piece(after[0]).startswith("▁") == legacy, text
    config.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json line 1: not valid JSON"):
        Tokenizer(path)
