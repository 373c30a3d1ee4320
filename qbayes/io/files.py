"""File-system safety for checkpoints: regular files only, sizes checked before reading, one
atomic commit point per save, file modes as the umask says, and output paths checked before
any work starts.

A save writes the whole checkpoint into a hidden sibling folder
``.<name>.qbayes-partial-<pid>-<random>`` and makes it the checkpoint with one atomic step: a
``rename`` when the path is new, an exchange of the two folders (Linux ``renameat2`` with
``RENAME_EXCHANGE``) when it replaces an older checkpoint. At every instant the path holds the
complete old or the complete new checkpoint. The partial folder is removed on any error; one
left by a killed process (its pid no longer runs) is removed by the next save or load of that path.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointError, QBayesError

log = logging.getLogger(__name__)

PARTIAL = ".qbayes-partial-"
MAX_META_BYTES = 64 << 20      # qbayes.json and tokenizer files
MAX_HEADER_BYTES = 100 << 20   # a safetensors header (the JSON index of the tensors)
# files a checkpoint folder may hold besides qbayes.json and model.safetensors (written by tokenizers)
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                             "merges.txt", "vocab.txt", "added_tokens.json", "tokenizer.model", "spiece.model",
                             "chat_template.jinja", "chat_template.json", "sentencepiece.bpe.model"})
# exports qbayes writes beside a checkpoint by default: replaced (deleted) with the checkpoint they came from
DERIVED_SUFFIXES = (".onnx", ".onnx.data", ".gguf")
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")


def regular_file(path: Path, what: str, max_bytes: int | None = None) -> int:
    """Size of ``path`` after checking it is a regular file (not a folder, FIFO, device or a link
    to one) no larger than ``max_bytes``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the {what} of the checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a folder, pipe or device): refusing to read it as "
                              f"the {what}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise CheckpointError(f"{path} is {st.st_size} bytes, more than a {what} can be ({max_bytes}): not "
                              "reading it")
    return st.st_size


def read_json(path: Path, what: str) -> object:
    """Parse a regular, size-capped JSON file, every failure a :class:`CheckpointError`."""
    regular_file(path, what, MAX_META_BYTES)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8, bad JSON, an integer of > 4300 digits
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}): the checkpoint "
                              "is corrupt") from None


