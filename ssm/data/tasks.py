"""Synthetic tasks. Each batch is a dict of numpy arrays:
  inputs (B, L) int32, labels (B, L) int32 and loss_mask (B, L) float32 for
  sequence tasks; images / labels for classification tasks.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: `batch(index, rows)` returns the rows `rows` (a slice) of global batch
  `index`; rows are generated one by one from (seed, split, index, row), so any
  process can make any slice and get the same numbers."""
  name: str
  vocab_size: int
  seq_len: int
  batch_size: int
  seed: int = 0

  kind = "lm"

  def example(self, rng):  # -> (inputs (L,), labels (L,), loss_mask (L,))
    raise NotImplementedError

  def batch(self, index, rows=None, split="train"):
    rows = rows or slice(0, self.batch_size)
    split_id = {"train": 0, "eval": 1}[split]
    examples = [self.example(np.random.default_rng((self.seed, split_id, index, r)))
                for r in range(rows.start, rows.stop)]
    inputs, labels, mask = (np.stack(x) for x in zip(*examples))
    return dict(inputs=inputs.astype(np.int32), labels=labels.astype(np.int32),
                loss_mask=mask.astype(np.float32))


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
  """Multi-query associative recall, as Zoology's generator: key-value pairs first
  (keys from the lower half of the vocabulary, values from the upper half), then
  the keys queried again at power-law distributed gaps; labels only at queries."""
  num_kv_pairs: int = 4
  power_a: float = 0.01

  def __post_init__(self):
    if self.seq_len < 4 * self.num_kv_pairs:
      raise ValueError(f"mqar: seq_len {self.seq_len} is too short for {self.num_kv_pairs} "
                       f"pairs (needs at least {4 * self.num_kv_pairs})")
    if self.vocab_size // 2 <= self.num_kv_pairs:
      raise ValueError(f"mqar: vocab_size {self.vocab_size} has too few keys for "
                       f"{self.num_kv_pairs} pairs")

  def example(self, rng):
    n, V, L = self.num_kv_pairs, self.vocab_size, self.seq_len
    keys = rng.choice(np.arange(1, V // 2), n, replace=False)
    values = rng.choice(np.arange(V // 2, V), n, replace=False)
    context = np.stack([keys, values], 1).reshape(-1)
    space = (L - 2 * n) // 2
    p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
    gaps = rng.choice(space, n, replace=False, p=p / p.sum())
    queries = np.zeros(L - 2 * n + 1, np.int64)
    queries[gaps * 2] = keys
    sequence = np.concatenate([context, queries])
    labels = np.full(L + 1, -100)
    labels[2 * n + gaps * 2 + 1] = values
    inputs, labels = sequence[:-1], labels[1:]
    fill = inputs == 0  # Zoology's random_non_queries
    inputs[fill] = rng.integers(0, V, fill.sum())
    mask = labels != -100
    return inputs, np.where(mask, labels, 0), mask


TASKS = {"mqar": MQAR}


def make_task(config, batch_size, seed):
  """A task from its config (a dict with `name` and the task's fields)."""
  fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  name = fields.pop("name")
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[name](name=name, batch_size=batch_size, seed=seed, **fields)
