"""Synthetic tasks. Each batch is a dict of numpy arrays: inputs (B, L) int32,
labels (B, L) int32 and loss_mask (B, L) float32.

Every task is a causal LM problem: `labels[t]` is the target of the model's output
at position t (which has seen `inputs[:t + 1]`), scored only where `loss_mask` is 1.
`seq_len` is always the length the model reads.
"""

import dataclasses
import random

import numpy as np

from ssm.data.base import LOOP_FIELDS
from ssm.fields import check_keys, from_dict


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: `batch(index, rows)` returns the rows `rows` (a slice) of global batch
  `index`; rows are generated one by one from (seed, split, index, row), so any
  process can make any slice and get the same numbers.

  `eval_seq_lens`: lengths at which the task is evaluated besides `seq_len` (the loop
  evaluates `dataclasses.replace(task, seq_len=n)`); every generator works at any
  length its parameters fit in, and a length they do not fit in is a ValueError
  when the task is made, not at the first evaluation."""
  name: str
  vocab_size: int
  seq_len: int
  batch_size: int
  seed: int = 0
  eval_seq_lens: tuple = ()

  kind = "lm"

  def __post_init__(self):
    # Overrides may give a list; a tuple keeps the frozen dataclass hashable.
    object.__setattr__(self, "eval_seq_lens", tuple(int(n) for n in self.eval_seq_lens))
    self.check()
    for n in self.eval_seq_lens:
      try:
        dataclasses.replace(self, seq_len=n, eval_seq_lens=())
      except ValueError as e:
        raise ValueError(f"{self.name}: eval_seq_lens has {n}: {e}") from None

  def check(self):
    """Raises ValueError where the fields do not make a valid task."""

  def require_seq_len(self, minimum, what):
    if self.seq_len < minimum:
      raise ValueError(f"{self.name}: seq_len {self.seq_len} is too short for {what} "
                       f"(needs at least {minimum})")

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


# Zoology's MQAR settings: (sequence length, key-value pairs), vocabulary 8192.
ZOOLOGY_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
  """Multi-query associative recall, as Zoology's generator: key-value pairs first
  (keys from the lower half of the vocabulary, values from the upper half), then
  the keys queried again at power-law distributed gaps; labels only at queries.
  `num_kv_pairs=0` takes Zoology's count for the length (ZOOLOGY_PAIRS), so a sweep
  over seq_len is Zoology's sweep.

  `random_non_queries` fills the query region between queries with random tokens
  (the generator's default). Zoology's Figure 2 sweep turns it off, and at a small
  vocabulary it changes the task: a filler that repeats a context key is a second,
  wrong "key" whose successor is noise (docs/results/synthetic-audit.md)."""
  num_kv_pairs: int = 0
  power_a: float = 0.01
  random_non_queries: bool = False

  def __post_init__(self):
    if not self.num_kv_pairs:
      if self.seq_len not in ZOOLOGY_PAIRS:
        raise ValueError(f"{self.name}: Zoology has no pair count for seq_len {self.seq_len} "
                         f"(it has {ZOOLOGY_PAIRS}); set task.num_kv_pairs")
      object.__setattr__(self, "num_kv_pairs", ZOOLOGY_PAIRS[self.seq_len])
    super().__post_init__()

  def check(self):
    self.require_seq_len(4 * self.num_kv_pairs, f"{self.num_kv_pairs} key-value pairs")
    if self.vocab_size // 2 <= self.num_kv_pairs:
      raise ValueError(f"{self.name}: vocab_size {self.vocab_size} has too few keys for "
                       f"{self.num_kv_pairs} pairs (needs at least "
                       f"{2 * self.num_kv_pairs + 2})")

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
    if self.random_non_queries:
      fill = inputs == 0
      inputs[fill] = rng.integers(0, V, fill.sum())
    mask = labels != -100
    return inputs, np.where(mask, labels, 0), mask


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(Task):
  """Selective copying (Mamba paper, section 4.1.1 and appendix E.1), laid out as
  the generator the paper's experiments used (S4's `torch_copying_data(L, M, A,
  variable=True)`, A = vocab_size):

    tokens: 0 noise; 1 .. V-2 data (uniform, with repeats); V-1 marker.
    inputs: [M data tokens at sorted random positions among the first seq_len - M,
             noise elsewhere] [M markers]
    labels: the data tokens, in order, at the M marker positions (loss only there).

  seq_len is S4's L + 2M, where L (`l_noise`) is the number of noise tokens. The
  paper's setting, "sequences of length 4096" with vocab 16 and M = 16 data tokens,
  is seq_len 4096, vocab_size 16 and the default M; should its 4096 be S4's L
  instead, seq_len is 4096 + 2 * 16 = 4128."""
  num_tokens_to_copy: int = 16  # M

  def check(self):
    M = self.num_tokens_to_copy
    if M < 1:
      raise ValueError(f"{self.name}: num_tokens_to_copy must be at least 1, got {M}")
    if self.vocab_size < 3:
      raise ValueError(f"{self.name}: vocab_size {self.vocab_size} leaves no data tokens "
                       "besides noise (0) and the marker (vocab_size - 1); needs at least 3")
    self.require_seq_len(2 * M, f"num_tokens_to_copy {M} (M data tokens and M markers)")

  def example(self, rng):
    M, V, L = self.num_tokens_to_copy, self.vocab_size, self.seq_len
    data = rng.integers(1, V - 1, M)
    where = np.sort(rng.choice(L - M, M, replace=False))
    inputs = np.zeros(L, np.int64)
    inputs[where] = data
    inputs[L - M:] = V - 1
    labels = np.zeros(L, np.int64)
    labels[L - M:] = data
    mask = np.zeros(L, bool)
    mask[L - M:] = True
    return inputs, labels, mask


@dataclasses.dataclass(frozen=True)
class InductionHeads(Task):
  """Induction heads (Mamba paper, section 4.1.2), as safari's
  `generate_induction_head` (induction_len 1, one trigger):

    tokens: 0 .. V-3 random tokens; V-2 unused (safari's no-op, which keeps its
            16-token vocabulary at 14 random tokens); V-1 the special token
            (safari's copy prefix).
    inputs: random tokens, except the special token at a uniform position
            p < seq_len - 3 and again at the last position, seq_len - 1.
    labels: at the last position only, the token that followed the special token
            (inputs[p + 1]).

  seq_len is safari's input_seq_len + 1 (its random tokens plus the final special
  token): the paper trains at 2^8 = 256 and tests at 2^6 .. 2^20. Vectorised: a
  2^20-token example takes a few milliseconds."""

  def check(self):
    if self.vocab_size < 3:
      raise ValueError(f"{self.name}: vocab_size {self.vocab_size} leaves no random tokens "
                       "besides the no-op and special ids; needs at least 3")
    self.require_seq_len(4, "the special token, its target, one more token and the query")

  def example(self, rng):
    V, L = self.vocab_size, self.seq_len
    inputs = rng.integers(0, V - 2, L)
    p = rng.integers(L - 3)
    inputs[p] = inputs[L - 1] = V - 1
    labels = np.zeros(L, np.int64)
    labels[L - 1] = inputs[p + 1]
    mask = np.zeros(L, bool)
    mask[L - 1] = True
    return inputs, labels, mask


# ListOps symbols: the digits are their own ids, so the answer token is the answer.
LISTOPS_MIN, LISTOPS_MAX, LISTOPS_MED, LISTOPS_SM, LISTOPS_END, LISTOPS_PAD = range(10, 16)
LISTOPS_SYMBOLS = [*map(str, range(10)), "[MIN", "[MAX", "[MED", "[SM", "]", "<pad>"]
_LISTOPS_VALUE_P = 0.25  # LRA's VALUE_P: a node is an operator with this probability
_LISTOPS_TRIES = 100_000


@dataclasses.dataclass(frozen=True)
class ListOps(Task):
  """ListOps as Long Range Arena generates it (lra_benchmarks/data/listops.py), as a
  causal LM task:

    tokens: 0 .. 9 the digits; 10 [MIN, 11 [MAX, 12 [MED, 13 [SM, 14 ], 15 pad.
    inputs: the expression in prefix form, e.g. [MAX 2 9 [MIN 4 7 ] 0 ], then pad.
    labels: the expression's value (a digit token) at its last token (loss only
            there).

  The grammar is LRA's: each node below max_depth is an operator with probability
  1/4 (else a digit), with 2 .. max_args arguments; the root is at depth 1 and a node
  at depth max_depth is always a digit, so operators nest at most max_depth - 1
  deep. MIN and MAX as named, MED is int(np.median(args)) (the mean of the middle two
  rounded down for an even count), SM the sum mod 10. Expressions are drawn until
  min_length < length < max_length (exclusive bounds, as LRA), so LRA's ListOps is
  max_depth 10, max_args 10, min_length 500, max_length 2000, seq_len 2000."""
  max_depth: int = 10
  max_args: int = 10
  min_length: int = 500
  max_length: int = 2000

  def check(self):
    if self.vocab_size < len(LISTOPS_SYMBOLS):
      raise ValueError(f"{self.name}: vocab_size {self.vocab_size} is too small for the "
                       f"{len(LISTOPS_SYMBOLS)} ListOps symbols")
    if self.max_depth < 1 or self.max_args < 2:
      raise ValueError(f"{self.name}: needs max_depth >= 1 and max_args >= 2, got "
                       f"{self.max_depth} and {self.max_args}")
    longest = 1
    for _ in range(self.max_depth - 1):
      longest = min(2 + self.max_args * longest, self.max_length)
    lo, hi = self.min_length + 1, min(self.max_length - 1, longest)
    # An expression is a digit or has 4 tokens or more ([OP d d ]).
    if not (lo <= 1 <= hi or max(lo, 4) <= hi):
      raise ValueError(f"{self.name}: no expression has min_length {self.min_length} < length "
                       f"< max_length {self.max_length} (with max_depth {self.max_depth} and "
                       f"max_args {self.max_args} the longest has {longest} tokens)")
    self.require_seq_len(self.max_length - 1, f"expressions shorter than max_length "
                         f"{self.max_length}")

  def example(self, rng):
    # Python's random, seeded from the row's generator: the tree is drawn one scalar at
    # a time, where it is several times faster than numpy.
    r = random.Random(int(rng.integers(2**63)))
    for _ in range(_LISTOPS_TRIES):
      tokens = []
      value = self._tree(r, tokens, 1)
      if value is not None and self.min_length < len(tokens) < self.max_length:
        break
    else:
      raise RuntimeError(f"{self.name}: no expression with {self.min_length} < length < "
                         f"{self.max_length} in {_LISTOPS_TRIES} draws; widen the lengths or "
                         "raise max_depth / max_args")
    n, L = len(tokens), self.seq_len
    inputs = np.full(L, LISTOPS_PAD, np.int64)
    inputs[:n] = tokens
    labels = np.zeros(L, np.int64)
    labels[n - 1] = value
    mask = np.zeros(L, bool)
    mask[n - 1] = True
    return inputs, labels, mask

  def _tree(self, r, tokens, depth):
    """Appends one subtree to `tokens` and returns its value; None once `tokens` is
    too long (such a draw is rejected anyway, so it is not finished)."""
    if depth >= self.max_depth or r.random() > _LISTOPS_VALUE_P:
      tokens.append(r.randrange(10))
      return tokens[-1]
    op = LISTOPS_MIN + r.randrange(4)
    tokens.append(op)
    args = []
    for _ in range(r.randint(2, self.max_args)):
      value = self._tree(r, tokens, depth + 1)
      if value is None or len(tokens) >= self.max_length:
        return None
      args.append(value)
    tokens.append(LISTOPS_END)
    if op == LISTOPS_MIN:
      return min(args)
    if op == LISTOPS_MAX:
      return max(args)
    if op == LISTOPS_MED:
      args.sort()
      return (args[(len(args) - 1) // 2] + args[len(args) // 2]) // 2
    return sum(args) % 10


TASKS = {"mqar": MQAR, "selective_copy": SelectiveCopy, "induction_heads": InductionHeads,
         "listops": ListOps}


def make_task(config, batch_size, seed):
  """A task from its config (a dict with `name` and the task's fields)."""
  fields = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  name = fields.pop("name")
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  cls = TASKS[name]
  check_keys(fields, {f.name for f in dataclasses.fields(cls)} - LOOP_FIELDS, f"task {name!r}")
  return from_dict(cls, dict(fields, name=name, batch_size=batch_size, seed=seed),
                   f"task {name!r}")
