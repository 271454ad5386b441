"""data.py against its references: HF's CLIPImageProcessor for the pixels, and a transcription
of LLaVA's preprocess_v1 / preprocess_plain (run with HF's slow LlamaTokenizer, legacy mode, and
with our tokenizer in the release's non-legacy mode, whose ids test_tokenizer checks against
transformers 4.31) for the tokens and labels. Images are generated with PIL; the tokenizer is trained here."""
import copy
import json
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import CLIPImageProcessor

import data
from data import DataError, LlavaDataset, build_prompt, encode, load_image, preprocess, tokenize
from tokenizer import Tokenizer
from mra import IGNORE, IMAGE_TOKEN

WORDS = ("the a cat dog image picture what is this color of on in and man woman red blue two three "
         "there are people sitting standing table street car sign says number answer question "
         "describe detail yes no left right photo").split()


def train_spm(prefix, n=400, seed=0, after_eos=True):
    """A tiny LLaMA-like sentencepiece model (BPE, byte fallback, whitespace kept). after_eos: trained
    on "USER" after "</s>" too, so that "USER" is a piece without the dummy-prefix "▁", as in LLaMA's."""
    rng = random.Random(seed)
    lines = [data.SYSTEM, "USER:", "ASSISTANT:"]
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        a = " ".join(rng.choice(WORDS + [str(rng.randint(0, 99))]) for _ in range(rng.randint(1, 8)))
        lines += [f"USER: {q.capitalize()}? ASSISTANT: {a.capitalize()}.", "  " + q] + [f"{a}.</s>USER: {q}?"] * after_eos
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("spm") / "tok")


# ---------------------------------------------------------------------------------------
# LLaVA's code (llava/train/train.py, mm_utils.py, conversation.py), transcribed as it is

def llava_tokenizer_image_token(prompt, tokenizer):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN] * (offset + 1)):
        input_ids.extend(x[offset:])
    return torch.tensor(input_ids, dtype=torch.long)


def llava_preprocess_multimodal(source):
    for sentence in source:
        if "<image>" in sentence["value"]:
            sentence["value"] = sentence["value"].replace("<image>", "").strip()
            sentence["value"] = "<image>" + "\n" + sentence["value"]
            sentence["value"] = sentence["value"].strip()
    return source


def llava_v1_prompt(source):
    system, roles, seps = data.SYSTEM, ("USER", "ASSISTANT"), [" ", "</s>"]
    messages = [(roles[0] if s["from"] == "human" else roles[1], s["value"]) for s in source]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_preprocess_v1(source, tokenizer, has_image):
    conversation = llava_v1_prompt(source)
    if has_image:
        target_ids = llava_tokenizer_image_token(conversation, tokenizer)
    else:
        target_ids = torch.tensor(tokenizer(conversation).input_ids)
    input_ids, target = target_ids.clone(), target_ids.clone()
    sep = " " + "ASSISTANT" + ": "
    total_len = int(target.ne(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0).sum())
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = IGNORE
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        if has_image:
            round_len = len(llava_tokenizer_image_token(rou, tokenizer))
            instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        else:
            round_len = len(tokenizer(rou).input_ids)
            instruction_len = len(tokenizer(parts[0]).input_ids) - 2
        target[cur_len:cur_len + instruction_len] = IGNORE
        cur_len += round_len
    target[cur_len:] = IGNORE
    if cur_len != total_len:
        target[:] = IGNORE  # "WARNING: tokenization mismatch ... (ignored)"
    return input_ids.tolist(), target.tolist()


def llava_preprocess_plain(source, tokenizer):
    assert len(source) == 2 and "<image>" in source[0]["value"]
    source[0]["value"] = "<image>"
    conversation = source[0]["value"] + source[1]["value"] + "\n"
    input_ids = llava_tokenizer_image_token(conversation, tokenizer)
    target = input_ids.clone()
    target[:len(llava_tokenizer_image_token(source[0]["value"], tokenizer))] = IGNORE
    return input_ids.tolist(), target.tolist()


def llava_reference(conversations, tokenizer, template, has_image):
    source = copy.deepcopy(conversations)
    if has_image:
        source = llava_preprocess_multimodal(source)
    if template == "plain":
        return llava_preprocess_plain(source, tokenizer)
    return llava_preprocess_v1(source, tokenizer, has_image)


def conv(*texts):
    return [{"from": ("human", "gpt")[i % 2], "value": t} for i, t in enumerate(texts)]


