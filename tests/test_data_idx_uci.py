"""IDX image files and the UCI regression splits: synthetic round trips, errors, and the real shared data."""
import gzip
import struct

import pytest
import torch

from qbayes.data import (UCI_SETS, data_dir, load_image_dataset, load_uci_split, n_splits, read_idx)
from qbayes.errors import QBayesError

_CODES = {torch.uint8: (0x08, ">u1"), torch.int32: (0x0C, ">i4"), torch.float32: (0x0D, ">f4")}


def write_idx(path, t: torch.Tensor, compress: bool = True) -> None:
    """Write ``t`` as a real IDX file: magic 0x0000<code><ndim>, big-endian uint32 sizes, big-endian data."""
    code, be = _CODES[t.dtype]
    header = struct.pack(">BBBB", 0, 0, code, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    payload = header + t.numpy().astype(be).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _need(*parts):
    p = data_dir().joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data {p} not present")


# ----- IDX: synthetic -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.float32])
def test_idx_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(-1000 if dtype != torch.uint8 else 0, 256, (5, 3, 4), generator=g).to(dtype)
    write_idx(tmp_path / "a.gz", t)
    back = read_idx(tmp_path / "a.gz")
    assert back.dtype == dtype and back.shape == (5, 3, 4) and torch.equal(back, t)
    write_idx(tmp_path / "plain", t, compress=False)
    assert torch.equal(read_idx(tmp_path / "plain"), t)


def test_idx_bad_files_raise(tmp_path):
    t = torch.arange(60, dtype=torch.uint8).view(3, 20)
    write_idx(tmp_path / "ok.gz", t)
    good = gzip.decompress((tmp_path / "ok.gz").read_bytes())

    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-7]))  # payload cut short
    with pytest.raises(QBayesError, match="truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "long.gz").write_bytes(gzip.compress(good + b"\0"))  # payload too long
    with pytest.raises(QBayesError, match="size mismatch"):
        read_idx(tmp_path / "long.gz")
    (tmp_path / "hdr.gz").write_bytes(gzip.compress(good[:6]))  # header cut inside the sizes
    with pytest.raises(QBayesError, match="truncated"):
        read_idx(tmp_path / "hdr.gz")
    raw = (tmp_path / "ok.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])  # gzip stream itself cut
    with pytest.raises(QBayesError, match="truncated"):
        read_idx(tmp_path / "cut.gz")
    for magic in (b"\x01\x00\x08\x02", b"\x00\x00\x07\x02"):
        (tmp_path / "magic.gz").write_bytes(gzip.compress(magic + good[4:]))
        with pytest.raises(QBayesError, match="magic number"):
            read_idx(tmp_path / "magic.gz")
    with pytest.raises(QBayesError, match="not found"):
        read_idx(tmp_path / "missing.gz")


def test_image_dataset_arguments(tmp_path):
    root = tmp_path / "fashion-mnist"
    root.mkdir()
    imgs = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    write_idx(root / "t10k-images-idx3-ubyte.gz", imgs)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", torch.tensor([0, 3, 9, 3], dtype=torch.uint8))
    x, y = load_image_dataset("fashion-mnist", "test", None, root=tmp_path)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, 0] * 255, imgs.float()) and y.tolist() == [0, 3, 9, 3]
    xs, _ = load_image_dataset("fashion-mnist", "test", root=tmp_path)
    assert torch.allclose(xs, (x - 0.2860) / 0.3530)
    xt, _ = load_image_dataset("fashion-mnist", "test", (0.5, 0.25), root=tmp_path)
    assert torch.allclose(xt, (x - 0.5) / 0.25)
    with pytest.raises(QBayesError, match="fashion-mnist"):
        load_image_dataset("cifar", "test", root=tmp_path)
    with pytest.raises(QBayesError, match="'test', 'train'"):
        load_image_dataset("fashion-mnist", "val", root=tmp_path)
    with pytest.raises(QBayesError, match="normalize"):
        load_image_dataset("fashion-mnist", "test", "minmax", root=tmp_path)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", torch.tensor([0, 3, 9], dtype=torch.uint8))
    with pytest.raises(QBayesError, match="labels"):
        load_image_dataset("fashion-mnist", "test", root=tmp_path)


# ----- IDX: the real shared data ------------------------------------------------------

def test_real_fashion_mnist():
    _need("fashion-mnist", "train-images-idx3-ubyte.gz")
    x, y = load_image_dataset("fashion-mnist", "train", normalize=None)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 6000))
    assert abs(x.mean().item() - 0.2860) < 1e-3
    xt, yt = load_image_dataset("fashion-mnist", "test")
    assert xt.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(yt, minlength=10), torch.full((10,), 1000))


