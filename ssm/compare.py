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
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ml_collections as mlc
from absl import flags
from ml_collections import config_flags

from ssm.fields import check_keys
from ssm.flops import (ASPECT, ASPECT_BAND, MIN_HEAD, VISION_ASPECT, VISION_FAMILIES,
                       family_config, head_size, lm_flops, lm_params, match, match_vision,
                       param_count,
                       vision_config, vision_flops, vision_params)
from ssm.models import LMConfig, config_from_dict
from ssm import scaling
from ssm.report import best_rows, plot, write_tables
from ssm.train import train
from ssm.train.loop import NonFiniteLoss, Stopped
from ssm.config import command, load_config_file, model_config
from ssm.data.pipeline import task_vocab_size
from ssm.train.metrics import setup_logging

log = logging.getLogger("ssm.compare")
STOPPED = 75  # as ssm-train's: stopped by a signal with checkpoints saved; rerun to resume


class RunFailed(RuntimeError):
  """A run's process ended otherwise than by its config, its loss or a signal (its
  traceback is above it): rerunning the comparison may help, and resumes it."""


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
  # every model setting of the base config (and overrides.model) that the family
  # does not set itself: dtype, the Mamba / attention options, ...
  if base.model.vocab_size == 0:  # the task's (its tokenizer's), as ssm-train takes it
    base.model.vocab_size = task_vocab_size(base.task)
  like = config_from_dict(base.model)
  runs = []
  for size in cfg.sizes:
    ref = family_config(cfg.reference.family, size, cfg.reference.n_layer, like.vocab_size,
                        like)
    for family in cfg.families:
      for seq_len in cfg.seq_lens or (0,):
        model = ref if family == cfg.reference.family else _matched(
            cfg, family, ref, seq_len or base.task.seq_len, like)
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
  shape = _shape(cfg, family, ref, VISION_ASPECT)
  model, _, mismatch = match_vision(family, target, criterion=cfg.match, like=like, **shape,
                                    depth=cfg.reference.n_layer if cfg.same_depth else None,
                                    tolerance=cfg.tolerance)
  return _within_tolerance(cfg, family, ref, model, mismatch, shape)


def _shape(cfg, family, ref, aspects):
  """The shape `family` is matched near: the reference's width / depth, scaled by the
  families' usual ratio (a Transformer++ half as deep as Mamba at a width, a Vision
  Mamba twice a ViT's depth), and heads at least MIN_HEAD wide (or the reference's)."""
  return dict(aspect=ref.d_model / ref.n_layer * aspects[family] / aspects[cfg.reference.family],
              min_head=min(MIN_HEAD, head_size(ref) or MIN_HEAD))


def _within_tolerance(cfg, family, ref, model, mismatch, shape):
  if abs(mismatch) <= cfg.tolerance:
    return model
  found = (f"{cfg.match} of the closest, d_model {model.d_model} x {model.n_layer} layers, "
           f"differ by {mismatch:+.1%}")
  if cfg.same_depth:
    raise ValueError(f"{family} cannot be matched to {cfg.reference.family} d_model "
                     f"{ref.d_model} within {cfg.tolerance:.0%} at its depth, "
                     f"{cfg.reference.n_layer} layers ({found}); try another size, a larger "
                     "--config.tolerance, or free the depth with --config.same_depth=False")
  lo, hi = shape["aspect"] / ASPECT_BAND, shape["aspect"] * ASPECT_BAND
  raise ValueError(f"{family} cannot be matched to {cfg.reference.family} d_model {ref.d_model} "
                   f"within {cfg.tolerance:.0%} by any shape papers train (width / depth "
                   f"{lo:.3g}-{hi:.3g}, heads at least {shape['min_head']} wide; {found}); try "
                   "another size or a larger --config.tolerance")


def learning_rates(cfg, family):
  """cfg.lrs: one sweep for every family, or a sweep per family (the papers tune
  attention and Mamba apart: {"mamba": (1e-3,), "transformer++": (2e-4,)})."""
  if isinstance(cfg.lrs, (tuple, list)):
    return cfg.lrs
  if family not in cfg.lrs:
    raise ValueError(f"lrs has no learning rates for {family!r}; it has {sorted(cfg.lrs)}")
  return cfg.lrs[family]


