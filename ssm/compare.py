"""`ssm-compare --config configs/compare/<x>.py [--workdir DIR]`: a matched comparison.

A sweep over architectures x sizes x seeds x learning rates on one task, every run
through the shared loop. For each reference size, the other architectures are
matched to it on parameters or on training FLOPs per token (ssm.flops.match).
Finished runs are skipped and interrupted ones resume, so rerunning the command
finishes the sweep. The best learning rate per (architecture, size) is reported,
as Zoology does. At the end: results.csv, results.md and plots in the workdir.
"""

import csv
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_collections as mlc
from absl import app, flags
from ml_collections import config_flags

from ssm.flops import family_config, lm_flops, lm_params, match
from ssm.models import config_from_dict
from ssm.train import train
from ssm.train.config import load_config_file, model_config
from ssm.train.metrics import setup_logging

log = logging.getLogger("ssm.compare")


@dataclasses.dataclass
class Run:
  family: str
  size: int  # the reference width this run is matched to
  seed: int
  lr: float
  model: object  # LMConfig
  seq_len: int = 0  # 0: the task's own

  @property
  def name(self):
    length = f"-len{self.seq_len}" if self.seq_len else ""
    return (f"{self.family}-d{self.model.d_model}-l{self.model.n_layer}-ref{self.size}"
            f"{length}-s{self.seed}-lr{self.lr:g}")


def plan(cfg):
  """Every run of the sweep, its model matched to the reference at its size (and, when
  matching on FLOPs, at each swept length: attention's FLOPs grow with it)."""
  base = base_config(cfg)
  vocab = base.model.vocab_size
  runs = []
  for size in cfg.sizes:
    ref = family_config(cfg.reference.family, size, cfg.reference.n_layer, vocab)
    for family in cfg.families:
      for seq_len in cfg.seq_lens or (0,):
        model = ref if family == cfg.reference.family else _matched(
            cfg, family, ref, seq_len or base.task.seq_len, vocab)
        for seed in cfg.seeds:
          for lr in learning_rates(cfg, family):
            runs.append(Run(family, size, seed, lr, model, seq_len))
  return runs


def learning_rates(cfg, family):
  """cfg.lrs: one sweep for every family, or a sweep per family (the papers tune
  attention and Mamba apart: {"mamba": (1e-3,), "transformer++": (2e-4,)})."""
  if isinstance(cfg.lrs, (tuple, list)):
    return cfg.lrs
  if family not in cfg.lrs:
    raise ValueError(f"lrs has no learning rates for {family!r}; it has {sorted(cfg.lrs)}")
  return cfg.lrs[family]


def _matched(cfg, family, ref, seq_len, vocab):
  """`family` matched to the reference model `ref` on cfg.match at `seq_len`; "width"
  takes the reference's width and depth (Zoology's Figure 2 axis: model dimension)."""
  if cfg.match == "width":
    return family_config(family, ref.d_model, ref.n_layer, vocab)
  target = lm_params(ref) if cfg.match == "params" else 3 * lm_flops(ref, seq_len)["total"]
  hint = cfg.reference.n_layer * (0.5 if family == "transformer++" else 1.0)
  model, _, mismatch = match(family, target, criterion=cfg.match, seq_len=seq_len,
                             vocab_size=vocab, depth_hint=hint,
                             depth=cfg.reference.n_layer if cfg.same_depth else None)
  if abs(mismatch) > cfg.tolerance:
    raise ValueError(f"{family} cannot be matched to {cfg.reference.family} d_model "
                     f"{ref.d_model} within {cfg.tolerance:.0%} ({mismatch:+.1%}); try another "
                     "size, or free the depth with --config.same_depth=False")
  return model


def base_config(cfg):
  """The base run config with the comparison's overrides, unlocked."""
  c = load_config_file(cfg.base)
  c.unlock()
  _update(c, cfg.overrides.to_dict(), "overrides")
  return c


def run_config(cfg, run):
  c = base_config(cfg)
  c.model = model_config(run.model)
  c.seed = run.seed
  c.train.lr = run.lr
  if run.seq_len:
    c.task.seq_len = run.seq_len
  c.wandb.group, c.wandb.job_type, c.wandb.name = cfg.name, run.family, run.name
  c.wandb.mode = cfg.wandb_mode
  c.lock()
  return c


def _update(config, overrides, where):
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"{where}.{key}: the run config has no such key; it has {sorted(config)}")
    if isinstance(value, dict):
      _update(config[key], value, f"{where}.{key}")
    else:
      config[key] = value


