"""Data: images, prompt templates, tokenisation and label masking, exactly as LLaVA-HR trains.

LLaVA-HR reuses LLaVA-1.5's data pipeline (llava/train/train.py, llava/conversation.py,
llava/mm_utils.py), and the released checkpoints learned from what it produced, so this
file reproduces it and names the function each piece transcribes:
- images: Image.open(...).convert("RGB"), expand2square, then CLIPImageProcessor
  (shortest-edge bicubic resize, centre crop, 1/255, CLIP mean/std)     -> load_image, preprocess
- templates: conv_llava_plain (stage 1), conv_vicuna_v1 (stage 2, chat) -> build_prompt
- <image> as one placeholder id between separately tokenised chunks   -> tokenize
- labels: preprocess_plain / preprocess_v1, whose masking of instructions is *computed
  from token counts of separately tokenised rounds*, not from positions -> encode
- the dataset (LLaVA json / jsonl), padding, and batches grouped by modality (not length).

Where LLaVA silently drops a bad sample (it masks every label on a tokenisation length mismatch,
or asserts mid-training) we raise DataError naming the record, or skip and count it (skip_bad=True).
"""
import hashlib
import json
import os
import re
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from mra import IGNORE, IMAGE_TOKEN
from tokenizer import not_a_character

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_FILL = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA truncates, not rounds
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
MAX_LEN = {"plain": 2048, "vicuna_v1": 2496}  # stage 1, stage 2 (= 2048 - 576 + 1024 visual tokens)


class DataError(ValueError):
    """A record or image that cannot become a correct training sample."""


# ---------------------------------------------------------------------------------------
# Images

def load_image(path):
    """Any image file -> an RGB PIL image, upright (EXIF orientation applied)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: " + ("a directory, not an image file" if os.path.isdir(path) else
                                       "image file not found"))
    try:
        with warnings.catch_warnings():  # Pillow warns of 89-179 million pixels (a 108 MP phone photo)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # and refuses more: below
            with Image.open(path) as im:
                im.load()  # decode now: a truncated file fails here, not in a worker later
                fmt = im.format
                im = ImageOps.exif_transpose(im)  # phone photos store "rotate me" in EXIF (LLaVA ignores it)
    except Image.DecompressionBombError as e:  # (a guard against a small file that decodes to gigabytes)
        pixels, limit = map(int, re.findall(r"\d+", str(e))[:2])
        raise DataError(f"{path}: {pixels:,} pixels, over the {limit:,} Pillow decodes at most; downscale it "
                        f"first") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # deep grayscale: PIL's convert("RGB") clips at 255, turning a 16-bit scan mostly white. 16 bits
        # span 0..65535 (so do PNG's and PGM's "I": 16-bit at most, Pillow scales PGM's maxval to it);
        # 32-bit integers and floats (TIFF) have no set range: theirs decides (floats up to 1.0 as 0..1,
        # then up to 255 as 8-bit, up to 65535 as 16-bit; beyond, the maximum is white). NaN, inf: 0
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = a.max(initial=0.0)
        sixteen = im.mode.startswith("I;16") or fmt in ("PNG", "PPM")
        full = (65535.0 if sixteen else 1.0 if im.mode == "F" and top <= 1 else 255.0 if top <= 255
                else 65535.0 if top <= 65535 else top)
        im = Image.fromarray(np.clip(np.rint(a * (255 / full)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":  # palette with transparency: PIL wants it through RGBA (same colours)
        im = im.convert("RGBA")
    return im.convert("RGB")  # as LLaVA: alpha dropped (not composited), CMYK naively inverted


def expand2square(image):
    """LLaVA's "pad" mode: the image centred on a square canvas of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), PAD_FILL)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess(image, size, mode="pad"):
    """PIL image -> normalised float tensor (3, size, size), CLIPImageProcessor's numerics. mode
    "pad": expand2square first (stage 2, inference); "crop": shortest-edge resize and centre crop
    only, cutting off the long side (stage 1, LLaVA's default "square")."""
    if mode not in ("pad", "crop"):
        raise ValueError(f"mode must be 'pad' or 'crop', not {mode!r}")
    w, h = image.size
    # HF: the short side becomes `size`, the long side int(size * long / short) (floored); a thin
    # image's square canvas (pad) or resized long side (crop) grows without bound: 1 x 40,000 px
    # padded is 4.8 GB. Refused past what Pillow refuses to decode (its decompression-bomb limit)
    pixels = max(w, h) ** 2 if mode == "pad" else size * int(size * max(w, h) / min(w, h))
    if pixels > 2 * Image.MAX_IMAGE_PIXELS:
        raise DataError(f"an image of {w} x {h} pixels is too thin: {'padding it square' if mode == 'pad' else 'resizing'} "
                        f"it makes {pixels:,} pixels, over the {2 * Image.MAX_IMAGE_PIXELS:,} Pillow decodes at most; "
                        f"crop it to a less extreme aspect ratio")
    image = image if image.mode == "RGB" else image.convert("RGB")
    if mode == "pad":
        image = expand2square(image)
        w, h = image.size
    long = int(size * max(w, h) / min(w, h))
    new_w, new_h = (size, long) if w <= h else (long, size)
    image = image.resize((new_w, new_h), Image.BICUBIC)  # PIL on uint8, as HF does
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = np.asarray(image)[top:top + size, left:left + size]  # (size, size, 3) uint8
    # HF rescales in float64 then casts, and normalises in float32: same order, same bits
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()  # (3, size, size)


