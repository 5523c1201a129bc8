"""Generation: prefill the prompts through the parallel path (scan / attention), then
decode in one compiled loop (`lax.while_loop`), one token per row per iteration.

Prompts of different lengths are left-padded to one length P, with `reset` at
each row's first real token: the scan and the convolution restart there,
positions restart at 0 and attention keeps to the document (ssm.models.lm), so no
row sees padding, and the cache continues each row from its own length. Row b
draws its tokens with key fold_in(fold_in(key(seed), b), t) at step t, so a row's
tokens depend on its prompt, its index and the seed, not on the other rows. A row
stops at its first stop token (kept in its output); after it the row holds -1.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.generate.sampling import Sampling, pick
from ssm.models.lm import LanguageModel

NO_TOKEN = -1  # in `tokens` after a row stopped, and pads `stops`


class Generation(NamedTuple):
  tokens: np.ndarray  # (B, max_new_tokens) int32: new tokens, NO_TOKEN after a row stopped
  lengths: np.ndarray  # (B,) new tokens per row (its stop token included)

  def rows(self):
    """The new tokens of each row, as lists."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def check_model(model):
  if not isinstance(model, LanguageModel):
    raise ValueError(f"generation needs a language model (ssm.models.LanguageModel), got a "
                     f"{type(model).__name__}: give the workdir of a language-model run")
  for layer in model.layers:
    if not hasattr(layer.mixer, "step"):
      raise ValueError(f"{type(layer.mixer).__name__} layers cannot decode (no step)")


def prepare(model, prompts, max_new_tokens, stop_tokens, extra=0):
  """Validated, left-padded prompts: (ids (B, P), reset (B, P), stops (B, S), cache
  length). `extra`: cache slots beyond P + max_new_tokens (speculative look-ahead)."""
  check_model(model)
  config = model.config
  V = config.vocab_size
  if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
    raise ValueError("prompts: expected a list of token-id lists, one per row")
  prompts = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError("prompts: no prompts given (expected a list of token-id lists)")
  for i, p in enumerate(prompts):
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (byte "
                       "models: the BOS token 256 starts a document)")
    if p.min() < 0 or p.max() >= V:
      raise ValueError(f"prompt {i}: token ids must be in [0, {V}) (the vocabulary), got "
                       f"{int(p.min())}..{int(p.max())}")
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
  P = max(p.size for p in prompts)
  if config.positions == "learned":
    limit = config.max_position_embeddings
    longest = P + max_new_tokens + extra
    if longest > limit:
      ahead = f" plus the draft's look-ahead ({extra})" if extra else ""
      raise ValueError(f"the longest prompt ({P} tokens) plus max_new_tokens "
                       f"({max_new_tokens}){ahead} is {longest}, more than the model's "
                       f"{limit} positions (max_position_embeddings): shorten the prompt "
                       "or generate fewer tokens")
  stops = _stops(stop_tokens, len(prompts), V)
  ids = np.zeros((len(prompts), P), np.int32)
  reset = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    ids[i, P - p.size:] = p
    reset[i, P - p.size] = True
  return ids, reset, stops, P + max_new_tokens + extra


def _stops(stop_tokens, B, V):
  """(B, S) stop ids, NO_TOKEN-padded: one list for all rows, or one list per row."""
  stop_tokens = list(stop_tokens or ())
  per_row = stop_tokens and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_tokens)
  if per_row and len(stop_tokens) != B:
    raise ValueError(f"stop_tokens: {len(stop_tokens)} lists for {B} prompts (give one "
                     "list for all rows, or one per row)")
  rows = [list(s) for s in stop_tokens] if per_row else [stop_tokens] * B
  for row in rows:
    for s in row:
      if not isinstance(s, (int, np.integer)) or not 0 <= s < V:
        raise ValueError(f"unknown stop token {s!r}: stop tokens are ids in [0, {V}) "
                         "(the model's vocabulary)")
  S = max([len(r) for r in rows] + [1])
  stops = np.full((B, S), NO_TOKEN, np.int32)
  for i, row in enumerate(rows):
    stops[i, :len(row)] = row
  return stops


def row_keys(seed, batch):
  return jax.vmap(lambda b: jax.random.fold_in(jax.random.key(seed), b))(jnp.arange(batch))


def seen_tokens(ids_BP, reset_BP, V):
  """(B, V) bool: the prompt's tokens (for the repetition penalty), padding left out."""
  real = jnp.cumsum(reset_BP, axis=1) > 0
  rows = jnp.arange(ids_BP.shape[0])[:, None]
  return jnp.zeros((ids_BP.shape[0], V), bool).at[rows, jnp.where(real, ids_BP, V)].set(
      True, mode="drop")


def mark_seen(seen_BV, tokens_B):
  if seen_BV is None:
    return None
  V = seen_BV.shape[1]
  rows = jnp.arange(tokens_B.shape[0])
  return seen_BV.at[rows, jnp.where(tokens_B < 0, V, tokens_B)].set(True, mode="drop")


def generate(model, prompts, max_new_tokens, sampling: Sampling = Sampling(), stop_tokens=(),
             seed=0):
  """Up to `max_new_tokens` new tokens for each prompt (a list of token-id lists of
  any lengths). `stop_tokens`: ids that end a row (one list, or one list per row).
  Returns a Generation."""
  ids, reset, stops, max_length = prepare(model, prompts, max_new_tokens, stop_tokens)
  graphdef, state = nnx.split(model)
  started = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(reset),
                    with_seen=sampling.repetition_penalty != 1, max_length=max_length)
  tokens = decode(graphdef, state, *started, jnp.asarray(stops), row_keys(seed, ids.shape[0]),
                  sampling=sampling, max_new_tokens=int(max_new_tokens))
  tokens = np.asarray(tokens)
  return Generation(tokens, (tokens != NO_TOKEN).sum(axis=1))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("with_seen", "max_length"))
def prefill(graphdef, state, ids_BP, reset_BP, *, with_seen, max_length):
  """The prompts through the parallel path: (the last position's logits, the cache,
  the prompt's tokens as (B, V) bool where the repetition penalty needs them)."""
  model = nnx.merge(graphdef, state)
  logits_BPV, cache = model(ids_BP, reset_BP, return_cache=True, max_length=max_length)
  seen = seen_tokens(ids_BP, reset_BP, logits_BPV.shape[-1]) if with_seen else None
  return logits_BPV[:, -1], cache, seen


@functools.partial(jax.jit, static_argnums=0, static_argnames=("sampling", "max_new_tokens"))
def decode(graphdef, state, logits_BV, cache, seen, stops_BS, keys_B, *, sampling,
           max_new_tokens):
  """The decode loop, one compiled `while_loop`: (B, max_new_tokens) new tokens."""
  model = nnx.merge(graphdef, state)
  V = model.config.vocab_size
  B = logits_BV.shape[0]

  def cond(carry):
    t, _, _, _, done, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, cache, logits_BV, seen, done, out = carry
    keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, t)
    token_B = jnp.where(done, NO_TOKEN, pick(keys, logits_BV, sampling, V, seen))
    out = out.at[:, t].set(token_B)
    done = done | jnp.any(token_B[:, None] == stops_BS, axis=1)
    logits_BV, cache = model.step(jnp.maximum(token_B, 0), cache)
    return t + 1, cache, logits_BV, mark_seen(seen, token_B), done, out

  carry = (jnp.asarray(0, jnp.int32), cache, logits_BV, seen, jnp.zeros((B,), bool),
           jnp.full((B, max_new_tokens), NO_TOKEN, jnp.int32))
  return jax.lax.while_loop(cond, body, carry)[-1]
