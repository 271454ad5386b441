"""How a command that stops says so: one line that names what went wrong, what is kept and the way on.
A traceback is for a bug (or --debug). Kept apart so that train.py reads as the recipe. No torch at the
top: train.py installs its Ctrl-C and SIGTERM handling before torch loads, a second or two a Ctrl-C can
land in.
"""
import argparse
import atexit
import os
import re
import signal
import sys


class Parser(argparse.ArgumentParser):
    """argparse, with a flag's slip said in one line, not the whole usage text too (a subcommand's parser
    is of this class as well)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def said(err):
    """An error's message, in one line: one raised in a DataLoader worker arrives with the worker's
    traceback as its message, whose last line is the error's own."""
    last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", last)


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM

class Terminated(KeyboardInterrupt):
    """SIGTERM (scancel, docker stop, timeout, Kubernetes): unwound as Ctrl-C is, so a write in progress ends
    as it would then, and said as Ctrl-C is, as `terminated`. A rank of train.py under torchrun keeps its
    default (it ends at once, silently): torchrun sends it to the other ranks when one fails, which has said
    why, and a rank waiting on the failed one in a collective would not get to a handler."""


exit_status = None  # once set, the status the process ends with


def say_interrupted(kind, line, write=print):
    """Ctrl-C's one line, `line` (what is kept), or SIGTERM's, `terminated`; returns the exit status a shell
    expects, 128 + the signal's number (SIGTERM's is also kept in exit_status, for a process ending by an
    excepthook, whose own would be 1). torchrun passes Ctrl-C on to every rank: rank 0 alone says it."""
    global exit_status
    status = 128 + signal.SIGINT
    if issubclass(kind, Terminated):
        line, status = line.replace("interrupted", "terminated", 1), 128 + signal.SIGTERM
        exit_status = status
    if not (_torchrun and os.environ.get("RANK") != "0"):
        write(line, file=sys.stderr)
    return status


def _terminate(signum, frame):
    raise Terminated


def _exit_with_status():
    if exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)


_nothing_yet, _torchrun = "interrupted", False


def _uncaught(kind, err, tb):
    """sys.excepthook: a Ctrl-C the command does not catch itself (while torch imports) is one line too."""
    if not issubclass(kind, KeyboardInterrupt):
        return sys.__excepthook__(kind, err, tb)
    say_interrupted(kind, _nothing_yet)


def catch_signals(debug, nothing_yet="interrupted: nothing was written", torchrun=False):
    """A command's first act, before torch loads: SIGTERM unwinds as Ctrl-C does (see Terminated), and a
    Ctrl-C before the command's own handling is in place is one line, `nothing_yet` (unless --debug).
    torchrun: a command that runs as torchrun's ranks (train.py): there, if RANK is set, SIGTERM keeps its
    default and rank 0 alone says a Ctrl-C."""
    global exit_status, _nothing_yet, _torchrun
    # (the tests run train.py more than once in one process)
    exit_status, _nothing_yet, _torchrun = None, nothing_yet, torchrun and "RANK" in os.environ
    atexit.unregister(_exit_with_status)
    atexit.register(_exit_with_status)  # registered first, so run last at exit (after --out's tidy-up)
    if not _torchrun:
        signal.signal(signal.SIGTERM, _terminate)
    if not debug:
        sys.excepthook = _uncaught


def handling(line="interrupted"):
    """The command says what a stop keeps from here on (its own `except KeyboardInterrupt`); a second Ctrl-C
    landing while it says so gets `line` from the hook, never the `nothing_yet` of catch_signals."""
    global _nothing_yet
    _nothing_yet = line


# -----------------------------------------------------------------------------
# the machine's failures, not a bug's

def machine_failure(err, memory_ways, distributed):
    """A RuntimeError or MemoryError that is the machine's: the memory ran out (torch's CPU allocator,
    numpy, a GPU: torch.OutOfMemoryError; in a DataLoader worker, the last line says which), a DataLoader
    worker died (the OOM killer's doing, most often), or (torchrun) another rank did. (source, what went
    wrong, the way past it), source "memory", "worker" or "peer"; None for any other error (a bug: its
    traceback). `memory_ways`: the flags that would need less memory."""
    import torch  # loaded already: this runs only once a command is under way
    last = (str(err).strip().splitlines() or [""])[-1]
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)) or re.search(r"can't allocate|MemoryError: ", last):
        short = re.search(r"(CUDA|\w+Allocator|Unable)\b.*?allocate [\d.]+ ?\w+", last)  # not what goes around it
        ways = " or ".join([", ".join(memory_ways[:-1]), memory_ways[-1]] if memory_ways[1:] else memory_ways)
        return "memory", f"out of memory ({short[0] if short else said(err)})", ways + "; --dry-run shows the plan"
    if last.startswith("DataLoader worker (pid"):
        # how it ended, when torch saw it at once (SIGCHLD), may be the cause of the error raised
        first = err.__cause__ if str(err.__cause__).startswith("DataLoader worker (pid") else err
        what = str(first).split(". ")[0].rstrip(".")  # not torch's advice after it
        cause = ("the memory ran out? fewer --workers" if "signal: Killed" in what else  # SIGKILL: the OOM killer's
                 "--workers 0 loads in this process, where an error shows")
        return "worker", what, cause
    if distributed and (isinstance(err, torch.distributed.DistError) or
                        re.search(r"(closed|reset) by peer|remote process exited", last)):
        return "peer", "another process of the run ended (its own line says why)", "see that line"
    return None