# ---------------------------------------------------------------------------------------
# Prompts and tokens

def move_image_first(text):
    """LLaVA's preprocess_multimodal: '<image>' goes to the front, then a newline, then the rest."""
    return ("<image>\n" + text.replace("<image>", "").strip()).strip()


def _check_turns(turns):
    for i, (role, text) in enumerate(turns):
        if role != ("human", "gpt")[i % 2]:
            raise DataError(f"turn {i} is from {role!r}: turns must alternate human, gpt, human, ...")
        if text is not None and not isinstance(text, str):
            raise DataError(f"turn {i} has a {type(text).__name__} value, not text")


def build_prompt(turns, template="vicuna_v1", move_image=True):
    """[(role, text), ...] with role "human"/"gpt" -> the prompt string; a final ("gpt", None)
    leaves it open for generation, and "<image>" in a turn moves to its front as "<image>\\n" (in
    training; move_image=False keeps the turns as given, as the release's inference does: its
    model_vqa puts "<image>\\n" before the question and strips nothing).
    vicuna_v1 (SeparatorStyle.TWO): SYSTEM + " USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"
    plain (stage 1): "<image>" + caption + "\\n". preprocess_plain *replaces* the human
    turn by the bare "<image>": stage 1 learns to caption from the image alone."""
    _check_turns(turns)
    turns = [(r, move_image_first(t) if move_image and t and "<image>" in t else t) for r, t in turns]
    if template == "plain":
        if len(turns) != 2 or "<image>" not in (turns[0][1] or ""):
            raise DataError("the plain template takes one human turn holding <image> and one caption")
        return "<image>" + (turns[1][1] + "\n" if turns[1][1] else "")
    if template != "vicuna_v1":
        raise ValueError(f"unknown template {template!r} (plain or vicuna_v1)")
    ret = SYSTEM + " "
    for i, (role, text) in enumerate(turns):
        name = "USER" if role == "human" else "ASSISTANT"
        # an empty message means "open" (LLaVA's `if message:`); seps alternate " ", "</s>"
        ret += f"{name}: {text}" + (" ", "</s>")[i % 2] if text else f"{name}:"
    return ret


def tokenize(tok, prompt):
    """LLaVA's tokenizer_image_token: one BOS, then each '<image>'-separated chunk tokenised on
    its own (with its own dummy-prefix space), joined by the IMAGE_TOKEN placeholder."""
    ids = [tok.bos_id]
    for i, chunk in enumerate(prompt.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN)
        ids += tok.encode(chunk, bos=False)
    return ids


