"""A training run on disk: its --out directory (one run at a time, never overwritten unasked), its
checkpoints (written atomically; whole, or FSDP2 shards that no rank holds whole), and what --resume
checks before it continues. train.py's bookkeeping, kept apart so that train.py reads as the recipe.
"""
import atexit
import contextlib
import errno
import json
import math
import os
import shutil

try:
    import fcntl  # --out's lock (POSIX); elsewhere a run goes without it
except ImportError:
    fcntl = None
import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

import mra
from weights import write_safetensors

# -----------------------------------------------------------------------------
# checkpoints: written atomically; whole, or FSDP2 shards that no rank holds whole

def rows_of(n, world, rank):
    """Rows [start, stop) of a dim 0 of n that rank holds under FSDP2 (torch.chunk's split)."""
    size = -(-n // world)
    return min(n, rank * size), min(n, rank * size + size)


def fsync(path, tree=False):
    """Flush a file, or a directory's entries (tree: and everything under it), to the disk. A rename can
    reach the disk before the data it names: after a host crash, ckpt/ could hold empty files, and
    ckpt.old be gone already."""
    for root, _, files in os.walk(path) if tree else [(path, (), ())]:
        for p in [*(os.path.join(root, f) for f in files), root]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_shards(model, opt, path, cfg, rank, world):
    """--fsdp: a checkpoint no rank holds whole. Each weight is gathered on every rank in turn and rank 0
    streams it into model.safetensors (what generate.py and --resume load); each rank writes its rows of
    AdamW's state to optimizer-R-of-W.safetensors (load_shards reads them back for any world)."""
    state = model.state_dict()  # DTensors of the global shapes: the file's header
    full = (t.full_tensor() if isinstance(t, DTensor) else t for t in state.values())  # collectives
    if rank == 0:
        mra.save_checkpoint(None, path, state=state, cfg=cfg, tensors=full)
    else:
        for _ in full:  # each rank takes part in each gather, then drops the tensor
            pass
    names = {q: n for n, q in model.named_parameters()}
    rows = {f"{names[q]}/{k}": v.to_local() if isinstance(v, DTensor) else v  # "step" is the same on every rank
            for q, st in opt.state.items() for k, v in st.items()}
    mine = os.path.join(path, f"optimizer-{rank + 1:05d}-of-{world:05d}.safetensors")
    write_safetensors(mine, rows)
    fsync(mine)  # by its writer: rank 0 (save) flushes only what is in its own machine's cache


def load_shards(model, opt, path, saved_world, rank, world):
    """AdamW's state from save_shards' files, cut for this run's ranks whatever the saved run's were:
    each rank reads only the rows it holds. A parameter with no state (no gradient yet) gets none."""
    files = []
    for r in range(saved_world):
        f = os.path.join(path, f"optimizer-{r + 1:05d}-of-{saved_world:05d}.safetensors")
        try:
            files.append(safe_open(f, framework="pt"))
        except Exception as e:  # noqa: BLE001 -- missing (OSError) or cut short (SafetensorError)
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"error: --resume: {f}: the optimizer state the run's rank {r} saved is missing or "
                             f"unreadable ({why}); start anew from its weights with --init {path}") from None
    named = dict(model.named_parameters())
    for key in files[0].keys():  # "name/k": AdamW's state k of a parameter
        name, k = key.split("/")
        q = named[name]
        if not files[0].get_slice(key).get_shape():  # a scalar ("step"): every file holds it
            opt.state[q][k] = files[0].get_tensor(key)
            continue
        st = opt.state[q][k] = torch.zeros_like(q)  # a DTensor sharded as q is, under FSDP
        local = st.to_local() if isinstance(q, DTensor) else st
        start, stop = rows_of(q.shape[0], world, rank) if isinstance(q, DTensor) else (0, q.shape[0])
        parts = []
        for r, f in enumerate(files):  # the saved rows [a, b) of rank r that this rank holds now
            a, b = rows_of(q.shape[0], saved_world, r)
            if max(a, start) < min(b, stop):
                parts.append(f.get_slice(key)[max(a, start) - a:min(b, stop) - a])
        if parts:
            local.copy_(torch.cat(parts))


