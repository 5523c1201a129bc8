"""Tokenizers (ssm.data.tokenizer) and tokenized text (ssm.data.tokenized): training a
BPE, the corpora, the cache, packing, bits per byte, resume, and their errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssm.data.text import SHAKESPEARE
from ssm.data.tokenized import SHAKESPEARE_BPE, TokenizedText, tokenize
from ssm.data.tokenizer import ENDOFTEXT, load_tokenizer, train_bpe

ROOT = Path(__file__).parent.parent
SPEECHES = SHAKESPEARE.read_text().split("\n\n")[:400]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A 300-id BPE trained on the first speeches, through the command."""
  out = tmp_path_factory.mktemp("tok") / "bpe.json"
  corpus = out.parent / "speeches.txt"
  corpus.write_text("\n\n".join(SPEECHES))
  done = subprocess.run([sys.executable, "-c", "from ssm.data.tokenizer import main; main()",
                         str(corpus), "--vocab-size", "300", "--out", str(out)],
                        capture_output=True, text=True, check=True)
  assert "300 tokens" in done.stdout
  return str(out)


def text_task(tmp_path, **fields):
  fields = dict(dict(seq_len=32, batch_size=4, tokenizer=str(SHAKESPEARE_BPE),
                     path=str(SHAKESPEARE), doc_separator="\n\n",
                     cache_dir=str(tmp_path / "cache")), **fields)
  return TokenizedText(**fields)


def take(task, n, split="train", state=None, rows=None):
  it = iter(task.batches(split, rows or slice(0, task.batch_size)))
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


# --- tokenizers ---------------------------------------------------------------------
def test_a_trained_bpe_round_trips_text_and_has_one_end_of_text_token(bpe):
  tok = load_tokenizer(bpe)
  assert tok.vocab_size == 300 and tok.bos_id == tok.eos_id == 0
  text = "To be, or not to be: that is the question. Ünïcode too."
  ids = tok.encode(text)
  assert tok.decode(ids) == text and max(ids) < 300
  assert len(ids) < len(text.encode())  # merges were learned
  assert load_tokenizer(bpe).fingerprint == tok.fingerprint


def test_the_shipped_tokenizer_is_what_the_command_trains(tmp_path):
  """ssm-tokenizer on the shipped corpus reproduces the shipped tokenizer.json."""
  out = tmp_path / "bpe.json"
  train_bpe(_train_texts(), 1024, out)
  assert load_tokenizer(str(out)).fingerprint == load_tokenizer(str(SHAKESPEARE_BPE)).fingerprint


def _train_texts():
  from ssm.data.tokenized import texts
  return texts(TokenizedText(seq_len=2, batch_size=1, path=str(SHAKESPEARE)), "train")


def test_bytes_and_sentencepiece_tokenizers(tmp_path):
  tok = load_tokenizer("bytes")
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (257, 256, None)
  assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169, 256]) == "hé"
  sentencepiece = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(SPEECHES))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                           vocab_size=200, bos_id=1, eos_id=2)
  sp = load_tokenizer(str(tmp_path / "sp.model"))
  assert (sp.vocab_size, sp.bos_id, sp.eos_id) == (200, 1, 2)
  assert sp.decode(sp.encode("to be or not")) == "to be or not"


def test_tokenizer_errors_say_what_to_give(tmp_path):
  with pytest.raises(ValueError, match="offline, give a local tokenizer.json"):
    load_tokenizer("no-such-org/no-such-tokenizer-xyz")
  with pytest.raises(ValueError, match="no such file"):
    load_tokenizer(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="not a tokenizer.json"):
    load_tokenizer(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="without a tokenizer.json"):
    load_tokenizer(str(tmp_path))


