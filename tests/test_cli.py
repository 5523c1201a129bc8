"""ssm-train from the command line as a user meets it: a mistake is one line on stderr
saying what to do, exit 2, found before anything compiles (issue 26)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ssm_train(*args, **env):
  """(exit code, stdout lines, stderr lines) of `ssm-train ARGS` run in the checkout."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | env
  out = subprocess.run([sys.executable, "-m", "ssm.train.main", *map(str, args)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  return out.returncode, out.stdout.splitlines(), out.stderr.splitlines()


# Mistakes that the config shows: found before the workdir is made (or anything compiled).
# (test_config checks the others that ssm.config.check finds, in process.)
@pytest.mark.parametrize("args,env,says", [
    (["configs/mqar.py:mamba", "--config.train.steps=abc"], {},
     "--config.train.steps=abc: expected an int like the config file's 3000"),
    (["configs/mqar.py:mamba", "--config.wandb.mode=foo"], {},
     "wandb.mode='foo': expected one of auto, online, offline, disabled"),
    (["configs/mqar.py:mamba", "--config.train.stop_when=accuracy"], {},
     "train.stop_when='accuracy': expected METRIC>=VALUE or METRIC<=VALUE"),
    (["configs/induction_heads.py:attention", "--config.model.positions=learned",
      "--config.model.max_position_embeddings=64"], {},
     "the run evaluates at length 128, beyond the model's 64 learned positions"),
])
def test_config_mistakes_are_one_line_before_compiling(tmp_path, args, env, says):
  spec, *overrides = args
  code, out, err = ssm_train(f"--config={spec}", f"--workdir={tmp_path / 'run'}", *overrides,
                             **env)
  assert (code, out, len(err)) == (2, [], 1), err
  assert err[0].startswith(f"ssm-train: {says}"), err[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,says", [
    (["--config=configs/mqar.py:mamba"],
     "--workdir is required (where checkpoints and metrics go)"),
    (["--config=configs/images.py:vit", "--config.task.path=/nonexistent", "--workdir=W"],
     "task (images): no directory /nonexistent with the fashion_mnist files (Debian: "
     "`apt-get install dataset-fashion-mnist`"),
    (["--config=configs/bytes.py:mamba", "--config.task.path=/nonexistent.txt", "--workdir=W"],
     "task (bytes): no text file at task.path='/nonexistent.txt'"),
])
def test_missing_flags_and_data_are_one_line(tmp_path, args, says):
  code, out, err = ssm_train(*(a.replace("=W", f"={tmp_path}") for a in args))
  assert (code, out, len(err)) == (2, [], 1), err
  assert err[0].startswith(f"ssm-train: {says}"), err[0]


def test_helpshort_is_the_help():
  code, out, err = ssm_train("--helpshort")
  assert (code, err) == (0, []) and out[0].startswith("ssm-train: trains (or resumes)")
  assert any("--config.SECTION.KEY=VALUE" in line for line in out)


def test_wandb_mode_environment_variable_wins_over_auto(tmp_path):
  """wandb.mode=auto (the default) would log offline without credentials; W&B's own
  WANDB_MODE=disabled turns it off."""
  code, _, err = ssm_train("--config=configs/mqar.py:mamba", f"--workdir={tmp_path}",
                           "--config.train.steps=1", "--config.model.d_model=16",
                           "--config.model.n_layer=1", "--config.train.batch_size=2",
                           "--config.train.eval_every=0", "--config.checkpoint.async_save=False",
                           WANDB_MODE="disabled", HOME=str(tmp_path))
  assert code == 0, err[-20:]
  assert (tmp_path / "metrics.jsonl").exists()
  assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id").exists()
