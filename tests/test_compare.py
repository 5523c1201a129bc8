"""ssm.compare: the plan matches sizes; a killed sweep finishes on rerun without
redoing finished runs; tables and plots are written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssm.compare import load_config_file, plan
from ssm.flops import lm_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare" / "mqar.py")
TINY = ["--config.overrides.train.steps=6", "--config.overrides.train.eval_every=6",
        "--config.overrides.train.log_every=3", "--config.overrides.checkpoint.every=3",
        "--config.wandb_mode=disabled"]


def test_plan_matches_every_family_within_tolerance():
  cfg = load_config_file(CONFIG)
  cfg.sizes = (120, 128)
  cfg.lrs = (1e-3, 3e-3)
  runs = plan(cfg)
  assert len(runs) == 2 * 3 * 2
  assert {r.model.n_layer for r in runs} == {2}  # same depth, as Zoology
  for size in (120, 128):
    target = lm_params(next(r.model for r in runs if r.family == "mamba" and r.size == size))
    for r in runs:
      if r.size == size:
        assert abs(lm_params(r.model) - target) / target <= 0.02
  hybrid = next(r.model for r in runs if r.family == "hybrid")
  assert set(hybrid.layer_mixers) == {"M", "A"}
  cfg.sizes = (64,)
  with pytest.raises(ValueError, match="cannot be matched"):
    plan(cfg)
  cfg.same_depth = False  # free depth: close matches exist
  assert len(plan(cfg)) == 3 * 2


def compare(workdir, *extra, wait=True):
  cmd = [sys.executable, "-m", "ssm.compare", f"--config={CONFIG}", f"--workdir={workdir}",
         *TINY, *extra]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, out[-3000:]
  return out


def test_killed_sweep_finishes_without_redoing_runs(tmp_path):
  proc = compare(tmp_path, wait=False)
  runs = tmp_path / "runs"
  deadline = time.time() + 600
  while time.time() < deadline and len(list(runs.glob("*/result.json"))) < 1:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)  # no clean shutdown at all
  proc.communicate()
  finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
  assert 1 <= len(finished) < 3
  out = compare(tmp_path, "--config.parallel=2")  # the rest, two at a time
  assert out.count("finished, skipped") == len(finished)
  for name, mtime in finished.items():
    assert (runs / name / "result.json").stat().st_mtime_ns == mtime
  results = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
  assert sorted(r["family"] for r in results) == ["hybrid", "mamba", "transformer++"]
  table = (tmp_path / "results.md").read_text()
  assert all(f in table for f in ("mamba", "transformer++", "hybrid", "eval_loss"))
  assert (tmp_path / "results.csv").exists() and (tmp_path / "loss.png").stat().st_size > 0
