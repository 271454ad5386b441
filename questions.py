"""generate.py --questions on disk: LLaVA's question .jsonl, read and checked whole before the model
loads (a bad line is named now, not hours into a benchmark), and the answers .jsonl that a run appends
to and a rerun resumes (only its own answers; a last line cut short by a crash is dropped and asked
again). generate.answer_file answers what is left."""
import contextlib
import errno
import json
import os
import sys
from collections import Counter

try:
    import fcntl  # the answers file's lock (POSIX); elsewhere a run goes without it
except ImportError:
    fcntl = None

import data
from tokenizer import not_a_character
from weights import fingerprint


def log(*a, **kw):
    print(*a, file=sys.stderr, flush=True, **kw)


def read_jsonl(path, check, text=None, fix="fix or delete that line"):
    """(line number, object) for each line of a .jsonl file (or of its bytes `text`, already read);
    check(obj) -> what is wrong with it, or None; `fix`: the way out of a line that is no JSON."""
    if text is None:
        with open(path, "rb") as f:
            text = f.read()
    try:
        lines = text.decode("utf-8").split("\n")  # not splitlines(): U+2028 inside a string is no line break
    except UnicodeDecodeError:
        raise data.DataError(f"{path}: not UTF-8 text (a .jsonl file, one JSON object per line, is expected)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise data.DataError(f"{path} line {n}: not JSON ({e}); {fix}") from None
        problem = check(obj) if isinstance(obj, dict) else "not a JSON object"
        if problem:
            raise data.DataError(f"{path} line {n}: {problem}")
        yield n, obj


def question_problem(q, image_folder, conv_mode="vicuna_v1"):
    if not isinstance(q.get("question_id"), (str, int)) or isinstance(q["question_id"], bool):
        return "question_id must be a string or an integer"
    if not isinstance(q.get("text"), str):
        return "text must be a string"
    if bad := not_a_character(q["text"]):
        return f"text holds {bad!r}, a lone surrogate, no character; fix or delete that line"
    if q.get("image") is not None and not (isinstance(q["image"], str) and q["image"]):
        return f"image must be a file name, not {q['image']!r} (leave it out for a text-only question)"
    if q.get("image") and not os.path.isfile(os.path.join(image_folder or "", q["image"])):
        return f"image file not found: {os.path.join(image_folder or '', q['image'])} (--image-folder?)"
    if conv_mode == "plain" and not q.get("image"):
        return "a text-only question, but --conv-mode plain (stage 1) captions an image; give it one, or use " \
               "--conv-mode vicuna_v1"
    return None


@contextlib.contextmanager
def answers_lock(path):
    """One run at a time on an answers file: two would both answer every question left, each line twice.
    A lock on the open file itself (flock, POSIX: one per open file, so the reads and appends that open
    it again keep it; elsewhere no lock), released when the run ends however it ends; a file it made
    and left empty goes, unless another run holds it (two started at once both saw no file)."""
    made, f, held = not os.path.exists(path), None, False
    try:
        try:  # (inside the outer try: a Ctrl-C landing in open(), once the file is made, leaves none)
            f = open(path, "a")
        except OSError as e:  # a read-only folder, no permission
            raise data.DataError(f"--answers {path}: cannot be written ({e.strerror or e}); name a file where you "
                                 f"can write") from None
        try:
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (some NFS, FUSE)
                log(f"note: --answers {path}: cannot be locked ({e.strerror}); nothing stops a second run on it")
            else:
                raise data.DataError(f"--answers {path}: another generate.py is writing it; wait for it to end, "
                                     f"or name another file") from None
        held = True
        yield
    finally:
        if f is not None:
            f.close()  # before the removal: an open file cannot be removed on Windows
        if made and (held or f is None) and os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)


