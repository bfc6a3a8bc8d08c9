"""Image classification data: build (tfds, array_record), read whole splits, pick a class subset.

    ds = make_image_datasets('fashion_mnist', batch_size=128, seed=0, classes='5-9')
    batch = next(ds.train)   # pixel_values float32 [B, 28, 28, 1] in [-1, 1], labels int32 [B] in 0..4

`classes` keeps a subset of the labels and renumbers them 0..k-1 in the order given, so a
model can be pretrained on some classes and adapted to held-out ones ('0-4' then '5-9').
The images are small (Fashion-MNIST: 47 MB as uint8), so each split is read once into memory.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from adapters_jax.data import image_pipeline, sources
from adapters_jax.data.datasets import Datasets
from adapters_jax.data.builders import images as image_builders

IMAGE_DATASETS = ("fashion_mnist", "digits")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Whole splits in memory: split -> (images uint8 [N, H, W, C], labels int32 [N])."""
    splits: dict
    label_names: tuple
    location: str

    def split(self, name: str) -> tuple:
        if name not in self.splits:
            raise ValueError(f"no split {name!r} in {self.location}; splits: {', '.join(self.splits)}")
        return self.splits[name]


def parse_classes(spec: str, num_classes: int) -> tuple:
    """'5-9' or '0,2,4' (or a mix, '0-2,7') -> class ids in the order given; '' -> all classes."""
    spec = str(spec).strip()
    if not spec:
        return tuple(range(num_classes))
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            ids = list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise ValueError(f"data.classes={spec!r}: {part.strip()!r} is not an integer or a range "
                             "like '5-9'") from None
        if not ids:
            raise ValueError(f"data.classes={spec!r}: {part.strip()!r} is an empty range")
        out.extend(ids)
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"data.classes={spec!r}: class {bad[0]} is out of range 0..{num_classes - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"data.classes={spec!r} names a class twice")
    return tuple(out)


def select_classes(images: np.ndarray, labels: np.ndarray, classes: tuple) -> tuple:
    """The rows whose label is in `classes`, relabelled by position in `classes` (0..k-1)."""
    remap = np.full(max(int(labels.max(initial=0)), max(classes)) + 1, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes), dtype=np.int32)
    new = remap[labels]
    keep = new >= 0
    return images[keep], new[keep]


def _read_all(source) -> tuple:
    """A tfds data source -> (images [N, H, W, C] uint8, labels [N] int32)."""
    n = len(source)
    records = source.__getitems__(list(range(n))) if n else []
    if not n:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros((0,), np.int32)
    return (np.stack([r["image"] for r in records]).astype(np.uint8),
            np.asarray([r["label"] for r in records], np.int32))


def load_images(name: str, *, data_dir: Optional[str] = None, classes: str = "",
                idx_dir: str = image_builders.FASHION_MNIST_DIR) -> ImageSet:
    """Builds if needed (cached under data_dir) and reads every split of `name`.

    Args:
      name: 'fashion_mnist' (IDX files in `idx_dir`, the Debian package's by default) or 'digits'.
      classes: keep only these labels, renumbered 0..k-1 (see `parse_classes`).
    """
    data_dir = sources.default_data_dir(data_dir)
    if name == "fashion_mnist":
        builder = image_builders.FashionMnist(config=image_builders.idx_config(idx_dir), data_dir=data_dir,
                                              file_format="array_record")
    elif name == "digits":
        builder = image_builders.Digits(data_dir=data_dir, file_format="array_record")
    else:
        raise ValueError(f"unknown image dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    builder.download_and_prepare()
    all_names = tuple(builder.info.features["label"].names)
    keep = parse_classes(classes, len(all_names))
    out = {}
    for split, source in builder.as_data_source().items():
        out[split] = select_classes(*_read_all(source), keep)
    return ImageSet(splits=out, label_names=tuple(all_names[c] for c in keep),
                    location=str(builder.data_dir))


def make_image_datasets(name: str, batch_size: int, seed: int = 0, *, eval_split: Optional[str] = None,
                        eval_batch_size: Optional[int] = None, num_epochs: Optional[int] = None,
                        process_index: int = 0, process_count: int = 1, read_options=None,
                        data_dir: Optional[str] = None, classes: str = "",
                        idx_dir: str = image_builders.FASHION_MNIST_DIR):
    """The image counterpart of `make_datasets`: a `Datasets` whose batches hold pixel_values."""
    src = load_images(name, data_dir=data_dir, classes=classes, idx_dir=idx_dir)
    eval_split = eval_split or "validation"
    (train_x, train_y), (eval_x, eval_y) = src.split("train"), src.split(eval_split)
    train = image_pipeline.ImageBatches(train_x, train_y, global_batch_size=batch_size, seed=seed,
                                        num_epochs=num_epochs, process_index=process_index,
                                        process_count=process_count)
    evals = image_pipeline.image_eval_batches(eval_x, eval_y, global_batch_size=eval_batch_size or batch_size,
                                              process_index=process_index, process_count=process_count)
    counts = {s: {"kept": int(len(y))} for s, (_, y) in src.splits.items()}
    return Datasets(train=image_pipeline.ImageTrainIterator(train, read_options), eval_batches=evals,
                    label_names=src.label_names, train_size=len(train_y), eval_size=len(eval_y),
                    steps_per_epoch=train.steps_per_epoch, eval_split=eval_split, rows=counts)
