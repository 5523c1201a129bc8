"""Speculative decoding measured: a byte-level Transformer++ target and a smaller Mamba
draft, both trained here on the embedded Shakespeare corpus, decoding the same prompts
plainly and speculatively (k draft tokens a round); tokens/s, the speed-up and the
draft's acceptance rate, greedy and sampled.

  python scripts/bench_speculative.py --write      # trains both (minutes on a CPU) once

The runs go to --workdir (default runs/bench-speculative/{target,draft}: a rerun reuses
them). Random weights would say nothing here: the acceptance rate is how often the
draft predicts the target, and the speed-up follows from it and the two models' costs.
Timing: the median of --repeats calls after a warm-up (compile) call, wall clock, each
call the whole `generate` / `speculative_generate` (prefill and decode).
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ssm import flops
from ssm.config import load_config_file
from ssm.data.text import BOS, SHAKESPEARE
from ssm.generate import Sampling, generate, speculative_generate
from ssm.report import describe_device, write_section
from ssm.train import train
from ssm.train.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
# the target: configs/bytes.py's Transformer++ at twice the width; the draft: its Mamba
RUNS = {"target": ("transformer", dict(d_model=128, n_layer=4, d_intermediate=512)),
        "draft": ("mamba", dict(d_model=64, n_layer=2))}


def trained(name, workdir, steps):
  arch, model = RUNS[name]
  if not (workdir / "checkpoints").exists():
    c = load_config_file(str(ROOT / "configs" / "bytes.py") + f":{arch}")
    c.unlock()
    c.model.update(model)
    c.train.steps, c.checkpoint.every, c.wandb.mode = steps, steps, "disabled"
    train(c, workdir)
  return load_model(workdir)[0]


def prompts(n, length, seed=0):
  text = SHAKESPEARE.read_bytes()
  starts = np.random.default_rng(seed).integers(0, len(text) - length, n)
  return [[BOS, *text[s:s + length]] for s in starts]


def timed(fn, repeats):
  out = fn()  # compiles
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default="runs/bench-speculative")
  p.add_argument("--steps", type=int, default=600, help="training steps of each model")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--ks", default="2,4")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--write", action="store_true", help=f"write the table to {DOC}")
  args = p.parse_args(argv)
  workdir = Path(args.workdir)
  target = trained("target", workdir / "target", args.steps)
  draft = trained("draft", workdir / "draft", args.steps)
  rows_in = prompts(args.batch, 64)
  n = args.new_tokens
  rows = []
  for label, sampling in (("greedy", Sampling(temperature=0)),
                          ("T=1, top-k 20", Sampling(temperature=1.0, top_k=20))):
    plain, t_plain = timed(lambda: generate(target, rows_in, n, sampling, seed=1), args.repeats)
    tokens = int(plain.lengths.sum())
    rows.append((label, "target alone", "", tokens / t_plain, 1.0, ""))
    for k in map(int, args.ks.split(",")):
      spec, t = timed(lambda: speculative_generate(target, draft, rows_in, n, k=k,
                                                   sampling=sampling, seed=1), args.repeats)
      if label == "greedy":
        assert spec.rows() == plain.rows(), "speculative greedy differs from the target's"
      rows.append((label, f"speculative, k={k}", f"{spec.acceptance_rate:.2f}",
                   int(spec.lengths.sum()) / t, t_plain / t * int(spec.lengths.sum()) / tokens,
                   f"{spec.rounds}"))
  pt, pd = flops.param_count(target.config), flops.param_count(draft.config)
  head = (f"`python scripts/bench_speculative.py{' '.join([''] + (argv or sys.argv[1:]))}` on "
          f"{describe_device()}, {datetime.date.today()}. Target: a byte-level Transformer++ "
          f"(d_model {target.config.d_model}, {target.config.n_layer} layers, {pt:,} parameters);"
          f" draft: a Mamba (d_model {draft.config.d_model}, {draft.config.n_layer} layers, "
          f"{pd:,} parameters); both trained {args.steps} steps on the embedded Shakespeare "
          f"(configs/bytes.py). {args.batch} prompts of 64 bytes, {n} new tokens each; median "
          f"of {args.repeats} calls.\n\n")
  table = ["| sampling | decoding | acceptance | tokens/s | speed-up | target calls |",
           "|---|---|---|---|---|---|"]
  table += [f"| {a} | {b} | {c} | {d:,.0f} | {e:.2f}x | {f} |" for a, b, c, d, e, f in rows]
  text = head + "\n".join(table) + "\n"
  print(text)
  if args.write:
    write_section(DOC, "bench_speculative", text)


if __name__ == "__main__":
  main()
