"""ssm.generate: greedy decoding equals the full pass's argmax (every family, ragged
batches), rows are independent, stop tokens end rows, speculative decoding gives the
target's output (greedy: exactly; sampled: in distribution), ssm-generate runs on a
trained byte-level model, and bad input is a clear error."""

import itertools
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from ssm.generate import Sampling, generate, probabilities, speculative_generate
from ssm.layers import Mamba2Config, MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import LanguageModel, LMConfig

GREEDY = Sampling(temperature=0)
FAMILIES = {
    "mamba": dict(pattern="M"),
    "transformer++": dict(pattern="A", mlp="swiglu", d_intermediate=32),
    "hybrid": dict(pattern="MA"),
    "mamba2": dict(pattern="S"),
    "gpt2": dict(pattern="A", positions="learned", max_position_embeddings=32, norm="layer",
                 mlp="gelu", d_intermediate=32),
}
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [3], [5, 4, 2]]


def tiny(family, seed=0, vocab_size=13):
  # Untied, wider-initialised heads: random models whose greedy outputs vary.
  n_layer = 2 if family == "hybrid" else 1  # one layer of each: cheap to compile
  config = LMConfig(d_model=16, n_layer=n_layer, vocab_size=vocab_size, tie_embeddings=False,
                    initializer_range=0.3, mamba=MambaConfig(d_state=4),
                    mamba2=Mamba2Config(d_state=4, headdim=8),
                    attention=AttentionConfig(n_heads=2), **FAMILIES[family])
  return nnx.jit(lambda: LanguageModel(config, rngs=nnx.Rngs(seed)))()  # compiled: fast


@pytest.fixture(scope="module")
def models():
  return {f: tiny(f, seed=i) for i, f in enumerate(FAMILIES)}


