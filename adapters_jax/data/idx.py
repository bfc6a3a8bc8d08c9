"""Reading LeCun's IDX files (MNIST, Fashion-MNIST: `*-idx3-ubyte.gz`, `*-idx1-ubyte.gz`).

Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions n, then n
big-endian uint32 sizes and the row-major data. Only uint8 data is accepted, since that is
what every image/label file of these sets holds. Problems are one line naming the file.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when the name ends in .gz), uint8."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{data[2]:02x} is not supported (only 0x08, uint8)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions)")
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                         f"holds {len(data) - header} data bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def read_images_and_labels(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, 1], labels int64 [N]) from an idx3 image file and an idx1 label file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"{images_path}: expected images [N, H, W], got shape {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels [N], got shape {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images[..., None], labels.astype(np.int64)