def _matched(cfg, family, ref, seq_len, like):
  """`family` matched to the reference model `ref` on cfg.match at `seq_len`, with
  `like`'s settings; "width" takes the reference's width and depth (Zoology's Figure 2
  axis: model dimension)."""
  if cfg.match == "width":
    return family_config(family, ref.d_model, ref.n_layer, like.vocab_size, like)
  target = lm_params(ref) if cfg.match == "params" else 3 * lm_flops(ref, seq_len)["total"]
  shape = _shape(cfg, family, ref, ASPECT)
  model, _, mismatch = match(family, target, criterion=cfg.match, seq_len=seq_len,
                             vocab_size=like.vocab_size, like=like, **shape,
                             depth=cfg.reference.n_layer if cfg.same_depth else None,
                             tolerance=cfg.tolerance)
  return _within_tolerance(cfg, family, ref, model, mismatch, shape)


def comparison(c):
  """What every comparison file's get_config returns: `c` with `overrides` holding
  every key of the run config (c.base's; unset ones None), so that any run key can be
  overridden from the command line and a misspelt one is named, and with `lrs`
  taking either form, one sweep for every family or a sweep per family."""
  c.overrides = _every_key(load_config_file(c.base), c.overrides, "overrides")
  c.lrs = mlc.FieldReference(c.lrs, field_type=object)
  return c


def _every_key(run, given, where):
  """A section of the run config `run` as placeholders of its types, `given`'s values set."""
  check_keys(given, run, f"{where} (keys of the run config)")
  out = mlc.ConfigDict()
  for key in run:
    if isinstance(run[key], mlc.ConfigDict):
      out[key] = _every_key(run[key], given.get(key, mlc.ConfigDict()), f"{where}.{key}")
    elif key in given:
      out[key] = given[key]
    else:  # a None in the run config takes any value there too
      kind = object if run[key] is None else run.get_ref(key).get_type()
      out[key] = mlc.config_dict.placeholder(kind)
  return out


def base_config(cfg):
  """The base run config with the comparison's overrides (those set), unlocked."""
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
  if cfg.get("tokens_per_param"):
    _train_on_tokens(c, run.model, cfg.tokens_per_param)
  c.wandb.group, c.wandb.job_type, c.wandb.name = cfg.name, run.family, run.name
  c.wandb.mode = cfg.wandb_mode
  c.lock()
  return c


