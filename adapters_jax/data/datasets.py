"""One call from a dataset name to a train iterator and eval batches."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import grain
import numpy as np

from adapters_jax.data import batching, evaluation, packing, pipeline, registry
from adapters_jax.tokenization import Tokenizer


@dataclasses.dataclass
class Datasets:
    """What training needs. `train` yields local batches forever (or for num_epochs)."""
    train: pipeline.TrainIterator
    eval_batches: list
    label_names: tuple
    train_size: int
    eval_size: int
    steps_per_epoch: int
    eval_split: str
    rows: dict  # split -> bad-row report written when the dataset was built
    train_rows: int = 0  # leading dimension of a global train batch (packed: rows of the grid)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  (only when not given explicitly)
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def make_datasets(name: str, tokenizer: Tokenizer, batch_size: int, max_length: int = 128,
                  seed: int = 0, *, eval_split: Optional[str] = None,
                  eval_batch_size: Optional[int] = None,
                  buckets: Sequence[int] = batching.DEFAULT_BUCKETS, pool_batches: int = 32,
                  num_epochs: Optional[int] = None, max_eval_examples: int = 0,
                  pack: bool = False, pack_rows: int = 0, pack_segments: int = 16, pack_row_multiple: int = 1,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  read_options: Optional[grain.ReadOptions] = None, **source_kwargs) -> Datasets:
    """Train iterator and eval batches for dataset `name` (see `registry` for the names).

    Args:
      name: a registered dataset name, e.g. 'rotten_tomatoes', 'files', 'glue_tsv/sst2'; or an
        image dataset ('fashion_mnist', 'digits'; see `adapters_jax.data.images`).
      tokenizer: `adapters_jax.tokenization.Tokenizer`.
      batch_size: the global batch size; each process gets batch_size // process_count rows.
      max_length: truncation length in tokens; also the largest bucket.
      seed: decides the shuffle; same seed, same batches.
      eval_split: defaults to 'validation' (MNLI: 'validation_matched').
      eval_batch_size: global eval batch size, default batch_size.
      max_eval_examples: > 0 evaluates on that many evenly spaced examples of the eval split
        (a fixed subset, for slow models such as a 135M decoder on a CPU); 0: all of them.
      buckets: padded lengths (capped by max_length).
      pool_batches: global batches per length-sorting window.
      pack: train and evaluate on packed rows instead of length buckets (`packing`): batches gain
        segment_ids [R, T], segment_starts, labels and weights [R, S] (eval: example_index [R, S]).
      pack_rows: rows per packed step; 0 holds batch_size examples of the mean length on average,
        rounded up to a multiple of pack_row_multiple (devices, accumulation steps) and processes.
      pack_segments: most examples in one packed row.
      num_epochs: None repeats the train split forever.
      process_index, process_count: default jax.process_index() / jax.process_count().
      read_options: grain threads / prefetch for the train iterator.
      **source_kwargs: for the loader: data_dir, files, glue_dir, label_names, table,
        skip_bad_rows, max_chars; for images: classes (a label subset such as '5-9'), idx_dir.
    """
    process_index, process_count = _process(process_index, process_count)
    from adapters_jax.data import images  # pylint: disable=g-import-not-at-top (imports this module)
    if name in images.IMAGE_DATASETS:  # no tokenizer, lengths or buckets: fixed-size images
        return images.make_image_datasets(name, batch_size, seed, eval_split=eval_split,
                                          eval_batch_size=eval_batch_size, num_epochs=num_epochs,
                                          process_index=process_index, process_count=process_count,
                                          read_options=read_options, **source_kwargs)
    if pack and name in images.IMAGE_DATASETS:
        raise ValueError(f"data.pack packs token rows; {name!r} is an image dataset")
    if source_kwargs.get("classes"):
        raise ValueError(f"data.classes is supported for the image datasets only ({', '.join(images.IMAGE_DATASETS)})")
    source_kwargs.pop("classes", None)
    src = registry.load(name, **source_kwargs)
    if pack and src.render is not None:
        raise ValueError(f"data.pack packs classification and regression rows; {name!r} is language-modelling text")
    eval_split = eval_split or registry.default_eval_split(name)
    bucket_set = batching.bucket_lengths(buckets, max_length)
    tokenize = batching.Tokenize(tokenizer, max_length, src.text_key, src.pair_key, src.label_key,
                                 render=src.render, eos_id=tokenizer.eos_id if src.render else None)
    train_src, eval_src = src.split("train"), src.split(eval_split)
    if 0 < max_eval_examples < len(eval_src):
        eval_src = [eval_src[int(i)] for i in np.linspace(0, len(eval_src) - 1, max_eval_examples)]
    if pack:
        train = pipeline.packed_train_batches(
            train_src, tokenize, batch_size=batch_size, seed=seed, pad_id=tokenizer.pad_id, rows_per_step=pack_rows,
            max_segments=pack_segments, row_multiple=pack_row_multiple, num_epochs=num_epochs,
            process_index=process_index, process_count=process_count)
    else:
        train = pipeline.train_batches(
            train_src, tokenize, global_batch_size=batch_size, seed=seed, buckets=bucket_set,
            pad_id=tokenizer.pad_id, pool_batches=pool_batches, num_epochs=num_epochs,
            process_index=process_index, process_count=process_count)
    if pack:  # one shape, one compile
        evals = packing.packed_eval_batches(
            [tokenize(eval_src[i]) for i in range(len(eval_src))], batch_size=eval_batch_size or batch_size,
            max_length=max_length, max_segments=pack_segments, pad_id=tokenizer.pad_id, row_multiple=pack_row_multiple,
            process_index=process_index, process_count=process_count)
    else:
        evals = evaluation.eval_batches(
            eval_src, tokenize, global_batch_size=eval_batch_size or batch_size, buckets=bucket_set,
            pad_id=tokenizer.pad_id, process_index=process_index, process_count=process_count)
    return Datasets(train=pipeline.TrainIterator(train, read_options), eval_batches=evals,
                    label_names=tuple(src.label_names), train_size=len(train_src),
                    eval_size=len(eval_src), steps_per_epoch=train.steps_per_epoch,
                    eval_split=eval_split, rows=dict(src.rows),
                    train_rows=train.rows_per_step if pack else batch_size)