def load_optimizer(model, opt, state, path, rank, world):
    """AdamW's state from the checkpoint in `path` (`state`: its train_state), saved whole or in shards. Only
    each parameter's moments come from it: the groups and their hyperparameters (lr scales, weight decay,
    and the groups a weight decay makes) are this run's, either way."""
    if "params" in state:
        load_shards(model, opt, path, state["world"], rank, world)
    else:
        names = {q: n for n, q in model.named_parameters()}
        state["optimizer"]["param_groups"] = [dict(g, params=[names[q] for q in g["params"]]) for g in opt.param_groups]
        set_optimizer_state_dict(model, opt, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))


def write_train_state(tmp, state):
    """train_state.pt into the checkpoint being written in `tmp`, last, renamed into place once the rest is
    on the disk: a ckpt.tmp that holds it is complete (a kill between replace_checkpoint's renames leaves it
    newer than ckpt.old: --resume finishes it, finish_cut_save)."""
    torch.save(state, os.path.join(tmp, "train_state.pt.tmp"))
    fsync(tmp, tree=True)
    os.replace(os.path.join(tmp, "train_state.pt.tmp"), os.path.join(tmp, "train_state.pt"))
    fsync(tmp)


def replace_checkpoint(out, ckpt_dir):
    """The complete ckpt.tmp becomes ckpt (in the run directory `out`): the last good checkpoint is never
    touched until the new one is complete, on the disk."""
    if os.path.isdir(ckpt_dir):
        shutil.rmtree(ckpt_dir + ".old", ignore_errors=True)
        os.replace(ckpt_dir, ckpt_dir + ".old")
    os.replace(ckpt_dir + ".tmp", ckpt_dir)
    fsync(out)  # the renames, before ckpt.old goes
    shutil.rmtree(ckpt_dir + ".old", ignore_errors=True)


# -----------------------------------------------------------------------------
# the run directory: never overwritten unasked; an --out that holds a run is resumed or refused

