"""The one interface the training loop reads data through.

`make_pipeline(config.task, batch_size, seed)` gives a pipeline whose
`batches(split, rows)` is a grain IterDataset of batches: dicts of numpy arrays
holding the rows `rows` (a slice) of each global batch. Its iterator's state
(`get_state()`) is the pipeline position saved in every checkpoint, and it is the
same in every process, so a checkpoint resumes on any number of processes.

Batches of sequence tasks (synthetic tasks, byte-level text, pixel sequences):
  inputs (B, L) int32, labels (B, L) int32, loss_mask (B, L) float32 and, for
  packed documents, reset (B, L) bool (True at each document's first token).
Batches of image tasks (ViT, Vision Mamba):
  images (B, H, W, C) float32, normalised; labels (B,) int32.
"""

import dataclasses
import sys

import grain

from ssm.data import images, tasks, text, tokenized
from ssm.data.base import Pipeline

# The pipelines a task name other than a synthetic task's (ssm.data.tasks.TASKS) makes.
SOURCES = {"bytes": text.ByteText, "text": tokenized.TokenizedText, "images": images.Images}


@dataclasses.dataclass(frozen=True)
class Synthetic(Pipeline):
  """A generated task (ssm.data.tasks): batch i is a pure function of (seed, split,
  i), so the pipeline position is the batch index."""
  task: tasks.Task

  @property
  def vocab_size(self):
    return self.task.vocab_size

  @property
  def batch_size(self):
    return self.task.batch_size

  @property
  def seq_len(self):
    return self.task.seq_len

  def batches(self, split, rows):
    # Batch i = task.batch(i), made ahead in background threads.
    ds = grain.MapDataset.range(sys.maxsize).map(lambda i: self.task.batch(i, rows, split))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))

  def eval_variants(self):
    """(suffix, pipeline) pairs evaluated besides the training length: a task's
    `eval_seq_lens` (length generalisation, e.g. induction heads)."""
    return [(f"@{n}", Synthetic(dataclasses.replace(self.task, seq_len=n)))
            for n in self.task.eval_seq_lens if n != self.task.seq_len]


def task_class(name):
  """The dataclass whose fields `config.task` holds for the task `name`."""
  if name in tasks.TASKS:
    return tasks.TASKS[name]
  if name in SOURCES:
    return SOURCES[name]
  raise ValueError(f"unknown task {name!r}; known tasks: {', '.join([*tasks.TASKS, *SOURCES])}")


def make_pipeline(config, batch_size, seed):
  """The pipeline a `config.task` names: a synthetic task, "bytes" or "images"."""
  fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  cls = task_class(fields.get("name"))
  if cls in SOURCES.values():
    return cls.from_config(fields, batch_size, seed)
  return Synthetic(tasks.make_task(fields, batch_size, seed))


def task_vocab_size(config):
  """The vocabulary a `config.task` needs (a text task's: its tokenizer's), without
  reading its data."""
  return make_pipeline(config, 1, 0).vocab_size
