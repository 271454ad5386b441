"""Score generate.py's answer files on the paper's benchmarks, by the rules the release scores them.

    python eval.py textvqa   --answers A.jsonl --annotations TextVQA_0.5.1_val.json
    python eval.py vqav2     --answers A.jsonl --annotations v2_mscoco_val2014_annotations.json
    python eval.py vqav2     --answers A.jsonl --questions llava_vqav2_mscoco_test2015.jsonl --submission up.json
    python eval.py vizwiz    --answers A.jsonl --questions llava_test.jsonl --submission up.json
    python eval.py gqa       --answers A.jsonl --questions testdev_balanced_questions.json
    python eval.py pope      --answers A.jsonl --questions llava_pope_test.jsonl --annotation-dir coco/
    python eval.py mme       --answers A.jsonl --mme-dir MME_Benchmark_release_version/
    python eval.py scienceqa --answers A.jsonl --base-dir scienceqa/     (problems.json, pid_splits.json)
    python eval.py seed      --answers A.jsonl --annotations SEED-Bench.json
    python eval.py mmbench   --answers A.jsonl --questions mmbench_dev_20230712.tsv [--submission up.xlsx]
                             (the server's upload; on dev also a single-pass accuracy, not MMBench's circular score)
    python eval.py scienceqa-questions llava_test_CQM-A.json sqa.jsonl   (the question file generate.py reads)
    python eval.py mmbench-questions mmbench_dev_20230712.tsv mmb.jsonl --image-folder mmb_images/ [--all-rounds]

Answer files are LLaVA's model_vqa jsonl ({question_id, prompt, text, ...} per line), as generate.py
and the release's model_vqa_loader write them. Each benchmark's rule is one small pure function
below, written from the release's scoring code (LLaVA-1.5 / LLaVA-HR: llava/eval/*.py and
scripts/convert_*.py) or, where the release hands off, from the benchmark's own tool (GQA's
eval.py, MME's eval_tool/calculation.py). Each prints `name: value` lines in the units and with
the rounding that tool prints, so the numbers can be compared digit for digit. Where the release
is fragile (it pairs POPE labels and MME questions by file position, and silently drops extra
answers) we match by id instead, which gives the same numbers whenever the release's assumptions
hold, and refuses the input with one line naming the file and line when they do not. An id alone does
not tie an answer to its question (POPE's ids are MMBench's and SEED's too): each answer's prompt must
be the question the benchmark's file has under that id, or hold it (see another_question; VQAv2 val's
annotations hold no question text to compare). One known
exception: an MME answer holding a tab or a line break is scored here as written, while the
release's tab-separated files drop it (tab) or break on it (line break), so its figure differs;
eval.py says how many there are. Missing answers are never scored as if the set were complete:
every run prints `missing:`.
"""
import failures

# the command's first act: SIGTERM unwinds as Ctrl-C does, and either is one line from here on (main says what
# was written). The tests import eval.py: their process keeps its own handling.
if __name__ == "__main__":
    failures.catch_signals(False, "interrupted: nothing was written")

import base64
import binascii
import csv
import json
import os
import re
import stat
import sys
import zipfile
from collections import defaultdict
from xml.sax.saxutils import escape


class EvalError(ValueError):
    """Bad input: the message is one line naming the file (and line) and the way out."""


# ---------------------------------------------------------------------------------------
# Reading answers and annotations

def read_json(path, what, layout=""):
    """The file's JSON; `layout` ('; it is ...') is said when the file is not JSON."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # utf-8-sig: a BOM (some Windows editors) is no JSON
            return json.load(f)
    except OSError as e:
        raise EvalError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{e.lineno}: the {what} file is not valid JSON ({e.msg}){layout}") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: the {what} file is not UTF-8 text; is this the right file?") from None


# what every line of generate.py's (and LLaVA's model_vqa) answer files holds; a question line has
# question_id and text too, but no prompt
ANSWER_KEYS = ("question_id", "prompt", "text")


def read_jsonl(path, what, keys):
    """[(line number, object)] for every non-blank line; each object must hold `keys`."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a BOM, as generate.py allows in question files
            text = f.read()
    except OSError as e:
        raise EvalError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: the {what} file is not UTF-8 text; is this the right file?") from None
    if text.lstrip().startswith("["):
        hint = "; an upload file eval.py wrote (--submission)? " if what == "answer" else "; "
        raise EvalError(f"{path}: a JSON array, not a .jsonl file of {what}s{hint}a .jsonl holds one JSON object "
                        f"a line, as generate.py writes them")
    lines = text.split("\n")  # not splitlines(): U+2028 inside a string is no line break
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            way = ("a run cut short? rerun generate.py, which redoes a broken last line" if n == last
                   else "fix or delete that line")
            raise EvalError(f"{path}:{n}: not a JSON line ({e.msg}); {way}") from None
        if not isinstance(obj, dict):
            raise EvalError(f"{path}:{n}: a JSON {type(obj).__name__}, where each {what} line is an object with "
                            f"{', '.join(keys)}; is this the right file?")
        missing = [k for k in keys if k not in obj]
        if missing:
            question = what == "answer" and "prompt" in missing and "question_id" in obj and "text" in obj
            raise EvalError(f"{path}:{n}: each {what} line needs {', '.join(keys)}; this one lacks "
                            f"{', '.join(missing)}" + ("; a question file given as --answers?" if question else ""))
        for k in ("text", "prompt"):
            if k in keys and not isinstance(obj[k], str):
                raise EvalError(f"{path}:{n}: {k!r} must be a string, got {type(obj[k]).__name__}")
        qid = obj.get("question_id")  # a list or dict cannot key a lookup; true would be question 1
        if "question_id" in keys and (not isinstance(qid, (str, int)) or isinstance(qid, bool)):
            raise EvalError(f"{path}:{n}: 'question_id' must be a string or an integer, got {type(qid).__name__}")
        rows.append((n, obj))
    return rows


def by_key(path, rows, key):
    """{key(obj): (line, obj)}; a key seen twice is an error (two answers to one question)."""
    out = {}
    for n, obj in rows:
        k = key(obj)
        if k in out:
            raise EvalError(f"{path}:{n}: question {k!r} was already answered on line {out[k][0]}; "
                            f"keep one answer per question")
        out[k] = (n, obj)
    return out


def unknown(path, n, qid, where):
    return EvalError(f"{path}:{n}: question_id {qid!r} is not in {where}; "
                     f"were these answers generated from another question file?")


def another_question(path, n, a, where, asked, source):
    """The error for an answer whose prompt is not the question `where` has under its id (`asked`); `source`:
    the question file these answers should have come from. An id alone does not tie an answer to its question
    (POPE's 1, 2, ... are MMBench's and SEED's too: another benchmark's answers would be scored as these); its
    prompt does, the question file's text as generate.py and LLaVA's model_vqa scripts write it."""
    short = lambda text: repr(text[:50]) + ("..." if len(text) > 50 else "")
    return EvalError(f"{path}:{n}: question_id {a['question_id']!r} is {short(asked)} in {where}, but this answer's "
                     f"prompt is {short(a['prompt'])}; these answers are to another question file: generate them "
                     f"from {source}")


def words(text):
    """The text's words, one space apart: what is compared where the question file generate.py reads was made
    from the benchmark's own by LLaVA's conversion (eval.zip's, not in its repository), whose spacing (a stripped
    end, line breaks) cannot be checked."""
    return " ".join(text.split())


def opens(prompt, question):
    """Whether the prompt's first words are the question's (words: the spacing is not compared)."""
    return (words(prompt) + " ").startswith(words(question) + " ")