def check_out(out, resume):
    """Refuse an --out that is a file, or a checkpoint rather than the run directory that holds one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out}: is a file, not a directory")
    if any(os.path.isfile(os.path.join(out, f)) for f in ("train_state.pt", "mra_config.json")):
        # a run's OUT/ckpt, say: a run inside it would be deleted with it, at the next save of the run that holds it
        raise SystemExit(f"error: --out {out} is a checkpoint, not a run directory: " + (
            f"pass the run that holds it, --out {os.path.dirname(os.path.abspath(out))}" if resume else
            f"a run inside it would be deleted when it is next replaced; pick another --out (--init {out} starts "
            f"from its weights)"))
    def replaced(d):  # a run's checkpoint (RUN/ckpt, or its .old / .tmp), which its saves replace
        return os.path.basename(d) in ("ckpt", "ckpt.old", "ckpt.tmp") and any(
            os.path.isfile(os.path.join(os.path.dirname(d), f)) for f in ("log.jsonl", "train.lock"))
    # --out itself (RUN/ckpt.old, or RUN/ckpt before RUN's first save) and every directory above it (RUN/ckpt/sub),
    # where its links lead: each is deleted with that checkpoint
    above = os.path.realpath(out)
    while not replaced(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    if replaced(above):
        where = "is" if above == os.path.realpath(out) else "lies inside"
        raise SystemExit(f"error: --out {out} {where} the checkpoint {above}: a run there would be deleted when "
                         f"that checkpoint is next replaced; pick another --out")


def claim_out(out):
    """Make --out and lock it for this run (rank 0): the lock file, to hold open until the run ends."""
    made, top = None, os.path.abspath(out)  # made: the topmost directory this run makes (--out's parents too)
    while not os.path.isdir(top) and top != os.path.dirname(top):
        made, top = top, os.path.dirname(top)
    lock = open_lock(out)
    # one run at a time: two started together would both find --out free below, then garble each other. A
    # POSIX lock (lockf) is the process's, released when it ends however it ends; a flock would be held on by
    # an earlier run in the same process that ended in an exception (tests run train.py in-process)
    try:
        while fcntl:
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if same_file(lock, lock.name):
                atexit.register(tidy_out, os.path.abspath(out), lock, made)
                break
            # a refused run, exiting, took away (tidy_out) the file this one had opened: lock the one there now
            lock.close()
            lock = open_lock(out)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without POSIX locks (some NFS, FUSE)
            print(f"note: --out {out}: cannot be locked ({e.strerror}); nothing stops a second train.py there")
        else:
            raise SystemExit(f"error: --out {out}: another train.py is running in it (it holds {lock.name}); wait "
                             f"for it to end, or pick another --out") from None
    return lock


def open_lock(out):
    # made now, before the model loads (minutes at 7B): an --out that cannot be written fails at once
    try:
        os.makedirs(out, exist_ok=True)
        return open(os.path.join(out, "train.lock"), "a")
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot be created or written ({e.strerror}: {e.filename}); pick a "
                         f"writable --out") from None


def same_file(f, path):
    """Is the open file f the one at path (not one removed, or replaced, since it was opened)?"""
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def tidy_out(out, lock, made):
    """At exit, the lock still held: a run refused before it wrote anything (bad data, say) leaves --out as it
    found it, without the lock file (and without the directories it made: --out, and `made`, the topmost)."""
    try:
        if not lock.closed and os.listdir(out) == ["train.lock"]:
            os.remove(os.path.join(out, "train.lock"))
            while made:  # --out, then each parent made for it, up to `made`; one that is not empty stays
                os.rmdir(out)
                made = None if out == made else made
                out = os.path.dirname(out)
    except OSError:
        pass


def finish_cut_save(out, ckpt_dir):
    """--resume (rank 0, --out locked): a save killed between its renames left ckpt.tmp complete (it holds
    train_state.pt, written last) and newer than ckpt.old, and no ckpt: that save is finished now."""
    complete = os.path.join(ckpt_dir + ".tmp", "train_state.pt")  # (see write_train_state)
    if not os.path.isdir(ckpt_dir) and os.path.isfile(complete):
        replace_checkpoint(out, ckpt_dir)
        print(f"--resume: {ckpt_dir}.tmp held the complete checkpoint of a save cut short before its last rename: "
              f"that save is finished, as {ckpt_dir}")


def previous_run(out, ckpt_dir, log_path, resume, overwrite):
    """The checkpoint --resume continues from (None without --resume). An --out that holds a run (a
    checkpoint, or a log of steps) is refused unless --resume continues it or --overwrite starts over."""
    previous = [d for d in (ckpt_dir, ckpt_dir + ".old") if os.path.isdir(d)]
    if resume:  # ckpt.old alone: a save cut between its renames before train.py could tell a complete ckpt.tmp
        if not previous:
            raise SystemExit(f"error: --resume: no checkpoint in {out} (nothing to continue): " + (
                "--overwrite starts over" if os.path.isfile(log_path) else "drop --resume"))
        if not os.path.isfile(os.path.join(previous[0], "train_state.pt")):
            raise SystemExit(f"error: --resume: {previous[0]} has no train_state.pt (weights only, no optimizer or "
                             f"data position); start a new run from its weights with --init {previous[0]}")
        return previous[0]
    if holds_run(ckpt_dir, log_path) and not overwrite:
        raise SystemExit(f"error: --out {out} already holds a run ({', '.join(previous) or log_path}): "
                         f"--resume continues it, --overwrite starts over (deleting it), or pick another --out")
    return None


def holds_run(ckpt_dir, log_path):
    """Does the run directory hold a run (a checkpoint, or a log of steps)?"""
    return (any(os.path.isdir(d) for d in (ckpt_dir, ckpt_dir + ".old"))
            or os.path.isfile(log_path) and os.path.getsize(log_path) > 0)


def check_overwrite(out, ckpt_dir, log_path, inputs):
    """What --overwrite deletes must not be what this run reads (its --init, say). `inputs`: each flag's
    name (as argparse keeps it: "image_folder") and its path, or None where not given."""
    doomed = [os.path.realpath(d) for d in (ckpt_dir, ckpt_dir + ".old", ckpt_dir + ".tmp", log_path)]
    for flag, given in inputs.items():
        path = given and os.path.realpath(given)
        if path and any(path == d or path.startswith(d + os.sep) for d in doomed):
            raise SystemExit(f"error: --{flag.replace('_', '-')} {given} lies in the run that --overwrite "
                             f"would delete; copy it out of {out} first, or pick another --out")


def delete_run(ckpt_dir, log_path):
    """--overwrite: the old run's checkpoints and log go (once the new run is ready to start)."""
    for old in (ckpt_dir, ckpt_dir + ".old", ckpt_dir + ".tmp"):
        shutil.rmtree(old, ignore_errors=True)
    if os.path.isfile(log_path):
        os.remove(log_path)


