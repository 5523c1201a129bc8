"""Samplers: each a small pure function of the logits (B, V) -> (B, V), a removed
token's logit set to -inf, so that they compose and the softmax renormalises
over what is left. `Sampling` names a composition, applied in Hugging Face's
order: repetition penalty, temperature, top-k, top-p, min-p.

  p_i = softmax(l / T)_i                        temperature T (T = 0: greedy, argmax)
  top-k:  keep i where l_i >= the k-th largest logit
  top-p:  keep the smallest set of most likely tokens whose mass reaches p
  min-p:  keep i where p_i >= min_p * max_j p_j   (Nguyen et al. 2024)
  repetition penalty r (Keskar et al. 2019, CTRL): a token already in the row has
          l / r if l > 0, else l * r
"""

import dataclasses

import jax
import jax.numpy as jnp

from ssm.fields import require

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  min_p: float = 0.0  # 0: off
  repetition_penalty: float = 1.0  # 1: off

  def __post_init__(self):
    require("sampling", temperature=(self.temperature, self.temperature >= 0, "must be >= 0"),
            top_k=(self.top_k, self.top_k >= 0, "must be >= 0 (0: off)"),
            top_p=(self.top_p, 0 < self.top_p <= 1, "must be in (0, 1]"),
            min_p=(self.min_p, 0 <= self.min_p <= 1, "must be in [0, 1]"),
            repetition_penalty=(self.repetition_penalty, self.repetition_penalty > 0,
                                "must be > 0 (1: off)"))

  @property
  def greedy(self):
    return self.temperature == 0


def mask_vocab(logits_BV, vocab_size):
  """The padded vocabulary's extra ids are never tokens."""
  return jnp.where(jnp.arange(logits_BV.shape[-1]) < vocab_size, logits_BV, NEG_INF)


def temperature(logits_BV, t):
  return logits_BV / t


def top_k(logits_BV, k):
  """The k largest logits (and any tied with the k-th) kept."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def top_p(logits_BV, p):
  """Nucleus: tokens in order of probability while the mass before them is < p (so
  the most likely is always kept, and the kept mass is >= p)."""
  if p >= 1:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  kept = jnp.sum(before_BV < p, axis=-1, keepdims=True)  # >= 1
  threshold_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, NEG_INF)


def min_p(logits_BV, p):
  """Tokens at least p times as likely as the most likely: p_i / p_max = exp(l_i - l_max)."""
  if p <= 0:
    return logits_BV
  top_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  return jnp.where(logits_BV - top_B1 >= jnp.log(p), logits_BV, NEG_INF)


def repetition_penalty(logits_BV, seen_BV, r):
  """CTRL's penalty on the tokens `seen` (bool, (B, V)) in the row so far."""
  if r == 1:
    return logits_BV
  penalised = jnp.where(logits_BV > 0, logits_BV / r, logits_BV * r)
  return jnp.where(seen_BV, penalised, logits_BV)


def process(logits_BV, sampling: Sampling, vocab_size, seen_BV=None):
  """The logits `sampling` samples from: the composition above, padding ids removed.
  Greedy keeps the logits (argmax is unchanged by temperature and the filters)."""
  x = mask_vocab(logits_BV.astype(jnp.float32), vocab_size)
  if seen_BV is not None:
    x = repetition_penalty(x, seen_BV, sampling.repetition_penalty)
  if sampling.greedy:
    return x
  x = temperature(x, sampling.temperature)
  return min_p(top_p(top_k(x, sampling.top_k), sampling.top_p), sampling.min_p)


def probabilities(logits_BV, sampling: Sampling, vocab_size, seen_BV=None):
  """The distribution a token is drawn from, (B, V): one-hot at the argmax when
  greedy (so speculative decoding's rule needs no special case)."""
  x = process(logits_BV, sampling, vocab_size, seen_BV)
  if sampling.greedy:
    return jax.nn.one_hot(jnp.argmax(x, axis=-1), x.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(x, axis=-1)


def pick(keys_B, logits_BV, sampling: Sampling, vocab_size, seen_BV=None):
  """One token per row (int32, (B,)), row b drawn with its own key."""
  x = process(logits_BV, sampling, vocab_size, seen_BV)
  if sampling.greedy:
    return jnp.argmax(x, axis=-1).astype(jnp.int32)
  return jax.vmap(jax.random.categorical)(keys_B, x).astype(jnp.int32)
