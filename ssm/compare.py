"""`ssm-compare --config configs/compare/<x>.py [--workdir DIR]`: a matched comparison.

A sweep over architectures x sizes x seeds x learning rates on one task, every run
through the shared loop. For each reference size, the other architectures are
matched to it on parameters or on training FLOPs per token (ssm.flops.match).
Image families (ViT, ViT with registers, Vision Mamba, with registers) are matched
the same way, on parameters or training FLOPs per image (ssm.flops.match_vision).
Finished runs are skipped and interrupted ones resume, so rerunning the command
finishes the sweep. The best learning rate per (architecture, size) is reported,
as Zoology does. At the end: results.csv, results.md and plots in the workdir.
"""

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
from absl import flags
from ml_collections import config_flags

from ssm.fields import check_keys
from ssm.flops import (VISION_FAMILIES, family_config, lm_flops, lm_params, match, match_vision,
                       vision_config, vision_flops, vision_params)
from ssm.models import LMConfig, config_from_dict
from ssm.report import best_rows, plot, write_tables
from ssm.train import train
from ssm.config import command, load_config_file, model_config
from ssm.train.metrics import setup_logging

log = logging.getLogger("ssm.compare")


@dataclasses.dataclass
class Run:
  family: str
  size: int  # the reference width this run is matched to
  seed: int
  lr: float
  model: object  # LMConfig, or ViTConfig / VimConfig for image families
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
  if _vision(cfg):
    return _plan_vision(cfg, base)
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


def _vision(cfg):
  """Whether the comparison is of image families; they do not mix with LMs."""
  families = set(cfg.families) | {cfg.reference.family}
  vision = families & set(VISION_FAMILIES)
  if vision and vision != families:
    raise ValueError(f"families {sorted(families)} mix image families "
                     f"({', '.join(VISION_FAMILIES)}) with language-model ones: compare each "
                     "kind apart")
  return bool(vision)


def _plan_vision(cfg, base):
  """As `plan`, for image families on the base config's images (its model gives the
  image size, patch size, channels and classes)."""
  if cfg.seq_lens:
    raise ValueError("seq_lens applies to language models; image families have none: "
                     "set --config.seq_lens='()'")
  like = config_from_dict(base.model)
  runs = []
  for size in cfg.sizes:
    ref = vision_config(cfg.reference.family, size, cfg.reference.n_layer, like)
    for family in cfg.families:
      model = ref if family == cfg.reference.family else _matched_vision(cfg, family, ref, like)
      for seed in cfg.seeds:
        for lr in learning_rates(cfg, family):
          runs.append(Run(family, size, seed, lr, model))
  return runs


def _matched_vision(cfg, family, ref, like):
  """`family` matched to `ref` on cfg.match ("width": the reference's width and depth);
  a Vision Mamba near twice the reference ViT's depth, as Vim pairs with DeiT."""
  if cfg.match == "width":
    return vision_config(family, ref.d_model, ref.n_layer, like)
  target = vision_params(ref) if cfg.match == "params" else 3 * vision_flops(ref)["total"]
  vim, ref_vim = family.startswith("vim"), cfg.reference.family.startswith("vim")
  hint = cfg.reference.n_layer * (2.0 if vim and not ref_vim else
                                  0.5 if ref_vim and not vim else 1.0)
  model, _, mismatch = match_vision(family, target, criterion=cfg.match, like=like,
                                    depth_hint=hint,
                                    depth=cfg.reference.n_layer if cfg.same_depth else None)
  return _within_tolerance(cfg, family, ref, model, mismatch)


def _within_tolerance(cfg, family, ref, model, mismatch):
  if abs(mismatch) > cfg.tolerance:
    raise ValueError(f"{family} cannot be matched to {cfg.reference.family} d_model "
                     f"{ref.d_model} within {cfg.tolerance:.0%} ({mismatch:+.1%}); try another "
                     "size, or free the depth with --config.same_depth=False")
  return model


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
  return _within_tolerance(cfg, family, ref, model, mismatch)


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
  check_keys(overrides, config, f"{where} (keys of the run config)")
  for key, value in overrides.items():
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
  _log_plan(cfg, runs, sweep, workdir)
  if sweep == "every_seed":
    return _execute(cfg, runs, workdir)
  if sweep != "first_seed":
    raise ValueError(f"lr_sweep {sweep!r}: expected 'every_seed' or 'first_seed'")
  first = [r for r in runs if r.seed == cfg.seeds[0]]
  results = _execute(cfg, first, workdir)
  best = {(r["family"], r["size"], r["seq_len"]): r["lr"]
          for r in best_rows(results, cfg.select.metric, cfg.select.mode)}
  task_len = base_config(cfg).task.get("seq_len", 0)  # images: none
  rest = [r for r in runs if r.seed != cfg.seeds[0]
          and r.lr == best[(r.family, r.size, r.seq_len or task_len)]]
  return results + _execute(cfg, rest, workdir)