def logged_step(line):
    """The step a line of log.jsonl records (inf for a line cut short: trim_log drops it)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill
        return math.inf
    return step if isinstance(step, int) else math.inf  # a line edited by hand: dropped with the cut ones


def trim_log(log_path, step):
    """--resume from the checkpoint of `step`: the log keeps the steps up to it, each once (those logged
    after it are run again), replaced atomically."""
    if not os.path.isfile(log_path):
        return
    with open(log_path, errors="replace") as f:  # bytes that are no text: a line edited by hand, dropped
        logged = [(line, logged_step(line)) for line in f.read().splitlines()]
    kept = [line for line, n in logged if n <= step]
    try:
        with open(log_path + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(log_path + ".tmp", log_path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(log_path + ".tmp")
        raise SystemExit(f"error: --resume: rewriting {log_path} failed ({e.strerror or e}); the run is as it was: "
                         f"once there is room (a full disk?), run the same command again") from None
    last = max((n for _, n in logged if n <= step), default=0)
    if last < step:  # each save syncs the log first: a log edited by hand, or written by an older train.py
        print(f"note: {log_path} ends at step {last}, the checkpoint is at step {step}: steps {last + 1}-{step} "
              f"are not in it")


def last_checkpoint(ckpt_dir):
    """The checkpoint --resume would continue from (None: none), as it picks them: a complete ckpt.tmp is
    a save cut between its renames, finished first."""
    return next((d for d in (ckpt_dir, ckpt_dir + ".tmp", ckpt_dir + ".old")
                 if os.path.isfile(os.path.join(d, "train_state.pt"))), None)


def interrupted(ckpt_dir, log_path):
    """A run interrupted now: what it has left on the disk and the way on, in one line (ckpt_dir None: no
    run directory is known yet)."""
    saved = ckpt_dir and last_checkpoint(ckpt_dir)
    logged = ckpt_dir and os.path.isfile(log_path) and os.path.getsize(log_path)
    return (f"interrupted: the last checkpoint {saved} is intact; --resume continues from it" if saved
            else "interrupted before any checkpoint was saved: nothing to resume; --overwrite starts over"
            if logged else "interrupted: nothing was saved; run it again to start")


# -----------------------------------------------------------------------------
# --resume: the run it continues is the run that was saved

def read_state(resume_dir):
    """The checkpoint's train_state.pt, and the run it records (the settings it was saved with)."""
    state_path = os.path.join(resume_dir, "train_state.pt")
    try:
        state = torch.load(state_path, weights_only=True)
        run = json.loads(state["run"])
    except Exception as e:  # noqa: BLE001 -- whatever is wrong with the file, the run cannot continue from it
        raise SystemExit(f"error: --resume: {state_path} is not a train state train.py wrote ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); the run cannot go on from it: a new run "
                         f"starts from its weights with --init {resume_dir} and another --out") from None
    return state, run


