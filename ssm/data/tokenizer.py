"""Tokenizers for language modelling: `load_tokenizer(spec)` and `train_bpe`.

`spec` is one of
  "bytes"                     the 256 byte values and BOS = 256 (MambaByte; no EOS),
  a tokenizer.json, or a directory holding one (Hugging Face `tokenizers`),
  a SentencePiece model (*.model),
  a Hugging Face hub name ("EleutherAI/gpt-neox-20b"), fetched once into the HF cache.

Every tokenizer has `vocab_size` (the ids it can produce: the model's vocabulary
must hold them), `bos_id` (starts every document) and `eos_id` (ends it; None where
the tokenizer has none, as for bytes), and a `fingerprint` that changes whenever
the ids it produces could (a tokenized-corpus cache is keyed by it).
"""

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

# Special tokens by the names the common tokenizers give them, most specific first.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
BOS_NAMES = ("<|startoftext|>", "<s>", "<bos>", "<|bos|>", "<|begin_of_text|>")
# The special token `train_bpe` gives its tokenizers (GPT-2 / GPT-NeoX's: BOS = EOS, id 0).
ENDOFTEXT = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """`encode_batch(texts) -> list of id lists`, `decode(ids) -> str`."""
  name: str
  vocab_size: int
  bos_id: int
  eos_id: int | None
  fingerprint: str
  _encode: object = dataclasses.field(repr=False, compare=False)
  _decode: object = dataclasses.field(repr=False, compare=False)

  def encode_batch(self, texts):
    return self._encode(list(texts))

  def encode(self, text):
    return self.encode_batch([text])[0]

  def decode(self, ids):
    return self._decode([int(i) for i in ids])


def _sha(data):
  return hashlib.sha256(data).hexdigest()[:16]


def byte_tokenizer():
  def decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
  return Tokenizer("bytes", 257, 256, None, "bytes",
                   lambda texts: [list(t.encode()) for t in texts], decode)


def _hf_tokenizer(tok, name, fingerprint):
  vocab = tok.get_vocab(with_added_tokens=True)
  eos = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
  bos = next((vocab[n] for n in BOS_NAMES if n in vocab), eos)
  if bos is None:
    raise ValueError(f"tokenizer {name!r} has no end-of-text or begin token (looked for "
                     f"{', '.join(EOS_NAMES + BOS_NAMES)}); add one, e.g. train it with "
                     f"ssm-tokenizer, which adds {ENDOFTEXT}")
  tok.no_padding()
  tok.no_truncation()

  def encode(texts):
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

  return Tokenizer(name, max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1),
                   bos, eos, fingerprint, encode,
                   lambda ids: tok.decode(ids, skip_special_tokens=True))


def _sentencepiece(path):
  try:
    import sentencepiece  # noqa: PLC0415
  except ImportError:
    raise ValueError(f"task.tokenizer={path!r} is a SentencePiece model: pip install "
                     "sentencepiece (or ssm-jax[lm])") from None
  sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
  bos, eos = sp.bos_id(), sp.eos_id()
  if eos < 0 and bos < 0:
    raise ValueError(f"the SentencePiece model {path} has neither BOS nor EOS")
  return Tokenizer(str(path), sp.get_piece_size(), bos if bos >= 0 else eos,
                   eos if eos >= 0 else None, _sha(Path(path).read_bytes()),
                   lambda texts: sp.encode(texts), lambda ids: sp.decode(ids))


def load_tokenizer(spec):
  """The tokenizer `spec` names (see the module docstring)."""
  if not spec or spec == "bytes":
    return byte_tokenizer()
  path = Path(spec).expanduser()
  if path.is_dir():
    path = path / "tokenizer.json"
    if not path.exists():
      raise ValueError(f"task.tokenizer={spec!r} is a directory without a tokenizer.json")
  if path.suffix == ".model" and path.is_file():
    return _sentencepiece(path)
  from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415
  if path.is_file():
    data = path.read_bytes()
    try:
      tok = HFTokenizer.from_str(data.decode())
    except Exception as e:  # noqa: BLE001  the library's errors name nothing
      raise ValueError(f"task.tokenizer={spec!r} is not a tokenizer.json ({e})") from None
    return _hf_tokenizer(tok, str(path), _sha(data))
  if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.endswith((".json", ".model")):
    raise ValueError(f"task.tokenizer={spec!r}: no such file; give a tokenizer.json, a "
                     "directory holding one, a SentencePiece .model, 'bytes' or a hub name")
  try:
    tok = HFTokenizer.from_pretrained(spec)
  except Exception as e:  # noqa: BLE001  offline, or no such repository
    raise ValueError(f"task.tokenizer={spec!r}: could not get it from the Hugging Face hub "
                     f"({type(e).__name__}); offline, give a local tokenizer.json (or a "
                     "directory holding one) or train one: ssm-tokenizer CORPUS --out "
                     "tokenizer.json") from None
  return _hf_tokenizer(tok, spec, _sha(tok.to_str().encode()))


def train_bpe(texts, vocab_size, out, min_frequency=2):
  """Trains a byte-level BPE tokenizer (GPT-2's pre-tokenisation, every byte in the
  base alphabet, so any text encodes; ENDOFTEXT as id 0) on an iterable of texts and
  writes its tokenizer.json to `out`."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415,I001
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=[ENDOFTEXT], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  seen = [0]

  def counted():
    for text in texts:
      seen[0] += len(text)
      yield text

  tok.train_from_iterator(counted(), trainer)
  if not seen[0]:
    raise ValueError("the corpus is empty: nothing to train a tokenizer on")
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(tok.to_str(pretty=True))
  tmp.replace(out)  # never a half-written tokenizer.json
  return load_tokenizer(str(out))


USAGE = """ssm-tokenizer CORPUS --out tokenizer.json [--vocab-size N] [--text-key KEY]

Trains a byte-level BPE tokenizer (Hugging Face `tokenizers`) on the training part of
a local corpus, as task.path reads it (a text file, a glob, a directory; *.jsonl: one
document per line in field --text-key), and writes its tokenizer.json, for
task.tokenizer. The last --eval-fraction of the corpus (task.eval_fraction) is left
out, so that evaluation text is unseen by the tokenizer too.

  ssm-tokenizer ssm/data/corpora/tinyshakespeare.txt --vocab-size 1024 --out runs/bpe.json
"""


def main(argv=None):
  import argparse  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from ssm.data.tokenized import TokenizedText, texts  # noqa: PLC0415
  p = argparse.ArgumentParser("ssm-tokenizer", usage=USAGE)
  p.add_argument("corpus")
  p.add_argument("--out", required=True)
  p.add_argument("--vocab-size", type=int, default=1024)
  p.add_argument("--min-frequency", type=int, default=2)
  p.add_argument("--text-key", default="")
  p.add_argument("--eval-fraction", type=float, default=0.1)
  args = p.parse_args(argv)
  if args.vocab_size < 257:
    p.error(f"--vocab-size {args.vocab_size}: at least 257 (the 256 bytes and {ENDOFTEXT})")
  try:
    corpus = TokenizedText(seq_len=2, batch_size=1, path=args.corpus, text_key=args.text_key,
                           eval_fraction=args.eval_fraction)
    tok = train_bpe(texts(corpus, "train"), args.vocab_size, args.out, args.min_frequency)
  except (ValueError, FileNotFoundError) as e:
    print(f"ssm-tokenizer: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {args.out}: {tok.vocab_size} tokens (BOS = EOS = {ENDOFTEXT}, id {tok.eos_id})")
