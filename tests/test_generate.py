"""ssm.generate: greedy decoding equals the full pass's argmax (every family, ragged
batches), rows are independent, stop tokens end rows, top-p / min-p and the repetition
penalty act in the decode loop as computed by hand, speculative decoding gives the
target's output (greedy: exactly, Mamba-2 too; sampled over ragged prompts: in
distribution), ssm-generate runs on a trained byte-level model and reads an imported
model's tokenizer without transformers, and bad input or a missing extra is a clear
error."""

import itertools
import json
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from conftest import require
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


def tiny(family, seed=0, vocab_size=13, **overrides):
  # Untied, wider-initialised heads: random models whose greedy outputs vary.
  n_layer = 2 if family == "hybrid" else 1  # one layer of each: cheap to compile
  config = LMConfig(d_model=16, n_layer=n_layer, vocab_size=vocab_size, tie_embeddings=False,
                    initializer_range=0.3, mamba=MambaConfig(d_state=4),
                    mamba2=Mamba2Config(d_state=4, headdim=8),
                    attention=AttentionConfig(n_heads=2), **{**FAMILIES[family], **overrides})
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


def chisquare_pvalue(counts, p):
  """A chi-square test of token counts against the distribution p (cells expected
  fewer than 5 times pooled); 0 when a token of probability 0 was drawn."""
  n = counts.sum()
  if counts[p == 0].any():
    return 0.0
  big, small = n * p >= 5, (n * p < 5) & (p > 0)
  observed, expected = counts[big], n * p[big]
  if small.any():
    observed = np.append(observed, counts[small].sum())
    expected = np.append(expected, n * p[small].sum())
  return stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


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
  for target, draft in [("transformer++", "mamba"), ("mamba", "hybrid"),
                        ("mamba2", "transformer++")]:
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


def test_speculative_sampling_over_ragged_prompts_has_the_targets_distribution():
  """The first three tokens after each of two prompts of lengths 2 and 5, in one batch
  of 4,000 rows (each its own key; the shorter left-padded), with a Mamba-2 draft: a
  chi-square test per prompt against the target's exact joint distribution, from full
  passes over all 8^3 continuations. The draft's own samples fail the same test."""
  target, draft = tiny("transformer++", 10, vocab_size=8), tiny("mamba2", 11, vocab_size=8)
  sampling, n = Sampling(temperature=1.0, top_k=6), 4000
  prompts = [[1, 2], [5, 3, 1, 4, 6]]
  batch = prompts * (n // 2)  # rows alternate
  full_pass = nnx.jit(lambda m, x: m(x))

  def joint(prompt):
    seqs = np.array([prompt + list(c) for c in itertools.product(range(8), repeat=3)])
    L = len(prompt)
    logits = full_pass(target, jnp.asarray(seqs[:, :-1]))[:, L - 1:]
    p = np.asarray(probabilities(logits.reshape(-1, 8), sampling, 8)).reshape(len(seqs), 3, 8)
    joint = np.prod([p[np.arange(len(seqs)), t, seqs[:, L + t]] for t in range(3)], axis=0,
                    dtype=np.float64)
    return joint / joint.sum()  # float32's rounding

  def pvalues(tokens):
    codes = tokens[:, 0] * 64 + tokens[:, 1] * 8 + tokens[:, 2]
    return [chisquare_pvalue(np.bincount(codes[i::2], minlength=512), joint(prompt))
            for i, prompt in enumerate(prompts)]

  out = speculative_generate(target, draft, batch, 3, k=2, sampling=sampling, seed=1)
  assert 0 < out.acceptance_rate < 1
  assert min(pvalues(out.tokens)) > 1e-3
  assert max(pvalues(generate(draft, batch, 3, sampling, seed=1).tokens)) < 1e-6


def test_top_p_and_min_p_decoding_draws_from_the_hand_computed_distribution():
  """The first two tokens of 4,000 rows (one prompt, each row its own key; the second
  from the decode loop) against their joint distribution computed in numpy from the
  model's logits: softmax(l / T), the nucleus (most likely first, while the mass
  before a token is < top_p), then min-p (p_i >= min_p * p_max), renormalised."""
  model = tiny("mamba2", 3, vocab_size=8)
  T, top_p, min_p = 1.5, 0.75, 0.12
  prompt, n = [1, 2, 3], 4000
  seqs = jnp.asarray([prompt + [a] for a in range(8)])
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, seqs), np.float64)[:, -2:, :8]

  def filtered(l, T=T, top_p=top_p, min_p=min_p):
    p = np.exp(l / T - np.max(l / T))
    p /= p.sum()
    order = np.argsort(-p)
    before = np.cumsum(p[order]) - p[order]
    p = p * np.isin(np.arange(8), order[before < top_p])
    p = p * (p >= min_p * p.max())
    return p / p.sum()

  def joint(**kw):  # [first, second]: logits[0, 0] are the prompt's last position's
    return np.stack([filtered(logits[0, 0], **kw)[a] * filtered(logits[a, 1], **kw)
                     for a in range(8)]).reshape(-1)

  expected, plain = joint(), joint(top_p=1.0, min_p=0.0)
  assert (expected == 0).sum() > (plain == 0).sum()  # the filters remove tokens
  out = generate(model, [prompt] * n, 2, Sampling(temperature=T, top_p=top_p, min_p=min_p))
  counts = np.bincount(out.tokens[:, 0] * 8 + out.tokens[:, 1], minlength=64)
  assert chisquare_pvalue(counts, expected) > 1e-3
  plain_out = generate(model, [prompt] * n, 2, Sampling(temperature=T)).tokens
  plain_counts = np.bincount(plain_out[:, 0] * 8 + plain_out[:, 1], minlength=64)
  assert chisquare_pvalue(plain_counts, plain) > 1e-3
  assert chisquare_pvalue(counts, plain) < 1e-6  # the test can tell the two apart


