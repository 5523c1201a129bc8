"""ssm.layers.mamba2 and Mamba-2 language models: official initialisation and shapes,
packed sequences, decoding, parameter and FLOP accounting, and import from
transformers' Mamba2ForCausalLM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from ssm.flops import (compiled_flops, family_config, lm_flops, lm_params, match, param_count,
                       ssd_flops, xla_forward_flops)
from ssm.layers import Mamba2, Mamba2Config, partitioning
from ssm.layers.attention import AttentionConfig
from ssm.models import LMConfig, get_preset
from ssm.scan import ssd
from ssm.scan.ssd import DEFAULT_CHUNK_SIZE


def make(d_model=24, n_layer=3, seed=0, **kw):
  config = Mamba2Config(**{**dict(d_state=6, headdim=8, ngroups=2, chunk_size=8), **kw})
  return nnx.jit(lambda: Mamba2(d_model, config, n_residuals=n_layer, rngs=nnx.Rngs(seed)))()


call = nnx.jit(lambda m, x, reset=None: m(x, reset))  # compiled once per shape


def test_official_initialisation():
  d_model, n_layer = 64, 6
  m = Mamba2(d_model, Mamba2Config(d_state=16, headdim=16), n_residuals=n_layer,
             rngs=nnx.Rngs(0))
  E, H, N, K = 128, 8, 16, 4
  assert (m.d_inner, m.nheads, m.conv_dim, m.d_in_proj) == (E, H, E + 2 * N, 2 * E + 2 * N + H)
  A = np.exp(np.asarray(m.A_log[...]))
  assert A.shape == (H,) and 1 <= A.min() and A.max() <= 16 and A.max() - A.min() > 1
  np.testing.assert_array_equal(m.D[...], np.ones(H))
  np.testing.assert_array_equal(m.norm.weight[...], np.ones(E))
  dt = jax.nn.softplus(m.dt_bias[...])  # the inverse-softplus init gives dt back
  assert 1e-3 * (1 - 1e-4) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-4)
  bounds = {"kernel": 1 / math.sqrt(d_model), "kernel_bc": 1 / math.sqrt(d_model),
            "kernel_dt": 1 / math.sqrt(d_model)}  # in_proj's parts: one nn.Linear's init
  bounds = {**{("in_proj", k): b for k, b in bounds.items()},
            ("out_proj", "kernel"): 1 / math.sqrt(E * n_layer)}
  for (module, name), bound in bounds.items():
    w = np.asarray(getattr(getattr(m, module), name)[...])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, name
  assert (m.in_proj.kernel.shape, m.in_proj.kernel_bc.shape, m.in_proj.kernel_dt.shape) == (
      (d_model, 2, E), (d_model, 2, 1, N), (d_model, H))
  assert all(b is None for b in (m.in_proj.bias, m.in_proj.bias_bc, m.in_proj.bias_dt,
                                 m.out_proj.bias))
  assert m.conv_weight.shape == (K, E + 2 * N) and np.abs(m.conv_weight[...]).max() <= 0.5
  # every parameter has its role; A_log, D, dt_bias and the norm do not decay
  _, decays = partitioning.roles(nnx.state(m, nnx.Param))
  assert not any(decays[k] for k in ("A_log", "D", "dt_bias", "conv_bias"))
  assert decays["in_proj"]["kernel"] and not decays["norm"]["weight"]


def test_released_shapes():
  """mamba2-780m's checkpoint: in_proj.weight (6448, 1536), conv1d.weight (3328, 1, 4),
  48 heads of 64 x 128 (the released tensors); the count is the closed form's."""
  config = get_preset("mamba2-780m")
  layer = nnx.eval_shape(lambda: Mamba2(config.d_model, config.mamba2, rngs=nnx.Rngs(0)))
  assert (layer.in_proj.kernel.shape, layer.in_proj.kernel_bc.shape,  # 6448 outputs
          layer.in_proj.kernel_dt.shape) == ((1536, 2, 3072), (1536, 2, 1, 128), (1536, 48))
  assert layer.conv_weight.shape == (4, 3328)
  assert (layer.nheads, config.mamba2.headdim, config.mamba2.d_state) == (48, 64, 128)
  assert (config.n_layer, config.padded_vocab_size, config.tie_embeddings) == (48, 50288, True)
  # (tests/test_flops.py checks every preset's closed-form count against its model)


