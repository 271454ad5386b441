"""Answer questions about images with LLaVA-HR: one prompt, an interactive chat, or a batch eval.

    python generate.py --model DIR --image x.jpg --prompt "What is written on the sign?"
    python generate.py --model DIR --image x.jpg                      # chat on stdin
    python generate.py --model DIR --questions q.jsonl --answers a.jsonl --image-folder imgs/
    python generate.py --model DIR --image x.jpg --trace              # pixels to the LLM's input

Generation is the gpt-fast loop: `prefill` runs the whole prompt (visual tokens spliced in at the
<image> placeholder, rows left-padded) into a preallocated KV cache, then `decode_n_tokens` feeds
one token per row per step through the LLM alone (`model.llm.decode`). --compile compiles only the
decode step: prefill runs once per prompt with a new shape, decode hundreds of times with one.
Temperature 0 is argmax (the release's eval scripts: greedy, one beam, 128 new tokens). Batch files use
LLaVA's model_vqa formats, so its evaluation scripts read our answers unchanged.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
import uuid
from collections import Counter

import failures

if __name__ == "__main__":  # before torch loads (a second or two): Ctrl-C and SIGTERM are one line from here
    failures.catch_signals("--debug" in sys.argv)

import torch
from PIL import Image

import data
import kernels
import llama
import lora
import mra
import release
from mra import IMAGE_TOKEN
from questions import answers_lock, read_questions, settings
from tokenizer import not_a_character


class ContextError(ValueError):
    """A prompt that cannot fit in the LLM's context."""


class NonFiniteError(ValueError):
    """A next-token score that is NaN or infinite was picked: no answer can be read from such scores."""


# ---------------------------------------------------------------------------------------
# Sampling: pure functions of the logits

def warp(logits, temperature, top_k=0, top_p=1.0):
    """HF generate's sampling warpers, in its order and arithmetic (TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper): logits (B, V) / temperature, then every token below the
    k-th largest, then every token outside the nucleus (the smallest set of most likely tokens
    whose probability reaches top_p; always at least one), set to -inf."""
    logits = logits.float()
    scores = logits / temperature
    if not torch.isfinite(scores).all():  # a tiny temperature overflowed: shifted first, the argmax stays 0
        scores = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # summed from the least likely, as HF sums
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return scores