def encode(tok, turns, template, has_image):
    """Turns -> (input_ids, labels), untruncated: preprocess_plain / preprocess_v1.

    Only the answers (and their </s>) are learned. preprocess_v1 tokenises the whole conversation
    once, then walks its rounds ("USER: q ASSISTANT: a", split on "</s>") advancing by each round's
    *separate* token count and masking the instruction part; the "- 2" drops the BOS and the space
    that ends "ASSISTANT: ", which joins the answer's first word when tokenised whole. The counts
    must add up to the whole; LLaVA masks the sample silently when they do not, we refuse it."""
    prompt = build_prompt(turns, template)
    # text-only samples go through the plain tokenizer (LLaVA: has_image=False)
    enc = (lambda s: tokenize(tok, s)) if has_image else (lambda s: tok.encode(s))
    ids = enc(prompt)
    labels = list(ids)
    if template == "plain":
        n = len(enc("<image>"))  # BOS + placeholder
        labels[:n] = [IGNORE] * n
        return ids, labels
    sep, cur = " ASSISTANT: ", 1  # cur: past the BOS
    labels[:cur] = [IGNORE]
    for rou in prompt.split("</s>"):
        parts = rou.split(sep)
        if len(parts) != 2:  # also the empty round after the last "</s>"
            break
        instruction_len = len(enc(parts[0] + sep)) - 2
        labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
        cur += len(enc(rou))  # its BOS stands in for the "</s>" the split removed
    labels[cur:] = [IGNORE] * len(labels[cur:])
    if tok.unk_id in ids:  # LLaVA counts the tokens that are not <unk>, its padding: a mismatch, all masked
        raise DataError("the tokenizer gives <unk> for a piece of it (LLaVA pads with <unk>, and would silently "
                        "mask it all)")
    if cur != len(ids):
        raise DataError(f"tokenization mismatch: the rounds count {cur} tokens, the conversation {len(ids)} "
                        f"(a turn containing '{sep}' or '</s>'? LLaVA would silently mask it all)")
    return ids, labels


# ---------------------------------------------------------------------------------------
# The dataset