def test_bad_sizes_say_what_to_change():
  with pytest.raises(ValueError, match=r"headdim=64 must divide d_inner = expand \* d_model = 80"):
    LMConfig(d_model=40, n_layer=1, vocab_size=10, pattern="S")
  with pytest.raises(ValueError, match=r"ngroups=3 must divide the 4 heads"):
    Mamba2Config(headdim=16, ngroups=3).dims(32)
  with pytest.raises(ValueError, match=r"model.mamba2.chunk_size=0"):
    Mamba2Config(chunk_size=0)
  with pytest.raises(ValueError, match=r"model.mamba2.dt_limit=\(0.1, 0.01\): expected a pair"):
    Mamba2Config(dt_limit=(0.1, 0.01))
  with pytest.raises(ValueError, match=r"scan_impl='pallas': expected one of \('auto', "):
    Mamba2Config(scan_impl="pallas")
  LMConfig(d_model=40, n_layer=1, vocab_size=10, pattern="MA")  # no Mamba-2 layer: no check


def test_packed_row_equals_separate_documents():
  m = make()
  x = jax.random.normal(jax.random.key(1), (1, 20, 24))
  reset = jnp.zeros((1, 20), bool).at[0, 9].set(True)
  packed = call(m, x, reset)
  unpacked = call(m, x, jnp.zeros_like(reset))  # causal: its first 9 are the first document's
  np.testing.assert_allclose(packed[:, :9], unpacked[:, :9], rtol=1e-5, atol=1e-5)
  assert np.abs(packed[:, 9:] - unpacked[:, 9:]).max() > 1e-3  # the reset does something
  np.testing.assert_allclose(packed[:, 9:], call(m, x[:, 9:]), rtol=1e-5, atol=1e-5)


def test_default_chunk_is_the_scans():
  assert Mamba2Config().chunk_size == DEFAULT_CHUNK_SIZE == 256  # the official Mamba2's
  assert Mamba2Config(dt_limit=[0, 1]).dt_limit == (0.0, 1.0)  # as config.json gives it


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.02, 0.08)])
def test_step_by_step_equals_full_pass(dt_limit):
  m = make(dt_limit=dt_limit)
  x = jax.random.normal(jax.random.key(2), (2, 13, 24))
  full = call(m, x)
  step = nnx.jit(lambda m, x, c: m.step(x, c))
  cache, outs = m.init_cache(2), []
  for t in range(13):
    y, cache = step(m, x[:, t], cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=2e-5, atol=2e-5)
  if dt_limit[1] < float("inf"):  # the clamp changes the output (in both paths alike)
    assert np.abs(full - call(make(), x)).max() > 1e-3
  # the cache from a prefill, a packed one included, continues where the steps are
  reset = jnp.zeros((2, 7), bool).at[1, 3].set(True)
  _, prefill = nnx.jit(lambda m, x, r: m(x, r, return_cache=True))(m, x[:, :7], reset)
  for row, start in ((0, 0), (1, 3)):
    cache = m.init_cache(1)
    for t in range(start, 7):
      _, cache = step(m, x[row:row + 1, t], cache)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[row:row + 1], b, rtol=1e-5,
                                                         atol=1e-5), prefill, cache)