def execute(cfg, workdir):
  """Runs what is not finished, `cfg.parallel` at a time; returns every run's result.

  cfg.lr_sweep "every_seed" runs every learning rate at every seed; "first_seed" sweeps
  the learning rates at the first seed and runs the other seeds at its best (by
  cfg.select) for each (family, size, length): a sweep of n rates and s seeds costs
  n + s - 1 runs rather than n * s. The runs share a persistent XLA compilation cache
  in the workdir, so a run that differs from an earlier one only in its seed does not
  compile again."""
  import jax
  cache = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                                str(Path(workdir).absolute() / "xla_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")  # subprocesses
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  runs, sweep = plan(cfg), cfg.get("lr_sweep", "every_seed")
  if sweep == "every_seed":
    return _execute(cfg, runs, workdir)
  if sweep != "first_seed":
    raise ValueError(f"lr_sweep {sweep!r}: expected 'every_seed' or 'first_seed'")
  first = [r for r in runs if r.seed == cfg.seeds[0]]
  results = _execute(cfg, first, workdir)
  best = {(r["family"], r["size"], r["seq_len"]): r["lr"]
          for r in best_rows(results, cfg.select.metric, cfg.select.mode)}
  task_len = base_config(cfg).task.seq_len
  rest = [r for r in runs if r.seed != cfg.seeds[0]
          and r.lr == best[(r.family, r.size, r.seq_len or task_len)]]
  return results + _execute(cfg, rest, workdir)


def _execute(cfg, runs, workdir):
  pending = []
  for i, run in enumerate(runs):
    run_dir = Path(workdir).absolute() / "runs" / run.name
    config = run_config(cfg, run)
    request = dict(run=dataclasses.asdict(run) | {"model": None},
                   config=json.loads(config.to_json_best_effort()))
    if (run_dir / "result.json").exists():
      if json.loads((run_dir / "request.json").read_text())["config"] != request["config"]:
        raise ValueError(f"{run_dir} was trained with another config than this comparison "
                         "asks for (its request.json): give the comparison a new --workdir, "
                         "or delete that run to train it again")
      log.info("[%d/%d] %s: finished, skipped", i + 1, len(runs), run.name)
      continue
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "request.json").write_text(json.dumps(request, indent=1))
    pending.append((lm_flops(run.model, config.task.seq_len)["total"], run_dir))
  # the costliest first, so that no core idles at the end waiting on one long run
  pending = [run_dir for _, run_dir in sorted(pending, key=lambda p: -p[0])]
  if cfg.parallel <= 1:
    for run_dir in pending:
      log.info("%s", run_dir.name)
      run_one(run_dir)
  else:
    _run_in_parallel(pending, cfg.parallel)
  return [json.loads((Path(workdir) / "runs" / r.name / "result.json").read_text())
          for r in runs]


