"""Reading safetensors checkpoints and loading them strictly through key tables.

Every loader in mra (vit.py, convnext.py, llama.py, mra.py, release.py) follows the same three
steps, which live here so that each of them is a table and a few lines:

1. `read_checkpoint(path)`: a file, or a directory holding `model.safetensors`,
   shards listed in `model.safetensors.index.json`, or the released PyTorch form,
   `pytorch_model-0000N-of-0000M.bin` shards and their index (`read_safetensors`:
   safetensors only). Tensors are read one at a time and cast to the caller's dtype
   as they arrive (or quantized, through `convert`), and a memory-mapped .bin shard
   is let go before the next, so a 7B model never holds two copies in memory.
   `weight_bytes` counts what that will take from the headers alone, and
   `check_memory` refuses, before any weight is read, what cannot fit. A key held by two
   files, or not by the shard its index names, and a shard the others' -of-M names count
   but that is not there, are refused: what is left would load as a different model.
2. `remap(tensors, table)`: foreign key -> our key through an explicit table of
   patterns (`{i}`, `{j}` stand for layer indices). A key no pattern matches is
   "unexpected" unless an `ignore` pattern (a head, a text tower) covers it.
3. `load_state(model, state, ...)`: the model was built on the `meta` device; every
   expected tensor must be present with the expected shape, then
   `load_state_dict(assign=True)` adopts the tensors without copying them.

Everything that can go wrong raises `CheckpointError` with one line naming the
file or key, and what was expected. The one command line here converts released .bin
shards to safetensors (optional: loading reads them as shipped):

    python weights.py convert SRC_DIR DST_DIR
"""
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings

import failures

if __name__ == "__main__":  # before torch loads: Ctrl-C and SIGTERM are one line from here
    failures.catch_signals(debug=False)

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


def _cast(t, dtype):
    # only floating tensors follow the requested dtype (ids and masks keep theirs)
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def check_positive(cfg, whole=(), real=(), prefix=""):
    """A config's fields that must be positive whole numbers (`whole`) or positive numbers (`real`), checked
    as it is made: read from a file, a 0 or a string would fail later as a shape error or NaN, unnamed."""
    for name in (*whole, *real):
        value, kinds = getattr(cfg, name), int if name in whole else (int, float)
        if not isinstance(value, kinds) or isinstance(value, bool) or not 0 < value < math.inf:
            raise ValueError(f"{prefix}{name} is {value!r}, expected a positive"
                             f"{' whole number' if name in whole else ', finite number'}")


def check_bool(cfg, names, prefix=""):
    """A config's true/false fields: from a file, "false" (a string) would count as true."""
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{prefix}{name} is {getattr(cfg, name)!r}, expected true or false")


def read_config(path, parse=lambda d: d):
    """A JSON config file through parse(dict); whatever is wrong is one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict):  # else parse's first d["..."] fails with a message about lists
            raise CheckpointError(f"{path}: a JSON {type(d).__name__}, not an object of config fields; is this "
                                  f"the right file?")
        return parse(d)
    except CheckpointError:
        raise
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: the field {e} is missing") from None
    except OSError as e:  # gone since it was found, a directory, no permission
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (TypeError, ValueError, AssertionError, AttributeError) as e:  # unknown fields, bad values, not text
        raise CheckpointError(f"{path}: not a valid config ({e or type(e).__name__})") from None


def shard_index(index):
    """The shard files a `*.index.json` lists, each checked to exist; None if there is no index."""
    weight_map = _weight_map(index)
    return None if weight_map is None else sorted({os.path.join(os.path.dirname(index), s)
                                                   for s in weight_map.values()})


def _weight_map(index):
    """A `*.index.json`'s {key: shard file name}, its shards checked to exist; None if there is no index."""
    if not os.path.exists(index):
        return None
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index, a JSON object whose weight_map maps tensor "
                              f"names to shard files ({e or type(e).__name__})") from None
    # a shard is a file beside the index: a path that leads elsewhere is refused, not followed
    bad = next((s for s in shards if not isinstance(s, str) or os.path.basename(s) != s or s in ("", ".", "..")),
               None)
    if bad is not None or not shards:
        raise CheckpointError(f"{index}: " + (f"names the shard {bad!r}; shards are files in the index's own "
                                              f"directory" if shards else "its weight_map lists no shard"))
    for f in (os.path.join(os.path.dirname(index), s) for s in shards):
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: shard listed in {index} is missing")
    return weight_map