def need(obj, key, path, what, kind=None, each=None):
    """obj[key] (an instance of kind, a type or a tuple of them, if given; a list of instances of each,
    if that is given), or one line saying the file does not have the expected layout."""
    names = lambda k: " or ".join(t.__name__ for t in (k if isinstance(k, tuple) else (k,)))
    an = lambda k: ("an " if names(k)[0] in "aeiou" else "a ") + names(k)
    if not isinstance(obj, dict):
        raise EvalError(f"{path}: {what} must be an object with {key!r}, got {type(obj).__name__}; is this the "
                        f"right file?")
    if key not in obj:
        raise EvalError(f"{path}: {what} has no {key!r}; is this the right file?")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise EvalError(f"{path}: {key!r} of {what} must be {an(kind)}, got {type(value).__name__}; is this "
                        f"the right file?")
    if each is not None:
        if not isinstance(value, list):
            raise EvalError(f"{path}: {key!r} of {what} must be a list of {names(each)}, got "
                            f"{type(value).__name__}; is this the right file?")
        for i, v in enumerate(value):
            if not isinstance(v, each):
                raise EvalError(f"{path}: {key!r} of {what} must be a list of {names(each)}, but item {i} is "
                                f"{v!r:.40}; is this the right file?")
    return value


def new_output(path, flag, inputs):
    """Refuse an output path that is not a new file: one of the inputs ({flag: path}), what is no regular file
    (a device, a folder: write_new would rename its file over it), or a file that exists (never written over).
    flag: how the user named it ('--submission', 'output')."""
    for name, given in inputs.items():
        if os.path.exists(path) and os.path.exists(given) and os.path.samefile(path, given):
            raise EvalError(f"{flag} {path} is the {name} file itself; name a new file for it")
    if os.path.exists(path) and not os.path.isfile(path):
        mode = os.stat(path).st_mode
        kind = ("a folder" if stat.S_ISDIR(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a pipe or a socket")
        raise EvalError(f"{flag} {path} is {kind}, not a file; name a new file for it")
    if os.path.lexists(path):
        raise EvalError(f"{path} exists; choose another {flag} path (eval.py writes over no file: remove it only "
                        f"if it is an old output of yours)")


outputs = []  # the paths write_new was given in this run (see interrupted)


def write_new(path, write, mode="w"):
    """Write a file whole or not at all: into a new file of this process's beside it (path.PID.tmp, made
    with "x", so never a file of the user's), renamed over path once written. `path` does not exist: each
    caller has checked, with its own message."""
    outputs.append(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # "x": never over a file that is there
            write(f)
        os.replace(tmp, path)
    except FileExistsError:  # not this run's: neither written over nor removed
        raise EvalError(f"{tmp} exists (from a run that stopped?); delete it and run again") from None
    except BaseException as e:
        # nothing partial is left, whatever stopped it: a Ctrl-C or SIGTERM may land inside open(), once the file
        # is made but before `f` is, so it goes by its name (it was not there before)
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            folder = "; does its folder exist?" if isinstance(e, FileNotFoundError) else ""
            raise EvalError(f"{path}: cannot write it ({e.strerror}){folder}") from None
        raise


def report(questions, answered, missing, note="the scores below cover the answered ones only"):
    print(f"questions: {questions}\nanswered: {answered}\nmissing: {missing}")
    if missing:
        print(f"warning: {missing} questions have no answer; {note}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# VQA answer normalisation: the EvalAI processor of LLaVA's llava/eval/m4c_evaluator.py (from
# MMF), used for TextVQA and for the VQAv2 / VizWiz submission files, and the VQA tool's own
# (llava_hr/eval/vqa_eval.py's VQAEval), used for VQAv2 val. Both share the tables below.

# contractions written without the apostrophe -> with it; the odd entries ("somebody'd" ->
# "somebodyd", "let's" -> "let's") are in the original table and kept so answers match it
CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                   "0 0 1 2 3 4 5 6 7 8 9 10".split()))
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# a period not followed by a digit ("1.5" keeps its point). The original passes re.UNICODE as
# sub()'s third argument, which is `count`: at most 32 periods go, and so do we.
PERIOD = re.compile(r"\.(?!\d)")
COMMA_NUMBER = re.compile(r"\d,\d")


def vqa_punctuation(text):
    """processPunctuation: punctuation touching a space is deleted, punctuation inside a word becomes a
    space (all of it is deleted once a digit-comma-digit occurs); then the periods go."""
    out, comma_number = text, COMMA_NUMBER.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or comma_number) else " ")
    return PERIOD.sub("", out, count=32)