# --- packing ---------------------------------------------------------------------------
def test_rows_are_the_documents_in_order_with_bos_resets_and_every_token_scored(tmp_path):
  t = text_task(tmp_path, shuffle=False, seq_len=64)
  (a, b), _ = take(t, 2)
  stream = np.concatenate([np.concatenate([a["inputs"][i], a["labels"][i, -1:]])
                           for i in range(4)])
  tok = t.tok
  first = [0, *tok.encode(SHAKESPEARE.read_text().split("\n\n")[0]), 0]
  np.testing.assert_array_equal(stream[:len(first)], first)  # BOS = EOS = <|endoftext|>
  np.testing.assert_array_equal(a["reset"], a["inputs"] == 0)
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["labels"][:, :-1])
  assert a["loss_mask"].sum() == a["loss_mask"].size  # the EOS prediction counts too
  assert a["inputs"].dtype == np.int32 and a["reset"].sum() >= 2


def test_bytes_through_the_tokenized_pipeline_are_the_byte_pipeline(tmp_path):
  """tokenizer='bytes' packs as task 'bytes' does: BOS starts documents, is not scored,
  and bits per byte is the loss over ln 2."""
  from ssm.data.text import ByteText
  t = text_task(tmp_path, tokenizer="bytes", shuffle=False)
  b = ByteText(seq_len=32, batch_size=4, path=str(SHAKESPEARE), doc_separator="\n\n",
               shuffle=False)
  (x,), _ = take(t, 1)
  y = next(iter(b.batches("train", slice(0, 4))))
  for k in ("inputs", "labels", "loss_mask", "reset"):
    np.testing.assert_array_equal(x[k], y[k])
  assert t.bits_per_byte == 1.0


def test_bits_per_byte_counts_scored_tokens_per_byte_of_the_eval_text(tmp_path):
  t = text_task(tmp_path)
  meta = t.split("eval").meta
  text = SHAKESPEARE.read_text()
  held_out = text[int(len(text) * 0.9):]
  docs = [d for d in held_out.split("\n\n") if d]
  assert meta["documents"] == len(docs)
  assert meta["bytes"] == sum(len(d.encode()) for d in docs)
  assert meta["tokens"] == sum(len(t.tok.encode(d)) for d in docs)
  assert math.isclose(t.bits_per_byte, (meta["tokens"] + meta["documents"]) / meta["bytes"])
  assert 0.3 < t.bits_per_byte < 0.6  # a 1024-id BPE: about 2.3 bytes per token


def test_resume_from_a_saved_position_gives_the_same_batches(tmp_path):
  t = text_task(tmp_path)
  straight, _ = take(t, 6)
  _, it = take(t, 2)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  resumed, _ = take(t, 4, state=state)
  for x, y in zip(resumed, straight[2:], strict=True):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  halves = [take(t, 2, rows=r)[0] for r in (slice(0, 2), slice(2, 4))]
  np.testing.assert_array_equal(np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]),
                                straight[1]["inputs"])


# --- corpora and the cache ---------------------------------------------------------------
def test_jsonl_documents_and_their_holdout(tmp_path, bpe):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"body": s, "id": i}) + "\n" for i, s in enumerate(SPEECHES)))
  t = text_task(tmp_path, path=str(path), text_key="body", tokenizer=bpe, doc_separator="")
  train, ev = t.split("train").meta, t.split("eval").meta
  assert (train["documents"], ev["documents"]) == (360, 40)  # every 10th is eval
  ids = list(t.split("eval").documents()[0])
  assert ids == t.tok.encode(SPEECHES[9])
  with pytest.raises(ValueError, match="has no field 'text'.*'body'.*task.text_key"):
    text_task(tmp_path, path=str(path), cache_dir=str(tmp_path / "c2")).split("train")


def test_tokenized_once_then_read_from_the_cache(tmp_path, monkeypatch, bpe):
  t = text_task(tmp_path)
  first = t.split("train")
  calls = []
  monkeypatch.setattr("ssm.data.tokenized._write", lambda *a: calls.append(a))
  again = text_task(tmp_path).split("train")
  assert not calls and again.directory == first.directory and again.meta == first.meta
  monkeypatch.undo()
  other = text_task(tmp_path, tokenizer=bpe).split("train")  # another tokenizer, another key
  assert other.directory != first.directory and other.meta["vocab_size"] == 300
  meta = json.loads((first.directory / "meta.json").read_text())
  (first.directory / "meta.json").write_text(json.dumps(dict(meta, tokenizer="other")))
  with pytest.raises(ValueError, match="written by another tokenizer"):
    tokenize(text_task(tmp_path), "train")


