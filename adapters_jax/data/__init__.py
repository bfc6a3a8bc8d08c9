"""Text-classification data: offline corpora, tfds builders, grain pipelines.

    from adapters_jax.data import make_datasets
    ds = make_datasets('rotten_tomatoes', tok, batch_size=32, max_length=128, seed=0)
    batch = next(ds.train)          # input_ids/attention_mask/token_type_ids [B, T], labels [B]
    state = ds.train.get_state()    # JSON-serialisable; ds.train.set_state(state) resumes
    for b in ds.eval_batches: ...   # plus weights [B] (0 on filler rows), example_index [B]

Names: see `dataset_names()` and `adapters_jax.data.registry`.
"""
from adapters_jax.data.batching import DEFAULT_BUCKETS, Tokenize, bucket_for, bucket_lengths
from adapters_jax.data.datasets import Datasets, make_datasets
from adapters_jax.data.evaluation import eval_batches
from adapters_jax.data.files import TableFormat
from adapters_jax.data.pipeline import LengthBucketedBatches, TrainIterator, train_batches
from adapters_jax.data.registry import DEFAULT_DATASET, dataset_names, load
from adapters_jax.data.rows import BadRowError, RowChecker, RowReport
from adapters_jax.data.sources import SourceSet, default_data_dir

__all__ = [
    "BadRowError", "DEFAULT_BUCKETS", "DEFAULT_DATASET", "Datasets", "LengthBucketedBatches",
    "RowChecker", "RowReport", "SourceSet", "TableFormat", "Tokenize", "TrainIterator",
    "bucket_for", "bucket_lengths", "dataset_names", "default_data_dir", "eval_batches", "load",
    "make_datasets", "train_batches",
]
