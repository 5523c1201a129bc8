"""`ssm-eval`: a trained run (its workdir) or an imported Hugging Face model evaluated on a
task without training: loss, perplexity, bits per byte, accuracy, the loss by position
within the context (the long-context signature), at the training length and beyond.

  ssm-eval runs/text-mamba                              # its task's eval split, whole
  ssm-eval runs/text-mamba --seq-len 128 512 2048       # and at 4x, 16x its length
  ssm-eval runs/ih-mamba --seq-len 4096 --batches 2     # induction heads at a new length
  ssm-eval runs/text-mamba --split train --config.task.path=other.txt
  ssm-eval --hf state-spaces/mamba-130m-hf --config.task.path=held_out.txt  # its tokenizer
  ssm-eval runs/text-mamba --tasks lambada_openai,hellaswag   # zero-shot (ssm.zeroshot)

Writes eval.json and loss_by_position.png to --out (default WORKDIR/eval).
"""

import argparse
import ast
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx

from ssm.data import make_pipeline
from ssm.fields import check_keys


def lm_sums_by_position(graphdef):
  """f(params, batch) -> sums over the batch of the cross-entropy, correct predictions
  and scored tokens by context length (L,) each, in float32. A token's context length
  is the number of tokens the model has seen of its document: its position since the
  last reset (a document start), or since the row's start."""
  def f(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch.get("reset"))
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    mask = batch["loss_mask"]
    correct = jnp.argmax(logits, -1) == batch["labels"]
    B, L = mask.shape
    t = jnp.broadcast_to(jnp.arange(L), (B, L))
    reset = batch.get("reset")
    start = t * 0 if reset is None else jax.lax.cummax(jnp.where(reset, t, 0), axis=1)
    context = (t - start).reshape(-1)
    by = lambda x: jax.ops.segment_sum(x.reshape(-1), context, num_segments=L)
    return dict(loss=by(ce * mask), accuracy=by(correct * mask), count=by(mask))
  return jax.jit(f)


def evaluate(model, task, *, split="eval", batches=0, batch_size=8, seq_lens=()):
  """{seq_len: metrics} of `model` on the task (a config.task dict) at each length (the
  task's own if none). `batches` 0: one pass over a tokenized split, else the task's
  first `batches` batches (a generated task has no end: give it)."""
  task = dict(task.to_dict() if hasattr(task, "to_dict") else task)
  graphdef, params = nnx.split(model)
  sums_fn = lm_sums_by_position(graphdef)
  out = {}
  for seq_len in seq_lens or (task["seq_len"],):
    pipeline = make_pipeline(dict(task, seq_len=int(seq_len)), batch_size, 0)
    if pipeline.kind != "lm":
      raise ValueError("ssm-eval evaluates language-model tasks (text, bytes, generated "
                       "sequence tasks); an image run's evaluation is its eval/ metrics")
    n = batches or _one_pass(pipeline, split, batch_size, seq_len)
    data = iter(pipeline.batches(split, slice(0, batch_size)))
    total = None
    for _ in range(n):
      batch = {k: jnp.asarray(v) for k, v in next(data).items()}
      sums = sums_fn(params, batch)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    total = jax.tree.map(np.asarray, total)
    count = total["count"].sum()
    loss = float(total["loss"].sum() / count)
    metrics = dict(loss=loss, perplexity=math.exp(min(loss, 700)),
                   accuracy=float(total["accuracy"].sum() / count), tokens=int(count),
                   batches=n,
                   loss_by_position=(total["loss"] / np.maximum(total["count"], 1)).tolist(),
                   count_by_position=total["count"].tolist())
    ratio = _tokens_per_byte(pipeline, split)
    if ratio:
      metrics["bits_per_byte"] = loss * ratio / math.log(2)
    out[int(seq_len)] = metrics
  return out


def _one_pass(pipeline, split, batch_size, seq_len):
  if not hasattr(pipeline, "packed_tokens"):
    raise ValueError("this task has no end to its split: give --batches N")
  return max(1, math.ceil(pipeline.packed_tokens(split) / (batch_size * (seq_len + 1))))