def vqa_digits_articles(text):
    """processDigitArticle: lower case, number words as digits, articles out, contractions given back."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text):
    """The EvalAI answer normalisation, step by step as m4c_evaluator applies it (commas are gone
    before the punctuation step, so its digit-comma test never fires here)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return vqa_digits_articles(vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(pred, humans):
    """VQA accuracy of one answer against the 10 human answers (each already read by the caller's rule):
    min(#humans who gave it / 3, 1), averaged over the 10 leave-one-out subsets of 9 humans
    (m4c_evaluator's TextVQAAccuracyEvaluator and vqa_eval.py's VQAEval, the VQA challenge's metric)."""
    total = 0
    for i, h in enumerate(humans):
        others = sum(1 for j, o in enumerate(humans) if j != i and o == pred)
        total += min(1, others / 3)
    return total / len(humans)


# ---------------------------------------------------------------------------------------
# TextVQA and VQAv2 val: VQA accuracy

def textvqa_question(prompt):
    """The question inside a TextVQA prompt, lower-cased (llava/eval/eval_textvqa.py's
    prompt_processor): the release matches answers to annotations by (image id, this)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = m.group(1) if m else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:  # the question, then the answer-format line
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def score_vqa(preds):
    """preds: [(answer text, the 10 human answers)] -> mean VQA accuracy, summed in order."""
    scores = [vqa_accuracy(normalize_answer(p), [normalize_answer(h) for h in hs]) for p, hs in preds]
    return sum(scores) / len(scores)


def human_answers(path, ann, qid):
    # TextVQA's are strings, VQAv2's {answer, answer_confidence, answer_id} objects
    answers = [need(a, "answer", path, f"a human answer to question {qid!r}") if isinstance(a, dict) else a
               for a in need(ann, "answers", path, f"question {qid!r}", list)]
    if not all(isinstance(a, str) for a in answers):
        raise EvalError(f"{path}: question {qid!r} has a human answer that is neither a string nor an object "
                        f"with an 'answer' string; is this the right file?")
    if len(answers) != 10:  # the release asserts ten
        raise EvalError(f"{path}: question {qid!r} has {len(answers)} human answers; VQA accuracy needs 10")
    return answers


def run_textvqa(args):
    entries = need(read_json(args.annotations, "TextVQA annotations", "; TextVQA's annotations are one JSON object "
                             "with a 'data' list, TextVQA_0.5.1_val.json (not LLaVA's llava_textvqa_val_v051_ocr.jsonl)"),
                   "data", args.annotations, "the file", list)
    # eval_textvqa.py keys the annotations by (image id, lower-cased question): a later entry replaces an
    # earlier one of the same key, and every answer line is scored against the entry of its key
    anns, asked = {}, defaultdict(int)
    for a in entries:
        key = (need(a, "image_id", args.annotations, "an entry", (str, int)),
               need(a, "question", args.annotations, "an entry", str).lower())
        anns[key], asked[key] = a, asked[key] + 1
    rows = read_jsonl(args.answers, "answer", ANSWER_KEYS)
    preds, lines = [], defaultdict(list)
    for n, a in rows:
        q = textvqa_question(a["prompt"])
        if q is None:
            raise EvalError(f"{args.answers}:{n}: cannot find the question in the prompt {a['prompt']!r} "
                            f"(expected 'question\\n[Reference OCR token: ...\\n]answer-format line')")
        key = (a["question_id"], q)
        if key not in anns:
            raise EvalError(f"{args.answers}:{n}: image {a['question_id']!r} with question {q!r} is not in "
                            f"{args.annotations}; were these answers generated from another question file?")
        lines[key].append(n)
        if len(lines[key]) > asked[key]:  # more answers than the annotations ask it: one is a second answer
            raise EvalError(f"{args.answers}:{n}: image {key[0]!r} question {key[1]!r} was already answered on "
                            f"line {', '.join(map(str, lines[key][:-1]))} ({asked[key]} times in "
                            f"{args.annotations}); keep one answer per question")
        preds.append((a["text"], human_answers(args.annotations, anns[key], key)))
    report(questions=len(entries), answered=len(rows), missing=len(entries) - len(rows))
    shared = sum(len(ns) for ns in lines.values() if len(ns) > 1)
    if shared:
        print(f"warning: {shared} answers share their image and (lower-cased) question with another; each is "
              f"scored against the last annotation of that pair, as eval_textvqa.py scores them", file=sys.stderr)
    if preds:
        print(f"accuracy: {100. * score_vqa(preds):.2f}")  # eval_textvqa prints a percentage, 2 places


def vqa_tool_accuracy(text, humans):
    """VQA accuracy of one answer as the VQA tool scores it (vqa_eval.py's VQAEval.evaluate, which the
    release runs through eval_okvqa.py): the answer is read as the EvalAI processor reads it, less its
    first step (lower case, commas and '?' out, "'s" split off); the humans' answers keep theirs as
    written, and lose only their punctuation, and only when they disagree. So a human "two" or "a dog"
    never matches an answer. (VQAEval leaves out each human's answer object by equality; VQAv2's differ
    by answer_id, so that is leave-one-out, as here.)"""
    pred = vqa_digits_articles(vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))
    return vqa_accuracy(pred, [vqa_punctuation(h) for h in humans] if len(set(humans)) > 1 else humans)


def run_vqav2(args):
    """The test-dev upload, as the release writes it; or a val accuracy by the VQA tool's rule (the
    release's eval_okvqa.py with vqa_eval.py, for VQAv2-format annotations), overall and per answer type."""
    if args.submission:
        return vqa_submission(args, "vqav2")
    anns = need(read_json(args.annotations, "VQAv2 annotations", "; VQAv2's annotations are one JSON object with an "
                          "'annotations' list, v2_mscoco_val2014_annotations.json (not one of LLaVA's .jsonl files)"),
                "annotations", args.annotations, "the file", list)
    anns = {need(a, "question_id", args.annotations, "an annotation", (str, int)): a for a in anns}
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS),
                     lambda a: a["question_id"])
    for qid, (n, a) in answers.items():
        if qid not in anns:
            raise unknown(args.answers, n, qid, args.annotations)
    scores, per_type = [], defaultdict(list)
    for qid, ann in anns.items():  # VQAEval sums in the annotations' order
        if qid in answers:
            acc = vqa_tool_accuracy(answers[qid][1]["text"], human_answers(args.annotations, ann, qid))
            scores.append(acc)
            per_type[need(ann, "answer_type", args.annotations, f"question {qid!r}", str)].append(acc)
    report(questions=len(anns), answered=len(answers), missing=len(anns) - len(answers))
    percent = lambda accs: 100 * float(sum(accs)) / len(accs)  # VQAEval.setAccuracy, which rounds to 2 places
    if scores:
        print(f"accuracy: {percent(scores):.2f}")
        for t in sorted(per_type):
            print(f"accuracy_{t.replace('/', '_')}: {percent(per_type[t]):.2f}")


# ---------------------------------------------------------------------------------------
# VQAv2 test-dev and VizWiz test: the files the evaluation servers score

def vqa_submission(args, bench):
    """scripts/convert_vqav2_for_submission.py and convert_vizwiz_for_submission.py: every
    question of the split in the question file's order, its answer EvalAI-normalised. VQAv2's
    question file is all of test2015 and test-dev answers a part of it: the rest go as '' (as
    released). VizWiz needs every answer (the release asserts it)."""
    new_output(args.submission, "--submission", {"--answers": args.answers, "--questions": args.questions})
    keys = ("question_id", "text") + (("image",) if bench == "vizwiz" else ())
    questions = read_jsonl(args.questions, "question", keys)
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS),
                     lambda a: a["question_id"])
    asked = {q["question_id"]: q["text"] for _, q in questions}
    # generate.py and model_vqa_loader.py write the question's text as the prompt, exactly: VizWiz answers the
    # file read here. VQAv2 answers llava_vqav2_mscoco_test-dev2015.jsonl, and test2015's is read: made by one
    # conversion, presumably, but not checkable here, so only the question (its first line) must open the prompt
    for qid, (n, a) in answers.items():
        if qid not in asked:
            raise unknown(args.answers, n, qid, args.questions)
        if bench == "vizwiz" and a["prompt"] != asked[qid]:
            raise another_question(args.answers, n, a, args.questions, asked[qid], args.questions)
        if bench == "vqav2" and not opens(a["prompt"], question := words(asked[qid].split("\n")[0])):
            raise another_question(args.answers, n, a, args.questions, question,
                                   "llava_vqav2_mscoco_test-dev2015.jsonl")
    missing = [q["question_id"] for _, q in questions if q["question_id"] not in answers]
    if bench == "vizwiz" and missing:
        raise EvalError(f"{args.answers}: {len(missing)} of {len(questions)} VizWiz questions have no answer "
                        f"(first: {missing[0]!r}); the server needs all of them: finish the run first")
    out = []
    for _, q in questions:
        text = normalize_answer(answers[q["question_id"]][1]["text"]) if q["question_id"] in answers else ""
        out.append({"image": q["image"], "answer": text} if bench == "vizwiz"
                   else {"question_id": q["question_id"], "answer": text})
    write_new(args.submission, lambda f: json.dump(out, f))
    report(len(questions), len(answers), len(missing), "they go as '' (test-dev is part of test2015)")
    print(f"submission: {args.submission}")


def run_vizwiz(args):
    return vqa_submission(args, "vizwiz")


# ---------------------------------------------------------------------------------------
# GQA testdev-balanced: exact match

def gqa_prediction(text):
    # scripts/convert_gqa_for_eval.py: trailing periods off, lower case
    return text.rstrip(".").lower()


def run_gqa(args):
    """GQA's eval.py (as the release runs it): 1 point when the prediction equals the answer,
    averaged over the balanced questions; binary (yes/no, 'verify'/'logical'/'choose'/'compare'
    structures) and open ('query') splits likewise."""
    layout = ("; a GQA questions file is one JSON object {question id: question}, e.g. "
              "testdev_balanced_questions.json (not LLaVA's llava_gqa_testdev_balanced.jsonl)")
    questions = read_json(args.questions, "GQA questions", layout)
    if not (isinstance(questions, dict) and all(isinstance(q, dict) for q in questions.values())):
        raise EvalError(f"{args.questions}: not the layout of GQA's questions{layout}")
    for qid, q in questions.items():
        need(q, "answer", args.questions, f"question {qid!r}")
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS),
                     lambda a: str(a["question_id"]))  # GQA's ids are strings; LLaVA's files too
    for qid, (n, a) in answers.items():
        if qid not in questions:
            raise unknown(args.answers, n, qid, args.questions)
        # LLaVA's llava_gqa_testdev_balanced.jsonl, which generate.py answers, asks the question and then
        # the answer-format line: the prompt's first words must be the question's
        question = words(need(questions[qid], "question", args.questions, f"question {qid!r}", str))
        if not opens(a["prompt"], question):
            raise another_question(args.answers, n, a, args.questions, question,
                                   "LLaVA's llava_gqa_testdev_balanced.jsonl")
    scores = defaultdict(list)
    balanced = [qid for qid, q in questions.items() if q.get("isBalanced", True)]
    for qid in balanced:  # the questions file's order, as eval.py iterates
        if qid not in answers:
            continue
        q = questions[qid]
        score = float(gqa_prediction(answers[qid][1]["text"]) == q["answer"])
        scores["accuracy"].append(score)
        if "types" in q:
            types = need(q, "types", args.questions, f"question {qid!r}", dict)
            structural = need(types, "structural", args.questions, f"the types of question {qid!r}")
            scores["open" if structural == "query" else "binary"].append(score)
    report(questions=len(balanced), answered=len(scores["accuracy"]), missing=len(balanced) - len(scores["accuracy"]))
    for k in ("accuracy", "binary", "open"):  # eval.py: avg * 100, printed with 2 places
        if scores[k]:
            print(f"{k}: {float(sum(scores[k])) / len(scores[k]) * 100:.2f}")