def check_resume(run, resume_dir, args, ds, tok_path, fixed, model_fixed, tokenizer, usable, init_digest):
    """Stop, in one line that names the way on, where this run differs from the saved `run` in what the data
    position or the model depends on: a setting in `fixed` (those in `model_fixed` make the model), the data
    file `ds` was read from, a LoRA run's frozen base (`init_digest`), the tokenizer (`tokenizer`: its sha256
    and legacy mode) or the `usable` records. `args`: this run's flags."""
    new_run = (f"or start a new run from its weights: --init {resume_dir} and another --out"
               if os.path.isfile(os.path.join(resume_dir, "mra_config.json")) else  # not LoRA adapters alone
               "or start a new run with another --out")
    for key, now in fixed.items():
        if run.get(key, now) != now:  # a setting older runs did not record is noted (changed_flags), if changed
            why = ("the model would not be the one trained" if key in model_fixed else
                   "the data position would not carry over")
            flag = "--" + {"group_by_length": "group-by-modality-length"}.get(key, key.replace("_", "-"))
            way = (f"drop {flag}" if run[key] is None else  # the run had none (--quantize, say)
                   f"give the run's {flag if run[key] else '--no-' + flag[2:]}" if isinstance(run[key], bool) else
                   f"give the run's {flag} {run[key]}")
            raise SystemExit(f"error: --resume: the run used {key}={run[key]!r}, now {now!r}: {why}; {way}, {new_run}")
    # the same records in the same order, wherever the file now lies (older runs kept its path only)
    if (run["data_sha256"] != ds.sha256 if "data_sha256" in run else
            os.path.realpath(run.get("data") or "") != os.path.realpath(args.data)):
        raise SystemExit(f"error: --resume: --data {args.data} is not the file the run read ({run.get('data')}, as it "
                         f"was then): the data position would not carry over; give that file, {new_run}")
    if args.lora_r and (run["init_digest"] != init_digest if "init_digest" in run else  # older runs: the path
                        run.get("init") != os.path.realpath(args.init)):
        raise SystemExit(f"error: --resume: --init {args.init} is not the base the run trained on ({run.get('init')}, "
                         f"as it was then): the model would not be the one trained; give that base, {new_run}")
    # older runs recorded neither: their bytes are not known, but their mode is (legacy, the only one then)
    then = dict(tokenizer_sha256=run.get("tokenizer_sha256", tokenizer["tokenizer_sha256"]),
                tokenizer_legacy=run.get("tokenizer_legacy", True))
    if then != tokenizer:
        why = ("other bytes" if then["tokenizer_sha256"] != tokenizer["tokenizer_sha256"] else
               f"legacy={tokenizer['tokenizer_legacy']} from the tokenizer_config.json beside it or its absence, "
               f"the run's {then['tokenizer_legacy']}")
        own = os.path.join(resume_dir, "tokenizer.model")
        raise SystemExit(f"error: --resume: {tok_path} is not the tokenizer the run trained with ({why}): the token "
                         f"ids would change; " + (f"drop --tokenizer to use the run's own copy, {own}" if args.tokenizer
                                              else "give the run's tokenizer with --tokenizer") + f", {new_run}")
    if any(run.get(k, v) != v for k, v in usable.items()):  # --skip-bad: other records bad now (or fixed)
        raise SystemExit(f"error: --resume: the run trained on {run['records']} usable records of {args.data}, now "
                         f"{len(ds)} ({len(ds.bad)} bad{', other ones' if run['records'] == len(ds) else ''}): the "
                         f"data position would not carry over; restore the records and images as the run had "
                         f"them, {new_run}")


def changed_flags(run, flags, free, fixed, defaults):
    """This run's `flags` (vars(args)) whose values differ from the saved `run`'s, as "--lr 0.001 -> 0.0005":
    all but those in `free`, unless a setting in `fixed` the run did not record (check_resume compares the
    others). `defaults`: the values in effect for flags older runs saved as None."""
    then = {k: defaults[k] if v is None and k in defaults else v  # older runs saved None for these defaults
            for k, v in run.get("args", {}).items()}
    return [f"--{k.replace('_', '-')} {then[k]} -> {v}" for k, v in flags.items()
            if (k not in free or k in fixed and k not in run) and k in then and then[k] != v]


def check_trained(state, trainable, lora_r):
    """The parameters the saved run trained (its train_state `state` names them) must be `trainable` now."""
    saved = (set(json.loads(state["params"])) if "params" in state else  # a sharded save
             {n for g in state["optimizer"]["param_groups"] for n in g["params"]})
    if saved != trainable:
        diff = sorted(saved ^ trainable)
        raise SystemExit(f"error: --resume: the run trained other parameters ({len(diff)} differ, e.g. {diff[0]}): "
                         f"same --stage and --freeze-* flags as the run"
                         f"{', and its --[no-]lora-train-mra' if lora_r else ''}, please")
