"""tfds builders (array_record; read with `as_data_source`, no TensorFlow needed).

Builder classes must live in a package for tfds to load them, hence this folder.
Importing it registers `rotten_tomatoes`, `bbc_news`, `tweet_sentiment` and `text_files`
with tfds, so `tfds.data_source('rotten_tomatoes', data_dir=...)` also works.
"""
from adapters_jax.data.builders.corpora import BbcNews, RottenTomatoes, TweetSentiment
from adapters_jax.data.builders.text_files import TextFiles, TextFilesConfig, text_files_config

__all__ = ["BbcNews", "RottenTomatoes", "TweetSentiment", "TextFiles", "TextFilesConfig",
           "text_files_config"]