def sample(logits, temperature=0.0, top_p=1.0, generator=None, top_k=0):
    """Next token per row (B,) from logits (B, V): argmax at temperature 0, else a draw from the
    softmax of the warped logits (HF's do_sample; its default top_k is 50, generate.py's --top-k)."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that logits / it is argmax anyway (or
        return logits.argmax(-1)  # NaN: below 1e-45 float32 holds it as 0, and 0 / 0 is no probability)
    probs = warp(logits, temperature, top_k, top_p).softmax(-1)
    # a NaN or infinite score makes its row's probabilities all NaN, which multinomial refuses (on CUDA,
    # as a device assert): such a row is given argmax's pick, a non-finite score for decode_n_tokens to report
    nan = probs[:, 0].isnan()
    if nan.any():  # (a host sync, as warp's check is)
        drawn = torch.multinomial(probs.masked_fill_(nan[:, None], 1), 1, generator=generator).squeeze(-1)
        return torch.where(nan, logits.argmax(-1), drawn)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------
# Prefill and decode over the model's static KV cache

def prefill(model, prompts, images, pad_id, max_new_tokens, reuse_cache=False):
    """prompts: lists of ids (IMAGE_TOKEN placeholders included), any lengths, run as one padded batch
    by LlavaHR.prefill. Returns the last position's logits (B, V) and a cache with room for at least
    max_new_tokens more per row: its length is rounded up to a multiple of CACHE_ROUND (kernels.py; within the
    context), so prompts of similar lengths share one cache shape and so one compiled decode step."""
    device = model.projector[0].weight.device
    used = max(slots(model, p) for p in prompts)
    rounded = -(-(used + max_new_tokens) // kernels.CACHE_ROUND) * kernels.CACHE_ROUND
    max_new_tokens = max(max_new_tokens, min(rounded, model.cfg.llm.max_seq_len) - used)
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)  # (B, T), right-padded here;
    pad_mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # model.prefill re-pads on the left
    for b, p in enumerate(prompts):
        ids[b, :len(p)], pad_mask[b, :len(p)] = torch.tensor(p), True
    return model.prefill(ids.to(device), images, pad_mask.to(device), max_new_tokens, reuse_cache)


def is_eager(step):
    """Llama.decode itself (or None, its stand-in), not a compiled step."""
    return step is None or getattr(step, "__func__", None) is llama.Llama.decode


@torch.no_grad()
def decode_n_tokens(step, logits, cache, max_new_tokens, pick, eos_id, on_token=None, ahead=None):
    """Sample, feed back, repeat; a row stops at EOS (not returned) or max_new_tokens.
    step: model.llm.decode (maybe compiled), tokens (B,) -> logits (B, V); pick: logits -> tokens.
    ahead (default: a compiled step on a GPU): from the second step on, queue each step before reading
    the tokens it is fed, so the GPU is not idle while the host reads them; one step more then runs
    after the last EOS. (An eager step reads cache.pos first, a sync anyway; the CPU has no queue.)"""
    out = [[] for _ in range(logits.shape[0])]
    done = [False] * len(out)
    if ahead is None:
        ahead = logits.is_cuda and not is_eager(step)
    with contextlib.ExitStack() as steady:
        for i in range(max_new_tokens):
            tokens = pick(logits)
            # NaN or infinite scores (float16 overflowing, weights holding NaN) make argmax, and sample for
            # such a row, pick a non-finite score: read as -1 with the tokens (a whole row's check cost more)
            bad = ~logits.gather(-1, tokens[:, None]).squeeze(-1).isfinite()
            more = i < max_new_tokens - 1
            early = ahead and more and i > 0  # not the first step: it compiles, and the first token shows now
            if early:
                logits = step(tokens, cache)
            for b, t in enumerate(torch.where(bad, -1, tokens).tolist()):  # the one host sync per step
                if t == -1 and not done[b]:
                    e = NonFiniteError(f"the model's scores for new token {i + 1} are NaN or infinite: " + (
                        "an activation overflowed float16's range; try --dtype bfloat16 (or float32)"
                        if logits.dtype == torch.float16 else "do the weights hold NaN or inf?"))
                    e.row = b  # (of the batch)
                    raise e
                done[b] = done[b] or t == eos_id
                if not done[b]:
                    out[b].append(t)
                    if on_token is not None:
                        on_token(b, t)
            if all(done) or not more:
                break
            if not early:  # finished rows keep decoding (their tokens are discarded): every row shares one slot
                logits = step(tokens, cache)
            if i == 0:
                # later steps get this one's inputs (one cache, tokens of one shape), so a compiled step
                # skips dynamo's guards, which then catch nothing: test_compiled_decode_... checks they hold
                steady.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    return out


@torch.no_grad()
def generate(model, prompts, images=None, *, max_new_tokens=128, pick=sample, eos_id=2, pad_id=0,
             step=None, on_token=None, reuse_cache=None):
    """Batched generation: generated ids (EOS excluded) for each prompt. images: (M, 3, R, R),
    one per placeholder in row order (rows without an image take none). reuse_cache (default: for a
    compiled step on CUDA, whose graph is recorded for the cache's addresses): the last call's cache
    of this shape, emptied (Llama.new_cache), rather than a new one."""
    if reuse_cache is None:  # (on the CPU it would keep a compiled step's layout, slower to prefill into)
        reuse_cache = not is_eager(step) and model.projector[0].weight.is_cuda
    logits, cache = prefill(model, prompts, images, pad_id, max_new_tokens, reuse_cache)
    return decode_n_tokens(step or model.llm.decode, logits, cache, max_new_tokens, pick, eos_id, on_token)


def slots(model, ids):
    """KV-cache slots a list of ids takes: each placeholder becomes N visual tokens."""
    return mra.llm_positions(len(ids), ids.count(IMAGE_TOKEN), model.cfg)


def check_length(model, ids, max_new_tokens, what="prompt", fix="shorten it or lower --max-new-tokens"):
    need, limit = slots(model, ids) + max_new_tokens, model.cfg.llm.max_seq_len
    if need > limit:
        n_img = ids.count(IMAGE_TOKEN)
        raise ContextError(f"{what} too long: {len(ids) - n_img} text tokens + {n_img * model.cfg.visual_tokens} "
                           f"visual tokens + {max_new_tokens} new tokens = {need} > the context of {limit} "
                           f"({fix})")


# ---------------------------------------------------------------------------------------
# Prompts and streaming

def without_image(text):
    """text with no "<image>" left: removed until none is (once, "<imag<image>e>" would make one)."""
    while "<image>" in text:
        text = text.replace("<image>", "")
    return text


def human_turn(text, has_image):
    # LLaVA's model_vqa: the question follows the image placeholder and a newline. A user's own
    # "<image>" is dropped: only the image we were given may become a placeholder.
    text = without_image(text)
    return ("human", "<image>\n" + text if has_image else text)


def prompt_ids(tok, turns, conv_mode):
    return data.tokenize(tok, data.build_prompt(turns + [("gpt", None)], conv_mode, move_image=False))


def streamer(tok, file):
    """on_token callback printing row 0's text as it grows, decoded from all its ids so far:
    sentencepiece spaces and multi-byte characters split over byte pieces come out right. What is
    printed is the answer stripped, as the answers file and the release print it: whitespace at its
    end is held back until more text follows it."""
    ids, shown = [], [""]

    def on_token(b, t):
        if b == 0:
            ids.append(t)
            text = tok.decode(ids).strip()
            if not text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                print(text[len(shown[0]):], end="", file=file, flush=True)
                shown[0] = text

    def finish():  # whatever is still held back (a character that never completed)
        print(tok.decode(ids).strip()[len(shown[0]):], file=file, flush=True)
    return on_token, finish


def short_id():
    """A shortuuid-style answer_id: a random uuid4 in base 57, 22 characters (zero-padded)."""
    alphabet, n, s = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz", uuid.uuid4().int, ""
    for _ in range(22):  # 57^22 > 2^128
        n, r = divmod(n, 57)
        s += alphabet[r]
    return s


def log(*a, **kw):
    print(*a, file=sys.stderr, flush=True, **kw)


# ---------------------------------------------------------------------------------------
# The three modes

def answer_one(model, tok, image, args, pick, step):
    ids = prompt_ids(tok, [human_turn(args.prompt, image is not None)], args.conv_mode)
    check_length(model, ids, args.max_new_tokens)
    show, finish = streamer(tok, sys.stdout)
    times = [time.perf_counter()]

    def on_token(b, t):
        times.append(time.perf_counter())
        show(b, t)
    generate(model, [ids], None if image is None else image[None], max_new_tokens=args.max_new_tokens,
             pick=pick, eos_id=tok.eos_id, pad_id=tok.pad_id, step=step, on_token=on_token)
    finish()
    # the first token comes from prefill, the rest one step each; --compile's first step also compiles
    first = 2 if args.compile else 1
    if len(times) > first + 1:
        rate = (len(times) - 1 - first) / (times[-1] - times[first])
        log(f"time to first token {times[1] - times[0]:.2f} s, then {rate:.2f} tokens/s ({len(times) - 1} tokens"
            f"{', the compiling step not counted' if args.compile else ''})")


def common_prefix(a, b):
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def chat(model, tok, image, args, pick, step):
    """Multi-turn chat over one KV cache. Each turn's prompt is the whole conversation tokenised afresh
    (what a new run would see); only what the cache lacks is fed, usually "</s>USER: ... ASSISTANT:"
    after the answer as generated. Where retokenising splits the answer differently, the static cache
    is rolled back to the common prefix (only its write position moves)."""
    turns, cache, cached = [], None, []  # cached: the ids whose keys/values the cache holds
    if hasattr(sys.stdin, "reconfigure"):  # a byte that is not UTF-8 then spoils its own line, not the read
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        log("USER: ", end="")
        try:
            line = sys.stdin.readline() if sys.stdin is not None else ""  # None: started with stdin closed
        except UnicodeDecodeError:
            log("error: that line is not UTF-8 text; type it again")
            continue
        if not line:  # the end of the input (Ctrl-D, a file's end): the prompt's line ends too
            return log()
        if line.strip() == "exit":
            return
        if not line.strip():
            continue
        if bad := not_a_character(line):
            log(f"error: that line holds {bad!r}, no character (a byte that is not UTF-8?); type it again")
            continue
        if turns and args.conv_mode == "plain":
            log("error: --conv-mode plain takes one image and its caption, no second turn; type exit (a "
                "conversation needs --conv-mode vicuna_v1)")
            continue
        turns.append(human_turn(line.strip(), image is not None and not turns))
        ids = prompt_ids(tok, turns, args.conv_mode)
        try:
            # what came before cannot be shortened, nor --max-new-tokens changed in a running chat
            check_length(model, ids, args.max_new_tokens, "conversation", "type a shorter turn, or exit and start a "
                         "new conversation; a lower --max-new-tokens next time")
        except ContextError as e:  # this turn is refused; the conversation so far goes on
            turns.pop()
            log(f"error: {e}")
            continue
        keep = min(common_prefix(cached, ids), len(ids) - 1)  # feed at least one token for logits
        with torch.no_grad():
            if cache is None or IMAGE_TOKEN in ids[keep:]:
                # first turn: a cache for the whole context, so later turns only append
                logits, cache = prefill(model, [ids], None if image is None else image[None], tok.pad_id,
                                        model.cfg.llm.max_seq_len - slots(model, ids))
            else:
                cache.rewind(slots(model, ids[:keep]))
                new = torch.tensor([ids[keep:]], device=cache.pos.device)
                logits = model.llm(new, cache=cache)[:, -1]
        log("ASSISTANT: ", end="")
        on_token, finish = streamer(tok, sys.stdout)
        out = decode_n_tokens(step, logits, cache, args.max_new_tokens, pick, tok.eos_id, on_token)[0]
        finish()
        turns.append(("gpt", without_image(tok.decode(out)).strip()))  # the model's "<image>" is no image either
        # the cache holds the prompt and each token fed back (the last sampled too, if an EOS stopped a
        # step queued ahead): count from its slots
        cached = (ids + out + [tok.eos_id])[:int(cache.pos) - slots(model, ids) + len(ids)]


def answer_file(model, tok, args, pick, step, questions, answered, metadata):
    """LLaVA's model_vqa: {question_id, image, text} lines in, {question_id, prompt, text,
    answer_id, model_id, metadata} lines out; questions already answered are skipped (resume)."""
    from tqdm import tqdm
    seen, todo = Counter(), []  # a pair asked k times and answered j times: its first j askings are done
    for n, q in questions:
        key = (q["question_id"], q["text"])
        seen[key] += 1
        if seen[key] > answered[key]:
            todo.append((n, q))
    if answered:
        log(f"resuming: {len(questions) - len(todo)} of {len(questions)} questions already answered")
    model_id = os.path.basename(os.path.normpath(args.model))
    R, mode = model.cfg.image_size, model.cfg.image_aspect_ratio
    device = model.projector[0].weight.device
    skipped = []
    # unbuffered: each answer reaches the file as it is made, and a failed write is not tried again at close
    with open(args.answers, "ab", buffering=0) as out, tqdm(total=len(questions), initial=len(questions) - len(todo),
                                                            file=sys.stderr, unit="q") as bar:
        for i in range(0, len(todo), args.batch_size):
            batch, images = [], []
            for n, q in todo[i:i + args.batch_size]:
                where = f"{args.questions} line {n} (question_id {q['question_id']!r})"
                ids = prompt_ids(tok, [human_turn(q["text"], bool(q.get("image")))], args.conv_mode)
                try:
                    check_length(model, ids, args.max_new_tokens, "the question")
                    if q.get("image"):  # its existence was checked before the model loaded; decoding is now
                        image = data.load_image(os.path.join(args.image_folder or "", q["image"]))
                        images.append(data.preprocess(image, R, mode).to(device))
                except ContextError as e:  # one question can't stop a benchmark: skipped, said, counted
                    bar.write(f"skipped {where}: {e}", file=sys.stderr)
                    skipped.append(n)
                    continue
                except data.DataError as e:
                    raise data.DataError(f"{where}: {e}; the answers so far are kept: fix or drop that "
                                         f"line and run again to go on") from None
                batch.append((q, ids, n))
            if batch:
                try:
                    outs = generate(model, [ids for _, ids, _ in batch], torch.stack(images) if images else None,
                                    max_new_tokens=args.max_new_tokens, pick=pick, eos_id=tok.eos_id,
                                    pad_id=tok.pad_id, step=step)
                except NonFiniteError as e:  # no answer is written for that batch, nor any after it
                    n = batch[e.row][2]
                    raise NonFiniteError(f"{args.questions} line {n}: {e}; the answers so far are kept") from None
                for (q, _, _), ids in zip(batch, outs):
                    line = json.dumps(dict(question_id=q["question_id"], prompt=q["text"], text=tok.decode(ids).strip(),
                                           answer_id=short_id(), model_id=model_id, metadata=metadata)) + "\n"
                    try:
                        write_all(out, line.encode())
                    except OSError as e:  # a full disk: a line cut short is dropped, and asked again, by a rerun
                        raise data.DataError(f"--answers {args.answers}: writing failed ({e.strerror or e}); the "
                                             f"answers before it are kept: once there is room, the same command "
                                             f"goes on") from None
            bar.update(len(todo[i:i + args.batch_size]))  # the skipped ones too
    if skipped and len(skipped) == len(todo):  # a run that answered nothing has failed
        raise ContextError(f"none of the {len(todo)} question(s) could be answered: each is too long for the context "
                           f"with --max-new-tokens {args.max_new_tokens}; lower it (or shorten them)")
    if skipped:
        log(f"{len(skipped)} question(s) skipped, too long for the context (lines {', '.join(map(str, skipped))}); "
            f"they count as missing")


def write_all(f, data):
    """All of `data` to an unbuffered file, which may take less at a time."""
    while data:
        data = data[f.write(data):]


# ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = failures.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="our checkpoint dir or a released LLaVA-HR / LLaVA-1.5 dir")
    p.add_argument("--lora", help="LoRA adapters (OUT/ckpt/lora of train.py --lora-r) to apply to --model, the base")
    p.add_argument("--model-base", help="with a LoRA release as --model (llava-v1.5-7b-lora): the LLM it was trained "
                   "on (an HF Vicuna dir), whose tokenizer is used; needs --vit")
    p.add_argument("--vit", help="with --model-base: the CLIP tower the release names (an HF dir of "
                   "openai/clip-vit-large-patch14-336), which a LoRA release does not hold")
    p.add_argument("--image", action="append", help="image file (omit for a text-only prompt); one per conversation")
    p.add_argument("--prompt", help="answer this one question and exit; without it: chat on stdin")
    p.add_argument("--questions", help="LLaVA question .jsonl ({question_id, image, text} per line)")
    p.add_argument("--answers", help="answer .jsonl to write (appended to; answered questions are skipped; a file "
                   "begun with another model or other settings is refused, see each answer's metadata)")
    p.add_argument("--image-folder", help="directory the questions' image paths are relative to")
    p.add_argument("--batch-size", type=int, default=1, help="--questions answered this many at a time (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling with --temperature > 0 (default 1: off)")
    p.add_argument("--top-k", type=int, default=50, help="with --temperature > 0, only the k most likely tokens "
                   "(default 50: HF generate's, so the release's sampling; 0: off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    p.add_argument("--conv-mode", default="vicuna_v1", choices=["vicuna_v1", "plain"],
                   help="the prompt template: vicuna_v1 (stage 2, default) or plain (a stage-1 model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default float32 on CPU (matches the reference exactly), float16 on GPU (as LLaVA)")
    p.add_argument("--quantize", choices=["int8"], help="int8: the LLM's linear weights in one byte each, quantized "
                   "while loading (half bfloat16's memory; with --dtype bfloat16 it also decodes faster on the CPU; "
                   "not yet measured on a GPU)")
    p.add_argument("--seed", type=int, help="seed for sampling (default: random)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CUDA: as a CUDA graph), once per batch size and cache length")
    p.add_argument("--trace", nargs="?", const="", metavar="PNG", help="print each step from --image's pixels to the "
                   "LLM's input, write what each path sees to PNG (default: IMAGE_NAME.paths.png here); no answer")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    if args.image and len(args.image) > 1:
        p.error("one --image per conversation (the model reads one image); for many, --questions")
    if args.image == [""]:  # an unset shell variable, --image "$IMG": not a text-only question
        p.error("--image is empty: name an image file, or drop --image")
    args.image = args.image[0] if args.image else None
    if (args.model_base is None) != (args.vit is None):
        p.error("--model-base and --vit go together: a LoRA release holds neither its LLM nor its CLIP tower")
    if args.model_base and args.lora:
        p.error("--lora (train.py's adapters on --model) and --model-base (the base of a LoRA release) exclude "
                "each other")
    if args.prompt is not None and not args.prompt.strip():
        p.error("--prompt is empty: ask a question, or drop --prompt to chat")
    if args.prompt is not None and (bad := not_a_character(args.prompt)):
        p.error(f"--prompt holds {bad!r}, no character (a byte that is not UTF-8?); "
                f"give the question as UTF-8 text")
    if not args.questions and (args.image_folder or args.batch_size != 1):
        p.error("--image-folder and --batch-size go with --questions")
    if (args.questions is None) != (args.answers is None):
        p.error("--questions and --answers go together")
    if args.conv_mode == "plain" and not args.questions and not args.image:  # its one turn holds <image>
        p.error("--conv-mode plain (stage 1) captions an image: give --image, or use --conv-mode vicuna_v1")
    if args.trace is not None and not args.image:
        p.error("--trace needs --image")
    if args.trace == "":  # the picture's default name
        args.trace = os.path.splitext(os.path.basename(args.image))[0] + ".paths.png"
    if args.questions and (args.prompt or args.image):
        p.error("--questions takes its images from the file; drop --prompt/--image")
    limits = {"--max-new-tokens >= 1": args.max_new_tokens >= 1, "--batch-size >= 1": args.batch_size >= 1,
              "a finite --temperature >= 0": 0 <= args.temperature < float("inf"),
              "0 < --top-p <= 1": 0 < args.top_p <= 1,  # written so that NaN fails too
              "--top-k >= 0": args.top_k >= 0,
              "--seed from -2**63 to 2**64 - 1 (torch's range)": args.seed is None or -2**63 <= args.seed < 2**64}
    bad = [rule for rule, ok in limits.items() if not ok]
    if bad:
        p.error("need " + ", ".join(bad))
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device (cpu, cuda, cuda:1, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        p.error(f"--device {args.device}: MPS is not available here; use --device cpu")
    try:  # a device torch names but cannot compute on here (meta, xla, a GPU past the last): found now
        torch.empty(0, device=device), torch.Generator(device)
    except (RuntimeError, ImportError, AssertionError) as e:  # AssertionError: xpu in a build without it
        why = (str(e) or type(e).__name__).split(". ")[0].splitlines()[0]  # torch's first sentence of a paragraph
        p.error(f"--device {args.device}: torch cannot run the model on it here ({why}); use --device cpu")
    # the default resolved here, so an answer's metadata records the dtype that ran (questions.settings):
    # a rerun with the same dtype named, or left to the same default, resumes; another device's default does not
    args.dtype = args.dtype or ("float32" if device.type == "cpu" else "float16")
    return args


def check_inputs(args):
    """Every input checked before the model loads (minutes for a 7B); returns --image, read (or None)."""
    if not os.path.isdir(args.model):
        raise mra.CheckpointError(f"--model {args.model}: " + ("a file; " if os.path.exists(args.model) else
                                  "no such directory; ") + "a checkpoint directory is expected")
    if args.model_base:  # with --vit (parse_args): a LoRA release
        release.check_lora_flags(args.model_base, args.vit)
    elif adapters := mra.adapters_only(args.model):  # with --lora or not
        raise mra.CheckpointError(f"--model {args.model}: holds LoRA adapters only; use --model "
                                  f"{mra.lora_base(adapters)} --lora {adapters}")
    if args.questions and not os.path.isfile(args.questions):
        raise data.DataError(f"--questions {args.questions}: " + (
            "not a file (a directory, or a pipe such as <(...)?); save the questions as a .jsonl file" if
            os.path.exists(args.questions) else "no such file (a LLaVA question .jsonl is expected)"))
    if args.answers and os.path.exists(args.answers) and not os.path.isfile(args.answers):  # /dev/full: read forever
        raise data.DataError(f"--answers {args.answers}: not a file (a directory, a device?); name the .jsonl file to "
                             f"write")
    if args.answers and not os.path.isdir(os.path.dirname(os.path.abspath(args.answers))):
        raise data.DataError(f"--answers {args.answers}: its directory does not exist")
    if args.compile and torch.device(args.device).type == "cpu" and not kernels.cpp_compiler():
        raise data.DataError("--compile on a CPU needs a C++ compiler, and none was found (g++, or the one CXX "
                             "names): install one, or drop --compile")
    if args.trace:
        if os.path.exists(args.trace):
            raise data.DataError(f"--trace {args.trace}: " + ("a directory; name the picture's file in it (--trace "
                                 "DIR/OUT.png)" if os.path.isdir(args.trace) else "exists; name another picture "
                                 "(--trace OUT.png), or delete it"))
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
            raise data.DataError(f"--trace {args.trace}: its folder does not exist")
        picture = Image.registered_extensions().get(os.path.splitext(args.trace)[1].lower())
        if picture not in Image.SAVE:  # PIL writes by the name's extension
            raise data.DataError(f"--trace {args.trace}: not a picture's file name; end it in .png (or .jpg, ...)")
        try:  # a format PIL knows but cannot write an RGB picture in (.xbm, .msp): found now, not at the end
            Image.new("RGB", (2, 2)).save(io.BytesIO(), format=picture)
        except (OSError, ValueError) as e:
            raise data.DataError(f"--trace {args.trace}: cannot write the picture as {picture} ({e}); end it "
                                 f"in .png (or .jpg, ...)") from None
    try:
        return data.load_image(args.image) if args.image else None
    except data.DataError as e:
        raise data.DataError(f"--image {e}") from None


def load_model(args, tok, dtype, device):
    """--model as run: ours, a LoRA release merged into --model-base, or a run's base with --lora merged."""
    merged = (f" merged into {args.model_base}, the tower {args.vit}" if args.model_base else
              f" with the LoRA adapters {args.lora} merged in" if args.lora else "")
    log(f"loading {args.model}{merged} ({dtype}{', int8 LLM weights' if args.quantize else ''}, {device})")
    t0 = time.perf_counter()
    if args.model_base:  # a LoRA release: merged into its base LLM as it loads, the tower from --vit
        model = release.load_lora_release(args.model, args.model_base, args.vit, dtype, device, args.quantize).eval()
    elif args.lora:  # base + adapters, merged as they load (then quantized): the run's merged checkpoint
        model = lora.load(args.model, args.lora, dtype, device, quantize=args.quantize).eval()
    else:
        model = mra.load_checkpoint(args.model, dtype, device, args.quantize).eval()
    log(f"loaded in {time.perf_counter() - t0:.1f} s")
    if len(tok) > model.cfg.llm.vocab_size:
        raise mra.CheckpointError(f"{args.model_base or args.model}: tokenizer.model has {len(tok)} pieces, the LLM "
                                  f"only {model.cfg.llm.vocab_size} embeddings: they do not belong together")
    return model


