"""ssm.compare: the plan matches sizes; a killed sweep finishes on rerun without
redoing finished runs; tables and plots are written; every paper reproduction in
configs/compare/ runs end to end at a tiny size."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ml_collections as mlc

from ssm.compare import compare as run_compare
from ssm.compare import learning_rates, load_config_file, plan
from ssm.flops import lm_flops, lm_params

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "compare" / "mqar.py")
TINY = ["--config.overrides.train.steps=6", "--config.overrides.train.eval_every=6",
        "--config.overrides.train.log_every=3", "--config.overrides.checkpoint.every=3",
        "--config.wandb_mode=disabled", "--config.sizes=(32,)", "--config.seeds=(0,)",
        "--config.lrs.attention=(3e-3,)", "--config.lrs.mamba=(3e-3,)",
        "--config.lrs.hybrid=(3e-3,)"]
REPRODUCTIONS = ["mqar", "induction_heads", "selective_copy", "bytes"]


def test_plan_matches_every_family_within_tolerance():
  cfg = load_config_file(CONFIG)
  cfg.families, cfg.match = ("mamba", "transformer++", "hybrid"), "params"
  cfg.sizes = (120, 128)
  cfg.lrs = mlc.ConfigDict({f: (1e-3, 3e-3) for f in cfg.families})
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
  sweep = sum(len(learning_rates(cfg, f)) for f in cfg.families)
  assert len(runs) == len(cfg.sizes) * len(cfg.seeds) * sweep
  for r in runs:
    assert (r.model.d_model, r.model.n_layer) == (r.size, 2)
  attention = next(r.model for r in runs if r.family == "attention")
  assert (attention.layer_mixers, attention.mlp) == ("AA", "none")


def test_flop_matching_uses_each_swept_length():
  """Attention's FLOPs grow with the length: each length gets its own match."""
  cfg = load_config_file(CONFIG)
  cfg.match, cfg.same_depth, cfg.sizes, cfg.seq_lens = "flops", False, (144,), (64, 1024)
  cfg.families = ("mamba", "transformer++", "hybrid")
  cfg.lrs = mlc.ConfigDict({f: (3e-3,) for f in cfg.families})
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
  assert sorted(r["family"] for r in results) == ["attention", "hybrid", "mamba"]
  table = (tmp_path / "results.md").read_text()
  assert all(f in table for f in ("mamba", "attention", "hybrid", "eval_loss"))
  assert (tmp_path / "results.csv").exists() and (tmp_path / "loss.png").stat().st_size > 0


def _tiny(cfg):
  """A reproduction at its smallest: one size, seed and learning rate per family, two
  steps, evaluated once (at every evaluation length the config names)."""
  cfg.sizes, cfg.seeds, cfg.parallel, cfg.wandb_mode = cfg.sizes[:1], (0,), 1, "disabled"
  if isinstance(cfg.lrs, mlc.ConfigDict):
    for family in cfg.lrs:
      cfg.lrs[family] = cfg.lrs[family][:1]
  else:
    cfg.lrs = cfg.lrs[:1]
  cfg.overrides.train.update(steps=2, eval_every=2, eval_steps=1, log_every=1)
  cfg.overrides.checkpoint.every = 2
  return cfg


@pytest.mark.parametrize("name", REPRODUCTIONS)
def test_each_reproduction_runs_end_to_end(name, tmp_path):
  """The pipeline and the table of each paper's reproduction (not its accuracy: that
  is for the full runs in docs/results/), and its paper setting plans."""
  cfg = _tiny(load_config_file(str(ROOT / "configs" / "compare" / f"{name}.py")))
  cfg.families = cfg.families[:2]  # the pipeline, not the families (each tested elsewhere)
  workdir, table, figures = run_compare(cfg, tmp_path)
  rows = list(csv.DictReader((tmp_path / "results.csv").open()))
  assert sorted(r["family"] for r in rows) == sorted(cfg.families)
  assert all(float(r["steps"]) == 2 for r in rows)
  assert "The paper: " in table and all(f in table for f in cfg.families)
  assert all(Path(f).stat().st_size > 0 for f in figures)
  base = load_config_file(cfg.base)
  extra = [f"accuracy@{n}" for n in base.task.get("eval_seq_lens", ()) if n != base.task.seq_len]
  if name == "bytes":
    extra = ["bits_per_byte"]
  assert all(k in rows[0] and rows[0][k] != "nan" for k in extra), (extra, rows[0].keys())
  paper = load_config_file(str(ROOT / "configs" / "compare" / f"{name}.py") + ":paper")
  assert plan(paper)