CONVERSATIONS = [  # (conversations, has_image)
    (conv("<image>\nWhat is this?", "A cat."), True),
    (conv("What color is the car?\n<image>", "Red"), True),
    (conv("<image>\nDescribe the image in detail.", "Two people sitting on a table.\nThe man is left.",
          "What number does the sign say?", "42", "Is it a dog?", "No"), True),
    (conv("<image> what is this  ", "  a dog  ", "and this?", "3 cats"), True),
    (conv("What is the answer?", "Yes, the answer is 7.", "And the question?", "There is no question."), False),
    (conv("Hello", "Hi there"), False),
    # the release trains these, as below: tags in one turn become one; "ASSISTANT:" without its spaces
    (conv("<image> Is this <image> a cat?", "Yes", "And?", "No"), True),
    (conv("Q:ASSISTANT:x", "A"), False),
]
CAPTIONS = [
    (conv("<image>\nDescribe the image.", "a man sitting on a red car"), True),
    (conv("Give a short caption.\n<image>", "two dogs in the street."), True),
    (conv("<image>", "42 people"), True),
]


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_vicuna_labels_match_llava(tok, hf, case):
    conversations, has_image = CONVERSATIONS[case]
    turns = [(t["from"], t["value"]) for t in conversations]
    ids, labels = encode(tok, turns, "vicuna_v1", has_image)
    ref_ids, ref_labels = llava_reference(conversations, hf, "vicuna_v1", has_image)
    assert ids == ref_ids
    assert labels == ref_labels
    assert any(label != IGNORE for label in labels)  # not the silently-ignored case
    assert ids.count(IMAGE_TOKEN) == int(has_image) and labels[0] == IGNORE
    # what is learned: each answer and its </s>, nothing else
    learned = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE], skip_special_tokens=False)
    assert learned.count("</s>") == len(turns) // 2 and "USER" not in learned and "ASSISTANT" not in learned


class NonLegacy:
    """The tokenizer the release trains with (Vicuna v1.5's config: legacy false), as the transcription
    calls HF's: our Tokenizer's ids in that mode are transformers 4.31's (tests/test_tokenizer.py)."""
    pad_token_id = 0

    def __init__(self, model_path):
        self.tok = Tokenizer(model_path, legacy=False)
        self.bos_token_id = self.tok.bos_id

    def __call__(self, text):
        return SimpleNamespace(input_ids=self.tok.encode(text))


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_vicuna_labels_match_llava_in_the_release_tokenizer_mode(model_path, case):
    conversations, has_image = CONVERSATIONS[case]
    ref = NonLegacy(model_path)
    ids, labels = encode(ref.tok, [(t["from"], t["value"]) for t in conversations], "vicuna_v1", has_image)
    assert (ids, labels) == llava_reference(conversations, ref, "vicuna_v1", has_image) and ref.tok.unk_id not in ids
    assert any(label != IGNORE for label in labels)
    if len(conversations) > 2:  # the turn after an answer's </s> starts without the dummy-prefix space
        after = ids[ids.index(ref.tok.eos_id) + 1]
        assert not ref.tok.sp.id_to_piece(after).startswith("▁")


def test_an_unk_the_tokenizer_makes_is_refused_as_the_release_masks_it(tmp_path):
    # non-legacy, a vocabulary with "▁USER" but no "USER": after "</s>" HF 4.31 strips the "▁" and looks
    # "USER" up by name, <unk>; LLaVA counts the tokens that are not <unk>, its padding, and masks it all
    ref = NonLegacy(train_spm(tmp_path / "tok", after_eos=False))
    conversations = conv("Hi", "Yes", "What?", "No")
    ids, labels = llava_reference(conversations, ref, "vicuna_v1", False)
    assert ref.tok.unk_id in ids and all(label == IGNORE for label in labels)
    with pytest.raises(DataError, match="the tokenizer gives <unk>"):
        encode(ref.tok, [(t["from"], t["value"]) for t in conversations], "vicuna_v1", False)
    # a "<s>" inside a turn does the same to the word after it: found when the dataset is read, not mid-run
    path = write_dataset(tmp_path, [dict(id="s", conversations=conv("Say it<s>USER", "A")), records()[1]])
    with pytest.raises(DataError, match=r"record 0 \(id s\): the tokenizer gives <unk>"):
        LlavaDataset(path, str(tmp_path / "images"), ref.tok, "vicuna_v1", 32)


