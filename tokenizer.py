"""The tokenizer: Vicuna v1.5's sentencepiece model, wrapped exactly as HF's slow LlamaTokenizer wraps it.

LLaVA tokenises through transformers' LlamaTokenizer (4.31, the release's pin), whose handling of the
special tokens in the text and of the dummy-prefix space is not sentencepiece's own: data.py's label
masking and generate.py's prompts depend on the ids being the same, so they are (tests/test_tokenizer.py
compares ours with 4.31's on hundreds of texts in both of its modes).
"""
import os
import re

import sentencepiece as spm

from weights import read_config


def not_a_character(text):
    """The first code point of text that is no character, or None: a lone surrogate, from a JSON
    "\\ud800" or a byte that is not UTF-8 (argv and stdin read it as one), fails in sentencepiece."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start]
    return None


class Tokenizer:
    """Vicuna v1.5's sentencepiece BPE (32,000 pieces, byte fallback, BOS=1, EOS=2, UNK=0), wrapped as
    HF's slow `LlamaTokenizer` of transformers 4.31 (the release's pin) wraps it: the same ids
    (tests/test_tokenizer.py). Sentencepiece does the real work; the rest is HF's handling of "<s>",
    "</s>", "<unk>" in the text, in the mode the tokenizer_config.json beside the model says (`legacy`,
    true where it says nothing). Vicuna v1.5's says false: the first piece after a special token then
    loses its dummy-prefix "▁" ("</s>USER" gives "US...", not "▁US..."), in every multi-turn prompt."""

    def __init__(self, model_path, legacy=None):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(model_path)
        except RuntimeError:
            raise ValueError(f"not a sentencepiece model: {model_path}") from None
        if legacy is None:  # HF 4.31: `if not self.legacy` -- so an explicit null counts as false
            config = os.path.join(os.path.dirname(model_path), "tokenizer_config.json")
            legacy = bool(read_config(config, lambda d: d.get("legacy", True))) if os.path.isfile(config) else True
        self.legacy = legacy
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.unk_id  # LLaMA has no pad token; LLaVA pads with <unk>
        self.vocab_size = self.sp.get_piece_size()
        self.special = {i: self.sp.id_to_piece(i) for i in (self.unk_id, self.bos_id, self.eos_id)}
        self.special_ids = {s: i for i, s in self.special.items()}
        self.special_re = re.compile("(" + "|".join(map(re.escape, self.special_ids)) + ")")

    def __len__(self):
        return self.vocab_size

    def encode(self, text, bos=True, eos=False):
        ids = [self.bos_id] if bos else []
        # HF first cuts the text at literal special-token strings: the "</s>" that ends every answer in
        # the vicuna_v1 template becomes EOS. The spaces around them are kept, and each chunk is a separate
        # sentencepiece call with its own dummy-prefix space: after "</s>", "USER" starts "▁US..." in legacy mode.
        if not self.legacy:  # HF 4.31 marks the text's start with "▁", so every "▁" in it is a space first
            text = text.replace("▁", " ")
        for k, chunk in enumerate(self.special_re.split(text)):
            if chunk in self.special_ids:
                ids.append(self.special_ids[chunk])
            elif chunk and (self.legacy or k == 0 or chunk[0] == " "):
                ids += self.sp.encode(chunk)
            elif chunk:  # not legacy, right after a special token: the first piece loses its "▁", by name
                pieces = self.sp.encode(chunk, out_type=str)
                pieces[0] = pieces[0][1:] if pieces[0].startswith("▁") else pieces[0]
                ids += [self.sp.piece_to_id(p) for p in pieces if p]  # a piece that is not one becomes <unk>
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids]  # lists or tensors
        if skip_special_tokens:  # <unk> counts as special too, so padding disappears
            ids = [i for i in ids if i not in self.special]
        pieces = [self.sp.id_to_piece(i) for i in ids]
        if not pieces:
            return ""
        # HF removes the dummy-prefix space, then sentencepiece a leading one again: a first "▁▁x" loses both
        if pieces[0].startswith("▁"):
            pieces[0] = pieces[0][1:]
        # Runs of ordinary pieces are decoded by sentencepiece, special tokens pasted in. Legacy mode adds a
        # space *before the run* preceding a special token, and after a leading one when no "▁" follows.
        text, run = "", []
        for k, (i, piece) in enumerate(zip(ids, pieces)):
            prev_special = k > 0 and ids[k - 1] in self.special
            if i in self.special:
                if k > 0 and not prev_special:
                    text += " "
                text += self.sp.decode_pieces(run) + piece
                run = []
            else:
                if k == 1 and prev_special and not piece.startswith("▁"):
                    text += " "
                run.append(piece)
        return text + self.sp.decode_pieces(run)
