"""Language-modelling views of the labelled corpora: each record rendered as one text.

`rotten_tomatoes_lm` renders every Rotten Tomatoes snippet as "Review (fresh): <text>" or
"Review (rotten): <text>", on the same movie-hash splits as `rotten_tomatoes` (the built
dataset is shared), so a model tuned on it can be asked for a fresh or a rotten review by
its prefix. The label stays in the batch ('labels') but the LM loss ignores it; `Tokenize`
ends each rendered row with the tokenizer's EOS id so that generation learns to stop.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from adapters_jax.data import sources

# LM dataset name -> (the labelled corpus it renders, the template over {label} and {text})
TEMPLATES = {"rotten_tomatoes_lm": ("rotten_tomatoes", "Review ({label}): {text}")}


@dataclasses.dataclass(frozen=True)
class Render:
    """record {'text': bytes, 'label': int} -> the template filled with label name and text."""
    template: str
    label_names: tuple
    text_key: str = "text"
    label_key: str = "label"

    def __call__(self, record: dict) -> str:
        text = record[self.text_key]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return self.template.format(label=self.label_names[int(record[self.label_key])], text=text)


def load_lm(name: str, *, data_dir: Optional[str] = None) -> sources.SourceSet:
    """The corpus behind LM dataset `name`, with `render` set (see TEMPLATES)."""
    corpus, template = TEMPLATES[name]
    src = sources.load_corpus(corpus, data_dir=data_dir)
    return dataclasses.replace(src, render=Render(template, tuple(src.label_names), src.text_key, src.label_key))
