"""ssm-eval (ssm.evaluate): metrics equal to the loop's, loss by context length, other
lengths, a workdir or an imported Hugging Face model, and its errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssm.config import load_config_file
from ssm.data import make_pipeline
from ssm.data.tokenized import SHAKESPEARE_BPE
from ssm.evaluate import evaluate, lm_sums_by_position
from ssm.models import LMConfig, build
from ssm.train.step import lm_loss
from conftest import require

ROOT = Path(__file__).parent.parent


def tiny_text_config(tmp_path, steps=4):
  c = load_config_file(f"{ROOT / 'configs' / 'text.py'}:mamba")
  c.wandb.mode = "disabled"
  c.task.update(seq_len=16, cache_dir=str(tmp_path / "cache"), eval_seq_lens=())
  c.model.update(d_model=16, n_layer=2, pattern="MA")
  c.train.update(steps=steps, batch_size=4, log_every=2, eval_every=steps, eval_steps=2)
  c.checkpoint.every = steps
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from ssm.train.loop import train
  tmp = tmp_path_factory.mktemp("eval")
  metrics = train(tiny_text_config(tmp), tmp / "run")
  return tmp / "run", metrics, tmp


def test_context_lengths_count_from_each_document_start():
  model = build(LMConfig(d_model=16, n_layer=1, vocab_size=20, pattern="M"), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 20, (2, 6)).astype(np.int32)
  reset = np.zeros((2, 6), bool)
  reset[0, 2] = reset[1, 0] = reset[1, 5] = True
  batch = dict(inputs=inputs, labels=rng.integers(1, 20, (2, 6)).astype(np.int32),
               loss_mask=np.ones((2, 6), np.float32), reset=reset)
  sums = lm_sums_by_position(graphdef)(params, batch)
  # row 0: contexts 0 1 | 0 1 2 3; row 1: 0 1 2 3 4 | 0
  np.testing.assert_array_equal(sums["count"], [4, 3, 2, 2, 1, 0])
  whole = lm_loss(model(jnp.asarray(inputs), jnp.asarray(reset)).astype(jnp.float32), batch)
  np.testing.assert_allclose(sums["loss"].sum(), whole["loss"], rtol=1e-6)
  np.testing.assert_allclose(sums["accuracy"].sum(), whole["accuracy"], rtol=1e-6)


def test_the_eval_of_a_run_is_the_loops_eval_and_a_pass_over_the_split(run):
  from ssm.train.checkpoint import load_model
  workdir, metrics, tmp = run
  model, config, _ = load_model(workdir)
  same = evaluate(model, config.task, batches=2, batch_size=4)[16]  # the loop's eval batches
  assert math.isclose(same["loss"], metrics["eval/loss"], rel_tol=1e-5)
  assert math.isclose(same["bits_per_byte"], metrics["eval/bits_per_byte"], rel_tol=1e-5)
  assert math.isclose(same["accuracy"], metrics["eval/accuracy"], rel_tol=1e-5)
  whole = evaluate(model, config.task, batch_size=4, seq_lens=(16, 64))
  pipeline = make_pipeline(config.task, 4, 0)
  assert whole[16]["batches"] == math.ceil(pipeline.packed_tokens("eval") / (4 * 17))
  assert whole[64]["batches"] == math.ceil(pipeline.packed_tokens("eval") / (4 * 65))
  assert len(whole[64]["loss_by_position"]) == 64
  assert math.isclose(whole[16]["perplexity"], math.exp(whole[16]["loss"]))


def test_the_command_writes_the_table_json_and_plot_and_refuses_bad_input(run):
  workdir, _, tmp = run
  cmd = [sys.executable, "-c", "from ssm.evaluate import main; main()"]
  done = subprocess.run([*cmd, str(workdir), "--seq-len", "16", "32", "--batches", "2"],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = done.stdout.splitlines()
  assert lines[1].split() == ["length", "tokens", "loss", "ppl", "bits/byte", "acc"]
  assert [l.split()[0] for l in lines[2:4]] == ["16", "32"]
  record = json.loads((workdir / "eval" / "eval.json").read_text())
  assert set(record["results"]) == {"16", "32"} and record["results"]["16"]["batches"] == 2
  assert (workdir / "eval" / "loss_by_position.png").stat().st_size > 10_000
  for args, message in [([str(workdir), "--config.task.seq_length=3"], "seq_length"),
                        ([str(tmp / "nothing")], "no config.json"),
                        ([], "give a WORKDIR")]:
    bad = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_an_imported_hugging_face_model_is_evaluated_on_a_text_task(tmp_path):
  """A transformers Mamba saved with save_pretrained, evaluated on the shipped corpus:
  the same loss as its own torch forward pass on the first batch."""
  torch = require("torch")
  transformers = require("transformers")
  from ssm.evaluate import main
  hf = transformers.MambaForCausalLM(transformers.MambaConfig(
      vocab_size=1024, hidden_size=16, num_hidden_layers=2, state_size=4,
      pad_token_id=0, bos_token_id=0, eos_token_id=0)).eval()
  hf.save_pretrained(tmp_path / "hf")
  argv = ["--hf", str(tmp_path / "hf"), "--task", str(ROOT / "configs" / "text.py"),
          "--tokenizer", str(SHAKESPEARE_BPE),
          "--out", str(tmp_path / "out"), "--batches", "1", "--batch-size", "2",
          f"--config.task.cache_dir={tmp_path / 'cache'}", "--config.task.seq_len=32",
          "--config.task.doc_separator="]  # one document: no reset inside a row
  main(argv)
  got = json.loads((tmp_path / "out" / "eval.json").read_text())["results"]["32"]
  c = load_config_file(str(ROOT / "configs" / "text.py"))
  task = dict(c.task.to_dict(), seq_len=32, cache_dir=str(tmp_path / "cache"), doc_separator="")
  batch = next(iter(make_pipeline(task, 2, 0).batches("eval", slice(0, 2))))
  assert not batch["reset"][:, 1:].any()  # torch's model has no resets
  with torch.no_grad():
    logits = hf(torch.as_tensor(batch["inputs"], dtype=torch.long)).logits
  ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 1024),
                                         torch.as_tensor(batch["labels"].reshape(-1)).long())
  assert math.isclose(got["loss"], float(ce), rel_tol=1e-4)


def test_a_generated_task_is_evaluated_at_a_new_length(tmp_path):
  """Induction heads trained at 64, evaluated at 256 without training (ssm-eval's
  --seq-len): the accuracy is the model's own on those batches."""
  from ssm.evaluate import main
  from ssm.train.checkpoint import load_model
  from ssm.train.loop import train
  c = load_config_file(f"{ROOT / 'configs' / 'induction_heads.py'}:mamba")
  c.wandb.mode = "disabled"
  c.model.update(d_model=16, n_layer=2)
  c.train.update(steps=2, batch_size=4, log_every=1, eval_every=0, warmup_steps=0)
  c.checkpoint.every = 2
  train(c, tmp_path / "run")
  main([str(tmp_path / "run"), "--seq-len", "256", "--batches", "2", "--batch-size", "4"])
  got = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())["results"]["256"]
  model, config, _ = load_model(tmp_path / "run")
  task = dict(config.task.to_dict(), seq_len=256)
  data = iter(make_pipeline(task, 4, 0).batches("eval", slice(0, 4)))
  correct = count = 0
  for _ in range(2):
    batch = next(data)
    logits = np.asarray(model(jnp.asarray(batch["inputs"])))
    mask = batch["loss_mask"]
    correct += ((logits.argmax(-1) == batch["labels"]) * mask).sum()
    count += mask.sum()
  assert got["tokens"] == count and math.isclose(got["accuracy"], correct / count, abs_tol=1e-9)
  assert "bits_per_byte" not in got
