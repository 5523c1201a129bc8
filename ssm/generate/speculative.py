"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft
model proposes k tokens, the target scores them all in one call, and each is
accepted by the rejection rule, so that the output is distributed exactly as the
target's (under the same Sampling: temperature, top-k, top-p, min-p).

A round, for each row, with `last` the newest token (in neither cache yet):
  draft:  feeds last, d_1, ..., d_k (k + 1 steps), drawing d_j ~ q_j
  target: scores last, d_1, ..., d_k in one call: p_1, ..., p_{k+1}
  accept d_j while u_j < p_j(d_j) / q_j(d_j) (u_j ~ U[0, 1)); n the number accepted
  then one more token, from norm(max(0, p_{n+1} - q_{n+1})) if n < k, else from p_{k+1}
so a round gives n + 1 tokens for one target call. Greedy is the case of one-hot p
and q: a draft token is kept while it is the target's argmax, and the first
mismatch is replaced by the target's argmax, so the output is the target's greedy
output exactly. Rows accept different numbers and advance apart: both caches are
rewound per row (LanguageModel.rewind). Attention layers of the target score the
k + 1 tokens in parallel; recurrent layers step through them in the same call,
keeping each state for the rewind.

Draft and target may be of different families; they must share the vocabulary (its
padding, pad_vocab_size_multiple, may differ: both are read over the real ids).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.generate.decode import NO_TOKEN, check_model, prepare, row_keys
from ssm.generate.sampling import Sampling, probabilities


class SpeculativeGeneration(NamedTuple):
  tokens: np.ndarray  # (B, max_new_tokens), NO_TOKEN after a row stopped
  lengths: np.ndarray  # (B,)
  accepted: int  # draft tokens accepted, all rows
  proposed: int  # draft tokens proposed, all rows
  rounds: int  # target calls after the prefill

  @property
  def acceptance_rate(self):
    return self.accepted / max(self.proposed, 1)

  def rows(self):
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def speculative_generate(target, draft, prompts, max_new_tokens, k=4,
                         sampling: Sampling = Sampling(), stop_tokens=(), seed=0):
  """As ssm.generate.generate for `target`, with `draft` proposing `k` tokens a
  round. Returns a SpeculativeGeneration (the acceptance counts with the tokens)."""
  check_model(draft)
  if int(k) < 1:
    raise ValueError(f"k={k}: the draft proposes k >= 1 tokens a round")
  if draft.config.vocab_size != target.config.vocab_size:
    raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) is not the "
                     f"target's ({target.config.vocab_size}): a draft must share the "
                     "target's tokenizer")
  if sampling.repetition_penalty != 1:
    raise ValueError("speculative decoding supports no repetition penalty (the draft's and "
                     "the target's histories would differ within a round): use generate")
  ids, reset, stops, max_length = prepare(target, prompts, max_new_tokens, stop_tokens,
                                          extra=int(k) + 1)
  prepare(draft, prompts, max_new_tokens, stop_tokens, extra=int(k) + 1)  # its own limits
  gt, st = nnx.split(target)
  gd, sd = nnx.split(draft)
  tokens, accepted, proposed, rounds = _speculative(
      gt, gd, st, sd, jnp.asarray(ids), jnp.asarray(reset), jnp.asarray(stops),
      row_keys(seed, ids.shape[0]), sampling=sampling, k=int(k),
      max_new_tokens=int(max_new_tokens), max_length=max_length)
  tokens = np.asarray(tokens)
  return SpeculativeGeneration(tokens, (tokens != NO_TOKEN).sum(axis=1), int(accepted),
                               int(proposed), int(rounds))


def _draw(key, p_V):
  return jax.random.categorical(key, jnp.log(p_V)).astype(jnp.int32)


def verify(key, d_K, q_KV, p_TV):
  """The rejection rule for one row, a pure function of the distributions: draft
  tokens d_K drawn from q_KV (k, V), the target's p_TV (k + 1, V) at the same
  positions. d_j is accepted with probability min(1, p_j(d_j) / q_j(d_j)) while all
  before it were; after n acceptances one more token comes from norm(max(0, p - q))
  at position n + 1 (q = 0 there when n = k: p itself). Returns (n, that token); the
  round's tokens d_1..d_n, token are distributed as the target's."""
  k = d_K.shape[0]
  u_key, extra_key = jax.random.split(key)
  p_d = p_TV[jnp.arange(k), d_K]
  q_d = q_KV[jnp.arange(k), d_K]
  ok_K = jax.random.uniform(u_key, (k,)) * q_d < p_d  # u < p / q, without dividing by q
  n = jnp.sum(jnp.cumprod(ok_K)).astype(jnp.int32)
  p_next = p_TV[n]
  q_next = jnp.concatenate([q_KV, jnp.zeros_like(q_KV[:1])])[n]
  residual = jnp.maximum(p_next - q_next, 0)
  mass = jnp.sum(residual)
  # (p = q to rounding leaves nothing: then p itself, the limit of the rule)
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1), p_next)
  return n, _draw(extra_key, residual)


