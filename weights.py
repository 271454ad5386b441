"""Reading safetensors checkpoints and loading them strictly through key tables.

Every loader in mra (vit.py, convnext.py, llama.py, mra.py) follows the same three
steps, which live here so that each of them is a table and a few lines:

1. `read_safetensors(path)`: a file, or a directory holding `model.safetensors`
   or shards listed in `model.safetensors.index.json`. Tensors are read one at a
   time and cast to the caller's dtype as they arrive, so a 7B model never holds
   two copies in memory.
2. `remap(tensors, table)`: foreign key -> our key through an explicit table of
   patterns (`{i}`, `{j}` stand for layer indices). A key no pattern matches is
   "unexpected" unless an `ignore` pattern (a head, a text tower) covers it.
3. `load_state(model, state, ...)`: the model was built on the `meta` device; every
   expected tensor must be present with the expected shape, then
   `load_state_dict(assign=True)` adopts the tensors without copying them.

Everything that can go wrong raises `CheckpointError` with one line naming the
file or key, and what was expected.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def _cast(t, dtype):
    # only floating tensors follow the requested dtype (ids and masks keep theirs)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_config(path, parse=lambda d: d):
    """A JSON config file through parse(dict); whatever is wrong is one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse(json.load(f))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: the field {e} is missing") from None
    except (TypeError, ValueError, AssertionError, AttributeError) as e:  # unknown fields, bad values, not text
        raise CheckpointError(f"{path}: not a valid config ({e or type(e).__name__})") from None


def safetensors_files(path):
    """The safetensors files a checkpoint path stands for (file, dir, or sharded dir)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
        files = [os.path.join(path, s) for s in shards]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{f}: shard listed in {index} is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no model.safetensors, shard index, or *.safetensors file")
    return [os.path.join(path, f) for f in found]


def read_safetensors(path, dtype=None, device="cpu", keep=None):
    """All tensors of a checkpoint as {key: tensor}; `keep(key)` filters before reading."""
    out = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for k in f.keys():
                    if keep is None or keep(k):
                        out[k] = _cast(f.get_tensor(k), dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return out


def _pattern(p):
    # "layers.{i}.mlp.fc1.weight" -> regex with a named digit group per placeholder
    return re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(p)) + "$")


def remap(tensors, table, ignore=()):
    """Rename foreign keys to ours. Returns (state, unexpected_keys).

    table: [(their_pattern, our_pattern)], e.g. ("encoder.layers.{i}.mlp.fc1.weight",
    "blocks.{i}.fc1.weight"); ignore: regexes of keys known to be unused.
    """
    compiled = [(_pattern(theirs), ours) for theirs, ours in table]
    ignored = [re.compile(p) for p in ignore]
    state, unexpected = {}, []
    for key, t in tensors.items():
        for rx, ours in compiled:
            m = rx.match(key)
            if m:
                state[ours.format(**m.groupdict())] = t
                break
        else:
            if not any(rx.match(key) for rx in ignored):
                unexpected.append(key)
    return state, unexpected


def their_name(key, table):
    """Our key -> the checkpoint's name for it, through the same table (for error messages)."""
    for theirs, ours in table:
        m = _pattern(ours).match(key)
        if m:
            return theirs.format(**m.groupdict())
    return key


def _listing(keys, n=6):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state(model, state, source, unexpected=(), table=()):
    """Strictly load `state` (our key names) into `model` (built on meta), adopting the tensors.

    Missing keys are reported under the checkpoint's names when `table` (the one `remap` used)
    says what they are called there: that is the name a user can look for in the file.
    """
    expected = model.state_dict()
    problems = []
    missing = [their_name(k, table) for k in expected if k not in state]
    extra = list(unexpected) + [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if extra:
        problems.append(f"unexpected {_listing(extra)}")
    for k, t in state.items():
        if k in expected and tuple(t.shape) != tuple(expected[k].shape):
            problems.append(f"shape mismatch for {their_name(k, table)}: model expects {tuple(expected[k].shape)}, "
                            f"checkpoint has {tuple(t.shape)}")
        elif k in expected and expected[k].is_floating_point() and not t.is_floating_point():
            problems.append(f"{their_name(k, table)} holds {t.dtype} values where weights are floating point")
    if problems:
        more = f"; ... ({len(problems) - 8} more problems)" if len(problems) > 8 else ""
        raise CheckpointError(f"{source}: " + "; ".join(problems[:8]) + more)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # a buffer the model forgot to rebuild after loading: our bug, not the user's
        raise RuntimeError(f"{type(model).__name__} still has meta tensors after loading: {_listing(leftover)}")
    return model