@pytest.mark.parametrize("case", range(len(CAPTIONS)))
def test_plain_labels_match_llava(tok, hf, case):
    conversations, _ = CAPTIONS[case]
    turns = [(t["from"], t["value"]) for t in conversations]
    ids, labels = encode(tok, turns, "plain", True)
    assert (ids, labels) == llava_reference(conversations, hf, "plain", True)
    assert ids[:2] == [tok.bos_id, IMAGE_TOKEN] and labels[:2] == [IGNORE, IGNORE]
    assert all(label != IGNORE for label in labels[2:])  # the whole caption and its "\n"


def test_mismatch_is_refused_not_silently_masked(tok, hf):
    conversations = conv("<image>\nSay ASSISTANT: hi", "hi")
    _, ref_labels = llava_reference(conversations, hf, "vicuna_v1", True)
    assert all(label == IGNORE for label in ref_labels)  # LLaVA: the sample quietly teaches nothing
    with pytest.raises(DataError, match="tokenization mismatch"):
        encode(tok, [(t["from"], t["value"]) for t in conversations], "vicuna_v1", True)


def test_build_prompt_strings():
    S = data.SYSTEM
    assert S == ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")
    assert build_prompt([("human", "What is this? <image>"), ("gpt", None)]) == \
        S + " USER: <image>\nWhat is this? ASSISTANT:"
    assert build_prompt([("human", "<image>\nQ1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]) == \
        S + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    assert build_prompt([("human", "Hi"), ("gpt", "Hello"), ("human", "Q"), ("gpt", None)]) == \
        S + " USER: Hi ASSISTANT: Hello</s>USER: Q ASSISTANT:"
    assert build_prompt([("human", "Describe.\n<image>"), ("gpt", "A cat.")], "plain") == "<image>A cat.\n"
    assert build_prompt([("human", "<image>"), ("gpt", None)], "plain") == "<image>"
    with pytest.raises(DataError, match="alternate"):
        build_prompt([("gpt", "hi"), ("human", "x")])
    with pytest.raises(ValueError, match="unknown template"):
        build_prompt([("human", "x")], "llama_2")


def test_tokenize_matches_llava(tok, hf):
    for p in ["<image>", "<image>\nWhat?", "a <image> b <image>", "no image here", "x<image>", ""]:
        assert tokenize(tok, p) == llava_tokenizer_image_token(p, hf).tolist(), p


# ---------------------------------------------------------------------------------------
# Images

def random_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def llava_expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


@pytest.mark.parametrize("w,h,size", [(97, 61, 64), (50, 133, 64), (64, 64, 64), (31, 40, 48), (300, 200, 112)])
def test_preprocess_matches_clip_image_processor(w, h, size):
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    img = random_image(w, h, seed=w * h)
    for mode in ("crop", "pad"):
        ref_img = llava_expand2square(img, tuple(int(x * 255) for x in proc.image_mean)) if mode == "pad" else img
        ref = proc.preprocess(ref_img, return_tensors="pt")["pixel_values"][0]
        ours = preprocess(img, size, mode)
        assert ours.shape == (3, size, size) and ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert data.PAD_FILL == (122, 116, 104)


def rgb(path):
    return np.asarray(load_image(str(path)))


def test_a_thin_image_is_refused_before_its_canvas_is_made():
    """1 x 40,000 px padded square would be 4.8 GB, 1 x 3,000 resized for a crop 600M pixels: both
    past Pillow's own decoding limit, refused in a line (a DataError: --skip-bad can skip it)."""
    for (w, h), mode in (((1, 40000), "pad"), ((3000, 1), "crop")):
        with pytest.raises(DataError, match=f"an image of {w} x {h} pixels is too thin"):
            preprocess(Image.new("RGB", (w, h)), 448, mode)
    assert preprocess(Image.new("RGB", (1, 3000)), 448, "pad").shape == (3, 448, 448)  # 9M pixels: fine


def test_load_image_modes(tmp_path):
    base = random_image(20, 12)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((12, 20), 7, np.uint8)))
    rgba.save(tmp_path / "rgba.png")
    assert np.array_equal(rgb(tmp_path / "rgba.png"), np.asarray(base))  # alpha dropped, like LLaVA
    pal = base.quantize(16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    assert np.array_equal(rgb(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    base.convert("L").save(tmp_path / "l.png")
    gray = np.asarray(base.convert("L"))
    assert np.array_equal(rgb(tmp_path / "l.png"), np.stack([gray] * 3, -1))
    base.convert("CMYK").save(tmp_path / "cmyk.tiff")
    assert np.array_equal(rgb(tmp_path / "cmyk.tiff"), np.asarray(base.convert("CMYK").convert("RGB")))
    # 16-bit grayscale: scaled to 8 bit, not clipped at 255
    deep = np.array([[0, 257, 1000, 65535], [30000, 128, 129, 40000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode in ("I;16", "I")
    out = rgb(tmp_path / "i16.png")
    assert out.shape == (2, 4, 3) and out[..., 0].tolist() == np.rint(deep / 257).astype(int).tolist()
    # a dark 16-bit scan stays dark: its depth says 0..65535 (PNG; PGM, which Pillow opens as "I")
    (tmp_path / "dark16.pgm").write_bytes(b"P5\n3 1\n65535\n" + np.array([0, 100, 200], ">u2").tobytes())
    Image.fromarray(np.array([[0, 100, 200]], np.uint16)).save(tmp_path / "dark16.png")
    for name in ("dark16.png", "dark16.pgm"):
        assert rgb(tmp_path / name)[..., 0].tolist() == [[0, 0, 1]], name
    # 32-bit integers and floats have no set range: theirs decides
    for values, want in (([0, 7, 128, 255], [0, 7, 128, 255]),  # 8-bit values: as they are
                         ([0, 257, 1000, 65535], [0, 1, 4, 255]),  # 16-bit values
                         ([0, 10**6, 2 * 10**6, 4 * 10**6], [0, 64, 128, 255])):  # beyond: the maximum is white
        Image.fromarray(np.array([values], np.int32)).save(tmp_path / "i32.tiff")
        assert Image.open(tmp_path / "i32.tiff").mode == "I"
        assert rgb(tmp_path / "i32.tiff")[..., 1].tolist() == [want], values
    for values, want in (([0.0, 0.25, 1.0], [0, 64, 255]), ([0.0, 2.0, 200.0], [0, 2, 200]),  # 0..1, 0..255
                         ([np.nan, np.inf, -np.inf], [0, 0, 0]), ([np.inf, 0.5, 1.0], [0, 128, 255])):
        Image.fromarray(np.array([values], np.float32)).save(tmp_path / "f.tiff")
        assert Image.open(tmp_path / "f.tiff").mode == "F" and rgb(tmp_path / "f.tiff")[..., 2].tolist() == [want]
    for name in ("rgba.png", "p.png", "l.png", "cmyk.tiff", "i16.png", "i32.tiff", "f.tiff"):
        assert load_image(str(tmp_path / name)).mode == "RGB"


def test_load_image_applies_exif_orientation(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red, right half blue
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = rgb(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)  # upright: portrait
    assert out[5, 10, 0] > 200 and out[35, 10, 2] > 200  # the left half is now on top


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        load_image(str(tmp_path / "nope.jpg"))
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="bad.jpg: cannot read image"):
        load_image(str(tmp_path / "bad.jpg"))
    random_image(30, 30).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        load_image(str(tmp_path / "cut.png"))


def test_a_very_large_image_is_read_without_a_warning_or_refused_with_a_way_on(tmp_path, monkeypatch):
    # Pillow warns past MAX_IMAGE_PIXELS (89 million: a 108 MP phone photo printed its two-line warning) and
    # refuses past twice that (a decompression bomb?): "cannot read image (DecompressionBombError: ...)" it was
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the same rules, scaled down
    random_image(40, 30).save(tmp_path / "large.png")  # 1,200 pixels: between the two
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(str(tmp_path / "large.png")).size == (40, 30)
    random_image(50, 50).save(tmp_path / "huge.png")
    with pytest.raises(DataError, match=r"^\S+huge.png: 2,500 pixels, over the 2,000 Pillow decodes at most; "
                                        r"downscale it first$"):
        load_image(str(tmp_path / "huge.png"))


# ---------------------------------------------------------------------------------------
# The dataset, bad records, batches

def write_dataset(tmp_path, records, name="data.json", jsonl=False):
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(4):
        random_image(40 + 10 * i, 30, seed=i).save(tmp_path / "images" / f"{i}.png")
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return str(path)


def records():
    return [
        dict(id="a", image="0.png", conversations=conv("<image>\nWhat is this?", "A cat.")),
        dict(id="b", conversations=conv("What is the answer?", "Yes.", "Why?", "Two dogs.")),
        dict(id="c", image="1.png", conversations=conv("Describe.\n<image>", "A red car.", "And?", "No")),
        dict(id="d", image="2.png", conversations=conv("<image>\nWhat number?", "42")),
    ]


@pytest.mark.parametrize("jsonl", [False, True])
def test_dataset_items_and_collate(tmp_path, tok, hf, jsonl):
    path = write_dataset(tmp_path, records(), jsonl=jsonl)
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", image_size=32)
    assert len(ds) == 4 and ds.has_image == [True, False, True, True]
    for i, rec in enumerate(records()):
        item = ds[i]
        ref_ids, ref_labels = llava_reference(rec["conversations"], hf, "vicuna_v1", "image" in rec)
        assert item["input_ids"].tolist() == ref_ids and item["labels"].tolist() == ref_labels
        if "image" in rec:
            img = llava_expand2square(Image.open(tmp_path / "images" / rec["image"]).convert("RGB"), (122, 116, 104))
            torch.testing.assert_close(item["image"], preprocess(img, 32, "crop"))
        else:
            assert item["image"] is None
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    T = max(lengths)
    assert sum(n < T for n in lengths) == 2  # two rows are padded: what follows checks their padding
    for pad_id in (tok.pad_id, 7):  # <unk>, 0, as LLaVA pads; and an id no zero-fill would give
        batch = data.collate([ds[0], ds[1], ds[2]], pad_id)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["pad_mask"].shape == (3, T)
        for r, n in enumerate(lengths):  # right padding: the row first, then pad_id, -100, False
            assert batch["input_ids"][r, :n].tolist() == ds[r]["input_ids"].tolist()
            assert batch["labels"][r, :n].tolist() == ds[r]["labels"].tolist()
            assert (batch["input_ids"][r, n:] == pad_id).all() and (batch["labels"][r, n:] == IGNORE).all()
            assert batch["pad_mask"][r, :n].all() and not batch["pad_mask"][r, n:].any()
        # rows 0 and 2 hold an image, row 1 none: the images in row order, each with its own row
        assert batch["images"].shape == (2, 3, 32, 32) and not torch.equal(ds[0]["image"], ds[2]["image"])
        assert torch.equal(batch["images"][0], ds[0]["image"]) and torch.equal(batch["images"][1], ds[2]["image"])


def test_plain_dataset_crops(tmp_path, tok, hf):
    recs = [dict(id=i, image=f"{i}.png", conversations=c) for i, (c, _) in enumerate(CAPTIONS)]
    ds = LlavaDataset(write_dataset(tmp_path, recs), str(tmp_path / "images"), tok, "plain", 32, "crop")
    for i, rec in enumerate(recs):
        assert (ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()) == \
            llava_reference(rec["conversations"], hf, "plain", True)
        img = Image.open(tmp_path / "images" / rec["image"]).convert("RGB")
        torch.testing.assert_close(ds[i]["image"], preprocess(img, 32, "crop"))


def test_truncation(tmp_path, tok):
    path = write_dataset(tmp_path, records())
    full = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)[2]
    n = len(full["input_ids"]) - 5
    short = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, max_len=n)[2]
    assert short["input_ids"].tolist() == full["input_ids"][:n].tolist()
    assert short["labels"].tolist() == full["labels"][:n].tolist()
    assert data.MAX_LEN == {"plain": 2048, "vicuna_v1": 2496}
    # nothing left to learn after truncation: refused, never a sample of pure -100
    with pytest.raises(DataError, match=r"record 0 \(id a\): no answer tokens left within 10 tokens$"):
        LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, max_len=10)[0]


def test_an_image_placeholder_truncated_away_is_refused_naming_its_record(tmp_path, tok):
    # answers left within max_len, but the <image> of a later turn cut off: without this check the image
    # would have no placeholder, and mra.splice a bare ValueError mid-run, naming no record
    late = dict(id="e", image="3.png",
                conversations=conv("What is the answer?", "Yes.", "<image>\nAnd this?", "A cat."))
    path = write_dataset(tmp_path, records()[:2] + [late] + records()[2:])
    full = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)[2]["input_ids"].tolist()
    n = full.index(IMAGE_TOKEN)  # the first n tokens hold the first answer, not the placeholder
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, max_len=n)
    with pytest.raises(DataError, match=rf"^\S+data.json record 2 \(id e\): the <image> placeholder lies beyond "
                                        rf"{n} tokens$"):
        ds[2]
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, max_len=n, skip_bad=True)
    item = ds[2]  # --skip-bad: replaced by the next record with an image, and counted
    assert item["skipped"] == 1 and item["input_ids"].tolist() == ds[3]["input_ids"].tolist()
    assert IMAGE_TOKEN in item["input_ids"].tolist() and item["image"] is not None


BAD = [
    (dict(id="x", image="0.png"), "record 1 \\(id x\\): no conversations"),
    (dict(id="x2", conversations=dict(human="Q", gpt="A")),
     "record 1 \\(id x2\\): 'conversations' is a JSON dict, not a list of turns"),
    (["Q", "A"], "record 1: a JSON list, not an object holding 'conversations'"),
    (dict(id="y", image="missing.png", conversations=conv("<image>\nQ", "A")), "record 1 \\(id y\\): image file not found: .*missing.png"),
    (dict(id="z", conversations=[{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}]), "record 1 \\(id z\\): turn 1 is from 'human'"),
    (dict(id="w", conversations=conv("Q", "A", "Q2")), "record 1 \\(id w\\): 3 turns"),
    (dict(id="v", image="0.png", conversations=conv("no tag", "A")), "record 1 \\(id v\\): '<image>' in 0 turns"),
    (dict(id="v2", image="0.png", conversations=conv("<image>\nQ", "A", "<image> Q2", "B")),
     "record 1 \\(id v2\\): '<image>' in 2 turns"),
    (dict(id="v3", image="0.png", conversations=conv("<imag<image>e>\nQ", "A")),
     "record 1 \\(id v3\\): turn 0 holds '<image>' once its tags are removed"),
    (dict(id="v4", conversations=conv("What is <unk>?", "A")), "record 1 \\(id v4\\): turn 0 holds '<unk>'"),
    (dict(id="u", conversations=conv("<image>\nQ", "A")), "record 1 \\(id u\\): '<image>' in a record without"),
    # found up front, not mid-run as a misleading "tokenization mismatch"
    (dict(id="t", image="0.png", conversations=conv("<image>\nQ", "")),
     "record 1 \\(id t\\): turn 1 \\(gpt\\) is empty"),
    (dict(id="s", conversations=conv("", "A")), "record 1 \\(id s\\): turn 0 \\(human\\) is empty"),
    (dict(id="r", conversations=conv("Q ASSISTANT: x", "A")),
     "record 1 \\(id r\\): a turn holds the template's separator"),
    (dict(id="q", conversations=conv("Q", "A</s>B")), "record 1 \\(id q\\): a turn holds the template's separator"),
    (dict(id="p", image="0.png", conversations=conv("Q", "<image> A")), "record 1 \\(id p\\): the '<image>' tag is in a gpt"),
    # JSON's "\\ud800": sentencepiece failed on it mid-run, a traceback that --skip-bad did not catch
    (dict(id="o", conversations=conv("hi \ud800", "A")),
     "record 1 \\(id o\\): turn 0 \\(human\\) holds '\\\\ud800', a lone surrogate, no character"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_records(tmp_path, tok, case):
    bad, message = BAD[case]
    recs = [records()[0], bad, records()[3]]
    path = write_dataset(tmp_path, recs)
    with pytest.raises(DataError, match="data.json " + message + ".*; fix or drop it, or pass --skip-bad"):
        LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, skip_bad=True)
    assert len(ds) == 2 and len(ds.bad) == 1 and "record 1" in ds.bad[0]


def test_an_image_not_found_without_image_folder_says_so(tmp_path, tok, monkeypatch):
    path = write_dataset(tmp_path, records())
    monkeypatch.chdir(tmp_path)  # images/0.png would be found here, 0.png is not
    with pytest.raises(DataError, match=r"record 0 \(id a\): image file not found: 0.png \(no --image-folder given: "
                                        r"the path is read from the current directory\)"):
        LlavaDataset(path, None, tok, "vicuna_v1", 32)


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_byte_order_mark_is_read_past(tmp_path, tok, jsonl):
    # it was "line 1: not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))"
    path = write_dataset(tmp_path, records(), jsonl=jsonl)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    assert len(LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)) == 4


def test_jsonl_of_one_record(tmp_path, tok):
    for name in ("one.jsonl", "one.json"):  # one line holding one record: JSON lines of one
        path = write_dataset(tmp_path, records()[:1], name, jsonl=True)
        assert len(LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)) == 1
    (tmp_path / "top.json").write_text(json.dumps(dict(data=records())))  # a dict that is not a record
    with pytest.raises(DataError, match="top.json: expected a JSON list of records, found a dict"):
        LlavaDataset(str(tmp_path / "top.json"), str(tmp_path / "images"), tok, "vicuna_v1", 32)