def test_the_repetition_penalty_covers_the_prompt_and_every_new_token(models):
  """Greedy with a penalty, inside the decode loop: each new token is the argmax of the
  full pass's logits with the row's tokens so far (its prompt without the padding, and
  the tokens it generated) penalised, recomputed in numpy at every step."""
  model, r = models["hybrid"], 3.0
  out = generate(model, PROMPTS, 8, Sampling(temperature=0, repetition_penalty=r)).rows()
  full_pass = nnx.jit(lambda m, x: m(x))
  seqs = [list(p) for p in PROMPTS]
  for _ in range(8):
    ids = jnp.asarray([seq + [0] * (15 - len(seq)) for seq in seqs])  # one shape: one compile
    logits = np.asarray(full_pass(model, ids))[..., :13]
    for seq, row in zip(seqs, logits):
      last = row[len(seq) - 1]
      seen = np.isin(np.arange(13), seq)
      seq.append(int(np.argmax(np.where(seen, np.where(last > 0, last / r, last * r), last))))
  assert out == [seq[len(p):] for seq, p in zip(seqs, PROMPTS)]
  assert out != generate(model, PROMPTS, 8, GREEDY).rows()  # the penalty changed them


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


def test_ssm_generate_on_a_tokenized_text_run(tmp_path, capsys):
  """A configs/text.py run reads and writes text through its BPE: the prompt starts a
  document (BOS), the row stops at the document's end."""
  from ssm.config import load_config_file
  from ssm.data.tokenized import SHAKESPEARE_BPE
  from ssm.data.tokenizer import load_tokenizer
  from ssm.generate.main import load, main
  from ssm.train import train
  c = load_config_file("configs/text.py:mamba")
  c.model.update(dict(d_model=16, n_layer=1))
  c.task.update(dict(seq_len=32, cache_dir=str(tmp_path / "cache"), eval_seq_lens=()))
  c.train.update(dict(batch_size=2, steps=2, warmup_steps=0, log_every=1, eval_every=0))
  c.checkpoint.update(dict(every=2, async_save=False))
  c.wandb.mode = "disabled"
  train(c, tmp_path / "run")
  capsys.readouterr()  # the run's own report
  assert main(["--workdir", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens",
               "8", "--temperature", "0"]) == 0
  line = capsys.readouterr().out.rstrip("\n")
  tok = load_tokenizer(str(SHAKESPEARE_BPE))
  model = load(tmp_path / "run").model
  new = generate(model, [[0, *tok.encode("ROMEO:")]], 8, GREEDY, stop_tokens=[0]).rows()[0]
  assert line == "ROMEO:" + tok.decode(new)


def test_a_missing_hf_extra_is_one_line_with_advice(monkeypatch, capsys):
  """Without huggingface_hub (the [hf] extra), a hub name is one line, exit 2, saying
  to install the extra with a CPU build of torch first on a CPU-only machine; the same
  through scripts/registers.py, which also reaches ssm.convert."""
  import importlib.util

  from ssm.generate.main import main
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
  monkeypatch.setitem(sys.modules, "transformers", None)
  assert main(["--hf", "state-spaces/mamba-130m-hf", "--prompt-ids", "1,2"]) == 2
  spec = importlib.util.spec_from_file_location("registers_script", "scripts/registers.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main(["--model", "facebook/dinov2-small", "--out", "unused"]) == 2
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 2, lines
  for line, prog in zip(lines, ["ssm-generate", "scripts/registers.py"]):
    assert line.startswith(f"{prog}: 'state-spaces/mamba-130m-hf' is not a local directory"
                           if prog == "ssm-generate" else f"{prog}: 'facebook/dinov2-small'")
    assert "needs huggingface_hub: install the [hf] extra" in line
    assert "CPU build of torch first (pip install torch==2.13.0)" in line


def test_text_prompts_of_an_hf_model_need_no_transformers(tmp_path, monkeypatch, capsys):
  """A save_pretrained directory with its tokenizer.json: text prompts are read with
  `tokenizers` where transformers is not installed, as transformers reads them."""
  torch = require("torch")
  transformers = require("transformers")
  from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

  from ssm.generate.main import main
  torch.manual_seed(0)
  config = transformers.MambaConfig(vocab_size=16, hidden_size=16, state_size=4,
                                    num_hidden_layers=1, expand=2)
  transformers.MambaForCausalLM(config).save_pretrained(tmp_path)
  words = ("to be or not that is the question whether tis nobler in mind suffer slings "
           "arrows").split()  # 16 distinct: the vocabulary
  tokenizer = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(words)},
                                                   unk_token="to"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  # tokenizer.json and tokenizer_config.json, as a checkpoint on the hub has them
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(tmp_path)
  args = ["--hf", str(tmp_path), "--prompt", "to be or not", "--max-new-tokens", "4",
          "--temperature", "0"]
  assert main(args + ["--prompt-ids", "0,1,2,3"]) == 0
  with_transformers, by_ids = capsys.readouterr().out.splitlines()
  monkeypatch.setitem(sys.modules, "transformers", None)
  assert main(args) == 0
  (without,) = capsys.readouterr().out.splitlines()
  # the same continuation of the same prompt, four of the words
  assert without == with_transformers == by_ids and len(by_ids.split()) == 4
  assert set(by_ids.split()) <= set(words)
