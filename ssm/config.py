"""The defaults of every run config. A config file (configs/<task>.py) starts from
`base()` and sets the task and the model; every key has a default, and the dict is
locked so that a misspelt override is an error that names the valid keys."""

import dataclasses
import functools
import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path

import ml_collections as mlc

from ssm.data import tasks
from ssm.data.base import LOOP_FIELDS
from ssm.data.pipeline import SOURCES, make_pipeline, task_class
from ssm.fields import check_keys, require
from ssm.layers import MambaConfig
from ssm.layers.attention import AttentionConfig
from ssm.models import KINDS, LMConfig, config_from_dict


def base():
  c = mlc.ConfigDict()
  c.seed = 0
  c.task = mlc.ConfigDict()  # set by the config file: see task_config
  c.model = mlc.ConfigDict()  # set by the config file: see ssm.models.config_from_dict
  c.train = mlc.ConfigDict(dict(
      steps=1000, batch_size=64, grad_accum=1,
      lr=1e-3, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, decay_embeddings=False, clip_norm=1.0,
      log_every=50, eval_every=250, eval_steps=4,
      # Stop before `steps` (checked at each eval): when a metric crosses a threshold,
      # "eval/accuracy>=0.99" (Zoology's rule), and/or once checkpoint.best_metric has
      # not improved for `patience` evals (a plateau; 0: off).
      stop_when="", patience=0,
      peak_flops_per_device=0.0,  # 0: from the device table in ssm.train.metrics
      # The learning-rate schedule's length; 0: train.steps. A resumed run keeps the
      # length it started with (a longer train.steps goes on at the final rate).
      schedule_steps=0,
  ))
  c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.checkpoint = mlc.ConfigDict(dict(every=500, keep=2, best_metric="eval/loss",
                                     best_mode="min", async_save=True,
                                     # True: resume a workdir whose checkpoints were
                                     # trained with another model, task or optimizer,
                                     # where every array keeps its name and shape
                                     # (train.lr, model.dtype, the scan; not sizes)
                                     resume_changed=False))
  c.wandb = mlc.ConfigDict(dict(mode="auto", project="ssm", entity="", group="", job_type="",
                                name="", tags=()))
  c.distributed = mlc.ConfigDict(dict(auto=False, coordinator_address="", num_processes=1,
                                      process_id=0, cpu_collectives="gloo"))
  return c


def check(c):
  """ValueErrors, naming the key and its value, for train, checkpoint and W&B values out
  of range (the model and task dataclasses check their own fields), and for what the
  run would otherwise find out only after compiling (`_check_run`). The Trainer calls
  it first."""
  t, k = c.train, c.checkpoint
  at_least = lambda x, low: (x, x >= low, f"must be >= {low}")
  require("train", steps=at_least(t.steps, 0), lr=at_least(t.lr, 0),
          warmup_steps=at_least(t.warmup_steps, 0), log_every=at_least(t.log_every, 1),
          eval_every=at_least(t.eval_every, 0), eval_steps=at_least(t.eval_steps, 1),
          weight_decay=at_least(t.weight_decay, 0), clip_norm=at_least(t.clip_norm, 0),
          schedule_steps=at_least(t.schedule_steps, 0),
          min_lr_ratio=(t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1, "must be in [0, 1]"),
          schedule=(t.schedule, t.schedule in ("cosine", "constant"),
                    "expected 'cosine' or 'constant'"))
  require("checkpoint", every=at_least(k.every, 1), keep=at_least(k.keep, 1),
          best_mode=(k.best_mode, k.best_mode in ("min", "max"), "expected 'min' or 'max'"))
  from ssm.train.metrics import WANDB_MODES, wandb_mode  # (ssm.train imports this module)
  require("wandb", mode=(c.wandb.mode, c.wandb.mode in WANDB_MODES,
                         f"expected one of {', '.join(WANDB_MODES)}"))
  wandb_mode(c.wandb.mode)  # "auto" defers to WANDB_MODE: a bad one is an error now
  _check_run(c)


def _check_run(c):
  """What the model, task and evals of a run would otherwise find out only after
  compiling or at the first eval: lengths beyond learned positions, stop and best
  metrics that the evals do not give."""
  from ssm.train.stopping import EarlyStop
  t, k = c.train, c.checkpoint
  pipeline = make_pipeline(c.task, t.batch_size, c.seed)
  model = config_from_dict(c.model)
  variants = pipeline.eval_variants()
  if isinstance(model, LMConfig) and model.positions == "learned":
    for what, p in [("trains", pipeline), *(("evaluates", p) for _, p in variants)]:
      if p.seq_len > model.max_position_embeddings:
        raise ValueError(f"the run {what} at length {p.seq_len}, beyond the model's "
                         f"{model.max_position_embeddings} learned positions: raise "
                         "model.max_position_embeddings or shorten task.seq_len / "
                         "task.eval_seq_lens")
  # stop_when parsed and patience checked (eval_every 1 here: the loop itself warns
  # when evals are off).
  early = EarlyStop(types.SimpleNamespace(stop_when=t.stop_when, patience=t.patience,
                                          eval_every=1), k)
  if not t.eval_every:
    return
  # The metrics Trainer.evaluate gives; bits per byte where the task's loss is one (a
  # property on some pipelines, measured on the eval split: looked up, not read).
  metrics = ["loss", "accuracy"] + (["bits_per_byte"] if inspect.getattr_static(
      pipeline, "bits_per_byte") else [])
  evals = [f"eval/{m}{suffix}" for suffix in ["", *(s for s, _ in variants)] for m in metrics]
  if early.threshold and early.threshold[0] not in evals:
    raise ValueError(f"train.stop_when={t.stop_when!r} names {early.threshold[0]!r}; the "
                     f"evals give {', '.join(evals)}")
  if k.best_metric and k.best_metric not in evals:
    raise ValueError(f"checkpoint.best_metric={k.best_metric!r}: the evals give "
                     f"{', '.join(evals)} (or '' for none)")


