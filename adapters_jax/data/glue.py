"""GLUE classification tasks: the local TSV layout and the tfds feature names.

Local layout (what GLUE's download script writes; one folder per task under a root):

  task  folder  files (split)                               text / text_pair columns     label column, values
  cola  CoLA    train.tsv, dev.tsv (no header: source,       column 3 / -                 column 1, 0/1
                label, original label, sentence)
  sst2  SST-2   train.tsv, dev.tsv (header sentence\\tlabel)  sentence / -                 label, 0/1
  mrpc  MRPC    train.tsv, dev.tsv                           '#1 String' / '#2 String'    Quality, 0/1
  qqp   QQP     train.tsv, dev.tsv                           question1 / question2        is_duplicate, 0/1
  qnli  QNLI    train.tsv, dev.tsv                           question / sentence          label, entailment/...
  rte   RTE     train.tsv, dev.tsv                           sentence1 / sentence2        label, entailment/...
  wnli  WNLI    train.tsv, dev.tsv                           sentence1 / sentence2        label, 0/1
  mnli  MNLI    train.tsv, dev_matched.tsv, dev_mismatched.tsv  sentence1 / sentence2     gold_label, names

dev.tsv becomes the 'validation' split (MNLI: 'validation_matched' and
'validation_mismatched'). test.tsv has no labels in GLUE and is not read. GLUE's TSVs are
read without quote handling (csv.QUOTE_NONE), as tfds and HF do. QQP's train.tsv has a
few malformed rows: read it with skip_bad_rows=True.

Online (`glue/<task>` through `tfds.data_source`), the same label order is used, and
the text features are named as in the table `TFDS_FIELDS`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from adapters_jax.data.files import Column, TableFormat


@dataclasses.dataclass(frozen=True)
class GlueTask:
    folder: str
    text: Column
    pair: Optional[Column]
    label: Column
    label_names: tuple
    tfds_text: str
    tfds_pair: Optional[str]
    validation: tuple = (("validation", "dev.tsv"),)
    has_header: bool = True

    def table_format(self) -> TableFormat:
        return TableFormat(fmt="tsv", text_column=self.text, pair_column=self.pair,
                           label_column=self.label, has_header=self.has_header, quoting=False)

    @property
    def eval_split(self) -> str:
        return self.validation[0][0]


_NLI3 = ("entailment", "neutral", "contradiction")
TASKS = {
    "cola": GlueTask("CoLA", 3, None, 1, ("unacceptable", "acceptable"), "sentence", None,
                     has_header=False),
    "sst2": GlueTask("SST-2", "sentence", None, "label", ("negative", "positive"), "sentence", None),
    "mrpc": GlueTask("MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"),
                     "sentence1", "sentence2"),
    "qqp": GlueTask("QQP", "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate"),
                    "question1", "question2"),
    "qnli": GlueTask("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
                     "question", "sentence"),
    "rte": GlueTask("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                    "sentence1", "sentence2"),
    "wnli": GlueTask("WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"),
                     "sentence1", "sentence2"),
    "mnli": GlueTask("MNLI", "sentence1", "sentence2", "gold_label", _NLI3, "premise", "hypothesis",
                     validation=(("validation_matched", "dev_matched.tsv"),
                                 ("validation_mismatched", "dev_mismatched.tsv"))),
}


def task(name: str) -> GlueTask:
    if name not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def tsv_files(name: str, glue_dir: str) -> dict:
    """{split: path} for a task, from either the GLUE root or the task's own folder."""
    spec = task(name)
    glue_dir = os.path.expanduser(os.fspath(glue_dir))
    folder = os.path.join(glue_dir, spec.folder)
    base = folder if os.path.isdir(folder) else glue_dir
    files = {"train": os.path.join(base, "train.tsv")}
    files.update({split: os.path.join(base, fname) for split, fname in spec.validation})
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"GLUE {name}: missing {', '.join(missing)} (expected GLUE's layout "
                                f"{spec.folder}/train.tsv, {spec.validation[0][1]} under {glue_dir})")
    return files
