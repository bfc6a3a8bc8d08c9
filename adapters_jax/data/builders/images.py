"""tfds builders for the offline image sets: Fashion-MNIST (IDX files) and sklearn's digits.

Both store `image` uint8 [H, W, 1] and `label` (ClassLabel) in array_record, read with
`as_data_source`, no TensorFlow. Fashion-MNIST's train file is split 90/10 into train and
validation by a sha256 hash of the row index (fixed for good); t10k is the test split.
Digits (1,797 images, 8x8, values 0..16) are rescaled to 0..255 so every image set shares
one normalisation, and split 80/10/10 by the same kind of hash.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from adapters_jax.data import idx, splits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "dataset-fashion-mnist"
FASHION_MNIST_LABELS = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                        "sneaker", "bag", "ankle boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DIGITS_LABELS = tuple(str(i) for i in range(10))


def _digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def idx_files(directory: str) -> dict:
    """{'train': (images, labels), 'test': (...)} paths; a missing one is a one-line error."""
    out = {}
    for split, names in IDX_FILES.items():
        out[split] = tuple(os.path.join(directory, n) for n in names)
        for p in out[split]:
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: file not found (Fashion-MNIST ships in the Debian package "
                                        f"{FASHION_MNIST_APT}: apt-get install {FASHION_MNIST_APT})")
    return out


@dataclasses.dataclass
class IdxConfig(tfds.core.BuilderConfig):
    """Which IDX directory; the name carries a digest of its files, so a change rebuilds."""
    directory: str = FASHION_MNIST_DIR
    image_shape: tuple = (28, 28, 1)


def idx_config(directory: str = FASHION_MNIST_DIR) -> IdxConfig:
    files = idx_files(directory)
    images, _ = idx.read_images_and_labels(*files["test"])  # the small split: only for the shape
    paths = [p for pair in files.values() for p in pair]
    return IdxConfig(name="idx-" + _digest(paths), directory=os.path.abspath(directory),
                     image_shape=tuple(int(s) for s in images.shape[1:]),
                     description=f"IDX files in {os.path.abspath(directory)}")


def _features(shape, labels) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"image": tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8),
                                       "label": tfds.features.ClassLabel(names=list(labels))})


class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Fashion-MNIST (Xiao et al. 2017) from IDX files: train / validation / test."""
    name = "fashion_mnist_idx"  # not tfds's own `fashion_mnist` (a download builder)

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: train split 90/10 into train/validation by index hash."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=_features(self.builder_config.image_shape, FASHION_MNIST_LABELS),
                                     supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        files = idx_files(self.builder_config.directory)
        return {"train": self._generate_examples(files["train"], "train"),
                "validation": self._generate_examples(files["train"], "validation"),
                "test": self._generate_examples(files["test"], None)}

    def _generate_examples(self, paths, split):
        images, labels = idx.read_images_and_labels(*paths)
        bad = np.flatnonzero((labels < 0) | (labels >= len(FASHION_MNIST_LABELS)))
        if bad.size:
            raise ValueError(f"{paths[1]}: row {bad[0]}: label {labels[bad[0]]} is not in 0..9")
        for i in range(len(labels)):
            if split is None or splits.split_of(str(i), "fashion_mnist", (0.9, 0.1),
                                                ("train", "validation")) == split:
                yield i, {"image": images[i], "label": int(labels[i])}


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """sklearn's digits (UCI optical digits, 8x8): train / validation / test 80/10/10."""
    name = "sklearn_digits"

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: 80/10/10 by index hash; pixels rescaled 0..16 -> 0..255."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description="sklearn.datasets.load_digits: 1,797 8x8 digits.",
                                     features=_features((8, 8, 1), DIGITS_LABELS),
                                     supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in splits.SPLITS}

    def _generate_examples(self, split):
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
        for i, label in enumerate(digits.target):
            if splits.split_of(str(i), "digits") == split:
                yield i, {"image": images[i], "label": int(label)}
