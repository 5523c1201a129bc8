"""ssm.generate.sampling: each filter keeps exactly its tokens and renormalises; sampled
frequencies match the distribution (chi-square); bad values are errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ssm.generate import sampling as S
from ssm.generate.decode import row_keys

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def kept(logits):
  return set(np.flatnonzero(np.isfinite(np.asarray(logits)[0])).tolist())


def test_filters_keep_exactly_their_tokens():
  assert kept(S.top_k(LOGITS, 3)) == {0, 1, 2}
  assert kept(S.top_k(LOGITS, 0)) == kept(S.top_k(LOGITS, 6)) == set(range(6))
  # top-p: mass before each token 0, .4, .65, .8, .9, .96
  assert kept(S.top_p(LOGITS, 0.7)) == {0, 1, 2}
  assert kept(S.top_p(LOGITS, 0.6)) == {0, 1}
  assert kept(S.top_p(LOGITS, 0.3)) == {0}  # the most likely always stays
  assert kept(S.top_p(LOGITS, 1.0)) == set(range(6))
  # min-p: p_i >= min_p * 0.4
  assert kept(S.min_p(LOGITS, 0.3)) == {0, 1, 2}  # >= 0.12
  assert kept(S.min_p(LOGITS, 0.6)) == {0, 1}  # >= 0.24
  assert kept(S.mask_vocab(LOGITS, 4)) == {0, 1, 2, 3}
  # ties with the k-th logit are kept
  assert kept(S.top_k(jnp.array([[1.0, 2.0, 2.0, 0.0]]), 1)) == {1, 2}


def test_compositions_renormalise_over_what_is_kept():
  sampling = S.Sampling(temperature=0.5, top_k=4, top_p=0.9)
  p = np.asarray(S.probabilities(LOGITS, sampling, vocab_size=6))[0]
  expected = PROBS ** 2 * (np.arange(6) < 4)  # T = 0.5 squares the odds; top-4
  expected /= expected.sum()  # .4^2, .25^2, .15^2, .1^2 -> .60, .23, .08, .04 (cum .91)
  expected = expected * (np.cumsum(expected) - expected < 0.9)
  np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-5, atol=1e-7)
  greedy = S.probabilities(LOGITS[:, ::-1], S.Sampling(temperature=0), vocab_size=6)
  np.testing.assert_array_equal(greedy[0], np.eye(6)[5])


def test_top_p_and_min_p_give_the_hand_computed_distributions():
  probs = lambda **kw: np.asarray(S.probabilities(LOGITS, S.Sampling(**kw), vocab_size=6))[0]
  check = lambda kw, expected: np.testing.assert_allclose(probs(**kw), expected, rtol=1e-5,
                                                          atol=1e-7)
  # top-p 0.7: the mass before .4, .25, .15 is 0, .4, .65 < .7; they hold .8
  check(dict(top_p=0.7), [.5, .3125, .1875, 0, 0, 0])
  # min-p 0.2: p >= .08 keeps .4, .25, .15, .1, which hold .9
  check(dict(min_p=0.2), [.4 / .9, .25 / .9, .15 / .9, .1 / .9, 0, 0])
  # T = 2: p ~ sqrt(p) = .6325, .5, .3873, .3162, .2449, .2 (sum 2.2809), so .2773, .2192,
  # .1698, ...; top-p .45: the mass before is 0, .2773, .4965 -> two kept
  root = np.sqrt(PROBS)
  check(dict(temperature=2.0, top_p=0.45), root * [1, 1, 0, 0, 0, 0] / root[:2].sum())
  # T = 2, min-p .6: sqrt(p) >= .6 * .6325 = .3795 keeps three
  check(dict(temperature=2.0, min_p=0.6), root * [1, 1, 1, 0, 0, 0] / root[:3].sum())
  # top-p .9 keeps four (.4, .25, .15, .1: .9), then min-p .5 those >= .2 / .9 of it: two
  check(dict(top_p=0.9, min_p=0.5), [.4 / .65, .25 / .65, 0, 0, 0, 0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
  logits = jnp.array([[2.0, -1.0, 3.0, -2.0]])
  seen = jnp.array([[True, True, False, False]])
  out = S.repetition_penalty(logits, seen, 2.0)
  np.testing.assert_allclose(out, [[1.0, -2.0, 3.0, -2.0]])
  assert S.repetition_penalty(logits, seen, 1.0) is logits


@pytest.mark.parametrize("sampling", [S.Sampling(temperature=1.0),
                                      S.Sampling(temperature=0.7, top_k=4, min_p=0.1)])
def test_sampled_frequencies_match_the_distribution(sampling):
  """A chi-square test on 20,000 draws (one row each, its own key); the same draws are
  rejected against the unfiltered distribution when filters change it (the test has
  power)."""
  n = 20_000
  logits = jnp.broadcast_to(LOGITS, (n, 6))
  draws = np.asarray(S.pick(row_keys(0, n), logits, sampling, vocab_size=6))
  counts = np.bincount(draws, minlength=6)
  # expected, from numpy: softmax(l / T), top-k, min-p (relative to the max), renormalised
  p = PROBS ** (1 / sampling.temperature)
  p /= p.sum()
  if sampling.top_k:
    p = p * (np.argsort(np.argsort(-p)) < sampling.top_k)
  p = p * (p >= sampling.min_p * p.max())
  p /= p.sum()
  support = p > 0
  assert counts[~support].sum() == 0
  assert stats.chisquare(counts[support], n * p[support]).pvalue > 1e-3
  if sampling.top_k:
    plain = PROBS ** (1 / sampling.temperature)
    plain /= plain.sum()
    assert stats.chisquare(counts, n * plain).pvalue < 1e-6


def test_bad_values_are_errors():
  for field, value in [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
                       ("min_p", 2.0), ("repetition_penalty", 0.0)]:
    with pytest.raises(ValueError, match=f"sampling.{field}="):
      S.Sampling(**{field: value})