def test_unreadable_image_at_load_time(tmp_path, tok):
    path = write_dataset(tmp_path, records())
    (tmp_path / "images" / "1.png").write_bytes(b"corrupt")
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32)
    with pytest.raises(DataError, match=r"data.json record 2 \(id c\): .*1.png: cannot read image .*\)$"):
        ds[2]
    ds = LlavaDataset(path, str(tmp_path / "images"), tok, "vicuna_v1", 32, skip_bad=True)
    item = ds[2]  # replaced by the next good record, and counted
    assert item["skipped"] == 1 and item["input_ids"].tolist() == ds[3]["input_ids"].tolist()
    assert data.collate([ds[0], ds[2]], tok.pad_id)["skipped"] == 1
    # replaced by one of its own modality: a micro-step of image samples stays one (FSDP ranks run the same
    # modules); record 1 after record 0 has no image and record 2's is bad, so 0's replacement is record 3
    (tmp_path / "images" / "0.png").write_bytes(b"corrupt")
    item = ds[0]
    assert item["skipped"] == 2 and item["image"] is not None and item["input_ids"].tolist() == ds[3]["input_ids"].tolist()
    (tmp_path / "images" / "2.png").write_bytes(b"corrupt")
    with pytest.raises(DataError, match=r"data.json: every record with an image is bad$"):
        ds[0]
    assert ds[1]["image"] is None and ds[1]["skipped"] == 0


