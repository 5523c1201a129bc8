"""The lm-evaluation-harness adapter (ssm.zeroshot): its loglikelihoods against the
model's own forward pass, rolling windows, generation, and the shipped local tasks."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require
from ssm.data.tokenized import SHAKESPEARE_BPE
from ssm.data.tokenizer import load_tokenizer
from ssm.generate.decode import generate
from ssm.generate.sampling import Sampling
from ssm.layers.attention import AttentionConfig
from ssm.models import LMConfig, build

ROOT = Path(__file__).parent.parent
lm_eval = require("lm_eval")


class Request:  # what lm_eval hands a model: .args
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope="module")
def lm():
  from ssm.zeroshot import SSMLM
  tok = load_tokenizer(str(SHAKESPEARE_BPE))
  model = build(LMConfig(d_model=32, n_layer=2, vocab_size=tok.vocab_size, pattern="MA",
                         attention=AttentionConfig(n_heads=2)), rngs=nnx.Rngs(0))
  return SSMLM(model, tok, batch_size=3, max_length=64)


def logprobs(model, ids):
  """log p(ids[t+1] | ids[:t+1]) for each t, from one forward pass."""
  logits = model(jnp.asarray([ids[:-1]])).astype(jnp.float32)[0]
  logp = jax.nn.log_softmax(logits, -1)
  return np.asarray(logp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]), np.asarray(
      jnp.argmax(logits, -1) == jnp.asarray(ids[1:]))


def test_loglikelihood_is_the_forward_pass_over_the_continuation(lm):
  pairs = [("ROMEO:\nO, she doth teach the torches", " to burn bright!"),
           ("", "First Citizen:"),
           ("JULIET: ", "Good night, good night! parting is such sweet sorrow"),
           ("A" * 200, " end")]  # longer than max_length: the context is cut from the left
  got = lm.loglikelihood([Request(*p) for p in pairs])
  tok = lm.tok
  for (context, continuation), (logp, greedy) in zip(pairs, got, strict=True):
    context, continuation = (context.rstrip(), context[len(context.rstrip()):] + continuation)
    whole = tok.encode(context + continuation)
    n = len(tok.encode(context)) if context else 0
    ids = [tok.bos_id, *whole][-(lm.max_length + 1):]
    want, correct = logprobs(lm.model, ids)
    m = len(whole) - n
    np.testing.assert_allclose(logp, want[-m:].sum(), rtol=2e-5)
    assert greedy == bool(correct[-m:].all())
  assert len({round(l, 3) for l, _ in got}) == 4


def test_rolling_loglikelihood_predicts_every_token_once(lm):
  text = "\n".join(["MENENIUS:\nThere was a time when all the body's members"] * 4)
  ids = lm.tok.encode(text)
  assert len(ids) > lm.max_length  # several windows
  (got,) = lm.loglikelihood_rolling([Request(text)])
  # windows of max_length with full context, each token scored once
  want, start = 0.0, 0
  first = [lm.tok.bos_id, *ids[:lm.max_length - 1]]
  want += logprobs(lm.model, [*first, ids[lm.max_length - 1]])[0].sum()
  start = lm.max_length
  while start < len(ids):
    end = min(start + lm.max_length, len(ids))
    window = ids[end - lm.max_length - 1:end]
    want += logprobs(lm.model, window)[0][-(end - start):].sum()
    start = end
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(lm):
  """Four requests (two settings, ragged prompts, more than a batch) equal each prompt
  decoded greedily on its own, cut at its stop strings."""
  contexts = ["KING RICHARD III:\nNow is the winter", "ROMEO:\nBut soft", "A", "HAMLET:\nTo be"]
  settings = [dict(until=["\n"], max_gen_toks=12), dict(until=["e", "\n"], max_gen_toks=6)]
  requests = [Request(c, settings[i % 2]) for i, c in enumerate(contexts)]
  got = lm.generate_until(requests)
  for r, text in zip(requests, got, strict=True):
    prompt = [lm.tok.bos_id, *lm.tok.encode(r.args[0])]
    ids = generate(lm.model, [prompt], r.args[1]["max_gen_toks"], Sampling(temperature=0.0),
                   stop_tokens=[lm.tok.eos_id]).rows()[0]
    want = lm.tok.decode([i for i in ids if i != lm.tok.eos_id])
    for stop in r.args[1]["until"]:
      want = want.split(stop)[0]
    assert text == want


def test_the_shipped_local_tasks_run_through_lm_eval(lm, monkeypatch):
  from ssm.zeroshot import run_tasks
  monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  results = run_tasks(lm.model, lm.tok, "shakespeare_cloze,shakespeare_ppl,shakespeare_complete",
                      include_path="configs/lm_eval", limit=6, batch_size=3, max_length=64)
  assert set(results) == {"shakespeare_cloze", "shakespeare_ppl", "shakespeare_complete"}
  assert set(results["shakespeare_cloze"]) == {"acc", "acc_norm"}
  assert results["shakespeare_cloze"]["acc"] in {i / 6 for i in range(7)}
  # lm_eval's bits per byte from our rolling loglikelihoods: sum of -logp / bytes / ln 2
  docs = [json.loads(l)["text"] for l in
          (ROOT / "configs/lm_eval/shakespeare_ppl.jsonl").read_text().splitlines()[:6]]
  nats = -sum(lm.loglikelihood_rolling([Request(d) for d in docs]))
  want = nats / sum(len(d.encode()) for d in docs) / np.log(2)
  np.testing.assert_allclose(results["shakespeare_ppl"]["bits_per_byte"], want, rtol=1e-5)
  assert 0 <= results["shakespeare_complete"]["exact_match"] <= 1
  with pytest.raises(ValueError, match="knows no task nope"):
    run_tasks(lm.model, lm.tok, "nope", include_path="configs/lm_eval")