def safetensors_header(path: Path) -> tuple[dict, dict]:
    """``({name: (dtype, shape)}, metadata)`` from a safetensors file's header, after checking that
    the file is regular and exactly as long as the header says (no tensor data is read)."""
    size = regular_file(path, "weights file")
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (bad header length): corrupt or truncated")
        head = f.read(n)
    try:
        index = json.loads(head.decode("utf-8"))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path} has an unreadable safetensors header: corrupt or truncated") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header")
    meta = index.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for name, t in index.items():
        try:
            dtype, shape, (a, b) = t["dtype"], [int(d) for d in t["shape"]], t["data_offsets"]
            ok = isinstance(dtype, str) and all(d >= 0 for d in shape) and 0 <= int(a) <= int(b)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: the header entry of tensor {name!r} is malformed")
        tensors[name] = (dtype, tuple(shape))
        end = max(end, int(b))
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is {size} bytes but its header describes {8 + n + end}: corrupt or truncated")
    return tensors, meta


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and its files the modes a plain ``open``/``mkdir`` would (some writers,
    safetensors among them, create files 0600)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Remove partial folders of ``out`` left by saves whose process no longer runs; where such a
    save died between the two renames of the non-atomic fallback (``out`` gone, the old checkpoint
    set aside as ``...-old``), put the old checkpoint back first."""
    prefix = f".{out.name}{PARTIAL}"
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        if p.name.startswith(prefix):
            pid = p.name[len(prefix):].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if p.name.endswith("-old") and not out.exists():
                    os.rename(p, out)
                    log.warning("restored %s, set aside by a save that was killed", out)
                else:
                    shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path):
    """Yield an empty hidden sibling folder to write a checkpoint into; on a clean exit it becomes
    ``out`` in one atomic step (replacing an older checkpoint there); on any error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        if not out.exists():
            os.rename(tmp, out)
        elif not _exchange(tmp, out):  # no atomic exchange here: the old one is out of place briefly
            old = tmp.with_name(tmp.name + "-old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        # after an exchange ``tmp`` holds the old checkpoint, removed below
    finally:
        if tmp.is_symlink():  # ``out`` was a link to a folder: the link is replaced, its target kept
            tmp.unlink()
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def is_checkpoint(folder: Path, meta_name: str, fmt: str) -> bool:
    p = folder / meta_name
    try:
        return p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("format") == fmt
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_out_dir(out: str | Path, *, sources=(), force: bool = False, meta_name: str, fmt: str,
                  own_files=frozenset()) -> Path:
    """Check, before any work, that a checkpoint can be written at ``out``: not the source model's
    folder (nor inside it or around it), not a file or under one, writable, and either new, empty,
    or a qbayes checkpoint (replaced only with ``force``) holding nothing but its own files and the
    exports made from it (``DERIVED_SUFFIXES``, deleted with it)."""
    out = Path(out)
    for src in sources:
        s, o = Path(src).resolve(), out.resolve()
        if s == o or s in o.parents or o in s.parents:
            raise QBayesError(f"{out} would overwrite the model it quantizes ({src}): choose another folder")
    if out.exists() and not out.is_dir():
        raise QBayesError(f"{out} is an existing file, not a folder: choose a folder path")
    anc = out
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise QBayesError(f"{out} lies under {anc}, which is a file: choose a folder path")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise QBayesError(f"cannot write under {anc} (permission denied or a read-only file system): choose "
                          "another output path")
    if out.is_dir() and any(out.iterdir()):
        names = sorted(p.name for p in out.iterdir())
        if not is_checkpoint(out, meta_name, fmt):
            models = [n for n in names if n.endswith(MODEL_FILE_SUFFIXES) or n == "config.json"]
            what = f"holds a model that is not a qbayes checkpoint ({', '.join(models[:4])})" if models else \
                f"is a folder with other files in it ({', '.join(names[:4])})"
            raise QBayesError(f"{out} {what}: refusing to replace it; choose a new or empty folder")
        foreign = [n for n in names if n not in own_files and not n.endswith(DERIVED_SUFFIXES)]
        if foreign:
            raise QBayesError(f"{out} is a qbayes checkpoint but also holds {', '.join(foreign[:4])}, "
                              "which saving over it would delete: move them or choose another folder")
        if not force:
            raise QBayesError(f"{out} already holds a qbayes checkpoint: pass --force to replace it")
    return out


def check_out_file(out: str | Path, *, force: bool, protected=frozenset()) -> Path:
    """Check an export target: not one of the ``protected`` files (a checkpoint's own), not a
    folder or under a file, writable, and (without ``force``) not an existing file."""
    out = Path(out)
    parent = out.parent
    if out.resolve() in {Path(p).resolve() for p in protected}:
        raise QBayesError(f"{out} is a file of the qbayes checkpoint it exports: write the export elsewhere")
    if out.is_dir():
        raise QBayesError(f"{out} is a folder: give a file path")
    if out.exists() and not force:
        raise QBayesError(f"{out} exists: pass --force to overwrite it")
    if parent.exists() and not parent.is_dir():
        raise QBayesError(f"{out} lies under {parent}, which is a file")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise QBayesError(f"cannot write {out} (permission denied or a read-only file system)")
    return out


def check_free_space(out: str | Path, need_bytes: int) -> None:
    """Refuse, before any work, an output whose file system has less free space than ``need_bytes``."""
    anc = Path(out)
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    try:
        free = shutil.disk_usage(anc).free
    except OSError:
        return
    if free < need_bytes:
        raise QBayesError(f"{anc} has {free / 1e6:.1f} MB free, and the checkpoint needs up to {need_bytes / 1e6:.1f} "
                          "MB: free some space or choose another output path")