def lock(c):
  """Locks the config so that overrides of unknown keys fail."""
  c.lock()
  return c


def model_config(config):
  """A model dataclass (LMConfig, ViTConfig, VimConfig) as a ConfigDict holding every
  field, so that every model key can be overridden from the command line."""
  kind = next(k for k, cls in KINDS.items() if isinstance(config, cls))
  return mlc.ConfigDict(dict(kind=kind, **dataclasses.asdict(config)))


TASK_NAMES = (*tasks.TASKS, *SOURCES)


def task_config(name, **fields):
  """`config.task` as a ConfigDict holding `name` and every field of the task's
  dataclass (at its default unless given), so that every task key can be overridden
  from the command line."""
  cls = task_class(name)
  own = [f for f in dataclasses.fields(cls) if f.name not in LOOP_FIELDS]
  check_keys(fields, [f.name for f in own], f"task {name!r}")
  hints = typing.get_type_hints(cls)
  c = mlc.ConfigDict(dict(name=name))
  for f in own:
    if f.name in fields:
      value = fields[f.name]
    elif f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      raise ValueError(f"task {name!r}: {f.name} has no default; give it")
    # ml_collections locks a field's type from its first value: a float field must not
    # start as an int, and a None locks no type, so it is a placeholder of the field's.
    if hints[f.name] is float and type(value) is int:
      value = float(value)
    c[f.name] = mlc.config_dict.placeholder(_not_none(hints[f.name])) if value is None else value
  return c


def _not_none(hint):
  """bool for `bool | None`; object where the annotation allows several types."""
  types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
  return types[0] if len(types) == 1 and isinstance(types[0], type) else object


def load_config_file(spec):
  """'path/to/config.py[:arg]' -> the ConfigDict its get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def command(prog, usage, run):
  """absl's app.run for a console script whose --config is a config file: `--help`
  (and absl's --helpshort, --helpfull) prints `usage`; a missing --config, a config
  file that does not exist or that raises an error (a wrong :ARG, a bad value), a flag
  value of the wrong type or a missing required flag is one line on stderr and exit 2."""
  import sys

  from absl import app, flags

  argv = sys.argv[1:]
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv):
    print(usage.strip())
    sys.exit(0)
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  def fail(message):
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(2)

  if spec is None:
    fail("--config=FILE[:ARG] is required (e.g. --config=configs/mqar.py:mamba); "
         f"{prog} --help says more")
  path = spec.partition(":")[0]
  if not Path(path).is_file():
    fail(f"no config file {path!r}; the config files are under configs/ (e.g. "
         "configs/mqar.py:mamba, configs/compare/mqar.py)")
  try:
    config = load_config_file(spec)
    for arg in argv:  # overrides name keys of the config: misspelt ones named here
      if arg.startswith("--config."):
        _check_key(config, arg[len("--config."):].split("=", 1)[0])
  except (ValueError, KeyError, TypeError) as e:
    fail(e)

  def parse_flags(args):  # absl's, with its errors one line
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      fail(_flag_error(e, config, prog))
  app.run(run, flags_parser=parse_flags)


def _flag_error(error, config, prog):
  """absl's flag error as what to do: a value of the wrong type names the type the key
  takes and its value in the config file; a missing flag says what it is for."""
  message = str(error)
  bad_value = re.match(r"flag --config\.([\w.]+)=(.*?): ", message)
  missing = re.search(r"Flag --(\w+) must have a value other than None", message)
  if bad_value:
    key, value = bad_value.groups()
    *path, last = key.split(".")
    node = functools.reduce(lambda node, part: node[part], path, config)
    kind, default = node.get_ref(last).get_type().__name__, node[last]
    return (f"--config.{key}={value}: expected a{'n' * (kind[0] in 'aeiou')} {kind}"
            + (f" like the config file's {default!r}" if default is not None else ""))
  if missing:
    from absl import flags
    name = missing.group(1)
    return f"--{name} is required ({flags.FLAGS[name].help}); {prog} --help says more"
  return f"{message}; {prog} --help says more"


def _check_key(config, dotted):
  node, done = config, []
  for part in dotted.split("."):
    if not isinstance(node, mlc.ConfigDict):
      raise ValueError(f"--config.{dotted}: {'.'.join(done)} is a value, not a section")
    check_keys({part}, list(node), f"--config.{dotted}: config.{'.'.join(done) or '(top)'}")
    node, done = node[part], done + [part]


# The families of the synthetic-task configs, at Zoology's MQAR size (two layers of
# width 64): Mamba, Transformer++, attention without MLPs (Zoology's attention
# baseline), a Mamba + attention hybrid and Mamba-2 (the official mixer: d_state
# 128, headdim 64, so 2 heads at width 64).
SMALL_LMS = {
    "mamba": dict(pattern="M"),
    "mamba2": dict(pattern="S"),
    "transformer": dict(pattern="A", mlp="swiglu", d_intermediate=128),
    "attention": dict(pattern="A", attention=AttentionConfig(n_heads=1)),
    "hybrid": dict(pattern="MA"),
}


def small_lm(arch, vocab_size, where):
  """`config.model` of the small `arch` LM; `where` names the config file in errors."""
  if arch not in SMALL_LMS:
    raise ValueError(f"{where}:{arch}: expected one of {list(SMALL_LMS)}")
  fields = dict(attention=AttentionConfig(n_heads=4)) | SMALL_LMS[arch]
  return model_config(LMConfig(d_model=64, n_layer=2, vocab_size=vocab_size,
                               mamba=MambaConfig(d_state=16), **fields))
