"""IDX files (the MNIST / Fashion-MNIST format) and the image data sets stored in it.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the values in C order, big-endian. The data sets ship
gzip-compressed; plain files are read too. The data folder is :func:`qbayes.data.data_dir`
(``$QBAYES_DATA``, defaulting to ``../shared/data``).
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import QBayesError
from .text import data_dir

# IDX dtype code -> (big-endian numpy dtype, torch dtype); LeCun's table.
_IDX_DTYPES: dict[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}

# (mean, std) of the training pixels scaled to [0, 1]: the usual "standard" normalisation.
IMAGE_STATS: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
}
IMAGE_SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    if not path.is_file():
        raise QBayesError(f"IDX file {path} not found")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise QBayesError(f"IDX file {path} is a truncated or corrupt gzip stream ({e})") from e


def read_idx(path: str | Path) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or plain) into a tensor of its shape and dtype.

    Unsigned-byte files (code 0x08, all of MNIST and Fashion-MNIST) give ``torch.uint8``;
    the other codes of the format give int8/int16/int32/float32/float64.

    Raises :class:`QBayesError` when the file is missing, truncated, has a wrong magic
    number, or its payload size disagrees with the sizes in its header.
    """
    p = Path(path)
    buf = _read_bytes(p)
    if len(buf) < 4:
        raise QBayesError(f"IDX file {p} is truncated: {len(buf)} bytes, fewer than the 4-byte magic number")
    zero, code, ndim = int.from_bytes(buf[:2], "big"), buf[2], buf[3]
    if zero != 0 or code not in _IDX_DTYPES:
        raise QBayesError(
            f"IDX file {p} has a wrong magic number 0x{buf[:4].hex()}: expected 0x0000 then a dtype code "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)} and the number of dimensions")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise QBayesError(f"IDX file {p} is truncated: its header declares {ndim} sizes but the file has "
                          f"{len(buf)} bytes")
    shape = tuple(int.from_bytes(buf[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    np_dtype, torch_dtype = _IDX_DTYPES[code]
    itemsize = np.dtype(np_dtype).itemsize
    want = math.prod(shape) * itemsize
    have = len(buf) - header
    if have != want:
        kind = "truncated" if have < want else "longer than its header says"
        raise QBayesError(f"IDX file {p} is {kind}: shape {shape} needs {want} data bytes, found {have} "
                          "(size mismatch)")
    arr = np.frombuffer(buf, dtype=np_dtype, count=math.prod(shape), offset=header)
    # astype to the native byte order also copies out of the read-only buffer.
    return torch.from_numpy(arr.astype(np.dtype(np_dtype).newbyteorder("="))).to(torch_dtype).reshape(shape)


def _image_file(root: Path, name: str, split: str, kind: str) -> Path:
    stem = IMAGE_SPLITS[split]
    suffix = "idx3-ubyte" if kind == "images" else "idx1-ubyte"
    path = root / name / f"{stem}-{kind}-{suffix}.gz"
    if not path.is_file():
        if name == "mnist" and split == "train" and kind == "images":
            raise QBayesError(
                f"MNIST training images are not available: {path} is missing. The shared data folder holds "
                "only the MNIST test images and labels and the training labels; use split='test', or "
                "Fashion-MNIST for training")
        raise QBayesError(f"{name} {split} {kind} file {path} not found: set QBAYES_DATA to the folder "
                          f"holding {name}/{path.name}")
    return path


def _normalise(x: torch.Tensor, name: str, normalize: str | tuple[float, float] | None) -> torch.Tensor:
    """``x`` in [0, 1] -> ``(x - mean) / std`` per the ``normalize`` argument."""
    if normalize is None:
        return x
    if isinstance(normalize, str):
        if normalize != "standard":
            raise QBayesError(f"normalize must be 'standard', None or a (mean, std) pair, got {normalize!r}")
        mean, std = IMAGE_STATS[name]
    else:
        try:
            mean, std = (float(v) for v in normalize)
        except (TypeError, ValueError) as e:
            raise QBayesError(f"normalize must be 'standard', None or a (mean, std) pair, got {normalize!r}") from e
    if not std > 0:
        raise QBayesError(f"the normalisation std must be positive, got {std}")
    return (x - mean) / std


def load_image_dataset(
    name: str,
    split: str,
    normalize: str | tuple[float, float] | None = "standard",
    *,
    root: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of an IDX image data set.

    Args:
        name: ``"fashion-mnist"`` or ``"mnist"`` (a folder of ``root``).
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).
        normalize: ``"standard"`` gives ``(x/255 - mean)/std`` with the data set's constants
            (:data:`IMAGE_STATS`: Fashion-MNIST 0.2860/0.3530, MNIST 0.1307/0.3081);
            ``None`` gives ``x/255``; a ``(mean, std)`` pair uses those values.
        root: the data folder; defaults to :func:`qbayes.data.data_dir`.

    Returns:
        float32 images ``(n, 1, 28, 28)`` and int64 labels ``(n,)``, on the CPU.
    """
    if name not in IMAGE_STATS:
        raise QBayesError(f"unknown image data set {name!r}: choose one of {sorted(IMAGE_STATS)}")
    if split not in IMAGE_SPLITS:
        raise QBayesError(f"unknown split {split!r} for {name}: choose one of {sorted(IMAGE_SPLITS)}")
    base = Path(root) if root is not None else data_dir()
    img_path = _image_file(base, name, split, "images")
    lab_path = _image_file(base, name, split, "labels")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise QBayesError(f"{img_path} holds {images.dtype} of shape {tuple(images.shape)}, "
                          "expected uint8 images (n, 28, 28)")
    if labels.dim() != 1 or labels.numel() != images.shape[0]:
        raise QBayesError(f"{lab_path} holds labels of shape {tuple(labels.shape)}, expected "
                          f"({images.shape[0]},) to match {img_path.name}")
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)
    return _normalise(x, name, normalize), labels.to(torch.int64)