def test_an_empty_corpus_is_an_error_that_leaves_nothing_behind(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="split of empty is empty"):
    text_task(tmp_path, path=str(tmp_path / "empty.txt")).split("train")
  assert not any((tmp_path / "cache").iterdir())  # no half-written cache
  with pytest.raises(ValueError, match="no text file at task.path"):
    text_task(tmp_path, path=str(tmp_path / "nothing")).split("train")
  with pytest.raises(ValueError, match="exactly one of"):
    text_task(tmp_path, path="", hf_dataset="")


def test_an_interrupted_tokenization_is_not_a_cache(tmp_path, monkeypatch):
  from ssm.data import tokenized
  encode = tokenized.load_tokenizer(str(SHAKESPEARE_BPE))

  def interrupted(texts):
    raise KeyboardInterrupt
  t = text_task(tmp_path)
  object.__setattr__(encode, "_encode", interrupted)
  t.__dict__["tok"] = encode
  with pytest.raises(KeyboardInterrupt):
    t.split("train")
  assert not any((tmp_path / "cache").iterdir())


def test_tfds_text_datasets_through_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=20):
    t = text_task(tmp_path, path="", dataset="lm1b", eval_split="test")
    (a,), _ = take(t, 1)
    assert t.split("train").meta["documents"] == 20
  assert a["inputs"].shape == (4, 32) and (a["inputs"] == 0).any()


def test_hugging_face_datasets_are_streamed_with_a_holdout(tmp_path, monkeypatch):
  datasets = pytest.importorskip("datasets")
  asked = []

  def load_dataset(name, config, split, streaming):
    asked.append((name, config, split, streaming))
    return iter([{"text": s} for s in SPEECHES[:50]])

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)
  t = text_task(tmp_path, path="", hf_dataset="org/corpus", hf_config="sample", eval_split="",
                max_documents=30)
  assert t.split("train").meta["documents"] == 30  # max_documents caps each split
  assert t.split("eval").meta["documents"] == 5  # every 10th of the 50
  assert asked[0] == ("org/corpus", "sample", "train", True)


# --- through the loop ---------------------------------------------------------------------
def test_a_text_run_takes_its_vocabulary_from_the_tokenizer_and_resumes_exactly(tmp_path, bpe,
                                                                                 monkeypatch):
  """SIGTERM during step 2 stops the run at step 3 with a checkpoint (the pipeline's
  position in it); the rerun's losses are an unbroken run's, bit for bit."""
  import os
  import signal

  from ssm.config import load_config_file
  from ssm.train import loop
  from ssm.train.loop import train

  def config():
    c = load_config_file(f"{ROOT / 'configs' / 'text.py'}:mamba")
    c.wandb.mode = "disabled"
    c.task.update(tokenizer=bpe, seq_len=16, cache_dir=str(tmp_path / "cache"), eval_seq_lens=())
    c.model.update(d_model=16, n_layer=2, pattern="MA")
    c.train.update(steps=6, batch_size=4, log_every=3, eval_every=0, warmup_steps=2)
    c.checkpoint.every = 100
    return c

  train(config(), tmp_path / "straight")
  advance = loop.MetricsWriter.advance

  def advance_and_signal(self):
    advance(self)
    if self.bar.n == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(loop.MetricsWriter, "advance", advance_and_signal)
  with pytest.raises(loop.Stopped, match="at step 3 of 6"):
    train(config(), tmp_path / "resumed")
  monkeypatch.undo()
  train(config(), tmp_path / "resumed")
  rows = lambda w: [json.loads(l) for l in (tmp_path / w / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows("resumed")] == [3, 6]
  assert [r["loss"] for r in rows("straight")] == [r["loss"] for r in rows("resumed")]
  saved = json.loads((tmp_path / "straight" / "config.json").read_text())
  assert saved["model"]["vocab_size"] == 300  # the tokenizer's; padded to 304 in the model
  c = config()
  c.model.vocab_size = 200
  with pytest.raises(ValueError, match="model.vocab_size 200 is smaller than the task's "
                                       "vocabulary \\(300\\)"):
    train(c, tmp_path / "small")