def _run_in_parallel(run_dirs, parallel):
  """Each run in its own process, with its own share of the devices (GPUs) or of the
  cores (CPU: XLA runs small models' ops on one core nearly as fast as on two)."""
  import jax
  on_gpu = jax.default_backend() == "gpu"
  units = [d.id for d in jax.local_devices()] if on_gpu else sorted(os.sched_getaffinity(0))
  share = max(1, len(units) // parallel)
  queue, active = list(run_dirs), []
  while queue or active:
    while queue and len(active) < parallel:
      slot = next(i for i in range(parallel) if i not in [s for s, _, _ in active])
      mine = units[slot * share:(slot + 1) * share] or units
      env, pin = dict(os.environ), None
      if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
      else:
        pin = lambda cores=tuple(mine): os.sched_setaffinity(0, cores)
      run_dir = queue.pop(0)
      log.info("%s (in parallel)", run_dir.name)
      cmd = [sys.executable, "-c", f"from ssm.compare import run_one; run_one({str(run_dir)!r})"]
      active.append((slot, run_dir, subprocess.Popen(cmd, env=env, preexec_fn=pin)))
    time.sleep(0.5)
    for entry in list(active):
      slot, run_dir, proc = entry
      if proc.poll() is not None:
        active.remove(entry)
        if proc.returncode:
          raise RuntimeError(f"run {run_dir.name} failed (exit {proc.returncode}); see its "
                             f"output above; rerun the comparison to resume it")


def run_one(run_dir):
  """Trains the run described by run_dir/request.json and writes run_dir/result.json."""
  run_dir = Path(run_dir)
  request = json.loads((run_dir / "request.json").read_text())
  c = mlc.ConfigDict(request["config"])
  run = request["run"]
  model = config_from_dict(c.model)
  final = train(c, run_dir)
  metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  seq_len, steps = c.task.seq_len, metrics[-1]["step"]  # fewer than train.steps if stopped early
  tokens = steps * c.train.batch_size * seq_len
  result = dict(
      family=run["family"], size=run["size"], seed=run["seed"], lr=run["lr"],
      d_model=model.d_model, n_layer=model.n_layer, params=lm_params(model),
      train_flops_per_token=3 * lm_flops(model, seq_len)["total"], steps=steps, tokens=tokens,
      seq_len=seq_len, eval_loss=final.get("eval/loss", float("nan")),
      eval_accuracy=final.get("eval/accuracy", float("nan")),
      tokens_per_sec=statistics.median(m["tokens_per_sec"] for m in metrics[1:] or metrics),
      # every eval metric, e.g. accuracy at the task's other lengths (eval/accuracy@1024)
      evals={k[len("eval/"):]: v for k, v in final.items() if k.startswith("eval/")})
  result["train_flops"] = result["train_flops_per_token"] * tokens
  (run_dir / "result.json").write_text(json.dumps(result, indent=1))


def best_rows(rows, metric="eval_loss", mode="min"):
  """Per (family, size, length): the learning rate with the best mean over seeds (among
  those run at the most seeds), with the seeds' spread (`_std`, `_min`, `_max` of loss
  and accuracy) beside the means."""
  groups = {}
  for r in rows:
    groups.setdefault((r["family"], r["size"], r["seq_len"], r["lr"]), []).append(r)
  best = {}
  for (family, size, seq_len, lr), rs in groups.items():
    row = dict(rs[0], seeds=len(rs))
    for k in ("eval_loss", "eval_accuracy", "tokens_per_sec", "steps", "tokens", "train_flops"):
      row[k] = statistics.mean(r[k] for r in rs)
    for k in ("eval_loss", "eval_accuracy"):
      values = [r[k] for r in rs]
      row.update({f"{k}_std": statistics.pstdev(values), f"{k}_min": min(values),
                  f"{k}_max": max(values)})
    row["evals"] = {k: statistics.mean(r.get("evals", {}).get(k, float("nan")) for r in rs)
                    for k in rs[0].get("evals", {})}
    key = (family, size, seq_len)
    sign = 1 if mode == "min" else -1
    # a rate run at every seed beats one run at fewer (lr_sweep="first_seed")
    rank = lambda r: (-r["seeds"], sign * r[metric])
    if key not in best or rank(row) < rank(best[key]):
      best[key] = row
  return sorted(best.values(), key=lambda r: (r["size"], r["seq_len"], r["family"]))


COLUMNS = ["family", "d_model", "n_layer", "seq_len", "params", "train_flops_per_token", "lr",
           "seeds", "steps", "tokens", "eval_loss", "eval_accuracy", "eval_accuracy_std",
           "eval_accuracy_min", "tokens_per_sec"]


def write_tables(rows, workdir, paper=""):
  """results.csv and results.md; `paper` (the config's: what the paper reports for
  this comparison) is written under the table, so that the two are read together.
  Eval metrics beyond loss and accuracy (accuracy at other lengths, bits per byte)
  get columns of their own."""
  workdir = Path(workdir)
  extra = sorted({k for r in rows for k in r["evals"] if k not in ("loss", "accuracy")
                  and not k.startswith("loss@")}, key=_eval_order)
  rows = [dict(r, **{k: r["evals"].get(k, float("nan")) for k in extra}) for r in rows]
  columns = COLUMNS + extra
  with (workdir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  fmt = {"params": "{:,}", "train_flops_per_token": "{:.3g}", "tokens": "{:,.0f}", "lr": "{:g}",
         "steps": "{:.0f}", "eval_loss": "{:.4f}", "eval_accuracy": "{:.4f}",
         "eval_accuracy_std": "{:.4f}", "eval_accuracy_min": "{:.4f}", "tokens_per_sec": "{:,.0f}"}
  fmt.update({k: "{:.4f}" for k in extra})
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    lines.append("| " + " | ".join(fmt.get(k, "{}").format(r[k]) for k in columns) + " |")
  table = "\n".join(lines) + "\n"
  if paper:
    table += f"\nThe paper: {paper.strip()}\n"
  (workdir / "results.md").write_text(table)
  return table


def _eval_order(key):
  """accuracy@128 before accuracy@1024; other metrics after, by name."""
  name, _, length = key.partition("@")
  return (name, int(length) if length.isdigit() else -1)


def plot(rows, workdir):
  """The comparison's figures, in the workdir; returns their paths.

  accuracy.png: eval accuracy against model width per family, one panel per task
    length, the seeds' range as error bars (Zoology's Figure 2).
  loss.png: eval loss (bits per byte for byte-level text) against training FLOPs and
    against parameters (longest length).
  lengths.png, where the task is evaluated at other lengths: accuracy against the
    evaluation length per family, at the largest size (Mamba's Table 2)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = sorted({r["family"] for r in rows})
  lengths = sorted({r["seq_len"] for r in rows})
  paths = []

  fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False)
  for ax, seq_len in zip(axes[0], lengths):
    for family in families:
      rs = sorted((r for r in rows if r["family"] == family and r["seq_len"] == seq_len),
                  key=lambda r: r["d_model"])
      acc = [r["eval_accuracy"] for r in rs]
      err = [[a - r["eval_accuracy_min"] for a, r in zip(acc, rs)],
             [r["eval_accuracy_max"] - a for a, r in zip(acc, rs)]]
      ax.errorbar([r["d_model"] for r in rs], acc, yerr=err, fmt="o-", capsize=3, label=family)
    ax.set_xscale("log", base=2)
    widths = sorted({r["d_model"] for r in rows if r["seq_len"] == seq_len})
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    ax.set_xlabel("model width (d_model)")
    ax.set_title(f"sequence length {seq_len}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("eval accuracy")
  axes[0][0].legend()
  fig.tight_layout()
  paths.append(_save(fig, Path(workdir) / "accuracy.png"))

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  bpb = all("bits_per_byte" in r["evals"] for r in rows)  # byte-level LM: MambaByte's axis
  y = (lambda r: r["evals"]["bits_per_byte"]) if bpb else (lambda r: r["eval_loss"])
  for family in families:
    rs = sorted((r for r in rows if r["family"] == family and r["seq_len"] == lengths[-1]),
                key=lambda r: r["params"])
    axes[0].plot([r["train_flops"] for r in rs], [y(r) for r in rs], "o-", label=family)
    axes[1].plot([r["params"] for r in rs], [y(r) for r in rs], "o-", label=family)
  for ax, label, key in zip(axes, ("training FLOPs", "parameters"), ("train_flops", "params")):
    values = [r[key] for r in rows]
    if max(values) > 10 * min(values):  # a log axis only where sizes span a decade
      ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("eval bits per byte" if bpb else "eval loss")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  paths.append(_save(fig, Path(workdir) / "loss.png"))

  at_length = lambda r: {int(k.split("@")[1]): v for k, v in r["evals"].items()
                         if k.startswith("accuracy@")} | {r["seq_len"]: r["eval_accuracy"]}
  if any(len(at_length(r)) > 1 for r in rows):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    size = max(r["size"] for r in rows)
    for family in families:
      for r in (r for r in rows if r["family"] == family and r["size"] == size):
        points = sorted(at_length(r).items())
        ax.plot(*zip(*points), "o-", label=f"{family} (trained at {r['seq_len']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation sequence length")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, Path(workdir) / "lengths.png"))
  return paths


def _save(fig, path):
  import matplotlib.pyplot as plt
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def compare(cfg, workdir):
  workdir = Path(workdir or Path("runs") / cfg.name)
  workdir.mkdir(parents=True, exist_ok=True)
  rows = best_rows(execute(cfg, workdir), cfg.select.metric, cfg.select.mode)
  table = write_tables(rows, workdir, cfg.get("paper", ""))
  figures = plot(rows, workdir)
  return workdir, table, figures


_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/compare/<x>.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "default: runs/<comparison name>")


def _main(argv):
  del argv
  setup_logging()
  workdir, table, figures = compare(_CONFIG.value, _WORKDIR.value)
  print(f"\n{table}\nresults: {workdir / 'results.csv'}, {workdir / 'results.md'}\n"
        f"plots: {', '.join(map(str, figures))}", flush=True)


def main():
  flags.mark_flags_as_required(["config"])
  app.run(_main)


if __name__ == "__main__":
  sys.exit(main())