def _tokens_per_byte(pipeline, split):
  if hasattr(pipeline, "tokens_per_byte"):
    return pipeline.tokens_per_byte(split)
  return float(pipeline.bits_per_byte)  # bytes: 1 (True); other tasks: none


def plot_by_position(results, path, title):
  """Mean loss against context length, in log-spaced bins (weighted by their tokens)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 3.8))
  for seq_len, m in sorted(results.items()):
    count = np.asarray(m["count_by_position"])
    loss = np.asarray(m["loss_by_position"]) * count
    edges = np.unique(np.geomspace(1, len(count) + 1, 40).astype(int))
    x, y = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
      if count[lo - 1:hi - 1].sum():
        x.append(np.sqrt(lo * (hi - 1)))
        y.append(loss[lo - 1:hi - 1].sum() / count[lo - 1:hi - 1].sum())
    ax.plot(x, y, marker=".", label=f"rows of {seq_len}")
  ax.set_xscale("log")
  ax.set_xlabel("context length (tokens of the document seen)")
  ax.set_ylabel("loss (nats per token)")
  ax.set_title(title, fontsize=10)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# --- the command -----------------------------------------------------------------------
def _override(config, dotted, text):
  """config[dotted] = text parsed as the current value's type."""
  *sections, key = dotted.split(".")
  node = config
  for s in sections:
    if s not in node or not isinstance(node[s], (dict, mlc.ConfigDict)):
      raise ValueError(f"--config.{dotted}: no section {s!r}")
    node = node[s]
  check_keys({key: None}, list(node.keys()), f"--config.{'.'.join(sections)}")
  old = node[key]
  if isinstance(old, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"--config.{dotted}={text!r}: expected True or False")
    value = text.lower() in ("true", "1")
  elif isinstance(old, str):
    value = text
  else:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ValueError(f"--config.{dotted}={text!r}: expected a value like {old!r}") from None
  node[key] = tuple(value) if isinstance(old, (tuple, list)) else value


def _load(args):
  """(model, run config, label) from a workdir or --hf with --task."""
  if bool(args.workdir) == bool(args.hf):
    raise ValueError("give a WORKDIR (an ssm-train run) or --hf NAME with --task CONFIG")
  if args.workdir:
    from ssm.train.checkpoint import load_model  # noqa: PLC0415
    model, config, step = load_model(args.workdir, step=args.step, best=args.best)
    return model, config, f"{Path(args.workdir).name} (step {step})"
  from ssm.config import load_config_file  # noqa: PLC0415
  from ssm.convert import load_hf  # noqa: PLC0415
  config = load_config_file(args.task)
  return load_hf(args.hf, dtype=args.dtype), config, args.hf


def _tokenizer_spec(args, config):
  """--tokenizer; else the HF model's own; else the run's (a byte task's: bytes)."""
  if args.tokenizer or args.hf:
    return args.tokenizer or args.hf
  name = config.task.get("name")
  if name not in ("text", "bytes"):
    raise ValueError(f"a run on task {name!r} has no tokenizer for text: give --tokenizer")
  return config.task.tokenizer if name == "text" else "bytes"