def _log_plan(cfg, runs, sweep, workdir):
  """One line before anything runs: what is compared, at which sizes, how many runs."""
  shapes = sorted({(r.size, r.family, r.model.d_model, r.model.n_layer) for r in runs})
  sizes = "; ".join(f"ref {size}: " + ", ".join(f"{f} d{d} l{n}" for s, f, d, n in shapes
                                                if s == size)
                    for size in sorted({s for s, *_ in shapes}))
  n = len(runs)
  if sweep == "first_seed":
    n = sum(r.seed == cfg.seeds[0] for r in runs) + len(
        {(r.family, r.size, r.seq_len) for r in runs}) * (len(cfg.seeds) - 1)
  log.info("%s: %s matched on %s (%s); seeds %s; %d runs, %d at a time -> %s", cfg.name,
           ", ".join(cfg.families), cfg.match, sizes, tuple(cfg.seeds), n, cfg.parallel,
           Path(workdir).absolute())


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
    label = f"[{i + 1}/{len(runs)}] {run.name}"
    pending.append((_train_flops(run.model, config.task.get("seq_len")), label, run_dir))
  # the costliest first, so that no core idles at the end waiting on one long run
  pending = [(label, run_dir) for _, label, run_dir in sorted(pending, key=lambda p: -p[0])]
  if cfg.parallel <= 1:
    for label, run_dir in pending:
      log.info("%s", label)
      run_one(run_dir)
  else:
    _run_in_parallel(pending, cfg.parallel)
  return [json.loads((Path(workdir) / "runs" / r.name / "result.json").read_text())
          for r in runs]


def _run_in_parallel(labelled_run_dirs, parallel):
  """Each run in its own process, with its own share of the devices (GPUs) or of the
  cores (CPU: XLA runs small models' ops on one core nearly as fast as on two)."""
  import jax
  # This process only schedules: it must not take the GPUs' memory, which JAX would
  # preallocate (75% of each) when it looks at the devices. The runs preallocate as usual.
  ours = "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  on_gpu = jax.default_backend() == "gpu"
  units = [d.id for d in jax.local_devices()] if on_gpu else sorted(os.sched_getaffinity(0))
  share = max(1, len(units) // parallel)
  queue, active = list(labelled_run_dirs), []
  while queue or active:
    while queue and len(active) < parallel:
      slot = next(i for i in range(parallel) if i not in [s for s, _, _ in active])
      mine = units[slot * share:(slot + 1) * share] or units
      env, pin = dict(os.environ), None
      if ours:
        env.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
      if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
      else:
        pin = lambda cores=tuple(mine): os.sched_setaffinity(0, cores)
      label, run_dir = queue.pop(0)
      log.info("%s (in parallel)", label)
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


def _train_flops(model, seq_len):
  """Training FLOPs per token (LMs, at seq_len) or per image: 3x the forward."""
  if isinstance(model, LMConfig):
    return 3 * lm_flops(model, seq_len)["total"]
  return 3 * vision_flops(model)["total"]


def run_one(run_dir):
  """Trains the run described by run_dir/request.json and writes run_dir/result.json."""
  run_dir = Path(run_dir)
  request = json.loads((run_dir / "request.json").read_text())
  c = mlc.ConfigDict(request["config"])
  run = request["run"]
  model = config_from_dict(c.model)
  final = train(c, run_dir)
  metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
  if not isinstance(model, LMConfig):
    return _image_result(run_dir, run, c, model, final, metrics)
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


def _image_result(run_dir, run, c, model, final, metrics):
  """result.json of an image run: parameters, training FLOPs per image, images/s."""
  steps = metrics[-1]["step"]
  images = steps * c.train.batch_size
  speeds = [m["images_per_sec"] for m in metrics[1:] or metrics if "images_per_sec" in m]
  result = dict(
      family=run["family"], size=run["size"], seed=run["seed"], lr=run["lr"],
      d_model=model.d_model, n_layer=model.n_layer, registers=model.num_registers,
      params=vision_params(model), train_flops_per_image=_train_flops(model, None), steps=steps,
      images=images, seq_len=0, eval_loss=final.get("eval/loss", float("nan")),
      eval_accuracy=final.get("eval/accuracy", float("nan")),
      images_per_sec=statistics.median(speeds) if speeds else float("nan"),
      evals={k[len("eval/"):]: v for k, v in final.items() if k.startswith("eval/")})
  result["train_flops"] = result["train_flops_per_image"] * images
  (run_dir / "result.json").write_text(json.dumps(result, indent=1))


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
  try:
    workdir, table, figures = compare(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # a comparison that cannot run: its message says what to change
    print(f"ssm-compare: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"\n{table}\nresults: {workdir / 'results.csv'}, {workdir / 'results.md'}\n"
        f"plots: {', '.join(map(str, figures))}", flush=True)


USAGE = """
ssm-compare: a matched comparison of architectures on one task, every run through the
shared loop; rerunning finishes an interrupted one.

  ssm-compare --config FILE[:ARG] [--workdir DIR] [--config.KEY=VALUE ...]

  ssm-compare --config configs/compare/mqar.py                  # Zoology's Figure 2, CPU size
  ssm-compare --config configs/compare/mqar.py:paper            # the paper's own setting
  ssm-compare --config configs/compare/bytes.py --config.seeds='(0,1,2)'
  ssm-compare --config configs/compare/images.py                # ViT / +registers / Vim

--config  a comparison file (configs/compare/*.py: mqar, induction_heads, selective_copy,
          bytes, images); ARG "paper" where it has the paper's setting (images: ImageNet;
          also "cifar10")
--workdir where it all goes (default runs/<comparison name>): runs/<run>/ (each a
          ssm-train workdir), results.csv, results.md, accuracy.png, loss.png

The main overrides: families, sizes, seeds, lrs (one tuple, or lrs.<family>), lr_sweep
(first_seed | every_seed), match (width | params | flops), same_depth, seq_lens,
parallel (runs at a time), overrides.<section>.<key> (passed to every run, e.g.
--config.overrides.train.steps=500).
"""


def main():
  flags.mark_flags_as_required(["config"])
  command("ssm-compare", USAGE, _main)


if __name__ == "__main__":
  sys.exit(main())
