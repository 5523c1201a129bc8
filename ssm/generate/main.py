"""`ssm-generate`: text from a trained run (its workdir) or an imported Hugging Face model.

  ssm-generate --workdir runs/bytes-mamba --prompt "ROMEO:" --max-new-tokens 200
  ssm-generate --workdir runs/bytes-mamba --prompt "ROMEO:" --prompt "JULIET:" \\
      --temperature 0.8 --top-p 0.95 --seed 1
  ssm-generate --workdir runs/bytes-tpp --draft-workdir runs/bytes-mamba --k 4 --prompt "KING:"
  ssm-generate --hf path/to/save_pretrained_dir --prompt-ids 1,2,3 --temperature 0

Byte-level and tokenized-text runs (configs/bytes.py, configs/text.py) take text
prompts and print text, through the run's tokenizer; they stop where the document
ends (BOS or EOS). Token models take --prompt-ids, or --prompt text where the
Hugging Face directory has a tokenizer (its tokenizer.json; transformers' AutoTokenizer
where the [hf] extra is installed). --temperature 0 is greedy. With a --draft-* model,
speculative decoding (the target's distribution exactly), and its acceptance rate on
stderr.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from ssm.generate.sampling import Sampling

class Loaded:
  """A model and how its text is read and written: the tokenizer of the run's task
  (`run_tokenizer`, ssm.data.tokenizer: bytes or a text task's; a prompt starts a
  document with BOS and generation stops where the document ends), a Hugging Face
  model's (`tokenizer`: encode, decode), or none (token ids in and out)."""

  def __init__(self, model, run_tokenizer=None, tokenizer=None):
    self.model, self.run_tokenizer, self.tokenizer = model, run_tokenizer, tokenizer

  @property
  def document_ends(self):
    """The ids that end a document: BOS (a new one starts) and EOS."""
    tok = self.run_tokenizer
    return [] if tok is None else sorted({tok.bos_id, tok.eos_id} - {None})

  def encode(self, text):
    if self.run_tokenizer is not None:
      return [self.run_tokenizer.bos_id, *self.run_tokenizer.encode(text)]
    if self.tokenizer is None:
      raise ValueError("this model has no tokenizer here: give --prompt-ids (token ids, "
                       "comma-separated), or an --hf directory with its tokenizer files")
    return self.tokenizer[0](text)

  def decode(self, ids):
    if self.run_tokenizer is not None:
      return self.run_tokenizer.decode(ids)
    if self.tokenizer is not None:
      return self.tokenizer[1](ids)
    return " ".join(map(str, ids))


def load(workdir=None, hf=None, step=None, best=False):
  """A Loaded model from an ssm-train workdir or a Hugging Face directory / hub name."""
  from ssm.generate.decode import check_model
  if bool(workdir) == bool(hf):
    raise ValueError("give exactly one of --workdir (an ssm-train run) and --hf (a Hugging "
                     "Face model)")
  if workdir:
    from ssm.data.tokenizer import load_tokenizer
    from ssm.train.checkpoint import load_model
    model, config, _ = load_model(workdir, step=step, best=best)
    check_model(model)
    task = config.task.get("name")
    if task not in ("bytes", "text"):
      return Loaded(model)
    return Loaded(model, load_tokenizer(config.task.tokenizer if task == "text" else "bytes"))
  from ssm.convert import load_hf
  model = load_hf(hf)
  check_model(model)
  return Loaded(model, tokenizer=hf_tokenizer(hf))


def hf_tokenizer(hf):
  """(encode, decode) of a Hugging Face model's tokenizer, or None where it has none:
  transformers' AutoTokenizer, or without transformers (the [hf] extra) a local
  directory's tokenizer.json read by `tokenizers`."""
  try:
    from transformers import AutoTokenizer
  except ImportError:
    path = Path(hf) / "tokenizer.json"
    if not path.is_file():
      return None
    try:
      from tokenizers import Tokenizer
      tokenizer = Tokenizer.from_file(str(path))
    except Exception:  # no tokenizers, or a file it cannot read: token ids only
      return None
    return lambda text: tokenizer.encode(text).ids, tokenizer.decode
  try:
    tokenizer = AutoTokenizer.from_pretrained(hf)
  except Exception:  # no tokenizer files: token ids only
    return None
  return lambda text: tokenizer(text)["input_ids"], tokenizer.decode


def parse_ids(text):
  try:
    return [int(t) for t in text.replace(" ", "").split(",") if t]
  except ValueError:
    raise ValueError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,2,3")


def run(args):
  from ssm.generate.decode import generate
  from ssm.generate.speculative import speculative_generate
  target = load(args.workdir, args.hf, args.step, args.best)
  prompts = ([target.encode(p) for p in args.prompt] + [parse_ids(p) for p in args.prompt_ids])
  if not prompts:
    raise ValueError("no prompt: give --prompt TEXT or --prompt-ids 1,2,3 (repeat for a batch)")
  stops = list(args.stop_token)
  if not args.no_stop_at_bos:
    stops += target.document_ends
  sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, repetition_penalty=args.repetition_penalty)
  if args.draft_workdir or args.draft_hf:
    draft = load(args.draft_workdir, args.draft_hf)
    out = speculative_generate(target.model, draft.model, prompts, args.max_new_tokens,
                               k=args.k, sampling=sampling, stop_tokens=stops, seed=args.seed)
    print(f"speculative decoding: {out.accepted}/{out.proposed} draft tokens accepted "
          f"({out.acceptance_rate:.1%}), {out.rounds} target calls for "
          f"{int(np.sum(out.lengths))} tokens", file=sys.stderr)
  else:
    out = generate(target.model, prompts, args.max_new_tokens, sampling=sampling,
                   stop_tokens=stops, seed=args.seed)
  for prompt, new in zip(prompts, out.rows()):
    if target.run_tokenizer is not None:
      print(target.decode(prompt) + target.decode(new))
    else:
      print(target.decode(new))
  return 0


def parser():
  p = argparse.ArgumentParser(prog="ssm-generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", help="an ssm-train run's workdir (its config.json and checkpoints)")
  p.add_argument("--hf", help="a Hugging Face save_pretrained directory or hub name")
  p.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
  p.add_argument("--best", action="store_true", help="the best checkpoint by "
                 "checkpoint.best_metric")
  p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat: a batch)")
  p.add_argument("--prompt-ids", action="append", default=[],
                 help="a prompt as comma-separated token ids (repeat: a batch)")
  p.add_argument("--max-new-tokens", type=int, default=100)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: off")
  p.add_argument("--top-p", type=float, default=1.0, help="1: off")
  p.add_argument("--min-p", type=float, default=0.0, help="0: off")
  p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
  p.add_argument("--stop-token", type=int, action="append", default=[],
                 help="a token id that ends a row (repeat for several)")
  p.add_argument("--no-stop-at-bos", action="store_true",
                 help="byte and text runs: go on past the end of the document (BOS/EOS)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--draft-workdir", help="speculative decoding: the draft's workdir")
  p.add_argument("--draft-hf", help="speculative decoding: the draft as a Hugging Face model")
  p.add_argument("--k", type=int, default=4, help="draft tokens proposed a round")
  return p


def main(argv=None):
  args = parser().parse_args(argv)
  try:
    return run(args)
  except (ValueError, FileNotFoundError, KeyError, ImportError) as e:  # ImportError: an extra
    print(f"ssm-generate: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
