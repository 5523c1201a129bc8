"""ssm.models: exact parameter counts, logits shapes, decoding equals the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.flops import param_count
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import LanguageModel, LMConfig, build, get_preset


@pytest.mark.parametrize("name,count", [("mamba-130m", 129_135_360), ("mamba-370m", 371_516_416)])
def test_preset_parameter_counts_are_exact(name, count):
  assert param_count(get_preset(name)) == count


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(KeyError, match="mamba-130m"):
    get_preset("mamba-100m")


def tiny(**kw):
  cfg = LMConfig(d_model=32, n_layer=3, vocab_size=61, mamba=MambaConfig(d_state=6), **kw)
  return nnx.jit(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))()  # compiled init: fast


def test_vocabulary_padding_and_embedding_init():
  model = tiny()
  assert model.embedding.embedding.shape == (64, 32)
  ids = jnp.array([[1, 2, 60]])
  assert model(ids).shape == (1, 3, 64) and model(ids).dtype == jnp.float32
  big = nnx.jit(lambda: LanguageModel(LMConfig(d_model=256, n_layer=1, vocab_size=4096),
                                      rngs=nnx.Rngs(0)))()
  assert abs(float(jnp.std(big.embedding.embedding[...])) - 0.02) < 1e-3


def test_decode_equals_full_pass():
  model = tiny()
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, 61)
  full = model(ids)
  logits, cache = model(ids[:, :5], return_cache=True)
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
  step = nnx.jit(lambda m, i, c: m.step(i, c))
  for t in range(5, 12):
    out, cache = step(model, ids[:, t], cache)
    np.testing.assert_allclose(out, full[:, t], rtol=2e-5, atol=2e-5)


def test_bad_ids_shape():
  with pytest.raises(ValueError, match=r"\(batch, length\)"):
    tiny()(jnp.zeros((4,), jnp.int32))


def hybrid(**kw):
  from ssm.layers.attention import AttentionConfig
  cfg = LMConfig(d_model=32, n_layer=4, vocab_size=16, pattern="MA", mlp="swiglu",
                 d_intermediate=64, mamba=MambaConfig(d_state=8),
                 attention=AttentionConfig(n_heads=4), **kw)
  return nnx.jit(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0)))()


def test_hybrid_pattern_and_decoding():
  model = hybrid()
  assert model.config.layer_mixers == "MAMA"
  kinds = [type(layer.mixer).__name__ for layer in model.layers]
  assert kinds == ["Mamba", "Attention", "Mamba", "Attention"]
  ids = jax.random.randint(jax.random.key(1), (2, 11), 0, 16)
  full = nnx.jit(lambda m, x: m(x))(model, ids)
  _, cache = nnx.jit(lambda m, x: m(x, return_cache=True, max_length=11))(model, ids[:, :4])
  step = nnx.jit(lambda m, x, c: m.step(x, c))  # compiled: eager op-by-op is slow to test
  for t in range(4, 11):
    # ids (B,) or (B, 1), as a decode loop holding the last token as a column gives them
    out, cache = step(model, ids[:, t] if t % 2 else ids[:, t:t + 1], cache)
    np.testing.assert_allclose(out, full[:, t], rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="one token id per row"):
    model.step(ids[:, :2], cache)


def test_packed_rows_equal_separate_documents_in_a_hybrid():
  model = hybrid()
  ids = jax.random.randint(jax.random.key(2), (1, 14), 0, 16)
  reset = jnp.zeros((1, 14), bool).at[0, 6].set(True)
  call = nnx.jit(lambda m, x, r=None: m(x, r))
  packed = call(model, ids, reset)
  np.testing.assert_allclose(packed[:, :6], call(model, ids[:, :6]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 6:], call(model, ids[:, 6:]), rtol=1e-5, atol=1e-5)


def test_hybrid_learns_to_copy():
  """Loss falls on a small task: the second half of each row repeats the first."""
  from conftest import fit

  def batches(n, seed=0):
    key = jax.random.key(seed)
    for _ in range(n):
      key, sub = jax.random.split(key)
      half = jax.random.randint(sub, (16, 6), 0, 16)
      ids = jnp.concatenate([half, half], axis=1)
      # scored where the next token is a copy: the second half
      mask = jnp.broadcast_to(jnp.arange(11) >= 5, (16, 11)).astype(jnp.float32)
      yield dict(inputs=ids[:, :-1], labels=ids[:, 1:], loss_mask=mask)

  losses = fit(hybrid(), batches(150), lr=1e-2)
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_attention_lm_learns_to_copy_the_previous_token():
  """The simplest positional task: label t is input t-1. A one-layer RoPE attention LM
  learns it in a few hundred steps (what MQAR's first layer must learn:
  docs/results/synthetic-audit.md), so positions and the causal mask train as well as
  they compute."""
  import optax
  config = LMConfig(d_model=32, n_layer=1, vocab_size=16, pattern="A",
                    attention=AttentionConfig(n_heads=1))
  graphdef, params = nnx.split(build(config, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(params)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(params, x):
    logits = nnx.merge(graphdef, params)(x)[:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, :-1])
    return ce.mean(), (logits.argmax(-1) == x[:, :-1]).mean()

  @jax.jit
  def step(params, opt, x):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, accuracy

  rng = np.random.default_rng(0)
  for _ in range(300):
    params, opt, accuracy = step(params, opt, jnp.asarray(rng.integers(0, 16, (32, 24))))
  assert float(accuracy) > 0.95