def _all_shards(path, files):
    """`files` found by name, without an index: shards named *-0000N-of-0000M.* must all be there
    (a lost one would load what is left, a different model)."""
    series = {}  # (head, digits, tail, M) -> the N found
    for m in filter(None, (re.fullmatch(r"(.*-)(\d+)(-of-(\d+)\..*)", os.path.basename(f)) for f in files)):
        series.setdefault((m[1], len(m[2]), m[3], int(m[4])), set()).add(int(m[2]))
    missing = [f"{head}{i:0{digits}d}{tail}" for (head, digits, tail, n), found in series.items()
               for i in itertools.islice((i for i in range(1, n + 1) if i not in found), 6)]
    if missing:
        raise CheckpointError(f"{path}: missing the shard {_listing(missing)}, which the other shards' names "
                              f"count; download the checkpoint again")
    return files


def safetensors_files(path):
    """The safetensors files a checkpoint path stands for (file, dir, or sharded dir)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or directory")
    files = shard_index(os.path.join(path, "model.safetensors.index.json"))
    if files:
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    check_files(path)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not found:
        raise CheckpointError(f"{path}: no model.safetensors, shard index, or *.safetensors file")
    return _all_shards(path, [os.path.join(path, f) for f in found])


def check_files(path):
    """Refuse a weight file's name in directory `path` that is no file: a directory (a download unpacked
    wrong) or a broken link (the HF cache's files are links, to blobs an interrupted download leaves out)."""
    for f in sorted(os.listdir(path)):
        full = os.path.join(path, f)
        if (f.endswith(".safetensors") or re.fullmatch(r"pytorch_model.*\.bin", f)) and not os.path.isfile(full):
            what = "a directory" if os.path.isdir(full) else "a broken link"
            raise CheckpointError(f"{full}: {what}, where a weight file belongs; download the checkpoint again")


def bin_files(path):
    """The released PyTorch shards a directory holds: the index's, pytorch_model.bin, or pytorch_model*.bin."""
    files = shard_index(os.path.join(path, "pytorch_model.bin.index.json"))
    if files:
        return files
    # training_args.bin and mm_projector.bin are not weights of the whole model
    return _all_shards(path, [os.path.join(path, f) for f in sorted(os.listdir(path))
                              if re.fullmatch(r"pytorch_model.*\.bin", f) and os.path.isfile(os.path.join(path, f))])


def checkpoint_files(path):
    """The weight files a checkpoint path stands for, in HF's order of preference: safetensors
    (index, or model.safetensors), then the released .bin shards (index, or pytorch_model*.bin),
    then any *.safetensors. A stray safetensors file beside indexed .bin shards is not taken
    for the checkpoint."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f))
                                       for f in ("model.safetensors.index.json", "model.safetensors")):
        files = bin_files(path)
        if files:
            return files
        if not any(f.endswith(".safetensors") for f in os.listdir(path)):
            check_files(path)  # (else safetensors_files checks them)
            raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin, shard index, or *.safetensors "
                                  f"file: not a checkpoint directory")
    return safetensors_files(path)


def fingerprint(path, every=16 << 20, size=1 << 16):
    """A digest of a checkpoint: its config files whole, and of each weight file its name, length and
    64 KB at evenly spaced offsets, one per 16 MB (at least 65; a file under 4 MB is read whole).
    About 55 MB read at 7B; it changes with any tensor of 16 MB or more (a fine-tune of any 7B
    matrix), not necessarily with a single small one (a norm's weights). A directory that is no one
    checkpoint (a LoRA release's adapter_model.bin and non_lora_trainables.bin) counts all its files."""
    h = hashlib.sha256()
    for name in ("config.json", "mra_config.json"):
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                h.update(name.encode() + f.read())
    try:
        files = checkpoint_files(path)
    except CheckpointError:  # weights, but no one checkpoint's files (a LoRA release): every file; else as said
        if not (os.path.isdir(path) and any(f.endswith((".bin", ".safetensors")) for f in os.listdir(path))):
            raise
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    for file in files:
        n = os.path.getsize(file)
        samples = max(64, n // every)
        h.update(f"{os.path.basename(file)} {n};".encode())
        with open(file, "rb") as f:
            for i in range(samples + 1):
                f.seek(i * max(n - size, 0) // samples)
                h.update(f.read(size))
    return h.hexdigest()


def read_bin(file):
    """A PyTorch .bin file as {key: tensor}, memory-mapped (its pages are read as they are used).

    A pickle can run code when loaded: torch.load(weights_only=True) accepts tensors and plain
    containers only, and anything but a flat {name: tensor} is refused here as well."""
    if not os.path.isfile(file):  # else torch's error below reads as a damaged file
        raise CheckpointError(f"{file}: no such file")
    try:
        try:
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # old pickles: refused below, or fine
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)  # pre-1.6 format: read whole
    except Exception as e:  # noqa: BLE001 -- UnpicklingError and the zip reader's many errors
        if pointer := lfs_pointer(file):
            raise pointer from None
        # torch's words for a global outside its allow-list: "Unsupported global: GLOBAL x.Y", or for one of
        # a module it blocks outright (os, posix, subprocess, ...) "unsupported GLOBAL posix.system whose ..."
        code = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
        # torch's message is a paragraph; the line that says what the unpickler refused is enough
        why = next((line.strip() for line in str(e).splitlines() if "unsupported" in line.lower()), None)
        first = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0][:200]  # else: its first sentence
        raise CheckpointError(f"{file}: refused, it holds a {code[1]} object, not only tensors (a pickle that "
                              f"would run code when loaded)" if code else
                              f"{file}: refused, not a plain weights file ({why})" if why else
                              f"{file}: not a readable PyTorch weights file "
                              f"({first}); damaged or cut "
                              f"short? download it again") from None
    plain = lambda k, v: isinstance(k, str) and torch.is_tensor(v) and v.layout == torch.strided  # noqa: E731
    if not isinstance(sd, dict) or not all(plain(k, v) for k, v in sd.items()):
        bad = type(sd).__name__ if not isinstance(sd, dict) else next(
            f"{k!r}: {type(v).__name__}" + (f" ({v.layout})" if torch.is_tensor(v) else "")
            for k, v in sd.items() if not plain(k, v))
        raise CheckpointError(f"{file}: refused, a weights file maps names to dense tensors, this one holds {bad}")
    meta = next((k for k, v in sd.items() if v.is_meta), None)  # saved from a model never loaded
    if meta is not None:
        raise CheckpointError(f"{file}: {meta!r} is a meta tensor, it holds no data; save the file again from a "
                              f"model whose weights are loaded")
    return sd


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
                       "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz}
if hasattr(torch, "float8_e8m0fnu"):  # not in every torch we run on
    _SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


def held_once(where, k, file):
    """Note that `file` holds key k; a key already seen in another file is refused."""
    if where.setdefault(k, file) != file:  # two copies: which one is the model's is anyone's guess
        raise CheckpointError(f"{k}: held by both {where[k]} and {file}; a checkpoint holds each tensor "
                              f"once: remove the stale file, or download the checkpoint again")


def lfs_pointer(file):
    """A git-lfs pointer (a clone made without git-lfs) in place of the weights, said in one line."""
    try:
        with open(file, "rb") as f:
            pointer = f.read(64).startswith(b"version https://git-lfs")
    except OSError:
        return None
    return CheckpointError(f"{file}: a git-lfs pointer, not the weights themselves: fetch them (git lfs "
                           f"pull in the clone) or download the file again") if pointer else None


def _tensors(file, keep, where, meta=False):
    """(key, tensor) pairs of one file, read one at a time, in the dtype they are stored in (meta: their
    shapes and dtypes only, from the header; a .bin's pages are mapped, never read).
    where: {key: file} of every key seen so far, skipped ones too; a key in two files is refused."""
    def wanted(k):
        held_once(where, k, file)
        return keep is None or keep(k)
    if os.fspath(file).endswith(".bin"):
        sd = read_bin(file)
        for k in list(sd):
            t = sd.pop(k)  # the dict lets go of each tensor (and, at the end, of the mapping)
            if wanted(k):
                yield k, t
        return
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for k in filter(wanted, f.keys()):
                if not meta:
                    yield k, f.get_tensor(k)
                    continue
                s = f.get_slice(k)
                if s.get_dtype() not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file}: {k} is stored as {s.get_dtype()}, a dtype torch does not have")
                yield k, torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES[s.get_dtype()], device="meta")
    except (SafetensorError, OSError, RuntimeError) as e:
        raise lfs_pointer(file) or CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_checkpoint(path, dtype=None, device="cpu", keep=None, convert=None, files=None):
    """All tensors of a checkpoint as {key: tensor}; `keep(key)` filters before reading;
    `convert(key, tensor)` (default: cast to dtype, move to device) returns the entries to keep
    for one tensor as it arrives: an int8 weight and its scales, say."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype is {dtype!r}; expected None (as stored) or a floating torch.dtype, such as "
                         f"torch.bfloat16")
    out, where = {}, {}
    files = files or checkpoint_files(path)
    for file in files:
        for k, t in _tensors(file, keep, where, torch.device(device).type == "meta"):
            out |= convert(k, t) if convert is not None else {k: _cast(t, dtype).to(device)}
    check_index(files, where)
    return out


def check_index(files, where):
    """When `files` are a shard index's, every key it lists must have come from the shard it names:
    one missing, or found elsewhere, means shards that are not the ones the index was written with."""
    folder = os.path.dirname(files[0])
    shard = lambda s: os.path.normpath(os.path.join(folder, s))  # noqa: E731
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, name)
        weight_map = _weight_map(index)
        if weight_map is None or {shard(s) for s in weight_map.values()} != {os.path.normpath(f) for f in files}:
            continue
        wrong = sorted(k for k, s in weight_map.items() if os.path.normpath(where.get(k, "")) != shard(s))
        if wrong:
            k = wrong[0]
            found = f"{where[k]} holds it" if k in where else "no shard holds it"
            more = f" ({len(wrong)} keys in all)" if len(wrong) > 1 else ""
            raise CheckpointError(f"{index}: lists {k} in {weight_map[k]}, but {found}{more}; the shards do not "
                                  f"match their index: download them again")


def read_safetensors(path, dtype=None, device="cpu", keep=None):
    """read_checkpoint for safetensors files only (a file, or a dir of them)."""
    return read_checkpoint(path, dtype, device, keep, files=safetensors_files(path))


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path, header, tensors=None):
    """A safetensors file written one tensor at a time: `header` ({name: tensor}, meta or sharded
    tensors will do) gives the names, dtypes and shapes; `tensors` yields the data in that order
    (default: header's own). Nothing is copied whole (safetensors' save_file first turns every
    tensor into bytes), so a caller can gather each tensor just before it is written and drop it
    after: a whole model is never in memory at once. The format: the header's length (8 bytes,
    little-endian), the JSON header padded with spaces to 8 bytes, then the raw tensors."""
    meta, at = {"__metadata__": {"format": "pt"}}, 0
    for name, t in header.items():
        n = math.prod(t.shape) * t.element_size()
        meta[name] = dict(dtype=_SAFETENSORS_NAMES[t.dtype], shape=list(t.shape), data_offsets=[at, at + n])
        at += n
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for (name, h), t in zip(header.items(), header.values() if tensors is None else tensors, strict=True):
            assert t.dtype == h.dtype and t.shape == h.shape, (name, t.dtype, t.shape, h.dtype, h.shape)
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # (bytes,), no copy

# Memory. Before a weight is read, the checkpoint's headers say what loading will take: if the
# weights alone exceed the memory available, stop with both numbers and the way out.


def tensor_sizes(path):
    """{key: (elements, bytes per element as stored, floating?)} from the headers: no weight is read
    (a .bin shard is memory-mapped, and only its pickle, a few kB, is touched)."""
    sizes = {}
    for file in checkpoint_files(path):
        if os.fspath(file).endswith(".bin"):
            sizes |= {k: (t.numel(), t.element_size(), t.is_floating_point()) for k, t in read_bin(file).items()}
            continue
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    n, d = math.prod(s.get_shape()), s.get_dtype()
                    sizes[k] = (n, _SAFETENSORS_DTYPES[d].itemsize if d in _SAFETENSORS_DTYPES else 4,
                                d.startswith(("F", "BF")))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return sizes


def weight_bytes(sizes, dtype=None, int8=None):
    """Bytes the tensors take once loaded: floating ones in `dtype` (None: as stored), those
    `int8(key)` picks in one byte each (their per-row scales are a rounding error, not counted)."""
    item = None if dtype is None else torch.empty(0, dtype=dtype).element_size()
    return sum(n * (1 if int8 is not None and int8(k) else item if item and fl else size)
               for k, (n, size, fl) in sizes.items())


def available_memory(device):
    """Bytes that can still be allocated on `device`: CUDA's free memory; on the CPU, the kernel's
    MemAvailable, or less when a cgroup (a container) sets a lower limit. None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            if limit != "max":
                avail = min(avail, int(limit) - int(f.read()))
    except (OSError, StopIteration, ValueError):
        pass
    return avail