def _train_on_tokens(c, model, tokens_per_param):
  """Chinchilla's recipe: train.steps for tokens_per_param training tokens per
  non-embedding parameter, evaluated and saved at the end, warmup at most a tenth."""
  tokens = tokens_per_param * param_count(model, embeddings=False)
  steps = max(1, math.ceil(tokens / (c.train.batch_size * c.task.seq_len)))
  c.train.update(steps=steps, eval_every=steps, warmup_steps=min(c.train.warmup_steps,
                                                                steps // 10))
  c.checkpoint.every = steps


def _update(config, overrides, where):
  check_keys(overrides, config, f"{where} (keys of the run config)")
  for key, value in overrides.items():
    if isinstance(value, dict):
      _update(config[key], value, f"{where}.{key}")
    elif value is not None:
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
      try:
        run_one(run_dir)
      except (ValueError, NonFiniteLoss, Stopped) as e:  # one line in _main, naming the run
        e.args = (f"run {run_dir.name}: {e}",)
        raise
  else:
    _run_in_parallel(pending, cfg.parallel)
  return [json.loads((Path(workdir) / "runs" / r.name / "result.json").read_text())
          for r in runs]


def _run_in_parallel(labelled_run_dirs, parallel):
  """Each run in its own process, with its own share of the devices (GPUs) or of the
  cores (CPU: XLA runs small models' ops on one core nearly as fast as on two). The
  processes are started fresh (no fork of this threaded one). A run that fails stops
  the others (each saves a checkpoint first), and so do Ctrl-C and SIGTERM."""
  import jax
  # This process only schedules: it must not take the GPUs' memory, which JAX would
  # preallocate (75% of each) when it looks at the devices. The runs preallocate as usual.
  ours = "XLA_PYTHON_CLIENT_PREALLOCATE" not in os.environ
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  on_gpu = jax.default_backend() == "gpu"
  units = [d.id for d in jax.local_devices()] if on_gpu else sorted(os.sched_getaffinity(0))
  share = max(1, len(units) // parallel)
  queue, active, failure = list(labelled_run_dirs), [], None
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    while (queue and not failure) or active:
      while queue and not failure and len(active) < parallel:
        slot = next(i for i in range(parallel) if i not in [s for s, _, _ in active])
        mine = units[slot * share:(slot + 1) * share] or units
        env, pin = dict(os.environ), ""
        if ours:
          env.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
        if on_gpu:
          env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, mine))
        else:
          pin = f"import os; os.sched_setaffinity(0, {tuple(mine)}); "
        label, run_dir = queue.pop(0)
        log.info("%s (in parallel)", label)
        (run_dir / "error.txt").unlink(missing_ok=True)
        code = pin + "import sys; from ssm.compare import run_child; run_child(sys.argv[1])"
        active.append((slot, run_dir, subprocess.Popen([sys.executable, "-c", code, str(run_dir)],
                                                       env=env)))
      time.sleep(0.5)
      for entry in list(active):
        _, run_dir, proc = entry
        if proc.poll() is not None:
          active.remove(entry)
          if proc.returncode and not failure:
            failure = _failure(run_dir, proc.returncode)
            _stop(active)
  except KeyboardInterrupt as e:
    _stop(active)
    for _, _, proc in active:
      proc.wait()
    raise Stopped(f"stopped by {e.args[0] if e.args else 'Ctrl-C'}; the runs in progress saved "
                  "checkpoints: rerun the comparison to resume it") from None
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failure:
    raise failure


def _interrupt(signum, frame):
  raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop(active):
  """SIGTERM to the runs in progress: each saves a checkpoint and stops."""
  for _, _, proc in active:
    proc.send_signal(signal.SIGTERM)


def _failure(run_dir, code):
  """The error to report for a run whose process exited with `code` (see run_child)."""
  error = run_dir / "error.txt"
  if code == STOPPED:
    return Stopped(f"run {run_dir.name} was stopped by a signal, with a checkpoint: rerun the "
                   "comparison to resume it")
  if code in (2, 3) and error.exists():
    message = f"run {run_dir.name}: {error.read_text()}"
    return ValueError(message) if code == 2 else NonFiniteLoss(message)
  return RunFailed(f"run {run_dir.name} failed (exit {code}; its output is above); rerunning "
                   "the comparison resumes it from its last checkpoint")


def run_child(run_dir):
  """run_one in a process of its own: exit 2 (a config that cannot run) or 3 (a
  non-finite loss) with the message in run_dir/error.txt, STOPPED for a run stopped by
  SIGTERM or Ctrl-C with a checkpoint saved; anything else, its traceback."""
  try:
    run_one(run_dir)
  except Stopped:
    sys.exit(STOPPED)
  except (ValueError, NonFiniteLoss) as e:
    (Path(run_dir) / "error.txt").write_text(str(e))
    sys.exit(3 if isinstance(e, NonFiniteLoss) else 2)


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
  if cfg.get("tokens_per_param") and cfg.select.metric == "eval_loss":  # across sizes
    fit = scaling.summary(rows)
    (workdir / "scaling.md").write_text(fit + "\n")
    figures.append(scaling.plot(rows, workdir / "scaling.png",
                                title=f"{cfg.name}: eval loss against training compute"))
    table += "\n\n" + fit
  return workdir, table, figures


def _main(config, workdir):
  setup_logging()
  try:
    workdir, table, figures = compare(config.value, workdir.value)
  except KeyboardInterrupt:
    print("ssm-compare: stopped at once by a second Ctrl-C; rerunning the comparison resumes "
          "each run from its newest checkpoint", file=sys.stderr)
    sys.exit(130)
  except (ValueError, NonFiniteLoss, Stopped, RunFailed) as e:
    # a comparison that cannot run (its message says what to change), a run whose loss
    # diverged, one stopped with a checkpoint, one that crashed
    print(f"ssm-compare: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ValueError) else 3 if isinstance(e, NonFiniteLoss)
             else STOPPED if isinstance(e, Stopped) else 1)
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
parallel (runs at a time), overrides.<section>.<key> (any key of the run config, passed
to every run, e.g. --config.overrides.train.steps=500).

Exit status: 0 done; 2 a comparison or run config that cannot run (the message says
what to change); 3 a run's loss became NaN or inf; 75 stopped by SIGTERM or Ctrl-C,
each run in progress with a checkpoint: rerun to resume; 1 a run crashed (its traceback
is above): rerunning resumes it.
"""


def main():
  # defined here, not on import: comparison files import this module (`comparison`),
  # which under `python -m ssm.compare` is a second copy of it
  config = config_flags.DEFINE_config_file("config", None, "configs/compare/<x>.py",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "default: runs/<comparison name>")
  flags.mark_flags_as_required(["config"])
  command("ssm-compare", USAGE, lambda argv: _main(config, workdir))


if __name__ == "__main__":
  sys.exit(main())