def test_first_seed_sweep_runs_other_seeds_at_its_best_rate(monkeypatch, tmp_path, caplog):
  """lr_sweep="first_seed": every rate at seed 0, then seeds 1 and 2 only at the rate
  that was best at seed 0, per (family, size); the table reports that rate. One line
  says the plan first."""
  import ssm.compare as sc
  cfg = load_config_file(CONFIG)
  cfg.sizes, cfg.seeds, cfg.lr_sweep = (64,), (0, 1, 2), "first_seed"
  cfg.families = ("attention", "mamba")
  cfg.lrs = mlc.ConfigDict({"attention": (1e-3, 3e-3, 1e-2), "mamba": (1e-3, 3e-3)})
  good = {"attention": 3e-3, "mamba": 1e-3}
  batches = []

  def fake_execute(cfg, runs, workdir):
    batches.append(runs)
    return [dict(family=r.family, size=r.size, seed=r.seed, lr=r.lr, seq_len=64,
                 eval_accuracy=(0.9 if r.lr == good[r.family] else 0.5) + 0.01 * r.seed,
                 eval_loss=1.0, tokens_per_sec=1.0, steps=1, tokens=1, train_flops=1.0,
                 evals={}) for r in runs]

  monkeypatch.setattr(sc, "_execute", fake_execute)
  with caplog.at_level("INFO", logger="ssm.compare"):
    results = sc.execute(cfg, tmp_path)
  first, rest = batches
  assert "attention, mamba matched on width (ref 64: attention d64 l2, mamba d64 l2); " \
         f"seeds (0, 1, 2); 9 runs, 2 at a time -> {tmp_path}" in caplog.text
  assert {(r.family, r.lr) for r in first} == {("attention", 1e-3), ("attention", 3e-3),
                                              ("attention", 1e-2), ("mamba", 1e-3),
                                              ("mamba", 3e-3)}
  assert all(r.seed == 0 for r in first)
  assert sorted((r.family, r.seed, r.lr) for r in rest) == [
      ("attention", 1, 3e-3), ("attention", 2, 3e-3), ("mamba", 1, 1e-3), ("mamba", 2, 1e-3)]
  rows = sc.best_rows(results, "eval_accuracy", "max")
  assert [(r["family"], r["lr"], r["seeds"]) for r in rows] == [("attention", 3e-3, 3),
                                                                 ("mamba", 1e-3, 3)]
  assert rows[0]["eval_accuracy_min"] == 0.9 and rows[0]["eval_accuracy_max"] == 0.92


def test_finished_runs_of_another_config_are_an_error_not_reused(tmp_path):
  """A finished run is reused only if it was trained with the config asked for now."""
  cfg = _tiny(load_config_file(CONFIG))
  cfg.families = ("attention",)
  run_compare(cfg, tmp_path)
  cfg.overrides.train.warmup_steps = 1  # same run names, another recipe
  with pytest.raises(ValueError, match="another config"):
    run_compare(cfg, tmp_path)


# --- image families ------------------------------------------------------------------

IMAGES = str(ROOT / "configs" / "compare" / "images.py")
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("setting", ["", ":cifar10", ":paper"])
def test_image_plan_matches_every_vision_family_within_tolerance(setting):
  """ViT, ViT+registers, Vim and Vim+registers matched to the reference ViT on its
  images, on parameters and on training FLOPs per image."""
  from ssm.flops import vision_flops, vision_params
  cfg = load_config_file(IMAGES + setting)
  for criterion, measure in (("params", vision_params),
                             ("flops", lambda c: 3 * vision_flops(c)["total"])):
    cfg.match = criterion
    runs = plan(cfg)
    assert {r.family for r in runs} == {"vit", "vit+reg", "vim", "vim+reg"}
    ref = next(r.model for r in runs if r.family == "vit")
    assert ref.d_model == cfg.sizes[0] and ref.n_layer == cfg.reference.n_layer
    for r in runs:
      assert abs(measure(r.model) - measure(ref)) / measure(ref) <= 0.02, r.name
      assert r.model.num_registers == (4 if r.family.endswith("+reg") else 0)
      assert (r.model.image_size, r.model.patch_size, r.model.num_classes) == (
          ref.image_size, ref.patch_size, ref.num_classes)


def test_image_plan_bad_input():
  cfg = load_config_file(IMAGES)
  cfg.families = ("vit", "mamba")
  with pytest.raises(ValueError, match="mix image families"):
    plan(cfg)
  cfg = load_config_file(IMAGES)
  cfg.seq_lens = (64,)
  with pytest.raises(ValueError, match="image families have none"):
    plan(cfg)


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_image_comparison_runs_end_to_end(tmp_path):
  """The table has the image columns (registers, FLOPs per image, images/s) and the
  figures plot accuracy against parameters and FLOPs."""
  cfg = _tiny(load_config_file(IMAGES))
  cfg.families = ("vit+reg",)  # matched to the reference ViT; one run
  _, table, figures = run_compare(cfg, tmp_path)
  rows = {r["family"]: r for r in csv.DictReader((tmp_path / "results.csv").open())}
  assert set(rows) == {"vit+reg"} and "images_per_sec" in table
  assert rows["vit+reg"]["registers"] == "4" and rows["vit+reg"]["d_model"] == str(cfg.sizes[0])
  for r in rows.values():
    assert float(r["steps"]) == 2 and float(r["images"]) == 2 * 32
    assert float(r["images_per_sec"]) > 0 and float(r["train_flops_per_image"]) > 0
    assert 0 <= float(r["eval_accuracy"]) <= 1
  assert [Path(f).name for f in figures] == ["accuracy.png", "loss.png"]
  assert all(Path(f).stat().st_size > 0 for f in figures)
