"""Image data: the IDX parser and Fashion-MNIST builder on a synthetic IDX set written here with
struct + gzip (the format spec, not our reader), sklearn's digits, class subsets, batches."""
import collections
import gzip
import os
import struct

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
from adapters_jax.data import idx, images, make_datasets  # noqa: E402
from adapters_jax.data.builders import images as image_builders  # noqa: E402

N_TRAIN, N_TEST, SIDE = 60, 12, 6


def _write_idx(path, array):
    """IDX: 0, 0, type 0x08, ndim, big-endian uint32 dims, uint8 data (gzip)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny Fashion-MNIST-shaped IDX folder: every image is filled with its row number."""
    root = tmp_path_factory.mktemp("idx")
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        imgs = np.broadcast_to((np.arange(n) + (100 if split == "t10k" else 0))[:, None, None], (n, SIDE, SIDE))
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", imgs)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return str(root), str(tmp_path_factory.mktemp("tfds"))


def test_idx_reader_matches_the_written_arrays_and_names_bad_files(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(4, 3, 5))
    _write_idx(tmp_path / "a-idx3-ubyte.gz", arr)
    np.testing.assert_array_equal(idx.read_idx(str(tmp_path / "a-idx3-ubyte.gz")), arr)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x01\x02")
    with pytest.raises(ValueError, match=r"short\.gz: IDX header says shape \(10,\)"):
        idx.read_idx(str(tmp_path / "short.gz"))
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad\.gz: unreadable"):
        idx.read_idx(str(tmp_path / "bad.gz"))


def test_missing_file_names_it_and_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz: file not found .*"
                                                 r"apt-get install dataset-fashion-mnist"):
        images.load_images("fashion_mnist", data_dir=str(tmp_path), idx_dir=str(tmp_path))


def test_fashion_builder_on_synthetic_files(synthetic):
    root, data_dir = synthetic
    src = images.load_images("fashion_mnist", data_dir=data_dir, idx_dir=root)
    assert src.label_names == image_builders.FASHION_MNIST_LABELS
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = (src.split(s) for s in ("train", "validation", "test"))
    assert tr_x.shape[1:] == (SIDE, SIDE, 1) and tr_x.dtype == np.uint8
    # every train-file row lands in exactly one of train/validation, with its own label
    rows = sorted(np.concatenate([tr_x[:, 0, 0, 0], va_x[:, 0, 0, 0]]).tolist())
    assert rows == list(range(N_TRAIN)) and 0 < len(va_y) < len(tr_y)
    for x, y in ((tr_x, tr_y), (va_x, va_y), (te_x - 100, te_y)):
        np.testing.assert_array_equal(y, x[:, 0, 0, 0] % 10)
        assert (x == x[:, :1, :1]).all()  # whole image intact
    assert sorted(te_x[:, 0, 0, 0].tolist()) == list(range(100, 100 + N_TEST))


@pytest.mark.parametrize("spec, needle", [
    ("0-12", "class 10 is out of range 0..9"), ("a", "'a' is not an integer"),
    ("3,3", "names a class twice"), ("7-5", "'7-5' is an empty range")])
def test_bad_class_subsets_name_the_field(spec, needle):
    with pytest.raises(ValueError, match="data.classes=") as err:
        images.parse_classes(spec, 10)
    assert needle in str(err.value)


def test_class_subset_keeps_and_renumbers(synthetic):
    root, data_dir = synthetic
    full = images.load_images("fashion_mnist", data_dir=data_dir, idx_dir=root)
    sub = images.load_images("fashion_mnist", data_dir=data_dir, idx_dir=root, classes="7,5,6")
    assert sub.label_names == ("sneaker", "sandal", "shirt")
    for split in ("train", "validation", "test"):
        x, y = full.split(split)
        keep = np.isin(y, [7, 5, 6])
        sx, sy = sub.split(split)
        np.testing.assert_array_equal(sx, x[keep])
        np.testing.assert_array_equal(sy, np.array([1, 2, 0])[y[keep] - 5])


def test_batches_are_deterministic_resumable_and_eval_covers_each_example_once(synthetic):
    root, data_dir = synthetic
    kw = dict(data_dir=data_dir, idx_dir=root, classes="0-4")
    a = make_datasets("fashion_mnist", None, batch_size=8, seed=3, eval_batch_size=4, **kw)
    b = make_datasets("fashion_mnist", None, batch_size=8, seed=3, **kw)
    first = [next(a.train) for _ in range(a.steps_per_epoch + 2)]  # crosses an epoch boundary
    assert first[0]["pixel_values"].shape == (8, SIDE, SIDE, 1) and first[0]["labels"].max() <= 4
    assert -1.0 <= first[0]["pixel_values"].min() and first[0]["pixel_values"].max() <= 1.0
    epoch = np.concatenate([f["labels"] for f in first[:a.steps_per_epoch]])
    assert len(epoch) == a.steps_per_epoch * 8 and epoch.min() >= 0
    b.train.set_state({**a.train.get_state(), "next_index": 3})
    np.testing.assert_array_equal(next(b.train)["pixel_values"], first[3]["pixel_values"])
    c = make_datasets("fashion_mnist", None, batch_size=8, seed=4, **kw)
    assert not np.array_equal(next(c.train)["labels"], first[0]["labels"])
    seen = np.concatenate([e["example_index"][e["weights"] > 0] for e in a.eval_batches])
    np.testing.assert_array_equal(np.sort(seen), np.arange(a.eval_size))
    assert all(e["pixel_values"].shape[0] == 4 for e in a.eval_batches)


def test_digits_builder_matches_sklearn(tmp_path):
    from sklearn.datasets import load_digits
    raw = load_digits()
    src = images.load_images("digits", data_dir=str(tmp_path))
    sizes = {s: len(src.split(s)[1]) for s in ("train", "validation", "test")}
    assert sizes == {"train": 1464, "validation": 171, "test": 162}  # pinned: results depend on it
    got = collections.Counter(int(v) for s in sizes for v in src.split(s)[1])
    assert got == collections.Counter(int(v) for v in raw.target)
    x, _ = src.split("test")
    assert x.shape[1:] == (8, 8, 1) and x.max() == 255  # 16 -> 255


@pytest.mark.skipif(not os.path.exists(os.path.join(image_builders.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files():
    files = image_builders.idx_files(image_builders.FASHION_MNIST_DIR)
    x, y = idx.read_images_and_labels(*files["test"])
    assert x.shape == (10000, 28, 28, 1)
    assert collections.Counter(y.tolist()) == {c: 1000 for c in range(10)}
    assert idx.read_idx(files["train"][1]).shape == (60000,)