def run(args, held):
    """held: an ExitStack that holds what must stay held until the run ends (the answers file's lock)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)  # parse_args resolved the default: float32 on CPU, float16 on GPU
    image = check_inputs(args)
    if args.quantize and device.type == "cpu" and dtype != torch.bfloat16:
        log(f"note: --quantize int8 in {args.dtype} on the CPU saves memory but decodes slower than {args.dtype} "
            f"weights: torch's int8 kernel is 8x slower and more than in bfloat16 (`python bench.py --only int8` "
            f"times it here); --dtype bfloat16 is the fast one")
    if args.temperature == 0 and (args.top_p != 1.0 or args.top_k != 50 or args.seed is not None):
        log("note: --top-p, --top-k and --seed shape sampling (--temperature > 0); greedy decoding (the default) "
            "ignores them")
    if args.questions:  # a second run on the same answers file is refused now, not found doubled later
        held.enter_context(answers_lock(args.answers))
        metadata = settings(args)  # each answer's; a resumed file is checked against it
        questions, answered = read_questions(args, metadata)
    if args.conv_mode == "plain":  # preprocess_plain: the human turn is the bare <image>
        log("note: --conv-mode plain prompts with the image alone (stage 1 learned to caption it): the question's "
            "text is not used")
    tok = mra.load_tokenizer(args.model_base or args.model)
    model = load_model(args, tok, dtype, device)
    if args.trace:  # pixels to the LLM's input, printed, and the picture; no answer
        import trace_image
        trace_image.trace(model, tok, image, prompt_ids(tok, [human_turn(args.prompt or "", True)], args.conv_mode))
        trace_image.write_new(trace_image.paths_picture(image, model), args.trace)
        log(f"what each path sees: {args.trace}")
        return
    # the shortest prompt this run can have (images: plain always has one), with room for --max-new-tokens
    least = slots(model, prompt_ids(tok, [human_turn("", image is not None or args.conv_mode == "plain")],
                                    args.conv_mode))
    if least >= model.cfg.llm.max_seq_len:  # no --max-new-tokens helps: "use at most" would be 0 or less
        raise ContextError(f"--model {args.model}: the shortest prompt takes {least} positions, but the LLM's "
                           f"context holds {model.cfg.llm.max_seq_len}: nothing can be answered; is its context "
                           f"length right (max_position_embeddings in config.json, llm.max_seq_len in ours)?")
    if least + args.max_new_tokens > model.cfg.llm.max_seq_len:
        raise ContextError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt: the shortest takes "
                           f"{least} of the context's {model.cfg.llm.max_seq_len} positions; use at most "
                           f"{model.cfg.llm.max_seq_len - least}")
    if image is not None:
        try:
            image = data.preprocess(image, model.cfg.image_size, model.cfg.image_aspect_ratio).to(device)
        except data.DataError as e:  # too thin to pad or resize
            raise data.DataError(f"--image {args.image}: {e}") from None
    generator = torch.Generator(device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    # a padded vocabulary (more LLM rows than tokenizer pieces): never pick a row without text
    pick = lambda logits: sample(logits[:, :len(tok)], args.temperature, args.top_p, generator,  # noqa: E731
                                 args.top_k)
    kernels.fast_products(model.llm, device, args.batch_size if args.questions else 1, args.compile)
    if device.type == "cpu":
        kernels.keep_freed_memory()
    step = kernels.compile_step(model.llm.decode, device, args.batch_size) if args.compile else model.llm.decode
    if args.compile:
        log("--compile: each new batch size or cache length compiles the step at its first call (seconds to minutes)")
    if args.questions:
        answer_file(model, tok, args, pick, step, questions, answered, metadata)
    elif args.prompt is not None:
        answer_one(model, tok, image, args, pick, step)
    else:
        chat(model, tok, image, args, pick, step)


def main(argv=None):
    args = parse_args(argv)
    failures.handling()
    try:
        with contextlib.ExitStack() as held:
            run(args, held)
    except BrokenPipeError:  # the answer's reader went away (| head -1): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (else Python's exit flush says it)
        return 128 + 13  # SIGPIPE's, as a program killed by it ends
    except (ValueError, OSError) as e:  # DataError, CheckpointError, ContextError, missing files
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM too, run as a command (failures.Terminated)
        kept = args.questions and os.path.isfile(args.answers) and os.path.getsize(args.answers)
        return failures.say_interrupted(type(e), "\ninterrupted" + (  # below a prompt, an answer or a bar
            f": the answers so far are in {args.answers}; the same command goes on from there" if kept else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