def read_records(path, with_digest=False):
    """A LLaVA json list, or jsonl (one record a line). with_digest: (records, the SHA-256 of the very
    bytes parsed), so a file edited later cannot pass for the one read."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not JSON: dropped
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text file (expected a LLaVA JSON list or JSON lines)") from None
    if not text.strip():
        raise DataError(f"{path}: empty file (expected a LLaVA JSON list or JSON lines)")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    if isinstance(records, dict) and (str(path).endswith(".jsonl") or "conversations" in records):
        records = [records]  # JSON lines of one record
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    return (records, hashlib.sha256(raw).hexdigest()) if with_digest else records


class LlavaDataset(torch.utils.data.Dataset):
    """LLaVA-format records -> dict(input_ids, labels (LongTensor), image (3, R, R) or None).

    Structure and image files are checked up front (cheap, fails before hours of training); decoding
    and tokenisation happen per item. skip_bad: drop bad records instead of raising; self.bad lists
    them (self.bad_index: their indices in the file), and each item reports the load-time skips it
    replaced. self.sha256: the file's, as read."""

    def __init__(self, path, image_folder, tok, template, image_size, image_aspect_ratio="pad",
                 max_len=None, skip_bad=False):
        self.path, self.folder, self.tok, self.template = path, image_folder or "", tok, template
        self.image_size, self.image_aspect_ratio, self.skip_bad = image_size, image_aspect_ratio, skip_bad
        self.max_len = max_len or MAX_LEN[template]
        self.records, self.bad, self.bad_index, self.dropped_first = [], [], [], 0
        records, self.sha256 = read_records(path, with_digest=True)
        for i, rec in enumerate(records):
            rid = rec.get("id") if isinstance(rec, dict) else None
            where = f"{path} record {i}" + (f" (id {rid})" if rid is not None else "")
            try:
                self.records.append(self._check(rec) | dict(where=where))
            except DataError as e:
                if not skip_bad:
                    raise DataError(f"{where}: {e}; fix or drop it, or pass --skip-bad to skip such records") from None
                self.bad.append(f"{where}: {e}")
                self.bad_index.append(i)
        if not self.records:
            raise DataError(f"{path}: no usable records")
        self.has_image = [r["image"] is not None for r in self.records]  # for grouping by modality (epoch_order)

    def _check(self, rec):
        if not isinstance(rec, dict):
            raise DataError(f"a JSON {type(rec).__name__}, not an object holding 'conversations'")
        conv = rec.get("conversations")
        if conv is not None and not isinstance(conv, list):
            raise DataError(f"'conversations' is a JSON {type(conv).__name__}, not a list of turns")
        if not conv:
            raise DataError("no conversations")
        if not all(isinstance(t, dict) and "from" in t and isinstance(t.get("value"), str) for t in conv):
            raise DataError("a turn without 'from' or a text 'value'")
        turns = [(t["from"], t["value"]) for t in conv]
        if turns[0][0] == "gpt":  # the release (preprocess_v1) drops a leading answer, trains on the rest
            turns = turns[1:]
            self.dropped_first += 1
            if not turns:
                raise DataError("one turn, from gpt: nothing left once it is dropped")
        _check_turns(turns)
        if len(turns) % 2:
            raise DataError(f"{len(turns)} turns: the last human turn has no answer")
        # what build_prompt / encode would refuse mid-run, found here by string checks alone
        for i, (role, text) in enumerate(turns):
            if bad := not_a_character(text):  # sentencepiece would fail mid-run, a traceback
                raise DataError(f"turn {i} ({role}) holds {bad!r}, a lone surrogate, no character")
            if not text:  # the template reads an empty turn as an open one (LLaVA masks the whole sample)
                raise DataError(f"turn {i} ({role}) is empty")
            if "<unk>" in text:  # LLaVA pads with <unk>: its collator would hide it and mask the whole sample
                raise DataError(f"turn {i} holds '<unk>', the padding token (LLaVA would silently hide it from "
                                f"attention, and in stage 2 mask the whole sample)")
            if "<image>" in text and move_image_first(text).count("<image>") != 1:  # "<imag<image>e>": one left
                raise DataError(f"turn {i} holds '<image>' once its tags are removed, a second placeholder")
        # preprocess_v1 walks the rounds, split on "</s>" and then on " ASSISTANT: ": one of those inside a
        # turn (or next to its edge) breaks them, and LLaVA then masks the whole sample without a word
        rounds = build_prompt(turns).split("</s>")[:-1] if self.template == "vicuna_v1" else []
        if rounds and (len(rounds) * 2 != len(turns) or any(len(r.split(" ASSISTANT: ")) != 2 for r in rounds)):
            raise DataError("a turn holds the template's separator ' ASSISTANT: ' or '</s>', which would break "
                            "its rounds (LLaVA would silently mask it all)")
        if any("<s>" in t for _, t in turns):  # a BOS mid-text (rare): tokenised now, what encode refuses found
            encode(self.tok, turns, self.template, "image" in rec)  # here, not hours into the run
        n_tags = sum("<image>" in t for _, t in turns)  # several in one turn become one, as LLaVA moves them
        image = None
        if "image" in rec:
            if not isinstance(rec["image"], str) or not rec["image"]:
                raise DataError(f"'image' must be a file name, not {rec['image']!r}")
            image = os.path.join(self.folder, rec["image"])
            if not os.path.isfile(image):
                raise DataError(f"image file not found: {image}" + ("" if self.folder else  # the usual slip
                                " (no --image-folder given: the path is read from the current directory)"))
            if n_tags != 1:  # none: LLaVA would train it as text, the image unused; almost surely broken
                raise DataError(f"'<image>' in {n_tags} turns, for one image")
        elif n_tags:  # LLaVA would tokenise the tag as text; almost surely a broken record
            raise DataError("'<image>' in a record without an image")
        elif self.template == "plain":
            raise DataError("stage 1 (plain) needs an image in every record")
        if self.template == "plain" and (len(turns) != 2 or "<image>" not in turns[0][1]):
            raise DataError("the plain template (stage 1) takes one human turn holding <image> and one caption")
        if image and not any("<image>" in t for role, t in turns if role == "human"):  # it would be a label
            raise DataError("the '<image>' tag is in a gpt turn; the image goes with a human turn")
        return dict(turns=turns, image=image)

    def __len__(self):
        return len(self.records)

    def load(self, i):
        rec = self.records[i]
        image = preprocess(load_image(rec["image"]), self.image_size, self.image_aspect_ratio) if rec["image"] else None
        ids, labels = encode(self.tok, rec["turns"], self.template, rec["image"] is not None)
        # truncation after masking, placeholder counted as one token (LLaVA's collator)
        ids, labels = ids[:self.max_len], labels[:self.max_len]
        if all(label == IGNORE for label in labels):
            raise DataError(f"no answer tokens left within {self.max_len} tokens")
        if rec["image"] and IMAGE_TOKEN not in ids:
            raise DataError(f"the <image> placeholder lies beyond {self.max_len} tokens")
        return dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), image=image)

    def __getitem__(self, i):
        # a bad item is replaced by the next good one of its modality (skip_bad only): a micro-step grouped
        # by modality stays so (under FSDP every rank must run the same modules)
        alike = (j for k in range(len(self)) if self.has_image[j := (i + k) % len(self)] == self.has_image[i])
        for skipped, j in enumerate(alike):
            try:
                return self.load(j) | dict(skipped=skipped)
            except DataError as e:  # found only now, mid-run (decoding every image up front would take long)
                if not self.skip_bad:
                    raise DataError(f"{self.records[j]['where']}: {e}") from None  # train.py says the way on
        raise DataError(f"{self.path}: every record {'with' if self.has_image[i] else 'without'} an image is bad")