def test_plain_needs_images_and_bad_json(tmp_path, tok):
    path = write_dataset(tmp_path, records())
    with pytest.raises(DataError, match="record 1 \\(id b\\): stage 1 \\(plain\\) needs an image"):
        LlavaDataset(path, str(tmp_path / "images"), tok, "plain", 32, "crop")
    # the plain template's one question and one caption: checked up front, not when the record is read
    recs = [dict(records()[0], id="p", conversations=conv("<image>\nQ", "A", "Q2", "B")),
            dict(records()[0], id="o", conversations=conv("Q", "<image> A"))]
    for i in range(2):
        path = write_dataset(tmp_path, [records()[0], recs[i]])
        with pytest.raises(DataError, match=f"record 1 \\(id {'po'[i]}\\): the plain template \\(stage 1\\) takes "
                                            f"one human turn holding <image> and one caption; fix or drop it"):
            LlavaDataset(path, str(tmp_path / "images"), tok, "plain", 32, "crop")
    # stage 1 knows no "</s>" separator: a caption may hold it
    path = write_dataset(tmp_path, [dict(records()[0], conversations=conv("<image>\nQ", "A</s>B"))])
    assert len(LlavaDataset(path, str(tmp_path / "images"), tok, "plain", 32, "crop")) == 1
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match="broken.json line 1: not valid JSON"):
        LlavaDataset(str(tmp_path / "broken.json"), str(tmp_path / "images"), tok, "plain", 32)