def test_bfloat16_compute_is_close_to_float32():
  m32 = make(seed=3)
  m16 = Mamba2(24, m32.config, n_residuals=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(4), (2, 17, 24))
  y16 = call(m16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  y32 = call(m32, x)
  err = float(jnp.abs(y16.astype(jnp.float32) - y32).max() / jnp.abs(y32).max())
  assert err < 3e-2, err


ODD = LMConfig(d_model=40, n_layer=3, vocab_size=77, pattern="SAS", mlp="swiglu",
               d_intermediate=56, tie_embeddings=False, attention=AttentionConfig(n_heads=4),
               mamba2=Mamba2Config(d_state=5, headdim=10, ngroups=2, bias=True, conv_bias=False,
                                   chunk_size=16))


def test_closed_form_parameter_count():
  assert lm_params(ODD) == param_count(ODD)
  assert lm_params(family_config("mamba2", 128, 3, 1000)) == param_count(
      family_config("mamba2", 128, 3, 1000))


def test_ssd_flops_are_xlas_count():
  """The SSD term against XLA's count of the chunked scan alone (no loop over steps;
  the chunk recurrence's loop body, counted once, is 1/T of the state work)."""
  b, L, H, P, G, N, T = 1, 200, 8, 32, 2, 32, 64
  s = jax.ShapeDtypeStruct
  args = (s((b, L, H, P), jnp.float32), s((b, L, H), jnp.float32), s((H,), jnp.float32),
          s((b, L, G, N), jnp.float32), s((b, L, G, N), jnp.float32), s((H,), jnp.float32))
  fn = jax.jit(lambda *a: ssd(*a, impl="chunked", chunk_size=T))
  xla = compiled_flops(fn.lower(*args).compile()) / L
  analytic = ssd_flops(H * P // 2, Mamba2Config(d_state=N, headdim=P, ngroups=G, chunk_size=T), L)
  assert abs(xla - analytic) / analytic < 0.05, (xla, analytic)


def test_lm_flops_match_xla():
  """Within 10%: the matmuls and the SSD are counted as XLA does (above); XLA counts
  the elementwise work (the conv's SiLU, softplus, the gated norm's rsqrt) at more
  FLOPs per element than the analytic count's."""
  c = LMConfig(d_model=128, n_layer=2, vocab_size=1000, pattern="S",
               mamba2=Mamba2Config(d_state=32, headdim=32, ngroups=2, chunk_size=64))
  analytic, xla = lm_flops(c, 256), xla_forward_flops(c, 256)
  assert abs(xla - analytic["total"]) / analytic["total"] < 0.10, (analytic, xla)
  assert analytic["scan"] == 2 * ssd_flops(128, c.mamba2, 256)


def test_family_matches_within_two_percent():
  ref = get_preset("mamba-130m")
  config, value, mismatch = match("mamba2", lm_params(ref), vocab_size=ref.vocab_size)
  assert abs(mismatch) <= 0.02 and config.pattern == "S" and value == lm_params(config)
  assert (2 * config.d_model) % config.mamba2.headdim == 0


@pytest.fixture(scope="module")
def hf_mamba2(tmp_path_factory):
  """A random Mamba2ForCausalLM with odd sizes, 3 groups, biases everywhere and an
  untied head, every parameter perturbed so that no constant initialisation (D = 1,
  norm weight 1, zero biases) hides a mapping error."""
  torch, transformers = require("torch"), require("transformers")
  torch.manual_seed(0)
  config = transformers.Mamba2Config(
      vocab_size=101, hidden_size=40, state_size=7, num_hidden_layers=2, expand=3,
      head_dim=10, num_heads=12, n_groups=3, conv_kernel=4, chunk_size=8,
      layer_norm_epsilon=1e-5, use_bias=True, use_conv_bias=True, tie_word_embeddings=False)
  model = transformers.Mamba2ForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("mamba2")
  model.save_pretrained(path)
  return model, path


def test_hf_logits_and_decoding_match_transformers(hf_mamba2):
  torch = require("torch")
  from ssm.convert import load_hf
  hf_model, path = hf_mamba2
  ids = np.random.default_rng(0).integers(0, 101, size=(2, 19))
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  model = load_hf(path)  # the chunked SSD (tests/test_ssd.py holds the backends together)
  assert model.config.pattern == "S" and model.config.mamba2.ngroups == 3
  assert model.config.mamba2.chunk_size == 8 and not model.config.tie_embeddings
  logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, ids))
  assert logits.shape == expected.shape == (2, 19, 101)
  err = np.abs(logits - expected).max() / np.abs(expected).max()
  assert err < 1e-4, f"relative error {err:.2e}"
  # decoding from the imported model gives the same logits as the full pass
  _, cache = model(ids[:, :10], return_cache=True)
  step = nnx.jit(lambda m, ids, c: m.step(ids, c))
  for t in range(10, 19):
    step_logits, cache = step(model, ids[:, t], cache)
    err = np.abs(np.asarray(step_logits) - expected[:, t]).max() / np.abs(expected).max()
    assert err < 1e-4, f"decode step {t}: relative error {err:.2e}"


def test_hf_unsupported_settings_are_named(hf_mamba2, tmp_path):
  import json
  import shutil
  from ssm.convert import load_hf
  _, path = hf_mamba2
  for key, value, message in (("time_step_limit", [0.1, 0.0], "dt_limit=\\(0.1, 0.0\\)"),
                              ("num_heads", 5, "num_heads \\* head_dim = 50")):
    bad = tmp_path / key
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=message):
      load_hf(bad)



def test_hf_time_step_limit_is_dt_limit(hf_mamba2, tmp_path):
  """A checkpoint whose time_step_limit clamps dt imports with that dt_limit: the
  logits of transformers' model, which clamps in its forward, and not the unclamped."""
  import json
  import shutil
  torch, transformers = require("torch"), require("transformers")
  from ssm.convert import load_hf
  hf_model, path = hf_mamba2
  clamped = tmp_path / "clamped"
  shutil.copytree(path, clamped)
  config = json.loads((clamped / "config.json").read_text())
  (clamped / "config.json").write_text(json.dumps({**config, "time_step_limit": [0.05, 0.5]}))
  ids = np.random.default_rng(1).integers(0, 101, size=(2, 19))
  with torch.no_grad():
    expected = transformers.Mamba2ForCausalLM.from_pretrained(clamped).eval()(
        torch.tensor(ids)).logits.numpy()
    unclamped = hf_model(torch.tensor(ids)).logits.numpy()
  model = load_hf(clamped)
  assert model.config.mamba2.dt_limit == (0.05, 0.5)
  logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, ids))
  scale = np.abs(expected).max()
  assert np.abs(logits - expected).max() / scale < 1e-4
  assert np.abs(unclamped - expected).max() / scale > 1e-3  # the clamp matters here