def full_pass_argmax(model, seqs):
  """The argmax at every position of one causal pass over each sequence (right-padded
  into one batch: padding after a position cannot reach it)."""
  L = max(map(len, seqs))
  ids = jnp.asarray([seq + [0] * (L - len(seq)) for seq in seqs])
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))[..., :model.config.vocab_size]
  return [row[:len(seq)] for row, seq in zip(logits.argmax(-1), seqs)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_the_full_pass_argmax_on_ragged_batches(models, family):
  """Each new token is the argmax of the full forward pass over the prompt and the
  tokens so far (one causal pass over the final sequence gives them all), for each row
  of a batch of prompts of lengths 7, 1 and 3."""
  model = models[family]
  out = generate(model, PROMPTS, 8, GREEDY)
  assert out.tokens.shape == (3, 8) and list(out.lengths) == [8, 8, 8]
  argmax = full_pass_argmax(model, [p + new[:-1] for p, new in zip(PROMPTS, out.rows())])
  for prompt, new, row in zip(PROMPTS, out.rows(), argmax):
    assert row[len(prompt) - 1:].tolist() == new, (prompt, new)
  if family == "hybrid":
    # The padding would change the output if rows saw it: a prompt left-padded by hand
    # (zeros as tokens) decodes otherwise.
    padded = [[0] * (7 - len(p)) + p for p in PROMPTS]
    assert generate(model, padded, 8, GREEDY).rows() != out.rows()


def test_temperature_to_zero_is_greedy_and_rows_are_independent(models):
  model = models["hybrid"]
  greedy = generate(model, PROMPTS, 8, GREEDY).rows()
  assert generate(model, PROMPTS, 8, Sampling(temperature=1e-6), seed=3).rows() == greedy
  # Sampled: row 0 is the same with or without a longer prompt beside it (its key is
  # its index's, and it never sees the other row or its own padding).
  sampling = Sampling(temperature=1.0)
  beside_long = generate(model, [PROMPTS[2], PROMPTS[0]], 8, sampling, seed=5).rows()
  beside_short = generate(model, [PROMPTS[2], PROMPTS[1]], 8, sampling, seed=5).rows()
  assert beside_long[0] == beside_short[0]
  assert generate(model, [PROMPTS[2], PROMPTS[0]], 8, sampling, seed=6).rows() != beside_long


def test_stop_tokens_end_each_row(models):
  model = models["transformer++"]
  free = generate(model, PROMPTS[:2], 8, GREEDY).rows()
  # row 0 stops at its 3rd token, row 1 at its 5th (first occurrences)
  stops = [[free[0][2]], [free[1][4]]]
  out = generate(model, PROMPTS[:2], 8, GREEDY, stop_tokens=stops)
  for row, new, stop in zip(out.rows(), free, stops):
    end = new.index(stop[0]) + 1
    assert row == new[:end]
  assert (out.tokens[0, len(out.rows()[0]):] == -1).all()


def test_speculative_greedy_is_the_targets_greedy_across_families(models):
  for target, draft in [("transformer++", "mamba"), ("mamba", "hybrid")]:
    expected = generate(models[target], PROMPTS, 8, GREEDY).rows()  # compiled already
    out = speculative_generate(models[target], models[draft], PROMPTS, 8, k=3,
                               sampling=GREEDY)
    assert out.rows() == expected, (target, draft)
    assert out.proposed > 0 and 0 <= out.accepted <= out.proposed
  # a draft that is the target is always right: every proposal accepted, k + 1 tokens a
  # target call (8 = the prefill's 1, then 4 and 3)
  same = speculative_generate(models["hybrid"], models["hybrid"], PROMPTS, 8, k=3,
                              sampling=GREEDY)
  assert same.acceptance_rate == 1.0 and same.rounds == 2
  assert same.rows() == generate(models["hybrid"], PROMPTS, 8, GREEDY).rows()


def test_speculative_sampling_has_the_targets_distribution():
  """The first three tokens after a prompt, over 3,000 rows (each its own key): a
  chi-square test against the target's exact joint distribution, from full passes
  over all 8^3 continuations. The draft's own samples fail the same test."""
  target, draft = tiny("transformer++", 10, vocab_size=8), tiny("mamba", 11, vocab_size=8)
  sampling, n, prompt = Sampling(temperature=1.0, top_k=6), 3000, [1, 2]
  seqs = np.array([prompt + list(c) for c in itertools.product(range(8), repeat=3)])
  logits = nnx.jit(lambda m, x: m(x))(target, jnp.asarray(seqs[:, :-1]))[:, 1:]
  p = np.asarray(probabilities(logits.reshape(-1, 8), sampling, 8)).reshape(len(seqs), 3, 8)
  joint = np.prod([p[np.arange(len(seqs)), t, seqs[:, 2 + t]] for t in range(3)], axis=0,
                  dtype=np.float64)
  joint /= joint.sum()  # float32's rounding

  def pvalue(tokens):
    codes = tokens[:, 0] * 64 + tokens[:, 1] * 8 + tokens[:, 2]
    counts = np.bincount(codes, minlength=512)
    if counts[joint == 0].any():  # a continuation the target never makes
      return 0.0
    big = n * joint >= 5  # small cells pooled
    observed = np.append(counts[big], counts[~big].sum())
    return stats.chisquare(observed, np.append(n * joint[big], n * joint[~big].sum())).pvalue

  out = speculative_generate(target, draft, [prompt] * n, 3, k=2, sampling=sampling, seed=1)
  assert 0 < out.acceptance_rate < 1
  assert pvalue(out.tokens) > 1e-3
  assert pvalue(generate(draft, [prompt] * n, 3, sampling, seed=1).tokens) < 1e-6


def test_bad_input_is_a_clear_error(models):
  gpt2, mamba = models["gpt2"], models["mamba"]
  with pytest.raises(ValueError, match="more than the model's 32 positions"):
    generate(gpt2, [[1] * 30], 3)
  with pytest.raises(ValueError, match="unknown stop token 13"):
    generate(mamba, PROMPTS, 3, stop_tokens=[13])
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(mamba, [[1], []], 3)
  with pytest.raises(ValueError, match="no prompts"):
    generate(mamba, [], 3)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 13\)"):
    generate(mamba, [[1, 40]], 3)
  with pytest.raises(ValueError, match="vocabulary"):
    speculative_generate(mamba, tiny("mamba", vocab_size=16), PROMPTS, 3)
  with pytest.raises(ValueError, match="language model"):
    generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), PROMPTS, 3)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
  """Two steps of a tiny configs/bytes.py:mamba run, in process."""
  from ssm.config import load_config_file
  from ssm.train import train
  c = load_config_file("configs/bytes.py:mamba")
  c.model.update(dict(d_model=16, n_layer=1))
  c.task.update(dict(seq_len=32))
  c.train.update(dict(batch_size=2, steps=2, warmup_steps=0, log_every=1, eval_every=0))
  c.checkpoint.update(dict(every=2, async_save=False))
  c.wandb.mode = "disabled"
  workdir = tmp_path_factory.mktemp("bytes-mamba")
  train(c, workdir)
  return workdir


def test_ssm_generate_on_a_trained_byte_model(byte_run, tmp_path, capsys):
  from ssm.generate.main import load, main
  assert main(["--workdir", str(byte_run), "--prompt", "ROMEO:", "--prompt", "A",
               "--max-new-tokens", "12", "--temperature", "0"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("ROMEO:")
  # the printed text is the prompt and its greedy continuation, as bytes
  model = load(byte_run).model
  new = generate(model, [[256] + list(b"ROMEO:")], 12, GREEDY, stop_tokens=[256]).rows()[0]
  assert lines[0] == "ROMEO:" + bytes(t for t in new if t < 256).decode(errors="replace")
  # a checkpoint of another model (config.json of a wider one) is an error, not a model
  other = tmp_path / "other"
  shutil.copytree(byte_run, other)
  config = json.loads((other / "config.json").read_text())
  config["model"]["d_model"] = 24
  (other / "config.json").write_text(json.dumps(config))
  assert main(["--workdir", str(other), "--prompt", "A"]) == 2
  assert "not the model its config.json builds" in capsys.readouterr().err
  assert main(["--workdir", str(byte_run), "--prompt", "A", "--stop-token", "300"]) == 2
  assert "unknown stop token 300" in capsys.readouterr().err
  assert main(["--workdir", str(byte_run)]) == 2
  assert "no prompt" in capsys.readouterr().err