def test_batches_same_at_any_world_size():
    class DS:
        def __len__(self):
            return 40
        has_image = [i % 3 != 0 for i in range(40)]

    def steps(world, accum, micro, group=False, start=0):
        per_rank = [list(data.BatchSampler(DS(), micro, accum, world, r, seed=3, epochs=2, group=group,
                                           start_step=start)) for r in range(world)]
        n = len(per_rank[0]) // accum
        return [sorted(i for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum] for i in b)
                for s in range(n)]

    ref = steps(1, 4, 2)
    assert len(ref) == 2 * (40 // 8) and all(len(s) == 8 for s in ref)
    assert steps(2, 2, 2) == ref and steps(4, 1, 2) == ref and steps(1, 8, 1) == ref
    assert steps(2, 2, 2, start=3) == ref[3:]  # resuming at step 3 picks up the same batches
    grouped = steps(1, 4, 2, group=True)
    assert steps(2, 2, 2, group=True) == grouped and steps(4, 1, 2, group=True) == grouped != ref
    assert sorted(i for s in ref[:5] for i in s) == sorted(range(40))  # one epoch: each sample once
    # grouped: every optimizer step (all ranks, all micro-steps) holds one modality
    assert all(len({DS.has_image[i] for i in s}) == 1 for s in grouped)


@pytest.mark.parametrize("n_img, n_txt, G", [(300, 20, 128), (5, 3, 4), (8, 0, 4), (0, 7, 4), (9, 16, 8), (1, 30, 8)])
def test_grouped_epoch_holds_every_record(n_img, n_txt, G):
    # each modality is filled up to whole global batches, and the epoch takes every one of them: no
    # record is dropped (a whole unit of images was, when an epoch had len // G steps)
    class DS:
        has_image = [True] * n_img + [False] * n_txt

        def __len__(self):
            return n_img + n_txt

    units = -(-n_img // G) + -(-n_txt // G)
    for micro, accum, world in ((G, 1, 1), (1, G // 2, 2)):
        epochs = [data.BatchSampler(DS(), micro, accum, world, r, seed=5, epochs=2, group=True) for r in range(world)]
        assert epochs[0].steps_per_epoch == units and epochs[0].total_steps == 2 * units
        seen = [i for s in epochs for b in s for i in b]
        first = [i for s in epochs for b in list(s)[:units * accum] for i in b]
        assert len(seen) == 2 * units * G and set(first) == set(range(len(DS()))), (n_img, n_txt, G)
    for epoch in range(2):
        order = data.epoch_order(len(DS()), 5, epoch, G, DS.has_image, group=True)
        assert len(order) == units * G and set(order) == set(range(len(DS())))


def test_grouping_is_by_modality_alone():
    # as the release's micro-batches, ours mix lengths at random: the loss (a token mean per micro-batch)
    # then weighs samples as the release's does; units sorted by length weighed short answers far more
    def order(lengths):
        class DS:
            has_image = [i % 4 != 0 for i in range(64)]

            def __len__(self):
                return 64
        DS.lengths = lengths  # what the samples hold: the order must not depend on it
        ranks = [list(data.BatchSampler(DS(), 2, 2, 2, r, seed=1, epochs=1, group=True)) for r in range(2)]
        return [[i for r in ranks for b in r[2 * s:2 * s + 2] for i in b] for s in range(len(ranks[0]) // 2)]
    steps = order(list(range(64)))
    assert steps == order(list(range(64))[::-1])
    assert all(len({i % 4 != 0 for i in s}) == 1 for s in steps)  # still one modality per optimizer step


def epochs_of(n, has_image, G, seed, group, epochs=3):
    """Each epoch's order of a BatchSampler at world 1 (one micro-batch a step), one list per epoch."""
    class DS:
        def __len__(self):
            return n
    DS.has_image = has_image
    sampler = data.BatchSampler(DS(), G, 1, 1, 0, seed=seed, epochs=epochs, group=group)
    steps = list(sampler)
    k = sampler.steps_per_epoch
    return [[i for s in steps[e * k:(e + 1) * k] for i in s] for e in range(epochs)]


@pytest.mark.parametrize("group", [False, True])
def test_batch_order_is_shuffled_anew_each_epoch_and_by_seed(group):
    has_image = [i % 2 == 0 for i in range(48)]
    orders = epochs_of(48, has_image, 4, seed=3, group=group)
    assert all(sorted(o) == list(range(48)) for o in orders)  # 48 = 12 whole batches: each sample once
    assert orders[0] != orders[1] != orders[2] != orders[0]  # each epoch its own order
    assert epochs_of(48, has_image, 4, seed=3, group=group) == orders  # deterministic in (seed, epoch)
    other = epochs_of(48, has_image, 4, seed=4, group=group)  # another --seed, other orders
    assert all(a != b for a, b in zip(orders, other))
    if not group:  # stage 1: shuffled, not the file's order
        assert all(o != list(range(48)) for o in orders)


def test_grouped_batches_interleave_modalities_and_shuffle_within_each():
    # stage 2: each global batch holds one modality, but image and text batches come in a random order (not
    # all of one kind first), and a batch is drawn at random from its modality (not consecutive records)
    has_image = [i % 2 == 0 for i in range(64)]
    G = 4
    for order in epochs_of(64, has_image, G, seed=1, group=True):
        steps = [order[s:s + G] for s in range(0, 64, G)]
        kinds = [has_image[s[0]] for s in steps]
        assert all(has_image[i] == k for s, k in zip(steps, kinds) for i in s) and sum(kinds) == 8
        assert len(set(kinds[:8])) == 2  # both kinds in the first half (all of one: 2 in 12,870)
        # within a modality: a batch is not a run of that modality's records in file order
        rank = {i: r for want in (True, False) for r, i in enumerate(j for j in range(64) if has_image[j] == want)}
        runs = [sorted(rank[i] for i in s) == list(range(min(rank[i] for i in s), min(rank[i] for i in s) + G))
                for s in steps]
        assert not any(runs), runs  # a random batch of 4 from 32 is a run with chance 29 / 35,960