def collate(batch, pad_id):
    """Right padding: input_ids with pad_id, labels with -100, pad_mask False on padding. Returns
    LlavaHR.forward's arguments: input_ids, labels, pad_mask (B, T) and images (M, 3, R, R) for the
    M samples with an image, in row order, or None."""
    T = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    pad_mask = torch.zeros(len(batch), T, dtype=torch.bool)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[r, :n], labels[r, :n], pad_mask[r, :n] = b["input_ids"], b["labels"], True
    images = [b["image"] for b in batch if b["image"] is not None]
    return dict(input_ids=input_ids, labels=labels, pad_mask=pad_mask,
                images=torch.stack(images) if images else None,
                skipped=sum(b.get("skipped", 0) for b in batch))


# ---------------------------------------------------------------------------------------
# Batches: one global order per epoch, sliced the same way at any world size

def epoch_order(n, seed, epoch, unit=1, has_image=None, group=False):
    """A permutation of range(n) for one epoch, deterministic in (seed, epoch).

    group: LLaVA's group_by_modality_length. The order is cut into units of `unit` samples (one global
    batch; the release groups per micro-step, but a whole global batch keeps any split over ranks and
    accumulation the same step), each of one modality (so every rank runs the same modules, as FSDP
    needs), drawn at random within it: lengths mix in a micro-batch as in the release, so the loss, a
    token mean per micro-batch, weighs samples as it does. A modality's last unit is filled up with
    repeats of its own samples, so the order holds grouped_units(has_image, unit) whole units."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    if not group:
        return torch.randperm(n, generator=g).tolist()
    units = []
    for want in (True, False):
        idx = [i for i in range(n) if has_image[i] == want]
        idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        idx += (idx * unit)[:-len(idx) % unit]  # fill the last unit with repeats, as DistributedSampler pads
        units += [idx[u:u + unit] for u in range(0, len(idx), unit)]
    units = [units[j] for j in torch.randperm(len(units), generator=g).tolist()]
    return [i for u in units for i in u]


def grouped_units(has_image, unit):
    """The units in a grouped epoch_order: each modality's samples in whole units of `unit`."""
    n_img = sum(has_image)
    return -(-n_img // unit) + -(-(len(has_image) - n_img) // unit)


class BatchSampler:
    """Yields this rank's micro-batches, step after step, from `start_step` on.

    A global batch of G = accum * world * micro samples is laid out as [micro-step][rank][micro]:
    rank r's k-th micro-batch is order[(k*world + r)*micro :][:micro]. Any split of the same global
    batch over ranks and accumulation sees the same samples in each optimizer step, and resuming at
    step s just starts at sample s * G. An epoch is every global batch of its order: grouped, every
    unit (each record at least once); ungrouped, the last partial global batch is dropped."""

    def __init__(self, dataset, micro, accum, world, rank, seed, epochs=1, group=False, start_step=0):
        self.ds, self.micro, self.accum, self.world, self.rank = dataset, micro, accum, world, rank
        self.seed, self.group, self.start_step = seed, group, start_step
        self.global_batch = micro * accum * world
        # grouped: each modality's last unit is filled up, never dropped (a whole unit of images could be)
        self.steps_per_epoch = (grouped_units(dataset.has_image, self.global_batch) if group else
                                len(dataset) // self.global_batch)
        if self.steps_per_epoch == 0:
            raise DataError(f"{getattr(dataset, 'path', 'the data')}: {len(dataset)} samples cannot fill one "
                            f"global batch of {self.global_batch} ({world} x {micro} x {accum}): a smaller "
                            f"--global-batch, or more data")
        self.total_steps = self.steps_per_epoch * epochs

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accum

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            epoch, i = divmod(step, self.steps_per_epoch)  # i: the step within its epoch
            if i == 0 or step == self.start_step:
                order = epoch_order(len(self.ds), self.seed, epoch, self.global_batch, self.ds.has_image, self.group)
                assert len(order) // self.global_batch == self.steps_per_epoch
            base = i * self.global_batch
            for k in range(self.accum):
                s = base + (k * self.world + self.rank) * self.micro
                yield order[s:s + self.micro]
