"""Trains default task configs end to end and tabulates their final eval metrics:
evidence that each task, pipeline and config learns at its CPU size.

  python scripts/task_results.py                       # prints the table
  python scripts/task_results.py --write               # ... into docs/results/tasks.md
  python scripts/task_results.py --configs induction_heads.py:mamba,induction_heads.py:transformer

Each run is `ssm.train.train` with the config's defaults (workdirs under --workdir,
reused: a finished run is not trained again).
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import jax

from ssm.train import train
from ssm.config import load_config_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["selective_copy.py:mamba", "selective_copy.py:transformer",
           "induction_heads.py:mamba", "induction_heads.py:transformer", "listops.py:mamba",
           "bytes.py:mamba", "images.py:vit_reg4", "images.py:vim"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--workdir", default="runs/task-results")
  p.add_argument("--write", action="store_true")
  args = p.parse_args(argv)
  rows = []
  for spec in args.configs.split(","):
    c = load_config_file(str(ROOT / "configs" / spec))
    c.wandb.mode = "disabled"
    workdir = Path(args.workdir) / spec.replace(".py:", "-")
    start = time.perf_counter()
    final = train(c, workdir)
    minutes = (time.perf_counter() - start) / 60
    evals = {k.removeprefix("eval/"): v for k, v in final.items() if k.startswith("eval/")}
    # the steps trained: fewer than train.steps where the run stopped early (stop_when)
    steps = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    rows.append((spec, steps, minutes, evals))
    print(spec, json.dumps(evals), flush=True)
  table = "| config | steps | minutes | final eval metrics |\n|---|---|---|---|\n" + "".join(
      f"| {s} | {n} | {m:.1f} | " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(e.items())
                                             if k != "loss") + " |\n"
      for s, n, m, e in rows)
  print("\n" + table)
  if args.write:
    cmd = "python scripts/task_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = ROOT / "docs" / "results" / "tasks.md"
    out.write_text(
        "# Default task configs, trained\n\n"
        f"`{cmd.strip()}` on {jax.devices()[0].platform} ({jax.device_count()} device(s), "
        f"a shared 2-core machine), JAX {jax.__version__}, {datetime.date.today()}. Each "
        "config's defaults, one seed; 'steps' are those trained (a run stops early at its "
        "train.stop_when), 'minutes' include compilation and evaluation.\n\n"
        + table)


if __name__ == "__main__":
  main()