# ---------------------------------------------------------------------------------------
# POPE: yes/no against the COCO labels, per category

def pope_yes(text):
    """llava/eval/eval_pope.py: keep the first sentence, drop commas, and read 'no' if the words
    hold 'No', 'no' or 'not'; anything else, even an empty answer, counts as yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def pope_metrics(pairs):
    """pairs: [(predicted yes, label yes)] -> the release's metrics (yes is the positive class).
    A ratio with a zero denominator (the release divides by zero there) is nan."""
    tp = sum(p and l for p, l in pairs)
    fp = sum(p and not l for p, l in pairs)
    tn = sum(not p and not l for p, l in pairs)
    fn = sum(not p and l for p, l in pairs)
    div = lambda a, b: a / b if b else float("nan")
    precision, recall = div(float(tp), float(tp + fp)), div(float(tp), float(tp + fn))
    f1 = div(2 * precision * recall, precision + recall)
    return dict(tp=tp, fp=fp, tn=tn, fn=fn, accuracy=div(tp + tn, tp + tn + fp + fn), precision=precision,
                recall=recall, f1=f1, yes_ratio=div(sum(p for p, _ in pairs), len(pairs)))


# LLaVA's llava_pope_test.jsonl was made from POPE's output/coco at commit e3e39262 (2,910 'random' questions), the
# commit LLaVA's docs/Evaluation.md links; POPE's later commits replaced coco_pope_random.json by 3,000 other questions
POPE_LABELS = ("; LLaVA's llava_pope_test.jsonl goes with the label files of POPE's commit e3e39262 (its output/coco: "
               "`git checkout e3e39262 -- output/coco` in a clone of AoiDragon/POPE)")


def run_pope(args):
    questions = read_jsonl(args.questions, "question", ("question_id", "text", "category"))
    qs = by_key(args.questions, questions, lambda q: q["question_id"])
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS),
                     lambda a: a["question_id"])
    for qid, (n, a) in answers.items():
        if qid not in qs:
            raise unknown(args.answers, n, qid, args.questions)
        if a["prompt"] != qs[qid][1]["text"]:  # the question's text, exactly (generate.py, model_vqa_loader.py)
            raise another_question(args.answers, n, a, args.questions, qs[qid][1]["text"], args.questions)
    try:
        files = sorted(f for f in os.listdir(args.annotation_dir) if f.startswith("coco_pope_") and f.endswith(".json"))
    except OSError as e:
        raise EvalError(f"{args.annotation_dir}: cannot list the POPE label files ({e.strerror})") from None
    if not files:
        raise EvalError(f"{args.annotation_dir}: no coco_pope_<category>.json label files")
    # The release pairs the k-th answer of a category with the k-th line of its label file.
    # llava_pope_test.jsonl is those label files in order, so we pair by question order instead
    # (checking the image where both name one) and look answers up by id: same labels, but
    # answers in any order, and missing ones are counted rather than shifting every label after.
    label, categories = {}, []
    for f in files:
        category, path = f[len("coco_pope_"):-len(".json")], os.path.join(args.annotation_dir, f)
        labels = read_jsonl(path, "label", ("label",))
        mine = [(n, q) for n, q in questions if q["category"] == category]
        if len(mine) != len(labels):
            raise EvalError(f"{path}: {len(labels)} labels, but {args.questions} has {len(mine)} "
                            f"'{category}' questions; they must correspond line by line{POPE_LABELS}")
        for (qn, q), (ln, lab) in zip(mine, labels):
            if "image" in q and "image" in lab and q["image"] != lab["image"]:
                raise EvalError(f"{path}:{ln}: image {lab['image']!r} but {args.questions}:{qn} (the same "
                                f"position among '{category}' questions) has {q['image']!r}{POPE_LABELS}")
            label[q["question_id"]] = lab["label"] != "no"
        categories.append(category)
    total = sum(1 for _, q in questions if q["category"] in categories)
    answered = [qid for qid in answers if qid in label]
    report(questions=total, answered=len(answered), missing=total - len(answered))
    f1s = []
    for category in categories:
        pairs = [(pope_yes(a["text"]), label[qid]) for qid, (_, a) in answers.items()
                 if qs[qid][1]["category"] == category]
        if not pairs:
            continue
        m = pope_metrics(pairs)
        print(f"{category}_samples: {len(pairs)}")
        for k, v in m.items():  # the release prints the raw floats
            print(f"{category}_{k}: {v}")
        f1s.append(m["f1"])
    if len(f1s) == len(categories):  # the figure LLaVA-1.5 reports for POPE: the splits' mean F1, x100
        print(f"mean_f1: {100 * sum(f1s) / len(f1s):.1f}")
    else:  # a split with no answer at all: the mean of the others would be another figure
        print(f"mean_f1: incomplete ({len(f1s)} of {len(categories)} splits answered)")


# ---------------------------------------------------------------------------------------
# MME: perception and cognition scores

MME_TASKS = {  # MME's eval_tool/calculation.py sums the tasks in this order
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
SHORT = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def mme_ground_truth(mme_dir):
    """{(category, txt file, question): 'Yes'/'No'} from MME's release folder (the release's
    convert_answer_to_mme.py): a category keeps its .txt files beside its images, or in
    questions_answers_YN/ when its images are in images/; each line is question<TAB>answer."""
    try:
        return read_mme_folder(mme_dir)
    except OSError as e:
        raise EvalError(f"{e.filename}: cannot read MME's release folder ({e.strerror})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{mme_dir}: a .txt file in it is not UTF-8 text (MME's are question<TAB>answer "
                        f"lines)") from None


def read_mme_folder(mme_dir):
    gt = {}
    for category in sorted(os.listdir(mme_dir)):
        cdir = os.path.join(mme_dir, category)
        if not os.path.isdir(cdir):
            continue
        qa_dir = os.path.join(cdir, "questions_answers_YN") if os.path.exists(os.path.join(cdir, "images")) else cdir
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            path = os.path.join(qa_dir, name)
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    parts = line.strip().split("\t")
                    if len(parts) != 2:
                        raise EvalError(f"{path}:{n}: expected 'question<TAB>answer'")
                    gt[category, name, parts[0]] = parts[1]
    return gt


def mme_key(question_id, prompt, gt):
    """The ground-truth key of one answer: the prompt loses the short-answer line and gets MME's
    ' Please answer yes or no.' back (convert_answer_to_mme.py; a few MME questions have two
    spaces before it). LLaVA-HR's MME loader first cuts the combined suffix its question file
    carries; we cut it here, so answers from either question file find their question."""
    category, name = question_id.split("/")[0], question_id.split("/")[-1].split(".")[0] + ".txt"
    prompt = prompt.replace("\n " + YES_NO + " \n" + SHORT, "")
    if SHORT in prompt:
        prompt = prompt.replace(SHORT, "").strip()
    if YES_NO not in prompt:
        prompt = prompt + " " + YES_NO
        if (category, name, prompt) not in gt:
            prompt = prompt.replace(" " + YES_NO, "  " + YES_NO)
    return category, name, prompt


def mme_label(text):
    """calculation.py's reading of an answer: lower-cased, 'yes'/'no' as is, else whichever of
    'yes' (first) or 'no' occurs in its first four characters, else 'other' (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_task_score(images):
    """images: [[correct?, correct?]] (the two questions of each image) -> acc*100 + acc+*100,
    where acc+ counts images with both answers right (calculation.py, in its float order)."""
    flat = [c for pair in images for c in pair]
    acc, acc_plus = sum(flat) / len(flat), sum(all(pair) for pair in images) / len(images)
    return 0 + acc * 100 + acc_plus * 100


def mme_unsplittable(texts):
    """A warning for answers the release's own tool cannot carry, or None. convert_answer_to_mme.py writes
    each answer into a tab-separated line that calculation.py splits on tabs (a fifth field: its
    try/except skips the answer) and reads line by line, two lines an image (a line break, \\n or \\r,
    splits the line: its assert fails, or every pair after it is shifted)."""
    tabs, breaks = sum("\t" in t for t in texts), sum("\n" in t or "\r" in t for t in texts)
    if tabs or breaks:
        return (f"warning: {tabs} answers hold a tab and {breaks} a line break; eval.py scores them as written, but "
                f"the release's tool would drop those with a tab and fail on (or misread) those with a line break, "
                f"so its figure would differ")
    return None


def run_mme(args):
    gt = mme_ground_truth(args.mme_dir)
    rows = read_jsonl(args.answers, "answer", ANSWER_KEYS)
    # MME asks two questions per image, under one question_id: an answer is (id, prompt)
    for n, a in rows:
        if not isinstance(a["question_id"], str) or not isinstance(a["prompt"], str):
            raise EvalError(f"{args.answers}:{n}: MME's question_id is a category and image, e.g. 'artwork/10002.jpg', "
                            f"and its prompt a string; got {a['question_id']!r}: are these MME answers?")
    answers = by_key(args.answers, rows, lambda a: (a["question_id"], a["prompt"]))
    # calculation.py scores consecutive pairs of lines; we pair the two questions of each image
    images, seen = defaultdict(list), set()
    for (qid, prompt), (n, a) in answers.items():
        key = mme_key(qid, prompt, gt)
        if key not in gt:
            raise EvalError(f"{args.answers}:{n}: no MME ground truth for {key[0]}/{key[1]} question {key[2]!r} "
                            f"in {args.mme_dir}; were these answers generated from another question file?")
        if key in seen:
            raise EvalError(f"{args.answers}:{n}: a second answer to {key[0]}/{key[1]} question {key[2]!r}")
        seen.add(key)
        if gt[key].lower() not in ("yes", "no"):
            raise EvalError(f"{args.mme_dir}: ground truth {gt[key]!r} for {key} is neither yes nor no")
        images[key[0], key[1]].append(mme_label(a["text"]) == gt[key].lower())
    report(questions=len(gt), answered=len(seen), missing=len(gt) - len(seen))
    if warning := mme_unsplittable([a["text"] for _, a in rows]):
        print(warning, file=sys.stderr)
    per_task, half = defaultdict(list), 0
    for (category, _), pair in images.items():
        if len(pair) > 2:
            raise EvalError(f"{args.answers}: {category} has {len(pair)} questions on one image; MME has two")
        if len(pair) == 2:
            per_task[category].append(pair)
        else:  # acc+ needs both answers of an image: one alone is answered, but not scored
            half += 1
    if half:
        print(f"warning: {half} images have one of their two questions answered; those {half} answers are left "
              f"out of the scores (MME scores an image's two answers together)", file=sys.stderr)
    in_gt = defaultdict(set)  # the images of each task
    for category, name, _ in gt:
        in_gt[category].add(name)
    for kind, tasks in MME_TASKS.items():
        done = [t for t in tasks if per_task[t]]
        partial = [t for t in done if len(per_task[t]) < len(in_gt[t])]
        scores = {t: mme_task_score(per_task[t]) for t in done}
        total = sum(scores[t] for t in done)  # 0 + first + second ..., calculation.py's order
        if len(done) < len(tasks):
            print(f"{kind}: incomplete ({len(done)} of {len(tasks)} tasks answered)")
        elif partial:
            print(f"{kind}: {total} (partial: {', '.join(partial)} not fully answered)")
        else:
            print(f"{kind}: {total}")  # calculation.py prints the raw float sum
        for t in done:
            print(f"{t}: {scores[t]}" + (f" (partial: {len(per_task[t])} of {len(in_gt[t])} images)" if t in partial
                                          else ""))


# ---------------------------------------------------------------------------------------
# ScienceQA: option-letter accuracy, and the image subset the paper reports

OPTIONS = ["A", "B", "C", "D", "E"]  # a list: `"" in "ABCDE"` would be True


def sqa_letter(text, rule="llava"):
    """The option letter read from an answer (llava/eval/eval_science_qa.py): the answer itself
    if it is a letter, else its first letter when '. ' follows it ('B. because'), else X from a
    single 'The answer is X.'; else FAILED. LLaVA-HR's copy of the script was the same when its
    numbers were published; on 2024-04-28 it dropped the '. ' condition (rule='llava-hr': any
    3+ character answer starting with a letter reads as that letter)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and (rule == "llava-hr" or text[1:3] == ". "):
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else "FAILED"


def run_scienceqa(args):
    problems_path = os.path.join(args.base_dir, "problems.json")
    splits_path = os.path.join(args.base_dir, "pid_splits.json")
    problems = read_json(problems_path, "ScienceQA problems")
    splits = read_json(splits_path, "ScienceQA splits")
    if isinstance(splits, dict) and args.split not in splits:
        raise EvalError(f"{splits_path}: no split {args.split!r} (it has {', '.join(splits)}); --split?")
    listed = need(splits, args.split, splits_path, "the file", each=str)  # pids are strings, as problems.json's keys
    split = list(dict.fromkeys(listed))  # eval_science_qa.py builds a dict over the split: a pid counts once
    if len(split) < len(listed):
        print(f"warning: {splits_path}: {len(listed) - len(split)} pids of the {args.split} split are listed again; "
              f"each is counted once, as the release counts them", file=sys.stderr)
    for pid in split:
        prob = need(problems, pid, problems_path, "the file", dict)
        need(prob, "choices", problems_path, f"problem {pid!r}", list)
        need(prob, "answer", problems_path, f"problem {pid!r}", int)  # the index of the right choice
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS),
                     lambda a: str(a["question_id"]))
    in_split = set(split)
    for qid, (n, a) in answers.items():
        if qid not in in_split:
            raise unknown(args.answers, n, qid, f"the {args.split} split of {args.base_dir}")
        # the prompt, llava_test_CQM-A.json's text (model_vqa_science.py puts an '<image>' line before it and
        # the letter instruction after; scienceqa-questions the instruction only), holds the problem's question
        # after its 'Context: ' hint and before its options, whose layout is LLaVA's own conversion: the
        # question alone is compared
        question = words(need(problems[qid], "question", problems_path, f"problem {qid!r}", str))
        if f" {question} " not in f" {words(a['prompt'])} ":
            raise another_question(args.answers, n, a, problems_path, question,
                                   "the file eval.py scienceqa-questions makes of llava_test_CQM-A.json")
    correct = total = img_correct = img_total = 0
    for pid in split:  # every problem of the split counts; an unanswered one is wrong
        prob = problems[pid]
        a = answers[pid][1] if pid in answers else None
        letter = sqa_letter(a["text"], args.letter_rule) if a else "FAILED"
        ok = letter in OPTIONS[:len(prob["choices"])] and OPTIONS.index(letter) == prob["answer"]
        # the release counts a problem as an image one when its prompt carries <image>;
        # generate.py's prompts leave the placeholder out, so the problem's own image counts
        # too. The release files an unanswered problem as text-only: so do we.
        image = a is not None and ("<image>" in a.get("prompt", "") or bool(prob.get("image")))
        correct, total = correct + ok, total + 1
        img_correct, img_total = img_correct + (ok and image), img_total + image
    report(len(split), len(answers), len(split) - len(answers),
           "they count as wrong, and the image subset leaves them out (as the release scores them)")
    print(f"correct: {correct}")
    print(f"accuracy: {correct / total * 100:.2f}")  # eval_science_qa.py's order and rounding
    if img_total:
        print(f"img_accuracy: {img_correct / img_total * 100:.2f}")


def run_scienceqa_questions(args):
    """llava_test_CQM-A.json -> the question jsonl generate.py reads, with the prompt
    model_vqa_science.py builds under --single-pred-prompt (generate.py adds the <image> line)."""
    items = read_json(args.src, "ScienceQA questions")
    new_output(args.dst, "output", {"source": args.src})
    if not isinstance(items, list):
        raise EvalError(f"{args.src}: a list of questions (llava_test_CQM-A.json) is expected, not a "
                        f"{type(items).__name__}")
    lines = []
    for i, item in enumerate(items):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not (isinstance(turns, list) and turns and isinstance(turns[0], dict)
                and isinstance(turns[0].get("value"), str) and "id" in item):
            raise EvalError(f"{args.src}: item {i} needs an id and conversations whose first turn has a text "
                            f"value, as llava_test_CQM-A.json's do")
        q = dict(question_id=item["id"], text=turns[0]["value"].replace("<image>", "").strip() + "\n" + SQA_SUFFIX)
        if "image" in item:
            q["image"] = item["image"]
        lines.append(json.dumps(q) + "\n")
    write_new(args.dst, lambda f: f.writelines(lines))
    print(f"questions: {len(items)}")


SQA_SUFFIX = "Answer with the option's letter from the given choices directly."


# ---------------------------------------------------------------------------------------
# SEED-Bench: the answer letter, exactly, on the image questions

def run_seed(args):
    """scripts/convert_seed_for_submission.py: an answer is right when its text is the question's answer
    letter exactly; accuracy per question type and over the image questions (its 'image accuracy', the
    SEED figure of LLaVA-HR's model zoo). An unanswered question counts as wrong, as there. Ids match as
    strings (the release looks an answer up by the int of SEED's id); answers to video questions are
    counted but not scored."""
    data = read_json(args.annotations, "SEED-Bench annotations",
                     "; SEED-Bench's annotations are one JSON object, SEED-Bench.json (not LLaVA's llava-seed-bench.jsonl)")
    names = {i: name for name, i in need(data, "question_type", args.annotations, "the file", dict).items()}
    questions = need(data, "questions", args.annotations, "the file", list)
    image = []
    for q in questions:
        qid = need(q, "question_id", args.annotations, "a question", (str, int))
        if need(q, "data_type", args.annotations, f"question {qid!r}", str) == "image":
            if need(q, "question_type_id", args.annotations, f"question {qid!r}", int) not in names:
                raise EvalError(f"{args.annotations}: question {qid!r} has a question_type_id that 'question_type' "
                                f"does not name; is this the right file?")
            need(q, "answer", args.annotations, f"question {qid!r}", str)
            image.append(q)
    answers = by_key(args.answers, read_jsonl(args.answers, "answer", ANSWER_KEYS), lambda a: str(a["question_id"]))
    by_id = {str(q["question_id"]): q for q in questions}
    for qid, (n, a) in answers.items():
        if qid not in by_id:
            raise unknown(args.answers, n, qid, args.annotations)
        # LLaVA's llava-seed-bench.jsonl asks the question, then its options and the letter instruction
        question = words(need(by_id[qid], "question", args.annotations, f"question {qid!r}", str))
        if not opens(a["prompt"], question):
            raise another_question(args.answers, n, a, args.annotations, question, "LLaVA's llava-seed-bench.jsonl")
    count, correct, answered = defaultdict(int), defaultdict(int), 0
    for q in image:
        a = answers.get(str(q["question_id"]))
        count[q["question_type_id"]] += 1
        correct[q["question_type_id"]] += a is not None and a[1]["text"] == q["answer"]
        answered += a is not None
    report(len(image), answered, len(image) - answered, "they count as wrong, as the release scores them")
    if len(answers) > answered:
        print(f"warning: {len(answers) - answered} answers to SEED's video questions are not scored (the image "
              f"questions are)", file=sys.stderr)
    for t in sorted(count):  # the release's order and rounding: "<type>: xx.xx%", then "image accuracy: xx.xx%"
        print(f"{names[t]}: {correct[t] / count[t] * 100:.2f}")
    if image:
        print(f"image_accuracy: {sum(correct.values()) / len(image) * 100:.2f}")


# ---------------------------------------------------------------------------------------
# MMBench: the question file generate.py reads, made from the benchmark's .tsv, and the upload
# .xlsx (llava/eval/model_vqa_mmbench.py, scripts/convert_mmbench_for_submission.py)

MMB_OPTIONS = ["A", "B", "C", "D"]  # model_vqa_mmbench.py's all_options
MMB_SUFFIX = {"en": "Answer with the option's letter from the given choices directly.",  # --single-pred-prompt
              "cn": "请直接回答选项字母。"}  # with --lang cn
# the cells pandas.read_table (the release's reader) takes for NaN: its default na_values
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
MMB_DROPPED = ["hint", "category", "source", "image", "comment", "l2-category"]  # not in the upload
MMB_IMAGE_TYPES = [(b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
                   (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif")]


def mmb_none(cell):
    """model_vqa_mmbench.py's is_none on what pandas reads: NaN, or 'nan' / 'none' in any case."""
    return cell in PANDAS_NA or cell.lower() in ("nan", "none")


def read_mmbench(path, columns):
    """(header, [(line, {column: cell})]) of an MMBench .tsv; every row has the header's cells, an
    integer index (the answers' question_id), seen once."""
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # a cell holds a whole base64 image
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header is None or not set(columns) <= set(header):
                lacks = [c for c in columns if c not in (header or [])]
                raise EvalError(f"{path}:1: an MMBench .tsv has the columns {', '.join(columns)}; this one lacks "
                                f"{', '.join(lacks)}; is this the right file?")
            rows, seen = [], {}
            while True:
                line = reader.line_num + 1
                cells = next(reader, None)
                if cells is None:
                    break
                if not cells:
                    continue  # a blank line (pandas skips them)
                if len(cells) != len(header):
                    raise EvalError(f"{path}:{line}: {len(cells)} tab-separated cells where the header has "
                                    f"{len(header)}; is the file cut short or edited?")
                row = dict(zip(header, cells))
                if not re.fullmatch(r"-?\d+", row["index"].strip()):
                    raise EvalError(f"{path}:{line}: index {row['index']!r:.40} is not an integer; is this the "
                                    f"right file?")
                row["index"] = int(row["index"])
                if row["index"] in seen:
                    raise EvalError(f"{path}:{line}: index {row['index']} is also on line {seen[row['index']]}; "
                                    f"each question needs its own")
                seen[row["index"]] = line
                rows.append((line, row))
    except OSError as e:
        raise EvalError(f"{path}: cannot read the MMBench questions ({e.strerror})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: the MMBench questions are not UTF-8 text; is this the right file?") from None
    except csv.Error as e:
        raise EvalError(f"{path}:{reader.line_num}: not a tab-separated line ({e})") from None
    return header, rows


def mmb_options(row):
    """get_options: the option texts from A on, up to the first empty one ('nan')."""
    options = []
    for c in MMB_OPTIONS:
        if mmb_none(row[c]):
            break
        options.append(row[c])
    return options


def mmb_question(row, rnd=0):
    """model_vqa_mmbench.py's cur_prompt for round rnd (its options rotated rnd places, lettered
    from A again): the hint (unless empty) and the question, then 'A. option' lines."""
    options = mmb_options(row)
    options = options[rnd:] + options[:rnd]
    question = row["question"]
    if not mmb_none(row["hint"]):
        question = row["hint"] + "\n" + question
    for c, option in zip(MMB_OPTIONS, options):
        question = question + "\n" + c + ". " + option
    return question


def mmb_image(path, line, cell):
    """(bytes, extension) of a row's base64 image, as the release decodes it (base64.b64decode)."""
    try:
        data = base64.b64decode(cell)
    except (binascii.Error, ValueError) as e:
        raise EvalError(f"{path}:{line}: the image cell is not base64 ({e})") from None
    for magic, ext in MMB_IMAGE_TYPES:
        if data.startswith(magic):
            return data, ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return data, "webp"
    raise EvalError(f"{path}:{line}: the image cell decodes to no PNG, JPEG, GIF, BMP, TIFF or WebP image")


def run_mmbench_questions(args):
    """mmbench_dev_20230712.tsv -> the question jsonl generate.py reads, and the images. Each text is
    model_vqa_mmbench.py's qs without its '<image>\\n' (generate.py adds it): the hint, the question,
    the options, then (--single-pred-prompt, as LLaVA-1.5's scripts/v1_5/eval/mmbench.sh runs it)
    the letter instruction. question_id is the TSV's index, as in the release's answers; with
    --all-rounds each option rotation is one more line with that id, told apart by its text."""
    new_output(args.dst, "output", {"source": args.src})
    _, rows = read_mmbench(args.src, ["index", "question", "hint", "image"] + MMB_OPTIONS)
    try:
        os.makedirs(args.image_folder, exist_ok=True)
    except OSError as e:
        raise EvalError(f"{args.image_folder}: cannot make the image folder ({e.strerror})") from None
    suffix = "" if args.no_single_pred_prompt else "\n" + MMB_SUFFIX[args.lang]
    lines, written = [], 0
    for line, row in rows:
        data, ext = mmb_image(args.src, line, row["image"])
        name = f"{row['index']}.{ext}"
        target = os.path.join(args.image_folder, name)
        if os.path.exists(target):
            try:
                with open(target, "rb") as f:
                    same = f.read() == data
            except OSError as e:  # a folder of that name, say
                raise EvalError(f"{target} exists and cannot be read ({e.strerror}); use an empty "
                                f"--image-folder") from None
            if not same:
                raise EvalError(f"{target} exists and is another image than line {line} of {args.src} holds; "
                                f"use an empty --image-folder")
        else:
            write_new(target, lambda f: f.write(data), "wb")
            written += 1
        rounds = len(mmb_options(row)) if args.all_rounds else 1  # the release: no options, no round
        for rnd in range(rounds):
            lines.append(json.dumps(dict(question_id=row["index"], text=mmb_question(row, rnd) + suffix,
                                         image=name)) + "\n")
    write_new(args.dst, lambda f: f.writelines(lines))
    print(f"questions: {len(lines)}")
    print(f"images_written: {written}")


def xlsx_column(i):
    """0 -> A, 25 -> Z, 26 -> AA."""
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(ord("A") + r) + name
    return name


# what no XML cell can hold: control characters (openpyxl, the release's writer, refuses them: its
# conversion stops there) and lone surrogates (not UTF-8). Left out, and counted; the rest is written
# as openpyxl writes it (a literal "_x0041_" as it is, a CR raw), so pandas reads back the release's text
XLSX_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xlsx_cell(ref, value):
    if value is None:
        return ""
    if isinstance(value, int):
        return f'<c r="{ref}"><v>{value}</v></c>'
    return f'<c r="{ref}" t="inlineStr"><is><t xml:space="preserve">{escape(value)}</t></is></c>'


def write_xlsx(path, rows):
    """A one-sheet .xlsx ('Sheet1', as pandas names it) of rows (lists of str, int or None: empty)."""
    dropped = sum(len(XLSX_ILLEGAL.findall(v)) for row in rows for v in row if isinstance(v, str))
    if dropped:
        print(f"warning: {path}: {dropped} control characters or lone surrogates left out (no .xlsx cell holds "
              f"them; the release's conversion stops at the first)", file=sys.stderr)
    rows = [[XLSX_ILLEGAL.sub("", v) if isinstance(v, str) else v for v in row] for row in rows]
    xml = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
    pkg = "http://schemas.openxmlformats.org/package/2006/relationships"
    sheet = "".join(f'<row r="{r}">' + "".join(xlsx_cell(f"{xlsx_column(c)}{r}", v) for c, v in enumerate(row))
                    + "</row>" for r, row in enumerate(rows, 1))
    parts = {
        "[Content_Types].xml": '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>',
        "_rels/.rels": f'<Relationships xmlns="{pkg}"><Relationship Id="rId1" Type="{rel}/officeDocument" '
        f'Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{main}" xmlns:r="{rel}"><sheets><sheet name="Sheet1" sheetId="1" '
        f'r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{pkg}"><Relationship Id="rId1" Type="{rel}/worksheet" '
        f'Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{main}"><sheetData>{sheet}</sheetData></worksheet>',
    }
    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in parts.items():
                z.writestr(name, xml + text)
    write_new(path, write, "wb")


def mmb_round(args, n, a, row, seen):
    """The round (option rotation) an answer's prompt is, or one line saying it is none of them. The
    prompt may carry a --single-pred-prompt instruction (generate.py's prompts) or not (the release's)."""
    prompt = a["prompt"]
    for suffix in MMB_SUFFIX.values():
        prompt = prompt.removesuffix("\n" + suffix)
    rounds = [rnd for rnd in range(max(1, len(mmb_options(row)))) if prompt == mmb_question(row, rnd)]
    if rounds:  # options alike make rotations alike: the first not yet answered
        return next((rnd for rnd in rounds if (row["index"], rnd) not in seen), rounds[0])
    raise another_question(args.answers, n, a, args.questions, mmb_question(row),
                           f"the file eval.py mmbench-questions makes of {args.questions}")


def run_mmbench(args):
    """scripts/convert_mmbench_for_submission.py's upload (--submission): the .tsv without its hint,
    category, source, image, comment and l2-category columns, a 'prediction' column inserted as the
    7th, holding each index's answer text (empty where unanswered). The MMBench server scores it, by
    circular evaluation (a question counts only if every rotation of its options is answered right).
    Where the .tsv has an 'answer' column (dev), `accuracy:` is a local single-pass check: the share
    of questions whose answer text is exactly the right letter, an unanswered one wrong; it is not
    the official figure. Answers to the rotated rounds (--all-rounds) are not scored or uploaded
    (said on stderr): the upload holds each question's unrotated answer, as the release's
    mmbench.sh, run without --all-rounds, makes it."""
    header, rows = read_mmbench(args.questions, ["index", "question", "hint"] + MMB_OPTIONS
                                + (MMB_DROPPED if args.submission else []))
    if not args.submission and "answer" not in header:
        raise EvalError(f"{args.questions}: no 'answer' column (a test split?): nothing to score here; give "
                        f"--submission to write the upload file for the MMBench server")
    if args.submission:
        new_output(args.submission, "--submission", {"--answers": args.answers, "--questions": args.questions})
    by_index = {row["index"]: row for _, row in rows}
    known = {str(i): i for i in by_index}
    preds, seen, other_rounds = {}, {}, 0
    for n, a in read_jsonl(args.answers, "answer", ANSWER_KEYS):
        index = known.get(str(a["question_id"]))
        if index is None:
            raise unknown(args.answers, n, a["question_id"], args.questions)
        rnd = mmb_round(args, n, a, by_index[index], seen)
        if (index, rnd) in seen:
            raise EvalError(f"{args.answers}:{n}: question {a['question_id']!r} (round {rnd}) was already answered "
                            f"on line {seen[index, rnd]}; keep one answer per question")
        seen[index, rnd] = n
        if rnd == 0:
            preds[index] = a["text"]
        else:
            other_rounds += 1
    if other_rounds:
        print(f"warning: {other_rounds} answers to rotated options (--all-rounds) are not scored or uploaded; "
              f"each question's unrotated answer is", file=sys.stderr)
    if args.submission:
        keep = [c for c in header if c not in MMB_DROPPED]
        columns = keep[:6] + ["prediction"] + keep[6:]  # cur_df.insert(6, 'prediction', None)
        # a column of integers (and empty cells) pandas reads as numbers, and writes as number cells
        numeric = {c for c in keep if c != "index"
                   and all(re.fullmatch(r"-?\d+", row[c]) or row[c] in PANDAS_NA for _, row in rows)}
        out = [columns]
        for _, row in rows:
            cells = {c: None if row[c] in PANDAS_NA else int(row[c]) if c in numeric else row[c] for c in keep}
            cells["index"] = row["index"]
            cells["prediction"] = preds.get(row["index"])
            out.append([cells[c] for c in columns])
        write_xlsx(args.submission, out)
    report(len(rows), len(preds), len(rows) - len(preds),
           "they count as wrong, as the server scores an empty prediction")
    if args.submission:
        print(f"submission: {args.submission}")
    if "answer" in header:
        scored = [row for _, row in rows if not mmb_none(row["answer"])]
        correct = sum(preds.get(row["index"]) == row["answer"] for row in scored)
        print(f"correct: {correct}")
        if scored:
            print(f"accuracy: {correct / len(scored) * 100:.2f}")


# ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = failures.Parser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("textvqa", help="val accuracy (VQA's soft accuracy, LLaVA's answer processing)")
    s.add_argument("--annotations", required=True, help="TextVQA_0.5.1_val.json")
    s = sub.add_parser("vqav2", help="val accuracy by the VQA tool's rule (--annotations) or the test-dev "
                                      "upload (--questions, --submission)")
    s.add_argument("--annotations", help="v2_mscoco_val2014_annotations.json")
    s.add_argument("--questions", help="llava_vqav2_mscoco_test2015.jsonl (all of test2015)")
    s.add_argument("--submission", help="the upload file to write")
    s = sub.add_parser("vizwiz", help="the test upload file (scored by the VizWiz server)")
    s.add_argument("--questions", required=True, help="llava_test.jsonl")
    s.add_argument("--submission", required=True, help="the upload file to write")
    s = sub.add_parser("gqa", help="testdev-balanced accuracy")
    s.add_argument("--questions", required=True, help="testdev_balanced_questions.json")
    s = sub.add_parser("pope", help="accuracy, precision, recall, F1 and yes-ratio per category")
    s.add_argument("--questions", required=True, help="llava_pope_test.jsonl")
    s.add_argument("--annotation-dir", required=True, help="POPE's output/coco/ (coco_pope_<category>.json)")
    s = sub.add_parser("mme", help="perception and cognition scores (accuracy + accuracy+ per task)")
    s.add_argument("--mme-dir", required=True, help="MME_Benchmark_release_version/")
    s = sub.add_parser("scienceqa", help="accuracy on the test split, image questions too (IMG)")
    s.add_argument("--base-dir", required=True, help="the folder holding problems.json and pid_splits.json")
    s.add_argument("--split", default="test")
    s.add_argument("--letter-rule", choices=["llava", "llava-hr"], default="llava",
                   help="how the option letter is read (see sqa_letter); llava: the published numbers' rule")
    s = sub.add_parser("seed", help="SEED-Bench accuracy per question type and on the image questions")
    s.add_argument("--annotations", required=True, help="SEED-Bench.json")
    s = sub.add_parser("mmbench", help="the MMBench upload .xlsx (--submission); on dev, a single-pass accuracy")
    s.add_argument("--questions", required=True, help="mmbench_dev_20230712.tsv")
    s.add_argument("--submission", help="the upload .xlsx to write")
    for name in ("textvqa", "vqav2", "vizwiz", "gqa", "pope", "mme", "scienceqa", "seed", "mmbench"):
        sub.choices[name].add_argument("--answers", required=True, help="answer .jsonl (generate.py's)")
    s = sub.add_parser("scienceqa-questions", help="convert llava_test_CQM-A.json for generate.py")
    s.add_argument("src")
    s.add_argument("dst")
    s = sub.add_parser("mmbench-questions", help="convert an MMBench .tsv for generate.py (and write its images)")
    s.add_argument("src", help="mmbench_dev_20230712.tsv")
    s.add_argument("dst", help="the question .jsonl to write")
    s.add_argument("--image-folder", required=True, help="where the images go (generate.py's --image-folder)")
    s.add_argument("--all-rounds", action="store_true", help="also ask each question with its options rotated")
    s.add_argument("--lang", choices=["en", "cn"], default="en", help="the instruction's language (cn: MMBench-CN)")
    s.add_argument("--no-single-pred-prompt", action="store_true",
                   help="leave the letter instruction out (LLaVA-HR's scripts/v1_5/eval_full/mmbench.sh does)")
    args = p.parse_args(argv)
    if args.bench == "vqav2" and bool(args.annotations) == bool(args.questions or args.submission):
        p.error("vqav2: give --annotations (val accuracy) or --questions with --submission (test-dev upload)")
    if args.bench == "vqav2" and bool(args.questions) != bool(args.submission):
        p.error("vqav2: --questions and --submission go together")
    return args


def interrupted(args):
    """Ctrl-C's line: what this run has written. write_new puts each file in place whole, by a rename, and
    is given only paths that did not exist: one there now is this run's, and complete."""
    done = [path for path in outputs if os.path.exists(path)]
    out = getattr(args, "submission", None) or getattr(args, "dst", None)
    if out in done:  # the last file written: it stopped as it was saying so
        return f"interrupted: {out} was written, whole" + (" (and its images)" if len(done) > 1 else "")
    if done:  # mmbench-questions writes the images first, and a rerun keeps those already there
        return (f"interrupted: {args.dst} was not written; the images written into {args.image_folder} "
                f"({len(done)}) are whole and kept: the same command again writes the rest")
    return "interrupted: nothing was written"


def main(argv=None):
    run = {"textvqa": run_textvqa, "vqav2": run_vqav2, "vizwiz": run_vizwiz, "gqa": run_gqa, "pope": run_pope,
           "mme": run_mme, "scienceqa": run_scienceqa, "scienceqa-questions": run_scienceqa_questions,
           "seed": run_seed, "mmbench": run_mmbench, "mmbench-questions": run_mmbench_questions}
    outputs.clear()  # (the tests run main more than once in one process)
    args = None
    try:
        args = parse_args(argv)
        failures.handling()
        run[args.bench](args)
    except (EvalError, OSError) as e:  # OSError: a file problem no check above foresaw, still one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (failures.catch_signals); 130 or 143, as a shell expects
        return failures.say_interrupted(type(e), interrupted(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