def read_questions(args, ours):
    """The questions to answer and how often each (question_id, text) pair is already answered, all
    checked before the model loads. An id may repeat with other text (MME asks two questions per image
    under one id), so answers are matched on both. A pair may repeat too (TextVQA's ids are image ids,
    and two askers may ask one image the same): each line is answered, as the release answers it."""
    with open(args.questions, "rb") as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (some Windows editors): no part of line 1
    if raw.lstrip().startswith(b"["):  # a .json array (ScienceQA's llava_test_CQM-A.json), one line or many
        raise data.DataError(f"--questions {args.questions}: a JSON array, not a .jsonl of {{question_id, image, text}} "
                             f"objects one per line; ScienceQA's .json converts with `python eval.py "
                             f"scienceqa-questions SRC DST`")
    questions = list(read_jsonl(args.questions, lambda q: question_problem(q, args.image_folder, args.conv_mode), raw))
    if not questions:  # else a run that loads the model, answers nothing and succeeds
        raise data.DataError(f"--questions {args.questions}: no questions in it (a .jsonl of {{question_id, image, "
                             f"text}} objects, one per line, is expected)")
    asked = Counter((q["question_id"], q["text"]) for _, q in questions)
    if len(asked) < len(questions):
        log(f"note: {len(questions) - len(asked)} lines of {args.questions} repeat an earlier line's question_id and "
            f"text: each is answered, as the release answers them")
    if not os.path.exists(args.answers):
        return questions, Counter()
    if os.path.samefile(args.answers, args.questions):
        raise data.DataError(f"--answers {args.answers} is the --questions file; name a new file for the answers")
    # the file is read and checked whole before anything is written to it: only an answers file
    # of these questions is appended to, and only its cut-short last line (a crash) is dropped
    with open(args.answers, "rb") as f:
        raw = f.read()
    tail = raw[raw.rfind(b"\n") + 1:]  # a last line without its newline: whole, or cut short by a crash
    try:
        json.loads(tail or b"0")
        cut = False
    except ValueError:  # cut short if it starts as generate.py's lines do; anything else is named below
        cut = tail.startswith(b'{"question_id"')
    answers = list(read_jsonl(args.answers, answer_problem, raw[:len(raw) - len(tail)] if cut else raw,
                              "fix or delete that line (or, if this is no answers file, name a new file for --answers)"))
    answered, moved = Counter(), False
    for n, a in answers:
        key = (a["question_id"], a["prompt"])
        answered[key] += 1
        if answered[key] > asked[key]:
            raise data.DataError(f"{args.answers} line {n}: answers question_id {a['question_id']!r} with a prompt "
                                 f"that {args.questions} does not ask{' that often' if asked[key] else ''}: the answers "
                                 f"to other questions? name a new file for --answers")
        theirs = a.get("metadata")
        if not (isinstance(theirs, dict) and "model" in theirs):  # LLaVA's {} (its scripts'), or none
            raise data.DataError(f"{args.answers} line {n}: an answer without generate.py's settings (its metadata: "
                                 f"{json.dumps(theirs)}; LLaVA's scripts write {{}}), so whether it came from this "
                                 f"model and these settings is unknown, and two runs would mix in one file; name a "
                                 f"new file for --answers")
        theirs = {"weights": ours["weights"]} | theirs  # (a file begun before the weights were recorded)
        if "weights" in a["metadata"] and theirs["weights"] == ours["weights"]:  # the same files: moved, maybe
            moved = moved or {k: theirs.get(k) for k in PATHS} != {k: ours[k] for k in PATHS}
            theirs |= {k: ours[k] for k in PATHS}
        if theirs != ours:
            changed = ", ".join(f"{k} {theirs.get(k)!r}, now {ours.get(k)!r}"
                                for k in sorted(theirs.keys() | ours) if theirs.get(k) != ours.get(k))
            raise data.DataError(f"{args.answers} line {n}: answered by a run with other settings ({changed}): "
                                 f"the two would mix in one file; name a new file for --answers, or run as before")
    if moved:
        log(f"note: --answers {args.answers}: begun with the same weights at other paths (moved?); going on")
    with open(args.answers, "ab") as f:
        if cut:
            f.truncate(len(raw) - len(tail))
            log(f"note: --answers {args.answers}: dropped its last line, cut short (a run that stopped); asking it again")
        elif tail.strip():
            f.write(b"\n")
    return questions, answered


PATHS = ("model", "lora", "model_base", "vit")  # settings' paths: their weights, fingerprinted, may move


def settings(args):
    """What a run's answers are generated with, written as each answer's `metadata` (LLaVA's is empty): a
    rerun adds to an answers file only as the run that began it (one benchmark figure, one model). The
    weights are named by their paths and by weights.fingerprint of each: a run's OUT/ckpt, say, is the
    same path after every save."""
    path = lambda p: p and os.path.realpath(p)  # noqa: E731
    sampling = (dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.temperature > 0
                else dict(temperature=0.0))  # greedy: top-p and top-k play no part
    given = [p for p in (args.model, args.lora, args.model_base, args.vit) if p]
    return dict(model=path(args.model), lora=path(args.lora), model_base=path(args.model_base), vit=path(args.vit),
                weights=" ".join(fingerprint(p)[:16] for p in given),
                conv_mode=args.conv_mode, dtype=args.dtype, quantize=args.quantize,
                max_new_tokens=args.max_new_tokens, **sampling)


def answer_problem(a):
    if not isinstance(a.get("question_id"), (str, int)):
        return "no question_id: not an answers file"
    if not isinstance(a.get("prompt"), str) or not isinstance(a.get("text"), str):
        return "needs a prompt and a text (strings): not an answers file (a question file?)"
    return None
