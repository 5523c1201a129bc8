"""ssm.generate.speculative: the rejection rule on hand-made distributions gives the
target's distribution; a draft whose vocabulary is padded otherwise than the target's
works, and no padding id is ever a token. (Speculative decoding of models against plain
decoding: tests/test_generate.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.generate import generate, speculative_generate
from ssm.generate.speculative import verify
from test_generate import GREEDY, PROMPTS, chisquare_pvalue, tiny

# The target's p_1, p_2, p_3 and the draft's q_1, q_2 over 5 tokens (k = 2). Each kind
# of token is here: p > q, p < q, q = 0 < p (only the residual gives it), p = 0 < q
# (never given).
P = np.array([[.5, .3, .2, 0, 0], [.1, .2, .3, .4, 0], [0, 0, .25, .25, .5]])
Q = np.array([[.2, .2, .2, .2, .2], [.4, .4, 0, .1, .1]])


@functools.partial(jax.jit, static_argnums=2)
def rule(p, q, n_rows, seed=0):
  """Draft tokens drawn from q (each position independently: a draft and a target whose
  distributions do not depend on the context), then the rule: (n, extra, d) per row."""
  keys = jax.random.split(jax.random.key(seed), (n_rows, 2))
  log_q = jnp.log(jnp.asarray(q, jnp.float32))
  d = jax.vmap(lambda key: jax.random.categorical(key, log_q).astype(jnp.int32))(keys[:, 0])
  n, extra = jax.vmap(verify, (0, 0, None, None))(keys[:, 1], d, jnp.asarray(q, jnp.float32),
                                                  jnp.asarray(p, jnp.float32))
  return n, extra, d


def test_the_rejection_rule_gives_the_targets_distribution():
  """200,000 rows: the round's j-th token (d_j while accepted, then the extra token) is
  distributed as p_j, among the rows whose round reaches it (chi-square, p-value above
  1e-3 with this fixed key), and d_1 is accepted with probability
  sum min(p_1, q_1) = .6 (within 0.005, 4.5 standard deviations)."""
  rows = 200_000
  n, extra, d = map(np.asarray, rule(P, Q, rows))
  tokens = np.where(np.arange(2) < n[:, None], d, extra[:, None])  # d_j, or the extra token
  reached = [np.ones(rows, bool), n >= 1, n == 2]
  for j, p in enumerate(P):
    token = tokens[:, j] if j < 2 else extra
    counts = np.bincount(token[reached[j]], minlength=5)
    assert counts[p == 0].sum() == 0, j
    assert chisquare_pvalue(counts, p) > 1e-3, (j, counts / counts.sum())
  assert abs(np.mean(n >= 1) - np.minimum(P[0], Q[0]).sum()) < 0.005
  assert abs(np.mean(n == 2) - .6 * np.minimum(P[1], Q[1]).sum()) < 0.005
  # The test has power: the draft's own tokens are not the target's.
  assert chisquare_pvalue(np.bincount(d[:, 0], minlength=5), P[0]) == 0.0


def test_the_rejection_rule_exactly():
  # q = p: every draft token accepted, whatever u; the extra token from p_3.
  n, extra, _ = map(np.asarray, rule(P, P[:2], 2000))
  assert (n == 2).all() and set(extra.tolist()) <= {2, 3, 4}
  # Greedy (one-hot p and q): d_1 = 1 is the target's argmax, d_2 = 0 is not; the extra
  # token is the target's argmax 3.
  n, extra, d = map(np.asarray, rule(np.eye(5)[[1, 3, 4]], np.eye(5)[[1, 0]], 100))
  assert (d == [1, 0]).all() and (n == 1).all() and (extra == 3).all()


def test_a_draft_with_another_vocabulary_padding():
  """A target of 13 tokens padded to 16 (a trained run's multiple of 8) with a draft
  padded to a multiple of 1 (an imported checkpoint's). The target's three padding ids
  are made its likeliest logits by far: they are never tokens, greedy or sampled."""
  target = tiny("gpt2", 0)
  draft = tiny("mamba", 1, pad_vocab_size_multiple=1)
  assert (target.config.padded_vocab_size, draft.config.padded_vocab_size) == (16, 13)
  # LayerNorm's bias puts 100 on feature 0, which only the padding ids read.
  target.norm_f.bias.set_value(target.norm_f.bias[...].at[0].set(100.0))
  kernel = target.lm_head.kernel[...]
  target.lm_head.kernel.set_value(kernel.at[0, :13].set(0.0).at[0, 13:].set(1.0))
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(target, jnp.asarray([PROMPTS[0]])))
  assert (logits[..., 13:].min(-1) > logits[..., :13].max(-1) + 50).all()

  expected = generate(target, PROMPTS, 8, GREEDY).rows()
  out = speculative_generate(target, draft, PROMPTS, 8, k=3, sampling=GREEDY)
  assert out.rows() == expected and out.proposed > 0
  sampled = speculative_generate(target, draft, PROMPTS * 20, 8, k=3, seed=2)
  assert sampled.tokens.max() < 13 and (sampled.lengths == 8).all()
