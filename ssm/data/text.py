"""Byte-level text, the MambaByte setting: documents from a tfds text dataset or
from local files, as bytes, packed into rows of fixed length.

Tokens are the 256 byte values plus BOS (256), which starts every document.
Documents are shuffled, concatenated and split into windows of seq_len + 1 tokens
(grain's ConcatThenSplit: no padding; a long document runs on into the next
rows). A row is inputs = window[:-1], labels = window[1:]; `reset` is True where
the input is BOS, so the scan and attention never carry state across documents,
and the loss counts only byte labels, so the mean loss / ln 2 is bits per byte.

Every process runs the same packing and keeps its own rows of each global batch:
the global batch does not depend on the number of processes, and the iterator's
state is the same in all of them. Packing bytes costs far less than a step.
"""

import dataclasses
import glob
import os

from pathlib import Path

import grain
import numpy as np
from grain import experimental as gx

from ssm.data.base import Pipeline

BOS = 256
VOCAB_SIZE = 257
# A small corpus shipped with the package (Karpathy's Tiny Shakespeare, 1,115,394
# bytes, public domain): the default of configs/bytes.py, so a fresh clone trains.
SHAKESPEARE = Path(__file__).parent / "corpora" / "tinyshakespeare.txt"
# The text feature of the tfds datasets we know; others: set task.text_key.
TEXT_KEYS = {"pg19": "book_text", "tiny_shakespeare": "text", "lm1b": "text"}


@dataclasses.dataclass(frozen=True)
class ByteText(Pipeline):
  """`dataset`: a tfds name, or `path`: local text files (a file, a glob or a
  directory). Local files are split into train and eval by `eval_fraction` of the
  bytes of each file (the last part is eval); `doc_separator` splits them into
  documents (default: one document per file)."""
  seq_len: int
  batch_size: int
  seed: int = 0
  dataset: str = ""
  path: str = ""
  data_dir: str = ""  # tfds data_dir ("" = tfds' default, ~/tensorflow_datasets)
  download: bool = False  # let tfds download and prepare the dataset
  text_key: str = ""
  train_split: str = "train"
  eval_split: str = "validation"
  eval_fraction: float = 0.1
  doc_separator: str = ""
  shuffle: bool = True

  kind = "lm"
  bits_per_byte = True
  vocab_size = VOCAB_SIZE

  def __post_init__(self):
    if bool(self.dataset) == bool(self.path):
      raise ValueError("task (bytes): set exactly one of task.dataset (a tfds name such as "
                       "'tiny_shakespeare' or 'pg19') and task.path (local text files)")
    if self.seq_len < 2:
      raise ValueError(f"task (bytes): seq_len {self.seq_len} is too short (at least 2)")

  # --- documents -------------------------------------------------------------
  def documents(self, split):
    """A random-access source of documents (bytes)."""
    if self.path:
      return _local_documents(self.path, split, self.eval_fraction, self.doc_separator)
    from ssm.data import tfds_source  # noqa: PLC0415
    name = {"train": self.train_split, "eval": self.eval_split}[split]
    source = tfds_source.data_source(self.dataset, name, self.data_dir, self.download)
    key = self.text_key or TEXT_KEYS.get(self.dataset.split("/")[0]) or _only_text_key(source)
    return grain.MapDataset.source(source).map(lambda record: _as_bytes(record[key]))

  # --- batches ---------------------------------------------------------------
  def batches(self, split, rows):
    docs = self.documents(split)
    if split == "train" and self.shuffle:
      docs = docs.shuffle(seed=self.seed)  # a new order each epoch
    # Two reader threads and a short queue: documents can be whole books.
    docs = docs.repeat().map(_tokens).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    windows = gx.ConcatThenSplitIterDataset(docs, length_struct={"tokens": self.seq_len + 1})
    batches = windows.batch(self.batch_size).map(lambda b: _rows(b["tokens"][rows]))
    return gx.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)  # packs ahead



def _tokens(document):
  return {"tokens": np.concatenate([[BOS], np.frombuffer(document, np.uint8)]).astype(np.uint16)}


def _rows(windows):
  windows = windows.astype(np.int32)
  inputs, labels = windows[:, :-1], windows[:, 1:]
  return dict(inputs=inputs, labels=labels, loss_mask=(labels != BOS).astype(np.float32),
              reset=inputs == BOS)


def _as_bytes(text):
  return text if isinstance(text, bytes) else str(text).encode()


def _only_text_key(source):
  record = source[0]
  keys = [k for k, v in record.items() if isinstance(v, (bytes, str))]
  if len(keys) != 1:
    raise ValueError(f"task (bytes): cannot tell the text feature among {sorted(record)}; "
                     "set task.text_key")
  return keys[0]


def local_files(path, task="bytes"):
  """The files task.path names (a file, a glob or a directory), sorted."""
  files = sorted(glob.glob(os.path.join(path, "*") if os.path.isdir(path) else path))
  files = [f for f in files if os.path.isfile(f)]
  if not files:
    raise ValueError(
        f"task ({task}): no text file at task.path={path!r} (looked for "
        f"{os.path.abspath(path)}); give a file, a glob or a directory of text files")
  return files


def _local_documents(path, split, eval_fraction, separator):
  files = local_files(path)
  docs = []
  for f in files:
    data = open(f, "rb").read()  # noqa: SIM115
    cut = int(len(data) * (1 - eval_fraction))
    part = data[:cut] if split == "train" else data[cut:]
    docs += [d for d in (part.split(separator.encode()) if separator else [part]) if d]
  if not docs:
    raise ValueError(f"task (bytes): the {split} split of {path!r} is empty "
                     f"(eval_fraction={eval_fraction})")
  return grain.MapDataset.source(docs)
