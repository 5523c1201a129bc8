"""The synthetic tasks: their defining properties, determinism, and bad lengths."""

import dataclasses

import numpy as np
import pytest

from ssm.data import tasks
from ssm.data.tasks import ListOps, MQAR, InductionHeads, SelectiveCopy, make_task

SMALL = {
    "mqar": lambda **kw: MQAR("mqar", 64, 64, 16, num_kv_pairs=8, **kw),
    "selective_copy": lambda **kw: SelectiveCopy("selective_copy", 16, 64, 16,
                                                 num_tokens_to_copy=8, **kw),
    "induction_heads": lambda **kw: InductionHeads("induction_heads", 16, 64, 16, **kw),
    "listops": lambda **kw: ListOps("listops", 16, 128, 16, min_length=16, max_length=128,
                                    **kw),
}


def examples(task, n_batches=4, split="train"):
  for i in range(n_batches):
    b = task.batch(i, split=split)
    yield from zip(b["inputs"], b["labels"], b["loss_mask"].astype(bool))


# --- defining properties ------------------------------------------------------


@pytest.mark.parametrize("n, L", [(4, 64), (8, 128), (16, 256)])
def test_mqar_labels_are_the_values_paired_with_the_queried_keys(n, L):
  task = MQAR("mqar", 8192, L, 8, num_kv_pairs=n)
  V = task.vocab_size
  for x, y, m in examples(task, 2):
    keys, values = x[:2 * n:2], x[1:2 * n:2]
    assert ((1 <= keys) & (keys < V // 2)).all() and ((V // 2 <= values) & (values < V)).all()
    assert len(set(keys)) == n
    pairs = dict(zip(keys, values))
    queries = np.flatnonzero(m)
    assert len(queries) == n and (queries >= 2 * n).all()
    assert sorted(x[queries]) == sorted(keys)  # each key queried once, after the pairs
    assert all(y[t] == pairs[x[t]] for t in queries)


@pytest.mark.parametrize("V, L, M", [(16, 4096, 16), (16, 64, 8), (5, 10, 5), (3, 20, 2)])
def test_selective_copy_targets_are_the_data_tokens_in_order(V, L, M):
  task = SelectiveCopy("selective_copy", V, L, 8, num_tokens_to_copy=M)
  for x, y, m in examples(task, 2):
    body, markers = x[:L - M], x[L - M:]
    assert (markers == V - 1).all() and (body != V - 1).all()
    assert m[L - M:].all() and not m[:L - M].any()
    data = body[body != 0]  # noise is 0, everything else in the body is data
    assert len(data) == M and ((1 <= data) & (data <= V - 2)).all()
    np.testing.assert_array_equal(y[L - M:], data)


@pytest.mark.parametrize("L", [2**k for k in range(2, 15)])
def test_induction_heads_label_is_the_token_after_the_first_special(L):
  task = InductionHeads("induction_heads", 16, L, 8)
  special = task.vocab_size - 1
  for x, y, m in examples(task, 1):
    at = np.flatnonzero(x == special)
    assert len(at) == 2 and at[1] == L - 1 and at[0] < L - 3
    assert (x < special - 1).sum() == L - 2  # the rest random; the no-op id never drawn
    assert np.flatnonzero(m).tolist() == [L - 1]
    assert y[L - 1] == x[at[0] + 1]


def test_induction_heads_at_2_to_the_20():
  # Its speed (vectorised: milliseconds a row) is scripts/bench_tasks.py's.
  task = dataclasses.replace(InductionHeads("induction_heads", 16, 256, 8), seq_len=2**20)
  b = task.batch(0, slice(0, 1), "eval")
  x = b["inputs"][0]
  assert x.shape == (2**20,) and (x == 15).sum() == 2 and b["loss_mask"].sum() == 1
  assert b["labels"][0, -1] == x[np.flatnonzero(x == 15)[0] + 1]


SYMBOL = {tasks.LISTOPS_MIN: "MIN", tasks.LISTOPS_MAX: "MAX", tasks.LISTOPS_MED: "MED",
          tasks.LISTOPS_SM: "SM"}


def parse(tokens):
  """Token ids -> a nested (op, [args]) tree, checking the grammar; independent of the
  generator."""
  def node(i):
    t = tokens[i]
    if t < 10:
      return int(t), i + 1
    assert t in SYMBOL, f"unexpected token {t} at {i}"
    args, i = [], i + 1
    while tokens[i] != tasks.LISTOPS_END:
      arg, i = node(i)
      args.append(arg)
    return (SYMBOL[t], args), i + 1
  tree, end = node(0)
  assert end == len(tokens)
  return tree


def evaluate(tree, seen):
  """LRA's semantics (lra_benchmarks/data/listops.py: to_value)."""
  if isinstance(tree, int):
    return tree
  op, args = tree[0], [evaluate(a, seen) for a in tree[1]]
  seen.add((op, len(args) % 2 == 0 and float(np.median(args)) % 1 != 0))
  return {"MIN": min, "MAX": max, "MED": lambda a: int(np.median(a)),
          "SM": lambda a: int(np.sum(a)) % 10}[op](args)


def shape(tree):
  """(depth with the root at 1 and digits counted, as LRA's max_depth; most args)."""
  if isinstance(tree, int):
    return 1, 0
  sub = [shape(a) for a in tree[1]]
  return 1 + max(d for d, _ in sub), max(len(tree[1]), *(a for _, a in sub))


@pytest.mark.parametrize("depth, args, lo, hi", [(10, 10, 16, 128), (4, 3, 5, 40),
                                                  (10, 10, 500, 2000)])
def test_listops_label_is_the_value_of_the_expression(depth, args, lo, hi):
  task = ListOps("listops", 16, hi, 8, max_depth=depth, max_args=args, min_length=lo,
                 max_length=hi)
  seen = set()
  for x, y, m in examples(task, 12 if hi <= 128 else 2):
    n = int((x != tasks.LISTOPS_PAD).sum())
    assert lo < n < hi and (x[n:] == tasks.LISTOPS_PAD).all()
    assert np.flatnonzero(m).tolist() == [n - 1]
    tree = parse(x[:n].tolist())
    tree_depth, most_args = shape(tree)
    assert tree_depth <= depth and 2 <= most_args <= args
    assert y[n - 1] == evaluate(tree, seen)
  if hi <= 128:  # every operator came up, MED with a .5 median too
    assert {op for op, _ in seen} == set(SYMBOL.values()) and ("MED", True) in seen


def test_listops_evaluator_on_known_expressions():
  ids = {"[MIN": 10, "[MAX": 11, "[MED": 12, "[SM": 13, "]": 14}
  enc = lambda s: [ids[w] if w in ids else int(w) for w in s.split()]
  for expr, value in [("[MED 1 2 ]", 1), ("[MED 3 0 9 4 ]", 3), ("[SM 9 8 ]", 7),
                      ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM [MED 5 6 ] 7 ]", 2)]:
    assert evaluate(parse(enc(expr)), set()) == value
  assert tasks.LISTOPS_SYMBOLS[10:15] == list(ids)


def test_tokens_are_in_the_vocabulary():
  for name, make in SMALL.items():
    task = make()
    b = task.batch(0)
    assert 0 <= b["inputs"].min() and b["inputs"].max() < task.vocab_size, name
    assert 0 <= b["labels"].min() and b["labels"].max() < task.vocab_size, name
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32


# --- determinism --------------------------------------------------------------


@pytest.mark.parametrize("name", list(SMALL))
def test_batches_are_a_function_of_seed_split_index_and_row(name):
  task = SMALL[name]()
  full = task.batch(3)
  for k, v in task.batch(3).items():
    np.testing.assert_array_equal(v, full[k])
  for rows in (slice(0, 1), slice(5, 9), slice(15, 16)):
    part = task.batch(3, rows)
    for k, v in part.items():
      np.testing.assert_array_equal(v, full[k][rows], err_msg=f"{name} {rows}")
  differ = lambda b: not np.array_equal(b["inputs"], full["inputs"])
  assert differ(task.batch(3, split="eval"))
  assert differ(task.batch(4))
  assert differ(SMALL[name](seed=1).batch(3))


# --- bad lengths --------------------------------------------------------------


@pytest.mark.parametrize("make, minimum", [
    (lambda L: MQAR("mqar", 64, L, 2, num_kv_pairs=8), 32),
    (lambda L: SelectiveCopy("selective_copy", 16, L, 2, num_tokens_to_copy=16), 32),
    (lambda L: InductionHeads("induction_heads", 16, L, 2), 4),
    (lambda L: ListOps("listops", 16, L, 2, min_length=16, max_length=128), 127),
])
def test_too_short_a_sequence_is_an_error_naming_the_minimum(make, minimum):
  make(minimum).batch(0)
  with pytest.raises(ValueError, match=rf"seq_len {minimum - 1} is too short.*at least {minimum}"):
    make(minimum - 1)
  with pytest.raises(ValueError, match=rf"eval_seq_lens has {minimum - 1}"):
    dataclasses.replace(make(minimum), eval_seq_lens=(minimum, minimum - 1))


def test_other_bad_parameters_are_errors():
  with pytest.raises(ValueError, match="vocab_size 16 has too few keys"):
    MQAR("mqar", 16, 64, 2, num_kv_pairs=8)
  with pytest.raises(ValueError, match="vocab_size 2"):
    SelectiveCopy("selective_copy", 2, 64, 2)
  with pytest.raises(ValueError, match="vocab_size 8"):
    ListOps("listops", 8, 128, 2, min_length=16, max_length=128)
  with pytest.raises(ValueError, match="no expression has"):  # the longest has 2 + 2 * 2
    ListOps("listops", 16, 128, 2, max_depth=2, max_args=2, min_length=16, max_length=128)


def test_make_task():
  task = make_task(dict(name="induction_heads", vocab_size=16, seq_len=256,
                        eval_seq_lens=[64, 1024]), 4, 0)
  assert isinstance(task, InductionHeads) and task.eval_seq_lens == (64, 1024)
  for n in task.eval_seq_lens:
    batch = dataclasses.replace(task, seq_len=n).batch(0, slice(0, 2), "eval")
    assert batch["inputs"].shape == (2, n)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    make_task(dict(name="nope"), 4, 0)
  with pytest.raises(ValueError, match=r"unknown keys \['num_pairs'\].*num_kv_pairs"):
    make_task(dict(name="mqar", vocab_size=64, seq_len=64, num_pairs=4), 4, 0)


def test_mqar_takes_zoologys_pair_counts_by_default():
  for L, n in [(64, 4), (128, 8), (256, 16), (512, 64)]:
    task = MQAR("mqar", 8192, L, 2)
    assert task.num_kv_pairs == n
    assert task.batch(0)["loss_mask"].sum() == 2 * n  # one label per query
  with pytest.raises(ValueError, match="no pair count for seq_len 100"):
    MQAR("mqar", 8192, 100, 2)