def zeroshot(args, model, config, label, out):
  from ssm.data.tokenizer import load_tokenizer  # noqa: PLC0415
  from ssm.zeroshot import run_tasks  # noqa: PLC0415
  tok = load_tokenizer(_tokenizer_spec(args, config))
  results = run_tasks(model, tok, args.tasks, include_path=args.include_path, limit=args.limit,
                      num_fewshot=args.num_fewshot, batch_size=args.batch_size or 8,
                      max_length=args.max_length)
  (out / "zeroshot.json").write_text(json.dumps(dict(model=label, tasks=results), indent=1))
  print(f"{label}: zero-shot ({tok.name})")
  for task, metrics in results.items():
    print(f"{task:>24} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
  print(f"wrote {out / 'zeroshot.json'}")
  return results


def run(args, overrides):
  model, config, label = _load(args)
  config = mlc.ConfigDict(config.to_dict())  # unlocked: overrides are checked here
  for item in overrides:
    dotted, eq, value = item[len("--config."):].partition("=")
    if not eq:
      raise ValueError(f"{item}: expected --config.SECTION.KEY=VALUE")
    _override(config, dotted, value)
  out = Path(args.out or (Path(args.workdir) / "eval" if args.workdir else "eval"))
  out.mkdir(parents=True, exist_ok=True)
  if args.tasks:
    return zeroshot(args, model, config, label, out)
  if args.tokenizer or args.hf:
    if config.task.get("name") != "text":
      raise ValueError("--tokenizer and --hf evaluate on tokenized text (a task named 'text', "
                       "e.g. --task configs/text.py)")
    config.task.tokenizer = _tokenizer_spec(args, config)
  vocab = getattr(model.config if hasattr(model, "config") else None, "vocab_size", None)
  need = make_pipeline(config.task, 1, 0).vocab_size
  if vocab is not None and vocab < need:
    raise ValueError(f"the model's vocabulary ({vocab}) is smaller than the task's ({need}): "
                     "evaluate it with the tokenizer it was trained with (--config.task.tokenizer)")
  batch_size = args.batch_size or config.train.get("batch_size", 8)
  batches = args.batches if args.batches or config.task.get("name") in ("text",) else (
      config.train.get("eval_steps", 4))
  results = evaluate(model, config.task, split=args.split, batches=batches,
                     batch_size=batch_size, seq_lens=args.seq_len)
  record = dict(model=label, split=args.split, task=config.task.to_dict(),
                results={str(k): v for k, v in results.items()})
  (out / "eval.json").write_text(json.dumps(record, indent=1))
  plot_by_position(results, out / "loss_by_position.png",
                   f"{label}: loss by position ({config.task.get('name')}, {args.split})")
  print(f"{label} on {config.task.get('name')} ({args.split})")
  print(f"{'length':>8} {'tokens':>10} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'acc':>7}")
  for seq_len, m in results.items():
    bpb = f"{m['bits_per_byte']:.4f}" if "bits_per_byte" in m else "-"
    print(f"{seq_len:>8} {m['tokens']:>10} {m['loss']:>8.4f} {m['perplexity']:>10.2f} "
          f"{bpb:>10} {m['accuracy']:>7.4f}")
  print(f"wrote {out / 'eval.json'} and {out / 'loss_by_position.png'}")
  return results


def main(argv=None):
  p = argparse.ArgumentParser("ssm-eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir", nargs="?", help="an ssm-train run's workdir")
  p.add_argument("--hf", help="a Hugging Face model (hub name or save_pretrained directory)")
  p.add_argument("--task", default="configs/text.py",
                 help="with --hf: the config file whose task to evaluate on")
  p.add_argument("--dtype", default="float32", help="with --hf: float32 or bfloat16")
  p.add_argument("--step", type=int, help="the checkpoint's step (default the newest)")
  p.add_argument("--best", action="store_true", help="the best checkpoint")
  p.add_argument("--split", default="eval", choices=("eval", "train"))
  p.add_argument("--seq-len", type=int, nargs="+", default=(),
                 help="lengths to evaluate at (default the task's)")
  p.add_argument("--batches", type=int, default=0,
                 help="batches per length (default: one pass over a text split, else "
                      "train.eval_steps)")
  p.add_argument("--batch-size", type=int, default=0, help="default train.batch_size")
  p.add_argument("--out", help="where eval.json and the plot go (default WORKDIR/eval)")
  p.add_argument("--tokenizer", help="a tokenizer (ssm.data.tokenizer) in place of the run's; "
                                     "with --hf, default the model's own")
  p.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated: zero-shot "
                                 "accuracy in place of perplexity (ssm.zeroshot)")
  p.add_argument("--include-path", help="a directory of local lm_eval task YAMLs")
  p.add_argument("--limit", type=int, help="examples per task (a quick look)")
  p.add_argument("--num-fewshot", type=int)
  p.add_argument("--max-length", type=int, default=2048, help="context for zero-shot scoring")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)} (task overrides are "
            "--config.task.KEY=VALUE)")
  if any(n < 2 for n in args.seq_len) or args.batches < 0 or args.batch_size < 0:
    p.error("--seq-len must be >= 2, --batches and --batch-size >= 0")
  try:
    run(args, rest)
  except (ValueError, FileNotFoundError) as e:
    print(f"ssm-eval: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
