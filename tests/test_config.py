"""ssm.config: every task field is a key of the locked config, overridable from
the command line (as ssm-train parses it), and every config file's task makes its
pipeline."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from ssm.compare import base_config
from ssm.data import make_pipeline
from ssm.data.pipeline import task_class
from ssm.config import LOOP_FIELDS, SMALL_LMS, TASK_NAMES, load_config_file, task_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def parse(spec, *overrides):
  """The config as ssm-train's flags give it: the file's, locked, then the overrides."""
  argv = ["ssm-train", f"--config={spec}", *overrides]
  values = flags.FlagValues()
  # sys_argv: the override flags are defined from the command line the file came with
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def archs(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return list(getattr(module, "ARCHS", SMALL_LMS))


RUN_SPECS = [f"{p.name}:{a}" for p in sorted(CONFIGS.glob("*.py")) for a in archs(p)]
COMPARE_SPECS = [f"{p.name}:{s}" for p in sorted((CONFIGS / "compare").glob("*.py"))
                 for s in ("cpu", "paper")]


def own_fields(name):
  return [f for f in dataclasses.fields(task_class(name)) if f.name not in LOOP_FIELDS]


@pytest.mark.parametrize("name", sorted(TASK_NAMES))
def test_every_task_field_is_a_key_overridable_from_the_command_line(name):
  spec = str(CONFIGS / f"{name}.py")
  task = load_config_file(spec).task
  fields = own_fields(name)
  assert sorted(task) == sorted(["name", *(f.name for f in fields)])
  # Each field set to its default (required ones to the file's value), on the command
  # line; a None default stays None (it parses only as its annotated type).
  values = {f.name: task[f.name] if f.default is dataclasses.MISSING else f.default
            for f in fields}
  c = parse(spec, *(f"--config.task.{k}={v}" for k, v in values.items() if v is not None))
  assert c.task.to_dict() == dict(values, name=name)
  for k, v in values.items():  # and directly on the locked dict, as compare's overrides do
    c.task[k] = v


def test_tuple_and_none_default_task_fields_parse_from_the_command_line():
  c = parse(f"{CONFIGS / 'mqar.py'}:mamba", "--config.task.eval_seq_lens=(64,128)")
  assert c.task.eval_seq_lens == (64, 128)
  assert make_pipeline(c.task, 4, 0).eval_variants()[0][0] == "@128"
  c = parse(f"{CONFIGS / 'images.py'}:vit", "--config.task.flip=False")
  assert c.task.flip is False and make_pipeline(c.task, 4, 0).flip is False
  assert parse(f"{CONFIGS / 'images.py'}:vit").task.flip is None  # the dataset's default
  with pytest.raises(flags.IllegalFlagValueError):
    parse(f"{CONFIGS / 'images.py'}:vit", "--config.task.flip=maybe")


@pytest.mark.parametrize("spec", RUN_SPECS)
def test_every_config_file_makes_its_pipeline(spec):
  c = load_config_file(str(CONFIGS / spec))
  pipeline = make_pipeline(c.task, 8, c.seed)
  assert pipeline.batch_size == 8
  if "seq_len" in c.task:
    assert pipeline.seq_len == c.task.seq_len


@pytest.mark.parametrize("spec", COMPARE_SPECS)
def test_every_comparison_makes_its_runs_pipeline(spec, monkeypatch):
  monkeypatch.chdir(ROOT)  # a comparison names its base config relative to the checkout
  c = base_config(load_config_file(str(CONFIGS / "compare" / spec)))
  make_pipeline(c.task, 8, c.seed)


def test_task_config_holds_the_defaults_and_names_what_is_wrong():
  c = task_config("mqar", vocab_size=64, seq_len=64)
  assert c.to_dict() == dict(name="mqar", vocab_size=64, seq_len=64, eval_seq_lens=(),
                             num_kv_pairs=0, power_a=0.01, random_non_queries=False)
  with pytest.raises(ValueError, match=r"unknown keys \['pairs'\]; valid keys: "
                     r"\['eval_seq_lens', 'num_kv_pairs', 'power_a', 'random_non_queries'"):
    task_config("mqar", vocab_size=64, seq_len=64, pairs=4)
  with pytest.raises(ValueError, match="unknown keys.*seed"):  # the loop's, not the task's
    task_config("mqar", vocab_size=64, seq_len=64, seed=1)
  with pytest.raises(ValueError, match="seq_len has no default"):
    task_config("bytes", path="x.txt")
  with pytest.raises(ValueError, match="unknown task 'mqr'; known tasks: mqar, .*bytes, .*images"):
    task_config("mqr")
  # An int given for a float field stays overridable by floats.
  c = task_config("mqar", vocab_size=64, seq_len=64, power_a=1)
  c.lock()
  c.power_a = 0.5
  assert c.power_a == 0.5


@pytest.mark.parametrize("command,args,code,says", [
    ("ssm.train.main", ["--help"], 0, "--config.SECTION.KEY=VALUE"),
    ("ssm.compare", ["--help"], 0, "results.csv"),
    ("ssm.train.main", ["--config=nope.py", "--workdir=x"], 2, "no config file 'nope.py'"),
    ("ssm.train.main", ["--config=configs/mqar.py:nope", "--workdir=x"], 2,
     "configs/mqar.py:nope: expected one of"),
    ("ssm.compare", [], 2, "--config=FILE[:ARG] is required"),
])
def test_commands_have_help_and_one_line_config_errors(command, args, code, says):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", command, *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
  assert out.returncode == code, out.stderr[-2000:]
  text = out.stdout + out.stderr
  assert says in text and "Traceback" not in text, text[-2000:]


@pytest.mark.parametrize("spec,overrides,env,says", [
    ("mqar.py:mamba", {}, {"WANDB_MODE": "bogus"},
     "WANDB_MODE='bogus': expected one of online, offline, disabled (or unset it)"),
    ("mqar.py:mamba", {"train.stop_when": "eval/acc>=0.9"}, {},
     "train.stop_when='eval/acc>=0.9' names 'eval/acc'; the evals give eval/loss, "
     "eval/accuracy"),
    ("mqar.py:mamba", {"checkpoint.best_metric": "eval/bpb", "train.stop_when": ""}, {},
     "checkpoint.best_metric='eval/bpb': the evals give eval/loss, eval/accuracy (or '' "
     "for none)"),
    ("induction_heads.py:mamba", {"train.stop_when": "eval/accuracy@2048>=0.9"}, {},
     "train.stop_when='eval/accuracy@2048>=0.9' names 'eval/accuracy@2048'; the evals give "
     "eval/loss, eval/accuracy, eval/loss@128, eval/accuracy@128, eval/loss@256"),
    ("bytes.py:mamba", {"model.positions": "learned", "model.max_position_embeddings": 128},
     {}, "the run trains at length 256, beyond the model's 128 learned positions"),
])
def test_check_finds_what_would_fail_after_compiling(spec, overrides, env, says, monkeypatch):
  """ssm.config.check (the Trainer's first call): the stop and best metrics the evals
  give, lengths within learned positions, W&B's mode from WANDB_MODE."""
  from ssm.config import check
  monkeypatch.delenv("WANDB_MODE", raising=False)
  check(parse(str(CONFIGS / spec)))  # as the file has it: runs
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  c = parse(str(CONFIGS / spec), *(f"--config.{k}={v}" for k, v in overrides.items()))
  with pytest.raises(ValueError) as e:
    check(c)
  assert str(e.value).startswith(says), str(e.value)


@pytest.mark.parametrize("env,mode", [
    ({}, "offline"), ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": "dryrun"}, "offline"), ({"WANDB_MODE": "online"}, "online")])
def test_wandb_auto_follows_wandb_mode(env, mode, monkeypatch, tmp_path):
  from ssm.train.metrics import wandb_mode
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no credentials
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.delenv("WANDB_MODE", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert wandb_mode("auto") == mode
  assert wandb_mode("offline") == "offline"  # an explicit mode wins


def test_configs_readme_lists_every_config_and_its_args():
  """configs/README.md's tables: every config file, each with all of its :ARGs, the
  default first; each listed :ARG loads."""
  import inspect
  import re
  listed = dict(re.findall(r"^\| `((?:compare/)?\w+\.py)` \| ([^|]+) \|",
                           (CONFIGS / "README.md").read_text(), re.M))
  files = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.py"))
  assert sorted(listed) == files
  for name, args in listed.items():
    args = re.findall(r"`(\w+)`", args)
    path = CONFIGS / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (default,) = [p.default for p in inspect.signature(module.get_config).parameters.values()]
    assert args[0] == default, name
    if not name.startswith("compare/"):
      assert sorted(args) == sorted(archs(path)), name
    for arg in args:
      load_config_file(f"{path}:{arg}")