def test_real_mnist():
    _need("mnist", "t10k-images-idx3-ubyte.gz")
    x, y = load_image_dataset("mnist", "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and 0 <= y.min() and y.max() == 9
    with pytest.raises(QBayesError, match="MNIST training images are not available"):
        load_image_dataset("mnist", "train")


# ----- UCI ----------------------------------------------------------------------------

def _need_uci():
    _need("uci", "bostonHousing", "data", "data.txt")


def test_uci_split_counts():
    _need_uci()
    for name in UCI_SETS:
        assert n_splits(name) == (5 if name == "protein" else 20), name
    s = load_uci_split("boston", 0)
    assert s.x_train.shape == (455, 13) and s.x_test.shape == (51, 13)
    assert s.y_train.shape == (455,) and s.y_test.shape == (51,) and s.x_train.dtype == torch.float64
    y = load_uci_split("yacht", 3)
    assert y.x_train.shape[0] + y.x_test.shape[0] == 308 and y.x_train.shape[1] == 6


@pytest.mark.parametrize("name", ["boston", "yacht", "energy"])
def test_uci_splits_partition_the_rows(name):
    """Every split's train + test rows are the same multiset: the whole data set, nothing lost or repeated."""
    _need_uci()
    full = None
    for k in range(n_splits(name)):
        s = load_uci_split(name, k)
        rows = sorted(map(tuple, torch.cat([torch.cat([s.x_train, s.y_train[:, None]], 1),
                                            torch.cat([s.x_test, s.y_test[:, None]], 1)]).tolist()))
        full = full or rows
        assert rows == full, f"{name} split {k} does not hold the same rows as split 0"


def test_uci_index_files_are_disjoint_and_cover():
    _need_uci()
    for name in ("boston", "yacht"):
        folder = data_dir() / "uci" / UCI_SETS[name] / "data"
        n = sum(1 for line in (folder / "data.txt").read_text().splitlines() if line.strip())
        for k in range(n_splits(name)):
            tr = {int(float(v)) for v in (folder / f"index_train_{k}.txt").read_text().split()}
            te = {int(float(v)) for v in (folder / f"index_test_{k}.txt").read_text().split()}
            assert not tr & te and tr | te == set(range(n)), (name, k)


def test_uci_normalisation_uses_training_rows():
    _need_uci()
    s = load_uci_split("boston", 5)
    assert torch.allclose(s.x_train_n.mean(0), torch.zeros(13, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(s.x_train_n.std(0, correction=0), torch.ones(13, dtype=torch.float64))
    assert abs(s.y_train_n.mean().item()) < 1e-10 and abs(s.y_train_n.std(correction=0).item() - 1) < 1e-10
    assert torch.allclose(s.x_test_n, (s.x_test - s.x_train.mean(0)) / s.x_train.std(0, correction=0))
    assert torch.allclose(s.denormalize_y(s.y_train_n), s.y_train)


def test_uci_constant_column_and_errors(tmp_path):
    d = tmp_path / "uci" / "yacht" / "data"
    d.mkdir(parents=True)
    (d / "data.txt").write_text("1 5 10\n2 5 20\n3 5 30\n4 5 40\n\n")
    (d / "index_features.txt").write_text("0\n1\n")
    (d / "index_target.txt").write_text("2\n")
    (d / "index_train_0.txt").write_text("0.0\n1.0\n2.0\n")
    (d / "index_test_0.txt").write_text("3\n")
    s = load_uci_split("yacht", 0, root=tmp_path)
    assert s.x_std[1] == 1 and torch.equal(s.x_train_n[:, 1], torch.zeros(3, dtype=torch.float64))
    assert s.y_test.tolist() == [40.0] and torch.allclose(s.y_mean, torch.tensor(20.0, dtype=torch.float64))
    with pytest.raises(QBayesError, match="boston"):
        load_uci_split("housing", 0, root=tmp_path)
    with pytest.raises(QBayesError, match=r"0\.\.0"):
        load_uci_split("yacht", 1, root=tmp_path)
    (d / "index_test_0.txt").write_text("2\n")
    with pytest.raises(QBayesError, match="overlap"):
        load_uci_split("yacht", 0, root=tmp_path)
    (d / "index_test_0.txt").write_text("4\n")
    with pytest.raises(QBayesError, match="outside"):
        load_uci_split("yacht", 0, root=tmp_path)
    with pytest.raises(QBayesError, match="not found"):
        n_splits("boston", root=tmp_path)