def check_memory(source, sizes, dtype, device, int8_keys, quantize):
    """Refuse to load what cannot fit, naming both numbers and the smaller ways to load it.
    int8_keys(key): the tensors --quantize int8 stores in one byte. Returns the bytes needed."""
    need = weight_bytes(sizes, dtype, int8_keys if quantize else None)
    avail = available_memory(device)
    if avail is None or need <= avail:
        return need
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    ways = []
    if dtype is None or torch.empty(0, dtype=dtype).element_size() > 2:
        ways.append(f"--dtype bfloat16 ({gb(weight_bytes(sizes, torch.bfloat16, int8_keys if quantize else None))})")
    if not quantize:
        ways.append(f"--quantize int8 ({gb(weight_bytes(sizes, torch.bfloat16, int8_keys))} with bfloat16)")
    name = str(dtype).removeprefix("torch.") if dtype is not None else "the stored dtypes"
    raise CheckpointError(f"{source}: the weights need {gb(need)} in {name} but only {gb(avail)} of memory is "
                          f"available on {device}; load them with " + (" or ".join(ways) or "more memory free"))


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


def load_state(model, state, source, unexpected=(), table=(), one_dtype=False):
    """Strictly load `state` (our key names) into `model` (built on meta), adopting the tensors.

    Missing and unexpected keys are reported under the checkpoint's names when `table` (the one
    `remap` used) says what they are called there: that is the name a user can look for in the file.
    one_dtype: floating tensors stored in several dtypes are all cast to the widest of them, which
    loses nothing (a loader's dtype=None keeps each as stored, and shards saved in different
    precisions would fail at the first matmul); train.py casts to fp32 after loading anyway.
    """
    expected = model.state_dict()
    problems = []
    missing = [their_name(k, table) for k in expected if k not in state]
    extra = list(unexpected) + [their_name(k, table) for k in state if k not in expected]
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
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if one_dtype and len(dtypes) > 1:
        wide = functools.reduce(torch.promote_types, dtypes)
        state = {k: t.to(wide) if t.is_floating_point() else t for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    meta = any(t.is_meta for t in state.values())  # a load of the shapes alone (device="meta")
    if leftover and not meta:  # a buffer the model forgot to rebuild after loading: our bug, not the user's
        raise RuntimeError(f"{type(model).__name__} still has meta tensors after loading: {_listing(leftover)}")
    return model


# ---------------------------------------------------------------------------------------
# Conversion, the one command line here: python weights.py convert SRC DST

@contextlib.contextmanager
def new_directory(dst, verb):
    """Write the directory dst whole or not at all: the caller fills a hidden directory beside it (removed
    if anything fails, a kill included), renamed to dst at the end. An existing dst is refused."""
    if not os.fspath(dst):  # abspath would make it the working directory, renamed onto ''
        raise CheckpointError(f"'': no directory named; {verb} into a new directory")
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: already exists; {verb} into a new directory")
    parent, name = os.path.split(os.path.abspath(dst))
    if not os.path.isdir(parent):  # named here: mkdtemp's error would name the hidden directory
        raise CheckpointError(f"{parent}: no such directory, to {verb} into {dst}; create it first")
    try:
        hidden = tempfile.TemporaryDirectory(prefix=f".{name}.", dir=parent, ignore_cleanup_errors=True)
    except OSError as e:  # named here: the error would name the hidden directory, which the user never gave
        raise CheckpointError(f"{dst}: cannot be created in {parent} ({e.strerror or e}); {verb} into a directory "
                              f"you can write to") from None
    with hidden as tmp:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0o700 -> what a plain mkdir gives
        for f in os.listdir(tmp):  # safetensors writes 0o600: readable by all, as a plain write would be
            os.chmod(os.path.join(tmp, f), 0o666 & ~mask)
        os.rename(tmp, os.path.join(parent, name))  # as checked: 'new/.' is new


def interrupted(dst, kind):
    """The one line of a command that writes dst through new_directory, stopped by Ctrl-C or SIGTERM
    (failures.catch_signals unwinds it as Ctrl-C), and its exit status: the hidden directory went as the
    stop unwound, so dst is whole or absent."""
    done = "was written in full before" if os.path.isdir(dst) else "was not written"
    return failures.say_interrupted(kind, f"interrupted: {dst} {done}")


def convert_bin(src, dst):
    """Released pytorch_model-*.bin shards -> safetensors shards + index (plus the small files). The
    .bin files are pickles: read only through torch.load(weights_only=True), which refuses anything but
    tensors and plain containers."""
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: " + ("a file; SRC is the directory that holds the .bin shards" if
                                            os.path.exists(src) else "no such directory"))
    # the shards loading would read (the index's, when there is one), or a stage-1 projector file
    projector = os.path.join(src, "mm_projector.bin")
    shards = bin_files(src) or ([projector] if os.path.isfile(projector) else [])
    if not shards:
        raise CheckpointError(f"{src}: no pytorch_model*.bin or mm_projector.bin files to convert")
    from safetensors.torch import save_file
    with new_directory(dst, "convert") as tmp:
        weight_map, where = {}, {}
        for file in shards:
            sd, seen = read_bin(file), set()
            for k in sd:  # in two shards: refused before anything is written, as loading refuses it
                held_once(where, k, file)
            for k, v in sd.items():  # a tied head is the embedding's storage: safetensors stores each once
                sd[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v.contiguous()
                seen.add(v.untyped_storage().data_ptr())
            out = os.path.basename(file).replace("pytorch_model", "model").replace(".bin", ".safetensors")
            try:
                save_file(sd, os.path.join(tmp, out), metadata={"format": "pt"})
            except SafetensorError as e:  # e.g. no space left on the device
                raise CheckpointError(f"{dst}: writing {out} failed: {e}") from None
            weight_map |= {k: out for k in sd}
        check_index(shards, where)  # shards that do not match their index: refused, as loading refuses them
        if len(shards) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        for extra in os.listdir(src):  # config.json, tokenizer files: not weights, nor an index of them
            if os.path.isfile(os.path.join(src, extra)) and not extra.endswith((".bin", ".safetensors", "index.json")):
                shutil.copy(os.path.join(src, extra), os.path.join(tmp, extra))
    return dst


if __name__ == "__main__":
    p = failures.Parser(description="Convert a released PyTorch .bin checkpoint to safetensors once (a "
                        ".bin loads as it is too, read through torch.load(weights_only=True) each time).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="SRC_DIR -> DST_DIR")
    c.add_argument("src", metavar="SRC_DIR", help="pytorch_model*.bin shards (with their index, if any) or a stage-1 "
                   "mm_projector.bin, and the config files")
    c.add_argument("dst", metavar="DST_DIR", help="a new directory (it appears whole or not at all)")
    args = p.parse_args()
    failures.handling()
    try:
        print(convert_bin(args.src, args.dst))
    except KeyboardInterrupt as e:
        sys.exit(interrupted(args.dst, type(e)))
    except (CheckpointError, OSError) as e:  # nothing is left behind: the output appears whole or not at all
        sys.exit(f"error: {e}")
