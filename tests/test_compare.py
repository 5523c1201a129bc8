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
from ssm.flops import lm_flops, lm_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare" / "mqar.py")
TINY = ["--config.overrides.train.steps=6", "--config.overrides.train.eval_every=6",
        "--config.overrides.train.log_every=3", "--config.overrides.checkpoint.every=3",
        "--config.wandb_mode=disabled"]


def test_plan_matches_every_family_within_tolerance():
  cfg = load_config_file(CONFIG)
  cfg.families, cfg.match = ("mamba", "transformer++", "hybrid"), "params"
  cfg.sizes = (120, 128)
  cfg.lrs = (1e-3, 3e-3)
  cfg.seeds = (0,)
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


def test_width_plan_is_zoologys_axis():
  """match="width": every family at the reference's width and depth, mixer-only
  attention among them, every seed and learning rate."""
  cfg = load_config_file(CONFIG)
  runs = plan(cfg)
  assert len(runs) == len(cfg.sizes) * len(cfg.families) * len(cfg.seeds) * len(cfg.lrs)
  for r in runs:
    assert (r.model.d_model, r.model.n_layer) == (r.size, 2)
  attention = next(r.model for r in runs if r.family == "attention")
  assert (attention.layer_mixers, attention.mlp) == ("AA", "none")


def test_flop_matching_uses_each_swept_length():
  """Attention's FLOPs grow with the length: each length gets its own match."""
  cfg = load_config_file(CONFIG)
  cfg.match, cfg.same_depth, cfg.sizes, cfg.seq_lens = "flops", False, (128,), (64, 1024)
  cfg.families = ("mamba", "transformer++", "hybrid")
  runs = plan(cfg)
  for seq_len in (64, 1024):
    at = [r for r in runs if r.seq_len == seq_len]
    target = 3 * lm_flops(next(r.model for r in at if r.family == "mamba"), seq_len)["total"]
    for r in at:
      assert abs(3 * lm_flops(r.model, seq_len)["total"] - target) / target <= 0.02, r.name
  tpp = {r.seq_len: r.model for r in runs if r.family == "transformer++"}
  assert tpp[64] != tpp[1024]


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