def _recurrent(model):
  """Per layer: whether its cache must be rewound from a trail (no parallel `extend`)."""
  return [not hasattr(layer.mixer, "extend") for layer in model.layers]


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("sampling", "k", "max_new_tokens", "max_length"))
def _speculative(gt, gd, st, sd, ids_BP, reset_BP, stops_BS, keys_B, *, sampling, k,
                 max_new_tokens, max_length):
  target, draft = nnx.merge(gt, st), nnx.merge(gd, sd)
  V = target.config.vocab_size
  B = ids_BP.shape[0]
  rows = jnp.arange(B)
  # Over the real vocabulary: draft and target may pad it to different sizes, and a
  # padding id is never a token.
  probs = lambda logits: probabilities(logits[..., :V], sampling, V)
  draw = jax.vmap(_draw)
  logits_t, cache_t = target(ids_BP, reset_BP, return_cache=True, max_length=max_length)
  _, cache_d = draft(ids_BP, reset_BP, return_cache=True, max_length=max_length)
  # The first token from the target's prefill; both caches have seen the prompt only.
  first_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, 0)
  last_B = draw(first_keys, probs(logits_t[:, -1]))
  out = jnp.full((B, max_new_tokens + k + 1), NO_TOKEN, jnp.int32).at[:, 0].set(last_B)
  done = jnp.any(last_B[:, None] == stops_BS, axis=1) | (max_new_tokens <= 1)
  count = jnp.ones((B,), jnp.int32)
  recurrent_d = _recurrent(draft)

  def propose(cache_d, last_B, keys_B):
    """k + 1 draft steps: tokens d_1..d_k, their distributions q_1..q_k, the trails."""
    def one(carry, j):
      cache, token_B = carry
      logits_BV, cache = draft.step(token_B, cache)
      q_BV = probs(logits_BV)
      keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, j)
      nxt = draw(keys, q_BV)
      trail = [c if r else None for c, r in zip(cache.layers, recurrent_d)]
      return (cache, nxt), (nxt, q_BV, trail)

    (cache_d, _), (d_KB, q_KBV, trails) = jax.lax.scan(one, (cache_d, last_B),
                                                       jnp.arange(k + 1))
    return cache_d, d_KB[:k].T, jnp.swapaxes(q_KBV[:k], 0, 1), trails

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    r, cache_t, cache_d, last_B, done, count, out, accepted, proposed = carry
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, r + 1)
    split = jax.vmap(jax.random.split)(keys)
    cache_d, d_BK, q_BKV, trails_d = propose(cache_d, last_B, split[:, 0])
    fed_BT = jnp.concatenate([last_B[:, None], d_BK], axis=1)  # (B, k + 1)
    logits_BTV, cache_t, trails_t = target.extend(fed_BT, cache_t)
    p_BTV = probs(logits_BTV.reshape(B * (k + 1), -1)).reshape(B, k + 1, -1)
    n_B, extra_B = jax.vmap(verify)(split[:, 1], d_BK, q_BKV, p_BTV)
    # This round's tokens: d_1..d_n, then the extra one.
    j = jnp.arange(k + 1)
    d_pad = jnp.concatenate([d_BK, jnp.zeros_like(d_BK[:, :1])], axis=1)
    new_BT = jnp.where(j < n_B[:, None], d_pad, extra_B[:, None])
    stop_BT = jnp.any(new_BT[..., None] == stops_BS[:, None], axis=-1) & (j <= n_B[:, None])
    first_stop = jnp.where(jnp.any(stop_BT, axis=1), jnp.argmax(stop_BT, axis=1), k + 1)
    keep_BT = ((j <= n_B[:, None]) & (j <= first_stop[:, None]) & ~done[:, None]
               & (count[:, None] + j < max_new_tokens))
    slot = jnp.where(keep_BT, count[:, None] + j, out.shape[1])
    out = out.at[rows[:, None], slot].set(new_BT, mode="drop")
    active = ~done
    count = count + jnp.sum(keep_BT, axis=1)
    done = done | jnp.any(stop_BT & keep_BT, axis=1) | (count >= max_new_tokens)
    # Both caches took last, d_1..d_k; they keep last, d_1..d_n.
    cache_t = target.rewind(cache_t, trails_t, n_B + 1, k + 1)
    cache_d = draft.rewind(cache_d, trails_d, n_B + 1, k + 1)
    accepted = accepted + jnp.sum(jnp.where(active, n_B, 0))
    proposed = proposed + k * jnp.sum(active)
    return r + 1, cache_t, cache_d, extra_B, done, count, out, accepted, proposed

  zero = jnp.asarray(0, jnp.int32)
  carry = (zero, cache_t, cache_d, last_B, done, count, out, zero, zero)
  r, *_, out, accepted, proposed = jax.lax.while_loop(cond, body, carry)
  return out[:, :max_new_tokens], accepted, proposed, r
